"""Int8 weight-only quantization and LLM.int8() for inference: `Int8Linear`, `quantize_model`, saving and loading.

What it is
    Every `nn.Linear` of a trained model (the workbench `Linear` included) is replaced by an `Int8Linear` that
    keeps its weight as int8 with one fp32 scale per output row, a quarter of the fp32 bytes. Two methods share
    that stored form and differ only in how the product is computed:
    "int8"      weight-only: the activations stay in their dtype, the int8 weight is widened to it in the
                multiply (the CPU kernel converts it in registers), the scale is applied per output row.
    "llm-int8"  LLM.int8() (Dettmers et al. 2022): the activations are quantized too, row by row, and the
                product runs int8 x int8 -> int32, except for the outlier feature columns, which stay in
                floating point.

The math (W (out, in) = (N, K); X (rows, K); s, c_w (N,); c_x (rows,))
    Weights     s_o = max_i |W_oi| / 127                     (eps for an all-zero row: s_o = eps / 127)
                Wq = clamp(round(W / s), -127, 127)          round half to even (torch.round); int8
    int8        y = (x Wq^T) * s + b                         activations and bias in the input dtype
    LLM.int8    O = {j : max_i |X_ij| >= threshold}          outlier feature columns of this input
                Y_O = X[:, O] (Wq[:, O] * s)^T               in floating point, dequantized weight columns
                X' = X with the columns O zeroed
                c_x = max_j |X'_ij|,  X8 = round(127 X' / c_x)    vector-wise: one scale per token (row)
                c_w = 127 s = max_i |W_oi|                   the same per-row absmax as above
                Y = (X8 Wq^T) * (c_x c_w^T) / 127^2 + Y_O + b     X8 Wq^T in int32 (torch._int_mm)
                threshold = 0: no decomposition, plain vector-wise int8 x int8.

Intuition
    Decoding one token multiplies a vector by every weight matrix, so its time is the time to read the
    weights: a quarter of the bytes is up to four times the speed, as long as widening int8 to fp32 costs
    less than the memory it saves (it does: the kernel converts 8 weights with two instructions and uses
    them for up to 4 input rows). The error is small because one scale per output row follows the row's
    range: each weight moves by at most s_o / 2 = max|W_o| / 254, and the errors of a dot product are
    independent and partly cancel.
    LLM.int8's observation is that large transformers (from about 6.7B parameters) develop a few hidden
    features with magnitudes 20x the rest; quantizing a token's row with one scale would crush every other
    feature of it to zero. Those columns are few (under 1% of features), so they are taken out and multiplied
    in floating point. On the small models here such features are rare; the int8 x int8 part then dominates
    and its error is that of quantizing the activations as well.

Design choices
    Buffers, not parameters: `weight` (int8, (out, in)), `scale` (fp32, (out,)) and, when the linear had one,
    `bias` (its dtype), so the state dict names the same keys as the fp model plus `<module>.scale`, and is
    self-describing (int8 weights are the quantized ones). Nothing here trains: `Int8Linear` refuses
    training mode and inputs that require gradients; `quantize_model` refuses a model in training mode and
    LoRA layers (merge them first: `workbench.nn.lora.merge_and_unload`, as `--adapter` does).
    The LLM.int8 outlier columns use the stored int8 columns dequantized (Wq[:, O] * s), not a second fp copy
    of the weight: both methods then share one file format, and the weight stays a quarter of its fp32 size.
    That is what bitsandbytes does at inference too (`Linear8bitLt` with has_fp16_weights=False dequantizes
    `CB[:, outlier_cols] * SCB / 127`); it keeps an fp16 copy of the whole weight only with has_fp16_weights
    =True, for training. The outlier *columns* are zeroed in X' before the row scales are taken (the paper's
    column split); bitsandbytes' kernels zero the outlier *elements* and take the whole columns for Y_O.
    As in bitsandbytes, the outlier set is chosen over every row of the input, so under LLM.int8 a row's output
    depends on what it is batched with (another request's outlier makes that column fp for all rows): the
    serving engine's batch invariance holds for "int8" (a per-row computation), not for "llm-int8".
    The int8 x int8 -> int32 product is `torch._int_mm` on a GPU; on a CPU (where this build's `_int_mm` is a
    slow loop) and wherever it refuses a shape, an exact emulation: a float32 matmul (every partial sum is an
    integer below K * 127^2 < 2^24 for K <= 1040, so exact) or a float64 one for wider inputs.
    Which layers: every `nn.Linear` but those matching `skip` (fnmatch over module paths), by default the MoE
    routers (`*.gate`: a few KB, and a flipped routing decision changes a whole expert's output). The untied
    output head is quantized: it is the largest single matrix (a fifth of the weights of the 124M shape, so
    keeping it fp32 would cap the weight saving near 2.3x). It is also sensitive (measured in docs/quantization.md:
    alone it moves the logits more than all the other layers together do); HF's
    bitsandbytes integration keeps it in fp, and `skip=("output",)` does here. What stays in floating point:
    the embedding table (a lookup reads one row per token) and so a tied head (it *is* the embedding), norms,
    the stacked MoE expert weights (3-D parameters in `workbench/models/moe.py`, not `nn.Linear`), and anything in `skip`.
    Every family's `logits()` reads `self.output.weight` and calls `linear` on it (the tensor-parallel head
    relies on that), which an int8 buffer cannot serve; so when the head is quantized, `quantize_model` binds
    an instance `logits` that runs the `Int8Linear` head on the selected positions. DeepSeek-V3's absorbed MLA
    decode reads wkv_b through `lora.effective_weight`, which calls `Int8Linear.effective_weight()` (the
    dequantized weight).
    Speed: up to `INT8_KERNEL_ROWS` rows of fp32 on a CPU go through `torch.ops.workbench.int8_linear`, compiled
    in the same extension as the fp32 decode kernel (`workbench/nn/kernels/skinny_linear.cpp`, built and
    turned off with it: `WORKBENCH_CPU_KERNELS=0`); more rows (prefill, batched scoring), other dtypes and
    devices, or no compiler: the weight is widened to the input dtype and F.linear runs (exact for int8 in
    fp32, bf16 and fp16), then the scale. LLM.int8 has no decode kernel here: it is the accuracy reference.
    Files: `save_quantized` (and `workbench export --quant int8`) write a Hugging Face-style directory: the
    family adapter's names, `<name>.weight` int8 and `<name>.weight_scale` fp32 (out,), and a `quantization`
    entry in config.json ({"method", "threshold", "bits": 8, "scheme": "per-channel-absmax"}); `load_hf_dir`
    sees that entry and reads the directory back through `load_quantized`, giving identical logits. Not a
    format transformers reads (it would need `quantization_config`, compressed-tensors' layout).

Measured (docs/quantization.md has each figure with the command that reproduces it)
    Random llama3 debug model, seeds 0-9: max |logits - fp32| / max |fp32 logits| 8.2e-3 (int8), 1.2e-2
    (llm-int8), asserted with 2x margin in tests/unit/test_quant.py. Held-out perplexity of the repo's trained
    2M runs: +0.005% and +0.02% (int8). 124M-shaped batch-1 decode on the 2-core CPU: 1.85x-2.03x fp32.

What differs from bitsandbytes and gpt-fast
    bitsandbytes (`Linear8bitLt`, LLM.int8): its int8 product is a GPU kernel (cuBLASLt igemmlt), here an exact
    emulation on the CPU; its `SCB` is the row absmax (c_w), ours the scale s = c_w / 127; its kernels zero the
    outlier elements, we the outlier columns; it computes in fp16, we in the input's dtype (fp32 here).
    gpt-fast (`quantize.py`, WeightOnlyInt8Linear): per-output-channel too, but its scale is absmax / 127.5 and
    it clamps to -128..127 (the row max lands on 127.5, rounded to 128 and clamped); we use absmax / 127 and the
    symmetric -127..127. Its forward is F.linear(x, w.to(x.dtype)) * scales, our fallback, made fast by
    torch.compile generating a fused kernel on GPU; here a hand-written CPU kernel. Like gpt-fast (its handler
    replaces every nn.Linear) and unlike HF's bitsandbytes integration, the lm head is quantized (see above).

Sources
    Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
    arXiv:2208.07339. bitsandbytes `autograd/_functions.py` (MatMul8bitLt), `functional.py`
    (int8_vectorwise_quant). pytorch-labs/gpt-fast `quantize.py` (WeightOnlyInt8QuantHandler).
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import CheckpointError, ConfigError, WorkbenchError
from workbench.nn.linear import int8_linear_op

__all__ = [
    "METHODS", "DEFAULT_SKIP", "Int8Linear", "quantize_weight", "int8_linear", "llm_int8_linear", "int_mm",
    "quantize_model", "apply_quant", "save_quantized", "load_quantized", "is_quantized_dir", "linear_weight_bytes",
]

METHODS = ("int8", "llm-int8")
"""Quantization methods; `none` (no quantization) is accepted where a user picks one (`--quant`)."""
DEFAULT_SKIP = ("*.gate",)
"""Module paths (fnmatch) that `quantize_model` leaves in floating point: the MoE routers."""
QMAX = 127
EPS = 1e-12
"""The absmax of an all-zero row is taken as EPS, so its scale is not 0 (its int8 values are 0 anyway)."""
SCALE_SUFFIX = "_scale"
"""In a saved directory, `<name>.weight` (int8) has its scales in `<name>.weight_scale`."""
FORMAT = "per-channel-absmax"
INT8_KERNEL_ROWS = 64
"""Up to this many rows of fp32 CPU input take the int8 kernel (4 rows per pass over the weight); more take the
fallback (the weight widened to the input dtype, then F.linear). At 64 rows the kernel beats widening on the
larger 124M matrices and loses on the smallest (wk, 256 x 768: one thread does all of its rows), see
`python benchmarks/int8_decode.py` (projection rows) and docs/quantization.md."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wq int8 (out, in), s fp32 (out,)) of a weight (out, in): per-output-row absmax, symmetric -127..127."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    # s_o = max_i |W_oi| / 127, an all-zero row's absmax taken as EPS
    scale = w.abs().amax(dim=1).clamp_min(EPS) / QMAX  # (out,)
    # Wq = clamp(round(W / s), -127, 127); torch.round is half to even
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                kernel: bool = True) -> torch.Tensor:
    """y = (x Wq^T) * s + b for int8 `weight` (N, K) and fp32 `scale` (N,); y in x's dtype.

    Up to INT8_KERNEL_ROWS rows of fp32 CPU input go through the int8 decode kernel (when it built and `kernel`);
    otherwise the weight is widened to x's dtype for F.linear, then scaled."""
    rows = x.numel() // max(x.shape[-1], 1)
    op = int8_linear_op() if (kernel and 0 < rows <= INT8_KERNEL_ROWS and x.device.type == "cpu"
                              and x.dtype == torch.float32 and not torch.compiler.is_compiling()) else None
    if op is not None:
        y = op(x.reshape(rows, x.shape[-1]), weight, scale).view(*x.shape[:-1], weight.shape[0])  # (..., N)
    else:
        # y = (x Wq^T) * s: int8 values are exact in fp32, bf16 and fp16
        y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)  # (..., N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> int32 (M, N), exactly.

    On a GPU, `torch._int_mm` (where it accepts the shape); on a CPU, and wherever it refuses, the exact
    emulation: this CPU build's `torch._int_mm` is correct but a slow loop (0.90 s against 0.11 s for the
    emulation on (16384, 128) x (128, 384), 2 threads)."""
    if a.device.type != "cpu":
        try:
            return torch._int_mm(a, b)
        except (RuntimeError, AttributeError, NotImplementedError):
            pass
    return int_mm_emulated(a, b)


def int_mm_emulated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same product as `int_mm`, exact: every partial sum is an integer of magnitude <= K * 127^2, so a
    float32 matmul holds each one exactly while K * 127^2 < 2^24 (K <= 1040), a float64 one below 2^53."""
    bound = a.shape[-1] * QMAX * QMAX
    if bound >= 2**53:
        raise ValueError(f"int_mm_emulated: K = {a.shape[-1]} too large for an exact float64 sum")
    dtype = torch.float32 if bound < 2**24 else torch.float64
    return (a.to(dtype) @ b.to(dtype)).to(torch.int32)


def llm_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, threshold: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8(): outlier feature columns (|x| >= threshold somewhere in the column) in floating point against
    the dequantized int8 weight columns, the rest int8 x int8 -> int32 with row-wise activation scales."""
    K, N = x.shape[-1], weight.shape[0]
    X = x.reshape(-1, K)  # (rows, K)
    Xf = X.float()
    y_o = None
    if threshold > 0:
        # O = {j : max_i |X_ij| >= threshold}
        outliers = (Xf.abs() >= threshold).any(dim=0).nonzero().squeeze(1)  # (|O|,)
        if outliers.numel():
            # Y_O = X[:, O] (Wq[:, O] * s)^T, in fp32
            w_o = weight[:, outliers].float() * scale[:, None]  # (N, |O|)
            y_o = Xf[:, outliers] @ w_o.t()  # (rows, N)
            Xf = Xf.index_fill(1, outliers, 0.0)
    # c_x = max_j |X'_ij| (vector-wise, per token), X8 = round(127 X' / c_x)
    c_x = Xf.abs().amax(dim=1).clamp_min(EPS)  # (rows,)
    X8 = torch.round(Xf * (QMAX / c_x)[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (rows, K)
    acc = int_mm(X8, weight.t())  # (rows, N) int32
    # Y = (X8 Wq^T) * (c_x c_w^T) / 127^2 with c_w = 127 s
    y = acc.float() * (c_x / QMAX)[:, None] * scale[None, :]  # (rows, N)
    if y_o is not None:
        y = y + y_o
    y = y.to(x.dtype).view(*x.shape[:-1], N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and one fp32 scale per output row (inference only).

    `threshold` > 0 computes it the LLM.int8() way (see the module notes); 0 is weight-only int8."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: float = 0.0,
                 method: str = "int8", bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"Int8Linear method: unknown {method!r} (expected one of {', '.join(METHODS)})")
        if threshold < 0:
            raise ConfigError(f"Int8Linear threshold: expected a value >= 0 (0 = no outlier columns), got {threshold}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.threshold = method, float(threshold)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "int8", threshold: float = 6.0) -> Int8Linear:
        """The quantized copy of `linear` (its weight's per-row absmax scales; its bias kept as is)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, method=method,
                threshold=threshold if method == "llm-int8" else 0.0,
                bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32, device=w.device)
        q.weight, q.scale = quantize_weight(w)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q

    def dequantize(self) -> torch.Tensor:
        """The (out, in) fp32 weight Wq * s that this layer applies."""
        return self.weight.float() * self.scale[:, None]

    def effective_weight(self) -> torch.Tensor:
        """`lora.effective_weight` protocol: the weight this layer applies (dequantized, fp32)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise WorkbenchError("Int8Linear is inference-only: the model is in training mode (call model.eval(); "
                                 "train the fp model and quantize after)")
        if x.requires_grad and torch.is_grad_enabled():
            raise WorkbenchError("Int8Linear: the input requires a gradient, but int8 weights have none "
                                 "(run under torch.no_grad() / inference_mode(), or train the fp model)")
        if self.method == "llm-int8":
            return llm_int8_linear(x, self.weight, self.scale, self.threshold, self.bias)
        return int8_linear(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold}" if self.method == "llm-int8" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}{extra}")


def check_method(method: str | None, where: str = "quant") -> str:
    """`method` if it is `none`/None or one of METHODS, else a ConfigError naming `where`."""
    if method in (None, "none"):
        return "none"
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown quantization method {method!r} (expected one of none, {', '.join(METHODS)})")
    return method


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _bind_head(model: nn.Module) -> None:
    """A quantized `output` head: an instance `logits` that applies the module (see the module notes)."""
    from workbench.models.base import select_positions

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(select_positions(hidden, positions))  # (B, T|K, V)

    # a method bound to this instance (it reads self.output), so a deep copy calls its own head
    model.logits = types.MethodType(logits, model)


def _finish(model: nn.Module, method: str, threshold: float, names: list[str]) -> None:
    if isinstance(getattr(model, "output", None), Int8Linear) and hasattr(type(model), "logits"):
        _bind_head(model)
    model.quantization = {"method": method, "threshold": threshold if method == "llm-int8" else 0.0,
                          "bits": 8, "scheme": FORMAT, "modules": names}


def quantize_model(model: nn.Module, method: str = "int8", threshold: float = 6.0,
                   skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
    """Replace every `nn.Linear` of `model` (in eval mode) whose path matches no `skip` pattern by an
    `Int8Linear`, in place; returns the replaced paths. `threshold` applies to method "llm-int8" only."""
    from workbench.nn.lora import LoRALinear

    check_method(method, "quantize_model method")
    if method == "none":
        raise ConfigError("quantize_model method: 'none' quantizes nothing (expected one of int8, llm-int8)")
    if threshold < 0:
        raise ConfigError(f"quantize_model threshold: expected a value >= 0 (0 = no outlier columns), got {threshold}")
    if model.training:
        raise WorkbenchError("quantize_model: the model is in training mode; quantized layers are inference-only "
                             "(call model.eval() first)")
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear) or hasattr(m, "lora_A"):
            raise WorkbenchError(f"quantize_model: {path} is a LoRA layer; merge the adapters first "
                                 f"(workbench.nn.lora.merge_and_unload, or --adapter, which merges)")
    if getattr(model, "quantization", None):
        raise WorkbenchError(f"quantize_model: the model is quantized already ({model.quantization['method']})")
    names = [p for p, m in model.named_modules()
             if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(p, s) for s in skip)]
    for path in names:
        lin = model.get_submodule(path)
        if lin.weight.device.type == "meta":
            raise WorkbenchError(f"quantize_model: {path} is on the meta device; load the weights first")
        _replace(model, path, Int8Linear.from_linear(lin, method, threshold).eval())
    _finish(model, method, threshold, names)
    return names


def set_method(model: nn.Module, method: str, threshold: float = 6.0) -> None:
    """Switch a quantized model between int8 and llm-int8 (the stored weights are the same)."""
    check_method(method, "set_method method")
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.method, m.threshold = method, (float(threshold) if method == "llm-int8" else 0.0)
    model.quantization = dict(model.quantization, method=method,
                              threshold=float(threshold) if method == "llm-int8" else 0.0)


def apply_quant(model: nn.Module, quant: str | None, threshold: float = 6.0, log=None) -> nn.Module:
    """What `--quant` does to a loaded model: `none` leaves it as loaded; int8 / llm-int8 quantize an fp model,
    or switch the method of one loaded quantized (an exported directory)."""
    quant = check_method(quant, "--quant")
    if quant == "none":
        return model
    model.eval()
    if getattr(model, "quantization", None):
        if model.quantization["method"] != quant:
            set_method(model, quant, threshold)
        return model
    names = quantize_model(model, quant, threshold)
    if log is not None:
        log(f"quantized {len(names)} linear layers to {quant}")
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights (and scales): what `--quant` shrinks."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.weight.numel() + m.scale.numel() * 4
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


# ----------------------------------------------------------------------------------------------------
# Files: a Hugging Face-style directory with int8 weights, their scales and `quantization` in config.json
# ----------------------------------------------------------------------------------------------------


def _identity_names(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, str]:
    """ours-name -> theirs-name for the tensors an adapter passed through unchanged (the same object)."""
    by_id = {id(t): name for name, t in theirs.items()}
    return {name: by_id[id(t)] for name, t in ours.items() if id(t) in by_id}


def save_quantized(model: nn.Module, section, tokenizer, out_dir: str | Path,
                   tokenizer_source: str | Path | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a quantized model as a Hugging Face-style directory (see the module notes); never overwrites."""
    from workbench.checkpoint.hf import adapter_for, export_hf_dir

    info = getattr(model, "quantization", None)
    if not info:
        raise WorkbenchError("save_quantized: the model is not quantized (quantize_model first)")
    adapter = adapter_for(section.family)
    state = model.state_dict()
    modules = [p for p, m in model.named_modules() if isinstance(m, Int8Linear)]
    scales = {f"{p}.weight": state.pop(f"{p}.scale") for p in modules}  # ours weight name -> its scale
    hf_sd = adapter.state_dict_to_hf(state)
    names = _identity_names({k: state[k] for k in scales}, hf_sd)
    for ours, scale in scales.items():
        if ours not in names:
            raise CheckpointError(f"save_quantized: the {section.family} adapter transforms {ours} on its way to "
                                  f"Hugging Face names, so its int8 rows cannot keep their scales")
        hf_sd[names[ours] + SCALE_SUFFIX] = scale
    entry = {"method": info["method"], "threshold": info["threshold"], "bits": 8, "scheme": FORMAT}
    return export_hf_dir(model, section, tokenizer, out_dir, tokenizer_source=tokenizer_source,
                         max_shard_bytes=max_shard_bytes, hf_state=hf_sd, config_extra={"quantization": entry})


def is_quantized_dir(hf_config: dict) -> bool:
    return "quantization" in hf_config


def load_quantized(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, section) of a directory `save_quantized` wrote; dtype None keeps the stored dtype
    of the floating-point tensors (the scales stay fp32)."""
    from workbench.checkpoint.hf import adapter_for, read_hf_config
    from workbench.checkpoint.safetensors_io import read_dir
    from workbench.data.tokenizer import Tokenizer, check_fits
    from workbench.models.base import build_model, load_state_strict

    directory = Path(directory)
    section, hf = read_hf_config(directory)
    where = str(directory / "config.json")
    entry = hf["quantization"]
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: 'quantization' must be an object, got {type(entry).__name__}")
    method, threshold = entry.get("method"), entry.get("threshold", 0.0)
    if method not in METHODS:
        raise CheckpointError(f"{where}: quantization.method {method!r} unknown (expected one of {', '.join(METHODS)})")
    if entry.get("bits") != 8 or entry.get("scheme") != FORMAT:
        raise CheckpointError(f"{where}: quantization bits {entry.get('bits')!r} / scheme {entry.get('scheme')!r} "
                              f"not supported (expected 8 / {FORMAT!r})")
    if not isinstance(threshold, (int, float)) or threshold < 0:
        raise CheckpointError(f"{where}: quantization.threshold expected a number >= 0, got {threshold!r}")
    adapter = adapter_for(section.family)
    hf_sd = read_dir(directory)
    hf_scales = {k[: -len(SCALE_SUFFIX)]: hf_sd.pop(k) for k in list(hf_sd) if k.endswith(".weight" + SCALE_SUFFIX)}
    for name in hf_scales:
        if name not in hf_sd or hf_sd[name].dtype != torch.int8:
            raise CheckpointError(f"{directory}: {name}{SCALE_SUFFIX} has no int8 tensor {name} beside it")
    sd = adapter.state_dict_from_hf(hf_sd, section.config, where=str(directory))
    ours_of = {v: k for k, v in _identity_names(sd, hf_sd).items()}  # hf name -> ours
    modules = []
    for name, scale in hf_scales.items():
        if name not in ours_of:
            raise CheckpointError(f"{directory}: the {section.family} adapter transforms {name}, so its scales "
                                  f"cannot follow it")
        if scale.dtype != torch.float32 or scale.shape != (hf_sd[name].shape[0],):
            raise CheckpointError(f"{directory}: {name}{SCALE_SUFFIX} expected fp32 of shape ({hf_sd[name].shape[0]},), "
                                  f"got {str(scale.dtype).removeprefix('torch.')} {tuple(scale.shape)}")
        path = ours_of[name].removesuffix(".weight")
        sd[path + ".scale"] = scale
        modules.append(path)
    stray = sorted(k for k, t in sd.items() if t.dtype == torch.int8 and k.removesuffix(".weight") not in modules)
    if stray:
        raise CheckpointError(f"{directory}: int8 tensor {stray[0]} has no {SCALE_SUFFIX} beside it")
    if dtype is None:
        floats = [t.dtype for k, t in sd.items() if t.is_floating_point() and not k.endswith(".scale")]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
    model = build_model(section, device, dtype)  # fp layers initialised, then replaced and loaded below
    for path in modules:
        lin = model.get_submodule(path)
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{directory}: {path} holds int8 weights but is not a linear layer of this model")
        q = Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, method=method,
                       threshold=threshold if method == "llm-int8" else 0.0, device=lin.weight.device,
                       bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32)
        _replace(model, path, q)
    for k in list(sd):  # the fp tensors in the requested dtype; int8 weights and fp32 scales as stored
        if sd[k].is_floating_point() and not k.endswith(".scale"):
            sd[k] = sd[k].to(dtype)
    load_state_strict(model, sd, f"{directory} (model family {section.family})")
    model.eval()
    _finish(model, method, float(threshold), modules)
    tokenizer = Tokenizer.from_hf_dir(directory)
    check_fits(tokenizer, section.config.vocab_size)
    return model, tokenizer, section
