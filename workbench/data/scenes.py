"""Scenes for NeRF: rendered by the project from known geometry, and the Blender synthetic format read and written.

    load_scene(scene, size, n_train, n_val, n_test, seed, supersample) -> SceneData (train / val / test Views)
    render_views(scene, poses, height, width, focal, supersample) -> images, depth, alpha
    write_blender(data, folder) / load_blender(folder, ...)  the transforms_{train,val,test}.json + PNG layout

What is rendered
    A `Scene` is a few spheres and axis-aligned boxes (a flat box as the floor, checkered), lit by one
    directional light with Lambertian shading and hard shadows:
        colour = albedo * (ambient + (1 - ambient) * max(0, n . l) * visible(light)),
    against a white background (the Blender scenes' white_bkgd). Rays are cast analytically (ray-sphere
    quadratic, ray-box slabs) through the same pinhole camera as the model (workbench.models.nerf.get_rays:
    OpenGL axes, pixel centres at +0.5), so a ray the NeRF casts for pixel (i, j) is the centre ray of that
    pixel here. `supersample = s` renders at s times the resolution and averages s x s blocks (anti-aliased
    edges, what a camera integrates over a pixel); depth is the centre ray's hit distance along the ray
    parameter (0 where it misses), alpha the share of a pixel's sub-rays that hit something.

Cameras
    On a sphere of radius `radius` around the origin, looking at it, world +z up: train / val / test views at
    azimuths and elevations drawn from a generator seeded by `seed` (elevation between `elevation` degrees),
    so the held-out views are new viewpoints; `orbit(n)` gives an evenly spaced circle for novel-view GIFs.
    The focal length follows Blender's camera_angle_x (0.6911 rad, the synthetic scenes' value).

The Blender format (what a user's synthetic NeRF scene looks like)
    folder/transforms_{split}.json = {"camera_angle_x": fov, "frames": [{"file_path": "./train/r_0",
    "transform_matrix": 4x4 camera-to-world}, ...]} and RGBA PNGs (".png" appended when missing). Loading
    composites RGBA onto white (or black) and may resize to `size`, scaling the focal length with it.
    Optional "near" / "far" keys (written here; the Blender scenes use 2 and 6, the defaults).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from workbench.errors import DataError

__all__ = ["Sphere", "Box", "Scene", "SCENES", "Views", "SceneData", "camera_poses", "orbit", "render_views",
           "load_scene", "write_blender", "load_blender", "BLENDER_CAMERA_ANGLE_X"]

BLENDER_CAMERA_ANGLE_X = 0.6911112070083618  # the synthetic scenes' horizontal field of view (radians)
WHITE = 1.0


@dataclass
class Sphere:
    center: tuple[float, float, float]
    radius: float
    colour: tuple[float, float, float]


@dataclass
class Box:
    """Axis-aligned: center +- half along each axis; `checker` > 0 tiles it in squares of that side (x, y)."""
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    colour: tuple[float, float, float]
    checker: float = 0.0
    colour2: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class Scene:
    spheres: list[Sphere] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    light: tuple[float, float, float] = (0.4, 0.3, 1.0)  # direction towards the light
    ambient: float = 0.35
    radius: float = 4.0  # camera distance from the origin
    near: float = 2.0
    far: float = 6.0


SCENES: dict[str, Scene] = {
    # two spheres and a box on a checkered floor: every object well inside the 1.44-unit half-width of the
    # view at distance 4
    "shapes": Scene(
        spheres=[Sphere((0.35, -0.3, 0.0), 0.45, (0.85, 0.15, 0.15)), Sphere((-0.45, 0.5, -0.2), 0.25, (0.15, 0.3, 0.9))],
        boxes=[Box((-0.4, -0.45, -0.15), (0.25, 0.25, 0.3), (0.2, 0.75, 0.25)),
               Box((0.0, 0.0, -0.5), (1.0, 1.0, 0.05), (0.55, 0.55, 0.55), checker=0.5, colour2=(0.9, 0.85, 0.6))]),
    # one sphere, nothing else: the tests' closed forms (silhouette area pi r^2 f^2 / distance^2)
    "sphere": Scene(spheres=[Sphere((0.0, 0.0, 0.0), 0.8, (0.9, 0.3, 0.2))]),
}


# ----------------------------------------------------------------------------------------------------
# Ray casting


def _hit_spheres(o: Tensor, d: Tensor, spheres: list[Sphere]) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest hit t > 1e-6 (inf if none), normal (R, 3) and albedo (R, 3) over the spheres."""
    r = o.shape[0]
    t_best = torch.full((r,), math.inf, dtype=o.dtype)
    normal, albedo = torch.zeros_like(o), torch.zeros_like(o)
    for s in spheres:
        c = torch.tensor(s.center, dtype=o.dtype)
        oc = o - c
        # |o + t d - c|^2 = r^2  ->  a t^2 + b t + k = 0
        a, b, k = (d * d).sum(-1), 2 * (d * oc).sum(-1), (oc * oc).sum(-1) - s.radius ** 2
        disc = b * b - 4 * a * k
        sq = disc.clamp(min=0).sqrt()
        t0, t1 = (-b - sq) / (2 * a), (-b + sq) / (2 * a)
        t = torch.where(t0 > 1e-6, t0, t1)
        t = torch.where((disc >= 0) & (t > 1e-6), t, torch.full_like(t, math.inf))
        better = t < t_best
        t_best = torch.where(better, t, t_best)
        p = o + t.clamp(max=1e6).unsqueeze(-1) * d
        normal = torch.where(better.unsqueeze(-1), (p - c) / s.radius, normal)
        albedo = torch.where(better.unsqueeze(-1), torch.tensor(s.colour, dtype=o.dtype).expand_as(o), albedo)
    return t_best, normal, albedo


def _hit_boxes(o: Tensor, d: Tensor, boxes: list[Box]) -> tuple[Tensor, Tensor, Tensor]:
    r = o.shape[0]
    t_best = torch.full((r,), math.inf, dtype=o.dtype)
    normal, albedo = torch.zeros_like(o), torch.zeros_like(o)
    safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    for bx in boxes:
        c, h = torch.tensor(bx.center, dtype=o.dtype), torch.tensor(bx.half, dtype=o.dtype)
        # slabs: the ray is inside the box between max of the entries and min of the exits
        t1, t2 = (c - h - o) / safe, (c + h - o) / safe
        lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
        t_in, axis = lo.max(-1)
        t_out = hi.min(-1).values
        t = torch.where(t_in > 1e-6, t_in, t_out)
        t = torch.where((t_out >= t_in) & (t > 1e-6), t, torch.full_like(t, math.inf))
        better = t < t_best
        t_best = torch.where(better, t, t_best)
        # the entry face's normal: along the entry axis, against the ray
        n = torch.zeros_like(o).scatter_(-1, axis.unsqueeze(-1), -torch.sign(d.gather(-1, axis.unsqueeze(-1))))
        col = torch.tensor(bx.colour, dtype=o.dtype).expand_as(o)
        if bx.checker > 0:
            p = o + t.clamp(max=1e6).unsqueeze(-1) * d
            parity = (torch.floor(p[:, 0] / bx.checker) + torch.floor(p[:, 1] / bx.checker)).remainder(2) == 1
            col = torch.where(parity.unsqueeze(-1), torch.tensor(bx.colour2, dtype=o.dtype).expand_as(o), col)
        normal = torch.where(better.unsqueeze(-1), n, normal)
        albedo = torch.where(better.unsqueeze(-1), col, albedo)
    return t_best, normal, albedo


def cast(scene: Scene, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest hit of rays (R, 3) with the scene: t (R,) (inf on a miss), unit normal (R, 3), albedo (R, 3)."""
    ts, ns, cs = _hit_spheres(o, d, scene.spheres)
    tb, nb, cb = _hit_boxes(o, d, scene.boxes)
    box = (tb < ts).unsqueeze(-1)
    return torch.minimum(ts, tb), torch.where(box, nb, ns), torch.where(box, cb, cs)


def shade(scene: Scene, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rgb (R, 3) on white, depth t (R,) (0 on a miss), hit (R,) bool: Lambertian with hard shadows."""
    t, n, albedo = cast(scene, o, d)
    hit = torch.isfinite(t)
    light = torch.nn.functional.normalize(torch.tensor(scene.light, dtype=o.dtype), dim=0)
    p = o + torch.where(hit, t, torch.zeros_like(t)).unsqueeze(-1) * d
    # shadow ray from just above the surface towards the light
    ts, _, _ = cast(scene, p + 1e-4 * n, light.expand_as(p))
    lit = (~torch.isfinite(ts)).to(o.dtype)
    # colour = albedo (ambient + (1 - ambient) max(0, n . l) visible)
    diffuse = (n * light).sum(-1).clamp(min=0) * lit
    rgb = albedo * (scene.ambient + (1 - scene.ambient) * diffuse).unsqueeze(-1)
    rgb = torch.where(hit.unsqueeze(-1), rgb, torch.full_like(rgb, WHITE))
    return rgb, torch.where(hit, t, torch.zeros_like(t)), hit


def render_views(scene: Scene, poses: Tensor, height: int, width: int, focal: float,
                 supersample: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """images (N, H, W, 3) in [0, 1], depth (N, H, W) of the centre ray, alpha (N, H, W) coverage, float32."""
    from workbench.models.nerf import get_rays

    s = supersample
    images, depths, alphas = [], [], []
    for c2w in poses.to(torch.float64):
        o, d = get_rays(height * s, width * s, focal * s, c2w)  # (H s, W s, 3): sub-pixel centres
        rgb, _, hit = shade(scene, o.reshape(-1, 3), d.reshape(-1, 3))
        # (H s, W s, 3) -> (H, s, W, s, 3) -> mean over each s x s block
        images.append(rgb.reshape(height, s, width, s, 3).mean((1, 3)))
        alphas.append(hit.to(torch.float64).reshape(height, s, width, s).mean((1, 3)))
        o, d = get_rays(height, width, focal, c2w)
        _, depth, _ = shade(scene, o.reshape(-1, 3), d.reshape(-1, 3))
        depths.append(depth.reshape(height, width))
    return (torch.stack(images).float(), torch.stack(depths).float(), torch.stack(alphas).float())


# ----------------------------------------------------------------------------------------------------
# Cameras


def camera_poses(n: int, radius: float, generator: torch.Generator, elevation: tuple[float, float] = (10.0, 70.0)) -> Tensor:
    """(n, 4, 4) camera-to-world matrices on the sphere of `radius`, looking at the origin, random azimuth and
    elevation (degrees, uniform in `elevation`)."""
    from workbench.models.nerf import look_at

    az = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    el = torch.deg2rad(elevation[0] + torch.rand(n, generator=generator, dtype=torch.float64) * (elevation[1] - elevation[0]))
    eyes = radius * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    return torch.stack([look_at(e) for e in eyes]).float()


def orbit(n: int, radius: float, elevation: float = 30.0) -> Tensor:
    """(n, 4, 4): a circle of cameras at one elevation (degrees), evenly spaced in azimuth."""
    from workbench.models.nerf import look_at

    az = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n + 0.1  # offset: not the frames of any seed
    el = torch.full_like(az, math.radians(elevation))
    eyes = radius * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    return torch.stack([look_at(e) for e in eyes]).float()


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass
class Views:
    images: Tensor  # (N, H, W, 3) float in [0, 1], composited on the background
    poses: Tensor  # (N, 4, 4) camera-to-world (OpenGL axes)
    focal: float
    depth: Tensor | None = None  # (N, H, W) along the ray parameter, 0 = background; None for loaded scenes
    alpha: Tensor | None = None  # (N, H, W) coverage

    def __len__(self) -> int:
        return len(self.images)

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def rays(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every pixel's ray: origins, directions, colours, (N H W, 3) each."""
        from workbench.models.nerf import get_rays

        os_, ds = zip(*(get_rays(self.height, self.width, self.focal, p) for p in self.poses))
        return torch.stack(os_).reshape(-1, 3), torch.stack(ds).reshape(-1, 3), self.images.reshape(-1, 3)


@dataclass
class SceneData:
    name: str
    train: Views
    val: Views
    test: Views
    near: float
    far: float
    source: str
    scene: Scene | None = None  # the geometry, for scenes the project renders (None for loaded folders)

    def summary(self) -> str:
        return (f"{self.name}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test views of "
                f"{self.train.height}x{self.train.width} px, near {self.near}, far {self.far} ({self.source})")


def focal_of(width: int, camera_angle_x: float = BLENDER_CAMERA_ANGLE_X) -> float:
    """f = W / (2 tan(fov / 2)), in pixels."""
    return 0.5 * width / math.tan(0.5 * camera_angle_x)


def load_scene(scene: str = "shapes", size: int = 32, n_train: int = 40, n_val: int = 4, n_test: int = 8,
               seed: int = 0, supersample: int = 2, elevation: tuple[float, float] = (10.0, 70.0)) -> SceneData:
    """A scene of SCENES rendered at size x size (deterministic from the arguments), or a folder in the
    Blender format (`scene` is then its path; size 0 keeps its resolution)."""
    if scene not in SCENES:
        if Path(scene).is_dir():
            return load_blender(scene, size=size or None)
        raise DataError(f"scene {scene!r}: expected one of {', '.join(SCENES)} or a folder holding "
                        f"transforms_train.json (the Blender synthetic format)")
    if size < 1 or supersample < 1 or min(n_train, n_val, n_test) < 1:
        raise DataError(f"scene {scene!r}: size, supersample and the view counts must be >= 1 (got size {size}, "
                        f"supersample {supersample}, views {n_train}/{n_val}/{n_test})")
    spec = SCENES[scene]
    g = torch.Generator().manual_seed(seed)
    poses = camera_poses(n_train + n_val + n_test, spec.radius, g, elevation)
    focal = focal_of(size)
    images, depth, alpha = render_views(spec, poses, size, size, focal, supersample)
    cuts = [0, n_train, n_train + n_val, n_train + n_val + n_test]
    views = [Views(images[a:b], poses[a:b], focal, depth[a:b], alpha[a:b]) for a, b in zip(cuts, cuts[1:])]
    return SceneData(scene, *views, near=spec.near, far=spec.far, scene=spec,
                     source=f"rendered by workbench.data.scenes (seed {seed}, {supersample}x{supersample} supersampled)")


# ----------------------------------------------------------------------------------------------------
# The Blender synthetic format


def write_blender(data: SceneData, folder: str | Path) -> Path:
    """Write `data` as transforms_{train,val,test}.json + RGBA PNGs (alpha = coverage where known)."""
    from PIL import Image

    folder = Path(folder)
    for split in ("train", "val", "test"):
        v: Views = getattr(data, split)
        (folder / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i in range(len(v)):
            rgb = v.images[i]
            if v.alpha is not None:
                a = v.alpha[i].unsqueeze(-1)
                # stored un-premultiplied: composited on white, colour = rgb_obj a + (1 - a)
                obj = torch.where(a > 0, (rgb - (1 - a)) / a.clamp(min=1e-6), torch.zeros_like(rgb)).clamp(0, 1)
                rgba = torch.cat([obj, a], -1)
            else:
                rgba = torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1)
            Image.fromarray((rgba * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy(), "RGBA").save(
                folder / split / f"r_{i}.png")
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": v.poses[i].tolist()})
        fov = 2 * math.atan(0.5 * v.width / v.focal)
        (folder / f"transforms_{split}.json").write_text(json.dumps(
            {"camera_angle_x": fov, "near": data.near, "far": data.far, "frames": frames}, indent=1) + "\n")
    return folder


def _read_split(folder: Path, split: str, size: int | None, white: bool) -> Views:
    from PIL import Image

    path = folder / f"transforms_{split}.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it ({e}); a Blender-format scene has transforms_train.json, "
                        f"transforms_val.json and transforms_test.json") from None
    if not isinstance(meta, dict) or "camera_angle_x" not in meta or not meta.get("frames"):
        raise DataError(f"{path}: expected an object with camera_angle_x and a non-empty frames list")
    images, poses = [], []
    for k, frame in enumerate(meta["frames"]):
        try:
            rel, pose = frame["file_path"], torch.tensor(frame["transform_matrix"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: frames[{k}]: expected file_path and a 4x4 transform_matrix ({e})") from None
        if pose.shape != (4, 4):
            raise DataError(f"{path}: frames[{k}].transform_matrix: expected 4x4, got {tuple(pose.shape)}")
        file = folder / rel
        if file.suffix.lower() != ".png":
            file = file.with_name(file.name + ".png")
        try:
            img = Image.open(file).convert("RGBA")
        except OSError as e:
            raise DataError(f"{path}: frames[{k}]: cannot read image {file} ({e})") from None
        if size:
            img = img.resize((size, size), Image.LANCZOS)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 4).float() / 255
        a = x[..., 3:]
        # composite RGBA onto the background: rgb a + bg (1 - a)
        images.append(x[..., :3] * a + (1.0 if white else 0.0) * (1 - a))
        poses.append(pose)
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: images of different sizes {sorted(shapes)}; pass a size to resize them")
    width = images[0].shape[1]
    return Views(torch.stack(images), torch.stack(poses), focal_of(width, float(meta["camera_angle_x"])))


def load_blender(folder: str | Path, size: int | None = None, white_background: bool = True) -> SceneData:
    """A scene folder in the Blender synthetic format (see the module notes); `size` resizes every image to
    size x size (the focal length follows)."""
    folder = Path(folder)
    splits = [_read_split(folder, s, size, white_background) for s in ("train", "val", "test")]
    meta = json.loads((folder / "transforms_train.json").read_text())
    return SceneData(folder.name, *splits, near=float(meta.get("near", 2.0)), far=float(meta.get("far", 6.0)),
                     source=f"Blender-format folder {folder}")
