"""Run by the distributed tests under torchrun: several training cases in one launch (one process group).

    torchrun --nproc-per-node 2 tests/distributed/train_worker.py OUT_DIR DATA_DIR CASES_JSON

CASES_JSON maps a case name to its config overrides (on top of configs/llama3/debug.toml); each case trains
in OUT_DIR/<name> with `Trainer` exactly as `workbench train` does, and rank 0 writes OUT_DIR/results.json:
{name: {"losses": [...], "grad_norms": [...]}}.
"""

import json
import sys
from pathlib import Path

from workbench.config import load_config
from workbench.job import JobConfig
from workbench.train.trainer import Trainer

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"


def main() -> None:
    out, data, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    results, trainer = {}, None
    for name, overrides in cases.items():
        resume = "--resume" in overrides  # continue OUT_DIR/<name> (as `workbench train --resume`)
        overrides = [o for o in overrides if o != "--resume"]
        job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", name, "--data.dir", data,
                                                  "--train.sample_tokens", "0", *overrides])
        trainer = Trainer(job, resume=resume, log=lambda *a, **k: None)
        history = trainer.fit()
        results[name] = {"losses": [r["loss"] for r in history], "grad_norms": [r["grad_norm"] for r in history],
                         "world_size": trainer.dims.world_size}
    if trainer is not None and trainer.is_main:
        (out / "results.json").write_text(json.dumps(results))
    if trainer is not None:
        trainer.close()


if __name__ == "__main__":
    main()
