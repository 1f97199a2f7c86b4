"""Training objectives: one file each, all driven by the one trainer (base.py has the protocol).

    lm        next-token cross-entropy over packed documents (pretraining)            lm.py
    sft       cross-entropy on the assistant's tokens of conversations                 sft.py
    dpo       direct preference optimization (sigmoid / cDPO, IPO) against a reference dpo.py
    distill   a student matching a frozen teacher (forward KL, reverse KL, JSD)        distill.py
    ppo       PPO: actor, critic (value head), reference and a reward program; GAE      ppo.py
    grpo      GRPO: groups of samples per prompt, group-normalised advantages, k3 KL    grpo.py
              (what the two share: rollouts, rewards, held-out scoring: rollout.py, rewards.py)
    vlm       a vision-language model answering questions about images, loss on the answers vlm.py
"""

from __future__ import annotations


def build_objective(cfg):
    """The objective named by the [objective] section `cfg` (workbench.job.ObjectiveSection)."""
    from workbench.train.objectives.distill import DistillObjective
    from workbench.train.objectives.dpo import DPOObjective
    from workbench.train.objectives.grpo import GRPOObjective
    from workbench.train.objectives.lm import LMObjective
    from workbench.train.objectives.ppo import PPOObjective
    from workbench.train.objectives.sft import SFTObjective
    from workbench.train.objectives.vlm import VLMObjective

    kinds = {"lm": LMObjective, "sft": SFTObjective, "dpo": DPOObjective, "distill": DistillObjective,
             "ppo": PPOObjective, "grpo": GRPOObjective, "vlm": VLMObjective}
    return kinds[cfg.name](cfg)
