"""Proximal Policy Optimization (PPO) for language models: actor, critic, frozen reference and a reward program.

What it is
    The policy (actor) writes a completion y for a prompt x one token a_t at a time; the state s_t is x and the
    tokens so far. A reward program scores the whole completion (`rewards.py`); the KL to the frozen reference
    is charged token by token, so the return is the score minus how far the policy wandered:

    r_t      = -kl_coef (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))   + score on the completion's last token
    V(s_t)   the critic: a value head (a linear layer, D -> 1) on the policy's final hidden state at s_t
    GAE      delta_t = r_t + gamma V(s_t+1) - V(s_t)        (V = 0 after the last token)
             A_t     = delta_t + gamma lambda A_t+1
             R_t     = A_t + V(s_t)                          the critic's target
    whitening  A <- (A - mean A) / std A over every completion token of the step (on every rank: exact under
               data parallelism)
    policy   L_pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps_high)),  rho = pi / pi_old
    critic   L_v  = mean_t 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
    L = L_pg + vf_coef L_v, averaged over the step's completion tokens; `objective.epochs` updates per batch of
    experience (the PPO epochs), every one over the same rollouts with the same old log-probs, values and
    advantages.

The intuition
    The advantage says how much better a token turned out than the critic expected; the clipped ratio stops one
    batch of experience from moving the policy far (beyond 1 +- eps the gradient is cut), which is what lets PPO
    take several updates per batch safely, unlike REINFORCE. The value clip does the same for the critic. The
    per-token KL reward keeps the policy near the reference: without it, a policy optimising a program reward
    drifts into text that games the program.

Design choices
    The critic shares the policy's trunk (one model, one engine, one optimizer; TRL's earlier
    AutoModelForCausalLMWithValueHead did the same): the value head is `model.value_head`, a zero-initialised
    linear layer the trainer attaches before the engine is built, so FSDP2 shards it with the root unit and ZeRO
    with the rest. It is saved beside the weights (`value_head.safetensors` in each checkpoint), never in
    model.safetensors, which stays a plain language model for every consumer. A separate critic model (TRL's
    PPOTrainer today) doubles the memory; sharing means the value loss also shapes the trunk (vf_coef keeps that
    small). The old log-probs and values come from one no-grad forward of the policy after the rollouts (not from
    the generator's decode, whose arithmetic differs in the last bits), so rho = 1 at the first update.
    Defaults are TRL's: kl_coef 0.05, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95, 4 epochs.

Differences from TRL's PPOTrainer
    One epoch is one optimizer update over the whole batch of experience (no mini-batches inside an epoch);
    no adaptive KL controller; no penalty for a completion that ran out of tokens without `<|end|>`; the
    score is not whitened.

Sources
    Schulman et al., "Proximal Policy Optimization Algorithms", 2017; Schulman et al., "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", 2016; Ouyang et al., "Training language models to follow
    instructions with human feedback", 2022; Huang et al., "The N+ Implementation Details of RLHF with PPO", 2024;
    TRL's PPOTrainer (read, not copied).
"""

from __future__ import annotations

import torch

from workbench.train.objectives.base import LossOutput
from workbench.train.objectives.grpo import clipped_surrogate
from workbench.train.objectives.lm import add_aux_loss
from workbench.train.objectives.rollout import RolloutObjective, scatter_tokens, token_logprobs


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), each (R, T), from per-token rewards and values on the positions where `mask` is true
    (each row's completion: one contiguous run); zero elsewhere. V = 0 after a row's last token."""
    R, T = rewards.shape
    m = mask.float()
    adv = torch.zeros_like(rewards)
    nxt_adv = torch.zeros(R, dtype=rewards.dtype, device=rewards.device)
    nxt_val = torch.zeros_like(nxt_adv)
    for t in reversed(range(T)):
        # delta_t = r_t + gamma V(s_t+1) - V(s_t);  A_t = delta_t + gamma lambda A_t+1
        delta = rewards[:, t] + gamma * nxt_val - values[:, t]
        a = (delta + gamma * lam * nxt_adv) * m[:, t]
        adv[:, t] = a
        nxt_adv, nxt_val = a, values[:, t] * m[:, t]
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, all_reduce) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every rank (`all_reduce` sums a tensor over them); the variance
    unbiased, as TRL's masked_whiten."""
    m = mask.float()
    stats = all_reduce(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double())
    n = stats[2].clamp(min=2)
    mean = stats[0] / n
    var = (stats[1] - n * mean * mean) / (n - 1)
    return ((x - mean.float()) * torch.rsqrt(var.float().clamp(min=0) + 1e-8)) * m


class PPOObjective(RolloutObjective):
    name = "ppo"
    value_head = True

    def units(self, micro_batch: dict) -> int:
        return int(micro_batch["mask"].sum())  # completion tokens

    def logprobs_and_values(self, engine, mb: dict):
        """(per-token log-probs, per-token values, the forward's output), each (R, T) zero off the completion."""
        logp, out = token_logprobs(engine, mb, self.cfg.logprob_chunk, self.cfg.sampling_temperature)
        rows, cols = mb["mask"].nonzero(as_tuple=True)
        values = scatter_tokens(engine.values(out.hidden[rows, cols][None])[0], rows, cols, mb["mask"].shape)
        return logp, values, out

    def finish_experience(self, models, micro_batches: list[dict]) -> None:
        policy = models["policy"]
        for mb in micro_batches:
            with torch.no_grad():
                mb["old_logps"], mb["old_values"], _ = self.logprobs_and_values(policy, mb)
            mask = mb["mask"]
            kl = (mb["old_logps"] - mb["ref_logps"]) * mask if "ref_logps" in mb else torch.zeros_like(mb["old_logps"])
            rewards = -self.cfg.kl_coef * kl
            last = mask.long().cumsum(1).argmax(1)  # each row's last completion position
            rewards[torch.arange(len(last)), last] += mb["rewards"]
            mb["advantages"], mb["returns"] = gae(rewards, mb["old_values"], mask, self.cfg.gamma, self.cfg.lam)
            mb["kl_sum"] = kl.sum()
        if self.cfg.whiten_advantages:
            # the mean and std over every micro-batch's tokens on every rank
            adv = torch.cat([mb["advantages"].flatten() for mb in micro_batches])
            mask = torch.cat([mb["mask"].flatten() for mb in micro_batches])
            white = whiten(adv, mask, policy.all_reduce)
            start = 0
            for mb in micro_batches:
                n = mb["advantages"].numel()
                mb["advantages"] = white[start : start + n].view_as(mb["advantages"])
                start += n
        self.micro_batches = len(micro_batches)

    def loss(self, models, micro_batch: dict, total_units: int) -> LossOutput:
        mb = micro_batch
        logp, values, out = self.logprobs_and_values(models["policy"], mb)
        mask = mb["mask"].float()
        eps_high = self.cfg.clip_eps_high or self.cfg.clip_eps
        pg, clipped = clipped_surrogate(logp, mb["old_logps"], mb["advantages"], self.cfg.clip_eps, eps_high)
        old_v, ret = mb["old_values"], mb["returns"]
        v_clipped = old_v + (values - old_v).clamp(-self.cfg.value_clip, self.cfg.value_clip)
        vf = 0.5 * torch.max((values - ret) ** 2, (v_clipped - ret) ** 2)
        per_token = pg + self.cfg.vf_coef * vf
        loss = (per_token * mask).sum() / max(total_units, 1)
        sums = {"policy_loss": float((pg.detach() * mask).sum()), "value_loss": float((vf.detach() * mask).sum()),
                "clip_frac": float((clipped * mask).sum()), "kl": float(mb["kl_sum"]),
                "approx_kl": float((0.5 * (logp.detach() - mb["old_logps"]) ** 2 * mask).sum())}
        metrics: dict = {}
        loss = add_aux_loss(models, out, loss, metrics, getattr(self, "micro_batches", 1))
        return LossOutput(loss=loss, metrics=metrics, units={"tokens": int(mask.sum())}, sums=sums)


def attach_value_head(model: torch.nn.Module) -> torch.nn.Module:
    """Give `model` PPO's critic: `model.value_head` (D -> 1, zero-initialised: V = 0 at the start) and
    `model.values(hidden)` -> (..., ) float32, a method the engines call like `logits` (FSDP2 registers it as a
    forward method of the root unit, which holds the head)."""
    import types

    dim = model.cfg.dim
    param = next(model.parameters())
    model.value_head = torch.nn.Linear(dim, 1, device=param.device, dtype=param.dtype)
    torch.nn.init.zeros_(model.value_head.weight)
    torch.nn.init.zeros_(model.value_head.bias)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden)[..., 0].float()

    model.values = types.MethodType(values, model)
    return model


VALUE_HEAD_PREFIX = "value_head."  # its keys in the model's state dict (split off into value_head.safetensors)
