"""The NumPy autograd engine against torch.autograd, central finite differences and torch.optim.

Every op's gradient is checked twice on random inputs of random shapes (broadcasting included, several seeds):
against torch.autograd on the same float64 values, and against central finite differences of the engine's
own forward. Conv2d / max-pool agree with torch.nn.functional at several strides and paddings; SGD and
AdamW follow torch.optim step for step; the graph walk handles shared sub-expressions, deep chains and
no_grad; bad input is an error naming the shapes.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from workbench.models.fundamentals.autograd import (
    MLP,
    SGD,
    AdamW,
    Conv2d,
    Dropout,
    Linear,
    Module,
    Position,
    SmallCNN,
    Tensor,
    clip_grad_norm,
    evaluate,
    fit,
    no_grad,
)
from workbench.models.fundamentals.autograd import functional as F
from workbench.models.fundamentals.autograd.train import epoch_order, lr_at

SEEDS = [0, 1, 2]
DRAWS = 5  # random cases per op and seed; draw i also picks the variant (equal / broadcast shapes, matmul kind)


# ----------------------------------------------------------------------------------------------------
# random inputs


def rand_shape(rng: np.random.Generator, min_ndim: int = 1, max_ndim: int = 3, max_dim: int = 4) -> tuple:
    return tuple(int(d) for d in rng.integers(1, max_dim + 1, size=rng.integers(min_ndim, max_ndim + 1)))


def broadcast_partner(rng: np.random.Generator, shape: tuple) -> tuple:
    """A different shape that broadcasts against `shape`: some axes set to 1, some leading axes dropped."""
    out = [1 if rng.random() < 0.4 else d for d in shape]
    drop = int(rng.integers(0, len(out)))  # keep at least one axis
    if tuple(out[drop:]) == shape:  # nothing was stretched: stretch the first axis
        out[drop] = 1
    return tuple(out[drop:])


def binary_shapes(rng: np.random.Generator, draw: int) -> tuple[tuple, tuple]:
    """Equal shapes on draw 0, broadcasting ones (either side bigger) after."""
    shape = rand_shape(rng, 1, 3)
    while draw and shape == (1,) * len(shape):  # an all-ones shape has nothing to broadcast
        shape = rand_shape(rng, 1, 3)
    shapes = [shape, broadcast_partner(rng, shape) if draw else shape]
    if rng.random() < 0.5:
        shapes.reverse()
    return shapes[0], shapes[1]


def normal(rng, shape):
    return rng.standard_normal(shape)


def positive(rng, shape):
    return rng.uniform(0.5, 2.0, shape)


def away_from_zero(rng, shape):
    """Values with |x| >= 0.2, so finite differences of relu never straddle the kink."""
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)


# Each case: name -> fn(rng, draw) returning (inputs as numpy arrays, engine fn, torch fn). The fns take tensors of
# their own library; everything runs in float64.

def _binary(op):
    def make(rng, draw):
        sa, sb = binary_shapes(rng, draw)
        b_gen = positive if op in ("div", "pow") else normal
        a_gen = positive if op == "pow" else normal
        fns = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
               "div": lambda a, b: a / b, "pow": lambda a, b: a ** b}
        return [a_gen(rng, sa), b_gen(rng, sb)], fns[op], fns[op]
    return make


def _unary(engine, reference, gen=normal):
    def make(rng, draw):
        return [gen(rng, rand_shape(rng))], engine, reference
    return make


def _reduction(method):
    def make(rng, draw):
        shape = rand_shape(rng, 1, 3)
        choice = draw % 3  # all axes, one axis, two axes
        axis = None if choice == 0 else int(rng.integers(-len(shape), len(shape)))
        keep = bool(rng.integers(0, 2))
        if choice == 2 and len(shape) > 1:
            axis = (0, len(shape) - 1)
        if method != "max" and axis is None:
            keep = False  # torch's sum()/mean() without dim have no keepdim
        if method == "max":
            def torch_fn(t):
                return t.amax(dim=axis if axis is not None else tuple(range(t.ndim)), keepdim=keep)
        else:
            def torch_fn(t):
                kw = {} if axis is None else {"dim": axis, "keepdim": keep}
                return getattr(t, method)(**kw)
        return [normal(rng, shape)], lambda t: getattr(t, method)(axis, keep), torch_fn
    return make


def _matmul(rng, draw):
    kind = draw % 5
    m, k, n = (int(v) for v in rng.integers(1, 5, 3))
    batch = rand_shape(rng, 1, 2, 3)
    shapes = [((m, k), (k, n)),                                        # plain
              (batch + (m, k), (k, n)),                                # batched times shared matrix
              ((1,) + batch[1:] + (m, k), batch + (k, n)),             # batch axes broadcast both ways
              ((k,), batch + (k, n)),                                  # vector times batched
              (batch + (m, k), (k,))][kind]                            # batched times vector
    return [normal(rng, s) for s in shapes], lambda a, b: a @ b, lambda a, b: a @ b


def _softmax(which):
    def make(rng, draw):
        shape = rand_shape(rng, 1, 3)
        axis = int(rng.integers(-len(shape), len(shape)))
        eng = (lambda t: F.softmax(t, axis)) if which == "softmax" else (lambda t: F.log_softmax(t, axis))
        ref = (lambda t: torch.softmax(t, axis)) if which == "softmax" else (lambda t: torch.log_softmax(t, axis))
        return [normal(rng, shape) * 3], eng, ref
    return make


def _reshape(rng, draw):
    shape = rand_shape(rng, 1, 3)
    new = (-1,) if rng.random() < 0.5 else (int(np.prod(shape)), 1)
    return [normal(rng, shape)], lambda t: t.reshape(*new), lambda t: t.reshape(*new)


def _transpose(rng, draw):
    shape = rand_shape(rng, 2, 4)
    perm = tuple(int(a) for a in rng.permutation(len(shape)))
    return [normal(rng, shape)], lambda t: t.transpose(*perm), lambda t: t.permute(*perm)


def _getitem(rng, draw):
    shape = (int(rng.integers(3, 6)), int(rng.integers(2, 5)))
    kind = draw % 4
    rows = rng.integers(0, shape[0], size=7)  # repeats are likely: their gradients must add up
    cols = rng.integers(0, shape[1], size=7)
    index = [1, (slice(1, None), slice(None, None, 2)), (rows,), (rows, cols)][kind]
    tindex = index if kind < 2 else tuple(torch.as_tensor(i) for i in index)
    return [normal(rng, shape)], lambda t: t[index], lambda t: t[tindex]


def _cross_entropy(rng, draw):
    n, k = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    y = rng.integers(0, k, size=n)
    return [normal(rng, (n, k)) * 2], lambda t: F.cross_entropy(t, y), lambda t: TF.cross_entropy(t, torch.as_tensor(y))


def _conv2d(rng, draw):
    stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    k, c, o = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
    h = int(rng.integers(k, 6))
    return ([normal(rng, (2, c, h, h + 1)), normal(rng, (o, c, k, k)), normal(rng, (o,))],
            lambda x, w, b: F.conv2d(x, w, b, stride, padding),
            lambda x, w, b: TF.conv2d(x, w, b, stride=stride, padding=padding))


def _max_pool(rng, draw):
    k = int(rng.integers(1, 4))
    stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 1))
    h = int(rng.integers(k, 7))
    return ([normal(rng, (2, 2, h, h + 1))], lambda x: F.max_pool2d(x, k, stride, padding),
            lambda x: TF.max_pool2d(x, k, stride, padding))


CASES = {
    **{op: _binary(op) for op in ("add", "sub", "mul", "div", "pow")},
    "pow_scalar": _unary(lambda t: t ** 3.0, lambda t: t ** 3.0),
    "neg": _unary(lambda t: -t, lambda t: -t),
    "scalar_arith": _unary(lambda t: (2.0 - t) * 3.0 / (1.0 + t * t) + 0.5, lambda t: (2.0 - t) * 3.0 / (1.0 + t * t) + 0.5),
    "rdiv_rpow": _unary(lambda t: 1.0 / t + 2.0 ** t, lambda t: 1.0 / t + 2.0 ** t, positive),
    "matmul": _matmul,
    "sum": _reduction("sum"),
    "mean": _reduction("mean"),
    "max": _reduction("max"),
    "exp": _unary(lambda t: t.exp(), torch.exp),
    "log": _unary(lambda t: t.log(), torch.log, positive),
    "relu": _unary(lambda t: t.relu(), torch.relu, away_from_zero),
    "tanh": _unary(lambda t: t.tanh(), torch.tanh),
    "sigmoid": _unary(lambda t: t.sigmoid(), torch.sigmoid),
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"),
    "reshape": _reshape,
    "transpose": _transpose,
    "getitem": _getitem,
    "cross_entropy": _cross_entropy,
    "conv2d": _conv2d,
    "max_pool2d": _max_pool,
}


def _projection(rng, shape):
    """Fixed random weights R: the checks differentiate L = sum(out * R), which exercises every output's gradient."""
    return rng.standard_normal(shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_torch_autograd(name, seed):
    rng = np.random.default_rng(seed * 1000 + zlib.crc32(name.encode()) % 1000)
    for draw in range(DRAWS):
        _check_against_torch(name, rng, draw)


def _check_against_torch(name, rng, draw):
    arrays, engine_fn, torch_fn = CASES[name](rng, draw)
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = engine_fn(*ours), torch_fn(*theirs)
    assert out.shape == tuple(ref.shape), (out.shape, ref.shape)
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    r = _projection(rng, out.shape)
    (out * r).sum().backward()
    (ref * torch.as_tensor(r)).sum().backward()
    for i, (t_ours, t_ref) in enumerate(zip(ours, theirs)):
        assert t_ours.grad is not None and t_ours.grad.shape == t_ours.shape, (name, draw, i)
        np.testing.assert_allclose(t_ours.grad, t_ref.grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=f"{name} draw {draw} input {i}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_finite_differences(name, seed):
    rng = np.random.default_rng(seed * 7919 + zlib.crc32(name.encode()) % 1000)
    for draw in range(DRAWS):
        _check_against_finite_differences(name, rng, draw)


def _check_against_finite_differences(name, rng, draw):
    arrays, engine_fn, _ = CASES[name](rng, draw)
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    out = engine_fn(*ours)
    r = _projection(rng, out.shape)
    (out * r).sum().backward()
    eps = 1e-6
    for i, a in enumerate(arrays):
        numeric = np.zeros_like(a)
        for j in range(a.size):
            # dL/da_j ~ (L(a + eps e_j) - L(a - eps e_j)) / (2 eps)
            values = []
            for sign in (1, -1):
                shifted = [x.copy() for x in arrays]
                shifted[i].flat[j] += sign * eps
                with no_grad():
                    values.append(float((engine_fn(*[Tensor(x) for x in shifted]).data * r).sum()))
            numeric.flat[j] = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(ours[i].grad, numeric, rtol=1e-5, atol=1e-6, err_msg=f"{name} draw {draw} input {i}")


def test_the_checks_catch_a_wrong_gradient():
    """A deliberately wrong backward (tanh with 1 - y instead of 1 - y^2) fails the finite-difference check."""
    from workbench.models.fundamentals.autograd.tensor import make_node

    x = np.random.default_rng(0).standard_normal(5)
    t = Tensor(x, requires_grad=True)
    y = np.tanh(x)
    make_node(y, (t,), lambda g: (g * (1 - y),), "bad_tanh").sum().backward()
    numeric = (np.tanh(x + 1e-6) - np.tanh(x - 1e-6)) / 2e-6
    assert not np.allclose(t.grad, numeric, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# conv2d / max-pool forward at fixed strides and paddings (the layer shapes the CNN uses)


@pytest.mark.parametrize("stride,padding,kernel", [(1, 0, 3), (1, 1, 3), (2, 1, 3), (2, 0, 2), (3, 2, 5), (1, 0, 1)])
def test_conv2d_forward_equals_torch(stride, padding, kernel):
    rng = np.random.default_rng(stride * 10 + padding)
    x, w, b = rng.standard_normal((3, 4, 9, 8)), rng.standard_normal((5, 4, kernel, kernel)), rng.standard_normal(5)
    ours = F.conv2d(Tensor(x), Tensor(w), Tensor(b), stride=stride, padding=padding).data
    ref = TF.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=stride, padding=padding).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    no_bias = F.conv2d(Tensor(x), Tensor(w), None, stride=stride, padding=padding).data
    np.testing.assert_allclose(no_bias, ref - b[None, :, None, None], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 0), (3, 3, 0), (4, 2, 2)])
def test_max_pool_forward_equals_torch(kernel, stride, padding):
    x = np.random.default_rng(kernel + stride).standard_normal((2, 3, 9, 10))
    ours = F.max_pool2d(Tensor(x), kernel, stride, padding).data
    ref = TF.max_pool2d(torch.tensor(x), kernel, stride, padding).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_float32_layers_stay_float32_and_match_torch():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    t = Tensor(x, requires_grad=True)
    out = F.max_pool2d(F.conv2d(t, Tensor(w), padding=1).relu(), 2) * 2.0
    assert out.dtype == np.float32
    out.sum().backward()
    assert t.grad.dtype == np.float32
    ref = TF.max_pool2d(TF.conv2d(torch.tensor(x), torch.tensor(w), padding=1).relu(), 2) * 2.0
    np.testing.assert_allclose(out.data, ref.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# the graph walk


def test_diamond_graph_accumulates_both_paths():
    # y = a * b, z = y + y * a: dz/da = b + 2 a b, dz/db = a + a^2  (y is shared by two consumers)
    a, b = Tensor(3.0, requires_grad=True), Tensor(-2.0, requires_grad=True)
    y = a * b
    z = y + y * a
    z.backward()
    assert a.grad == pytest.approx(-2.0 + 2 * 3.0 * -2.0)
    assert b.grad == pytest.approx(3.0 + 9.0)


def test_the_same_tensor_used_twice_in_one_op():
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (x * x).sum().backward()  # d/dx sum x^2 = 2x
    np.testing.assert_allclose(x.grad, 2 * x.data)


def test_leaf_gradients_accumulate_across_backward_calls_like_torch():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 3.0 + 2 * x.data)


def test_a_deep_chain_does_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(20_000):
        y = y + 0.5 * x
    y.backward()
    assert x.grad == pytest.approx(1.0 + 0.5 * 20_000)


def test_no_grad_builds_no_graph_and_constants_get_no_grad():
    w = Tensor(np.ones(3), requires_grad=True)
    c = Tensor(np.arange(3.0))
    with no_grad():
        y = (w * c).sum()
    assert not y.requires_grad and y._parents == ()
    z = (w * c).sum()
    z.backward()
    assert c.grad is None
    np.testing.assert_allclose(w.grad, c.data)


def test_backward_errors_name_the_problem():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"single-element tensor, got shape \(2, 3\)"):
        (x * 2.0).backward()
    with pytest.raises(RuntimeError, match="requires grad"):
        Tensor(np.ones(2)).sum().backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), the tensor has shape \(2, 3\)"):
        (x * 2.0).backward(np.ones(3))


def test_bad_input_errors_name_the_shapes():
    a, b = Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not align.*\(3\).*\(4\)"):
        a @ b
    with pytest.raises(ValueError, match=r"batch axes \(2,\) and \(3,\)"):
        Tensor(np.ones((2, 2, 3))) @ Tensor(np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match=r"cannot reshape a tensor of shape \(2, 3\) \(6 elements\) into \(4,\)"):
        a.reshape(4)
    with pytest.raises(ValueError, match=r"input has 2 channels .* weight expects 3"):
        F.conv2d(Tensor(np.ones((1, 2, 5, 5))), Tensor(np.ones((4, 3, 3, 3))))
    with pytest.raises(ValueError, match=r"3x3 kernel does not fit an input of 2x2"):
        F.conv2d(Tensor(np.ones((1, 1, 2, 2))), Tensor(np.ones((1, 1, 3, 3))))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        F.cross_entropy(Tensor(np.ones((2, 3))), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"Linear\(4, 2\): input's last axis is 3"):
        Linear(4, 2, rng=np.random.default_rng(0))(Tensor(np.ones((5, 3))))
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(np.arange(3), requires_grad=True, dtype=np.int64)


@pytest.mark.parametrize("kind", ["rows", "cells", "mask_and_int", "tensor"])
def test_boolean_masks_select_like_numpy_and_torch(kind):
    """A boolean mask picks its True positions (not the indices 0 and 1); the gradient goes back to them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    rows, cells = np.array([True, False, True, True]), rng.random((4, 3)) < 0.5
    index = {"rows": rows, "cells": cells, "mask_and_int": (rows, np.array([2, 0, 2])),
             "tensor": Tensor(rows, dtype=bool)}[kind]
    tindex = (torch.as_tensor(rows) if kind == "tensor" else
              tuple(torch.as_tensor(i) for i in index) if isinstance(index, tuple) else torch.as_tensor(index))
    ours, theirs = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, ref = ours[index], theirs[tindex]
    np.testing.assert_array_equal(out.data, x[index.data if kind == "tensor" else index])
    np.testing.assert_array_equal(out.data, ref.detach().numpy())
    r = rng.standard_normal(out.shape)
    (out * r).sum().backward()
    (ref * torch.as_tensor(r)).sum().backward()
    np.testing.assert_array_equal(ours.grad, theirs.grad.numpy())
    if kind == "rows":  # a list of bools is a mask too
        np.testing.assert_array_equal(ours[rows.tolist()].data, x[rows])


def test_float_index_tensors_and_axis_0_of_a_scalar_are_refused():
    a = Tensor(np.arange(4.0))
    # Tensor() stores bools as float64: reading [1., 0., 1., 0.] back as a mask or as indices would be a guess
    with pytest.raises(TypeError, match="dtype float64 cannot index"):
        a[Tensor([True, False, True, False])]
    with pytest.raises(TypeError, match="cannot index"):
        a[(Tensor([0.0, 1.0]),)]
    np.testing.assert_array_equal(a[Tensor([2, 0], dtype=np.int64)].data, [2.0, 0.0])
    s = Tensor(3.0, requires_grad=True)
    for reduce in ("sum", "mean", "max"):
        for axis in (0, -1, (0,)):
            with pytest.raises(ValueError, match=f"axis {axis if isinstance(axis, int) else 0} is out of range "
                                                 f"for a tensor with 0 dimensions"):
                getattr(s, reduce)(axis)
        with pytest.raises(np.exceptions.AxisError):  # NumPy refuses it too (an int 0 only where legacy allows)
            getattr(np.array(3.0), reduce)((0,))
        assert getattr(s, reduce)().item() == 3.0 and getattr(s, reduce)(()).item() == 3.0


def test_softmax_is_stable_for_huge_logits():
    z = Tensor(np.array([[1000.0, 0.0, -1000.0]]), requires_grad=True)
    ls = F.log_softmax(z)
    assert np.isfinite(ls.data).all()
    np.testing.assert_allclose(F.softmax(z).data, [[1.0, 0.0, 0.0]], atol=1e-300)
    F.cross_entropy(z, np.array([2])).backward()
    np.testing.assert_allclose(z.grad, [[1.0, 0.0, -1.0]])


# ----------------------------------------------------------------------------------------------------
# modules


def test_modules_find_parameters_recursively_and_round_trip_state():
    rng = np.random.default_rng(0)
    cnn = SmallCNN(1, 8, [4, 6], 10, rng=rng)
    names = [n for n, _ in cnn.named_parameters()]
    assert names == ["net.layers.0.weight", "net.layers.0.bias", "net.layers.3.weight", "net.layers.3.bias",
                     "net.layers.7.weight", "net.layers.7.bias"]
    # conv 1->4 (3x3), conv 4->6 (3x3), linear 6*2*2 -> 10
    assert cnn.num_parameters() == (4 * 9 + 4) + (6 * 4 * 9 + 6) + (24 * 10 + 10)
    state = cnn.state_dict()
    other = SmallCNN(1, 8, [4, 6], 10, rng=np.random.default_rng(1))
    x = Tensor(rng.random((2, 1, 8, 8)))
    assert not np.allclose(other(x).data, cnn(x).data)
    params_before = other.parameters()
    other.load_state_dict(state)
    np.testing.assert_array_equal(other(x).data, cnn(x).data)
    assert all(p is q for p, q in zip(params_before, other.parameters()))  # loaded in place
    with pytest.raises(KeyError, match=r"missing keys \['net.layers.7.bias'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "net.layers.7.bias"})
    with pytest.raises(ValueError, match=r"'net.layers.0.bias' has shape \(5,\), the model expects \(4,\)"):
        other.load_state_dict({**state, "net.layers.0.bias": np.zeros(5)})


def test_train_eval_switches_dropout_and_zero_grad_clears():
    rng = np.random.default_rng(0)
    model = MLP(16, [32], 3, dropout=0.5, rng=rng)
    x = Tensor(rng.random((4, 16)))
    model.eval()
    assert all(not m.training for m in model.modules())
    np.testing.assert_array_equal(model(x).data, model(x).data)
    model.train()
    assert not np.allclose(model(x).data, model(x).data)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_dropout_keeps_the_mean_and_zeroes_about_p():
    rng = np.random.default_rng(0)
    drop = Dropout(0.3, rng=rng)
    out = drop(Tensor(np.ones(200_000))).data
    assert abs((out == 0).mean() - 0.3) < 0.01
    assert abs(out.mean() - 1.0) < 0.01


def test_linear_and_conv_init_bounds_follow_pytorch():
    rng = np.random.default_rng(0)
    lin, conv = Linear(50, 20, rng=rng), Conv2d(3, 8, 5, rng=rng)
    assert np.abs(lin.weight.data).max() <= 1 / np.sqrt(50) and np.abs(lin.weight.data).max() > 0.9 / np.sqrt(50)
    assert np.abs(conv.weight.data).max() <= 1 / np.sqrt(75) and np.abs(conv.bias.data).max() <= 1 / np.sqrt(75)


# ----------------------------------------------------------------------------------------------------
# optimizers


def _engine_and_torch_params(seed: int):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    return [Tensor(a.copy(), requires_grad=True) for a in arrays], [torch.tensor(a.copy(), requires_grad=True) for a in arrays]


def _run_both(make_ours, make_theirs, seed: int, steps: int = 6, lr_schedule=None):
    """Same parameters, same gradients (of a fixed quadratic-plus-tanh loss) for `steps` steps."""
    ours, theirs = _engine_and_torch_params(seed)
    opt, topt = make_ours(ours), make_theirs(theirs)
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal((5, 4))
    for step in range(steps):
        if lr_schedule:
            opt.lr = lr_schedule(step)
            for group in topt.param_groups:
                group["lr"] = lr_schedule(step)
        opt.zero_grad()
        ((Tensor(x) @ ours[0] + ours[1]).tanh() ** 2.0).sum().backward()
        opt.step()
        topt.zero_grad()
        ((torch.tensor(x) @ theirs[0] + theirs[1]).tanh() ** 2).sum().backward()
        topt.step()
        for p, q in zip(ours, theirs):
            np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-13, err_msg=f"step {step}")
    assert not np.allclose(ours[0].data, _engine_and_torch_params(seed)[0][0].data)  # they did move


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-2),
                                                  (0.5, False, 1e-1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sgd_matches_torch(momentum, nesterov, wd, seed):
    _run_both(lambda p: SGD(p, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd),
              lambda p: torch.optim.SGD(p, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd),
              seed, lr_schedule=lambda s: 0.1 / (1 + s))


@pytest.mark.parametrize("betas,wd,eps", [((0.9, 0.999), 1e-2, 1e-8), ((0.8, 0.95), 0.1, 1e-6), ((0.9, 0.99), 0.0, 1e-8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_adamw_matches_torch(betas, wd, eps, seed):
    _run_both(lambda p: AdamW(p, lr=0.05, betas=betas, weight_decay=wd, eps=eps),
              lambda p: torch.optim.AdamW(p, lr=0.05, betas=betas, weight_decay=wd, eps=eps), seed)


def test_optimizer_state_round_trips():
    ours, _ = _engine_and_torch_params(0)
    twin = [Tensor(p.data.copy(), requires_grad=True) for p in ours]
    opt, opt2 = AdamW(ours, lr=0.01), AdamW(twin, lr=0.01)
    for params, o in ((ours, opt), (twin, opt2)):
        for p in params:
            p.grad = np.ones_like(p.data)
        o.step()
    opt2.load_state_dict({k: v * 0 for k, v in opt.state_dict().items()})  # clobber, then restore
    opt2.load_state_dict(opt.state_dict())
    for params, o in ((ours, opt), (twin, opt2)):
        for p in params:
            p.grad = np.full_like(p.data, 0.5)
        o.step()
    for p, q in zip(ours, twin):
        np.testing.assert_array_equal(p.data, q.data)


def test_clip_grad_norm_matches_torch():
    ours, theirs = _engine_and_torch_params(3)
    for p, q in zip(ours, theirs):
        g = np.random.default_rng(5).standard_normal(p.shape) * 4
        p.grad, q.grad = g.copy(), torch.tensor(g)
    n = clip_grad_norm(ours, 1.5)
    tn = torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    assert n == pytest.approx(float(tn), rel=1e-12)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# the training loop


def _blobs(seed: int, n: int = 300):
    """Three Gaussian blobs in 8 dimensions: separable, so a trained MLP is near 100% and chance is 1/3."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 8)) * 3
    y = rng.integers(0, 3, size=n)
    return (centers[y] + rng.standard_normal((n, 8))).astype(np.float32), y


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert [lr_at(s, 10, 1.0, "constant", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_at(s, 10, 1.0, "cosine", 2) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] < 0.1
    assert epoch_order(10, 0, 1).tolist() != epoch_order(10, 0, 2).tolist()
    assert epoch_order(10, 0, 1).tolist() == epoch_order(10, 0, 1).tolist()


def test_lr_schedule_equals_the_torch_runners():
    from workbench.train.optim import lr_multiplier

    for total, warmup, schedule, floor in [(50, 0, "cosine", 0.0), (50, 7, "cosine", 0.1), (20, 5, "constant", 0.0)]:
        for step in range(total):
            assert lr_at(step, total, 0.3, schedule, warmup, floor) == pytest.approx(
                0.3 * lr_multiplier(step, total, warmup, schedule, floor), rel=1e-12), (total, warmup, schedule, step)


def test_fit_learns_a_separable_task():
    x, y = _blobs(0)
    model = MLP(8, [16], 3, rng=np.random.default_rng(0), dtype=np.float32)
    before = evaluate(model, x, y)
    logs = []
    fit(model, SGD(model.parameters(), lr=0.1, momentum=0.9), x, y, epochs=3, batch_size=32, seed=0, lr=0.1,
        log_every=5, on_log=lambda pos, m: logs.append(m))
    after = evaluate(model, x, y)
    assert after["accuracy"] > 0.9 and after["accuracy"] > before["accuracy"] + 0.2
    assert after["loss"] < before["loss"] / 3
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_fit_resumes_mid_epoch_exactly():
    x, y = _blobs(1, 100)

    def build():
        model = MLP(8, [16], 3, rng=np.random.default_rng(0))
        return model, AdamW(model.parameters(), lr=0.01)

    straight, opt = build()
    fit(straight, opt, x, y, epochs=2, batch_size=32, seed=3, lr=0.01, schedule="cosine")

    first, opt1 = build()
    calls = iter(range(100))
    pos = fit(first, opt1, x, y, epochs=2, batch_size=32, seed=3, lr=0.01, schedule="cosine",
              should_stop=lambda: next(calls) >= 6)  # stop after 6 steps: epoch 1, batch 2
    assert (pos.epoch, pos.batch, pos.step) == (1, 2, 6)
    resumed, opt2 = build()
    resumed.load_state_dict(first.state_dict())
    opt2.load_state_dict(opt1.state_dict())
    end = fit(resumed, opt2, x, y, epochs=2, batch_size=32, seed=3, lr=0.01, schedule="cosine",
              start=Position(**vars(pos)))
    assert (end.epoch, end.step) == (2, 8)
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def test_module_base_needs_forward():
    with pytest.raises(NotImplementedError, match="Module does not define forward"):
        Module()(Tensor(1.0))
