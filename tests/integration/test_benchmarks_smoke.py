"""The benchmark scripts still run (seconds, tiny shapes); their numbers live in docs/benchmarks.md."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmarks compare against transformers (dev extra)")
ROOT = Path(__file__).resolve().parents[2]


def test_llama_cpu_benchmark_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_cpu.py"), "--smoke", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| debug")]
    assert len(rows) == 3 and "x time" in rows[0] and "x speed" in rows[1] and "KV cache" in rows[2]
    moe = [line for line in res.stdout.splitlines() if line.startswith("| mixtral:debug")]
    assert len(moe) == 2 and "x time" in moe[0] and "x speed" in moe[1]  # train and decode (cache: first only)
    assert "Targets:" in res.stdout


def test_skinny_linear_benchmark_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "skinny_linear.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 20M wk")]
    assert len(rows) == 1 and rows[0].count("|") == 7 and "x |" in rows[0]
