"""Composite operations for the NumPy autograd engine: softmax, cross-entropy, conv2d, max-pool, dropout.

What it is
    The operations a classifier needs on top of the primitives in `tensor.py`. Softmax and log-softmax have
    a backward of their own (cheaper and more stable than differentiating exp / sum / div separately);
    cross-entropy is built from log-softmax, integer indexing and a mean, so its gradient comes for free;
    conv2d and max-pool each lower to one big matrix operation through im2col and carry a backward that
    scatters gradients back through col2im.

The math
    softmax:      s_i = exp(x_i - m) / sum_j exp(x_j - m),   m = max_j x_j  (the shift cancels; no overflow)
                  dL/dx = s * (g - sum_j g_j s_j)
    log_softmax:  l_i = (x_i - m) - log sum_j exp(x_j - m)
                  dL/dx = g - softmax(x) * sum_j g_j
    cross-entropy for logits z (N, K) and labels y (N,):  L = -(1/N) sum_n log_softmax(z_n)[y_n]
    conv2d (NCHW, weight (O, C, kh, kw), stride s, zero padding p):
        out[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * xpad[n, c, s i + u, s j + v]
        Ho = (H + 2p - kh) // s + 1, Wo likewise.
    im2col: gather every receptive field into a column, cols (C kh kw, N Ho Wo); then
        out = W @ cols  with W = w reshaped (O, C kh kw);     one GEMM instead of seven nested loops
        dL/dW = dout @ cols^T,  dL/db = sum of dout,  dL/dcols = W^T @ dout      (dout as (O, N Ho Wo))
        col2im adds each column of dL/dcols back onto the input pixels it was read from (a pixel read by
        several overlapping windows receives the sum).
    max-pool (kernel k, stride s): out[n, c, i, j] = max_{u, v < k} xpad[n, c, s i + u, s j + v]; the
        gradient goes to the arg-max of each window (the first one on ties, as PyTorch's kernel does).

The intuition and the design choices
    im2col is built by kh * kw strided slices (each slice is "pixel (u, v) of every window at once"), not
    by N Ho Wo window copies: the Python loop has kh * kw iterations whatever the image size, and col2im is
    the same loop with `+=`, so the two are visibly each other's adjoint.
    Layout: channel-major, (C, kh, kw, N, Ho, Wo), with the input turned to (C, N, H, W) once. Then the
    columns matrix is a free reshape, every slice the loops write or add is one contiguous (N, Ho, Wo)
    block per channel, and the only transposes left are of the input and the output. (The batch-major
    layout (N Ho Wo, C kh kw) is what many write first; with its kh kw axes in the middle, col2im scatters
    small strided pieces: a conv + pool forward and backward at batch 128 took a third longer with it.)
    Max-pool pads with -inf (a padded cell never wins) and reuses the same window gathering.
    Dropout draws its mask from a caller-owned generator, so a seeded run is reproducible.

What differs from PyTorch
    No dilation, groups, or non-square padding; max-pool has no ceil_mode. cross_entropy takes integer
    labels only (no probabilities, no label smoothing, no ignore index) and averages over the batch.

Sources
    Chellapilla, Puri, Simard, "High Performance Convolutional Neural Networks for Document Processing",
    2006 (convolution as matrix product via unrolling); Stanford CS231n notes on im2col;
    torch.nn.functional.conv2d / max_pool2d documentation for the shape conventions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.models.fundamentals.autograd.tensor import Tensor, make_node

__all__ = ["softmax", "log_softmax", "cross_entropy", "relu", "tanh", "sigmoid", "conv2d", "max_pool2d",
           "dropout", "im2col", "col2im", "conv_output_size"]


def relu(x: Tensor) -> Tensor:
    return x.relu()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    # s = exp(x - max x) / sum exp(x - max x): the shift makes every exponent <= 0
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    s = e / e.sum(axis=axis, keepdims=True)
    # dL/dx = s * (g - sum_j g_j s_j)
    return make_node(s, (x,), lambda g: (s * (g - (g * s).sum(axis=axis, keepdims=True)),), "softmax")


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    # l = (x - m) - log sum exp(x - m): the log-sum-exp trick, finite for any finite logits
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    # dL/dx = g - softmax(x) * sum_j g_j,  softmax(x) = exp(l)
    return make_node(out, (x,), lambda g: (g - np.exp(out) * g.sum(axis=axis, keepdims=True),), "log_softmax")


def cross_entropy(logits: Tensor, labels: Any) -> Tensor:
    """Mean negative log-likelihood of integer `labels` (N,) under `logits` (N, K)."""
    y = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, K), got shape {logits.shape}")
    if y.shape != (logits.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"cross_entropy: labels must be integers of shape ({logits.shape[0]},), "
                         f"got {y.dtype} of shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(f"cross_entropy: labels must lie in [0, {logits.shape[1]}), got {y.min()}..{y.max()}")
    # L = -(1/N) sum_n log_softmax(z_n)[y_n]: built from log_softmax, integer indexing and mean
    return -log_softmax(logits, axis=1)[np.arange(len(y)), y].mean()


# ----------------------------------------------------------------------------------------------------
# im2col / col2im


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    # Ho = (H + 2p - k) // s + 1
    return (size + 2 * padding - kernel) // stride + 1


def im2col(xpad: np.ndarray, kh: int, kw: int, stride: int, ho: int, wo: int) -> np.ndarray:
    """Windows of a padded (N, C, Hp, Wp) array as (C, kh, kw, N, Ho, Wo):
    cols[c, u, v, n, i, j] = xpad[n, c, s i + u, s j + v]."""
    n, c = xpad.shape[:2]
    # (N, C, Hp, Wp) -> (C, N, Hp, Wp): channel-major, so each slice below is contiguous per channel
    xt = xpad.transpose(1, 0, 2, 3)
    cols = np.empty((c, kh, kw, n, ho, wo), dtype=xpad.dtype)
    for u in range(kh):
        for v in range(kw):
            # pixel (u, v) of every window at once: a strided slice (C, N, Ho, Wo)
            cols[:, u, v] = xt[:, :, u:u + stride * ho:stride, v:v + stride * wo:stride]
    return cols


def col2im(dcols: np.ndarray, padded_shape: tuple[int, ...], stride: int) -> np.ndarray:
    """The adjoint of im2col: adds (C, kh, kw, N, Ho, Wo) window values back onto a (N, C, Hp, Wp) array."""
    c, kh, kw, n, ho, wo = dcols.shape
    # accumulate in the channel-major layout (C, N, Hp, Wp), transpose once at the end
    dx = np.zeros((c, n) + tuple(padded_shape[2:]), dtype=dcols.dtype)
    for u in range(kh):
        for v in range(kw):
            # overlapping windows read the same pixel: their gradients add
            dx[:, :, u:u + stride * ho:stride, v:v + stride * wo:stride] += dcols[:, u, v]
    # (C, N, Hp, Wp) -> (N, C, Hp, Wp)
    return dx.transpose(1, 0, 2, 3)


def _pair_check(name: str, x: Tensor, kernel: tuple[int, int], stride: int, padding: int) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"{name}: input must be (N, C, H, W), got shape {x.shape}")
    if stride < 1 or padding < 0:
        raise ValueError(f"{name}: stride must be >= 1 and padding >= 0, got stride={stride} padding={padding}")
    h, w = x.shape[2:]
    ho, wo = (conv_output_size(h, kernel[0], stride, padding), conv_output_size(w, kernel[1], stride, padding))
    if ho < 1 or wo < 1:
        raise ValueError(f"{name}: a {kernel[0]}x{kernel[1]} kernel does not fit an input of {h}x{w} "
                         f"with padding {padding}")
    return ho, wo


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0) -> Tensor:
    """2-D cross-correlation (what deep learning calls convolution), NCHW input, weight (O, C, kh, kw)."""
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be (O, C, kh, kw), got shape {weight.shape}")
    o, c, kh, kw = weight.shape
    if x.ndim == 4 and x.shape[1] != c:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels (shape {x.shape}), weight expects {c} "
                         f"(shape {weight.shape})")
    if bias is not None and bias.shape != (o,):
        raise ValueError(f"conv2d: bias must have shape ({o},), got {bias.shape}")
    ho, wo = _pair_check("conv2d", x, (kh, kw), stride, padding)
    n = x.shape[0]
    p = padding
    xpad = np.pad(x.data, ((0, 0), (0, 0), (p, p), (p, p))) if p else x.data
    # (C, kh, kw, N, Ho, Wo) -> (C kh kw, N Ho Wo): one receptive field per column (a free reshape)
    cols = im2col(xpad, kh, kw, stride, ho, wo).reshape(c * kh * kw, n * ho * wo)
    # (O, C, kh, kw) -> (O, C kh kw)
    wmat = weight.data.reshape(o, c * kh * kw)
    # out = W @ cols (+ b): (O, N Ho Wo) -> (O, N, Ho, Wo) -> (N, O, Ho, Wo)
    out = wmat @ cols
    if bias is not None:
        out = out + bias.data[:, None]
    out = out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
        # (N, O, Ho, Wo) -> (O, N, Ho, Wo) -> (O, N Ho Wo), the layout of `out` before the last transpose
        gmat = g.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)
        # dL/dW = dout @ cols^T: (O, C kh kw) -> (O, C, kh, kw)
        gw = (gmat @ cols.T).reshape(weight.shape) if weight.requires_grad else None
        # dL/db = sum of dout over batch and positions
        gb = gmat.sum(axis=1) if bias is not None and bias.requires_grad else None
        gx = None
        if x.requires_grad:
            # dL/dcols = W^T @ dout: (C kh kw, N Ho Wo) -> (C, kh, kw, N, Ho, Wo)
            dcols = (wmat.T @ gmat).reshape(c, kh, kw, n, ho, wo)
            gx = col2im(dcols, xpad.shape, stride)
            gx = gx[:, :, p:p + x.shape[2], p:p + x.shape[3]] if p else gx  # drop the padding's gradient
        return (gx, gw) if bias is None else (gx, gw, gb)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_node(out, parents, backward, "conv2d")


def max_pool2d(x: Tensor, kernel_size: int, stride: int | None = None, padding: int = 0) -> Tensor:
    """Max over k x k windows of each channel (stride defaults to the kernel size, as in PyTorch)."""
    k = kernel_size
    s = k if stride is None else stride
    if k < 1:
        raise ValueError(f"max_pool2d: kernel_size must be >= 1, got {k}")
    if padding > k // 2:
        raise ValueError(f"max_pool2d: padding must be at most half the kernel size ({k // 2}), got {padding}")
    ho, wo = _pair_check("max_pool2d", x, (k, k), s, padding)
    n, c = x.shape[:2]
    p = padding
    xpad = np.pad(x.data, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf) if p else x.data
    # (C, k, k, N, Ho, Wo) -> (C, k k, N, Ho, Wo): the k k candidates of each window on one axis
    cols = im2col(xpad, k, k, s, ho, wo).reshape(c, k * k, n, ho, wo)
    # argmax picks the first maximum on ties: (C, N, Ho, Wo)
    arg = cols.argmax(axis=1)
    # out[n, c, i, j] = max over the window = cols[c, arg, n, i, j]; (C, N, Ho, Wo) -> (N, C, Ho, Wo)
    out = np.take_along_axis(cols, arg[:, None], axis=1)[:, 0].transpose(1, 0, 2, 3)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        # the window's gradient goes to its arg-max only: a one-hot over the k k axis, scaled by g
        dcols = np.zeros((c, k * k, n, ho, wo), dtype=g.dtype)
        # g (N, C, Ho, Wo) -> (C, 1, N, Ho, Wo), placed at the arg-max of each window
        np.put_along_axis(dcols, arg[:, None], g.transpose(1, 0, 2, 3)[:, None], axis=1)
        # (C, k k, N, Ho, Wo) -> (C, k, k, N, Ho, Wo), then back onto the (padded) input
        gx = col2im(dcols.reshape(c, k, k, n, ho, wo), xpad.shape, s)
        return (gx[:, :, p:p + x.shape[2], p:p + x.shape[3]] if p else gx,)

    return make_node(out, (x,), backward, "max_pool2d")


def dropout(x: Tensor, p: float, rng: np.random.Generator, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (inverted dropout)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must lie in [0, 1), got {p}")
    if not training or p == 0:
        return x
    # E[mask] = 1, so the expected activation is unchanged and evaluation needs no rescaling
    mask = (rng.random(x.shape) >= p).astype(x.dtype) / (1 - p)
    return x * mask
