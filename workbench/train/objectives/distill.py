"""Knowledge distillation: a student matches a frozen teacher's next-token distributions.

What it is
    A large model's output distribution carries more than its argmax: which wrong tokens are nearly right
    ("dark knowledge", Hinton et al. 2015). A student trained to match it learns from every vocabulary entry at
    every position instead of one label, so it reaches a lower loss in the same steps than it would from the
    labels alone. Teacher and student may differ in every size (layers, width, heads, family) but must share
    the tokenizer, so that their vocabularies index the same tokens.

The math, per target position t (the positions whose label is not -100), with p = softmax(z / T):
    forward_kl   D = KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)         mean-seeking: cover the teacher
    reverse_kl   D = KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)         mode-seeking: stay where it is sure
    jsd          M = beta p_T + (1 - beta) p_S                               (built in log space, logsumexp)
                 D = beta KL(p_T || M) + (1 - beta) KL(p_S || M)             generalised JSD (GKD), 0 < beta < 1
    loss_t       = alpha T^2 D + (1 - alpha) CE(y_t, z_S)                   CE at temperature 1
    loss         = sum_t loss_t / N_step                                     N_step: the step's target count

The intuition of T^2: the soft targets' gradient scales as 1 / T^2 (Hinton, section 2), so multiplying by T^2
keeps the soft and hard terms in proportion when T changes; at T = 1 it is 1. We apply it to all three
divergences (GKD uses no T^2 with its JSD, and T <= 1; at T = 1 the two agree).

Design choices
    The teacher has its own engine without an optimizer (`objective.teacher`: a run folder or checkpoint;
    the trainer checks its tokenizer is the dataset's) and runs under no_grad in the same micro-batch. Only the
    rows with a target go through either head (N x V, not B x T x V). When the two models' vocabulary sizes
    differ (an embedding padded to a multiple), the divergence is taken over the tokenizer's ids only, the
    columns both models define; the hard-label CE uses the student's full head, as language modelling does,
    so `loss` (the CE part, logged like the LM loss) and the validation loss compare with a student trained
    without a teacher. The data are the dataset's packed windows (pretraining distillation), or conversations
    of `data.train_file` (targets on the assistant's tokens), whichever the config gives.
    Logged: `loss` (the hard-label CE), `kd` (D at temperature T, per target); validation adds `val_kd` and
    `val_teacher_loss` (the teacher's own CE on the same targets: the floor a student could approach).

Differences from the papers
    Reverse KL and JSD are computed on the data's sequences (off-policy), not on student samples as MiniLLM and
    GKD's on-policy fraction `lmbda` do (sampling rollouts is the RL objectives' machinery).

Sources
    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015; Gu et al., "MiniLLM", 2023;
    Agarwal et al., "On-Policy Distillation of Language Models" (GKD), 2024; TRL's GKDTrainer (read, not copied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.data.chat import ChatTemplate
from workbench.data.packed import IGNORE_INDEX
from workbench.nn.attention import MaskSpec
from workbench.train.objectives.base import LossOutput, ModelRole
from workbench.train.objectives.lm import LMObjective, add_aux_loss, real_tokens


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (N,) between the teacher's and the student's distributions at temperature T."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        # KL(p_T || p_S) = sum p_T (log p_T - log p_S)
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "reverse_kl":
        # KL(p_S || p_T) = sum p_S (log p_S - log p_T)
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta's endpoints are forward_kl and reverse_kl)")
        # log M = logsumexp(log beta + log p_T, log (1 - beta) + log p_S)
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        # beta KL(p_T || M) + (1 - beta) KL(p_S || M)
        return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}: expected forward_kl, reverse_kl or jsd")


class DistillObjective(LMObjective):
    name = "distill"
    roles = {"policy": ModelRole(trainable=True), "teacher": ModelRole(trainable=False)}
    data = "windows"  # or "chat" when data.train_file is set (setup)

    def setup(self, job, tokenizer) -> None:
        super().setup(job, tokenizer)
        self.vocab = tokenizer.vocab_size  # the ids both models define
        if job.data.train_file:
            self.data = "chat"
            self.template = ChatTemplate(tokenizer)

    def frozen_models(self, job) -> dict[str, tuple[str, str]]:
        return {"teacher": (self.cfg.teacher, "objective.teacher")}

    def _rows(self, engine, mb: dict, keep: torch.Tensor):
        """The model's output and its float32 logits (N, V) at the target rows."""
        mask = MaskSpec(document_ids=mb.get("document_ids"))
        out = engine.forward({"input_ids": mb["input_ids"], "positions": mb.get("positions"), "mask": mask})
        return out, engine.logits(out.hidden[keep][None])[0].float()  # (N, V)

    def _terms(self, models, mb: dict):
        keep = mb["labels"] != IGNORE_INDEX  # (B, T)
        labels = mb["labels"][keep]  # (N,)
        out, z_s = self._rows(models["policy"], mb, keep)
        with torch.no_grad():
            _, z_t = self._rows(models["teacher"], mb, keep)
        cfg = self.cfg
        kd = divergence(z_s[:, : self.vocab], z_t[:, : self.vocab], cfg.divergence, cfg.temperature, cfg.jsd_beta)
        ce = F.cross_entropy(z_s, labels, reduction="none")  # (N,)
        return out, kd, ce, z_t, labels

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        out, kd, ce, _, labels = self._terms(models, micro_batch)
        cfg = self.cfg
        # loss_t = alpha T^2 D + (1 - alpha) CE, summed over the targets / N_step
        total = (cfg.alpha * cfg.temperature**2 * kd + (1 - cfg.alpha) * ce).sum() / max(total_units, 1)
        lm_loss = ce.detach().sum() / max(total_units, 1)
        metrics = {"lm_loss": lm_loss, "targets": len(labels)}
        total = add_aux_loss(models, out, total, metrics, getattr(self, "micro_batches", 1))
        return LossOutput(loss=total, metrics=metrics, units={"tokens": real_tokens(micro_batch)},
                          sums={"kd": float(kd.detach().sum())})

    @torch.no_grad()
    def validation_sums(self, models, batch: dict) -> dict[str, float]:
        _, kd, ce, z_t, labels = self._terms(models, batch)
        n_bytes = self._token_bytes[labels.cpu()]
        nll = ce.double().cpu()
        teacher_nll = F.cross_entropy(z_t, labels, reduction="sum")
        return {"nll": float(nll.sum()), "targets": len(labels), "text_nll": float(nll[n_bytes > 0].sum()),
                "text_bytes": float(n_bytes.sum()), "kd": float(kd.sum()), "teacher_nll": float(teacher_nll)}

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["targets"], 1)
        return {**super().validation_metrics(sums), "val_kd": sums["kd"] / n, "val_teacher_loss": sums["teacher_nll"] / n}
