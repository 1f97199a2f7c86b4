"""How far transformers' torchvision image backend would be from `workbench.inference.vlm.preprocess`.

`preprocess` equals transformers' `SiglipImageProcessorPil` (PIL's bicubic resize on uint8) bit for bit. With
torchvision installed, transformers 5 picks `SiglipImageProcessor` (the torchvision backend) instead, which
resizes uint8 pixels with torch's antialiased bicubic interpolation, then rounds and clamps. This script emulates
that resize with `torch.nn.functional.interpolate` (torchvision itself is not needed) and prints, per case, the
largest and mean difference in grey levels and the share of values that differ:

    python benchmarks/vlm_resize_backends.py
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipelines import diagrams
from data_pipelines.diagram_render import document_page, layout_circuit, write_pdf
from workbench.inference.vlm import load_image, to_rgb


def torch_bicubic(image: Image.Image, size: int) -> np.ndarray:
    x = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()  # (S, S, 3)


def pil_bicubic(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(to_rgb(image).resize((size, size), Image.Resampling.BICUBIC))


def main() -> None:
    torch.set_num_threads(1)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (53, 37, 3), dtype=np.uint8))
    sample = diagrams.make_sample("circuit", random.Random(0), "circuit_00000", layout=layout_circuit)
    with tempfile.TemporaryDirectory() as d:
        write_pdf(Path(d) / "page.pdf", [document_page(sample, 1)])
        page = load_image(Path(d) / "page.pdf", 1)  # 144 dpi, as `workbench generate` renders it
    cases = [(f"noise {noise.width}x{noise.height}", noise, 28)]
    cases += [(f"PDF page {page.width}x{page.height}", page, s) for s in (224, 448, 896)]
    for name, image, size in cases:
        d = np.abs(torch_bicubic(image, size).astype(int) - pil_bicubic(image, size).astype(int))
        print(f"{name} -> {size} px: max {d.max()} grey levels, mean {d.mean():.3f}, "
              f"{(d > 0).mean():.1%} of values differ")


if __name__ == "__main__":
    main()
