"""`Linear`: nn.Linear with a CPU fast path for decoding, and `linear`, its functional form.

The math is y = x W^T + b either way. The fast path is a small C++ kernel (`kernels/skinny_linear.cpp`)
that takes over when x has at most `SKINNY_ROWS` rows, runs on a CPU in fp32 and needs no gradient: the
shape of every projection while decoding a few sequences.

Why. Decoding feeds one token per sequence, so every projection multiplies a (rows, in) input by the
whole (out, in) weight, and batch-1 decode is bound by reading the weights from memory. `F.linear` hands
a one-row product to BLAS as a matrix-vector product, which on the 2-core development machine (AMD EPYC,
MKL) runs on one core at well under the memory bandwidth the two cores have together. The kernel gives
each thread (ATen's pool) its own block of weight rows and streams it once, dotting each row with all
input rows (docs/benchmarks.md has the per-projection and whole-decode figures and their commands).

Design choices
    A subclass, not a new module: attribute names and state-dict keys of every `nn.Linear` stay as they
    are (checkpoint adapters and parallel plans address them), hooks run, and `isinstance(m, nn.Linear)`
    holds for anything that wraps linears (tensor-parallel styles, LoRA).
    Training never takes the fast path (gradients are on, and it has many rows); neither do GPUs,
    DTensors, autocast, other dtypes or quantized weights. The two paths agree to float rounding (the
    summation order differs), not bit for bit.
    The kernel compiles on first use through `torch.utils.cpp_extension` (about 20 s with a C++ compiler
    and ninja; cached in torch's extension folder afterwards, and rebuilt when the source changes). If
    that fails, one warning says why and everything takes `F.linear`. `WORKBENCH_CPU_KERNELS=0` turns the
    fast path off. The same file holds `int8_linear`, the int8 weight-only variant used by
    `workbench.inference.quant.Int8Linear` (`int8_linear_op()`); it is built and turned off together with
    `skinny_linear`. Inside `torch.compile` (parallel.compile) it is skipped too: the op is opaque to the
    tracer, and the compiled graph makes its own kernel for `F.linear`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SKINNY_ROWS = 4
"""Up to this many rows the kernel beats F.linear on every measured shape; at 8 it no longer does on the
smallest weights (`python benchmarks/skinny_linear.py`; figures in docs/benchmarks.md)."""

_SOURCE = Path(__file__).parent / "kernels" / "skinny_linear.cpp"
_lock = threading.Lock()
_state: dict = {}  # "op": the loaded op or None, "error": why it is None


def skinny_linear_op():
    """The compiled `torch.ops.workbench.skinny_linear`, built on first call; None if it cannot be.

    The reason for a None is in `skinny_linear_error()` (and logged once as a warning)."""
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" not in _state:
            _state["op"], _state["error"] = _build()
            if _state["error"]:
                log.warning("CPU decode kernel unavailable, using F.linear: %s", _state["error"])
    return _state["op"]


def int8_linear_op():
    """`torch.ops.workbench.int8_linear(x, w_int8, scale)` = (x w^T) * scale for fp32 x (M, K), 4 rows per pass
    over the weight: the int8 weight-only decode kernel (workbench/inference/quant.py), compiled in the same extension as
    `skinny_linear`, so it is built, cached and turned off with it; None if that cannot be built."""
    return None if skinny_linear_op() is None else torch.ops.workbench.int8_linear


def skinny_linear_error() -> str | None:
    return _state.get("error")


def _build():
    if os.environ.get("WORKBENCH_CPU_KERNELS", "1") == "0":
        return None, "turned off by WORKBENCH_CPU_KERNELS=0"
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP inline code: without it, one thread
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma"]  # what this CPU has, not -march=native: the cache may be shared
        load("workbench_skinny_linear", [str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             is_python_module=False,
             verbose=False)
        return torch.ops.workbench.skinny_linear, None
    except Exception as e:  # no compiler, no ninja, a read-only cache folder: fall back, say why
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def _fast_path_applies(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (0 < rows <= SKINNY_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())  # a compiled graph generates its own kernel for F.linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, like `F.linear`, through the CPU decode kernel when it applies (see the module notes)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not _fast_path_applies(x, weight, rows):
        return F.linear(x, weight, bias)
    op = skinny_linear_op()
    if op is None:
        return F.linear(x, weight, bias)
    y = op(x.reshape(rows, x.shape[-1]), weight)  # (rows, out)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """An `nn.Linear` whose forward is `linear` (identical parameters, names and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
