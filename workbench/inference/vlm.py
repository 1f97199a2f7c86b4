"""What a vision-language model (PaliGemma 2) needs at inference: images in, prompts built, tokens out.

Used by `workbench generate --image`, by the eval harness and by VLM training's sample step.

    load_image(path, page=None)        PNG / JPEG / any format PIL reads, or one page of a PDF -> RGB PIL image
    preprocess(image, size)            -> (3, size, size) float tensor in [-1, 1], as SiglipImageProcessor
    build_prompt(tokenizer, prefix, num_image_tokens, image_token_id)
                                       -> <image> x N, <bos>, prefix, "\\n" as ids, as PaliGemmaProcessor
    generate(model, input_ids, pixel_values, ...)
                                       -> the new token ids of each row (prefill + KV-cache decoding)

Images
    Any PIL mode is converted to RGB the way transformers does it: a mode with transparency (RGBA, LA, P
    with a transparent colour) is composited onto white first; L, CMYK, I;16 ... go through PIL's
    `convert("RGB")`. Resizing ignores the aspect ratio (PaliGemma squashes every image to size x size)
    with PIL's bicubic filter; then x / 255, then (x - 0.5) / 0.5. `preprocess` reproduces the arithmetic
    of transformers' PIL backend (float64 rescale, float32 normalise), so the tensors are equal, not close.
    PDF pages are rendered with pypdfium2 at `dpi` (default 144, i.e. 2 pixels per PDF point); `page` is
    1-based like a PDF viewer's page numbers.

Generation
    One prefill forward over the whole prompt with a prefix-LM mask whose prefix is the whole prompt
    (image + bos + prefix + "\\n" all see each other: that is what transformers' `generate` does with the
    processor's token_type_ids), then one causal forward per new token over the KV cache. Rows of unequal
    length are left-padded; the pad slots are hidden by `key_padding` and each row's positions count its
    real tokens from 1 (PaliGemma's 1-indexed positions), so a padded row computes what it computes alone.
    Sampling reuses `workbench.inference.generator.sample_next` (greedy below MIN_TEMPERATURE, else
    temperature, top-k, top-p, drawn from one torch.Generator seeded by `seed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from workbench.errors import DataError
from workbench.inference.generator import SamplingParams, sample_next
from workbench.nn.attention import MaskSpec

PDF_MAGIC = b"%PDF-"


def _load_pdf_page(path: Path, page: int, dpi: float):
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        raise DataError(f"{path}: not a readable PDF ({e})") from None
    try:
        n = len(doc)
        if not 1 <= page <= n:
            raise DataError(f"{path}: page {page} is out of range: the PDF has {n} page{'s' if n != 1 else ''} "
                            f"(pages are numbered from 1)")
        # PDF user space is 72 points per inch: scale = dpi / 72 pixels per point
        return doc[page - 1].render(scale=dpi / 72).to_pil()
    finally:
        doc.close()


def to_rgb(image):
    """RGB PIL image; transparency is composited onto white (transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, page: int | None = None, dpi: float = 144.0):
    """An RGB PIL image from an image file (PNG, JPEG, any size and mode) or from page `page` (1-based) of a PDF.

    A PDF without `page` gives its first page; `page` on a file that is not a PDF is an error, as is a page
    out of range (the message names the page count) or a file that is neither an image nor a PDF.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path}: not found" if not path.exists() else f"image {path}: not a file")
    if page is not None and page < 1:
        raise DataError(f"--page {page}: pages are numbered from 1")
    with open(path, "rb") as f:
        is_pdf = f.read(len(PDF_MAGIC)) == PDF_MAGIC
    if is_pdf:
        return to_rgb(_load_pdf_page(path, page or 1, dpi))
    if page is not None:
        raise DataError(f"{path}: --page {page} given but the file is not a PDF")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not an image PIL can read, nor a PDF ({e.__class__.__name__})") from None


def preprocess(image, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: bicubic resize to size x size, x / 255, (x - 0.5) / 0.5.

    Matches transformers' SiglipImageProcessor (PIL backend) exactly: the resize runs on uint8 through PIL,
    the rescale in float64 then cast to float32, the normalisation in float32."""
    from PIL import Image

    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    x = np.asarray(image).transpose(2, 0, 1)  # (3, S, S) uint8, channels first
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale
    mean = std = np.array([0.5, 0.5, 0.5], dtype=np.float32)[:, None, None]
    x = (x - mean) / std  # normalise, float32
    return torch.from_numpy(np.ascontiguousarray(x))


def build_prompt(tokenizer, prefix: str, num_image_tokens: int, image_token_id: int) -> list[int]:
    """PaliGemma's prompt: <image> x N, <bos>, the prefix's tokens, "\\n" (as PaliGemmaProcessor builds it)."""
    if tokenizer.bos_id is None:
        raise DataError("the tokenizer has no bos token, which PaliGemma's prompt needs after the image tokens")
    return [image_token_id] * num_image_tokens + [tokenizer.bos_id] + tokenizer.encode(prefix + "\n",
                                                                                        add_special_tokens=False)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    pixel_values: torch.Tensor | None,
    prefix_len: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids per row (an eos that ended a row is kept, as in `Completion.tokens`).

    input_ids: one prompt per row (lists of ids, any lengths: they are left-padded here) or a (B, T) tensor
    of unpadded prompts. pixel_values: (B, 3, S, S) (one image per row) or None for text-only prompts.
    prefix_len: per row, how many leading prompt tokens form the bidirectional prefix (default: the whole
    prompt, as transformers' generate does); the prompt tokens after it are read causally.
    """
    prompts = [list(map(int, p)) for p in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    B = len(prompts)
    if B == 0:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    params.validate()
    if pixel_values is not None and pixel_values.shape[0] != B:
        raise ValueError(f"{pixel_values.shape[0]} images for {B} prompts (one image per prompt)")
    prefix = [len(p) for p in prompts] if prefix_len is None else [int(n) for n in prefix_len]
    if len(prefix) != B or any(not 0 <= n <= len(p) for n, p in zip(prefix, prompts)):
        raise ValueError(f"prefix_len must give, per prompt, a count between 0 and its length, got {prefix}")
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    w = next(model.parameters())
    device = w.device
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.ones(B, L + max_new_tokens, dtype=torch.bool, device=device)  # key slots with real tokens
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid[b, : L - len(p)] = False
    pads = torch.tensor([L - len(p) for p in prompts], device=device)
    # positions: 1 on each row's first real token (PaliGemma's 1-indexed positions)
    positions = valid[:, :L].long().cumsum(-1).clamp(min=1)  # (B, L)
    cache = model.make_kv_cache(B, L + max_new_tokens)
    rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = set(int(e) for e in eos_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pix = pixel_values.to(device=device, dtype=w.dtype) if pixel_values is not None else None

    # prefill: the prefix (pad slots + prefix tokens) bidirectional, the rest causal
    mask = MaskSpec(prefix_len=pads + torch.tensor(prefix, device=device), key_padding=valid[:, :L])
    res = model({"input_ids": ids, "pixel_values": pix, "positions": positions, "mask": mask, "kv_cache": cache})
    for _ in range(max_new_tokens):
        logits = model.logits(res.hidden[:, -1:])[:, 0].float()  # (B, V)
        toks = [pad_id] * B
        for b in range(B):
            if done[b]:
                continue
            toks[b] = sample_next(logits[b], params, rng)
            out[b].append(toks[b])
            done[b] = toks[b] in eos or len(out[b]) >= max_new_tokens
        if all(done):
            break
        x = torch.tensor(toks, dtype=torch.long, device=device)[:, None]  # (B, 1)
        positions = positions[:, -1:] + 1
        mask = MaskSpec(key_padding=valid[:, : cache.seen + 1])
        res = model({"input_ids": x, "positions": positions, "mask": mask, "kv_cache": cache})
    return out


def generate_text(model, tokenizer, image_path: str | Path, prompt: str, page: int | None = None,
                  **sampling) -> str:
    """The decoded continuation of `prompt` about the image (or PDF page) at `image_path`: what
    `workbench generate --image` prints."""
    cfg = model.cfg
    pixels = preprocess(load_image(image_path, page), cfg.vision.image_size)[None]  # (1, 3, S, S)
    ids = build_prompt(tokenizer, prompt, cfg.num_image_tokens, cfg.image_token_id)
    tokens = generate(model, [ids], pixels, eos_ids=sorted(tokenizer.eos_ids), pad_id=tokenizer.pad_id or 0,
                      **sampling)[0]
    return tokenizer.decode(tokens)
