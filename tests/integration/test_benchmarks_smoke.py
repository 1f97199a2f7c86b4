"""The benchmark scripts still run (seconds, tiny shapes); their numbers live in docs/benchmarks.md."""

import importlib.util
import json
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


def _gpu_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_doubling_search_finds_the_largest_fit():
    search = _gpu_suite().doubling_search
    tried = []

    def fits_below(limit):
        def fits(T):
            tried.append(T)
            return T <= limit
        return fits

    # doubling 1K .. 16K fit, 32K fails; two halvings: 24K fits, 28K fails
    assert search(fits_below(27000), 1024, 262144, 2) == (24576, 28672, "out of memory")
    assert tried == [1024, 2048, 4096, 8192, 16384, 32768, 24576, 28672]
    assert search(fits_below(10**9), 1024, 4096, 2) == (4096, None, "length cap")
    assert search(fits_below(100), 1024, 4096, 2) == (0, 1024, "no fit")
    assert search(fits_below(3000), 1024, 4096, 0) == (2048, 4096, "out of memory")
    slow = iter([False, True])
    assert search(fits_below(10**9), 1024, 65536, 2, too_slow=lambda: next(slow)) == (2048, None, "step time cap")


def test_gpu_suite_floors_are_the_ones_the_docs_quote():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--floors"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "| 1B | 1,235.8M | 8.220 (T = 2048) | 60,160 / 72,192 |" in out
    assert "| bf16 | 2.472 GB | 1,355 | 1,724 |" in out and "| int8 weight-only | 1.500 GB | 2,233 | 2,840 |" in out
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "1,355 tok/s | 1,724 tok/s" in docs and "2,233 tok/s | 2,840 tok/s" in docs and "bound: 1.65x" in out


def test_gpu_suite_smoke_runs_every_case_and_renders_the_docs(tmp_path):
    """Every case at debug size on the CPU (what a GPU run does, minus compile and CUDA graphs), then the records
    rendered into a docs block."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_case = {}
    for r in records:
        by_case.setdefault(r["case"], []).append(r)
    assert set(by_case) == {"check", "train", "parallel", "moe", "decode", "long"}
    assert not [r for r in records if r.get("status") == "error"]
    checks = [r for r in by_case["check"] if r.get("status") in ("pass", "FAIL")]
    # bf16, logits, the static decoder eager and compiled (dynamo traced, run eagerly in smoke mode)
    assert len(checks) == 4 and all(r["status"] == "pass" for r in checks), checks
    # training: workbench and transformers for both shapes, every rate positive; goals not judged in smoke mode
    train = [r for r in by_case["train"] if "tokens_s" in r]
    assert {(r["impl"], r["shape"]) for r in train} == {(i, s) for i in ("workbench", "transformers") for s in ("124M", "1B")}
    assert all(r["tokens_s"] > 0 for r in train)
    goals = [r for r in records if r.get("status") == "goal"]
    # MFU 124M and 1B, fsdp2 + zero2 eager and fsdp2 compiled, MoE, the decode floor, int8: none judged on a CPU
    assert len(goals) == 8 and all(r["met"] is None for r in goals)
    assert {r["backend"] for r in by_case["parallel"] if "backend" in r} == {"single", "fsdp2", "zero2"}
    # the wrappers under the plain model's policy compute its first loss exactly; FSDP2's bf16 parameters close to it
    same = [r for r in by_case["parallel"] if r.get("status") == "pass"]
    assert len(same) == 4 and all("bound 1e-05" in r["note"] for r in same if "bf16 params" not in r["what"])
    assert {r["what"].split(" 8x")[0] for r in by_case["moe"] if "tokens_s" in r} >= {"workbench MoE"}
    # the workbench's compiled graphs (training blocks, the MoE, the static decoder) trace without a break
    compiled = [r for r in records if r.get("impl") == "workbench" and r.get("graph_breaks") is not None]
    assert len(compiled) >= 9 and all(r["graph_breaks"] == 0 for r in compiled), [(r["what"], r["graph_breaks"])
                                                                                   for r in compiled]
    decode = {r["what"]: r for r in by_case["decode"] if "tokens_s" in r}
    assert any(w.startswith("int8 weight-only") for w in decode) and "transformers generate, batch 32" in decode
    assert all(0 < r["floor_fraction"] for r in decode.values())
    # the doubling search per variant: 64, 128 fit, 256 "out of memory" (simulated in smoke mode), bisected to 192
    longest = [r for r in by_case["long"] if r["status"] == "info"]
    assert len(longest) == 5 and all((r["value"], r["first_fail"], r["stopped_by"]) == (128, 192, "out of memory")
                                     for r in longest)
    probes = [r for r in by_case["long"] if r["status"] == "probe"]
    assert [r["T"] for r in probes] == [64, 128, 256, 192] * 5 and [r["fits"] for r in probes[:4]] == [1, 1, 0, 0]
    # the docs block
    doc = tmp_path / "benchmarks.md"
    doc.write_text("intro\n<!-- gpu-suite:begin -->\nold\n<!-- gpu-suite:end -->\ntail\n")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--render", str(out / "results.jsonl"),
                          "--docs", str(doc)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert text.startswith("intro\n<!-- gpu-suite:begin -->\n| card | case |") and text.endswith("<!-- gpu-suite:end -->\ntail\n")
    assert "old" not in text and "| goal: int8 weight-only >= 1.5x bf16 at batch 1 |" in text
