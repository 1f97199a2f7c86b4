"""Tasks "video_vae" and "video": train the causal video VAE, then a text-to-video AsymmDiT in its latent space.

    workbench video configs/video/vae.toml [--resume] [--section.key value ...]     # -> runs/video-vae
    workbench video configs/video/dit.toml [--resume] [--section.key value ...]     # -> runs/video-dit

What it does
    Data: `workbench.data.moving_shapes`, one coloured shape crossing a dark 32 x 32 frame over 9 frames, with
    a caption ("a red circle moving left"); the splits come from (n, frames, size, run.seed, val_fraction,
    test_fraction), the run's `data_settings`.

    video_vae (workbench/models/video/vae.py, Mochi's causal AsymmVAE, the "small" CPU flavor by default:
        4x spatial, 2x temporal, 4 channels, so a 9 x 32 x 32 clip is 5 x 8 x 8 x 4 latents):
        L = mean_pixels (D(z) - x)^2 + kl_weight * KL(q(z | x) || N(0, I)) / (latent elements),
        z ~ q(z | x) by the reparameterisation. The KL term is per latent element (not summed over a sample as
        the ELBO would) so its weight reads the same at any latent size; a small weight keeps the latents
        bounded and smooth without blurring the reconstruction. Validation: reconstruction MSE (posterior
        mean; logged as val_loss) beside the baseline of the per-pixel mean training video, and the KL. Every validation also
        writes the per-channel mean and std of the posterior means of the first `stats_videos` training
        videos into the VAE's latents_mean / latents_std buffers, so every checkpoint (the last included)
        carries the statistics of its own weights: the diffusion task reads normalized latents
        normalize(z) = (z - mean_c) / std_c from it. Pictures: recon.png (input row above reconstruction row
        per video), and the latent statistics in results.json.

    video (workbench/models/video/mochi.py's AsymmDiT, "small" flavor, trained with flow.py's rectified flow):
        1. Loads the VAE of `vae_run` (a finished video_vae run folder: refused with the reason if it is not),
           encodes every split once to normalized posterior-mean latents, and keeps the VAE, frozen, inside
           the checkpoint (keys vae.*), so a video run folder alone generates videos.
        2. Text: the caption's word ids (`moving_shapes.vocab()`) through a small transformer
           (contrastive.TextTower, width = the DiT's text_dim) trained jointly with the DiT; its hidden
           states are the DiT's text tokens, the mask is "not pad".
        3. Loss: flow.flow_loss (z_sigma = (1 - sigma) x0 + sigma eps, the DiT predicts x0 - eps, sigma ~
           U[0, 1)). Caption dropout: with probability cond_dropout an example's caption becomes the empty
           caption (bos eos), which trains the unconditional velocity classifier-free guidance needs.
        4. EMA of the text tower and the DiT (workbench.train.diffusion's ema_update / ema_decay_at, the same
           warm-up), kept in the module (keys ema.*), so it resumes bit for bit; samples use it.
        5. Validation at fixed (sigma, eps): the flow loss of the trained and the EMA weights, and of the
           EMA weights given the empty caption ("text-blind": how much the caption helps), beside the loss of
           predicting 0 (E|x0 - eps|^2, about 2 for unit-variance latents).
        6. Samples (flow.sample: Euler steps on Mochi's linear-quadratic schedule, guidance batched
           [uncond; cond]) from the EMA weights, the same starting noise every time, for one prompt per
           shape x direction (colours cycling): samples-step-N.png / .gif every `samples_every` epochs,
           samples.png (one row per prompt, one column per frame) and samples.gif (a 4-column grid) at the
           end. `judge` reads the direction of motion (centroid of the bright pixels, first to last frame)
           and the colour (nearest named colour of the bright pixels) back from pixels: the share of samples
           that move the asked way and have the asked colour is recorded beside the same share on real
           val videos (which checks the judge).

Loading a finished run: `load_run(RUN_DIR)` -> VideoRun with `.data_settings` (for load_moving_shapes) and
`.generate(prompts, seed, steps, guidance)` -> uint8 (N, T, 3, H, W) (the evals' entry, evals/tasks/video.py).

Design choices
    Two runs, not one: the VAE is trained once and reused by every diffusion run (Mochi's and SD's recipe);
    the VAE's weights are copied into the diffusion checkpoint so a finished run does not depend on the VAE
    folder staying where it was. Posterior means, not samples, are the diffusion data: the VAE's posterior
    variance is tiny after training, and fixed latents make an epoch cheap (encoded once).
    The data settings of the diffusion run are the VAE run's: the VAE's latent statistics were measured on
    that training split, and its val / test videos were never trained on by either model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from workbench.config import fail, field_, from_dict, to_dict
from workbench.errors import WorkbenchError
from workbench.train.diffusion import ema_decay_at, ema_update
from workbench.train.fundamentals.runner import Context, Task

__all__ = ["VAEConfig", "Config", "TextVideoNet", "VideoDiffusion", "VideoRun", "load_run", "is_video_run",
           "load_vae_run", "judge", "grid_prompts"]

VIDEO_FILE = "video.json"  # in a video run folder: data settings and the VAE it was trained on


def _data_fields_error(cfg) -> tuple[str, str] | None:
    from workbench.data.moving_shapes import options_error

    return options_error(cfg.n, cfg.frames, cfg.size, cfg.val_fraction, cfg.test_fraction)


@dataclass
class VAEConfig:
    n: int = field_(2048, gt=0, doc="moving-shapes videos rendered (split into train / val / test)")
    frames: int = field_(9, gt=1, doc="frames per video: 1 + a multiple of the VAE's temporal factor")
    size: int = field_(32, gt=0, doc="frame side in pixels: a multiple of the VAE's spatial factor")
    val_fraction: float = field_(0.1, ge=0, lt=1)
    test_fraction: float = field_(0.1, ge=0, lt=1)
    flavor: str = field_("small", doc="a flavor of workbench.models.video.vae.FLAVORS")
    encoder_channels: list[int] = field_([], doc="override the flavor's encoder widths ([] = the flavor's)")
    decoder_channels: list[int] = field_([], doc="override the flavor's decoder widths ([] = the flavor's)")
    kl_weight: float = field_(1e-4, ge=0, doc="weight of the KL per latent element against the pixel MSE")
    stats_videos: int = field_(512, gt=0, doc="training videos whose latents set latents_mean / latents_std")
    recon_videos: int = field_(8, gt=0, doc="val videos in recon.png")
    eval_batch_size: int = field_(64, gt=0)

    def vae_config(self):
        from workbench.models.video.vae import FLAVORS

        cfg = FLAVORS[self.flavor]
        for key in ("encoder_channels", "decoder_channels"):
            if getattr(self, key):
                cfg = dataclasses.replace(cfg, **{key: list(getattr(self, key))})
        return cfg

    def validate(self) -> None:
        from workbench.models.video.vae import FLAVORS

        if bad := _data_fields_error(self):
            fail(*bad)
        if self.flavor not in FLAVORS:
            fail("flavor", f"expected one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        cfg = self.vae_config()
        cfg.validate()
        tf, s = cfg.temporal_factor, cfg.spatial_factor
        if (self.frames - 1) % tf:
            fail("frames", f"the {self.flavor!r} VAE compresses time {tf}x: expected 1 + a multiple of {tf}, got {self.frames}")
        if self.size % s:
            fail("size", f"the {self.flavor!r} VAE compresses space {s}x: expected a multiple of {s}, got {self.size}")


@dataclass
class Config:
    vae_run: str = field_("runs/video-vae", doc="a finished video_vae run folder (its VAE and data settings are used)")
    flavor: str = field_("small", doc="a flavor of workbench.models.video.mochi.FLAVORS")
    text_layers: int = field_(1, ge=1, doc="transformer layers of the caption tower")
    cond_dropout: float = field_(0.1, ge=0, lt=1, doc="probability an example trains the unconditional model")
    ema_decay: float = field_(0.999, ge=0, lt=1)
    ema_warmup: bool = field_(True, doc="d = min(ema_decay, (1 + step) / (10 + step))")
    sample_steps: int = field_(32, gt=0, doc="Euler steps of the sampler")
    guidance: float = field_(3.0, ge=0, doc="classifier-free guidance weight (<= 1: conditional only)")
    samples_every: int = field_(5, ge=0, doc="sample strips + GIFs every N epochs (0 = only at the end)")
    eval_batch_size: int = field_(64, gt=0)

    def validate(self) -> None:
        from workbench.models.video.mochi import FLAVORS

        if self.flavor not in FLAVORS:
            fail("flavor", f"expected one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        if not self.vae_run:
            fail("vae_run", "give the folder of a finished video_vae run (workbench video configs/video/vae.toml)")
        if FLAVORS[self.flavor].text_dim % 2:
            fail("flavor", f"the caption tower has 2 heads: the flavor's text_dim must be even, "
                           f"got {FLAVORS[self.flavor].text_dim}")


def data_settings(cfg, seed: int) -> dict:
    """The keyword arguments of load_moving_shapes for a config with the data fields and a run seed."""
    return {"n": cfg.n, "frames": cfg.frames, "size": cfg.size, "seed": seed, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction}


# ----------------------------------------------------------------------------------------------------
# The judge: direction and colour read back from pixels


def judge(videos: Tensor) -> tuple[Tensor, Tensor]:
    """(direction, colour) indices (N,) read from uint8 videos (N, T, 3, H, W): the direction whose unit step is
    closest to the centroid's displacement from the first to the last frame, and the named colour nearest the
    mean colour of the bright pixels. The centroid weights each pixel by its brightness above the frame's
    darkest pixel (the background), so it works on blurry generated frames too."""
    from workbench.data.moving_shapes import COLOURS, DIRECTIONS, RGB, STEP

    v = videos.float() / 255.0
    bright = v.amax(dim=2)  # (N, T, H, W)
    w = (bright - bright.amin(dim=(2, 3), keepdim=True)).clamp_min(0)
    h, wd = bright.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=v.dtype), torch.arange(wd, dtype=v.dtype), indexing="ij")
    mass = w.sum(dim=(2, 3)).clamp_min(1e-6)  # (N, T)
    # centroid c_t = sum_p w_p p / sum_p w_p
    cx, cy = (w * xs).sum(dim=(2, 3)) / mass, (w * ys).sum(dim=(2, 3)) / mass
    move = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], dim=1)  # (N, 2)
    steps = torch.tensor([STEP[d] for d in DIRECTIONS], dtype=v.dtype)  # (K, 2)
    direction = (move @ steps.T).argmax(dim=1)
    # colour: the weighted mean RGB of pixels above half the frame's foreground brightness
    fg = (w > 0.5 * w.amax(dim=(2, 3), keepdim=True)).to(v.dtype)  # (N, T, H, W)
    mean = (v * fg[:, :, None]).sum(dim=(1, 3, 4)) / fg.sum(dim=(1, 2, 3)).clamp_min(1)[:, None]  # (N, 3)
    named = torch.tensor([RGB[c] for c in COLOURS], dtype=v.dtype)  # (C, 3)
    # compare chromaticity (colour / its brightness) so dim shapes still read as their colour
    unit = lambda a: a / a.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # noqa: E731
    colour = (unit(mean) @ unit(named).T).argmax(dim=1)
    return direction, colour


def grid_prompts() -> list[tuple[int, int, int]]:
    """(shape, colour, direction) of the sample grid: every shape x direction, colour (shape + direction) mod 4."""
    from workbench.data.moving_shapes import COLOURS, DIRECTIONS, SHAPES

    return [(s, (s + d) % len(COLOURS), d) for s in range(len(SHAPES)) for d in range(len(DIRECTIONS))]


# ----------------------------------------------------------------------------------------------------
# Task video_vae


def _build_vae(cfg: VAEConfig):
    from workbench.models.video.vae import CausalVideoVAE

    return CausalVideoVAE(cfg.vae_config())


@torch.no_grad()
def encode_means(vae, videos: Tensor, batch_size: int, device) -> Tensor:
    """Posterior means (N, C_z, T_lat, h, w) of uint8 videos (N, T, 3, H, W), on the CPU."""
    from workbench.data.moving_shapes import to_model

    out = [vae.encode(to_model(videos[lo:lo + batch_size]).to(device)).mean.cpu()
           for lo in range(0, len(videos), batch_size)]
    return torch.cat(out)


def run_vae(ctx: Context, cfg: VAEConfig) -> None:
    from workbench.data.moving_shapes import from_model, load_moving_shapes, to_model, write_strip

    seed = ctx.job.run.seed
    settings = data_settings(cfg, seed)
    data = load_moving_shapes(**settings)
    train, val = data["train"], data["val"]
    ctx.log(f"video_vae: moving shapes {settings}: train {len(train)}, val {len(val)}, test {len(data['test'])}; "
            f"videos {tuple(train.videos.shape[1:])}")
    vae = _build_vae(cfg)
    lat = vae.latent_shape(cfg.frames, cfg.size, cfg.size)
    latent_numel = vae.latent_channels * math.prod(lat)
    params = sum(p.numel() for p in vae.parameters())
    ctx.log(f"video_vae: {params:,} parameters ({cfg.flavor} flavor), latents {vae.latent_channels} x {lat}")
    # baseline: the per-pixel mean training video, scored on val
    mean_video = to_model(train.videos).mean(dim=0, keepdim=True)  # (1, 3, T, H, W)
    x_val = to_model(val.videos)
    baseline = (x_val - mean_video).square().mean().item() if len(val) else float("nan")
    ctx.runlog.ylabel = "loss (pixel MSE + weighted KL)"
    ctx.runlog.baselines["val MSE of the mean video"] = baseline
    stats_videos = train.videos[:cfg.stats_videos]

    @torch.no_grad()
    def set_stats(m) -> tuple[Tensor, Tensor]:
        z = encode_means(m, stats_videos, cfg.eval_batch_size, ctx.device)  # (N, C, T, h, w)
        # per channel over videos, frames and pixels
        zc = z.transpose(0, 1).reshape(z.shape[1], -1)
        mean, std = zc.mean(dim=1), zc.std(dim=1).clamp_min(1e-6)
        m.latents_mean.copy_(mean), m.latents_std.copy_(std)
        return mean, std

    @torch.no_grad()
    def val_metrics(m) -> dict[str, float]:
        se, kl = 0.0, 0.0
        for lo in range(0, len(val), cfg.eval_batch_size):
            x = x_val[lo:lo + cfg.eval_batch_size].to(ctx.device)
            post = m.encode(x)
            se += (m.decode(post.mean) - x).square().mean(dim=(1, 2, 3, 4)).sum().item()
            kl += (post.kl() / latent_numel).sum().item()
        # "loss" is the reconstruction MSE (what loss.png and the report draw as the val curve)
        return {"loss": se / len(val), "kl": kl / len(val)}

    def evaluate(m) -> dict[str, float]:
        set_stats(m)
        return val_metrics(m) if len(val) else {}

    def loss_fn(m, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        (videos,) = batch
        x = to_model(videos)
        recon, post = m(x)  # z ~ q(z | x) from torch's global generator (saved with the checkpoint)
        # L = mean (D(z) - x)^2 + kl_weight KL / latent elements
        mse = (recon - x).square().mean()
        kl = post.kl().mean() / latent_numel
        return mse + cfg.kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}

    t0 = time.perf_counter()
    ctx.fit(vae, (train.videos,), loss_fn, evaluate)
    seconds = time.perf_counter() - t0
    vae.eval()
    final = val_metrics(vae) if len(val) else {}
    with torch.no_grad():  # the inputs above their reconstructions, video by video
        x = x_val[:cfg.recon_videos].to(ctx.device)
        recon = from_model(vae.decode(vae.encode(x).mean))
        pairs = torch.stack([val.videos[:cfg.recon_videos], recon], dim=1).flatten(0, 1)  # (2N, T, 3, H, W)
    write_strip(pairs, ctx.figure("recon.png", "val videos (odd rows) and their reconstructions (even rows) "
                                               "from the posterior mean; one column per frame"), scale=3)
    if final:
        ctx.result("val_recon_mse", final["loss"], "pixel MSE on the val split (values in [-1, 1]), posterior mean")
        ctx.result("val_recon_mse_mean_video", baseline, "the same for the per-pixel mean training video")
        ctx.result("val_kl_per_element", final["kl"], "KL(q(z|x) || N(0, I)) per latent element, val split")
    ctx.result("latents_mean", [round(v, 5) for v in vae.latents_mean.tolist()], "per-channel mean of the latents "
               f"of {len(stats_videos)} training videos, stored in the VAE's buffers")
    ctx.result("latents_std", [round(v, 5) for v in vae.latents_std.tolist()], "per-channel std, likewise")
    ctx.result("parameters", params, f"causal video VAE, {cfg.flavor} flavor")
    ctx.result("train_seconds", round(seconds, 1), f"ctx.fit wall time on {ctx.device}, validation included")


# ----------------------------------------------------------------------------------------------------
# Task video: the model


class TextVideoNet(nn.Module):
    """The caption tower and the AsymmDiT: `forward(z, sigma, ids)` -> the velocity (B, C, T, h, w)."""

    def __init__(self, dit_cfg, vocab_size: int, max_len: int, text_layers: int):
        super().__init__()
        from workbench.models import contrastive
        from workbench.models.video.mochi import AsymmDiT

        tcfg = contrastive.Config(vocab_size=vocab_size, max_len=max_len, text_width=dit_cfg.text_dim,
                                  text_layers=text_layers, text_heads=2, image_widths=(8,), groups=8)
        self.max_len = max_len
        self.text = contrastive.TextTower(tcfg)
        self.dit = AsymmDiT(dit_cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.dit.init_weights()
        self.text.init_weights()

    def encode_text(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(features (B, L, text_dim), mask (B, L) True = a real token) of word ids (B, L)."""
        from workbench.data.captioned import PAD

        return self.text(ids)[0], ids != PAD

    def null(self, b: int, device=None) -> Tensor:
        """The empty caption (bos eos pad...) (b, L): the unconditional input."""
        from workbench.data.captioned import BOS, EOS, PAD

        ids = torch.full((b, self.max_len), PAD, dtype=torch.int64, device=device)
        ids[:, 0], ids[:, 1] = BOS, EOS
        return ids

    def forward(self, z: Tensor, sigma: Tensor, ids: Tensor) -> Tensor:
        text, mask = self.encode_text(ids)
        return self.dit(z, sigma, text, mask)


class VideoDiffusion(nn.Module):
    """The trained net, its EMA copy and the frozen VAE in one module: checkpoints carry all three."""

    def __init__(self, net: TextVideoNet, vae: nn.Module):
        super().__init__()
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.vae = vae.requires_grad_(False)


@torch.no_grad()
def generate_latents(net: TextVideoNet, ids: Tensor, shape: tuple[int, ...], *, steps: int, guidance: float,
                     seed: int, batch_size: int = 64) -> Tensor:
    """Normalized latents (N, *shape) for captions `ids` (N, L); the noise of video i is drawn from
    torch.Generator().manual_seed(seed) in order, so a seed always gives the same videos."""
    from workbench.models.video import flow

    device = next(net.parameters()).device
    noise = torch.randn((len(ids), *shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for lo in range(0, len(ids), batch_size):
        c = ids[lo:lo + batch_size].to(device)
        text, mask = net.encode_text(c)
        null_text, null_mask = net.encode_text(net.null(1, device))
        out.append(flow.sample(net.dit, (len(c), *shape), text, mask, null_text, null_mask, steps=steps,
                               guidance=guidance, noise=noise[lo:lo + batch_size].to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_videos(vae, z: Tensor, batch_size: int = 64) -> Tensor:
    """uint8 videos (N, T, 3, H, W) of normalized latents z (N, C, T_lat, h, w)."""
    from workbench.data.moving_shapes import from_model

    device = vae.latents_mean.device
    return torch.cat([from_model(vae.decode(vae.denormalize(z[lo:lo + batch_size].to(device))))
                      for lo in range(0, len(z), batch_size)])


# ----------------------------------------------------------------------------------------------------
# Task video: loading the VAE run


def load_vae_run(path: str | Path, device: torch.device | str = "cpu"):
    """(the trained VAE with its latent statistics, its data settings, {ckpt, step, config}) of a finished video_vae
    run folder; a WorkbenchError saying what is wrong otherwise."""
    from workbench.checkpoint.run import load_model_state, resolve_checkpoint, step_of
    from workbench.train.fundamentals.runner import CONFIG_FILE, load_job
    from workbench.train.report import RESULTS_FILE

    run_dir = Path(path)
    hint = "train one first: workbench video configs/video/vae.toml (or set task.vae_run)"
    if not (run_dir / CONFIG_FILE).is_file():
        raise WorkbenchError(f"vae_run {run_dir}: not a run folder (no {CONFIG_FILE}); {hint}")
    job = load_job(run_dir / CONFIG_FILE)
    if job.task.name != "video_vae":
        raise WorkbenchError(f"vae_run {run_dir}: a {job.task.name!r} run, expected a 'video_vae' run; {hint}")
    try:
        results = json.loads((run_dir / RESULTS_FILE).read_text()).get("results", {})
    except (OSError, ValueError):
        results = {}
    if "latents_std" not in results:
        raise WorkbenchError(f"vae_run {run_dir}: the run has not finished (no latent statistics in {RESULTS_FILE}); "
                             f"finish it with: workbench video {run_dir / CONFIG_FILE} --resume")
    try:
        ckpt = resolve_checkpoint(run_dir)
    except Exception as e:
        raise WorkbenchError(f"vae_run {run_dir}: no complete checkpoint ({e})") from None
    cfg: VAEConfig = job.task.config
    vae = _build_vae(cfg)
    vae.load_state_dict(load_model_state(ckpt))
    if torch.all(vae.latents_std == 1) and torch.all(vae.latents_mean == 0):
        raise WorkbenchError(f"vae_run {ckpt}: the VAE's latent statistics were never set (mean 0, std 1)")
    source = {"ckpt": str(ckpt), "step": step_of(ckpt), "config": to_dict(cfg)}
    return vae.to(device).eval(), data_settings(cfg, job.run.seed), source


def _dit_config(cfg: Config, latent_channels: int):
    from workbench.models.video.mochi import FLAVORS

    dit = FLAVORS[cfg.flavor]
    if dit.in_channels != latent_channels:
        fail("flavor", f"the {cfg.flavor!r} AsymmDiT takes {dit.in_channels} latent channels, the VAE of vae_run "
                       f"makes {latent_channels}")
    return dit


def _build(cfg: Config, vae) -> VideoDiffusion:
    from workbench.data.moving_shapes import vocab

    v = vocab()
    return VideoDiffusion(TextVideoNet(_dit_config(cfg, vae.latent_channels), len(v), v.length, cfg.text_layers), vae)


# ----------------------------------------------------------------------------------------------------
# Task video: training


def run_video(ctx: Context, cfg: Config) -> None:
    from workbench.data import moving_shapes as ms
    from workbench.models.video import flow
    from workbench.train.metrics import atomic_write_text

    vae, settings, vae_source = load_vae_run(cfg.vae_run, ctx.device)
    atomic_write_text(ctx.run_dir / VIDEO_FILE, json.dumps({"data_settings": settings, "vae": vae_source}, indent=1))
    data = ms.load_moving_shapes(**settings)
    train, val = data["train"], data["val"]
    words = ms.vocab()
    model = _build(cfg, vae)
    model.vae.to(ctx.device)
    z_train = vae.normalize(encode_means(vae, train.videos, cfg.eval_batch_size, ctx.device))
    z_val = vae.normalize(encode_means(vae, val.videos, cfg.eval_batch_size, ctx.device))
    shape = tuple(z_train.shape[1:])
    ids_train, ids_val = words.encode(train.captions), words.encode(val.captions)
    params = sum(p.numel() for p in model.net.parameters())
    ctx.log(f"video: VAE {vae_source['ckpt']}; data {settings}; latents {shape}, train {len(train)}, val {len(val)}; "
            f"{params:,} trained parameters (AsymmDiT {cfg.flavor} + caption tower)")

    # validation: fixed (sigma, eps), so every validation scores the same noisy latents
    g = torch.Generator().manual_seed(ctx.job.run.seed * 7919 + 3)
    sigma_val = torch.rand(len(val), generator=g)
    eps_val = torch.randn(z_val.shape, generator=g)
    zero_loss = flow.velocity(z_val, eps_val).square().mean().item() if len(val) else float("nan")
    ctx.runlog.ylabel = "rectified-flow loss (MSE of x0 - eps)"
    ctx.runlog.baselines["predict 0"] = zero_loss

    grid = grid_prompts()
    grid_ids = words.encode([ms.prompt(*p) for p in grid])
    n_batches = math.ceil(len(train) / ctx.job.train.batch_size)
    total = ctx.total_steps(len(train))
    state = {"step": ctx.step}

    def draw(net: TextVideoNet, stem: str, caption: str) -> Tensor:
        z = generate_latents(net, grid_ids, shape, steps=cfg.sample_steps, guidance=cfg.guidance,
                             seed=ctx.job.run.seed + 1, batch_size=cfg.eval_batch_size)
        videos = decode_videos(model.vae, z, cfg.eval_batch_size)
        ms.write_strip(videos, ctx.figure(f"{stem}.png", caption), scale=2)
        ms.write_gif(list(videos), ctx.run_dir / f"{stem}.gif", fps=6, scale=3, columns=4)
        return videos

    @torch.no_grad()
    def val_loss(net: TextVideoNet, blind: bool = False) -> float:
        total_loss = 0.0
        for lo in range(0, len(val), cfg.eval_batch_size):
            sl = slice(lo, lo + cfg.eval_batch_size)
            ids = net.null(len(ids_val[sl])) if blind else ids_val[sl]
            text, mask = net.encode_text(ids.to(ctx.device))
            loss = flow.flow_loss(net.dit, z_val[sl].to(ctx.device), text, mask, sigma=sigma_val[sl].to(ctx.device),
                                  eps=eps_val[sl].to(ctx.device))
            total_loss += loss.item() * len(ids)
        return total_loss / len(val)

    def evaluate(m: VideoDiffusion) -> dict[str, float]:
        step = state["step"]
        if cfg.samples_every and 0 < step < total and step % (cfg.samples_every * n_batches) == 0:
            draw(m.ema, f"samples-step-{step}", f"EMA samples at step {step} (epoch {step // n_batches}); one row "
                                                f"per prompt, guidance {cfg.guidance}")
        if not len(val):
            return {}
        return {"loss": val_loss(m.net), "loss_ema": val_loss(m.ema), "loss_ema_blind": val_loss(m.ema, blind=True)}

    def loss_fn(m: VideoDiffusion, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        z0, ids = batch
        # caption dropout: these examples train the unconditional velocity (the guidance's v_u)
        drop = torch.rand(len(ids), device=ids.device) < cfg.cond_dropout
        ids = torch.where(drop[:, None], m.net.null(len(ids), ids.device), ids)
        text, mask = m.net.encode_text(ids)
        return flow.flow_loss(m.net.dit, z0, text, mask), {}

    def after_step(step: int) -> None:
        state["step"] = step
        ema_update(model.ema, model.net, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))

    t0 = time.perf_counter()
    ctx.fit(model, (z_train, ids_train), loss_fn, evaluate, after_step=after_step)
    seconds = time.perf_counter() - t0
    model.eval()
    final = {"loss": val_loss(model.net), "loss_ema": val_loss(model.ema),
             "blind": val_loss(model.ema, blind=True)} if len(val) else {}
    videos = draw(model.ema, "samples", f"EMA samples after {ctx.job.train.epochs} epochs: one row per prompt "
                                        f"(every shape x direction), {cfg.sample_steps} Euler steps, guidance "
                                        f"{cfg.guidance}; samples.gif is the same as a 4-column animation")
    asked = torch.tensor(grid)
    direction, colour = judge(videos)
    real_dir, real_col = judge(val.videos)
    if final:
        ctx.result("val_loss", final["loss"], "flow loss on the val split, fixed (sigma, eps), trained weights")
        ctx.result("val_loss_ema", final["loss_ema"], f"the same with the EMA weights (decay {cfg.ema_decay})")
        ctx.result("val_loss_ema_blind", final["blind"], "the EMA weights given the empty caption (text-blind)")
        ctx.result("val_loss_predict_zero", zero_loss, "the same loss for a model that always predicts 0")
    ctx.result("samples_direction_match", (direction == asked[:, 2]).float().mean().item(),
               f"share of the {len(grid)} samples whose centroid moves the asked way ({', '.join(ms.DIRECTIONS)})")
    ctx.result("samples_colour_match", (colour == asked[:, 1]).float().mean().item(),
               f"share whose bright pixels are nearest the asked colour ({', '.join(ms.COLOURS)})")
    if len(val):
        ctx.result("val_videos_direction_match", (real_dir == val.direction).float().mean().item(),
                   "the same judge on the real val videos (checks the judge)")
        ctx.result("val_videos_colour_match", (real_col == val.colour).float().mean().item(), "likewise, colour")
    ctx.result("parameters", params, f"AsymmDiT {cfg.flavor} + caption tower (the frozen VAE not counted)")
    ctx.result("train_seconds", round(seconds, 1), f"ctx.fit wall time on {ctx.device}, validation and samples included")


TASKS = {"video_vae": Task(config=VAEConfig, run=run_vae), "video": Task(config=Config, run=run_video)}


# ----------------------------------------------------------------------------------------------------
# Loading a finished run (the evals)


@dataclass
class VideoRun:
    """A trained video run: the EMA net, the VAE, the task config, the data settings and where they came from."""

    net: TextVideoNet
    vae: nn.Module
    cfg: Config
    data_settings: dict
    latent_shape: tuple[int, int, int, int]
    source: dict

    def generate(self, prompts: list[str], seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, batch_size: int = 64) -> Tensor:
        """uint8 videos (N, T, 3, H, W) for `prompts` (moving-shapes captions); the run's own sampler settings
        when steps / guidance are None; the same seed gives the same videos."""
        from workbench.data.moving_shapes import vocab

        if not prompts:
            raise WorkbenchError("generate: no prompts (expected a list of one or more moving-shapes captions)")
        v = vocab()
        unknown = sorted({w for p in prompts for w in p.lower().split() if w not in v.index})
        if unknown:
            raise WorkbenchError(f"generate: word(s) {unknown} not in the moving-shapes caption vocabulary "
                                 f"({', '.join(v.words[4:])})")
        z = generate_latents(self.net, v.encode(list(prompts)), self.latent_shape,
                             steps=steps or self.cfg.sample_steps,
                             guidance=self.cfg.guidance if guidance is None else guidance, seed=seed,
                             batch_size=batch_size)
        return decode_videos(self.vae, z, batch_size)


def is_video_run(path: str | Path) -> bool:
    """Whether `path` (a run folder or one of its checkpoints) holds a `workbench video` diffusion run."""
    from workbench.train.fundamentals.runner import is_task_run

    return is_task_run(path, ("video",))


def load_run(ckpt: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> VideoRun:
    """The EMA (or, ema=False, the trained) model of a video run folder or checkpoint, with its VAE; verified."""
    from workbench.train.fundamentals.runner import load_task_checkpoint

    ck = load_task_checkpoint(ckpt, ("video",))
    cfg: Config = ck.job.task.config
    try:
        info = json.loads((ck.run_dir / VIDEO_FILE).read_text())
        settings, vae_info = info["data_settings"], info["vae"]
        vae_raw = vae_info["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise WorkbenchError(f"{ck.run_dir}: {VIDEO_FILE} (the data settings) is missing or unreadable") from None
    model = _build(cfg, _build_vae(from_dict(VAEConfig, vae_raw, "video.json vae.config")))
    ck.load_into(model)
    net = (model.ema if ema else model.net).to(device).eval()
    vae = model.vae.to(device).eval()
    lat = vae.latent_shape(settings["frames"], settings["size"], settings["size"])
    # source: this checkpoint (what evals file results under); "vae": the VAE run it was trained on
    return VideoRun(net=net, vae=vae, cfg=cfg, data_settings=settings, latent_shape=(vae.latent_channels, *lat),
                    source={**ck.source, "vae": vae_info})
