"""The CNN / ResNet building blocks (workbench/models/fundamentals/cnn.py) and the image sets (workbench/data/images.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.data.images import (
    CIFAR_META_FILE,
    SHAPES,
    ImageSet,
    find_cifar10,
    image_options_error,
    load_images,
    render_shapes,
    stratified_split,
    write_cifar_batches,
)
from workbench.errors import DataError
from workbench.models.fundamentals.cnn import (
    FLAVORS,
    BasicBlock,
    Bottleneck,
    PadShortcut,
    ResNet,
    batch_norm_train,
    build,
    conv2d_im2col,
    count_parameters,
    make_config,
    max_pool2d_windows,
)

# ----------------------------------------------------------------------------------------------------
# The operations, spelled out, against torch.nn


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1), (2, 0)])
def test_conv2d_im2col_equals_torch(stride, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    b = torch.randn(5, generator=g)
    ours = conv2d_im2col(x, w, b, stride=stride, padding=padding)
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_max_pool_windows_equals_torch():
    x = torch.randn(2, 4, 8, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(max_pool2d_windows(x, 2), F.max_pool2d(x, 2))
    torch.testing.assert_close(max_pool2d_windows(x, 3, 2), F.max_pool2d(x, 3, 2))


def test_batch_norm_train_equals_torch_including_running_statistics():
    x = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(2)) * 3 + 1
    bn = nn.BatchNorm2d(4, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    rm, rv = torch.zeros(4), torch.ones(4)
    ours = batch_norm_train(x, bn.weight, bn.bias, rm, rv, momentum=0.1, eps=bn.eps)
    ref = bn.train()(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)  # updated with the unbiased variance


def test_batch_norm_eval_is_a_fixed_affine_map_independent_of_the_batch():
    torch.manual_seed(0)
    model = build(make_config("tiny"))
    model.train()
    for _ in range(3):  # move the running statistics away from their initial values
        model(torch.rand(16, 3, 32, 32))
    model.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        again = model(x)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(together, again)
    # in train mode the same example's output depends on its batch companions
    model.train()
    with torch.no_grad():
        in_batch = model(x)[0]
        other_batch = model(torch.cat([x[:1], torch.rand(7, 3, 32, 32)]))[0]
    assert not torch.allclose(in_batch, other_batch, atol=1e-4)
    # eval BN = gamma (x - running_mean) / sqrt(running_var + eps) + beta
    bn = model.stem[1]
    bn.eval()
    h = torch.randn(2, bn.num_features, 4, 4)
    shape = (1, -1, 1, 1)
    expected = (bn.weight.view(shape) * (h - bn.running_mean.view(shape))
                / torch.sqrt(bn.running_var.view(shape) + bn.eps) + bn.bias.view(shape))
    torch.testing.assert_close(bn(h), expected.detach())


# ----------------------------------------------------------------------------------------------------
# Blocks


def test_basic_block_shapes_strides_and_shortcuts():
    x = torch.randn(2, 16, 32, 32)
    same = BasicBlock(16, 16, 1)
    assert isinstance(same.shortcut, nn.Identity)
    assert same(x).shape == (2, 16, 32, 32)
    down = BasicBlock(16, 32, 2)
    assert isinstance(down.shortcut, nn.Sequential)  # 1x1 conv with the stride, then BN
    assert down.shortcut[0].stride == (2, 2) and down.shortcut[0].kernel_size == (1, 1)
    assert down.conv1.stride == (2, 2) and down.conv2.stride == (1, 1)
    assert down(x).shape == (2, 32, 16, 16)
    wider = BasicBlock(16, 32, 1)
    assert not isinstance(wider.shortcut, nn.Identity)
    assert wider(x).shape == (2, 32, 32, 32)


def test_bottleneck_expands_four_times_with_the_stride_on_the_3x3():
    assert Bottleneck.expansion == 4
    x = torch.randn(2, 64, 16, 16)
    keep = Bottleneck(64, 16, 1)  # 64 -> inner 16 -> 64: the shape is kept, identity shortcut
    assert isinstance(keep.shortcut, nn.Identity)
    assert keep(x).shape == (2, 64, 16, 16)
    assert [keep.conv1.kernel_size, keep.conv2.kernel_size, keep.conv3.kernel_size] == [(1, 1), (3, 3), (1, 1)]
    down = Bottleneck(64, 32, 2)
    assert (down.conv1.out_channels, down.conv3.out_channels) == (32, 128)
    assert down.conv2.stride == (2, 2) and down.conv1.stride == (1, 1)
    assert down(x).shape == (2, 128, 8, 8)
    first = Bottleneck(16, 16, 1)  # the first block of a stage widens 16 -> 64: projection
    assert isinstance(first.shortcut, nn.Sequential)
    assert first(torch.randn(1, 16, 8, 8)).shape == (1, 64, 8, 8)


def test_pad_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 4, 8, 8)
    y = PadShortcut(4, 8, 2)(x)
    assert y.shape == (2, 8, 4, 4)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :2]) == 0 and torch.count_nonzero(y[:, 6:]) == 0
    assert sum(p.numel() for p in PadShortcut(4, 8, 2).parameters()) == 0


def test_zero_init_residual_makes_identity_blocks():
    torch.manual_seed(0)
    model = build(make_config("tiny", blocks_per_stage=2, zero_init_residual=True))
    block = model.stage1[1]  # 8 -> 8 channels, stride 1: identity shortcut
    assert isinstance(block.shortcut, nn.Identity)
    x = torch.rand(2, 8, 16, 16)  # non-negative, as after a ReLU
    torch.testing.assert_close(block(x), x)


# ----------------------------------------------------------------------------------------------------
# Models


def _paper_resnet_params(n: int, classes: int = 10) -> int:
    """Parameters of He et al.'s CIFAR ResNet-(6n+2) with option-A shortcuts, counted by hand."""
    conv = lambda cin, cout: 9 * cin * cout  # noqa: E731  3x3, no bias
    bn = lambda c: 2 * c  # noqa: E731  gamma and beta
    total = conv(3, 16) + bn(16)
    for cin, c in ((16, 16), (16, 32), (32, 64)):
        total += conv(cin, c) + bn(c) + conv(c, c) + bn(c)  # the first block of the stage
        total += (n - 1) * 2 * (conv(c, c) + bn(c))
    return total + 64 * classes + classes


def test_resnet20_has_the_published_parameter_count():
    with torch.device("meta"):  # counted without allocating
        pad = build(make_config("resnet20", shortcut="pad"), init=False)
        proj = build(make_config("resnet20"), init=False)
    assert count_parameters(pad) == _paper_resnet_params(3) == 269_722
    assert round(count_parameters(pad) / 1e6, 2) == 0.27  # the paper's table: 0.27M
    # option B adds the two 1x1 projections and their BN: 16*32 + 2*32 + 32*64 + 2*64
    assert count_parameters(proj) - count_parameters(pad) == 16 * 32 + 64 + 32 * 64 + 128
    assert FLAVORS["resnet20"].depth == 20


@pytest.mark.parametrize("flavor,millions", [("resnet32", 0.46), ("resnet56", 0.85), ("resnet110", 1.7),
                                             ("resnet164", 1.7)])
def test_deeper_flavors_match_published_sizes(flavor, millions):
    with torch.device("meta"):
        model = build(make_config(flavor, shortcut="pad"), init=False)
    digits = 2 if millions < 1 else 1
    assert round(count_parameters(model) / 1e6, digits) == millions
    assert FLAVORS[flavor].depth == int(flavor.removeprefix("resnet"))
    if FLAVORS[flavor].block == "basic":
        assert count_parameters(model) == _paper_resnet_params(FLAVORS[flavor].blocks_per_stage)


@pytest.mark.parametrize("flavor", ["tiny", "bottleneck-tiny", "plain-tiny"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_forward_shapes(flavor, shape):
    torch.manual_seed(0)
    model = build(make_config(flavor, in_channels=shape[0], num_classes=7, image_size=shape[1]))
    out = model(torch.rand(4, *shape))
    assert out.shape == (4, 7) and torch.isfinite(out).all()


def test_resnet_stages_halve_the_resolution():
    model = build(make_config("tiny"))
    seen = []
    hooks = [getattr(model, f"stage{i}").register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
             for i in (1, 2, 3)]
    model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]


def test_init_weights_is_kaiming_and_meta_safe():
    with torch.device("meta"):
        model = build(make_config("resnet20"), init=False)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    w = model.stage3[1].conv2.weight  # 64 x 64 x 3 x 3
    expected = (2.0 / (64 * 9)) ** 0.5  # sqrt(2 / fan_out)
    assert abs(w.std().item() / expected - 1) < 0.03
    bn = model.stage3[1].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_var, torch.ones(64))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_flavor_names_the_field():
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="model.*resnet19"):
        make_config("resnet19")
    with pytest.raises(ConfigError, match=r"widths\[1\]"):
        build(make_config("tiny", widths=(8, 0, 8)))


def test_a_resnet_fits_a_small_batch():
    """Sanity of the whole stack: a tiny ResNet memorises 32 random images with random labels."""
    torch.manual_seed(0)
    model = build(make_config("tiny", num_classes=4))
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert isinstance(model, ResNet)


# ----------------------------------------------------------------------------------------------------
# Image sets


def _split_sizes(s: ImageSet) -> tuple[int, int, int]:
    return len(s.train[1]), len(s.val[1]), len(s.test[1])


def test_digits_split_is_deterministic_disjoint_and_stratified():
    a = load_images("digits", seed=0)
    b = load_images("digits", seed=0)
    c = load_images("digits", seed=1)
    assert a.shape == (1, 8, 8) and a.classes == [str(i) for i in range(10)]
    assert sum(_split_sizes(a)) == 1797
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part)[0], getattr(b, part)[0])
        assert getattr(a, part)[0].dtype == torch.float32 and getattr(a, part)[1].dtype == torch.int64
    assert not torch.equal(a.test[0], c.test[0])
    x = torch.cat([a.train[0], a.val[0], a.test[0]])
    assert x.min() >= 0 and x.max() <= 1 and (x * 16).round().sub(x * 16).abs().max() < 1e-5  # k / 16
    # every class keeps about TEST_FRACTION of its images for test
    share = torch.bincount(a.test[1], minlength=10) / torch.bincount(torch.cat([a.train[1], a.val[1], a.test[1]]))
    assert ((share - 0.2).abs() < 0.01).all()


def test_stratified_split_partitions_the_indices():
    y = np.repeat(np.arange(5), [10, 20, 7, 33, 50])
    tr, va, te = stratified_split(y, 0.2, 0.1, np.random.default_rng(3))
    joined = np.concatenate([tr, va, te])
    assert len(joined) == len(y) and len(np.unique(joined)) == len(y)  # disjoint and complete
    tr2, _, te2 = stratified_split(y, 0.2, 0.1, np.random.default_rng(3))
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    for c, count in enumerate([10, 20, 7, 33, 50]):
        assert (y[te] == c).sum() == round(0.2 * count)


def test_shapes_are_deterministic_balanced_and_disjoint():
    a = load_images("shapes", seed=4, n=300, size=16)
    b = load_images("shapes", seed=4, n=300, size=16)
    assert a.classes == list(SHAPES) and a.shape == (3, 16, 16)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[0], load_images("shapes", seed=5, n=300, size=16).train[0])
    assert sum(_split_sizes(a)) == 300
    labels = torch.cat([a.train[1], a.val[1], a.test[1]])
    assert torch.equal(torch.bincount(labels), torch.full((len(SHAPES),), 300 // len(SHAPES)))
    rows = lambda x: {r.tobytes() for r in x.numpy()}  # noqa: E731
    assert not rows(a.train[0]) & rows(a.test[0]) and not rows(a.train[0]) & rows(a.val[0])
    x, _ = render_shapes(12, 32, seed=0)
    assert x.shape == (12, 3, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_shapes_follow_their_rule():
    """The masks in each shape's own frame (unit radius): a ring has a hole, a circle does not, and so on."""
    from workbench.data.images import _inside

    q = np.linspace(-1.2, 1.2, 49)  # q = 0 at index 24
    qx, qy = np.meshgrid(q, q)
    masks = {name: _inside(np.array([i]), qx[None], qy[None])[0] for i, name in enumerate(SHAPES)}
    assert masks["circle"][24, 24] and not masks["ring"][24, 24] and masks["ring"][24, 44]
    area = {k: v.mean() for k, v in masks.items()}
    assert area["circle"] > area["square"] > area["triangle"]  # pi > 2.25 > 1.30 (radius 1)
    assert masks["star"].sum() > masks["triangle"].sum()
    assert masks["cross"][24, 42] and not masks["cross"][40, 40]  # on an arm, between two arms
    _, y = render_shapes(60, 32, seed=7)
    assert set(y.tolist()) == set(range(len(SHAPES)))


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 files


def _write(folder, n=50, n_test=20, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, classes, n)
    xt = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    yt = rng.integers(0, classes, n_test)
    write_cifar_batches(folder, x, y, [f"class{i}" for i in range(classes)], xt, yt)
    return x, y, xt, yt


def test_cifar_round_trip_gives_exact_pixels_and_labels(tmp_path):
    x, y, xt, yt = _write(tmp_path / "cifar-10-batches-py")
    # the user may name the folder or its parent
    assert find_cifar10(tmp_path) == tmp_path / "cifar-10-batches-py"
    s = load_images("cifar10", tmp_path, val_fraction=0.2, seed=3)
    assert s.classes == [f"class{i}" for i in range(10)] and s.name == "cifar10"
    assert s.shape == (3, 32, 32)
    assert torch.equal((s.test[0] * 255).round().to(torch.uint8), torch.from_numpy(xt))
    assert torch.equal(s.test[1], torch.from_numpy(yt))
    # train and val together are the training batches, each image with its label
    got = torch.cat([s.train[0], s.val[0]])
    got_y = torch.cat([s.train[1], s.val[1]])
    wanted = {x[i].tobytes(): int(y[i]) for i in range(len(x))}
    found = {(got[i] * 255).round().to(torch.uint8).numpy().tobytes(): int(got_y[i]) for i in range(len(got))}
    assert found == wanted and len(got) == len(x)
    # pixel layout: row r of a batch is R plane, G plane, B plane, each row-major
    d = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")
    assert d[b"data"].shape == (10, 3072) and d[b"data"].dtype == np.uint8
    assert d[b"data"][0, 1024 + 32 * 5 + 7] == x[0, 1, 5, 7]


def test_cifar_loader_accepts_the_numpy1_names_of_the_official_files(tmp_path):
    _write(tmp_path)
    path = tmp_path / "data_batch_2"
    blob = path.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in blob  # protocol 2 names globals as text lines
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    s = load_images("cifar10", tmp_path, val_fraction=0.0)
    assert len(s.train[1]) == 50


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    _write(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*(posix|os|nt)\.system.*not allowed"):
        load_images("cifar10", tmp_path)
    assert not marker.exists()
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(eval, protocol=2))  # builtins.eval itself
    with pytest.raises(DataError, match=r"data_batch_3.*__builtin__\.eval' is not allowed"):
        load_images("cifar10", tmp_path)


class _FakePointers:
    """An object array whose "pointers" are bytes the file chose: numpy.ndarray(shape, 'O', buffer=...)."""

    def __reduce__(self):
        return np.ndarray, ((1,), "O", b"\x41" * 8)


class _ObjectScalar:
    def __reduce__(self):
        return np.float64(0).__reduce__()[0], (np.dtype("O"), b"\x41" * 8)


@pytest.mark.parametrize("payload", ["labels-ndarray", "names-ndarray", "labels-scalar"])
def test_restricted_unpickler_builds_no_object_arrays(tmp_path, payload):
    """A crafted batch must be refused with a DataError, not dereference its bytes (which segfaults): run in a
    child process so that a regression fails this test instead of killing pytest."""
    _write(tmp_path)
    evil = _ObjectScalar() if payload.endswith("scalar") else _FakePointers()
    if payload.startswith("labels"):
        d = pickle.loads((tmp_path / "data_batch_1").read_bytes(), encoding="bytes")
        d[b"labels"] = evil
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    else:
        d = pickle.loads((tmp_path / "batches.meta").read_bytes(), encoding="bytes")
        d[b"label_names"] = [evil]
        (tmp_path / "batches.meta").write_bytes(pickle.dumps(d, protocol=2))
    code = ("from workbench.errors import DataError\nfrom workbench.data.images import load_images\n"
            f"try:\n    load_images('cifar10', {str(tmp_path)!r})\nexcept DataError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the loader crashed (status {out.returncode}): {out.stderr[-500:]}"
    assert out.stdout.startswith("refused:") and "not allowed" in out.stdout, out.stdout + out.stderr


def test_image_options_are_checked_before_loading():
    assert image_options_error("digits", 0, 0) is None and image_options_error("shapes", 600, 16) is None
    assert image_options_error("digits", 5000, 0)[0] == "n" and image_options_error("digits", 5, 0)[0] == "n"
    assert image_options_error("shapes", 0, 4)[0] == "size" and image_options_error("cifar10", 60_000, 0)[0] == "n"


def test_broken_cifar_files_give_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_images("cifar10", tmp_path)
    with pytest.raises(DataError, match="needs data_dir"):
        load_images("cifar10", "")
    assert find_cifar10(tmp_path) is None and find_cifar10("") is None

    _write(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 is missing"):
        load_images("cifar10", tmp_path)

    _write(tmp_path)
    bad = {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2.*uint8 of shape \(N, 3072\).*\(4, 3000\)"):
        load_images("cifar10", tmp_path)

    _write(tmp_path)
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: label 10 out of range 0\.\.9"):
        load_images("cifar10", tmp_path)

    _write(tmp_path)
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}
    (tmp_path / "data_batch_5").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="data_batch_5: 2 images but 1 labels"):
        load_images("cifar10", tmp_path)

    _write(tmp_path)
    (tmp_path / CIFAR_META_FILE).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="batches.meta could not be read"):
        load_images("cifar10", tmp_path)


def test_write_cifar_batches_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        write_cifar_batches(tmp_path, np.zeros((2, 3, 16, 16)), [0, 1], ["a", "b"], np.zeros((1, 3, 32, 32)), [0])
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        write_cifar_batches(tmp_path, np.zeros((2, 3, 32, 32)), [0, 2], ["a", "b"], np.zeros((1, 3, 32, 32)), [0])


def test_load_images_rejects_bad_arguments():
    with pytest.raises(DataError, match="unknown image set 'mnist'"):
        load_images("mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        load_images("digits", val_fraction=1.0)
    d = load_images("digits", n=200, size=16)
    assert sum(_split_sizes(d)) == 200 and d.shape == (1, 16, 16)
