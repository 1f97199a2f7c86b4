"""Language modelling (pretraining): next-token cross-entropy over packed documents.

    loss = - sum_{b,t : label != ignore} log softmax(logits[b, t])[label[b, t]]  /  N_step

N_step is the number of target tokens in the whole step (all micro-batches, all ranks), so the loss is
the mean per target token however the batch is split. Labels arrive already shifted by the collator;
document ids become a mask spec so attention stays inside each packed document. Logits are computed in
float32 for the softmax (bf16 log-probs over a 100K vocabulary lose whole nats at the tail).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.data.packed import IGNORE_INDEX
from workbench.nn.attention import MaskSpec
from workbench.train.objectives.base import LossOutput, ModelRole


class LMObjective:
    name = "lm"
    roles = {"policy": ModelRole(trainable=True)}

    def experience(self, step, models, data):
        return data  # pretraining data is its own experience

    def units(self, micro_batch: dict) -> int:
        return int((micro_batch["labels"] != IGNORE_INDEX).sum())

    def logits(self, models, micro_batch: dict) -> torch.Tensor:
        """The policy's float32 logits (B, T, V) for the micro-batch, attention kept inside each document."""
        policy = models["policy"]
        mask = MaskSpec(document_ids=micro_batch.get("document_ids"))
        out = policy.forward({"input_ids": micro_batch["input_ids"], "positions": micro_batch.get("positions"),
                              "mask": mask})
        return policy.logits(out.hidden).float()  # (B, T, V)

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        logits = self.logits(models, micro_batch)  # (B, T, V)
        labels = micro_batch["labels"]
        # sum of -log p(label) over the real targets
        nll_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        n = self.units(micro_batch)
        return LossOutput(
            loss=nll_sum / max(total_units, 1),
            metrics={"nll_sum": float(nll_sum.detach()), "targets": n},
            units={"tokens": int(labels.numel())},
        )
