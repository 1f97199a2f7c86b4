"""The GPU suite's correctness checks on CUDA (benchmarks/gpu_suite.py --cases check): bf16 training tracks fp32,
the logits equal transformers', and the static decoder (eager, CUDA graph, compiled + graph) gives the eager
generator's greedy tokens. `make test-gpu`; skipped without CUDA by tests/conftest.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_checks_pass_on_cuda(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--cases", "check", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    checks = [r for r in records if r.get("status") in ("pass", "FAIL")]
    # bf16 vs fp32, logits vs transformers, static decoder eager / CUDA graph / compiled + graph
    assert len(checks) == 5 and all(r["status"] == "pass" for r in checks), checks
    assert {r["card"] for r in records} == {torch.cuda.get_device_name()}  # the card is named in every record
