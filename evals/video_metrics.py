"""Video-generation metrics with a judge the project trains itself: an FVD-style distance, temporal consistency,
flicker, and shape / colour / motion accuracy, each beside real, noise and temporally broken references.

What it is
    FVD (Unterthiner et al. 2018) is the Frechet distance between Gaussian fits of I3D features (an Inflated
    3D ConvNet trained on Kinetics-400) of real and generated videos. I3D cannot be downloaded here, and a
    network trained on 224-px human actions would not know 32-px moving shapes anyway. So, as
    evals/image_metrics.py does for FID, the project trains its own judge on the *training* split of the
    moving-shapes videos the generator learnt from (workbench/data/moving_shapes.py):
        VideoJudge   a (2+1)D-then-3D conv net on videos (N, 3, T, H, W) in [0, 1]: a per-frame 2D stem
                     (3x3 kernels, no temporal mixing), then 3D convolutions (3x3x3) that see motion, max
                     pooling over time and space and one hidden layer, whose output (the penultimate features,
                     the input of the heads) is the FVD feature space; three linear heads name the shape,
                     the colour and the direction of motion.
                     Max, not average, pooling: a 5-px shape covers a few cells of the pooled map, and
                     averaged with the background its features seemed to be learnt more slowly (quick trials,
                     not a controlled comparison: shape test accuracy 0.51 with average pooling after 8
                     epochs on 1638 videos, 0.68 with max pooling after 12 epochs on 717).
    `VideoEvalNet.load_or_train(cache, ...)` trains it once per data setting and recipe and caches it in a
    folder keyed by both (`judge_key`), so evals do not retrain it.

The metrics (videos (N, T, 3, H, W) uint8, scored as floats in [0, 1])
    fvd                 Frechet distance between Gaussian fits N(mu, S) of the judge's penultimate features
                        f(v) of the scored videos and of as many training videos (the reference fit):
                            FVD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})
                        (evals.image_metrics.frechet_distance; lower is better).
    temporal_consistency  the lag-1 autocorrelation of per-frame features: the mean cosine between
                        consecutive frames' deviations from their video's mean frame,
                            TC = mean_{v, t} cos(phi(x_t) - pbar, phi(x_{t+1}) - pbar),   t = 0 .. T-2,
                            pbar = (1/T) sum_t phi(x_t)   (per video),
                        phi = the judge's per-frame 2D stem (no temporal mixing), average-pooled 2x2 and
                        flattened, so it keeps *where* things are. Why this form: in a smooth video the
                        deviations drift slowly (a shape a pixel or two further along), so neighbours point the
                        same way and TC is near 1; for frames in random order, each from another video, or
                        noise, the deviations of neighbours are as alike as any two, and since they sum to 0
                        over a video their mean cosine is about -1/(T - 1) (exactly so for exchangeable
                        frames in high dimension; tested). Centering on the video's own mean removes what all
                        its frames share (background, the shape's look), which would otherwise make every pair
                        alike (noise frames scored 0.99 under a cosine centred on the training frames' mean).
                        A frozen video has no deviations; it is given TC = 1 (nothing changes), so TC never
                        stands alone: flicker and motion accuracy catch stillness. It needs T >= 3: at T = 2 the
                        two deviations are opposite (TC = -1 for any moving video), so it is NaN there.
    flicker_ratio       the mean absolute change between consecutive frames, relative to real video,
                            flicker(V) = mean_{v, t, c, y, x} |x_{t+1} - x_t|,   ratio = flicker(V) / flicker(train)
                        1 is real motion; above 1 frames jump or flicker (shuffled, noise); 0 is a still video.
                        A pixel measure with no learnt part: it reads the same on any data.
    shape_accuracy, colour_accuracy, motion_accuracy
                        the share of videos the judge assigns the shape, colour, direction asked for;
                        all_accuracy: all three right. Motion accuracy is the temporal one: a still or
                        shuffled video has the right shape and colour but no (or a random) direction.

Validation (references, computed the same way at the same n)
    real      held-out test videos (never seen by the judge or the generator): the ceiling; its FVD is the
              finite-sample floor at this n.
    noise     uniform random pixels: the worst FVD, flicker and accuracies. Not the lowest temporal
              consistency: frames without order all read about -1/(T - 1), and shuffled real frames
              score a little lower (-0.129 against noise's -0.124 at T = 9, docs/video-evals.md).
    shuffled  real test videos with their frames in a random order (a different one per video, never the
              identity): every frame is real, so per-frame judges (FID, shape and colour accuracy) cannot see
              anything wrong; only the temporal metrics can (consistency, flicker, motion accuracy, FVD).
    jumbled   frame t of each video taken from another random test video (a fresh draw per t): real frames,
              no continuity of content.
    static    the first frame of each real test video repeated: consistency 1, flicker 0, no motion.
    Tests (tests/unit/test_video_metrics.py) assert the orderings: real beats noise on every metric, and
    the temporal failures on the temporal ones.

Design choices
    FVD is measured against the training videos (what the generator imitates), with the reference fit over
    the same number n of training videos as the scored set: the Frechet distance of two finite samples is
    biased upwards by about Tr(S)/n per set, so only distances at equal n compare, and with equal n the
    `real` reference reads directly as the floor a perfect generator would reach. Features are float64
    before the covariance.
    The per-frame stem runs as Conv2d on the N*T frames (the same function as Conv3d with 1x3x3 kernels,
    much faster on CPU); a third stem layer raised the shape accuracy of the max-pooling trial from 0.68 to
    0.86 (same data, epochs and seed). With the default recipe on the default data all three heads read 1.0.
    The judge has no normalisation layers (eval and train mode compute the same function) and no
    augmentation (a mirror would swap left and right). It standardises its input per channel with the
    training videos' statistics.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evals.image_metrics import frechet_distance, gaussian_stats
from workbench.config import field_
from workbench.errors import WorkbenchError

__all__ = ["JudgeConfig", "VideoJudge", "VideoEvalNet", "judge_key", "references", "to_float", "flicker",
           "consecutive_cosine", "shuffled", "jumbled", "static", "HEADS", "TEMPORAL_FAILURES",
           "plot_references", "temporal_consistency"]

VERSION = 1  # bump when the judge or its recipe changes, so old caches are not reused
HEADS = ("shape", "colour", "direction")
TEMPORAL_FAILURES = ("shuffled", "jumbled", "static")


@dataclass
class JudgeConfig:
    width: int = field_(8, gt=0, doc="channels of the judge's first layer (the stem has w and 2w, the 3D part 4w; "
                                      "the FVD features are 4w wide)")
    epochs: int = field_(15, gt=0)
    lr: float = field_(3e-3, gt=0, doc="AdamW peak learning rate (cosine decay after warm-up)")
    warmup_steps: int = field_(20, ge=0)
    weight_decay: float = field_(1e-4, ge=0)
    batch_size: int = field_(32, gt=0)


def judge_key(settings: dict, cfg: JudgeConfig) -> str:
    """The cache folder name of the judge trained on one data setting (load_moving_shapes' arguments) with one
    recipe."""
    blob = json.dumps({"v": VERSION, "data": settings, "judge": asdict(cfg)}, sort_keys=True)
    return (f"moving-shapes-n{settings.get('n')}-f{settings.get('frames')}-s{settings.get('size')}-"
            f"seed{settings.get('seed')}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}")


# ----------------------------------------------------------------------------------------------------
# pixel-level helpers and the broken references


def to_float(videos: Tensor) -> Tensor:
    """uint8 videos (N, T, 3, H, W) -> float (N, 3, T, H, W) in [0, 1] (the judge's layout, diffusers')."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[2] != 3:
        raise WorkbenchError(f"video metrics: expected uint8 videos (N, T, 3, H, W), got {videos.dtype} "
                             f"{tuple(videos.shape)}")
    # (N, T, 3, H, W) -> (N, 3, T, H, W)
    return videos.permute(0, 2, 1, 3, 4).float() / 255.0


def flicker(videos: Tensor) -> float:
    """mean |x_{t+1} - x_t| over videos, frame pairs, channels and pixels, of uint8 videos (N, T, 3, H, W) in
    [0, 1] units."""
    x = videos.float() / 255.0
    return (x[:, 1:] - x[:, :-1]).abs().mean().item()


def consecutive_cosine(frames: Tensor) -> Tensor:
    """cos(phi_t - pbar, phi_{t+1} - pbar) of per-frame features (N, T, D), pbar the mean over each video's
    frames -> (N, T - 1); 1 where both deviations vanish (a still video)."""
    d = frames.double() - frames.double().mean(1, keepdim=True)  # (N, T, D) deviations from the video's mean frame
    norm = d.norm(dim=-1)  # (N, T)
    scale = frames.double().norm(dim=-1).mean(1, keepdim=True)  # (N, 1): the size of the features themselves
    cos = (d[:, 1:] * d[:, :-1]).sum(-1) / (norm[:, 1:] * norm[:, :-1]).clamp(min=1e-30)
    still = (norm[:, 1:] <= 1e-6 * scale) & (norm[:, :-1] <= 1e-6 * scale)
    return torch.where(still, torch.ones_like(cos), cos).float()


def temporal_consistency(frames: Tensor) -> Tensor:
    """Per-video temporal consistency (N,) of per-frame features (N, T, D): the mean of `consecutive_cosine`
    over each video's frame pairs; NaN below 3 frames (see the module notes: it would read -1 whatever the
    video). The metric is the mean over videos."""
    if frames.shape[1] < 3:
        return torch.full((frames.shape[0],), float("nan"))
    return consecutive_cosine(frames).mean(1)


def shuffled(videos: Tensor, generator: torch.Generator) -> Tensor:
    """Each video's frames in a random order, never the identity (a rolled one instead)."""
    n, t = videos.shape[:2]
    out = torch.empty_like(videos)
    for i in range(n):
        order = torch.randperm(t, generator=generator)
        if torch.equal(order, torch.arange(t)):
            order = order.roll(1)
        out[i] = videos[i, order]
    return out


def jumbled(videos: Tensor, generator: torch.Generator) -> Tensor:
    """Frame t of video i taken from video perm_t[i], one random permutation of the videos per t."""
    n, t = videos.shape[:2]
    # out[i, t] = videos[perm_t[i], t]
    perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(t)], 1)  # (N, T)
    return videos[perms, torch.arange(t)[None, :]]


def static(videos: Tensor) -> Tensor:
    """The first frame of each video repeated over its T frames."""
    return videos[:, :1].expand_as(videos).contiguous()


# ----------------------------------------------------------------------------------------------------
# the judge


class VideoJudge(nn.Module):
    """videos (N, 3, T, H, W) in [0, 1] -> logits per head, penultimate features (N, 4w), frame features.

    stem   Conv2d(3 -> w) ReLU Conv2d(stride 2, w -> 2w) ReLU Conv2d(2w -> 2w) ReLU, 3x3 kernels, per frame:
           (N, 2w, T, H/2, W/2)
    motion Conv(3x3x3, stride 1x2x2, 2w -> 4w) ReLU Conv(3x3x3, stride 2x2x2, 4w -> 4w) ReLU
    pool   max over (T, H, W), Linear(4w, 4w) ReLU                              the FVD features (N, 4w)
    heads  Linear(4w, K) per head (shape, colour, direction)
    """

    def __init__(self, width: int, classes: dict[str, int], frames: int, size: int):
        super().__init__()
        w = width
        self.classes = dict(classes)
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1, 1))
        # per frame (2D convolutions on the N*T frames: much faster on CPU than Conv3d with 1x3x3 kernels)
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.motion = nn.Sequential(
            nn.Conv3d(2 * w, 4 * w, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(4 * w, 4 * w, 3, stride=(2, 2, 2), padding=1), nn.ReLU())
        self.hidden = nn.Linear(4 * w, 4 * w)
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, n) for k, n in self.classes.items()})
        self.frames, self.size = frames, size

    def check(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[2] != self.frames or x.shape[-2:] != (self.size, self.size):
            raise WorkbenchError(f"video judge: expected videos (N, 3, {self.frames}, {self.size}, {self.size}) (the "
                                 f"data setting it was trained on), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(logits {head: (N, K)}, features (N, 4w), frame features (N, T, 2w * (H/4) * (W/4)))."""
        self.check(x)
        n, _, t, h, w = x.shape
        x = ((x - self.mean) / self.std).transpose(1, 2).reshape(n * t, 3, h, w)  # (N, 3, T, H, W) -> (N*T, 3, H, W)
        f = self.stem(x)  # (N*T, 2w, H/2, W/2)
        # per-frame features, pooled 2x2 and flattened: (N*T, 2w, H/4, W/4) -> (N, T, D)
        per_frame = F.avg_pool2d(f, 2).reshape(n, t, -1)
        s = f.reshape(n, t, *f.shape[1:]).transpose(1, 2)  # (N*T, 2w, H/2, W/2) -> (N, 2w, T, H/2, W/2)
        m = self.motion(s)  # (N, 4w, T', H/8, W/8)
        feats = F.relu(self.hidden(m.amax(dim=(2, 3, 4))))  # (N, 4w)
        return {k: head(feats) for k, head in self.heads.items()}, feats, per_frame


@dataclass
class Judged:
    """The judge's reading of a set of videos (all on CPU)."""

    logits: dict[str, Tensor]  # head -> (N, K)
    features: Tensor  # (N, D) penultimate
    frames: Tensor  # (N, T, F) per-frame stem features
    flicker: float


@dataclass
class VideoEvalNet:
    judge: VideoJudge  # eval mode
    meta: dict  # settings, the judge's test accuracy, training time
    folder: Path | None = None

    @torch.no_grad()
    def read(self, videos: Tensor, batch_size: int = 64) -> Judged:
        """Judge uint8 videos (N, T, 3, H, W)."""
        device = next(self.judge.parameters()).device
        logits: dict[str, list[Tensor]] = {k: [] for k in self.judge.classes}
        feats, frames = [], []
        for i in range(0, len(videos), batch_size):
            out, f, pf = self.judge(to_float(videos[i:i + batch_size]).to(device))
            for k in logits:
                logits[k].append(out[k].float().cpu())
            feats.append(f.float().cpu())
            frames.append(pf.float().cpu())
        return Judged({k: torch.cat(v) for k, v in logits.items()}, torch.cat(feats), torch.cat(frames),
                      flicker(videos))

    def reference(self, train_videos: Tensor) -> dict:
        """What every score is measured against: the Gaussian fit of `train_videos`' features (pass as many as
        will be scored) and their flicker."""
        r = self.read(train_videos)
        mu, cov = gaussian_stats(r.features)
        return {"mu": mu, "cov": cov, "flicker": r.flicker, "n": len(train_videos)}

    def score(self, videos: Tensor, asked: dict[str, Tensor], ref: dict) -> dict[str, float]:
        """The metrics of the module notes for uint8 videos (N, T, 3, H, W) asked to show `asked` (head -> (N,)
        class indices)."""
        r = self.read(videos)
        return self.score_read(r, asked, ref)

    @staticmethod
    def score_read(r: Judged, asked: dict[str, Tensor], ref: dict) -> dict[str, float]:
        if len(r.features) != ref["n"]:
            raise WorkbenchError(f"video metrics: {len(r.features)} videos scored against a reference fit of "
                                 f"{ref['n']}: FVD compares only at equal n")
        right = {k: r.logits[k].argmax(1) == asked[k] for k in HEADS}
        return {"fvd": frechet_distance(*gaussian_stats(r.features), ref["mu"], ref["cov"]),
                "temporal_consistency": temporal_consistency(r.frames).mean().item(),
                "flicker_ratio": r.flicker / ref["flicker"],
                "motion_accuracy": right["direction"].double().mean().item(),
                "shape_accuracy": right["shape"].double().mean().item(),
                "colour_accuracy": right["colour"].double().mean().item(),
                "all_accuracy": (right["shape"] & right["colour"] & right["direction"]).double().mean().item()}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.judge.state_dict().items()},
                  str(folder / "judge.safetensors"))
        # meta.json last: its presence marks a complete folder
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=1) + "\n")
        self.folder = folder

    @classmethod
    def load_or_train(cls, cache: str | Path, splits: dict, settings: dict, cfg: JudgeConfig,
                      device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> VideoEvalNet:
        """The judge of the moving-shapes data `splits` (load_moving_shapes(**settings)), from
        `cache/<judge_key>/` when it is there, else trained now on the training split and saved there."""
        folder = Path(cache) / judge_key(settings, cfg)
        if (folder / "meta.json").is_file():
            net = cls._load(folder, device)
            log(f"video judge: loaded from {folder}")
            return net
        log(f"video judge: training on the moving-shapes training split ({len(splits['train'])} videos; cached in "
            f"{folder})")
        net = train_judge(splits, cfg, int(settings.get("seed", 0)), device, log)
        net.meta |= {"settings": settings, "key": folder.name}
        net.save(folder)
        return net

    @classmethod
    def _load(cls, folder: Path, device) -> VideoEvalNet:
        from workbench.checkpoint.safetensors_io import read_file

        meta = json.loads((folder / "meta.json").read_text())
        judge = VideoJudge(meta["judge"]["width"], meta["classes"], meta["frames"], meta["size"])
        try:
            judge.load_state_dict(read_file(folder / "judge.safetensors"))
        except (RuntimeError, OSError) as e:
            raise WorkbenchError(f"video judge in {folder} does not load ({e}); delete the folder to retrain") from None
        return cls(judge.to(device).eval(), meta, folder)


def _labels(data) -> dict[str, Tensor]:
    return {"shape": data.shape, "colour": data.colour, "direction": data.direction}


def train_judge(splits: dict, cfg: JudgeConfig, seed: int, device: torch.device | str = "cpu",
                log: Callable[[str], None] = print) -> VideoEvalNet:
    """Train a VideoJudge on splits["train"] (AdamW, the summed cross-entropy of the three heads, cosine decay);
    measure its accuracy per head on splits["test"] (meta["test_accuracy"])."""
    from workbench.data import moving_shapes as ms
    from workbench.train.optim import lr_multiplier

    train = splits["train"]
    n, t, _, h, _ = train.videos.shape
    classes = {"shape": len(ms.SHAPES), "colour": len(ms.COLOURS), "direction": len(ms.DIRECTIONS)}
    torch.manual_seed(seed)
    judge = VideoJudge(cfg.width, classes, t, h)
    x = to_float(train.videos)  # (N, 3, T, H, W)
    judge.mean.copy_(x.mean(dim=(0, 2, 3, 4)).reshape(1, 3, 1, 1, 1))
    judge.std.copy_(x.std(dim=(0, 2, 3, 4)).clamp(min=1e-3).reshape(1, 3, 1, 1, 1))
    judge.to(device).train()
    y = _labels(train)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, steps, cfg.warmup_steps, "cosine", 0.0))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            logits, _, _ = judge(x[idx].to(device))
            # loss = sum over heads of the cross-entropy of that head
            loss = sum(F.cross_entropy(logits[k], y[k][idx].to(device)) for k in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    meta = {"judge": asdict(cfg), "classes": classes, "frames": t, "size": h, "version": VERSION,
            "trained_on": f"the moving-shapes training split ({n} videos of {t} frames, {h}x{h})",
            "train_seconds": round(time.perf_counter() - t0, 1)}
    net = VideoEvalNet(judge, meta)
    test = splits["test"]
    r = net.read(test.videos)
    meta["test_accuracy"] = {k: (r.logits[k].argmax(1) == v).double().mean().item() for k, v in _labels(test).items()}
    meta["test_videos"] = len(test)
    log("video judge: test accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in meta["test_accuracy"].items())
        + f" ({meta['train_seconds']} s)")
    return net


def _reference_sets(splits: dict, n: int, seed: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(the n training videos of the reference fit, the n test indices, the five reference sets of n videos made
    from those test videos), all drawn from `seed`."""
    train, test = splits["train"], splits["test"]
    g = torch.Generator().manual_seed(seed)
    fit = train.videos[torch.randperm(len(train), generator=g)[:n]]
    idx = torch.randperm(len(test), generator=g)[:n]
    real = test.videos[idx]
    sets = {"real": real, "noise": torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8),
            "shuffled": shuffled(real, g), "jumbled": jumbled(real, g), "static": static(real)}
    return fit, idx, sets


def references(net: VideoEvalNet, splits: dict, n: int, seed: int) -> dict:
    """The scores of real held-out videos and of noise / shuffled / jumbled / static videos, n of each (the
    same n real test videos underlie the three broken ones, and their labels are what is asked), and the
    reference fit of n training videos every FVD here is measured against (key "ref")."""
    train, test = splits["train"], splits["test"]
    for name, split in (("training", train), ("test", test)):
        if len(split) < n:
            raise WorkbenchError(f"video references: the moving-shapes {name} split holds {len(split)} videos, fewer "
                                 f"than the {n} scored: lower the number of videos or render more (n)")
    fit, idx, sets = _reference_sets(splits, n, seed)
    ref = net.reference(fit)
    asked = {k: v[idx] for k, v in _labels(test).items()}
    out = {name: net.score(v, asked, ref) for name, v in sets.items()}
    out["ref"] = ref
    return out


def plot_references(out: Path, model: dict | None, refs: dict) -> str:
    """The model's value of each metric beside the references' (one panel per metric; the references alone when
    model is None)."""
    from evals.plots import new_figure, save_figure

    names = ["model", "real", "noise", *TEMPORAL_FAILURES][model is None:]
    rows = [model, *(refs[k] for k in names[1:])] if model is not None else [refs[k] for k in names]
    keys = ("fvd", "temporal_consistency", "flicker_ratio", "motion_accuracy", "shape_accuracy", "colour_accuracy")
    fig = new_figure((13.0, 3.2))
    for ax, key in zip(fig.subplots(1, len(keys)), keys):
        vals = [r[key] for r in rows]
        ax.bar(range(len(names)), vals, color=["C0", "C2", "C3", "C1", "C4", "C5"][model is None:])
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        if key == "fvd":
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(("video metrics: the samples beside " if model is not None else "video metrics of ")
                 + "real, noise and temporally broken real videos (same judge, same n)", fontsize=10)
    save_figure(fig, out)
    return out.name


def main(argv: list[str] | None = None) -> None:
    """python -m evals.video_metrics [--n 2048 --frames 9 --size 32 --seed 0 --videos 192 --draws 1 --cache DIR
    --out DIR]: train (or load) the judge on load_moving_shapes' data and print the references table
    (docs/video-evals.md); with --draws K, the mean and standard deviation over K draws of the reference videos
    (draw seeds 0 .. K-1; the data and the judge stay those of --seed)."""
    import argparse

    from workbench.data.moving_shapes import DEFAULTS, load_moving_shapes

    p = argparse.ArgumentParser(prog="python -m evals.video_metrics", description=main.__doc__)
    for key in ("n", "frames", "size", "seed"):
        p.add_argument(f"--{key}", type=int, default=DEFAULTS[key])
    p.add_argument("--videos", type=int, default=192, help="videos per reference set (and in the FVD reference fit)")
    p.add_argument("--draws", type=int, default=1, help="draws of the reference videos to average over")
    p.add_argument("--cache", default="runs/eval_nets", help="where the judge is cached")
    p.add_argument("--out", default="", help="also write references.png (the first videos of each set, two rows "
                                            "each) and references-metrics.png there (draw 0)")
    a = p.parse_args(argv)
    settings = dict(DEFAULTS, n=a.n, frames=a.frames, size=a.size, seed=a.seed)
    splits = load_moving_shapes(**settings)
    net = VideoEvalNet.load_or_train(a.cache, splits, settings, JudgeConfig())
    draws = [references(net, splits, a.videos, d) for d in range(a.draws)]
    if a.out:
        from workbench.data.moving_shapes import write_strip

        _, _, sets = _reference_sets(splits, a.videos, 0)
        out = Path(a.out)
        write_strip(torch.cat([v[:2] for v in sets.values()]), out / "references.png", scale=2)
        plot_references(out / "references-metrics.png", None, draws[0])
        print(f"rows of references.png, two each: {', '.join(sets)}")
    keys = list(draws[0]["real"])
    print(f"judge test accuracy: {net.meta['test_accuracy']} (trained in {net.meta.get('train_seconds')} s)")
    print(f"{a.videos} videos per set, {a.draws} draw(s), data {settings}")
    print("| reference | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name in draws[0]:
        if name != "ref":
            v = np.array([[d[name][k] for k in keys] for d in draws])  # (draws, metrics)
            cells = [f"{m:.4g}" + (f" ± {sd:.2g}" if len(v) > 1 else "") for m, sd in zip(v.mean(0), v.std(0, ddof=min(1, len(v) - 1)))]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
