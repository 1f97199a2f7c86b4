"""Task "diffusion": train a small text-to-image diffusion model on captioned shapes or digits, with EMA weights.

    workbench diffusion configs/diffusion/shapes.toml [--resume] [--section.key value ...]

What it does
    1. Data (`workbench.data.captioned`): 16-32 px shapes (generated) or digits (scikit-learn), each with a
       caption from its class ("a circle", "a drawing of a star"); splits from run.seed.
    2. Model (`TextToImage`): part C's UNet (workbench/models/diffusion/unet.py) in pixel space, conditioned
       through its cross-attention on
         caption   the hidden states of a small transformer over the caption's words (contrastive.TextTower),
                   trained jointly with the UNet from scratch (the Imagen / SD recipe with a tiny encoder
                   that learns instead of a frozen one);
         class     a one-token learned class embedding (the UNet file's ClassContext).
       Classifier-free guidance is trained by condition dropout: with probability `cond_dropout` an
       example's caption is replaced by the empty caption (bos eos), or its class by the null class.
    3. Training through the runner's loop (`Context.fit`, workbench/train/fundamentals/runner.py): per
       batch t ~ U{0..T-1} and eps ~ N(0, I) from torch's global generator (saved in checkpoints, so a
       resume is exact), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with x0 = 2 x - 1 in [-1, 1], and the
       mean squared error to the schedule's target (eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0) through
       part C's `schedulers.diffusion_loss`.
    4. EMA. After every optimizer step (the runner's `after_step` hook)
           theta_ema <- d theta_ema + (1 - d) theta,   d = min(ema_decay, (1 + s) / (10 + s))  (warm-up)
       The EMA copy lives in the same module as the trained net (`Diffusion.ema`, no gradients), so it is in
       every checkpoint's model.safetensors (keys ema.*) and resumes bit for bit. Sampling and evals use it.
    5. Pictures. A sample grid (one row per class, prompted with the class's plain caption, DDIM with
       guidance, the same starting noise every time) every `grid_every` epochs (samples-step-N.png) and at
       the end (samples.png from the EMA weights, samples-raw.png from the trained weights beside it).
       Validation records the loss of the trained and the EMA weights on the val split with fixed (t, eps),
       and the loss of predicting 0, the reference line in loss.png.

Sampling with classifier-free guidance (Ho & Salimans 2021), batched [uncond, cond] as Stable Diffusion does:
    out = out_u + w (out_c - out_u), then one DDIM step (Song et al. 2020) of part C's sampler.

The evals of a finished run (FID, class accuracy, CLIP-style score against networks the project trains on the
same data) are `workbench eval --task diffusion --ckpt RUN_DIR` (evals/tasks/diffusion.py); `load_run` is how
they get the model.

Design choices
    Pixel space, no VAE: at 16-32 px the autoencoder would cost more than it saves, and the UNet is the part
    this task exercises. The default schedule is improved DDPM's cosine with v targets ("cosine-v"): its
    abar_T is 2e-9, so sampling starts from pure noise as training ended there (SD's scaled-linear keeps
    abar_T = 0.0047, the signal at t = T that Lin et al. 2023 call flawed), and v stays well scaled at both ends.
    Not compared here against the other schedules: the choice follows the papers, not a measurement.
    Guidance: the best weight depends on the model (docs/diffusion-training.md measured 1.5 for the digits
    model, where w >= 3 saturates the samples, and 3 for the shapes model); `--diffusion.guidance_sweep` in
    the eval finds it.
    EMA decay warm-up: with a fixed d = 0.999 the first thousand steps would average in the random init.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from workbench.config import fail, field_
from workbench.train.fundamentals.runner import Context, Task

__all__ = ["Config", "TextToImage", "Diffusion", "ema_decay_at", "ema_update", "sample", "load_run", "DiffusionRun"]


@dataclass
class Config:
    dataset: Literal["shapes", "digits"] = field_("shapes", doc="the captioned image set (workbench.data.captioned)")
    n: int = field_(0, ge=0, doc="shapes: images rendered (0 = 6000); digits: a seeded subset (0 = all)")
    size: int = field_(16, ge=0, doc="image side in pixels (shapes are rendered at it, digits resized)")
    val_fraction: float = field_(0.1, ge=0, lt=1)
    conditioning: Literal["caption", "class"] = field_("caption", doc="caption: a text tower trained jointly; "
                                                                     "class: a learned class embedding")
    channels: list[int] = field_([32, 64], doc="UNet block widths; every block after the first has cross-attention")
    layers_per_block: int = field_(1, gt=0)
    heads: int = field_(2, gt=0, doc="attention heads per block")
    norm_groups: int = field_(8, gt=0)
    context_dim: int = field_(32, gt=0, doc="the caption / class embedding width (the UNet's cross_attention_dim)")
    text_layers: int = field_(1, ge=1, doc="caption: transformer layers of the text tower")
    schedule: str = field_("cosine-v", doc="a flavor of workbench.models.diffusion.schedulers.FLAVORS")
    prediction_type: Literal["", "epsilon", "v_prediction"] = field_("", doc="'' = the schedule's own")
    cond_dropout: float = field_(0.1, ge=0, lt=1, doc="probability that an example trains the unconditional model")
    ema_decay: float = field_(0.999, ge=0, lt=1)
    ema_warmup: bool = field_(True, doc="d = min(ema_decay, (1 + step) / (10 + step))")
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = field_(25, gt=0)
    guidance: float = field_(3.0, ge=0, doc="classifier-free guidance weight w (1 = no guidance, 0 = unconditional)")
    eta: float = field_(0.0, ge=0, le=1, doc="DDIM noise (0 = deterministic)")
    grid_every: int = field_(5, ge=0, doc="a sample grid every N epochs (0 = only at the end)")
    grid_per_class: int = field_(8, gt=0)
    eval_batch_size: int = field_(256, gt=0)

    def validate(self) -> None:
        from workbench.data.images import image_options_error
        from workbench.models.diffusion.schedulers import FLAVORS

        if bad := image_options_error(self.dataset, self.n, self.size):
            fail(*bad)
        if not self.size:
            fail("size", "give the side in pixels (the UNet is built for it)")
        if not self.channels:
            fail("channels", "expected at least one block width")
        for i, c in enumerate(self.channels):
            if c <= 0 or c % self.norm_groups or c % self.heads:
                fail(f"channels[{i}]", f"expected a positive multiple of norm_groups = {self.norm_groups} and "
                                       f"heads = {self.heads}, got {c}")
        if self.size % 2 ** (len(self.channels) - 1):
            fail("size", f"{len(self.channels)} blocks halve the image {len(self.channels) - 1} times: size must be a "
                         f"multiple of {2 ** (len(self.channels) - 1)}, got {self.size}")
        if self.context_dim % 2:
            fail("context_dim", f"expected an even number (the text tower's 2 heads), got {self.context_dim}")
        if self.schedule not in FLAVORS:
            fail("schedule", f"expected one of {', '.join(FLAVORS)}, got {self.schedule!r}")


def schedule_config(cfg: Config):
    from workbench.models.diffusion.schedulers import FLAVORS

    sched = FLAVORS[cfg.schedule]
    return dataclasses.replace(sched, prediction_type=cfg.prediction_type) if cfg.prediction_type else sched


# ----------------------------------------------------------------------------------------------------
# The model


class TextToImage(nn.Module):
    """The condition encoder and the UNet: `forward(x_t, t, cond)` -> the schedule's prediction.

    cond is (B, L) word ids (conditioning = "caption") or (B,) class labels ("class"); `null(B)` is the
    unconditional input (the empty caption, or the null class `num_classes`)."""

    def __init__(self, cfg: Config, in_channels: int, num_classes: int, vocab_size: int, max_len: int):
        super().__init__()
        from workbench.models import contrastive
        from workbench.models.diffusion.unet import ClassContext, UNet
        from workbench.models.diffusion.unet import Config as UNetConfig

        self.conditioning, self.num_classes, self.max_len = cfg.conditioning, num_classes, max_len
        n = len(cfg.channels)
        self.unet = UNet(UNetConfig(
            in_channels=in_channels, out_channels=in_channels, sample_size=cfg.size, block_out_channels=list(cfg.channels),
            down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
            up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=cfg.layers_per_block,
            attention_heads=[cfg.heads] * n, cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups))
        if cfg.conditioning == "caption":
            # the contrastive model's text tower; only its text fields are read
            tcfg = contrastive.Config(vocab_size=vocab_size, max_len=max_len, text_width=cfg.context_dim,
                                      text_layers=cfg.text_layers, text_heads=2, image_widths=(8,), groups=8)
            self.encoder: nn.Module = contrastive.TextTower(tcfg)
        else:
            self.encoder = ClassContext(num_classes, cfg.context_dim)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.unet.init_weights()
        self.encoder.init_weights()  # the class embedding (unet.ClassContext) or the caption tower (contrastive.TextTower)

    def context(self, cond: Tensor) -> Tensor:
        """(B, L, context_dim): the caption's hidden states, or the class's one token."""
        return self.encoder(cond)[0] if self.conditioning == "caption" else self.encoder(cond)

    def null(self, b: int, device=None) -> Tensor:
        from workbench.data.captioned import BOS, EOS, PAD

        if self.conditioning == "class":
            return torch.full((b,), self.num_classes, dtype=torch.int64, device=device)
        ids = torch.full((b, self.max_len), PAD, dtype=torch.int64, device=device)
        ids[:, 0], ids[:, 1] = BOS, EOS  # the empty caption
        return ids

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x_t, t, self.context(cond))


class Diffusion(nn.Module):
    """The trained net and its EMA copy in one module, so checkpoints and resume carry both (see the module notes)."""

    def __init__(self, net: TextToImage):
        super().__init__()
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)

    def forward(self, *args):
        return self.net(*args)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay of the update after optimizer step `step` (1-based): min(decay, (1 + s) / (10 + s)) with warm-up."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """theta_ema <- d theta_ema + (1 - d) theta for every parameter; buffers are copied."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)  # e + (1 - d)(p - e) = d e + (1 - d) p
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


@torch.no_grad()
def sample(net: TextToImage, cond: Tensor, shape: tuple[int, int, int], sched_cfg, *, steps: int = 25,
           guidance: float = 3.0, eta: float = 0.0, sampler: str = "ddim", generator: torch.Generator | None = None,
           batch_size: int = 256) -> Tensor:
    """Images (N, C, H, W) in [0, 1] for conditions `cond` (N, ...), classifier-free guided (see the module notes).
    The starting noise and any sampler noise come from `generator` (CPU), so a seed gives the same images."""
    from workbench.models.diffusion.schedulers import make_sampler, randn

    device = next(net.parameters()).device
    out = []
    for lo in range(0, len(cond), batch_size):
        c = cond[lo:lo + batch_size].to(device)
        b = len(c)
        s = make_sampler(sampler, sched_cfg)
        timesteps = s.set_timesteps(steps)
        x = randn((b, *shape), generator, device, torch.float32)
        both = torch.cat([net.null(b, device), c])  # [uncond, cond]
        ctx = net.context(both)
        for t in timesteps:
            tt = torch.full((2 * b,), int(t), device=device)
            # out = out_u + w (out_c - out_u)
            out_u, out_c = net.unet(torch.cat([x, x]), tt, ctx).chunk(2)
            pred = out_u + guidance * (out_c - out_u)
            kw = {"eta": eta} if sampler == "ddim" else {}
            x = s.step(pred, t, x, generator=generator, **kw).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def class_conditions(net: TextToImage, data, classes: Tensor) -> Tensor:
    """The condition asking for each class in `classes` (N,): its plain caption's ids, or the label itself."""
    if net.conditioning == "class":
        return classes.clone()
    return data.vocab.encode([data.prompt(int(k)) for k in classes])


def _build(cfg: Config, data) -> TextToImage:
    c = data.images.train[0].shape[1]
    return TextToImage(cfg, c, len(data.classes), len(data.vocab), data.vocab.length)


def _load_data(cfg: Config, seed: int):
    from workbench.data.captioned import load_captioned

    return load_captioned(cfg.dataset, seed=seed, val_fraction=cfg.val_fraction, n=cfg.n, size=cfg.size)


# ----------------------------------------------------------------------------------------------------
# The task


def run(ctx: Context, cfg: Config) -> None:
    from workbench.models.diffusion.schedulers import NoiseSchedule, diffusion_loss
    from workbench.train.fundamentals.plots import image_grid

    seed = ctx.job.run.seed
    data = _load_data(cfg, seed)
    ctx.log(f"diffusion: {data.images.summary()}; captions like {data.captions['train'][:3]}")
    x_train, y_train = data.images.train
    x_val, y_val = data.images.val
    ids_train, ids_val = data.tokens("train"), data.tokens("val")
    model = Diffusion(_build(cfg, data))
    sched_cfg = schedule_config(cfg)
    sched = NoiseSchedule(sched_cfg)
    kind = sched_cfg.prediction_type
    k, shape = len(data.classes), tuple(x_train.shape[1:])
    params = sum(p.numel() for p in model.net.parameters())
    ctx.log(f"diffusion: {params:,} parameters ({cfg.conditioning}-conditioned UNet {cfg.channels}), schedule "
            f"{cfg.schedule} ({kind}), {cfg.sampler} sampling in {cfg.sample_steps} steps with guidance {cfg.guidance}")

    # validation: fixed (t, eps) so every epoch's loss is measured on the same noise
    g = torch.Generator().manual_seed(seed * 7919 + 2)
    t_val = torch.randint(0, sched.num_train_timesteps, (len(y_val),), generator=g)
    eps_val = torch.randn(x_val.shape, generator=g)
    cond_val = ids_val if cfg.conditioning == "caption" else y_val
    target_val = sched.target(2 * x_val - 1, eps_val, t_val)
    zero_loss = target_val.square().mean().item() if len(y_val) else float("nan")
    ctx.runlog.ylabel = f"mean squared error of the {kind} prediction"
    ctx.runlog.baselines["predict 0"] = zero_loss
    grid_cond = class_conditions(model.net, data, torch.arange(k).repeat_interleave(cfg.grid_per_class))
    n_batches = math.ceil(len(y_train) / ctx.job.train.batch_size)
    total = ctx.total_steps(len(y_train))  # the last step's grid is samples.png, drawn after fit
    state = {"step": ctx.step}

    def grid(net: TextToImage, filename: str, caption: str) -> None:
        images = sample(net, grid_cond, shape, sched_cfg, steps=cfg.sample_steps, guidance=cfg.guidance, eta=cfg.eta,
                        sampler=cfg.sampler, generator=torch.Generator().manual_seed(seed + 1),
                        batch_size=cfg.eval_batch_size)
        image_grid(images, cfg.grid_per_class, ctx.figure(filename, caption), title=caption.split(";")[0],
                   row_labels=[data.prompt(i) for i in range(k)])

    def val_loss(net: TextToImage) -> float:
        total = 0.0
        for lo in range(0, len(y_val), cfg.eval_batch_size):
            sl = slice(lo, lo + cfg.eval_batch_size)
            x_t = sched.add_noise(2 * x_val[sl] - 1, eps_val[sl], t_val[sl])
            out = net(x_t.to(ctx.device), t_val[sl].to(ctx.device), cond_val[sl].to(ctx.device))
            total += diffusion_loss(out.cpu(), 2 * x_val[sl] - 1, eps_val[sl], t_val[sl], kind, sched).item() * len(x_t)
        return total / len(y_val)

    def evaluate(m: Diffusion) -> dict[str, float]:
        step = state["step"]
        if cfg.grid_every and 0 < step < total and step % (cfg.grid_every * n_batches) == 0:
            grid(m.ema, f"samples-step-{step}.png", f"EMA samples at step {step} (epoch {step // n_batches}); one row "
                                                    f"per prompt, guidance {cfg.guidance}")
        return {"loss": val_loss(m.net), "loss_ema": val_loss(m.ema)} if len(y_val) else {}

    def loss_fn(m: Diffusion, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        x, ids, y = batch
        b = len(x)
        cond = ids if cfg.conditioning == "caption" else y
        # condition dropout: these examples train the unconditional model (the guidance's out_u)
        drop = torch.rand(b, device=x.device) < cfg.cond_dropout
        null = m.net.null(b, x.device)
        cond = torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), null, cond)
        x0 = 2 * x - 1  # [0, 1] -> [-1, 1]
        t = sched.sample_timesteps(b, device=x.device)
        noise = torch.randn_like(x0)
        x_t = sched.add_noise(x0, noise, t)
        loss = diffusion_loss(m.net(x_t, t, cond), x0, noise, t, kind, sched)
        return loss, {}

    def after_step(step: int) -> None:
        state["step"] = step
        ema_update(model.ema, model.net, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))

    t0 = time.perf_counter()
    ctx.fit(model, (x_train, ids_train, y_train), loss_fn, evaluate, after_step=after_step)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        final = {"loss": val_loss(model.net), "loss_ema": val_loss(model.ema)} if len(y_val) else {}
    grid(model.ema, "samples.png", f"EMA samples after {ctx.job.train.epochs} epochs; one row per prompt, "
                                   f"{cfg.sampler} {cfg.sample_steps} steps, guidance {cfg.guidance}")
    grid(model.net, "samples-raw.png", "samples of the trained (not averaged) weights; the same noise and prompts")
    real = torch.cat([x_train[y_train == i][:cfg.grid_per_class] for i in range(k)])
    if len(real) == k * cfg.grid_per_class:
        image_grid(real, cfg.grid_per_class, ctx.figure("real.png", "training images, one row per class"),
                   title="training images", row_labels=data.classes)
    if final:
        ctx.result("val_loss", final["loss"], f"{kind} MSE on the val split, fixed noise, trained weights")
        ctx.result("val_loss_ema", final["loss_ema"], f"the same with the EMA weights (decay {cfg.ema_decay})")
        ctx.result("val_loss_predict_zero", zero_loss, "the same for a model that always predicts 0")
    ctx.result("parameters", params, f"{cfg.conditioning}-conditioned UNet {cfg.channels} + its condition encoder")
    ctx.result("train_seconds", round(seconds, 1), f"ctx.fit wall time on {ctx.device}, validation and grids included")
    ctx.result("dataset", data.images.name, data.images.source)


TASKS = {"diffusion": Task(config=Config, run=run)}


# ----------------------------------------------------------------------------------------------------
# Loading a finished run (the evals, `workbench sample`)


@dataclass
class DiffusionRun:
    """A trained run: its EMA model, task config, seed and source; `data()` reloads its captioned images."""

    net: TextToImage
    cfg: Config
    seed: int
    source: dict
    job: object = None
    _data: object = field(default=None, repr=False)

    def data(self):
        if self._data is None:
            self._data = _load_data(self.cfg, self.seed)
        return self._data

    def generate(self, classes: Tensor, *, guidance: float | None = None, steps: int | None = None,
                 eta: float | None = None, generator: torch.Generator | None = None, batch_size: int = 256) -> Tensor:
        """Images (N, C, H, W) in [0, 1] asking for each class of `classes` (N,) with its plain caption."""
        cfg = self.cfg
        x = self.data().images.train[0]
        return sample(self.net, class_conditions(self.net, self.data(), classes), tuple(x.shape[1:]),
                      schedule_config(cfg), steps=steps or cfg.sample_steps,
                      guidance=cfg.guidance if guidance is None else guidance, eta=cfg.eta if eta is None else eta,
                      sampler=cfg.sampler, generator=generator, batch_size=batch_size)


def is_diffusion_run(path: str | Path) -> bool:
    """Whether `path` (a run folder or one of its checkpoints) holds a `workbench diffusion` run."""
    from workbench.train.fundamentals.runner import is_task_run

    return is_task_run(path, ("diffusion",))


def load_run(ckpt: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> DiffusionRun:
    """The EMA (or, ema=False, the trained) model of a diffusion run folder or checkpoint, verified first."""
    from workbench.train.fundamentals.runner import load_task_checkpoint

    ck = load_task_checkpoint(ckpt, ("diffusion",))
    cfg = ck.job.task.config
    run = DiffusionRun(net=None, cfg=cfg, seed=ck.job.run.seed, job=ck.job,  # type: ignore[arg-type]
                       source=ck.source)
    net = _build(cfg, run.data())
    prefix = "ema." if ema else "net."
    ck.load_into(net, {k[len(prefix):]: v for k, v in ck.tensors.items() if k.startswith(prefix)})
    run.net = net.to(device).eval()
    return run


def prompt_condition(run: DiffusionRun, prompt: str) -> Tensor:
    """The condition (1, ...) of a free-text prompt for `run`: its word ids (caption runs), or the class whose
    word the prompt names (class runs). A word outside the run's caption vocabulary is an error naming it."""
    from workbench.errors import WorkbenchError

    data = run.data()
    words = prompt.lower().split()
    unknown = [w for w in words if w not in data.vocab.index]
    if unknown:
        raise WorkbenchError(f"sample: the prompt's word {unknown[0]!r} is not in this run's caption vocabulary "
                             f"({', '.join(data.vocab.words[4:])})")
    if run.net.conditioning == "caption":
        return data.vocab.encode([prompt])
    named = [k for k, w in enumerate(data.words) if w in words]
    if len(named) != 1:
        raise WorkbenchError(f"sample: a class-conditioned run needs a prompt naming one class "
                             f"({', '.join(data.words)}), got {prompt!r}")
    return torch.tensor(named)
