"""Multi-adapter serving: one base model, many LoRA and DoRA adapters, every row of a batch naming its own.

API (what the serving engine calls once per forward)
    load_adapters(model, adapters: dict[str, str | Path], *, tokenizer: str | Path | None = None) -> AdapterRegistry
    AdapterRegistry.id_of(name: str | None) -> int       None -> 0, the base model; unknown -> UnknownAdapterError
    AdapterRegistry.names -> list[str]                    slot order: names[i] lives in slot i + 1
    adapter_rows(model, ids: torch.Tensor)                context manager; ids (B,) long, one slot per batch row

        registry = load_adapters(model, {"sql": "runs/sql/adapter", "chat": "runs/chat/adapter"})
        ids = torch.tensor([registry.id_of(r.adapter) for r in batch_requests])     # (B,)
        with adapter_rows(model, ids):
            out = model({"input_ids": x, "positions": pos, "mask": mask, "kv_cache": cache})

What it is
    Serving many fine-tunes of one base model the way Punica (Chen et al. 2023), S-LoRA (Sheng et al.
    2023) and dLoRA (Wu et al. 2024) do: the base weights are held once, each adapter is only its
    low-rank factors, and a batch mixing requests for different adapters (and for the plain base model)
    runs as one forward. `load_adapters` swaps every linear layer some adapter targets for a
    `MultiLoRALinear`, which holds all adapters of that layer stacked by slot.

The math (per layer; slot a = ids[b] for batch row b; s_a, A_a (r_a, in), B_a (out, r_a) from the adapter)
    LoRA     y_b = W0 x_b + b + s_a B_a A_a x_b
    DoRA     y_b = g_a * (W0 x_b + s_a B_a A_a x_b) + b,   g_a = m_a / ||W0 + s_a B_a A_a||   (out,), per row
             This is LoRALinear's eval forward W' x + b, W' = diag(m / ||V||) V, V = W0 + s B A: nothing trains,
             so ||V|| is a constant and g_a is computed once, at load (in fp32, as LoRALinear computes it).
    Stacked  A (N+1, r_max, in), sB (N+1, out, r_max) = s_a B_a (the scale folded in at load), g (N+1, out);
             slot 0 is the base model (A = sB = 0, g = 1), so base-model rows ride in the same batch. A rank-r_a
             adapter fills the first r_a rows of A_a and columns of sB_a, zeros after: the padding adds exactly
             0. An adapter that does not touch this layer has zeros (and g = 1) in its slot here.
    Mixed    A[ids] (B, r, in), sB[ids] (B, out, r) gathered once per layer per forward, then two batched
             matmuls: (B, T, in) x (B, in, r) -> (B, T, r) x (B, r, out) -> (B, T, out); r is the largest
             rank among the slots this batch uses (zero columns beyond it are skipped), and g multiplies only
             when a DoRA slot is among them.
    Uniform  every row on one slot a: plain matmuls with that slot's own r_a (no gather, no padding),
             and slot 0 (or an adapter that skips this layer) is exactly the base linear.

Intuition
    A rank-8 adapter of the attention projections of the llama3 1B flavor is 1.7 M parameters beside the
    base's 1.24 B (docs/inference.md has the bytes), so a hundred adapters cost less memory than one more
    copy of the base. Merging each adapter into its own copy of the model would make every adapter a full
    model and make a mixed batch impossible; keeping them unmerged costs the two thin matmuls per targeted
    layer, which during decode (one token per row) are small next to reading W0.

Design choices
    Which rows use which adapter is set per forward with `adapter_rows(model, ids)` and stored on the
    model's own MultiLoRALinear modules (not in a global), so two models in one process never see each
    other's rows. It is not thread-safe for two threads sharing one model; the engine runs one forward at
    a time. A forward of an adapted model with no ids set RAISES (naming `adapter_rows`) rather than
    silently serving the base model to a caller who forgot: pass zeros (`registry.id_of(None)`) for the
    base model. `adapter_rows` reads the ids once (`ids.tolist()`, one host sync per forward) to check them
    against the slot count and to pick the uniform fast path and the rank bound for every layer.
    The ids name batch rows: every adapted linear must see x with the batch first, (B, ..., in). That
    holds for every decoder's attention and dense feed-forward projections; a layer fed flattened tokens
    (an MoE router gate) raises naming itself. The MoE experts are not nn.Linear, so LoRA cannot target them.
    Loading is all-or-nothing: every folder is read and checked (family and tokenizer as `check_adapter_base`
    does, the target modules against the model, tensor names and shapes) before the model is changed. A
    second `load_adapters` call adds slots to the same registry (`model.adapter_registry`); names must be new.
    The stacks are non-persistent buffers: the model's state dict keeps exactly the base model's keys.
    A model holding a training LoRALinear is refused (merge_and_unload it first: it is then the base).
    DeepSeek-V3's absorbed MLA decode reads wkv_b's weight instead of calling it, and a mixed batch has no
    single weight: an adapter targeting wkv_b is refused at load unless `mla_decode = "expand"`.
    `effective_weight()` answers for a uniform batch and raises for a mixed one.

What differs from Punica / S-LoRA
    Their SGMV / MBGMM kernels compute each row's B A x with custom CUDA without padding to r_max and
    without materialising A[ids]; here the gather plus torch.bmm is the portable form (the same numbers,
    more memory traffic for large B). No adapter paging between host and device memory (S-LoRA's unified
    paging) and no unloading: every loaded adapter stays resident. Ids are per row, not per token, so a
    packed ragged batch (several sequences in one row) cannot mix adapters within a row.

Sources
    Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547 (SGMV).
    Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv:2311.03285.
    Wu et al. 2024, "dLoRA: Dynamically Orchestrating Requests and Adapters for LoRA LLM Serving", OSDI 2024.
    Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
    workbench/nn/lora.py (LoRALinear, the adapter folder format, the DoRA row norm).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from workbench.errors import CheckpointError, WorkbenchError
from workbench.nn.linear import Linear, linear
from workbench.nn.lora import ADAPTER_FILE, AdapterFiles, LoraConfig, LoRALinear, _row_norm, read_adapter

__all__ = ["MultiLoRALinear", "AdapterRegistry", "UnknownAdapterError", "load_adapters", "adapter_rows",
           "multi_lora_modules"]


class UnknownAdapterError(WorkbenchError):
    """A request named an adapter that is not loaded (the message lists the loaded ones)."""


# ----------------------------------------------------------------------------------------------------
# The layer


@dataclasses.dataclass(frozen=True)
class _Rows:
    ids: torch.Tensor  # (B,) long, on the layer's device
    uniform: int | None  # the one slot every row uses, or None for a mixed batch
    present: tuple[int, ...]  # the distinct slots of the batch


class MultiLoRALinear(Linear):
    """A base linear serving N adapters at once, slot 0 being none. Built by `load_adapters`; reuses the base
    module's `weight` and `bias` Parameters. Rows pick their slot through `adapter_rows(model, ids)`."""

    def __init__(self, base: nn.Linear):
        if isinstance(base, (LoRALinear, MultiLoRALinear)):
            raise ValueError("MultiLoRALinear wraps a plain linear layer")
        nn.Module.__init__(self)  # no new weight: the base Parameters are reused, state-dict keys unchanged
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype}
        # slot 0 only, rank 0, until adapters are set; buffers are not persistent: the state dict stays the base's
        self.register_buffer("lora_A", torch.zeros(1, 0, self.in_features, **kw), persistent=False)  # (N+1, r, in)
        self.register_buffer("lora_sB", torch.zeros(1, self.out_features, 0, **kw), persistent=False)  # (N+1, out, r)
        self.register_buffer("dora_factor", torch.ones(1, self.out_features, **kw), persistent=False)  # (N+1, out)
        self.ranks: list[int] = [0]  # per slot; 0 = the slot leaves this layer alone
        self.is_dora: list[bool] = [False]
        self._rows: _Rows | None = None

    @property
    def n_slots(self) -> int:
        return len(self.ranks)

    @property
    def r_max(self) -> int:
        return self.lora_A.shape[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={self.n_slots}, ranks={self.ranks}"

    @torch.no_grad()
    def grow(self, n_slots: int, r_max: int | None = None) -> None:
        """Pad the stacks to `n_slots` slots and rank `r_max` with zeros (new slots: no adapter, g = 1)."""
        r_max = max(self.r_max, r_max or 0)
        n, r = self.n_slots, self.r_max
        if n_slots < n:
            raise ValueError(f"cannot shrink a MultiLoRALinear from {n} to {n_slots} slots")
        if n_slots == n and r_max == r:
            return
        A = self.lora_A.new_zeros(n_slots, r_max, self.in_features)
        sB = self.lora_sB.new_zeros(n_slots, self.out_features, r_max)
        A[:n, :r], sB[:n, :, :r] = self.lora_A, self.lora_sB
        factor = torch.cat([self.dora_factor, self.dora_factor.new_ones(n_slots - n, self.out_features)])
        self.lora_A, self.lora_sB, self.dora_factor = A, sB, factor
        self.ranks += [0] * (n_slots - n)
        self.is_dora += [False] * (n_slots - n)

    @torch.no_grad()
    def set_adapter(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float,
                    magnitude: torch.Tensor | None = None) -> None:
        """Put one adapter's A (r, in), B (out, r), scale (and DoRA magnitude m (out,)) into `slot`."""
        if slot < 1:
            raise ValueError("slot 0 is the base model and holds no adapter")
        r = A.shape[0]
        if tuple(A.shape) != (r, self.in_features) or tuple(B.shape) != (self.out_features, r):
            raise ValueError(f"adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                             f"({self.out_features}, {self.in_features}) linear")
        self.grow(max(self.n_slots, slot + 1), r)
        w = self.weight
        A, B = A.to(w.device, w.dtype), B.to(w.device, w.dtype)
        self.lora_A[slot].zero_()
        self.lora_sB[slot].zero_()
        # sB = s B: the scale folded into B once, so no forward multiplies by it
        self.lora_A[slot, :r], self.lora_sB[slot, :, :r] = A, scale * B
        self.ranks[slot], self.is_dora[slot] = r, magnitude is not None
        if magnitude is None:
            self.dora_factor[slot] = 1.0
        else:
            # g = m / ||V||, V = W0 + s B A: LoRALinear's _magnitude_ratio, fixed because nothing trains
            norm = _row_norm(w, A, B, scale)  # (out,), fp32
            m = magnitude.to(w.device, w.dtype)
            self.dora_factor[slot] = m / norm.to(m.dtype)

    def _current_rows(self, x: torch.Tensor) -> _Rows:
        rows = self._rows
        if rows is None:
            raise RuntimeError("a forward of a model with multi-adapter layers needs the batch's adapter ids: run it "
                               "inside `with adapter_rows(model, ids):` (ids (B,) long; 0 = the base model)")
        if x.dim() < 2 or x.shape[0] != rows.ids.shape[0]:
            raise ValueError(f"adapter_rows set {rows.ids.shape[0]} row ids but this layer's input has shape "
                             f"{tuple(x.shape)}: multi-adapter layers need the batch first (B, ..., in)")
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._current_rows(x)
        if rows.uniform is not None:
            a = rows.uniform
            r = self.ranks[a]
            if r == 0:  # the base model, or an adapter that leaves this layer alone
                return linear(x, self.weight, self.bias)
            # s B_a A_a x                                                  (..., r) -> (..., out)
            delta = linear(linear(x, self.lora_A[a, :r]), self.lora_sB[a, :, :r])
            if not self.is_dora[a]:
                # y = W0 x + b + s B A x
                return linear(x, self.weight, self.bias) + delta
            # y = g (W0 x + s B A x) + b
            y = self.dora_factor[a] * (linear(x, self.weight) + delta)
            return y if self.bias is None else y + self.bias
        r = max(self.ranks[a] for a in rows.present)
        if r == 0:
            return linear(x, self.weight, self.bias)
        ids = rows.ids
        Bn = x.shape[0]
        x3 = x.reshape(Bn, -1, self.in_features)  # (B, T, in)
        A = self.lora_A[ids, :r]  # (B, r, in)
        sB = self.lora_sB[ids, :, :r]  # (B, out, r)
        # s_a B_a A_a x per row: (B, T, in) x (B, in, r) -> (B, T, r) x (B, r, out) -> (B, T, out)
        delta = torch.bmm(torch.bmm(x3, A.transpose(1, 2)), sB.transpose(1, 2))
        # y = W0 x + s_a B_a A_a x                  (B, T, out)
        y = linear(x3, self.weight) + delta
        if any(self.is_dora[a] for a in rows.present):
            # y = g_a (W0 x + s_a B_a A_a x)        (g = 1 on LoRA rows and base rows)
            y = y * self.dora_factor[ids][:, None, :]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the layer applies to every row, for code that reads weights instead of calling
        the module; only defined when every row uses one slot (a mixed batch has one weight per row)."""
        rows = self._rows
        if rows is None or rows.uniform is None:
            raise RuntimeError("effective_weight of a multi-adapter layer needs every row on one adapter "
                               + ("(no adapter_rows set)" if rows is None else f"(this batch uses slots {rows.present})"))
        a = rows.uniform
        r = self.ranks[a]
        if r == 0:
            return self.weight
        # V = W0 + s B A
        V = self.weight + self.lora_sB[a, :, :r] @ self.lora_A[a, :r]
        return self.dora_factor[a][:, None] * V if self.is_dora[a] else V


def multi_lora_modules(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    """(path, module) of every MultiLoRALinear in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, MultiLoRALinear):
            yield name, m


# ----------------------------------------------------------------------------------------------------
# Per-forward row ids


@contextlib.contextmanager
def adapter_rows(model: nn.Module, ids: torch.Tensor | Sequence[int]) -> Iterator[nn.Module]:
    """Every forward of `model` inside the block serves batch row b with adapter slot ids[b] (0 = the base
    model). ids: (B,) integer tensor (or a list); slots come from `AdapterRegistry.id_of`. Nests (the outer
    ids come back on exit) and stores the ids on this model's layers only."""
    layers = [m for _, m in multi_lora_modules(model)]
    if not layers:
        raise ValueError("adapter_rows: this model has no multi-adapter layers (call load_adapters first)")
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"adapter_rows: ids must be a 1-D integer tensor, one slot per batch row; got dtype "
                         f"{ids.dtype} and shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("adapter_rows: ids is empty (one slot per batch row expected)")
    slots = ids.tolist()  # one host sync per forward: bounds, the uniform path, each layer's rank bound
    n = layers[0].n_slots
    bad = [s for s in slots if not 0 <= s < n]
    if bad:
        raise ValueError(f"adapter_rows: slot {bad[0]} is out of range: this model has {n} slots (0 = base model, "
                         f"1..{n - 1} = the loaded adapters)")
    present = tuple(sorted(set(slots)))
    rows = _Rows(ids=ids.to(layers[0].weight.device, torch.long), uniform=present[0] if len(present) == 1 else None,
                 present=present)
    before = [m._rows for m in layers]
    for m in layers:
        m._rows = rows
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m._rows = b


# ----------------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class AdapterRegistry:
    """Adapter name -> slot id (1..N; 0 is the base model), with each adapter's config and folder."""

    slots: dict[str, int] = dataclasses.field(default_factory=dict)
    configs: dict[str, LoraConfig] = dataclasses.field(default_factory=dict)
    folders: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The loaded adapters in slot order (names[i] has slot i + 1)."""
        return sorted(self.slots, key=self.slots.__getitem__)

    def __len__(self) -> int:
        return len(self.slots)

    def id_of(self, name: str | None) -> int:
        """The slot of adapter `name`; None (no adapter) is 0, the base model."""
        if name is None:
            return 0
        if name not in self.slots:
            known = ", ".join(repr(n) for n in self.names) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r} (loaded adapters: {known})")
        return self.slots[name]

    def ids(self, names: Sequence[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """(B,) long slot ids of per-row adapter names (None = the base model), for `adapter_rows`."""
        return torch.tensor([self.id_of(n) for n in names], dtype=torch.long, device=device)


def _family_of(model: nn.Module) -> str | None:
    from workbench.models.base import FAMILIES

    module = type(model).__module__
    return next((name for name, path in FAMILIES.items() if path == module), None)


def _check(model: nn.Module, name: str, files: AdapterFiles) -> None:
    """Refuse an adapter whose modules or tensors do not fit `model` (CheckpointError naming what and why)."""
    where = f"adapter {name!r} ({files.folder})"
    tensor_file = files.folder / ADAPTER_FILE
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    for path in files.modules:
        if path not in linears:
            try:
                model.get_submodule(path)
            except AttributeError:
                some = ", ".join(list(linears)[:4]) + (", ..." if len(linears) > 4 else "")
                raise CheckpointError(f"{where} targets module {path}, which this model lacks (its linear layers "
                                      f"include: {some}): an adapter of a different base model?") from None
            raise CheckpointError(f"{where} targets module {path}, which is not a linear layer in this model")
    matched = [p for p in linears if any(fnmatch.fnmatchcase(p, t) for t in files.cfg.targets)]
    if set(matched) != set(files.modules):
        extra = sorted(set(matched) ^ set(files.modules))
        raise CheckpointError(f"{where}: its targets {files.cfg.targets} match other modules in this model than it "
                              f"was saved on (e.g. {extra[:3]}): a different base model?")
    keys = ("lora_A", "lora_B") + (("lora_magnitude",) if files.cfg.dora else ())
    expected = {f"{p}.{k}" for p in files.modules for k in keys}
    missing, unexpected = sorted(expected - set(files.state)), sorted(set(files.state) - expected)
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing from {tensor_file} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]} in {tensor_file} "
                              f"(lora.dora = {str(files.cfg.dora).lower()}; {len(unexpected)} unexpected)")
    r = files.cfg.r
    for path in files.modules:
        lin = linears[path]
        want = {"lora_A": (r, lin.in_features), "lora_B": (lin.out_features, r), "lora_magnitude": (lin.out_features,)}
        for k in keys:
            got = tuple(files.state[f"{path}.{k}"].shape)
            if got != want[k]:
                raise CheckpointError(f"{where}: tensor {path}.{k} has shape {got}, this model's "
                                      f"({lin.out_features}, {lin.in_features}) layer {path} with r = {r} needs {want[k]}")
    if getattr(getattr(model, "cfg", None), "mla_decode", None) == "absorb":
        absorbed = [p for p in files.modules if p.rpartition(".")[2] == "wkv_b"]
        if absorbed:
            raise CheckpointError(f"{where} adapts {absorbed[0]}, whose weight the absorbed MLA decode reads directly "
                                  f"(one weight for the whole batch): build the model with mla_decode = \"expand\" "
                                  f"to serve it in mixed batches")


def load_adapters(model: nn.Module, adapters: dict[str, str | Path], *,
                  tokenizer: str | Path | None = None) -> AdapterRegistry:
    """Load the adapter folders `{name: folder}` (adapter.safetensors + adapter_config.json, as `save_adapter`
    writes them) into `model` for multi-adapter serving; returns the registry (also `model.adapter_registry`).

    Every targeted linear becomes a MultiLoRALinear. Each folder is checked before anything changes: the recorded
    base family (and, given the base's `tokenizer` json, its sha256), the target modules, tensor names and shapes;
    any failure raises CheckpointError naming the adapter and the file or tensor, and leaves the model as it was.
    A second call adds adapters to the same registry."""
    from workbench.checkpoint.load import check_adapter_base

    if not adapters:
        raise ValueError("load_adapters: no adapters given (expected {name: folder})")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("load_adapters: this model has a training LoRA adapter (LoRALinear); merge_and_unload it "
                         "first, so the merged model is the base the adapters are served on")
    registry: AdapterRegistry = getattr(model, "adapter_registry", None) or AdapterRegistry()
    family = _family_of(model)
    tok = Path(tokenizer) if tokenizer is not None else None
    loaded: list[tuple[str, AdapterFiles]] = []
    for name, folder in adapters.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"load_adapters: adapter names must be non-empty strings, got {name!r}")
        if name in registry.slots:
            raise ValueError(f"load_adapters: an adapter named {name!r} is loaded already (slot {registry.slots[name]})")
        files = read_adapter(folder)
        if family is not None:
            check_adapter_base(files.folder, family, tok)
        _check(model, name, files)
        loaded.append((name, files))

    # everything fits: convert the targeted linears and fill the slots
    first = len(registry) + 1
    for i, (name, files) in enumerate(loaded):
        slot = first + i
        for path in files.modules:
            layer = model.get_submodule(path)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer)
                parent, _, attr = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, layer)
            st = files.state
            layer.set_adapter(slot, st[f"{path}.lora_A"], st[f"{path}.lora_B"], files.cfg.scale,
                              st.get(f"{path}.lora_magnitude"))
        registry.slots[name], registry.configs[name], registry.folders[name] = slot, files.cfg, files.folder
    n_slots = len(registry) + 1
    for _, layer in multi_lora_modules(model):
        layer.grow(n_slots)  # layers that some adapters skip hold zeros in those slots
    model.adapter_registry = registry
    return registry
