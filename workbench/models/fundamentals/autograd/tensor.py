"""A NumPy-backed tensor with reverse-mode automatic differentiation.

What it is
    `Tensor` wraps a NumPy array. Every operation on tensors that need gradients records a node: the output
    remembers its inputs (`_parents`) and a function (`_backward`) that maps the gradient of the final
    scalar with respect to the output to the gradients with respect to each input. `loss.backward()` then
    walks that graph once, from the loss back to the leaves, and leaves the gradients in `.grad`.

The math
    For a scalar loss L and a node y = f(x_1, ..., x_k), the chain rule gives the vector-Jacobian product
        dL/dx_i = (dy/dx_i)^T dL/dy
    Each op's `_backward` computes exactly that product for its own f, without ever forming the Jacobian
    (for y = a @ b: dL/da = dL/dy @ b^T, dL/db = a^T @ dL/dy). When a tensor feeds several nodes, its
    gradient is the sum of what each consumer sends back (the multivariate chain rule), so `backward`
    adds contributions before passing a node's gradient on.

    Broadcasting: if a of shape (3, 1) and b of shape (4,) give y of shape (3, 4), each element of a was
    copied along the broadcast axes, and the gradient of a copy is the sum over the copies:
        dL/da = sum over the broadcast axes of dL/dy, reduced back to a's shape (`unbroadcast`).

The intuition and the design choices
    Order: a node's gradient is complete only after every consumer has contributed. A topological order of
        the graph (every node after its inputs) read backwards guarantees that. It is computed with an
        explicit stack (iterative depth-first search, post-order), so a graph thousands of ops deep does
        not hit Python's recursion limit.
    Leaves: as in PyTorch, `.grad` is filled (and accumulated across `backward` calls) only on leaf
        tensors created with `requires_grad=True`; intermediate gradients live in a dict during the walk
        and are dropped afterwards.
    No-grad mode: inside `with no_grad():` operations build no graph (evaluation, optimizer updates).
    dtype: Python numbers and integer or bool arrays become float64 (the default; exact enough for finite-
        difference checks); a float32 array stays float32, and Python scalars combined with a tensor take
        the tensor's dtype, so a float32 model stays float32 for speed. Indexing takes NumPy integer arrays
        and boolean masks, never a float tensor (it cannot tell a converted mask from indices).
    Ties in `max`: the gradient is split evenly between tied maxima (as torch.amax does); conv / pool ops
        with their own backward live in `functional.py`.

What differs from PyTorch
    No views or in-place ops on graph tensors, no higher-order gradients (backward functions use NumPy,
    not tensors), the graph is kept after `backward` (a second call accumulates again), CPU only.

Sources
    Baydin et al., "Automatic differentiation in machine learning: a survey", JMLR 2018 (reverse mode);
    Karpathy's micrograd (the scalar version of the same idea); PyTorch autograd semantics
    (https://pytorch.org/docs/stable/notes/autograd.html) for leaf accumulation and no_grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "unbroadcast", "make_node", "DEFAULT_DTYPE"]

DEFAULT_DTYPE = np.float64
_GRAD_ENABLED = True

Backward = Callable[[np.ndarray], tuple[np.ndarray | None, ...]]


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Operations inside build no graph (for evaluation and parameter updates)."""
    global _GRAD_ENABLED
    previous, _GRAD_ENABLED = _GRAD_ENABLED, False
    try:
        yield
    finally:
        _GRAD_ENABLED = previous


def is_grad_enabled() -> bool:
    return _GRAD_ENABLED


def _as_array(data: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(data, Tensor):
        data = data.data
    arr = np.asarray(data, dtype=dtype)
    if dtype is None and not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(DEFAULT_DTYPE)
    return arr


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` over the axes that broadcasting added or stretched, giving an array of `shape`."""
    if grad.shape == shape:
        return grad
    # axes broadcasting prepended: (extra..., *shape) -> shape
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    # axes of size 1 in `shape` that were stretched: keep them as size 1
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _normalize_axes(axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:  # a 0-d tensor has no axis 0, as in NumPy (torch accepts 0 and -1)
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes))


def make_node(data: np.ndarray, parents: tuple[Tensor, ...], backward: Backward, op: str) -> Tensor:
    """The output tensor of an op: it records `parents` and `backward` only when a gradient can flow."""
    out = Tensor.__new__(Tensor)
    out.data = np.asarray(data)
    out.grad = None
    out.requires_grad = False
    out._parents = ()
    out._backward = None
    out.op = op
    if _GRAD_ENABLED and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
    return out


class Tensor:
    """An n-dimensional array that can record the operations applied to it and differentiate through them."""

    __array_priority__ = 1000  # ndarray <op> Tensor defers to Tensor's reflected operator

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None):
        self.data: np.ndarray = _as_array(data, dtype)
        if requires_grad and not np.issubdtype(self.data.dtype, np.floating):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.data.dtype}")
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self._parents: tuple[Tensor, ...] = ()
        self._backward: Backward | None = None
        self.op = ""

    # ------------------------------------------------------------------------------------------------
    # plumbing

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = f", requires_grad=True, op={self.op!r}" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def _lift(self, other: Any) -> Tensor:
        """A Python number or array as a constant tensor of this tensor's dtype."""
        if isinstance(other, Tensor):
            return other
        return Tensor(np.asarray(other, dtype=self.data.dtype))

    # ------------------------------------------------------------------------------------------------
    # backward

    def _topological_order(self) -> list[Tensor]:
        """Every node that needs a gradient, each after all of its inputs (iterative post-order DFS)."""
        order: list[Tensor] = []
        seen: set[int] = set()
        stack: list[tuple[Tensor, bool]] = [(self, False)]
        while stack:
            node, inputs_done = stack.pop()
            if inputs_done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in seen)
        return order

    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf with requires_grad.

        `grad` is dL/d(self); it may be left out only when self holds a single element (then 1)."""
        if not self.requires_grad:
            raise RuntimeError("backward() needs a tensor that requires grad (is any input requires_grad=True, "
                               "and was it computed outside no_grad()?)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-element tensor, got shape "
                                   f"{self.shape}; pass grad= of that shape")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.data.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): grad has shape {grad.shape}, the tensor has shape {self.shape}")
        grads: dict[int, np.ndarray] = {id(self): grad}
        for node in reversed(self._topological_order()):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf: accumulate, as PyTorch does
                g = np.array(g, dtype=node.data.dtype)  # a copy: g may be a read-only broadcast view
                node.grad = g if node.grad is None else node.grad + g
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                # dL/dx = sum over the consumers of x (the multivariate chain rule)
                grads[id(parent)] = grads[id(parent)] + pg if id(parent) in grads else pg

    # ------------------------------------------------------------------------------------------------
    # elementwise arithmetic (broadcasting)

    def __add__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        # y = a + b:  dy/da = dy/db = 1
        return make_node(a.data + b.data, (a, b),
                         lambda g: (unbroadcast(g, a.shape), unbroadcast(g, b.shape)), "add")

    __radd__ = __add__

    def __sub__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        # y = a - b:  dy/da = 1, dy/db = -1
        return make_node(a.data - b.data, (a, b),
                         lambda g: (unbroadcast(g, a.shape), unbroadcast(-g, b.shape)), "sub")

    def __rsub__(self, other: Any) -> Tensor:
        return self._lift(other) - self

    def __neg__(self) -> Tensor:
        # y = -a:  dy/da = -1
        return make_node(-self.data, (self,), lambda g: (-g,), "neg")

    def __mul__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        # y = a b:  dy/da = b, dy/db = a
        return make_node(a.data * b.data, (a, b),
                         lambda g: (unbroadcast(g * b.data, a.shape), unbroadcast(g * a.data, b.shape)), "mul")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        # y = a / b:  dy/da = 1 / b, dy/db = -a / b^2
        return make_node(a.data / b.data, (a, b),
                         lambda g: (unbroadcast(g / b.data, a.shape),
                                    unbroadcast(-g * a.data / (b.data * b.data), b.shape)), "div")

    def __rtruediv__(self, other: Any) -> Tensor:
        return self._lift(other) / self

    def __pow__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        out = a.data ** b.data

        def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
            # y = a^b:  dy/da = b a^(b-1)
            ga = unbroadcast(g * b.data * a.data ** (b.data - 1), a.shape)
            # dy/db = a^b ln a  (needs a > 0; only computed when the exponent needs a gradient)
            gb = unbroadcast(g * out * np.log(a.data), b.shape) if b.requires_grad else None
            return ga, gb

        return make_node(out, (a, b), backward, "pow")

    def __rpow__(self, other: Any) -> Tensor:
        return self._lift(other) ** self

    # ------------------------------------------------------------------------------------------------
    # matrix product

    def __matmul__(self, other: Any) -> Tensor:
        return matmul(self, self._lift(other))

    def __rmatmul__(self, other: Any) -> Tensor:
        return matmul(self._lift(other), self)

    # ------------------------------------------------------------------------------------------------
    # reductions

    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        axes = _normalize_axes(axis, self.ndim)
        shape = self.shape

        def backward(g: np.ndarray) -> tuple[np.ndarray]:
            # y = sum_i a_i:  dy/da_i = 1, so every summed element receives g (re-expanded, then broadcast)
            if not keepdims:
                g = np.expand_dims(g, axes)
            return (np.broadcast_to(g, shape),)

        return make_node(self.data.sum(axis=axes, keepdims=keepdims), (self,), backward, "sum")

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        axes = _normalize_axes(axis, self.ndim)
        count = int(np.prod([self.shape[a] for a in axes])) if axes else 1
        # mean = sum / n, built from sum and mul so no backward of its own is needed
        return self.sum(axes, keepdims) * (1.0 / count)

    def max(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        axes = _normalize_axes(axis, self.ndim)
        kept = self.data.max(axis=axes, keepdims=True)
        shape = self.shape

        def backward(g: np.ndarray) -> tuple[np.ndarray]:
            # dy/da_i = 1 where a_i is the maximum, 0 elsewhere; ties share the gradient evenly
            if not keepdims:
                g = np.expand_dims(g, axes)
            winners = self.data == kept
            return (np.broadcast_to(g, shape) * winners / winners.sum(axis=axes, keepdims=True),)

        out = kept if keepdims else np.squeeze(kept, axis=axes)
        return make_node(out, (self,), backward, "max")

    # ------------------------------------------------------------------------------------------------
    # elementwise functions

    def exp(self) -> Tensor:
        out = np.exp(self.data)
        # d exp(a) / da = exp(a)
        return make_node(out, (self,), lambda g: (g * out,), "exp")

    def log(self) -> Tensor:
        # d ln(a) / da = 1 / a
        return make_node(np.log(self.data), (self,), lambda g: (g / self.data,), "log")

    def relu(self) -> Tensor:
        # d max(a, 0) / da = 1[a > 0]   (0 at a = 0, as PyTorch)
        return make_node(np.maximum(self.data, 0), (self,), lambda g: (g * (self.data > 0),), "relu")

    def tanh(self) -> Tensor:
        out = np.tanh(self.data)
        # d tanh(a) / da = 1 - tanh(a)^2
        return make_node(out, (self,), lambda g: (g * (1 - out * out),), "tanh")

    def sigmoid(self) -> Tensor:
        # s = 1 / (1 + e^-a) = exp(-log(1 + e^-a)); logaddexp never overflows for large |a|
        out = np.exp(-np.logaddexp(0, -self.data))
        # ds/da = s (1 - s)
        return make_node(out, (self,), lambda g: (g * out * (1 - out),), "sigmoid")

    # ------------------------------------------------------------------------------------------------
    # shape

    def reshape(self, *shape: int | tuple[int, ...]) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        original = self.shape
        try:
            out = self.data.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {original} ({self.size} elements) "
                             f"into {tuple(shape)}") from None
        # reshaping moves no values: the gradient is reshaped back
        return make_node(out, (self,), lambda g: (g.reshape(original),), "reshape")

    def transpose(self, *axes: int) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        perm = tuple(axes) if axes else tuple(reversed(range(self.ndim)))
        if sorted(a % max(self.ndim, 1) for a in perm) != list(range(self.ndim)):
            raise ValueError(f"transpose: {perm} is not a permutation of the {self.ndim} axes of shape {self.shape}")
        inverse = tuple(np.argsort([a % self.ndim for a in perm]))
        # y = a permuted; the gradient is permuted back by the inverse permutation
        return make_node(self.data.transpose(perm), (self,), lambda g: (g.transpose(inverse),), "transpose")

    @property
    def T(self) -> Tensor:
        return self.transpose()

    def __getitem__(self, index: Any) -> Tensor:
        index = _plain_index(index)
        shape, dtype = self.shape, self.data.dtype

        def backward(g: np.ndarray) -> tuple[np.ndarray]:
            # y = a[index] picks elements; each picked element gets its gradient back, and an element picked
            # several times (repeated integer indices) gets the sum: an unbuffered scatter-add (a boolean
            # mask scatters to its True positions, in the order a[mask] read them)
            grad = np.zeros(shape, dtype=dtype)
            np.add.at(grad, index, g)
            return (grad,)

        return make_node(self.data[index], (self,), backward, "getitem")

    # ------------------------------------------------------------------------------------------------
    # activations and losses as methods (implemented in functional)

    def softmax(self, axis: int = -1) -> Tensor:
        from workbench.models.fundamentals.autograd.functional import softmax
        return softmax(self, axis)

    def log_softmax(self, axis: int = -1) -> Tensor:
        from workbench.models.fundamentals.autograd.functional import log_softmax
        return log_softmax(self, axis)


def _plain_index(index: Any) -> Any:
    """An index with any Tensor inside replaced by its array, for NumPy's indexing rules.

    Integer arrays pick elements (repeats allowed) and boolean arrays are masks (NumPy and lists of
    bools stay boolean). A float Tensor is refused: `Tensor` turns Python ints and bools into float64, so
    Tensor([True, False]) and Tensor([1, 0]) hold the same numbers and neither can be read back safely;
    index with the NumPy array, a list, or a Tensor made with an integer or bool dtype instead.
    """
    if isinstance(index, tuple):
        return tuple(_plain_index(i) for i in index)
    if isinstance(index, Tensor):
        if not (np.issubdtype(index.dtype, np.integer) or index.dtype == np.bool_):
            raise TypeError(f"index: a Tensor of dtype {index.dtype} cannot index (Tensor() stores ints and bools "
                            f"as float64); pass the NumPy integer / bool array, or Tensor(..., dtype=np.int64 or bool)")
        return index.data
    if isinstance(index, list):
        return np.asarray(index)
    return index


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with NumPy's rules: 1-D operands are promoted to a row / a column, leading axes broadcast."""
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: both operands need at least one dimension, got shapes {a.shape} and {b.shape}")
    if a.ndim == 1 and b.ndim == 1:
        return (a.reshape(1, -1) @ b.reshape(-1, 1)).reshape(())
    if a.ndim == 1:  # (K,) @ (..., K, N) -> (..., N)
        out = a.reshape(1, -1) @ b
        return out.reshape(out.shape[:-2] + out.shape[-1:])
    if b.ndim == 1:  # (..., M, K) @ (K,) -> (..., M)
        return (a @ b.reshape(-1, 1)).reshape(a.shape[:-1])
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align: the last axis of the first "
                         f"({a.shape[-1]}) must equal the second-to-last axis of the second ({b.shape[-2]})")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} have batch axes {a.shape[:-2]} and "
                         f"{b.shape[:-2]} that do not broadcast") from None

    def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Y = A B:  dL/dA = dL/dY B^T,  dL/dB = A^T dL/dY   (then summed over broadcast batch axes)
        ga = unbroadcast(g @ np.swapaxes(b.data, -1, -2), a.shape)
        gb = unbroadcast(np.swapaxes(a.data, -1, -2) @ g, b.shape)
        return ga, gb

    return make_node(a.data @ b.data, (a, b), backward, "matmul")
