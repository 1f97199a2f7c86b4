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
    mla = [line for line in res.stdout.splitlines() if line.startswith("| deepseek_v3:debug")]
    assert len(mla) == 2 and "x time" in mla[0] and "x speed" in mla[1]
    assert "Targets:" in res.stdout


def test_skinny_linear_benchmark_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "skinny_linear.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 20M wk")]
    assert len(rows) == 1 and rows[0].count("|") == 7 and "x |" in rows[0]


def test_kv_bytes_benchmark_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kv_bytes.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in res.stdout.splitlines()
            if line.startswith("| Llama") or line.startswith("| DeepSeek")}
    assert set(rows) == {("Llama-3-8B", "MHA"), ("Llama-3-8B", "GQA"), ("DeepSeek-V3", "MHA"), ("DeepSeek-V3", "MLA")}
    # debug widths: MLA stores latent 16 + rope 8 numbers of 2 bytes per layer
    assert "| 48 |" in rows[("DeepSeek-V3", "MLA")] and "latent (16,), rope key (8,)" in rows[("DeepSeek-V3", "MLA")]


def test_moe_balance_demo_smoke(tmp_path):
    png = tmp_path / "balance.png"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_balance.py"), "--smoke", "--rates", "0.01",
                          "0", "--out", str(tmp_path / "runs"), "--plot", str(png)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| gamma") or line.startswith("| off")]
    assert len(rows) == 4  # two tables, a row per rate in each
    loads = [float(row.split("|")[3]) for row in rows[:2]]
    assert all(1.0 <= x <= 4.0 for x in loads)  # max / mean of 8 experts, top-2
    assert rows[3].startswith("| off") and rows[3].endswith("| 0.00 |")  # no update: the biases stay 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_patterns_benchmark_smoke(tmp_path):
    png = tmp_path / "patterns.png"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_patterns.py"), "--smoke", "--plot",
                          str(png)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| 128 ")
            or line.startswith("| 256 ")]
    assert [r[1].strip() for r in rows[:4]] == ["dense-sdpa", "dense-math", "window-block", "moba-block"]
    assert len(rows) == 8 and all(float(r[2]) > 0 and float(r[6]) > 0 for r in rows)
    assert rows[0][7].strip() == "1.00x"  # ratios are against dense-sdpa at the same length
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_int8_decode_benchmark_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_decode.py"), "--smoke", "--llm-int8"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and rows[0].count("x |") == 2  # int8 / fp32 and llm-int8 / fp32
    assert "smaller: goal met" in res.stdout and "batch-1 decode" in res.stdout


def test_engine_benchmark_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_cpu.py"), "--smoke", "--threads", "1",
                          "--cases", "engine", "mixed"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for family in ("debug", "mixtral:debug", "deepseek_v3:debug"):  # batch 1, batch 16, mixed per family
        rows = [line for line in res.stdout.splitlines() if line.startswith(f"| {family} |")]
        assert len(rows) == 3 and all("x speed" in r for r in rows), res.stdout
    assert "TOKENS DIFFER" not in res.stdout  # continuous and static batching gave every request the same tokens
