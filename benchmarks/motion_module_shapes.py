"""Does a motion module learn motion on top of a frozen image model? AnimateDiff's recipe on moving shapes.

    python benchmarks/motion_module_shapes.py              # the figures of docs/temporal-attention.md
    python benchmarks/motion_module_shapes.py --smoke      # seconds, nothing measured

1. An image UNet (pixel space, unconditional, v-prediction on the cosine schedule) is trained on single frames
   of the moving-shapes videos (workbench.data.moving_shapes).
2. It is frozen and inflated with `VideoUNet.from_image_unet`; only the motion modules train, on clips of
   `--frames` frames that share one diffusion timestep per video (AnimateDiff's training).
3. Control: the same motion modules, steps, batches and seed, but every frame is fed as its own one-frame
   video, so the modules have the same parameters and see the same pixels and can still change each frame
   (proj_out is a per-pixel linear map), only not read the other frames.
Held-out videos (the val split) are noised at fixed timesteps with fixed noise; the table is the v-MSE of
each model per timestep. Before phase 2 the inflated model equals the image model (zero proj_out), so the
image model's row is also "the video model at step 0". Last, DDIM samples of the image model (frames drawn
independently) and of the video model from the same noise are written as a GIF and a PNG strip, and their
temporal consistency is measured as the mean |x_{f+1} - x_f| between consecutive frames (pixels in [0, 1]),
beside the same number for real held-out videos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.data.moving_shapes import from_model, load_moving_shapes, to_model, write_gif, write_strip
from workbench.models.diffusion import schedulers as sch
from workbench.models.diffusion import temporal
from workbench.models.diffusion import unet as unet_mod

EVAL_T = (50, 200, 400, 600, 800, 950)


def image_config(size: int, width: int) -> unet_mod.Config:
    return unet_mod.Config(in_channels=3, out_channels=3, sample_size=size, block_out_channels=[width, 2 * width],
                           down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                           mid_block_type="UNetMidBlock2D", attention_heads=[1, 1], cross_attention_dim=0,
                           layers_per_block=1, norm_num_groups=8)


def v_loss(model, x0, t, noise, sched) -> torch.Tensor:
    """mean ||v - model(x_t, t)||^2 for videos x0 (B, 3, T, H, W), one t per video."""
    xt = sched.add_noise(x0, noise, t)
    return (model(xt, t) - sched.velocity(x0, noise, t)).pow(2).mean()


def as_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B T, 3, 1, H, W): every frame its own one-frame video."""
    B, C, T, H, W = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B * T, C, 1, H, W)


def train_motion(image, motion_cfg, train, sched, args, single_frames: bool, log) -> temporal.VideoUNet:
    video = temporal.VideoUNet.from_image_unet(image, motion_cfg)
    video.freeze_image_layers()
    opt = torch.optim.AdamW(video.motion_parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    video.train()
    for step in range(args.motion_steps):
        idx = torch.randint(0, len(train), (args.batch,), generator=g)
        x0 = train[idx]  # (B, 3, T, H, W)
        t = sched.sample_timesteps(args.batch, g)  # one t per video, shared by its frames
        noise = torch.randn(x0.shape, generator=g)
        if single_frames:  # the control: same pixels, same t per frame, but no other frame to read
            T = x0.shape[2]
            x0, noise, t = as_frames(x0), as_frames(noise), t.repeat_interleave(T)
        loss = v_loss(video, x0, t, noise, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.motion_steps // 5) == 0 or step == args.motion_steps - 1:
            log(f"  motion ({'one-frame control' if single_frames else 'clips'}) step {step}: loss {loss.item():.4f}")
    return video.eval()


@torch.no_grad()
def evaluate(models: dict, val: torch.Tensor, sched, seed: int) -> dict[str, dict[int, float]]:
    g = torch.Generator().manual_seed(seed + 3)
    noise = torch.randn(val.shape, generator=g)
    out = {name: {} for name in models}
    for t_ in EVAL_T:
        t = torch.full((val.shape[0],), t_)
        for name, (model, frames_apart) in models.items():
            if frames_apart:
                T = val.shape[2]
                loss = v_loss(model, as_frames(val), t.repeat_interleave(T), as_frames(noise), sched)
            else:
                loss = v_loss(model, val, t, noise, sched)
            out[name][t_] = loss.item()
    return out


@torch.no_grad()
def sample(model, shape, sched_cfg, steps: int, seed: int) -> torch.Tensor:
    sampler = sch.make_sampler("ddim", sched_cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for t in sampler.set_timesteps(steps):
        x = sampler.step(model(x, t), t, x, eta=0.0).prev_sample
    return x


def frame_change(x: torch.Tensor) -> float:
    """mean |x_{f+1} - x_f| over consecutive frames of videos (B, 3, T, H, W) in [-1, 1], in [0, 1] units."""
    x = x.clamp(-1, 1)
    return ((x[:, :, 1:] - x[:, :, :-1]).abs().mean() / 2).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="videos generated (train/val/test 80/10/10)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--image-steps", type=int, default=600)
    ap.add_argument("--motion-steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=4, help="videos per step (the image phase takes batch*frames frames)")
    ap.add_argument("--width", type=int, default=16, help="the image UNet's channels (blocks: width, 2 width)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/images/temporal-attention")
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.image_steps, args.motion_steps, args.sample_steps = 64, 3, 3, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    data = load_moving_shapes(n=args.n, frames=args.frames, size=args.size, seed=args.seed)
    train, val = to_model(data["train"].videos), to_model(data["val"].videos)  # (N, 3, T, H, W) in [-1, 1]
    sched_cfg = sch.FLAVORS["cosine-v"]
    sched = sch.NoiseSchedule(sched_cfg)
    log(f"data: {len(train)} train / {len(val)} val videos of {args.frames} frames {args.size}x{args.size}")

    # 1. the image model, on single frames
    image = unet_mod.UNet(image_config(args.size, args.width))
    opt = torch.optim.AdamW(image.parameters(), lr=args.lr, weight_decay=0.0)
    frames = train.permute(0, 2, 1, 3, 4).reshape(-1, 3, args.size, args.size)  # (N T, 3, H, W)
    g = torch.Generator().manual_seed(args.seed + 1)
    image.train()
    for step in range(args.image_steps):
        x0 = frames[torch.randint(0, len(frames), (args.batch * args.frames,), generator=g)]
        t = sched.sample_timesteps(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (image(sched.add_noise(x0, noise, t), t) - sched.velocity(x0, noise, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.image_steps // 5) == 0 or step == args.image_steps - 1:
            log(f"  image step {step}: loss {loss.item():.4f}")
    image.eval()

    # 2. motion modules on the frozen image model, and the one-frame control
    motion_cfg = temporal.Config(motion_num_attention_heads=[2], motion_max_seq_length=max(16, args.frames),
                                 use_motion_mid_block=False)
    video = train_motion(image, motion_cfg, train, sched, args, False, log)
    control = train_motion(image, motion_cfg, train, sched, args, True, log)
    n_image = sum(p.numel() for p in image.parameters())
    n_motion = sum(p.numel() for p in video.motion_parameters())
    log(f"parameters: image UNet {n_image:,}, motion modules {n_motion:,}")

    fresh = temporal.VideoUNet.from_image_unet(image, motion_cfg).eval()  # = the image model on every frame
    table = evaluate({"image model (frozen)": (fresh, False), "one-frame control": (control, True),
                      "motion modules": (video, False)}, val, sched, args.seed)
    print("\nv-MSE on held-out videos, per timestep t (cosine schedule, 1000 steps):")
    print("| model | " + " | ".join(f"t={t}" for t in EVAL_T) + " | mean |")
    print("|---|" + "---|" * (len(EVAL_T) + 1))
    for name, row in table.items():
        vals = [row[t] for t in EVAL_T]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {sum(vals) / len(vals):.4f} |")

    # 3. samples from the same noise: the image model draws each frame on its own
    shape = (8, 3, args.frames, args.size, args.size)
    s_image = sample(fresh, shape, sched_cfg, args.sample_steps, args.seed + 4)
    s_video = sample(video, shape, sched_cfg, args.sample_steps, args.seed + 4)
    change = {"real held-out videos": frame_change(val), "image model samples": frame_change(s_image),
              "motion-module samples": frame_change(s_video)}
    print("\nmean |x_{f+1} - x_f| between consecutive frames (pixels in [0, 1]):")
    for k, v in change.items():
        print(f"  {k}: {v:.4f}")
    log("done")
    if args.smoke:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    u_img, u_vid = from_model(s_image), from_model(s_video)  # uint8 (8, T, 3, H, W)
    write_gif(list(u_img) + list(u_vid), out / "samples.gif", fps=6, scale=4, columns=8)
    write_strip(torch.cat([u_img[:4], u_vid[:4]]), out / "samples_strip.png", scale=4)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "v_mse": table, "frame_change": change,
                                                  "params": {"image": n_image, "motion": n_motion}}, indent=1))
    log(f"wrote {out}/samples.gif (top row image model, bottom row motion modules), samples_strip.png, results.json")


if __name__ == "__main__":
    main()
