"""Supervised fine-tuning (SFT): next-token cross-entropy on the assistant's tokens only.

    loss = - sum_{b,t : target[b, t]} log p(y[b, t+1] | y[b, <=t])  /  N_step,
    N_step = the number of target tokens in the whole step (every micro-batch on every rank)

The data are conversations (`data.train_file`, chat records) rendered by the chat template
(`workbench.data.chat`): the reserved role tokens separate the turns, and the targets are the text of the
assistant turns and each turn's closing `<|end|>` (`data.train_on = "assistant"`; `"last"` trains the last
assistant turn only). Prompt, system text, role tokens and padding have label -100 (IGNORE_INDEX).

Normalization under gradient accumulation. Conversations differ in length, so micro-batches hold different
numbers of targets. Dividing each micro-batch's sum by its own count and averaging over micro-batches (what a
plain `reduction="mean"` per micro-batch gives) weights a target in a short micro-batch more than one in a long
one, and the result changes with the accumulation depth. Here every micro-batch's *sum* is divided by the
step's global count (the trainer all-reduces it before the first forward: transformers' `num_items_in_batch`),
so the step's loss is the plain mean over all its targets for any split: 1 x 8 equals 2 x 4 equals 4 x 2, and
2 ranks equal one process (tested).

Batching. Padded (`data.pack = false`): conversations right-padded to the longest in the micro-batch; a causal
model's real tokens never see the padding after them. Packed (`data.pack = true`): conversations placed into
rows of `data.seq_len` tokens back to back with document ids, so attention stays inside each conversation and
RoPE positions restart at each one (the block-diagonal mask of the reference notes); the loss is the same sum
over the same targets, so padded and packed give the same loss (tested) while packing wastes less compute.

Everything else (the float32 log-softmax, validation loss and bits per byte over the targets, a mixture of
experts' auxiliary loss, DeepSeek-V3's multi-token prediction inside each conversation) is the language
modelling objective's, which this class extends; only the data and the closing sample's prompt differ.

Deviations from TRL's SFTTrainer: no `<|eos|>` is appended after a conversation (`<|end|>` closes the
assistant's turn and is what generation stops at); a conversation longer than `data.seq_len` keeps its start
and loses its end (counted when the file is read), and one whose targets are all cut away is dropped.
"""

from __future__ import annotations

from workbench.data.chat import ChatTemplate
from workbench.train.objectives.lm import LMObjective


class SFTObjective(LMObjective):
    name = "sft"
    data = "chat"

    def setup(self, job, tokenizer) -> None:
        super().setup(job, tokenizer)
        self.template = ChatTemplate(tokenizer)  # the closing sample asks a user turn (LMObjective.sample_prompt)
