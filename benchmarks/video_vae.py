"""The causal video VAE: sizes, compression, parity with diffusers at Mochi's real sizes, CPU speed, causality.

    python benchmarks/video_vae.py                 # the figures of docs/video-vae.md
    python benchmarks/video_vae.py --smoke         # the tiny config only, seconds

Sizes: parameters of each flavor (the real one on the meta device) and the latent shape of Mochi's
163 x 480 x 848 clip and of the moving-shapes 9 x 32 x 32 clip.

Parity: diffusers' AutoencoderKLMochi built at its defaults (Mochi's real sizes, random weights, seeded), its
tensors assigned into `CausalVideoVAE` through `workbench.checkpoint.hf.mochi_vae` (one copy in memory); max
|ours - reference| for the posterior mean / log-variance of a --frames x --size x --size clip and for decoding
a random latent, float32. --smoke runs the same on a tiny diffusers config.

Speed: encode + decode (posterior mean) of the tiny diffusers-compatible config, ours against diffusers,
interleaved, median of --reps on --threads threads; and one training step (forward, backward) of the "small"
flavor on a batch of 8 moving-shapes-sized clips (9 x 32 x 32).

Memory: peak resident memory of encoding and decoding two --mem-frames x --mem-size x --mem-size clips with the
"small" flavor, one-shot against chunked (1 and 4 latent frames at a time), each in a fresh process: the peak
resident memory (VmHWM, reset just before) above the resident memory before the call, and the time.

Causality: which input frames each latent frame depends on, and which latent frames each decoded frame depends
on, from exact gradients, for a 6x-temporal config; drawn to docs/images/video-vae/causality.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from workbench.checkpoint.hf import mochi_vae as io
from workbench.models.video.vae import FLAVORS, CausalVideoVAE, Config

TINY = dict(encoder_block_out_channels=(32, 32, 32, 64), decoder_block_out_channels=(32, 32, 64, 64),
            latent_channels=4, layers_per_block=(1, 1, 1, 2, 1), latents_mean=(0.1, -0.2, 0.3, 0.0),
            latents_std=(1.0, 0.5, 2.0, 1.5))
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images" / "video-vae"


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def sizes() -> list[str]:
    rows = ["| flavor | factors (t, s) | latent channels | parameters (encoder + decoder) | 163 x 480 x 848 -> | "
            "9 x 32 x 32 -> | numbers per latent number |", "|---|---|---|---|---|---|---|"]
    for name, cfg in FLAVORS.items():
        with torch.device("meta"):
            m = CausalVideoVAE(cfg)
        lat = []
        for T, H, W in ((163, 480, 848), (9, 32, 32)):
            try:
                shape = m.latent_shape(T, H, W)
                lat.append(f"{shape[0]} x {shape[1]} x {shape[2]} x {m.latent_channels}")
            except ValueError:
                lat.append(f"(needs T = {m.temporal_factor}k + 1)")
        ratio = 3 * m.temporal_factor * m.spatial_factor**2 / m.latent_channels
        rows.append(f"| {name} | {m.temporal_factor}, {m.spatial_factor} | {m.latent_channels} | "
                    f"{_count(m):,} ({_count(m.encoder):,} + {_count(m.decoder):,}) | {lat[0]} | {lat[1]} | {ratio:g} |")
    return rows


def _reference(kw: dict, seed: int):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKLMochi(**kw).eval()


def _ours_sharing(ref) -> CausalVideoVAE:
    cfg = io.config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = CausalVideoVAE(cfg)
    ours.load_state_dict(io.state_dict_from_diffusers(ref.state_dict(), dict(ref.config)), strict=True, assign=True)
    return ours.eval()


def parity(kw: dict, frames: int, size: int, label: str) -> list[str]:
    ref = _reference(kw, 0)
    ours = _ours_sharing(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        t0 = time.perf_counter()
        want = ref.encode(x).latent_dist
        t1 = time.perf_counter()
        got = ours.encode(x)
        t2 = time.perf_counter()
        z = torch.randn(want.mean.shape, generator=g)
        dec_want = ref.decode(z).sample
        dec_got = ours.decode(z)
        chunk_enc = ours.encode(x, chunk_frames=1).mean
        chunk_dec = ours.decode(z, chunk_frames=1)
    d = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    return [f"| {label}: {_count(ours):,} parameters, clip {frames} x {size} x {size} -> latents "
            f"{tuple(want.mean.shape[2:])} | mean {d(got.mean, want.mean):.2e}, log-variance "
            f"{d(got.logvar, want.logvar):.2e} (max |mean| {want.mean.abs().max().item():.2f}) | decode "
            f"{d(dec_got, dec_want):.2e} (max |x| {dec_want.abs().max().item():.2f}) | encode s: diffusers "
            f"{t1 - t0:.1f}, ours {t2 - t1:.1f} | ours chunked (1 latent frame) vs one-shot: encode "
            f"{d(chunk_enc, got.mean):.2e}, decode {d(chunk_dec, dec_got):.2e} |"]


def speed(threads: int, reps: int) -> list[str]:
    torch.set_num_threads(threads)
    ref = _reference(TINY, 0)
    ours = _ours_sharing(ref)
    x = torch.rand(2, 3, 13, 32, 32) * 2 - 1
    times = {"diffusers": [], "ours": []}
    with torch.no_grad():
        for _ in range(reps):
            for name in ("diffusers", "ours"):
                t0 = time.perf_counter()
                if name == "ours":
                    ours.decode(ours.encode(x).mean)
                else:
                    ref.decode(ref.encode(x).latent_dist.mean)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [f"| encode + decode, tiny config ({_count(ours):,} params), 2 x 13 x 32 x 32, {threads} thread(s), "
            f"median of {reps} | diffusers {med['diffusers'] * 1e3:.0f} ms, ours {med['ours'] * 1e3:.0f} ms "
            f"(ours / diffusers {med['ours'] / med['diffusers']:.2f}) |"]
    torch.manual_seed(0)
    small = CausalVideoVAE(FLAVORS["small"]).train()
    opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
    xb = torch.rand(8, 3, 9, 32, 32) * 2 - 1
    steps = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        recon, post = small(xb, generator=torch.Generator().manual_seed(i))
        loss = (recon - xb).square().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
    rows.append(f"| \"small\" training step (forward + backward + AdamW), batch 8 x 9 x 32 x 32, {threads} thread(s), "
                f"median of {reps} after one warm-up | {statistics.median(steps[1:]) * 1e3:.0f} ms |")
    return rows


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rss_mb(mode: str, frames: int, size: int, chunk: int, queue) -> None:
    """In a fresh process: build the small VAE, warm up, reset the peak-RSS mark, run `mode`, report the peak
    resident memory above the resident memory before it (MB) and the time."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = CausalVideoVAE(FLAVORS["small"]).eval()
    T_lat, h, w = vae.latent_shape(frames, size, size)
    # batch 2: with batch 1 PyTorch picks its slow im2col conv3d whenever C T' H' < 20480 (a heuristic made for
    # 2-D convs), which a short chunk falls under; that would measure the heuristic, not the chunking
    z = torch.randn(2, vae.latent_channels, T_lat, h, w)
    x = torch.rand(2, 3, frames, size, size) * 2 - 1
    with torch.no_grad():  # warm-up on one tiny frame: kernel set-up is not what is being measured
        vae.decode(vae.encode(x[:, :, :1, :vae.spatial_factor, :vae.spatial_factor]).mean)
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "decode":
            vae.decode(z)
        elif mode == "decode-chunked":
            vae.decode(z, chunk_frames=chunk)
        elif mode == "encode":
            vae.encode(x)
        elif mode == "encode-chunked":
            vae.encode(x, chunk_frames=chunk)
    queue.put((_status_mb("VmHWM") - before, time.perf_counter() - t0))


def memory(frames: int, size: int, chunk: int) -> list[str]:
    """Peak memory of one-shot against chunked encode / decode of two long clips (small flavor, CPU, Linux)."""
    import multiprocessing as mp

    # glibc's adaptive mmap threshold would keep freed activations in the heap and hide the difference
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    ctx = mp.get_context("spawn")
    peaks = {}
    for mode in ("encode", "encode-chunked", "decode", "decode-chunked"):
        q = ctx.Queue()
        p = ctx.Process(target=_peak_rss_mb, args=(mode, frames, size, chunk, q))
        p.start()
        peaks[mode] = q.get()
        p.join()
    return [f"| small flavor, two {frames} x {size} x {size} clips, chunks of {chunk} latent frame(s), 1 thread | "
            + ", ".join(f"{mode} +{peaks[mode][0]:.0f} MB, {peaks[mode][1]:.1f} s" for mode in peaks) + " |"]


def causality_figure(path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = Config(latent_channels=3, encoder_channels=[8, 8, 8, 8], decoder_channels=[8, 8, 8, 8],
                 layers_per_block=[1, 1, 1, 1, 1], norm_num_groups=4, attention_head_dim=4)
    torch.manual_seed(0)
    m = CausalVideoVAE(cfg).eval()
    tf, T_lat = m.temporal_factor, 4
    T = tf * (T_lat - 1) + 1
    x = (torch.rand(1, 3, T, 8, 8) * 2 - 1).requires_grad_(True)
    mean = m.encode(x).mean
    enc = torch.stack([torch.autograd.grad(mean[:, :, j].sum(), x, retain_graph=True)[0].abs().sum(dim=(0, 1, 3, 4))
                       for j in range(T_lat)])  # (T_lat, T)
    z = torch.randn(1, 3, T_lat, 1, 1, requires_grad=True)
    y = m.decode(z)
    dec = torch.stack([torch.autograd.grad(y[:, :, i].sum(), z, retain_graph=True)[0].abs().sum(dim=(0, 1, 3, 4))
                       for i in range(T)])  # (T, T_lat)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [T, T_lat * 3]})
    axes[0].imshow((enc > 0).float().numpy(), cmap="Blues", vmin=0, vmax=1.3, aspect="auto")
    axes[0].set(xlabel="input frame", ylabel="latent frame", title=f"encoder: latent j reads frames <= {tf}j",
                xticks=range(T), yticks=range(T_lat))
    axes[1].imshow((dec > 0).float().numpy(), cmap="Oranges", vmin=0, vmax=1.3, aspect="auto")
    axes[1].set(xlabel="latent frame", ylabel="decoded frame", title=f"decoder: frame i reads\nlatents <= ceil(i/{tf})",
                xticks=range(T_lat), yticks=range(T))
    fig.suptitle(f"non-zero gradients, 6x temporal causal VAE, {T} frames <-> {T_lat} latent frames")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    allowed_enc = torch.arange(T)[None, :] <= tf * torch.arange(T_lat)[:, None]
    allowed_dec = torch.arange(T_lat)[None, :] <= (torch.arange(T)[:, None] + tf - 1) // tf
    leaks = int(((enc > 0) & ~allowed_enc).sum() + ((dec > 0) & ~allowed_dec).sum())
    missing = int(((enc == 0) & allowed_enc).sum() + ((dec == 0) & allowed_dec).sum())
    return [f"causality ({T} frames, {T_lat} latent frames): {leaks} future dependencies, {missing} allowed pairs "
            f"with zero gradient; figure {path}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--frames", type=int, default=7)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem-frames", type=int, default=33, help="clip length for the memory comparison")
    ap.add_argument("--mem-size", type=int, default=128, help="frame side for the memory comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for row in sizes():
        print(row)
    print()
    print(*parity(TINY, 13, 32, "tiny config"), sep="\n")
    if not args.smoke:
        print(*parity({}, args.frames, args.size, "Mochi's real sizes"), sep="\n")
    print()
    print(*speed(args.threads, 2 if args.smoke else args.reps), sep="\n")
    for chunk in (1, 4):
        print(*memory(9 if args.smoke else args.mem_frames, 32 if args.smoke else args.mem_size, chunk), sep="\n")
    print(*causality_figure(IMAGES / "causality.png"), sep="\n")


if __name__ == "__main__":
    main()
