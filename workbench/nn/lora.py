"""LoRA and DoRA: low-rank adapters on frozen linear layers.

What it is
    LoRA (Hu et al. 2021) fine-tunes a pretrained linear layer y = W0 x + b by learning a rank-r update of
    its weight, W = W0 + s B A with A (r, in), B (out, r), while W0 and b stay frozen. DoRA (Liu et al.
    2024) splits the adapted weight into a magnitude and a direction per output channel and learns the
    magnitude m (out,) directly, the direction through the same low-rank update. `inject_lora` swaps the
    targeted `nn.Linear` modules of a model for `LoRALinear` in place and freezes every other parameter.

The math (s is the scale: alpha / r, or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)
    LoRA     y = W0 x + b + s B A drop(x)                     drop: dropout, on the adapter path only
    DoRA     V = W0 + s B A                                   (out, in)
             ||V||_i = sqrt(sum_j V_ij^2)                     per output channel i (row norm), DETACHED
             W' = diag(m / ||V||) V                           m initialised to ||W0||, so W' = W0 at init
             y = W0 x + b + (m/||V|| - 1) W0 drop(x) + (m/||V||) s B A drop(x)     (PEFT's form of W' x + b)
    Init     A ~ kaiming_uniform(a = sqrt(5)) (nn.Linear's default for an (r, in) weight), or ~ N(0, (1/r)^2)
             with init = "gaussian"; B = 0, so an adapted model starts equal to its base model.
    Merge    W <- W0 + s B A (LoRA),  W <- diag(m / ||V||) V (DoRA); unmerge inverts it:
             W0 = W - s B A,  W0 = diag(||V|| / m) W - s B A (||V|| remembered from the merge).

Intuition
    Fine-tuning updates of large models have low "intrinsic rank": a rank-8 B A per attention projection
    moves a model most of the way a full fine-tune does, while the optimizer keeps state for a fraction of
    a percent of the parameters (the llama3 1B flavor with r = 8 on its attention projections trains
    1,703,936 of 1,237,518,336 parameters, 0.138%). B = 0 at the start makes the first step start from the
    pretrained function. DoRA's observation is that full fine-tuning changes the direction of a weight row
    and its length in a way plain LoRA couples; giving the length its own parameter m (and the direction a
    normalised V) brings LoRA's learning pattern closer to full fine-tuning at the same rank. Detaching
    ||V|| (paper section 4.3) makes the gradient of the direction the plain LoRA gradient scaled by m/||V||,
    and saves keeping the (out, in) V for the backward.

Design choices
    `LoRALinear` subclasses `workbench.nn.linear.Linear` and reuses the base module's `weight` and `bias`
    Parameter objects, so state-dict keys of the base stay as they are (`layers.0.attention.wq.weight`),
    `isinstance(m, nn.Linear)` holds, and the adapter tensors sit beside them as `...wq.lora_A`,
    `...wq.lora_B`, `...wq.lora_magnitude`. A plain model and an adapted one therefore share a checkpoint
    layout except for the adapter keys; `merged_state_dict` folds those into the base weights and drops
    them, giving exactly the plain model's keys (what `model.safetensors` consumers read).
    DoRA's m is the base weight's row norms at injection time: inject after the base weights are loaded
    (or call `LoRALinear.init_adapter()` after materialising a model injected on the meta device).
    A's init draws from the global torch RNG, which the trainer seeds identically on every rank.
    Merge and unmerge compute in float64 and cast back to the weight's dtype once, so the only loss is
    the rounding of the merged weight to fp32. Measured on the llama3 debug model
    (test_merge_then_unmerge_restores_the_base_weight: r = 4, B ~ N(0, 0.02), DoRA's m scaled by
    U(0.8, 1.2); three seeds): unmerge restores W0 to a max abs error of 3.7e-9 (2^-28, one fp32 step at
    the weights' magnitude) for LoRA and DoRA alike, with about 28% of the entries one step off; merged
    and adapter logits agree to 2.4e-7.
    While merged, forward is the plain linear (the adapter is not applied twice) and the adapters get no
    gradient: merging is for inference and export. Merging a merged layer, or unmerging an unmerged one,
    is an error. `disabled(model)` turns every adapter off (the base model's function: the frozen
    reference of DPO when LoRA is on) and refuses merged layers, whose W0 is not at hand.
    `effective_weight()` is the weight the layer applies, as a differentiable tensor, for code that reads
    weights instead of calling the module (DeepSeek-V3's absorbed MLA decode reads wkv_b this way). It
    costs an (out, r) x (r, in) product per call: merge for long decodes.

What differs from PEFT and the papers
    One adapter per layer, no adapter names; no `fan_in_fan_out` (weights are always (out, in)).
    Default alpha is 16 (PEFT's LoraConfig default is 8); r = 0 means LoRA is off.
    PEFT's init "gaussian" draws A with std 1/r (variance 1/r^2); that is what "gaussian" does here.
    Adapters take the base weight's dtype (workbench weights are fp32; bf16 is autocast); PEFT casts them
    to fp32 when the base is half precision. DoRA's ||V|| is computed in fp32 with autocast off.
    With dropout on in training, DoRA's correction term reads W0 drop(x), as PEFT and the official DoRA
    code do (so W0 x enters twice, once dropped); in eval or with dropout 0 it is W' x + b exactly.
    Merge arithmetic runs in float64 (PEFT's in the weight's dtype); neither keeps a copy of W0.

Sources
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA),
    arXiv:2312.03732.
    Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353.
    PEFT (huggingface/peft) src/peft/tuners/lora/layer.py, dora.py, variants.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_, from_dict
from workbench.errors import CheckpointError, ConfigError, WorkbenchError
from workbench.nn.linear import Linear, linear

__all__ = [
    "LoraConfig", "LoRALinear", "inject_lora", "lora_modules", "lora_state_dict", "load_lora_state",
    "merged_state_dict", "split_state", "merged", "disabled", "effective_weight", "save_adapter",
    "load_adapter", "read_adapter", "AdapterFiles", "trainable_report", "format_report", "ADAPTER_KEYS",
]

ADAPTER_KEYS = ("lora_A", "lora_B", "lora_magnitude")
"""The parameter names a LoRALinear adds beside `weight` and `bias`."""

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclasses.dataclass
class LoraConfig:
    """The `[lora]` section: which linear layers get adapters, and how they are shaped and scaled."""

    r: int = field_(0, ge=0, doc="rank; 0 = LoRA off")
    alpha: float = field_(16.0, gt=0, doc="scale numerator: s = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = field_(0.0, ge=0, lt=1, doc="dropout on the adapter path's input")
    targets: list[str] = field_(
        ["layers.*.attention.*"],
        doc="fnmatch patterns over module paths; the nn.Linear modules matched get adapters (the default: every "
            "attention projection of every decoder block)")
    dora: bool = field_(False, doc="DoRA: learn a per-output-channel magnitude as well")
    rslora: bool = field_(False, doc="rank-stabilised scale alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = field_(
        "kaiming", doc="A's init: kaiming_uniform(a=sqrt(5)) or N(0, (1/r)^2); B starts at zero either way")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA; 0.0 when LoRA is off."""
        if not self.enabled:
            return 0.0
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate(self) -> None:
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            fail("targets", f"expected a non-empty list of module path patterns like 'layers.*.attention.*', "
                            f"got {self.targets!r}")
        for key in ("dora", "rslora"):
            if getattr(self, key) and not self.enabled:
                fail(key, "needs lora.r > 0 (r = 0 turns LoRA off)")


# ----------------------------------------------------------------------------------------------------
# The math, shared by the module (merge, unmerge, forward) and the pure state-dict merge


def _no_autocast(device: torch.device):
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _row_norm(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """||V||_i = || W0_i + s (B A)_i ||, (out,), in fp32 (or wider), never part of the graph."""
    with torch.no_grad(), _no_autocast(W0.device):
        dtype = torch.promote_types(W0.dtype, torch.float32)
        # V = W0 + s B A                                          (out, in)
        V = W0.to(dtype) + scale * (B.to(dtype) @ A.to(dtype))
        return torch.linalg.norm(V, dim=1)  # (out,)


def _fold(W0, A, B, scale: float, magnitude=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merged weight in float64, and for DoRA the row norms ||V|| (float64, (out,)) that undo it."""
    # V = W0 + s B A                                              (out, in)
    V = W0.double() + scale * (B.double() @ A.double())
    if magnitude is None:
        return V, None
    norm = torch.linalg.norm(V, dim=1)  # (out,)
    # W' = diag(m / ||V||) V
    return (magnitude.double() / norm)[:, None] * V, norm


class LoRALinear(Linear):
    """A Linear with a LoRA (or DoRA) adapter; the base `weight` and `bias` are the original module's
    Parameters, frozen. Build with `LoRALinear.from_linear(linear, cfg)`."""

    lora_magnitude: nn.Parameter | None

    @classmethod
    def from_linear(cls, base: nn.Linear, cfg: LoraConfig) -> LoRALinear:
        """Wrap `base` (any nn.Linear), reusing its weight and bias Parameters; A, B (and m) initialised."""
        return cls(base, cfg)

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        if not cfg.enabled:
            raise ValueError("LoRALinear needs a LoraConfig with r > 0")
        if isinstance(base, LoRALinear):
            raise ValueError("this linear layer has a LoRA adapter already")
        nn.Module.__init__(self)  # not nn.Linear.__init__: no new weight is allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: state-dict key `<path>.weight` unchanged
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scale, self.dropout = cfg.r, cfg.scale, cfg.dropout
        self.dora, self.init = cfg.dora, cfg.init
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, device=w.device, dtype=w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, cfg.r, device=w.device, dtype=w.dtype))  # (out, r)
        if cfg.dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype))
        else:
            self.register_parameter("lora_magnitude", None)
        self.merged = False
        self.adapter_disabled = False
        self._merge_norm: torch.Tensor | None = None  # DoRA: ||V|| (float64) of the current merge
        self.init_adapter()

    @torch.no_grad()
    def init_adapter(self) -> None:
        """A from the global RNG, B = 0, m = ||W0|| (row norms of the current base weight). Works on meta."""
        if self.merged:
            raise RuntimeError("init_adapter on a merged LoRALinear: unmerge first")
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_magnitude is not None:
            # m = ||W0||, computed exactly as forward computes ||V|| (B = 0), so m / ||V|| = 1 at init
            self.lora_magnitude.copy_(_row_norm(self.weight, self.lora_A, self.lora_B, self.scale))

    def extra_repr(self) -> str:
        kind = "dora" if self.dora else "lora"
        return f"{super().extra_repr()}, {kind} r={self.r}, scale={self.scale:g}, merged={self.merged}"

    def _magnitude_ratio(self) -> torch.Tensor:
        """m / ||V|| (out,): gradient flows into m only (||V|| is detached)."""
        norm = _row_norm(self.weight, self.lora_A, self.lora_B, self.scale)  # (out,), detached
        return self.lora_magnitude / norm.to(self.lora_magnitude.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.adapter_disabled:
            return linear(x, self.weight, self.bias)
        xd = F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x
        # B A drop(x)                                                (..., r) -> (..., out)
        lora = linear(linear(xd, self.lora_A), self.lora_B)
        if self.lora_magnitude is None:
            # y = W0 x + b + s B A drop(x)
            return linear(x, self.weight, self.bias) + self.scale * lora
        base = linear(x, self.weight)  # W0 x, the bias added once at the end
        base_d = base if xd is x else linear(xd, self.weight)  # W0 drop(x) (PEFT, the DoRA code)
        g = self._magnitude_ratio()  # (out,) broadcast over the last dim
        # y = W0 x + (m/||V|| - 1) W0 drop(x) + (m/||V||) s B A drop(x) + b
        y = base + (g - 1) * base_d + g * (self.scale * lora)
        if self.bias is not None:
            y = y + self.bias
        return y.to(base.dtype)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies now, without modifying anything (differentiable)."""
        if self.merged or self.adapter_disabled:
            return self.weight
        # W0 + s B A
        V = self.weight + self.scale * (self.lora_B @ self.lora_A)
        if self.lora_magnitude is None:
            return V
        # diag(m / ||V||) V
        return self._magnitude_ratio()[:, None] * V

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + s B A (LoRA) or diag(m / ||V||) V (DoRA), in place, float64 arithmetic."""
        if self.merged:
            raise RuntimeError("this LoRALinear is merged already (merging twice would add the adapter twice)")
        if self.adapter_disabled:
            raise RuntimeError("merge inside `disabled(model)`: the adapter is off")
        W, self._merge_norm = _fold(self.weight, self.lora_A, self.lora_B, self.scale, self.lora_magnitude)
        self.weight.copy_(W.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 = W - s B A (LoRA) or diag(||V|| / m) W - s B A (DoRA), in place, float64 arithmetic."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        W = self.weight.double()
        if self.lora_magnitude is not None:
            # V = diag(||V|| / m) W
            W = (self._merge_norm / self.lora_magnitude.double())[:, None] * W
        # W0 = V - s B A
        W0 = W - self.scale * (self.lora_B.double() @ self.lora_A.double())
        self.weight.copy_(W0.to(self.weight.dtype))
        self.merged, self._merge_norm = False, None


# ----------------------------------------------------------------------------------------------------
# Model-level functions


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, module) of every LoRALinear in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Swap every nn.Linear whose module path matches a pattern of `cfg.targets` for a LoRALinear, freeze
    every other parameter, and return the adapted paths. r = 0 (LoRA off) changes nothing and returns [].

    Inject after the base weights are loaded (DoRA's magnitude is their row norms). A draws from the global
    torch RNG."""
    if not cfg.enabled:
        return []
    if any(True for _ in lora_modules(model)):
        raise ValueError("this model already has LoRA adapters; inject into a plain model")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    paths = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in cfg.targets)]
    if not paths:
        some = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "")
        raise ConfigError(f"config key 'lora.targets': no nn.Linear module path matches {cfg.targets!r} "
                          f"(the model's linear layers include: {some or 'none'})")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, LoRALinear.from_linear(getattr(parent, attr), cfg))
    return paths


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed by full parameter name (`layers.0.attention.wq.lora_A`)."""
    out = {}
    for path, m in lora_modules(model):
        for key in ADAPTER_KEYS:
            t = getattr(m, key)
            if t is not None:
                out[f"{path}.{key}" if path else key] = t.detach()
    return out


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors into an adapted model, strictly: missing, unexpected or mis-shaped names raise
    CheckpointError naming `where` and the tensor."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"adapter weights in {where}: missing tensor {missing[0]} "
                              f"({len(missing)} missing; is it the adapter of this model and LoRA config?)")
    if unexpected:
        raise CheckpointError(f"adapter weights in {where}: unexpected tensor {unexpected[0]} "
                              f"({len(unexpected)} unexpected; is it the adapter of this model and LoRA config?)")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"adapter weights in {where}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the model needs {tuple(own[name].shape)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)


def _adapter_prefixes(state: dict) -> list[str]:
    return [k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")]


def merged_state_dict(state: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A pure function on the full state dict of an adapted, unmerged model: every adapter folded into its
    base weight (LoRA or DoRA by cfg), the adapter keys dropped, so the keys are exactly the plain model's.

    Agrees with `LoRALinear.merge` (same float64 arithmetic). Take the state while no layer is merged: a
    merged layer's weight already holds its adapter, and folding again would add it twice."""
    out = {k: v for k, v in state.items() if k.rpartition(".")[2] not in ADAPTER_KEYS}
    prefixes = _adapter_prefixes(state)
    for prefix in prefixes:
        try:
            W0, A, B = state[f"{prefix}.weight"], state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"]
        except KeyError as e:
            raise CheckpointError(f"merging LoRA adapters: tensor {e.args[0]} is missing from the state dict") from None
        m = state.get(f"{prefix}.lora_magnitude")
        if cfg.dora != (m is not None):
            raise CheckpointError(f"merging LoRA adapters: {prefix} {'has no' if cfg.dora else 'has a'} "
                                  f"lora_magnitude but lora.dora = {str(cfg.dora).lower()}")
        W, _ = _fold(W0, A, B, cfg.scale, m)
        out[f"{prefix}.weight"] = W.to(W0.dtype)
    stray = sorted(k for k in state if k.rpartition(".")[2] in ADAPTER_KEYS and k.rpartition(".")[0] not in prefixes)
    if stray:
        raise CheckpointError(f"merging LoRA adapters: {stray[0]} has no matching lora_A")
    return out


def split_state(state: dict[str, torch.Tensor], cfg: LoraConfig) -> tuple[dict, dict]:
    """(the merged plain-model state, the adapter tensors) of an adapted model's full state dict."""
    adapters = {k: v for k, v in state.items() if k.rpartition(".")[2] in ADAPTER_KEYS}
    return merged_state_dict(state, cfg), adapters


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Merge every LoRALinear for the block (plain-linear speed), unmerge on exit."""
    done = []
    try:
        for _, m in lora_modules(model):
            m.merge()
            done.append(m)
        yield model
    finally:
        for m in reversed(done):
            m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight for good and put the plain Linear back (PEFT's merge_and_unload):
    the model's state dict has the plain model's keys again (what `--adapter` on generate and export gives)."""
    for path, m in list(lora_modules(model)):
        if not m.merged:
            m.merge()
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                       dtype=m.weight.dtype)
        plain.weight, plain.bias = m.weight, m.bias
        plain.weight.requires_grad_(True)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, plain)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Adapters off for the block: the model computes its base model's function (the frozen DPO reference
    when LoRA is on). Refuses merged layers."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise RuntimeError("disabled(model) with merged LoRA layers: unmerge them first")
    before = [m.adapter_disabled for m in mods]
    for m in mods:
        m.adapter_disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_disabled = b


def effective_weight(lin: nn.Linear) -> torch.Tensor:
    """The weight `lin` applies: `lin.effective_weight()` for an adapted linear (a LoRALinear, or a multi-adapter
    layer of workbench.inference.adapters, which refuses when its rows use different adapters), else `lin.weight`."""
    own = getattr(lin, "effective_weight", None)
    return own() if callable(own) else lin.weight


# ----------------------------------------------------------------------------------------------------
# Files: adapter.safetensors + adapter_config.json


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, folder: str | Path, cfg: LoraConfig, meta: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter.safetensors` (the adapter tensors) and `adapter_config.json` (every LoraConfig field,
    the adapted module paths and `meta`, e.g. the base model's family, flavor and tokenizer sha256) to
    `folder`; returns the folder. Take it while no layer is merged (the tensors do not change, but the
    base weights a consumer pairs them with must be W0). `state`: the adapter tensors when the model's own
    are shards (a sharded run passes the consolidated ones, e.g. from `split_state`)."""
    from safetensors.torch import save_file

    paths = [p for p, _ in lora_modules(model)]
    if not paths:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (state or lora_state_dict(model)).items()}
    _write_atomic(folder / ADAPTER_FILE, lambda p: save_file(tensors, str(p)))
    doc = {"lora": dataclasses.asdict(cfg), "modules": paths, "meta": meta or {}}
    _write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(doc, indent=2) + "\n"))
    return folder


@dataclasses.dataclass
class AdapterFiles:
    """What an adapter folder holds, read and parsed but applied to nothing (`read_adapter`)."""

    folder: Path
    cfg: LoraConfig
    modules: list[str]  # the adapted module paths, in the order they were saved
    state: dict[str, torch.Tensor]  # `<module>.lora_A`, `.lora_B` (and `.lora_magnitude`), on the CPU
    meta: dict  # the base model's family, flavor, tokenizer sha256 ... as the trainer recorded them


def read_adapter(folder: str | Path) -> AdapterFiles:
    """Read `adapter_config.json` and `adapter.safetensors` from `folder`. Missing or damaged files raise
    CheckpointError naming the file. Shared by `load_adapter` and multi-adapter serving."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, tensor_path = folder / CONFIG_FILE, folder / ADAPTER_FILE
    for p in (cfg_path, tensor_path):
        if not p.is_file():
            raise CheckpointError(f"LoRA adapter file {p} is missing")
    try:
        doc = json.loads(cfg_path.read_text())
        cfg = from_dict(LoraConfig, doc["lora"], "lora")
        modules = list(doc["modules"])
        meta = dict(doc.get("meta") or {})
    except (OSError, ValueError, KeyError, TypeError, WorkbenchError) as e:
        raise CheckpointError(f"LoRA adapter config {cfg_path} is unreadable: {type(e).__name__}: {e}") from None
    try:
        state = load_file(str(tensor_path))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"LoRA adapter file {tensor_path} is unreadable: {type(e).__name__}: {e}") from None
    return AdapterFiles(folder, cfg, modules, state, meta)


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Inject the adapter saved in `folder` into a plain model and load its tensors strictly; returns its
    LoraConfig. Missing or damaged files raise CheckpointError naming the file."""
    files = read_adapter(folder)
    cfg_path, tensor_path = files.folder / CONFIG_FILE, files.folder / ADAPTER_FILE
    try:
        paths = inject_lora(model, files.cfg)
    except ConfigError as e:  # its targets match nothing in this model: the user set no config key
        raise CheckpointError(f"LoRA adapter {cfg_path} does not fit this model: {e}") from None
    if paths != files.modules:
        extra = sorted(set(files.modules) ^ set(paths))
        raise CheckpointError(f"LoRA adapter {cfg_path} was saved on other modules than its targets match in this "
                              f"model (e.g. {extra[:3]}): a different base model?")
    load_lora_state(model, files.state, str(tensor_path))
    return files.cfg


# ----------------------------------------------------------------------------------------------------
# Reporting


def trainable_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts (a shared tensor counted once), the trainable fraction, and the
    adapted modules: {"trainable", "total", "fraction", "modules", "r", "dora"}."""
    trainable = total = 0
    for p in model.parameters():  # deduplicated by identity (tied embeddings count once)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    mods = [m for _, m in lora_modules(model)]
    ranks = {m.r for m in mods}
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1), "modules": len(mods),
            "r": ranks.pop() if len(ranks) == 1 else None, "dora": any(m.dora for m in mods)}


def format_report(report: dict) -> str:
    """One line: 'LoRA r=8 on 8 modules: 12,288 trainable of 1,843,200 parameters (0.67%)'."""
    counts = (f"{report['trainable']:,} trainable of {report['total']:,} parameters "
              f"({100 * report['fraction']:.2f}%)")
    if not report["modules"]:
        return f"LoRA off: {counts}"
    kind = "DoRA" if report["dora"] else "LoRA"
    rank = f"r={report['r']}" if report["r"] is not None else "mixed ranks"
    return f"{kind} {rank} on {report['modules']} modules: {counts}"
