"""Small labelled image sets for the fundamentals tasks: CIFAR-10 when the user has it, digits and shapes always.

`load_images(name, data_dir, *, seed, val_fraction, n, size)` returns an `ImageSet`: float32 images
(N, C, H, W) in [0, 1] and int64 labels (N,) for train, val and test, the class names, and `source`, a line
saying what was actually loaded.

    digits    scikit-learn's `load_digits()`: 8x8 grayscale handwritten digits, pixel values 0..16 divided by 16,
              shape (N, 1, 8, 8). Shipped inside scikit-learn, so it needs no download.
    shapes    generated RGB images of one of `SHAPES` each (see `render_shapes`), deterministic from the seed.
    cifar10   the official "CIFAR-10 python version" batches read from `data_dir` (the folder itself or its
              `cifar-10-batches-py/` child): data_batch_1..5 are the training pool, test_batch the test set.

Splits. digits and shapes have no official split: a stratified split keeps `TEST_FRACTION` of every class for
test and `val_fraction` of what remains for val, the rest is train; each class's members are ordered by a
permutation drawn from `seed`, so a seed always gives the same, disjoint splits. CIFAR-10's test set is its
test batch; `val_fraction` of the training pool (again per class) is held out for val.
`n > 0` caps the data: shapes renders `n` images (default `SHAPES_N`); digits and CIFAR-10 first keep a
seeded random subset of `n` images of their pool (digits: all 1797 images; CIFAR-10: the training batches;
its test batch is always whole). `size > 0` renders shapes at that many pixels, or resizes digits / CIFAR-10
images bilinearly (antialiased when shrinking).

CIFAR-10 format (https://www.cs.toronto.edu/~kriz/cifar.html). Each batch file is a pickled dict with bytes keys:
b"data" a uint8 array (10000, 3072) whose rows are 1024 red, then 1024 green, then 1024 blue values of a
32x32 image in row-major order; b"labels" a list of ints in 0..9. `batches.meta` holds b"label_names".
Pickles can run arbitrary code when loaded, so they are read with `RestrictedUnpickler`, which resolves only
the few numpy names an array needs (its reconstructor, ndarray, dtype, scalar) and a latin-1 bytes decoder
(how Python 3 stores bytes at protocol 2); any other global (os.system, builtins.eval, ...) is refused with a
`DataError` naming the file. Even numpy's own names are wrapped: `numpy.ndarray` resolves to a token only the
reconstructor accepts (called directly, `ndarray(shape, 'O', buffer=...)` would make an object array of
pointers the file chose, which crashes or worse when read), and no object dtype is built. The loaded values
are then checked: uint8 pixels, integer labels, string class names. `write_cifar_batches` writes files in the same format, for tests and for users
who want to feed their own 32x32 images through the CIFAR-10 path.

`find_cifar10(data_dir)` says where the batches are, or None when they are not there: a task falls back to
digits or shapes only when CIFAR-10 is absent, never when its files are present but broken.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.errors import DataError

__all__ = [
    "ImageSet", "load_images", "image_options_error", "NAMES", "SHAPES", "SHAPES_N", "SHAPES_SIZE", "TEST_FRACTION",
    "render_shapes", "find_cifar10", "load_cifar10", "write_cifar_batches", "RestrictedUnpickler",
    "CIFAR_TRAIN_FILES", "CIFAR_TEST_FILE", "CIFAR_META_FILE",
]

NAMES = ("cifar10", "digits", "shapes")
TEST_FRACTION = 0.2  # digits and shapes: share of every class kept for the test split
SHAPES = ("circle", "ring", "square", "triangle", "cross", "star")
SHAPES_N = 6000  # shapes images rendered when n = 0
SHAPES_SIZE = 32  # shapes pixels when size = 0
SHAPES_MIN_SIZE = 8  # render_shapes' smallest side
DIGITS_N = 1797  # images in scikit-learn's digits
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"
CIFAR_SIDE = 32


@dataclass
class ImageSet:
    name: str  # "cifar10" | "digits" | "shapes"
    classes: list[str]
    train: tuple[Tensor, Tensor]  # x (N, C, H, W) float32 in [0, 1], y (N,) int64
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    source: str  # what was loaded, e.g. "CIFAR-10 python batches at /x" or "scikit-learn digits"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train[0].shape[1:])

    def summary(self) -> str:
        return (f"{self.name}: {len(self.classes)} classes, images {self.shape}, train {len(self.train[1])}, "
                f"val {len(self.val[1])}, test {len(self.test[1])} ({self.source})")


def image_options_error(name: str, n: int, size: int) -> tuple[str, str] | None:
    """(option, message) when `n` or `size` cannot work for image set `name`, else None: for a task's
    Config.validate, so a bad value fails before any work, naming its key (`fail(*error)`)."""
    if n < 0 or size < 0:
        return ("n" if n < 0 else "size"), "expected a number >= 0 (0 = the default)"
    if name == "digits" and n and not 10 * 5 <= n <= DIGITS_N:
        return "n", f"the digits hold {DIGITS_N} images: n must be 0 (all) or 50..{DIGITS_N} (enough of every class for train, val and test), got {n}"
    if name == "shapes":
        if size and size < SHAPES_MIN_SIZE:
            return "size", f"shapes are drawn at >= {SHAPES_MIN_SIZE} pixels, got {size}"
        if n and n < 5 * len(SHAPES):
            return "n", f"shapes needs n >= {5 * len(SHAPES)} (enough of each of {len(SHAPES)} classes for the splits), got {n}"
    if name == "cifar10" and n and not 50 <= n <= 50_000:
        return "n", f"CIFAR-10's training batches hold 50000 images: n must be 0 (all) or 50..50000, got {n}"
    return None


def load_images(name: str, data_dir: str | Path = "", *, seed: int = 0, val_fraction: float = 0.1,
                n: int = 0, size: int = 0) -> ImageSet:
    """Load one of `NAMES` with deterministic train / val / test splits (see the module notes)."""
    if name not in NAMES:
        raise DataError(f"unknown image set {name!r}: expected one of {', '.join(NAMES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 0 or size < 0:
        raise ValueError(f"n and size must be >= 0 (0 = the default), got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        return load_cifar10(data_dir, seed=seed, val_fraction=val_fraction, n=n, size=size)
    if name == "digits":
        x, y, classes, source = _digits()
        if n:
            if n > len(y):
                raise ValueError(f"digits has {len(y)} images, n={n} asks for more")
            keep = np.sort(rng.permutation(len(y))[:n])
            x, y = x[keep], y[keep]
            source += f", a seeded subset of {n}"
    else:
        count = n or SHAPES_N
        side = size or SHAPES_SIZE
        x, y = render_shapes(count, side, seed=seed)
        classes, source = list(SHAPES), f"shapes rendered from seed {seed} ({count} images, {side}x{side})"
        size = 0  # already rendered at the requested size
    if len(np.unique(y)) < len(classes):
        raise ValueError(f"{name}: n={len(y)} is too small to hold every class")
    train_i, val_i, test_i = stratified_split(y, TEST_FRACTION, val_fraction, rng)
    pick = lambda idx: (_resize(torch.from_numpy(x[idx]), size), torch.from_numpy(y[idx]))  # noqa: E731
    return ImageSet(name, classes, pick(train_i), pick(val_i), pick(test_i), source)


def stratified_split(y: np.ndarray, test_fraction: float, val_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, val, test: per class, round(test_fraction * count) go to test and
    round(val_fraction * the rest) to val, in an order drawn from `rng`; each split is then shuffled."""
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = round(test_fraction * len(members))
        n_val = round(val_fraction * (len(members) - n_test))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:])
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)


def _resize(x: Tensor, size: int) -> Tensor:
    if not size or x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    shrink = size < x.shape[-1]
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp_(0.0, 1.0)


def _digits() -> tuple[np.ndarray, np.ndarray, list[str], str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is what ships the digits
        raise DataError("the digits image set needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    # (1797, 8, 8) values 0..16 -> (N, 1, 8, 8) in [0, 1]
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64), [str(c) for c in d.target_names], "scikit-learn digits (load_digits)"


# ----------------------------------------------------------------------------------------------------
# Shapes


def _inside(kind: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Whether the points q (in the shape's own frame: centred, unrotated, radius 1) lie inside shape `kind`.
    kind (B,), q (B, S, S) -> bool (B, S, S)."""
    k = kind[:, None, None]
    r2 = qx * qx + qy * qy
    # equilateral triangle with circumradius 1 (vertex up): q . n_j <= 1/2 for the edge normals n_j at
    # -90, 30 and 150 degrees (its inradius is half its circumradius)
    normals = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90.0, 30.0, 150.0])]
    tri = np.logical_and.reduce([qx * nx + qy * ny <= 0.5 for nx, ny in normals])
    tri_flipped = np.logical_and.reduce([-(qx * nx + qy * ny) <= 0.5 for nx, ny in normals])
    ax, ay = np.abs(qx), np.abs(qy)
    arm = 0.3  # half-width of the cross's arms
    table = {
        "circle": r2 <= 1.0,
        "ring": (r2 <= 1.0) & (r2 >= 0.5**2),
        "square": np.maximum(ax, ay) <= 0.75,
        "triangle": tri,
        "cross": ((ax <= 1.0) & (ay <= arm)) | ((ax <= arm) & (ay <= 1.0)),
        # hexagram: the triangle and its 180-degree turn
        "star": tri | tri_flipped,
    }
    out = np.zeros(qx.shape, dtype=bool)
    for i, name in enumerate(SHAPES):
        out |= (k == i) & table[name]
    return out


def render_shapes(n: int, size: int = SHAPES_SIZE, *, seed: int = 0, supersample: int = 2,
                  chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """`n` RGB images (n, 3, size, size) float32 in [0, 1] and their labels (n,), index into `SHAPES`.

    The rule: the label is the shape, and only the shape. Everything else is a nuisance drawn per image from
    `seed`: the shape's radius (25-45% of the side), centre (the shape stays inside the image), rotation (any
    angle: so squares, triangles, crosses and stars appear in every orientation), colour, a background colour at
    least 0.5 away from it in RGB, a linear brightness gradient across the background and Gaussian pixel
    noise (sigma 0.02-0.06). Edges are antialiased by averaging supersample^2 points per pixel. Classes are
    balanced (label i mod K, shuffled).
    """
    if n < 1 or size < SHAPES_MIN_SIZE:
        raise ValueError(f"render_shapes needs n >= 1 and size >= {SHAPES_MIN_SIZE}, got n={n}, size={size}")
    rng = np.random.default_rng([seed, 0x5A0E5])
    k = len(SHAPES)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    radius = rng.uniform(0.25, 0.45, n) * size
    margin = 1.1 * radius  # a square's corner reaches 0.75 * sqrt(2) ~ 1.06 radii
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    theta = rng.uniform(0.0, 2 * math.pi, n)
    fg = rng.uniform(0.0, 1.0, (n, 3))
    bg = rng.uniform(0.0, 1.0, (n, 3))
    close = np.linalg.norm(fg - bg, axis=1) < 0.5
    while close.any():  # redraw the background until the shape stands out
        bg[close] = rng.uniform(0.0, 1.0, (int(close.sum()), 3))
        close = np.linalg.norm(fg - bg, axis=1) < 0.5
    gradient = rng.uniform(-0.1, 0.1, (n, 2))
    sigma = rng.uniform(0.02, 0.06, n)
    noise_seed = rng.integers(0, 2**63)

    s = supersample
    sub = (np.arange(size * s) + 0.5) / s  # sample positions in pixel units
    px, py = np.meshgrid(sub, sub, indexing="xy")  # (S, S) with S = size * s: px along width
    centred = (np.arange(size) + 0.5) / size - 0.5
    ux, uy = np.meshgrid(centred, centred, indexing="xy")  # (size, size) in [-0.5, 0.5]
    out = np.empty((n, 3, size, size), dtype=np.float32)
    noise_rng = np.random.default_rng(noise_seed)
    for lo in range(0, n, chunk):
        b = slice(lo, min(lo + chunk, n))
        dx = px[None] - cx[b, None, None]
        dy = py[None] - cy[b, None, None]
        cos, sin = np.cos(theta[b])[:, None, None], np.sin(theta[b])[:, None, None]
        r = radius[b, None, None]
        # q = R(-theta) (p - c) / r: the sample in the shape's own frame
        qx = (cos * dx + sin * dy) / r
        qy = (-sin * dx + cos * dy) / r
        hit = _inside(labels[b], qx, qy).astype(np.float32)
        # (B, S, S) -> (B, size, s, size, s) -> coverage (B, size, size)
        cover = hit.reshape(-1, size, s, size, s).mean(axis=(2, 4))
        # background(u) = bg + g . u, the same offset in every channel
        shade = gradient[b, 0, None, None] * ux[None] + gradient[b, 1, None, None] * uy[None]
        back = bg[b, :, None, None] + shade[:, None]  # (B, 3, size, size)
        # pixel = coverage * fg + (1 - coverage) * background + noise
        img = cover[:, None] * fg[b, :, None, None] + (1.0 - cover[:, None]) * back
        img = img + sigma[b, None, None, None] * noise_rng.standard_normal(img.shape)
        out[b] = np.clip(img, 0.0, 1.0)
    return out, labels


# ----------------------------------------------------------------------------------------------------
# CIFAR-10


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call (`_codecs.encode`) to rebuild a bytes object."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's ndarray reconstructor, whatever module holds it
_SCALAR = np.float64(0).__reduce__()[0]


class _NdarrayName:
    """What the name numpy.ndarray resolves to inside a CIFAR-10 pickle: a token that only `_reconstruct` accepts.

    The real class must never reach the pickle: `ndarray(shape, 'O', buffer=...)` builds an object array whose
    "pointers" are bytes the file chose, and reading it (np.asarray, str) dereferences them."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("calling numpy.ndarray is not allowed in a CIFAR-10 batch")


def _reconstruct(subtype, shape, dtype):
    """numpy's array reconstructor, for plain ndarrays of non-object dtypes only."""
    if subtype is not _NdarrayName:
        raise pickle.UnpicklingError(f"array reconstruction of {subtype!r} is not allowed in a CIFAR-10 batch")
    return _RECONSTRUCT(np.ndarray, shape, _dtype(dtype))


def _dtype(*args):
    """np.dtype, refusing object dtypes (whose items are pointers: the file would choose them)."""
    d = np.dtype(*args)
    if d.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in a CIFAR-10 batch")
    return d


def _scalar(dtype, *args):
    return _SCALAR(_dtype(dtype), *args)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the name in the official (numpy 1) files
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # the name numpy 2 writes
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a pickled numpy array and bytes need (`_ALLOWED`)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch") from None


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path} is missing (expected {', '.join(CIFAR_TRAIN_FILES)}, "
                        f"{CIFAR_TEST_FILE} and {CIFAR_META_FILE} in {path.parent})")
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"CIFAR-10 file {path} could not be read as a CIFAR-10 python pickle: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 file {path} holds a {type(obj).__name__}, expected a dict")
    # the official files have bytes keys; a re-pickled copy may have str keys
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"CIFAR-10 file {path} has no '{key}' entry (it has {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10 file {path}: 'data' must be uint8 of shape (N, {3 * CIFAR_SIDE ** 2}), got {got}")
    raw = d["labels"]
    plain = isinstance(raw, list) and all(isinstance(v, int) for v in raw)
    if not (plain or isinstance(raw, np.ndarray) and raw.dtype.kind in "iu"):
        raise DataError(f"CIFAR-10 file {path}: 'labels' must be a list of integers")
    try:
        labels = np.asarray(raw, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"CIFAR-10 file {path}: 'labels' must be a list of integers") from None
    if len(labels) != len(data):
        raise DataError(f"CIFAR-10 file {path}: {len(data)} images but {len(labels)} labels")
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        raise DataError(f"CIFAR-10 file {path}: label {labels[bad][0]} out of range 0..{k - 1}")
    return data, labels


def find_cifar10(data_dir: str | Path) -> Path | None:
    """The folder holding the CIFAR-10 batches (`data_dir` or its `cifar-10-batches-py/`), or None if neither
    has any of them. A folder with only some of the files is returned: loading it then names what is missing."""
    if not str(data_dir):
        return None
    root = Path(data_dir).expanduser()
    names = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE, CIFAR_META_FILE)
    for folder in (root, root / "cifar-10-batches-py"):
        if any((folder / f).is_file() for f in names):
            return folder
    return None


def load_cifar10(data_dir: str | Path, *, seed: int = 0, val_fraction: float = 0.1, n: int = 0,
                 size: int = 0) -> ImageSet:
    """Read the official python batches; see the module notes for the format, the split and `n`, `size`."""
    if not str(data_dir):
        raise DataError("CIFAR-10 needs data_dir: the folder with data_batch_1..5, test_batch and batches.meta")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder {root} does not exist")
    folder = find_cifar10(root)
    if folder is None:
        raise DataError(f"no CIFAR-10 batches in {root} or {root / 'cifar-10-batches-py'} (expected "
                        f"{', '.join(CIFAR_TRAIN_FILES)}, {CIFAR_TEST_FILE} and {CIFAR_META_FILE})")
    meta_path = folder / CIFAR_META_FILE
    meta = _read_pickle(meta_path)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(v, (bytes, str)) for v in names):
        raise DataError(f"CIFAR-10 file {meta_path}: 'label_names' must be a non-empty list of strings")
    classes = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in names]
    parts = [_read_batch(folder / f, len(classes)) for f in CIFAR_TRAIN_FILES]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    test_data, test_labels = _read_batch(folder / CIFAR_TEST_FILE, len(classes))
    rng = np.random.default_rng(seed)
    source = f"CIFAR-10 python batches at {folder}"
    if n and n < len(labels):
        keep = np.sort(rng.permutation(len(labels))[:n])
        data, labels = data[keep], labels[keep]
        source += f", a seeded subset of {n} training images"
    train_i, val_i, _ = stratified_split(labels, 0.0, val_fraction, rng)

    def images(rows: np.ndarray) -> Tensor:
        # (N, 3072) uint8, rows = R plane, G plane, B plane -> (N, 3, 32, 32) float32 in [0, 1]
        x = torch.from_numpy(rows.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)).float().div_(255.0)
        return _resize(x, size)

    return ImageSet("cifar10", classes, (images(data[train_i]), torch.from_numpy(labels[train_i])),
                    (images(data[val_i]), torch.from_numpy(labels[val_i])),
                    (images(test_data), torch.from_numpy(test_labels)), source)


def _to_uint8(x: np.ndarray | Tensor, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim != 4 or a.shape[1:] != (3, CIFAR_SIDE, CIFAR_SIDE):
        raise ValueError(f"{what} must have shape (N, 3, {CIFAR_SIDE}, {CIFAR_SIDE}), got {a.shape}")
    if a.dtype != np.uint8:  # floats in [0, 1]
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    # (N, 3, 32, 32) -> (N, 3072): R plane, G plane, B plane, each row-major
    return np.ascontiguousarray(a.reshape(len(a), -1))


def write_cifar_batches(folder: str | Path, x: np.ndarray | Tensor, y, label_names: list[str],
                        x_test: np.ndarray | Tensor, y_test, *, batches: int = len(CIFAR_TRAIN_FILES)) -> Path:
    """Write images in the CIFAR-10 python format: `x` (N, 3, 32, 32), uint8 or floats in [0, 1], with labels
    `y`, split in order over data_batch_1..`batches` (the loader expects five), `x_test`/`y_test` as test_batch,
    and batches.meta with `label_names`. Returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [str(s) for s in label_names]

    def write(name: str, xs, ys, label: str) -> None:
        rows = _to_uint8(xs, f"{name} images")
        labels = [int(v) for v in np.asarray(ys).reshape(-1)]
        if len(labels) != len(rows):
            raise ValueError(f"{name}: {len(rows)} images but {len(labels)} labels")
        if any(not 0 <= v < len(names) for v in labels):
            raise ValueError(f"{name}: labels must be in 0..{len(names) - 1}")
        d = {b"batch_label": label.encode(), b"labels": labels, b"data": rows,
             b"filenames": [f"image_{i:05d}.png".encode() for i in range(len(rows))]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))

    xs = _to_uint8(x, "x")
    ys = np.asarray(y).reshape(-1)
    if len(ys) != len(xs):
        raise ValueError(f"x has {len(xs)} images but y has {len(ys)} labels")
    cuts = np.array_split(np.arange(len(xs)), batches)
    for i, idx in enumerate(cuts, start=1):
        rows = xs[idx].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
        write(f"data_batch_{i}", rows, ys[idx], f"training batch {i} of {batches}")
    write(CIFAR_TEST_FILE, x_test, y_test, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": max(len(c) for c in cuts), b"label_names": [s.encode() for s in names],
            b"num_vis": 3 * CIFAR_SIDE * CIFAR_SIDE}
    (folder / CIFAR_META_FILE).write_bytes(pickle.dumps(meta, protocol=2))
    return folder
