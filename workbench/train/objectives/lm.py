"""Language modelling (pretraining): next-token cross-entropy over packed documents.

    loss = - sum_{b,t : label != ignore} log softmax(logits[b, t])[label[b, t]]  /  N_step

N_step is the number of target tokens in the whole step (all micro-batches, all ranks), so the loss is
the mean per target token however the batch is split.

A model with multi-token-prediction modules (DeepSeek-V3: `out.mtp_hidden`, asked for with `mtp` in the batch)
adds their loss, normalised like the main one (the paper's 1/T):

    loss_mtp = lambda / D * sum_d sum_{b,t : label_d != ignore} -log softmax(logits(h_d[b, t]))[label_d]  /  N_step,
    label_d[b, t] = labels[b, t + d]   (row t of depth d predicts the token after next, for d = 1;
                                        ignored where tokens t and t + d belong to different documents)

with lambda = model.cfg.mtp_loss_weight, logged as `mtp_loss` (the step's value, lambda left out).
A model with auxiliary terms (a mixture of experts: `aux_loss(aux, reduce, reduce_seq, seq_split)`) adds its
weighted auxiliary loss, averaged over the step's micro-batches; `reduce` is the engine's all-reduce over the
ranks holding different data (data-parallel and context-parallel ranks), so the term is each rank's share of
the whole micro-batch's value (see workbench.models.moe.balance_loss); `reduce_seq` sums over the `seq_split`
context-parallel ranks holding slices of the same sequences (the engine's `all_reduce_cp` and `cp_size`), for
per-sequence terms (workbench.models.moe.sequence_balance_loss).
`metrics["lm_loss"]` keeps the language-modelling part alone (what the trainer logs as `loss`, comparable
with the validation loss); `aux_loss` and the model's own metrics (balance loss, expert load) are logged
beside it. Labels arrive already shifted by the collator;
document ids become a mask spec so attention stays inside each packed document. Logits are computed in
float32 for the softmax (bf16 log-probs over a 100K vocabulary lose whole nats at the tail).

Chunked loss (`objective.loss_chunk` = n > 0). By default the head runs once over the whole micro-batch: the
float32 logits (B, T, V) are formed, autograd keeps their log-softmax, and backward builds the logits' gradient
of the same size: 4 B T V bytes each, 16 GiB apiece for B = 1, T = 32768 and Llama 3's V = 128256. With a chunk,
only the hidden rows of the real targets go through the head, n at a time, each chunk under non-reentrant
activation checkpointing (`logprobs.target_logprobs`): autograd keeps the rows and one log-prob each, and the
(n, V) logits are recomputed chunk by chunk in backward, so one chunk's logits are live at a time (one extra head
forward per chunk). The main loss is the same sum, -sum log p(label) = sum CE, so its value and every gradient
equal the unchunked ones (tested in fp32). Under FSDP2 and ZeRO-3 each head call gathers the weight, so every rank
pads its targets to the most any rank holds (`most_on_any_rank`) and makes as many calls. The MTP heads, the
auxiliary losses and validation are unchanged (validation runs without gradients: no kept logits). Tensor
parallelism (vocabulary-split logits, `parallel.loss_parallel`) does not take a chunk: refused in the config.

Validation (`validation_sums`, `validation_metrics`): the loss in nats per target token over the held-out
batches, and bits per byte = sum of -log p over the targets that stand for text / (ln 2 * their bytes); special
tokens (eos between documents, the chat template's role and end tokens) are 0 bytes and stay out of both sums.
SFT inherits all of this, over the response tokens its labels keep.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.data.packed import IGNORE_INDEX
from workbench.nn.attention import MaskSpec
from workbench.train.objectives.base import LossOutput, ModelRole
from workbench.train.objectives.logprobs import label_logprobs, most_on_any_rank


def real_tokens(micro_batch: dict) -> int:
    """Tokens the micro-batch computes on, padding excluded (packed windows have none)."""
    lengths = micro_batch.get("lengths")
    return int(lengths.sum()) if lengths is not None else int(micro_batch["labels"].numel())


def add_aux_loss(models, out, loss: torch.Tensor, metrics: dict, micro_batches: int) -> torch.Tensor:
    """`loss` plus the policy's weighted auxiliary loss (a mixture of experts' balance terms) averaged over the
    step's micro-batches, its metrics added to `metrics`; `loss` unchanged for a model without one."""
    model = models["policy"].unwrap()
    if not out.aux or not hasattr(model, "aux_loss"):
        return loss
    engine = models["policy"]
    aux_loss, aux_metrics = model.aux_loss(out.aux, engine.all_reduce, engine.all_reduce_cp, engine.cp_size)
    aux_loss = aux_loss / micro_batches
    metrics.update(aux_metrics, aux_loss=float(aux_loss.detach()))
    return loss + aux_loss


class LMObjective:
    name = "lm"
    roles = {"policy": ModelRole(trainable=True)}
    data = "windows"

    def __init__(self, cfg=None):
        self.cfg = cfg  # the [objective] section (workbench.job.ObjectiveSection); None in unit tests
        self.tokenizer = None
        self._token_bytes: torch.Tensor | None = None

    def setup(self, job, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64)

    def frozen_models(self, job) -> dict[str, tuple[str, str]]:
        """The frozen roles to load: {role: (run folder or checkpoint, the config key that names it)}."""
        return {}

    def prepare(self, models, train_data, val_batches, log=print) -> tuple[str, ...]:
        """Work before the first step; returns the roles no longer needed after it (none here)."""
        return ()

    def sample_prompt(self, text: str) -> tuple[list[int], list[int] | None]:
        """The ids a closing sample continues, and the ids that stop it (None: the tokenizer's eos): `text` as a
        document, or for chat data (an objective that set `self.template`) as a user turn stopped at <|end|>."""
        template = getattr(self, "template", None)
        if template is not None:
            return template.ask(text), template.stop_ids
        return self.tokenizer.encode(text), None

    def experience(self, step, models, data):
        self.micro_batches = len(data)  # the auxiliary loss is averaged over them
        return data  # pretraining data is its own experience

    def units(self, micro_batch: dict) -> int:
        return int((micro_batch["labels"] != IGNORE_INDEX).sum())

    def policy_output(self, models, micro_batch: dict):
        """The policy's output (hidden states, aux), attention kept inside each document."""
        mask = MaskSpec(document_ids=micro_batch.get("document_ids"))
        # `mtp`: models with multi-token-prediction modules run them (their loss is added in `loss`)
        return models["policy"].forward({"input_ids": micro_batch["input_ids"],
                                         "positions": micro_batch.get("positions"), "mask": mask,
                                         "mtp": torch.is_grad_enabled()})

    def forward(self, models, micro_batch: dict):
        """The policy's output (hidden states, aux) and float32 logits (B, T, V)."""
        out = self.policy_output(models, micro_batch)
        return out, models["policy"].logits(out.hidden).float()  # (B, T, V)

    def nll_sum(self, models, out, labels: torch.Tensor) -> torch.Tensor:
        """sum of -log p(label) over the real targets of `labels` (B, T), from the hidden states `out.hidden`:
        all logits at once, or `objective.loss_chunk` targets at a time (the same value and gradients)."""
        policy = models["policy"]
        chunk = getattr(self.cfg, "loss_chunk", 0) if self.cfg is not None else 0
        if chunk > 0:
            # -sum_i log p(y_i), the head a chunk of rows at a time (logits recomputed in backward); every rank
            # pads to the most targets on any rank, so a sharded head is gathered equally often everywhere
            logp, _, _ = label_logprobs(policy.logits, out.hidden, labels, chunk,
                                        agree=lambda n: most_on_any_rank(policy, n))
            return -logp.sum()
        logits = policy.logits(out.hidden).float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def logits(self, models, micro_batch: dict) -> torch.Tensor:
        return self.forward(models, micro_batch)[1]

    @torch.no_grad()
    def validation_sums(self, models, batch: dict) -> dict[str, float]:
        logits = self.logits(models, batch)  # (B, T, V)
        keep = batch["labels"] != IGNORE_INDEX
        labels = batch["labels"][keep]  # (N,)
        # -log p(label) per target
        nll = F.cross_entropy(logits[keep], labels, reduction="none").double().cpu()
        n_bytes = self._token_bytes[labels.cpu()]
        return {"nll": float(nll.sum()), "targets": len(labels), "text_nll": float(nll[n_bytes > 0].sum()),
                "text_bytes": float(n_bytes.sum())}

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"val_loss": sums["nll"] / max(sums["targets"], 1),
                "val_bpb": (sums["text_nll"] / (math.log(2) * sums["text_bytes"]) if sums["text_bytes"]
                            else float("nan"))}

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        out = self.policy_output(models, micro_batch)
        labels = micro_batch["labels"]
        # sum of -log p(label) over the real targets
        nll_sum = self.nll_sum(models, out, labels)
        n = self.units(micro_batch)
        lm_loss = nll_sum / max(total_units, 1)
        metrics = {"nll_sum": float(nll_sum.detach()), "targets": n, "lm_loss": lm_loss.detach()}
        loss = lm_loss
        model = models["policy"].unwrap()
        if out.mtp_hidden:
            mtp_sum = torch.zeros((), device=labels.device)
            docs = micro_batch.get("document_ids")
            for d, h in enumerate(out.mtp_hidden, start=1):
                # depth d, row t predicts labels[:, t + d]; not across a document boundary of a packed row
                target = labels[:, d:]
                if docs is not None:
                    target = target.masked_fill(docs[:, :-d] != docs[:, d:], IGNORE_INDEX)
                mtp_logits = models["policy"].logits(h).float()  # (B, T - d, V)
                mtp_sum = mtp_sum + F.cross_entropy(mtp_logits.flatten(0, 1), target.flatten(),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            mtp_loss = mtp_sum / max(total_units, 1)
            loss = loss + model.cfg.mtp_loss_weight / len(out.mtp_hidden) * mtp_loss
            metrics["mtp_loss"] = float(mtp_loss.detach()) / len(out.mtp_hidden)  # a share: summed over the step
        loss = add_aux_loss(models, out, loss, metrics, getattr(self, "micro_batches", 1))
        return LossOutput(loss=loss, metrics=metrics, units={"tokens": real_tokens(micro_batch)})
