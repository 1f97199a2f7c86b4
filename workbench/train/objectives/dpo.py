"""Direct preference optimization (DPO), its label-smoothed form (cDPO), IPO, and RPO's added NLL term.

What it is
    Preference data says, for a prompt x, that completion y_w is better than y_l. RLHF would fit a reward model
    to such pairs and then maximise it under a KL anchor to a reference policy; DPO (Rafailov et al. 2023)
    notices that the optimum of that KL-regularised problem is pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta), so
    the reward is implied by the policy itself, r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + const, and the
    Bradley-Terry likelihood of the pairs can be maximised directly over the policy:

    log pi(y|x)  = sum_t log pi(y_t | x, y_<t)                       the completion's tokens only, summed
    h            = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)]
    sigmoid      L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)        eps = label_smoothing (cDPO)
    ipo          L = (h_avg - 1 / (2 beta))^2,   h_avg built from per-token *averages* of the log-probs
    rpo          L += alpha * (-log pi(y_w|x) / |y_w|)                            alpha = rpo_alpha (0: off)
    rewards      r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)),  r_l likewise; margin = r_w - r_l

The intuition
    The gradient raises log pi(y_w) and lowers log pi(y_l), weighted by sigma(-beta h): pairs the policy already
    orders correctly (by more than the reference does) weigh little, wrongly ordered ones a lot. beta sets how
    far the policy may drift from the reference: small beta, weak anchor. cDPO assumes a share eps of the labels
    are flipped, which keeps the loss from pushing h to infinity on separable data; IPO replaces the log-sigmoid
    by a squared distance to a finite target margin 1 / (2 beta) for the same reason.

Design choices
    Chosen and rejected rows go through the policy in one forward (2B rows: the B chosen, then the B rejected,
    right-padded; `workbench.data.examples.collate_pairs`), as TRL's concatenated forward does. The completion
    log-probs come from the final hidden states at target positions, through the head a chunk at a time under
    activation checkpointing (`objective.logprob_chunk`; `logprobs.sequence_logprobs`), never as (2B, T, V).
    Prompt and completion are tokenized apart and joined as ids (`workbench.data.chat`), so the boundary is
    exact; the completion's closing `<|end|>` is one of its tokens (the policy learns where an answer stops).
    The reference is one of three things, decided by the trainer: a frozen copy of the starting weights
    (`train.init_from`, or `objective.reference`) in its own engine without an optimizer; the policy itself with
    its LoRA adapters switched off (`workbench.nn.lora.disabled`: no second model); or, with
    `objective.precompute_reference`, a table of every pair's reference log-probs computed once in `prepare`
    (after which the reference model is dropped). All three give the same numbers (tested).
    `objective.rpo_alpha > 0` adds the chosen answer's negative log-likelihood per token (RPO, Pang et al. 2024;
    TRL's `rpo_alpha`), which keeps the chosen answers likely while their margin grows: plain DPO can lower both
    sides' likelihood as long as the rejected one falls faster (a small model then forgets how to write the
    answers it prefers). TRL averages that NLL over all chosen tokens of the batch; here each pair's mean per
    token counts once, like the pair's DPO term.
    The loss of a micro-batch is its sum over pairs divided by the step's global pair count (`units`), so
    accumulation and data parallelism give the plain mean over the step's pairs. Rewards, reward accuracy
    (r_w > r_l) and the margin are logged as per-pair means (`LossOutput.sums`).

Differences from the paper and TRL
    TRL's defaults (beta 0.1, sigmoid loss) are ours. Ties (r_w == r_l, e.g. at step 0 where the policy is the
    reference) count as not accurate, as TRL's `(chosen_rewards > rejected_rewards)` does. The SFT term on the
    chosen answers (RPO) is off unless asked for; no length normalisation beyond IPO's averages.

Sources
    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023; Mitchell, "A note on DPO with noisy
    preferences" (cDPO), 2023; Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (IPO), 2023; Pang et al., "Iterative Reasoning Preference Optimization" (RPO's NLL term), 2024;
    TRL's DPOTrainer (read, not copied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.data.chat import ChatTemplate
from workbench.nn.attention import MaskSpec
from workbench.train.objectives.base import LossOutput, ModelRole
from workbench.train.objectives.lm import add_aux_loss, real_tokens
from workbench.train.objectives.logprobs import most_on_any_rank, sequence_logprobs

# the per-pair quantities logged (as means over the step's pairs) and held out
PAIR_SUMS = ("reward_acc", "reward_margin", "chosen_reward", "rejected_reward", "logp_acc")


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, nc: torch.Tensor | None = None,
             nr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, each (B,), from the policy's (pc, pr) and the
    reference's (rc, rr) summed completion log-probs; IPO also needs the completions' token counts nc, nr."""
    if loss_type == "ipo":
        if nc is None or nr is None:
            raise ValueError("IPO averages the log-probs over the completion's tokens: pass nc and nr")
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr  # per-token averages
    # h = [log pi(y_w) - log pi(y_l)] - [log pi_ref(y_w) - log pi_ref(y_l)]
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        # L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # L = (h_avg - 1 / (2 beta))^2
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    # r = beta (log pi - log pi_ref), for each side
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


class DPOObjective:
    name = "dpo"
    roles = {"policy": ModelRole(trainable=True), "reference": ModelRole(trainable=False)}
    data = "pairs"

    def __init__(self, cfg):
        self.cfg = cfg
        self.table: dict[str, torch.Tensor] | None = None  # precomputed reference log-probs, by example index

    def setup(self, job, tokenizer) -> None:
        self.template = ChatTemplate(tokenizer)

    def frozen_models(self, job) -> dict[str, tuple[str, str]]:
        """The reference: objective.reference, else the starting weights (train.init_from); none under LoRA
        without objective.reference (the policy with its adapters off is the reference)."""
        if self.cfg.reference:
            return {"reference": (self.cfg.reference, "objective.reference")}
        if job.lora.enabled:
            return {}
        return {"reference": (job.train.init_from, "train.init_from")}

    def sample_prompt(self, text: str) -> tuple[list[int], list[int] | None]:
        return self.template.ask(text), self.template.stop_ids

    # ------------------------------------------------------------------------------------------ log-probs

    def logps(self, engine, mb: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(summed completion log-probs (2B,), target counts (2B,), the forward's output) under `engine`."""
        out = engine.forward({"input_ids": mb["input_ids"], "positions": mb.get("positions"), "mask": MaskSpec()})
        sums, counts = sequence_logprobs(engine.logits, out.hidden, mb["labels"], self.cfg.logprob_chunk,
                                         agree=lambda n: most_on_any_rank(engine, n))
        return sums, counts, out

    @torch.no_grad()
    def reference_logps(self, models, mb: dict) -> torch.Tensor:
        """The reference's summed completion log-probs (2B,): from the precomputed table, the reference
        engine, or the policy with its adapters off."""
        if self.table is not None:
            idx = mb["index"].cpu()
            return torch.cat([self.table["chosen"][idx], self.table["rejected"][idx]]).to(mb["labels"].device)
        if "reference" in models:
            return self.logps(models["reference"], mb)[0]
        from workbench.nn.lora import disabled  # LoRA: the base model is the reference

        with disabled(models["policy"].unwrap()):
            return self.logps(models["policy"], mb)[0]

    def prepare(self, models, train_data, val_batches, log=print) -> tuple[str, ...]:
        """The held-out batches get their reference log-probs attached; with `objective.precompute_reference`,
        every training pair's too, once, into a table (every rank computes all of them, in the same order: a
        sharded reference runs in lockstep), and the reference model is no longer needed (returned: the trainer
        drops it)."""
        for mb in val_batches:
            mb["ref_logps"] = self.reference_logps(models, mb)
        if not self.cfg.precompute_reference:
            return ()
        n = len(train_data)
        table = {"chosen": torch.zeros(n), "rejected": torch.zeros(n)}
        size = max(1, self.cfg.precompute_batch)
        for start in range(0, n, size):
            mb = train_data.batch(range(start, min(n, start + size)))
            mb = {k: v.to(models["policy"].device) for k, v in mb.items()}
            ref = self.reference_logps(models, mb).cpu()
            B = len(mb["index"])
            table["chosen"][mb["index"].cpu()], table["rejected"][mb["index"].cpu()] = ref[:B], ref[B:]
        self.table = table
        log(f"dpo: reference log-probs of {n} training pairs computed once (objective.precompute_reference)")
        return ("reference",) if "reference" in models else ()

    # ------------------------------------------------------------------------------------------ training

    def experience(self, step, models, data):
        self.micro_batches = len(data)
        for mb in data:
            mb["ref_logps"] = self.reference_logps(models, mb)
        return data

    def units(self, micro_batch: dict) -> int:
        return len(micro_batch["index"])  # pairs

    def _pair_terms(self, logps, counts, ref):
        B = len(logps) // 2
        pc, pr, rc, rr = logps[:B], logps[B:], ref[:B], ref[B:]
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.loss_type,
                                                self.cfg.label_smoothing, counts[:B], counts[B:])
        if self.cfg.rpo_alpha:
            # RPO: + alpha * (-log pi(y_w | x) / |y_w|), the chosen answer's mean NLL per token
            losses = losses + self.cfg.rpo_alpha * (-pc / counts[:B].clamp(min=1))
        sums = {"reward_acc": float((chosen_r > rejected_r).sum()), "reward_margin": float((chosen_r - rejected_r).sum()),
                "chosen_reward": float(chosen_r.sum()), "rejected_reward": float(rejected_r.sum()),
                # the policy's own preference, without a reference: log pi(y_w|x) > log pi(y_l|x)
                "logp_acc": float((pc.detach() > pr.detach()).sum())}
        return losses, sums

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        logps, counts, out = self.logps(models["policy"], micro_batch)
        losses, sums = self._pair_terms(logps, counts, micro_batch["ref_logps"])
        loss = losses.sum() / max(total_units, 1)
        metrics: dict = {}
        loss = add_aux_loss(models, out, loss, metrics, getattr(self, "micro_batches", 1))
        return LossOutput(loss=loss, metrics=metrics, units={"tokens": real_tokens(micro_batch)},
                          sums=sums)

    # ------------------------------------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_sums(self, models, batch: dict) -> dict[str, float]:
        if "ref_logps" not in batch:  # prepare() attaches them; a batch made later computes them here
            batch["ref_logps"] = self.reference_logps(models, batch)
        logps, counts, _ = self.logps(models["policy"], batch)
        losses, sums = self._pair_terms(logps, counts, batch["ref_logps"])
        return {"loss": float(losses.sum()), "pairs": len(losses), **sums}

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1)
        return {"val_loss": sums["loss"] / n, **{f"val_{k}": sums[k] / n for k in PAIR_SUMS}}
