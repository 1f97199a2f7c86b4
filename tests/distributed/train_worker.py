"""Run by the distributed tests under torchrun: several training cases in one launch (one process group).

    torchrun --nproc-per-node 2 tests/distributed/train_worker.py OUT_DIR DATA_DIR CASES_JSON

CASES_JSON maps a case name to its config overrides (on top of configs/llama3/debug.toml); each case trains
in OUT_DIR/<name> with `Trainer` exactly as `workbench train` does, and every rank writes
OUT_DIR/results-<rank>.json: {name: {"losses", "grad_norms", "skipped", "steps", "world_size", "restarts",
"balance_losses", "expert_parallel", "sample"}} (sample: 8 tokens generated after training through the engine's
gather_for_generation; expert_parallel: the ep degree of each Experts module).

Besides overrides a case may hold:
    --resume               continue OUT_DIR/<name> if it has a checkpoint (as `workbench train --resume`)
    --copy-from=CASE:STEP  start from a copy of OUT_DIR/CASE cut back to its step-STEP checkpoint (as if that
                           run had stopped there; rank 0 copies, the others wait); with --resume it continues
    --fault=KIND@STEP:RANK inject a fault on RANK just before it runs step STEP:
                           hang   sleep for an hour (the others wait in the step's first collective)
                           kill   SIGKILL itself, on the launcher's first attempt only
                           nangrad  the step's loss gradient becomes NaN on that rank (the loss stays finite)
"""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

from workbench.checkpoint.run import list_checkpoints, step_of
from workbench.config import load_config
from workbench.job import JobConfig
from workbench.models.moe import Experts
from workbench.train.trainer import Trainer

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"


def inject(trainer: Trainer, fault: str) -> None:
    kind, where = fault.split("@")
    step, rank = (int(x) for x in where.split(":"))
    if trainer.rank != rank:
        return
    train_step, loss = trainer.train_step, trainer.objective.loss

    def faulty_step():
        if trainer.step + 1 == step:
            if kind == "hang":
                time.sleep(3600)
            elif kind == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
        return train_step()

    def faulty_loss(*args, **kwargs):
        out = loss(*args, **kwargs)
        if kind == "nangrad" and trainer.step + 1 == step:
            out.loss.register_hook(lambda g: g * float("nan"))
        return out

    trainer.train_step, trainer.objective.loss = faulty_step, faulty_loss


def copy_run(out: Path, name: str, spec: str) -> None:
    source, step = spec.split(":")
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.copytree(out / source, out / name)
        for ckpt in list_checkpoints(out / name):
            if step_of(ckpt) > int(step):
                shutil.rmtree(ckpt)
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    out, data, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    results, trainer = {}, None
    for name, args in cases.items():
        resume = "--resume" in args
        faults = [a.split("=", 1)[1] for a in args if a.startswith("--fault=")]
        for a in args:
            if a.startswith("--copy-from="):
                copy_run(out, name, a.split("=", 1)[1])
        overrides = [a for a in args if a != "--resume" and not a.startswith(("--fault=", "--copy-from="))]
        job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", name, "--data.dir", data,
                                                  "--train.sample_tokens", "0", *overrides])
        trainer = Trainer(job, resume=resume, log=lambda *a, **k: None)
        for fault in faults:
            inject(trainer, fault)
        history = trainer.fit()
        results[name] = {"losses": [r["loss"] for r in history], "grad_norms": [r["grad_norm"] for r in history],
                         "skipped": [r["skipped"] for r in history], "steps": [r["step"] for r in history],
                         "world_size": trainer.dims.world_size,
                         "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                         "balance_losses": [r.get("balance_loss") for r in history],  # a mixture of experts
                         "rewards": [r.get("reward") for r in history],  # RL: the rollouts' mean reward
                         "qk_clip_heads": [r.get("qk_clip_heads") for r in history],  # MuonClip's QK-Clip
                         # the ep degree each experts module runs with (1: whole on every rank)
                         "expert_parallel": [getattr(m, "ep_size", 1) for m in trainer.engine.unwrap().modules()
                                             if isinstance(m, Experts)],
                         "sample": trainer.sample("def", 8)}  # every rank generates, as `workbench train` does
        (out / f"results-{trainer.rank}.json").write_text(json.dumps(results))
    if trainer is not None:
        trainer.close()


if __name__ == "__main__":
    main()
