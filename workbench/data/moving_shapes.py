"""Moving-shapes videos: one coloured shape crossing a dark frame, with a caption saying what, which colour, where.

What it is
    `load_moving_shapes(n, frames, size, seed, val_fraction, test_fraction)` renders `n` short RGB videos and
    splits them into train / val / test `MovingShapes` sets. Every video holds one shape of `SHAPES`, filled
    with one colour of `COLOURS`, on a dark background, moving in a straight line at constant speed in one
    of `DIRECTIONS`; its caption says all three ("a red circle moving left"). The labels are returned beside
    the pixels (`shape`, `colour`, `direction`, indices into the tuples), so an eval can check a generated
    video against its prompt. Video tensors are uint8 (N, T, 3, H, W) here (what a GIF holds);
    `to_model` turns them into the models' layout, float (N, 3, T, H, W) in [-1, 1] (diffusers' layout),
    and `from_model` back.

The motion. The centre c_t of the shape at frame t is c_0 + t * speed * d, with d the unit vector of the
    direction (image axes: x to the right, y down, so "up" is d = (0, -1)). speed (pixels per frame) and
    the radius r are drawn per video; c_0 is drawn so that the whole path stays inside the frame: along the
    motion axis c_0 lies in [m, size - m - (T - 1) * speed] (mirrored for left / up), across it in
    [m, size - m], with m = 1.1 r + 1 pixel (a square's corner reaches 0.75 * sqrt(2) ~ 1.06 radii, the
    pixel keeps the border row and column background).

Rendering. The shapes are `workbench.data.images`' shape tests (`_inside`), unrotated, so a triangle always
    points up and a square is axis-aligned: the shape word alone decides the outline. Edges are antialiased
    by averaging supersample^2 points per pixel. Nuisances drawn per video from the seed: radius
    (`RADIUS` of the side), speed (`SPEED` of the side per frame), the exact colour (each channel jittered by
    up to `COLOUR_JITTER` around the named colour) and the background grey level (`BACKGROUND`). No pixel
    noise: the videos are clean so a small autoencoder can reconstruct them and a generated video can be
    judged by eye.

Labels and splits. Labels are balanced: video i gets the combination i mod (|SHAPES| |COLOURS| |DIRECTIONS|)
    before one seeded shuffle, so every shape x colour x direction appears about equally often. The split is
    a seeded permutation: round(test_fraction n) videos to test, round(val_fraction n) to val, the rest to
    train; the same arguments always give the same, disjoint splits.

Captions. One of `TEMPLATES` per video, drawn from the seed ("a red circle moving left", "one red circle
    going left", ...); `prompt(shape, colour, direction)` is the first template, what samplers and evals ask
    for. `vocab()` is the word-level `Vocab` of `workbench.data.captioned` over every word the templates can
    make, for the text tower of the video model.

Writers. `write_gif` (Pillow, looping, one or several videos side by side, optionally in a grid) and
    `write_strip` (a PNG, one row per video, one column per frame), both nearest-neighbour upscaled by `scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from workbench.data.captioned import Vocab
from workbench.data.images import SHAPES as IMAGE_SHAPES
from workbench.data.images import _inside

__all__ = [
    "SHAPES", "COLOURS", "DIRECTIONS", "TEMPLATES", "RGB", "MovingShapes", "load_moving_shapes", "render_videos",
    "prompt", "all_prompts", "vocab", "to_model", "from_model", "write_gif", "write_strip", "options_error",
]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up", "down")
RGB = {"red": (0.95, 0.15, 0.15), "green": (0.15, 0.9, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (0.95, 0.9, 0.15)}
# unit vector (dx, dy) of each direction in image axes: x to the right, y down
STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
TEMPLATES = ("a {c} {s} moving {d}", "one {c} {s} moving {d}", "a {c} {s} going {d}", "a {c} {s} that moves {d}")
RADIUS = (0.14, 0.2)  # shape radius, share of the side
SPEED = (0.035, 0.06)  # pixels per frame, share of the side (32 px: 1.1 - 1.9 px per frame)
COLOUR_JITTER = 0.08
BACKGROUND = (0.0, 0.12)  # grey level of the background
MIN_SIZE, MIN_FRAMES = 16, 2
DEFAULTS = {"n": 2048, "frames": 9, "size": 32, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1}


@dataclass
class MovingShapes:
    videos: Tensor  # uint8 (N, T, 3, H, W)
    shape: Tensor  # int64 (N,) index into SHAPES
    colour: Tensor  # int64 (N,) index into COLOURS
    direction: Tensor  # int64 (N,) index into DIRECTIONS
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, idx) -> MovingShapes:
        """The videos at `idx` (a list, array or LongTensor of indices, or a slice), labels and captions kept in step."""
        if isinstance(idx, slice):
            idx = range(len(self))[idx]
        i = torch.as_tensor(list(idx) if isinstance(idx, range) else idx, dtype=torch.int64).reshape(-1)
        return MovingShapes(self.videos[i], self.shape[i], self.colour[i], self.direction[i],
                            [self.captions[j] for j in i.tolist()])

    def prompts(self) -> list[str]:
        """The plain prompt of every video (the first template), in order."""
        return [prompt(s, c, d) for s, c, d in zip(self.shape.tolist(), self.colour.tolist(), self.direction.tolist())]


def prompt(shape: int, colour: int, direction: int) -> str:
    """The plain caption of a label triple, e.g. prompt(0, 0, 0) == "a red circle moving left"."""
    for name, k, names in (("shape", shape, SHAPES), ("colour", colour, COLOURS), ("direction", direction, DIRECTIONS)):
        if not 0 <= int(k) < len(names):
            raise ValueError(f"{name} must be an index in 0..{len(names) - 1} ({', '.join(names)}), got {k}")
    return TEMPLATES[0].format(c=COLOURS[colour], s=SHAPES[shape], d=DIRECTIONS[direction])


def all_prompts() -> list[tuple[int, int, int, str]]:
    """(shape, colour, direction, prompt) for every label combination, shape-major."""
    return [(s, c, d, prompt(s, c, d)) for s in range(len(SHAPES)) for c in range(len(COLOURS))
            for d in range(len(DIRECTIONS))]


def vocab() -> Vocab:
    """The word vocabulary of every caption the templates can make (bos + words + eos per caption)."""
    captions = [t.format(c=c, s=s, d=d) for t in TEMPLATES for s in SHAPES for c in COLOURS for d in DIRECTIONS]
    return Vocab([w for cap in captions for w in cap.split()], 2 + max(len(cap.split()) for cap in captions))


def options_error(n: int, frames: int, size: int, val_fraction: float, test_fraction: float) -> tuple[str, str] | None:
    """(option, message) when the arguments cannot make a data set, else None (for a task's Config.validate)."""
    if frames < MIN_FRAMES:
        return "frames", f"expected >= {MIN_FRAMES} frames, got {frames}"
    if size < MIN_SIZE:
        return "size", f"expected a side of >= {MIN_SIZE} pixels, got {size}"
    for key, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            return key, f"expected a fraction in [0, 1), got {v}"
    if val_fraction + test_fraction >= 1.0:
        return "val_fraction", f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
    n_train = n - round(val_fraction * n) - round(test_fraction * n)
    if n < 1 or n_train < 1:
        return "n", f"expected enough videos for a non-empty train split, got n={n}"
    return None


def render_videos(labels: np.ndarray, frames: int, size: int, rng: np.random.Generator, *, supersample: int = 2,
                  chunk: int = 256) -> np.ndarray:
    """Videos uint8 (N, T, 3, size, size) for `labels` (N, 3) = (shape, colour, direction) indices; nuisances
    from `rng` (see the module notes)."""
    n = len(labels)
    radius = rng.uniform(*RADIUS, n) * size
    speed = rng.uniform(*SPEED, n) * size
    margin = 1.1 * radius + 1.0  # (N,): one clear pixel beyond the outline
    speed = np.minimum(speed, (size - 2 * margin) / max(frames - 1, 1))
    margin = margin[:, None]  # (N, 1)
    travel = (frames - 1) * speed
    step = np.array([STEP[DIRECTIONS[d]] for d in labels[:, 2]])  # (N, 2)
    # start anywhere that keeps the whole path inside: along the motion, leave room for the travel
    lo = margin + np.where(step < 0, travel[:, None], 0.0)  # (N, 2)
    hi = size - margin - np.where(step > 0, travel[:, None], 0.0)
    start = lo + rng.uniform(0.0, 1.0, (n, 2)) * (hi - lo)
    base = np.array([RGB[COLOURS[c]] for c in labels[:, 1]])
    fg = np.clip(base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (n, 3)), 0.0, 1.0)
    bg = rng.uniform(*BACKGROUND, n)
    kind = np.array([IMAGE_SHAPES.index(SHAPES[s]) for s in labels[:, 0]])

    # c_t = c_0 + t speed d: centres (N, T, 2)
    t = np.arange(frames, dtype=np.float64)
    centre = start[:, None, :] + t[None, :, None] * speed[:, None, None] * step[:, None, :]
    s = supersample
    sub = (np.arange(size * s) + 0.5) / s
    px, py = np.meshgrid(sub, sub, indexing="xy")  # (S, S), S = size * s: px along the width
    # one row per (video, frame): (N * T,) flattened
    flat_kind = np.repeat(kind, frames)
    flat_r = np.repeat(radius, frames)
    flat_c = centre.reshape(-1, 2)
    flat_fg = np.repeat(fg, frames, axis=0)
    flat_bg = np.repeat(bg, frames)
    out = np.empty((n * frames, 3, size, size), dtype=np.uint8)
    for a in range(0, n * frames, chunk):
        b = slice(a, min(a + chunk, n * frames))
        r = flat_r[b, None, None]
        # q = (p - c) / r with y flipped: the sample in the shape's own frame, y up (so the triangle points up)
        qx = (px[None] - flat_c[b, 0, None, None]) / r
        qy = (flat_c[b, 1, None, None] - py[None]) / r
        hit = _inside(flat_kind[b], qx, qy).astype(np.float32)
        # (B, S, S) -> (B, size, s, size, s) -> coverage (B, size, size)
        cover = hit.reshape(-1, size, s, size, s).mean(axis=(2, 4))
        # pixel = coverage * fg + (1 - coverage) * bg
        img = cover[:, None] * flat_fg[b, :, None, None] + (1.0 - cover[:, None]) * flat_bg[b, None, None, None]
        out[b] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    # (N * T, 3, H, W) -> (N, T, 3, H, W)
    return out.reshape(n, frames, 3, size, size)


def load_moving_shapes(n: int = DEFAULTS["n"], frames: int = DEFAULTS["frames"], size: int = DEFAULTS["size"],
                       seed: int = DEFAULTS["seed"], val_fraction: float = DEFAULTS["val_fraction"],
                       test_fraction: float = DEFAULTS["test_fraction"]) -> dict[str, MovingShapes]:
    """{"train", "val", "test"} MovingShapes, deterministic from the arguments (see the module notes)."""
    err = options_error(n, frames, size, val_fraction, test_fraction)
    if err:
        raise ValueError(f"load_moving_shapes: {err[0]}: {err[1]}")
    rng = np.random.default_rng([seed, 0x71DE0])
    k_s, k_c, k_d = len(SHAPES), len(COLOURS), len(DIRECTIONS)
    combo = rng.permutation(np.arange(n) % (k_s * k_c * k_d))
    # combo -> (shape, colour, direction): shape fastest
    labels = np.stack([combo % k_s, (combo // k_s) % k_c, combo // (k_s * k_c)], axis=1).astype(np.int64)
    templates = rng.integers(0, len(TEMPLATES), n)
    videos = render_videos(labels, frames, size, rng)
    captions = [TEMPLATES[t].format(c=COLOURS[c], s=SHAPES[s], d=DIRECTIONS[d])
                for t, (s, c, d) in zip(templates, labels.tolist())]
    full = MovingShapes(torch.from_numpy(videos), *(torch.from_numpy(labels[:, j].copy()) for j in range(3)), captions)
    order = rng.permutation(n)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    return {"test": full.subset(order[:n_test]), "val": full.subset(order[n_test:n_test + n_val]),
            "train": full.subset(order[n_test + n_val:])}


# ----------------------------------------------------------------------------------------------------
# Layout conversions


def to_model(videos: Tensor) -> Tensor:
    """uint8 (N, T, 3, H, W) -> float32 (N, 3, T, H, W) in [-1, 1]."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"to_model expects uint8 videos (N, T, 3, H, W), got shape {tuple(videos.shape)}")
    # x = v / 127.5 - 1, (N, T, 3, H, W) -> (N, 3, T, H, W)
    return videos.permute(0, 2, 1, 3, 4).float().div(127.5).sub(1.0).contiguous()


def from_model(x: Tensor) -> Tensor:
    """float (N, 3, T, H, W) in [-1, 1] (clamped) -> uint8 (N, T, 3, H, W)."""
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"from_model expects float videos (N, 3, T, H, W), got shape {tuple(x.shape)}")
    # v = round((x + 1) * 127.5), (N, 3, T, H, W) -> (N, T, 3, H, W)
    v = x.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return v.permute(0, 2, 1, 3, 4).contiguous().cpu()


# ----------------------------------------------------------------------------------------------------
# Writers


def _check_video(v: Tensor, what: str) -> Tensor:
    if not isinstance(v, Tensor) or v.dim() != 4 or v.shape[1] != 3 or v.dtype != torch.uint8:
        got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{what} must be a uint8 video (T, 3, H, W), got {got}")
    return v.cpu()


def _grid(videos: list[Tensor], columns: int, gap: int) -> Tensor:
    """Videos (T, 3, H, W) of equal size laid out `columns` per row with `gap` pixels between: (T, 3, H', W')."""
    t, _, h, w = videos[0].shape
    rows = math.ceil(len(videos) / columns)
    cols = min(columns, len(videos))
    out = torch.zeros(t, 3, rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, dtype=torch.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, columns)
        out[:, :, r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = v
    return out


def write_gif(video: Tensor | list[Tensor], path: str | Path, fps: int = 8, scale: int = 1, columns: int = 0,
              gap: int = 1) -> Path:
    """A looping GIF of one video uint8 (T, 3, H, W), or of several laid side by side (`columns` > 0: that many
    per row), each frame upscaled `scale` times (nearest). Written atomically (a temporary file renamed over
    `path`). Returns the path. (The project's one GIF writer: workbench/train/nerf.py uses it too.)"""
    from PIL import Image

    videos = [_check_video(v, f"video {i}") for i, v in enumerate(video if isinstance(video, (list, tuple)) else [video])]
    if not videos:
        raise ValueError("write_gif needs at least one video")
    if any(v.shape != videos[0].shape for v in videos):
        raise ValueError(f"write_gif: videos side by side must share a shape, got {sorted({tuple(v.shape) for v in videos})}")
    if fps < 1 or scale < 1:
        raise ValueError(f"write_gif: fps and scale must be >= 1, got fps={fps}, scale={scale}")
    grid = _grid(videos, columns or len(videos), gap if len(videos) > 1 else 0)
    frames = []
    for f in grid:  # (3, H, W) -> (H, W, 3)
        img = Image.fromarray(f.permute(1, 2, 0).numpy())
        frames.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                   optimize=False, disposal=1)
    tmp.replace(path)
    return path


def write_strip(videos: Tensor, path: str | Path, scale: int = 1, gap: int = 1) -> Path:
    """A PNG with one row per video of uint8 (N, T, 3, H, W) and one column per frame. Returns the path."""
    from PIL import Image

    if videos.dim() != 5 or videos.shape[2] != 3 or videos.dtype != torch.uint8:
        raise ValueError(f"write_strip expects uint8 videos (N, T, 3, H, W), got {videos.dtype} {tuple(videos.shape)}")
    if scale < 1:
        raise ValueError(f"write_strip: scale must be >= 1, got {scale}")
    n, t = videos.shape[:2]
    # (N, T, 3, H, W) -> N * T frames (1, 3, H, W) laid out T per row
    frames = [f[None] for f in videos.cpu().reshape(n * t, *videos.shape[2:])]
    img = _grid(frames, t, gap)[0].permute(1, 2, 0).numpy()  # (H', W', 3)
    out = Image.fromarray(img)
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
