"""The Mochi AsymmDiT against diffusers' MochiTransformer3DModel: same weights, same inputs, CPU forward time.

    python benchmarks/mochi.py                 # the figures of docs/mochi.md
    python benchmarks/mochi.py --smoke         # 1 rep, batch 2: seconds

The config is the "small" flavor's shape in diffusers' terms (4 layers, 4 heads of 32, text width 64, text
features 64 wide; diffusers fixes 8 pooling heads), random weights (seeded) copied through
workbench.checkpoint.hf.mochi. Inputs: --batch videos of 5 latent frames of 8 x 8 x 4 (the video task's latent
shape: 80 visual tokens) with 6 text tokens, half the rows padded to 3. Both run interleaved under
torch.no_grad, fp32, --threads threads; the median of --reps is printed with the ratio and the max output
difference. diffusers loops over the batch in its attention (to drop padded text); ours runs one masked
attention per block for the whole batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from workbench.checkpoint.hf import mochi as io
from workbench.models.video import mochi

CONFIG = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, pooled_projection_dim=64, in_channels=4,
              text_embed_dim=64, time_embed_dim=64, max_sequence_length=16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.reps = 2, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="In CPU autocast")
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    ref = MochiTransformer3DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    cfg = io.config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = mochi.AsymmDiT(cfg)
    ours.to_empty(device="cpu")
    ours.load_state_dict(io.state_dict_from_diffusers(ref.state_dict(), cfg))
    ours.eval()
    B = args.batch
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(B, 4, 5, 8, 8, generator=g), torch.randn(B, 6, 64, generator=g)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[::2, 3:] = False
    sigma = torch.rand(B, generator=g)
    times = {"workbench": [], "diffusers": []}
    with torch.no_grad():
        for _ in range(args.reps):
            t = time.perf_counter()
            a = ours(x, sigma, text, mask)
            times["workbench"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = ref(x, text, 1000 * (1 - sigma), mask, return_dict=False)[0]
            times["diffusers"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"forward, batch {B} x (80 visual + 6 text tokens), {args.threads} thread(s), median of {args.reps}: "
          f"workbench {med['workbench'] * 1e3:.0f} ms, diffusers {med['diffusers'] * 1e3:.0f} ms, "
          f"ratio {med['diffusers'] / med['workbench']:.2f}x; max |difference| {float((a - b).abs().max()):.1e}")


if __name__ == "__main__":
    main()
