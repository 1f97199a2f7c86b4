"""Layers for the NumPy autograd engine: Module, Parameter, Linear, Conv2d, MaxPool2d, Flatten, Sequential,
and the two classifiers the digits task trains (an MLP and a small CNN).

What it is
    A miniature torch.nn. A `Module` finds its parameters by walking its attributes (parameters, sub-modules
    and lists of sub-modules), so a model declares layers as attributes and gets `parameters()`,
    `state_dict()`, `train()` / `eval()` and `zero_grad()` without registering anything.

The math
    Linear:  y = x W^T + b,        W (out, in), b (out,)                     (PyTorch's layout)
    Conv2d:  y = conv2d(x, w) + b, w (O, C, k, k), b (O,)                    (see functional.conv2d)
    Initialization (PyTorch's default for both layers): W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        fan_in = in for Linear and C k k for Conv2d; it keeps the output variance close to the input's
        when the inputs are of unit scale.

The intuition and the design choices
    Parameters are `Parameter` tensors (leaves that require gradients); anything else stored on a module is
    invisible to the optimizer. Names in `state_dict` are dotted attribute paths ("net.0.weight"), the
    same scheme as PyTorch, so a checkpoint is a flat dict of arrays.
    `load_state_dict` copies into the existing arrays, so an optimizer built before loading still holds
    the right parameters; missing, unexpected or mis-shaped entries are errors that name them.
    Each layer takes a NumPy generator (initialization and dropout are reproducible from a seed; the models
    take a separate `dropout_rng` so that its state alone can be checkpointed) and a
    dtype (float64 for gradient checks, float32 to train faster). Initialization is in one
    `init_weights(rng)` per layer.

What differs from PyTorch
    No buffers, hooks or devices; `train()` / `eval()` matter only for Dropout (there is no batch norm).

Sources
    PyTorch torch.nn.Linear / Conv2d reset_parameters (kaiming_uniform with a = sqrt(5), which reduces to the
    bound above); LeCun et al., "Gradient-based learning applied to document recognition", 1998 (the
    conv-pool-conv-pool-linear layout of the small CNN).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from workbench.models.fundamentals.autograd import functional as F
from workbench.models.fundamentals.autograd.tensor import Tensor

__all__ = ["Parameter", "Module", "Linear", "Conv2d", "MaxPool2d", "Flatten", "ReLU", "Dropout", "Sequential",
           "MLP", "SmallCNN"]


class Parameter(Tensor):
    """A leaf tensor that requires a gradient: what `Module.parameters()` returns."""

    def __init__(self, data: Any, dtype: Any = None):
        super().__init__(data, requires_grad=True, dtype=dtype)


class Module:
    """Base class: parameters and sub-modules are found by walking the instance's attributes."""

    training: bool = True

    def forward(self, *args: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any) -> Tensor:
        return self.forward(*args)

    def _children(self) -> Iterator[tuple[str, Any]]:
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, (Parameter, Module)):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:  # depth-first, in attribute order
            path, module = stack.pop(0)
            children = []
            for name, value in module._children():
                if isinstance(value, Parameter):
                    if id(value) not in seen:  # a shared parameter is listed once
                        seen.add(id(value))
                        yield path + name, value
                else:
                    children.append((f"{path}{name}.", value))
            stack[:0] = children

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator[Module]:
        yield self
        for _, value in self._children():
            if isinstance(value, Module):
                yield from value.modules()

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = dict(self.named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in own.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"load_state_dict: '{name}' has shape {value.shape}, the model expects {p.shape}")
            p.data[...] = value  # in place: optimizers keep pointing at the same arrays

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], bound: float, dtype: Any) -> Parameter:
    return Parameter(rng.uniform(-bound, bound, size=shape).astype(dtype))


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rng: np.random.Generator, dtype: Any = np.float64):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.use_bias = bias
        self.init_weights(rng)

    def init_weights(self, rng: np.random.Generator) -> None:
        # W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / np.sqrt(self.in_features)
        self.weight = _uniform(rng, (self.out_features, self.in_features), bound, self.dtype)
        self.bias = _uniform(rng, (self.out_features,), bound, self.dtype) if self.use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}): input's last axis is "
                             f"{x.shape[-1]} (shape {x.shape}), expected {self.in_features}")
        # y = x W^T + b
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class Conv2d(Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, *, rng: np.random.Generator, dtype: Any = np.float64):
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.use_bias, self.dtype = stride, padding, bias, dtype
        self.init_weights(rng)

    def init_weights(self, rng: np.random.Generator) -> None:
        k = self.kernel_size
        # w, b ~ U(-1/sqrt(C k k), 1/sqrt(C k k))
        bound = 1.0 / np.sqrt(self.in_channels * k * k)
        self.weight = _uniform(rng, (self.out_channels, self.in_channels, k, k), bound, self.dtype)
        self.bias = _uniform(rng, (self.out_channels,), bound, self.dtype) if self.use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class MaxPool2d(Module):
    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class Flatten(Module):
    def forward(self, x: Tensor) -> Tensor:
        # (N, C, H, W) -> (N, C H W)
        return x.reshape(x.shape[0], -1)


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


class Dropout(Module):
    def __init__(self, p: float, *, rng: np.random.Generator):
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p}")
        self.p, self.rng = p, rng

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.rng, self.training)


class Sequential(Module):
    def __init__(self, *layers: Module):
        self.layers = list(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


class MLP(Module):
    """Flatten, then [Linear -> ReLU (-> Dropout)] per hidden size, then a Linear to the classes."""

    def __init__(self, in_features: int, hidden: list[int], n_classes: int, *, dropout: float = 0.0,
                 rng: np.random.Generator, dropout_rng: np.random.Generator | None = None, dtype: Any = np.float64):
        layers: list[Module] = [Flatten()]
        width = in_features
        for h in hidden:
            layers += [Linear(width, h, rng=rng, dtype=dtype), ReLU()]
            if dropout:
                layers.append(Dropout(dropout, rng=dropout_rng or rng))
            width = h
        layers.append(Linear(width, n_classes, rng=rng, dtype=dtype))
        self.net = Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(Module):
    """[Conv(k, padding k//2) -> ReLU -> MaxPool(2)] per channel count, then Flatten (-> Dropout) -> Linear.

    Each block keeps the spatial size through the padded convolution and halves it in the pool, so an
    H x W image leaves the last of B blocks as (channels[-1], H / 2^B, W / 2^B) (floored at each pool)."""

    def __init__(self, in_channels: int, image_size: int, channels: list[int], n_classes: int, *,
                 kernel_size: int = 3, dropout: float = 0.0, rng: np.random.Generator,
                 dropout_rng: np.random.Generator | None = None, dtype: Any = np.float64):
        layers: list[Module] = []
        c, size = in_channels, image_size
        for out in channels:
            if size < 2:
                raise ValueError(f"SmallCNN: {len(channels)} pooling blocks shrink a {image_size}px image "
                                 f"below 1px; use fewer channels entries")
            layers += [Conv2d(c, out, kernel_size, padding=kernel_size // 2, rng=rng, dtype=dtype), ReLU(),
                       MaxPool2d(2)]
            c, size = out, size // 2
        layers.append(Flatten())
        if dropout:
            layers.append(Dropout(dropout, rng=dropout_rng or rng))
        # (N, C_last, size, size) -> (N, C_last size size) -> (N, classes)
        layers.append(Linear(c * size * size, n_classes, rng=rng, dtype=dtype))
        self.net = Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
