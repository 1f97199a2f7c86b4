"""The pictures of docs/diagrams.md, from a built diagram dataset:

    python -m data_pipelines.diagram_pictures data/diagrams docs/images/diagrams

    examples-96px.png   the first four held-out (test) samples of each kind at the dataset's size, 2x nearest
    sizes.png           the first held-out flowchart and circuit at 64, 96 and 128 px, 2x nearest
    page-3.png          page 3 of documents.pdf, rendered at its 100 dpi and shown at 36 %
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from data_pipelines.diagram_render import PAGE_DPI, render
from workbench.data.vision import load_vision_split
from workbench.inference.vlm import load_image

GAP, GREY, ZOOM = 4, (128, 128, 128), 2


def sheet(rows: list[list[Image.Image]]) -> Image.Image:
    """Pictures in rows, each enlarged ZOOM x without smoothing, GAP px of grey between and around them."""
    rows = [[im.resize((im.width * ZOOM, im.height * ZOOM), Image.Resampling.NEAREST) for im in r] for r in rows]
    width = max(sum(im.width for im in r) + GAP * (len(r) + 1) for r in rows)
    height = sum(max(im.height for im in r) for r in rows) + GAP * (len(rows) + 1)
    out = Image.new("RGB", (width, height), GREY)
    y = GAP
    for r in rows:
        x = GAP
        for im in r:
            out.paste(im, (x, y))
            x += im.width + GAP
        y += max(im.height for im in r) + GAP
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_vision_split(args.dataset, "test")
    samples = {k: [{"id": e.id, "kind": e.kind, "caption": e.caption, "qa": e.qa, **e.meta} for e in test
                   if e.kind == k][:4] for k in ("flowchart", "circuit", "shapes")}
    size = test[0].image.shape[0]
    sheet([[render(s, size) for s in ss] for ss in samples.values()]).save(args.out / "examples-96px.png")
    sheet([[render(samples[k][0], s) for s in (64, 96, 128)] for k in ("flowchart", "circuit")]).save(
        args.out / "sizes.png")
    page = load_image(args.dataset / "documents.pdf", page=3, dpi=PAGE_DPI)
    page.resize((round(page.width * 0.36), round(page.height * 0.36)), Image.Resampling.LANCZOS).save(
        args.out / "page-3.png")
    print(f"wrote {', '.join(f.name for f in sorted(args.out.glob('*.png')))} in {args.out}")


if __name__ == "__main__":
    main()
