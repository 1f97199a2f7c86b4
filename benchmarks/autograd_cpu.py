"""The NumPy autograd engine against PyTorch on the CPU: milliseconds per training step of the same model.

    python benchmarks/autograd_cpu.py                          # the two digits models, batch 32, 1 thread
    python benchmarks/autograd_cpu.py --batch 32 128 --threads 1 2 --reps 7 --steps 50
    python benchmarks/autograd_cpu.py --smoke                  # tiny, seconds (tests)

Each row builds a model of the task "autograd" configs (configs/fundamentals/autograd_*.toml: the MLP with
one hidden layer of 128, the CNN with 16 and 32 channels) in the engine and its torch twin holding the same
initial weights (`workbench.train.fundamentals.autograd.torch_twin`), then times `--steps` full training
steps (forward, cross-entropy, backward, AdamW step) on one fixed random batch of 8x8 digits-sized images
for each, interleaved engine / torch, `--reps` times after one warm-up round, and prints the medians and
the ratio engine / torch. Both are limited to `--threads` threads (NumPy's BLAS through threadpoolctl,
torch.set_num_threads); float32 throughout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from workbench.models.fundamentals.autograd import AdamW, Tensor
from workbench.models.fundamentals.autograd.functional import cross_entropy
from workbench.train.fundamentals.autograd import Config, build_model, torch_twin
from workbench.train.fundamentals.runner import cpu_threads

SHAPE = (1, 8, 8)
CLASSES = 10


def engine_steps(model, opt, x: np.ndarray, y: np.ndarray, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(model(Tensor(x)), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def torch_steps(net, opt, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def bench(model: str, batch: int, threads: int, steps: int, reps: int) -> tuple[float, float]:
    cfg = Config(model=model)
    ours = build_model(cfg, SHAPE, CLASSES, seed=0)
    twin = torch_twin(cfg, SHAPE, CLASSES, build_model(cfg, SHAPE, CLASSES, seed=0))
    opt, topt = AdamW(ours.parameters(), lr=1e-3), torch.optim.AdamW(twin.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=batch)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    times_e, times_t = [], []
    with cpu_threads(threads):
        engine_steps(ours, opt, x, y, steps)  # warm-up
        torch_steps(twin, topt, tx, ty, steps)
        for _ in range(reps):
            times_e.append(engine_steps(ours, opt, x, y, steps))
            times_t.append(torch_steps(twin, topt, tx, ty, steps))
    return statistics.median(times_e), statistics.median(times_t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--batch", nargs="+", type=int, default=[32])
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=50, help="training steps per timed run")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per side (median reported)")
    ap.add_argument("--smoke", action="store_true", help="2 steps, 1 rep, batch 4")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps, args.reps = [4], 2, 1
    print(f"{'model':5} {'batch':>5} {'threads':>7} {'engine ms/step':>15} {'torch ms/step':>14} {'engine/torch':>12}")
    for model in args.models:
        for batch in args.batch:
            for threads in args.threads:
                e, t = bench(model, batch, threads, args.steps, args.reps)
                print(f"{model:5} {batch:5d} {threads:7d} {e:15.3f} {t:14.3f} {e / t:12.2f}", flush=True)


if __name__ == "__main__":
    main()
