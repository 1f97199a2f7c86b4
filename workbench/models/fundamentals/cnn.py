"""Convolutional networks: convolution, pooling, batch norm, and the ResNets of He et al. for 32x32 images.

What it is
    Image classifiers built from torch.nn's Conv2d, BatchNorm2d and MaxPool2d: a small plain CNN
    (conv-pool-conv-pool-fc, the LeNet pattern) and the CIFAR-style ResNet (a 3x3 stem, three stages of
    residual blocks at widths w, 2w, 4w and resolutions 32, 16, 8, global average pooling, one linear layer),
    with the two-layer `BasicBlock` (ResNet-20/56/110) or the three-layer `Bottleneck` (ResNet-164).
    `conv2d_im2col`, `max_pool2d_windows` and `batch_norm_train` spell the three operations out in plain
    tensor code, next to their equations; the tests check them against torch.nn on random inputs.

The math
    Convolution (cross-correlation, as every framework computes it). Input x (B, C, H, W), weight w (O, C, k, k),
        y[b, o, i, j] = bias[o] + sum_{c, u, v} w[o, c, u, v] * x[b, c, s*i + u - p, s*j + v - p]
        (zero outside the image), H_out = floor((H + 2p - k) / s) + 1. As a matrix product ("im2col"): gather
        every k x k x C patch into a column, then y = W_flat @ patches, W_flat of shape (O, C k k).
        Weights are shared over positions, so a conv layer has O C k^2 (+ O) parameters however large the
        image, and a pattern learnt at one place is detected everywhere (translation equivariance).
    Receptive field. A stack of n 3x3 stride-1 convs sees a (2n + 1)^2 window; a stride-2 layer doubles the
        step of everything after it. Two 3x3 layers see 5x5 with 2 * 9 C^2 weights instead of 25 C^2.
    Max pooling. y[b, c, i, j] = max_{u, v < k} x[b, c, s*i + u, s*j + v]: no parameters; a small shift of
        the input often leaves the output unchanged (some translation invariance) and the map shrinks s^2
        times. Global average pooling: y[b, c] = mean_{i, j} x[b, c, i, j].
    Batch norm, training. Per channel c, over the batch and all positions (m = B H W values):
        mu_c = mean x[:, c],  var_c = mean (x[:, c] - mu_c)^2  (biased),
        y = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c,
        running_mu <- (1 - momentum) running_mu + momentum mu_c, and the same for running_var with the
        unbiased var_c * m / (m - 1).
    Batch norm, evaluation. y = gamma_c (x - running_mu_c) / sqrt(running_var_c + eps) + beta_c: a fixed
        per-channel affine map, the same for an example whatever else is in its batch (tested). Forgetting
        model.eval() makes predictions depend on the batch and drift the running statistics.
    Residual block. y = relu(F(x) + S(x)), F = conv-BN-relu-conv-BN (basic) or 1x1-3x3-1x1 (bottleneck),
        S(x) = x when shapes agree, else a projection (1x1 conv with the block's stride, then BN) or, in the
        paper's option A, x subsampled by the stride and zero-padded to the new width.

The intuition
    Why residuals help. A block only has to learn the change F(x) = H(x) - x; if the best thing is to do
        nothing, F = 0 is easy to reach (weights near zero), while a plain layer must learn the identity.
        Backpropagation through y = x + F(x) gives dL/dx = dL/dy (I + dF/dx): the gradient reaches early
        layers along the identity path undiminished, instead of as a product of many Jacobians that shrinks
        or explodes with depth. He et al. show a 56-layer plain net training *worse* than a 20-layer one
        (an optimisation failure, not overfitting), and the residual version of the same depth training better.
    Why batch norm helps. Each layer sees inputs with a stable scale whatever the layers below did, so larger
        learning rates are safe; the batch statistics add noise that regularises; conv layers followed by BN
        need no bias (BN's beta replaces it).
    Bottleneck. The 1x1 layers shrink the width 4x around the expensive 3x3 layer, so a deeper net costs
        about the same as a shallower basic one.

Design choices
    Post-activation blocks (the 2015 paper): BN after each conv, the ReLU after the addition. The bottleneck
        puts the stride on its 3x3 conv (torchvision's "ResNet v1.5"), not on the first 1x1 as the paper did:
        a strided 1x1 conv ignores three pixels of every four.
    `shortcut = "projection"` (the default, option B) or `"pad"` (option A, what the CIFAR-10 table of the
        paper used, so resnet20 has exactly its published parameter count).
    `init_weights()`: Kaiming-normal convs (std = sqrt(2 / fan_out), He et al. 2015's derivation for ReLU
        through the backward pass), BN gamma 1 and beta 0, running statistics reset; optionally
        (`zero_init_residual`) the last BN of every block starts at gamma 0, so every block starts as the
        identity (Goyal et al.). The linear head keeps PyTorch's default uniform init. `__init__` is meta-device
        safe (built under torch.device("meta") it allocates nothing) and `init_weights()` only fills tensors
        in place, so a model can be built on meta, materialised with `to_empty()`, then initialised, like the
        other models.
    Models return logits (B, classes); the loss lives in the task (workbench/train/fundamentals/vision.py).

What differs from the papers
    He et al. trained with SGD (lr 0.1, momentum 0.9, weight decay 1e-4) for about 160 epochs with 4-pixel
    pad-and-crop and flips; the CPU configs (configs/fundamentals/resnet.toml) keep the augmentation but train
    for minutes with AdamW and a cosine schedule (docs/cnn.md gives the command for the paper's recipe).
    Bottleneck flavors use post-activation blocks; the published ResNet-164 used pre-activation ones (He et al.
    2016), whose parameter count differs only by where the BN layers sit.

Sources
    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv 1512.03385), section
    4.2; He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv 1603.05027); Ioffe &
    Szegedy, "Batch Normalization", ICML 2015 (arXiv 1502.03167); He et al., "Delving Deep into Rectifiers",
    ICCV 2015 (Kaiming init); Goyal et al., "Accurate, Large Minibatch SGD", 2017 (zero-init residuals);
    LeCun et al. 1998 (the conv-pool pattern); the torch.nn docs of Conv2d, BatchNorm2d, MaxPool2d. Read,
    not copied.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import fail, field_

# ----------------------------------------------------------------------------------------------------
# The operations, spelled out (checked against torch.nn in tests/unit/test_cnn.py)


def conv2d_im2col(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
                  padding: int = 0) -> Tensor:
    """Convolution as patches @ weights. x (B, C, H, W), weight (O, C, k, k) -> (B, O, H_out, W_out)."""
    b, c, h, w = x.shape
    o, _, k, _ = weight.shape
    h_out = (h + 2 * padding - k) // stride + 1
    w_out = (w + 2 * padding - k) // stride + 1
    x = F.pad(x, (padding, padding, padding, padding))
    # patches[b, c, i, j, u, v] = x[b, c, s*i + u, s*j + v]: (B, C, H_out, W_out, k, k)
    patches = x.unfold(2, k, stride).unfold(3, k, stride)
    # (B, C, H_out, W_out, k, k) -> (B, H_out, W_out, C k k): one row per output position
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, h_out, w_out, c * k * k)
    # y[b, o, i, j] = sum_{c, u, v} w[o, c, u, v] x[b, c, s*i + u - p, s*j + v - p] (+ bias[o])
    y = cols @ weight.reshape(o, c * k * k).T  # (B, H_out, W_out, O)
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2)  # (B, O, H_out, W_out)


def max_pool2d_windows(x: Tensor, k: int = 2, stride: int | None = None) -> Tensor:
    """Max pooling over k x k windows. x (B, C, H, W) -> (B, C, H_out, W_out)."""
    s = stride or k
    # (B, C, H_out, W_out, k, k) -> y[b, c, i, j] = max_{u, v} x[b, c, s*i + u, s*j + v]
    return x.unfold(2, k, s).unfold(3, k, s).amax(dim=(-2, -1))


def batch_norm_train(x: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
                     momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch norm in training mode over (B, C, H, W); updates the running statistics in place."""
    m = x.numel() // x.shape[1]  # values per channel: B H W
    # mu_c = mean over batch and positions; var_c = biased variance
    mu = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    # running <- (1 - momentum) running + momentum batch (the variance unbiased: var m / (m - 1))
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(momentum * mu)
        running_var.mul_(1 - momentum).add_(momentum * var * m / max(m - 1, 1))
    shape = (1, -1, 1, 1)
    # y = gamma (x - mu) / sqrt(var + eps) + beta
    return gamma.view(shape) * (x - mu.view(shape)) / torch.sqrt(var.view(shape) + eps) + beta.view(shape)


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    arch: Literal["resnet", "plain"] = field_("resnet", doc="resnet: the CIFAR ResNet; plain: conv-pool-conv-pool-fc")
    block: Literal["basic", "bottleneck"] = field_("basic", doc="resnet only: the residual block")
    blocks_per_stage: int = field_(3, gt=0, doc="resnet only: n; depth = 6n + 2 (basic) or 9n + 2 (bottleneck)")
    widths: tuple[int, int, int] = field_(
        (16, 32, 64), doc="resnet: the stem and stage widths w1, w2, w3 (bottleneck: inner width, output 4x); "
                          "plain: conv1 and conv2 channels, then the hidden fc width")
    shortcut: Literal["projection", "pad"] = field_(
        "projection", doc="resnet: how a block changes shape: 1x1 conv + BN (option B) or subsample + zero-pad (A)")
    zero_init_residual: bool = field_(False, doc="resnet: start every block's last BN at gamma = 0 (identity blocks)")
    in_channels: int = field_(3, gt=0, doc="image channels (set from the data by the task)")
    num_classes: int = field_(10, gt=1, doc="set from the data by the task")
    image_size: int = field_(32, ge=4, doc="plain only: input side, fixes the fc layer's input size")

    def validate(self) -> None:
        for i, w in enumerate(self.widths):
            if w <= 0:
                fail(f"widths[{i}]", f"expected a positive integer, got {w}")
        if self.arch == "plain" and self.image_size < 4:
            fail("image_size", "the plain CNN pools twice by 2: at least 4 pixels")

    @property
    def depth(self) -> int:
        """Weighted layers, counted as the papers do (stem + block convs + the fc layer)."""
        if self.arch == "plain":
            return 4
        per_block = 2 if self.block == "basic" else 3
        return 3 * self.blocks_per_stage * per_block + 2


FLAVORS: dict[str, Config] = {
    # CPU tests and quick runs
    "tiny": Config(blocks_per_stage=1, widths=(8, 16, 32)),
    "resnet8": Config(blocks_per_stage=1),
    # the CIFAR-10 table of He et al. 2015 (option B shortcuts; shortcut="pad" gives the published counts)
    "resnet20": Config(blocks_per_stage=3),
    "resnet32": Config(blocks_per_stage=5),
    "resnet56": Config(blocks_per_stage=9),
    "resnet110": Config(blocks_per_stage=18),
    # bottleneck blocks: 9n + 2 layers; resnet164 is He et al. 2016's CIFAR net (post-activation here)
    "bottleneck-tiny": Config(block="bottleneck", blocks_per_stage=1, widths=(8, 16, 32)),
    "resnet29-bottleneck": Config(block="bottleneck", blocks_per_stage=3),
    "resnet164": Config(block="bottleneck", blocks_per_stage=18),
    # the plain conv-pool-conv-pool-fc baseline
    "plain": Config(arch="plain", widths=(32, 64, 128)),
    "plain-tiny": Config(arch="plain", widths=(8, 16, 32)),
}


def make_config(flavor: str, **overrides) -> Config:
    """FLAVORS[flavor] with some fields replaced (in_channels, num_classes, image_size from the data)."""
    if flavor not in FLAVORS:
        fail("model", f"unknown flavor {flavor!r} (known: {', '.join(FLAVORS)})")
    cfg = dataclasses.replace(FLAVORS[flavor], **overrides)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------------
# Blocks


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # BN follows: its beta is the bias


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: S(x) = x[:, :, ::s, ::s] zero-padded from C_in to C_out channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"a pad shortcut cannot shrink {cin} channels to {cout}")
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]  # (B, C_in, H / s, W / s)
        # (B, C_in, ., .) -> (B, C_out, ., .): the new channels are zeros, split around the old ones
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def make_shortcut(cin: int, cout: int, stride: int, kind: str) -> nn.Module:
    """The identity when the shape is kept; otherwise a projection (1x1 conv + BN) or the pad shortcut."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + S(x)); output width = `width`."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv3x3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, cout), nn.BatchNorm2d(cout)
        self.shortcut = make_shortcut(cin, cout, stride, shortcut)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, width, H / s, W / s)
        out = self.bn2(self.conv2(out))
        # y = relu(F(x) + S(x))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """y = relu(BN(conv1x1 up)(relu(BN(conv3x3_s)(relu(BN(conv1x1 down)(x))))) + S(x)); output = 4 * width."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv1x1(cin, width), nn.BatchNorm2d(width)  # reduce to the inner width
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)  # the stride sits here (v1.5)
        self.conv3, self.bn3 = conv1x1(width, cout), nn.BatchNorm2d(cout)  # expand 4x
        self.shortcut = make_shortcut(cin, cout, stride, shortcut)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = F.relu(self.bn2(self.conv2(out)))  # (B, width, H / s, W / s)
        out = self.bn3(self.conv3(out))  # (B, 4 width, H / s, W / s)
        # y = relu(F(x) + S(x))
        return F.relu(out + self.shortcut(x))


# ----------------------------------------------------------------------------------------------------
# Models


class ResNet(nn.Module):
    """The CIFAR ResNet: stem, three stages (strides 1, 2, 2), global average pool, linear head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        w1 = cfg.widths[0]
        self.stem = nn.Sequential(conv3x3(cfg.in_channels, w1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True))
        cin = w1
        stages = []
        for i, (width, stride) in enumerate(zip(cfg.widths, (1, 2, 2))):
            blocks = []
            for j in range(cfg.blocks_per_stage):
                blocks.append(block(cin, width, stride if j == 0 else 1, cfg.shortcut))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
            setattr(self, f"stage{i + 1}", stages[-1])
        self.head = nn.Linear(cin, cfg.num_classes)
        self.features = cin

    def blocks(self) -> list[nn.Module]:
        return [b for s in (self.stage1, self.stage2, self.stage3) for b in s]

    def init_weights(self) -> None:
        init_conv_bn_linear(self)
        if self.cfg.zero_init_residual:
            for b in self.blocks():
                nn.init.zeros_(b.last_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, w1, H, W)
        x = self.stage3(self.stage2(self.stage1(x)))  # (B, 4 w1 or 16 w1, H / 4, W / 4)
        # global average pool: (B, C, H', W') -> (B, C)
        x = x.mean(dim=(2, 3))
        return self.head(x)  # (B, classes)


def init_conv_bn_linear(model: nn.Module) -> None:
    """Kaiming (fan-out) convolutions, BN as the identity with fresh running statistics, torch's default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # std = sqrt(2 / fan_out), fan_out = out_channels k^2
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


class PlainCNN(nn.Module):
    """conv3x3-BN-relu-maxpool2, conv3x3-BN-relu-maxpool2, flatten, fc-relu, fc: the pre-ResNet pattern."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        c1, c2, hidden = cfg.widths
        self.conv1, self.bn1 = conv3x3(cfg.in_channels, c1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = conv3x3(c1, c2), nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        side = cfg.image_size // 4  # two 2x2 pools, flooring as MaxPool2d does
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, cfg.num_classes)

    def init_weights(self) -> None:
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # (B, c1, H / 2, W / 2)
        x = self.pool(F.relu(self.bn2(self.conv2(x))))  # (B, c2, H / 4, W / 4)
        x = x.flatten(1)  # (B, c2 H W / 16)
        return self.fc2(F.relu(self.fc1(x)))  # (B, classes)


def build(cfg: Config, *, init: bool = True) -> nn.Module:
    """The model for `cfg`, initialised by `init_weights()` unless init=False (e.g. on the meta device)."""
    cfg.validate()
    model = ResNet(cfg) if cfg.arch == "resnet" else PlainCNN(cfg)
    if init:
        model.init_weights()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """Multiply-adds x 2 of the conv and linear layers for one (C, H, W) image (BN, pooling, adds left out)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            # 2 * C_in k^2 / groups multiply-adds per output value
            total += 2 * out.numel() * m.in_channels * math.prod(m.kernel_size) // m.groups
        elif isinstance(m, nn.Linear):
            total += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *shape, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
