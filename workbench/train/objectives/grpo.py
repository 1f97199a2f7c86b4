"""Group Relative Policy Optimization (GRPO; DeepSeekMath, DeepSeek-R1), with Dr. GRPO's and DAPO's variants.

What it is
    For each prompt q, sample a group of G completions o_1..o_G from the policy, score each with a program
    (R1: is the answer right, is the reply in <think>/<answer> form), and use the group itself as the baseline:

    A_i      = (r_i - mean(r_1..G)) / (std(r_1..G) + 1e-4)      one advantage per completion, for all its tokens
                                                                  (std unbiased, as TRL; scale_rewards = false: no /std)
    rho_i,t  = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | ...)        the ratio to the policy that sampled
    l_i,t    = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + beta D_i,t
    D_i,t    = pi_ref / pi - log(pi_ref / pi) - 1                 the k3 estimate of KL(pi || pi_ref), >= 0

    aggregation  grpo     L = (1/G) sum_i (1/|o_i|) sum_t l_i,t       the paper's: a token mean per completion
                 dr_grpo  L = sum_i sum_t l_i,t / (G * max_new_tokens)  Dr. GRPO: no per-completion length division
                 dapo     L = sum_i sum_t l_i,t / sum_i |o_i|          DAPO: every token weighs the same
    (the sums run over the step's completions on every rank; the trainer's global unit count divides them)

The intuition
    No critic: the other samples of the same prompt say how good a sample was. A group where every completion
    scored the same has zero advantages and teaches nothing (only the KL term acts). The per-completion token
    mean of the original favours short right answers and long wrong ones (a wrong answer's penalty is spread over
    more tokens): Dr. GRPO divides by a constant instead, and also drops the std division, which up-weights
    prompts that are nearly always or never solved. DAPO weighs tokens equally and raises the upper clip
    (clip_eps_high = 0.28) so that unlikely tokens that turn out good can grow faster ("clip-higher").

Design choices
    The group's completions are generated together and stay in one micro-batch on one rank, so the group
    statistics need no communication. With `objective.epochs = 1` (TRL's num_iterations, the default) the policy
    that sampled is the one being trained, so pi_old = pi detached and rho = 1 in value (its gradient is
    A grad log pi, plain REINFORCE with the group baseline); with more epochs the old log-probs are computed once
    per batch of experience, before the first update. kl_coef (beta) 0.05 by default; 0 drops the reference.

Simplifications relative to the DeepSeek-R1 recipe
    1. The rewards are the two rule rewards on short verifiable problems (data_pipelines.reasoning): no
       language-consistency reward, no code test cases, no neural reward model for other prompts.
    2. G = 8 by default (DeepSeekMath used 64, R1 16) and completions of at most objective.max_new_tokens tokens;
       R1's runs are thousands of steps of 8K-token reasoning, ours minutes on a CPU.
    3. The reference stays the starting model: DeepSeekMath's iterative GRPO refreshed it (and retrained the
       reward model); here there is nothing to retrain.
    4. No dynamic sampling (DAPO drops groups whose rewards are all equal and samples more); such groups stay
       and contribute only the KL term. No overlong-reward shaping.
    5. R1-Zero started RL from the base model; this recipe starts from the SFT model (as R1's later stages do),
       because a 2M-parameter base model almost never writes the format unprompted.

Sources
    Shao et al., "DeepSeekMath" (GRPO), 2024; DeepSeek-AI, "DeepSeek-R1", 2025; Liu et al., "Understanding R1-Zero-
    Like Training: A Critical Perspective" (Dr. GRPO), 2025; Yu et al., "DAPO", 2025; TRL's GRPOTrainer (read,
    not copied).
"""

from __future__ import annotations

import torch

from workbench.train.objectives.base import LossOutput
from workbench.train.objectives.lm import add_aux_loss
from workbench.train.objectives.rollout import EPS, RolloutObjective, token_logprobs


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(n,) advantages of n = P * group rewards, the groups consecutive: r minus its group's mean, divided by the
    group's unbiased std + 1e-4 when `scale`."""
    r = rewards.view(-1, group)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + EPS)
    return a.reshape(-1)


def k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1: an unbiased, non-negative per-token estimate of KL(pi || pi_ref)."""
    d = ref - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old, adv, eps_low: float, eps_high: float):
    """(-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) per token, whether the clip was active)."""
    ratio = torch.exp(logp - old)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


class GRPOObjective(RolloutObjective):
    name = "grpo"

    def units(self, micro_batch: dict) -> int:
        if self.cfg.aggregation == "dapo":
            return int(micro_batch["mask"].sum())  # completion tokens
        return len(micro_batch["rewards"])  # completions

    def finish_experience(self, models, micro_batches: list[dict]) -> None:
        for mb in micro_batches:
            mb["advantages"] = group_advantages(mb["rewards"], self.group_size, self.cfg.scale_rewards)
            if self.epochs > 1:  # several updates: the sampling policy's log-probs, fixed before the first
                with torch.no_grad():
                    mb["old_logps"] = token_logprobs(models["policy"], mb, self.cfg.logprob_chunk,
                                                     self.cfg.sampling_temperature)[0]
        self.micro_batches = len(micro_batches)

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the step's sum, in `units` (divided by the global count afterwards)."""
        if self.cfg.aggregation == "grpo":
            return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
        if self.cfg.aggregation == "dr_grpo":
            return (per_token * mask).sum() / self.cfg.max_new_tokens
        return (per_token * mask).sum()

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        mb = micro_batch
        logp, out = token_logprobs(models["policy"], mb, self.cfg.logprob_chunk, self.cfg.sampling_temperature)
        mask = mb["mask"].float()
        old = mb.get("old_logps", logp.detach())
        eps_high = self.cfg.clip_eps_high or self.cfg.clip_eps
        per_token, clipped = clipped_surrogate(logp, old, mb["advantages"][:, None], self.cfg.clip_eps, eps_high)
        sums = {"clip_frac": float(self.aggregate(clipped, mask))}
        if self.cfg.kl_coef > 0:
            kl = k3(logp, mb["ref_logps"])
            per_token = per_token + self.cfg.kl_coef * kl
            sums["kl"] = float(self.aggregate(kl.detach(), mask))
        loss = self.aggregate(per_token, mask) / max(total_units, 1)
        metrics: dict = {}
        loss = add_aux_loss(models, out, loss, metrics, getattr(self, "micro_batches", 1))
        return LossOutput(loss=loss, metrics=metrics, units={"tokens": int(mask.sum())}, sums=sums)
