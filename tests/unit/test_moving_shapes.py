"""The moving-shapes videos are what their labels say: shape outline, dominant colour channel, the centroid moving
the stated way at constant speed inside the frame; splits deterministic and disjoint; writers and layouts round-trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.data import moving_shapes as ms


@pytest.fixture(scope="module")
def data():
    return ms.load_moving_shapes(n=192, frames=9, size=32, seed=3, val_fraction=0.125, test_fraction=0.125)


def _mask(videos):
    """Foreground mask (N, T, H, W): pixels well above the dark background."""
    return videos.float().amax(dim=2) > 128


def test_splits_sizes_disjoint_balanced_and_deterministic(data):
    assert {k: len(v) for k, v in data.items()} == {"train": 144, "val": 24, "test": 24}
    assert data["train"].videos.shape == (144, 9, 3, 32, 32) and data["train"].videos.dtype == torch.uint8
    again = ms.load_moving_shapes(n=192, frames=9, size=32, seed=3, val_fraction=0.125, test_fraction=0.125)
    for split in data:
        assert torch.equal(data[split].videos, again[split].videos)
        assert data[split].captions == again[split].captions
    other = ms.load_moving_shapes(n=192, frames=9, size=32, seed=4, val_fraction=0.125, test_fraction=0.125)
    assert not torch.equal(other["train"].videos, data["train"].videos)
    # disjoint: no video appears in two splits (the nuisances make every video unique)
    flat = {k: {v.numpy().tobytes() for v in d.videos} for k, d in data.items()}
    assert len(flat["train"]) == 144 and not flat["train"] & flat["val"] and not flat["train"] & flat["test"]
    assert not flat["val"] & flat["test"]
    # balanced: 192 = 3 x 64 combinations, each exactly 3 times over the splits
    combo = torch.cat([d.shape * 16 + d.colour * 4 + d.direction for d in data.values()])
    assert torch.bincount(combo, minlength=64).tolist() == [3] * 64


def test_captions_name_the_labels(data):
    d = data["train"]
    for cap, s, c, k in zip(d.captions, d.shape.tolist(), d.colour.tolist(), d.direction.tolist()):
        words = cap.split()
        assert ms.SHAPES[s] in words and ms.COLOURS[c] in words and words[-1] == ms.DIRECTIONS[k]
        assert any(cap == t.format(c=ms.COLOURS[c], s=ms.SHAPES[s], d=ms.DIRECTIONS[k]) for t in ms.TEMPLATES)
    assert ms.prompt(0, 0, 0) == "a red circle moving left"
    assert len(set(d.captions)) > 64  # several templates in use
    v = ms.vocab()
    ids = v.encode(d.captions)
    assert (ids == 3).sum() == 0 and [v.decode(r) for r in ids[:5]] == d.captions[:5]
    with pytest.raises(ValueError, match="direction must be an index"):
        ms.prompt(0, 0, 9)


def test_motion_is_the_labelled_direction_at_constant_speed_inside_the_frame(data):
    d = data["train"]
    m = _mask(d.videos)  # (N, T, H, W)
    assert m.any(dim=(2, 3)).all(), "the shape is visible in every frame"
    # nothing touches the border: the whole path stays inside
    assert not m[..., 0, :].any() and not m[..., -1, :].any() and not m[..., :, 0].any() and not m[..., :, -1].any()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    # coverage-weighted centroid: brightness above the frame's background (antialiased edges count partly)
    bright = d.videos.float().amax(dim=2)
    w = bright - bright.amin(dim=(2, 3), keepdim=True)  # (N, T, H, W)
    area = w.sum(dim=(2, 3))
    cx = (w * xs).sum(dim=(2, 3)) / area  # (N, T)
    cy = (w * ys).sum(dim=(2, 3)) / area
    vel = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], dim=1) / 8  # pixels per frame
    want = torch.tensor([ms.STEP[ms.DIRECTIONS[k]] for k in d.direction.tolist()])
    along = (vel * want).sum(dim=1)
    across = (vel * want.flip(1)).sum(dim=1).abs()
    lo, hi = ms.SPEED[0] * 32, ms.SPEED[1] * 32
    assert (along > 0.8 * lo).all() and (along < 1.2 * hi).all(), along
    assert (across < 0.15).all(), across
    # constant speed: every frame-to-frame step within half a pixel of the mean step (2x2 antialiasing moves edges in half pixels)
    steps = torch.stack([cx.diff(dim=1), cy.diff(dim=1)], dim=2)  # (N, T - 1, 2)
    assert (steps - vel[:, None]).norm(dim=2).max() < 0.5
    # the area is about constant (rigid motion)
    assert ((area.amax(1) - area.amin(1)) / area.mean(1)).max() < 0.25


def test_colour_is_the_dominant_channel_and_the_outline_is_the_shape(data):
    d = data["train"]
    m = _mask(d.videos)
    fg = (d.videos.float() * m[:, :, None]).sum(dim=(1, 3, 4)) / m.sum(dim=(1, 2, 3))[:, None]  # (N, 3) mean colour
    for rgb, c in zip(fg.tolist(), d.colour.tolist()):
        r, g, b = rgb
        name = ms.COLOURS[c]
        if name == "red":
            assert r > 2 * g and r > 2 * b
        elif name == "green":
            assert g > 2 * r and g > 2 * b
        elif name == "blue":
            assert b > 1.5 * r and b > 1.5 * g
        else:  # yellow: red and green high, blue low
            assert min(r, g) > 3 * b
    # fill ratio of the bounding box tells the shapes apart: square ~1, circle ~pi/4, triangle ~1/2, cross ~0.5
    fill = {k: [] for k in ms.SHAPES}
    for mask, s in zip(m, d.shape.tolist()):
        f = mask[4]
        rows, cols = f.any(1).nonzero(), f.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill[ms.SHAPES[s]].append(f.sum().item() / box.item())
    mean = {k: float(np.mean(v)) for k, v in fill.items()}
    assert mean["square"] > 0.9 and 0.68 < mean["circle"] < 0.88 and mean["triangle"] < 0.62 and mean["cross"] < 0.62
    # triangle (point up) is wider at the bottom; a cross is symmetric
    tri = [mask[4] for mask, s in zip(m, d.shape.tolist()) if ms.SHAPES[s] == "triangle"]
    for f in tri:
        rows = f.any(1).nonzero().flatten()
        widths = f.sum(1)[rows.min():rows.max() + 1]
        assert widths[-2:].float().mean() > 2 * widths[:2].float().mean()


def test_layouts_writers_and_errors(data, tmp_path):
    v = data["val"].videos[:3]
    x = ms.to_model(v)
    assert x.shape == (3, 3, 9, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x[1, 0, 2], v[1, 2, 0].float() / 127.5 - 1)
    assert torch.equal(ms.from_model(x), v)
    gif = ms.write_gif([v[0], v[1], v[2]], tmp_path / "a.gif", scale=2, columns=2)
    im = Image.open(gif)
    assert im.n_frames == 9 and im.size == (2 * (2 * 32 + 1), 2 * (2 * 32 + 1))
    im.seek(3)
    strip = Image.open(ms.write_strip(v, tmp_path / "s.png"))
    assert strip.size == (9 * 33 - 1, 3 * 33 - 1)
    px = np.asarray(strip.convert("RGB"))
    assert np.array_equal(px[33:65, 2 * 33:2 * 33 + 32], v[1, 2].permute(1, 2, 0).numpy())  # row 1, frame 2
    sub = data["train"].subset([5, 1])
    assert sub.captions == [data["train"].captions[5], data["train"].captions[1]]
    assert torch.equal(sub.videos[1], data["train"].videos[1]) and len(sub) == 2
    assert len(data["train"].subset(slice(0, 10))) == 10
    with pytest.raises(ValueError, match="frames"):
        ms.load_moving_shapes(n=10, frames=1)
    with pytest.raises(ValueError, match="val_fraction"):
        ms.load_moving_shapes(n=10, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="uint8 video"):
        ms.write_gif(x[0], tmp_path / "b.gif")
    with pytest.raises(ValueError, match=r"\(N, T, 3, H, W\)"):
        ms.to_model(x)
