"""What a vision-language model (PaliGemma 2) needs at inference: images in, prompts built, tokens out.

Used by `workbench generate --image`, by the eval harness and by VLM training's sample step.

    load_image(path, page=None)        PNG / JPEG / any format PIL reads, or one page of a PDF -> RGB PIL image
    preprocess(image, size)            -> (3, size, size) float tensor in [-1, 1], as SiglipImageProcessor
    build_prompt(tokenizer, prefix, num_image_tokens, image_token_id)
                                       -> <image> x N, <bos>, prefix, "\\n" as ids, as PaliGemmaProcessor
    VLMGenerator(model, tokenizer).generate(prompts, params)
                                       -> Completions: the Generator protocol of workbench.inference.generator,
                                          prompts being ImagePrompts (ids carrying their image; image_prompt
                                          builds one), so generate / evals / RL take a VLM like a text model
    generate(model, input_ids, pixel_values, ...)
                                       -> the new token ids of each row: the same loop with one set of settings
                                          (what VQA evals and VLM training call)

Images
    EXIF orientation is applied first (a phone photo comes out upright, as transformers' load_image does); a
    file PIL refuses as a decompression bomb is a DataError naming it. A file is a PDF when `%PDF-` occurs in
    its first 1024 bytes (where PDF readers accept the header). Any PIL mode is converted to RGB the way transformers does it: a mode with transparency (RGBA, LA, P
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
    Sampling reuses `workbench.inference.generator` (repetition penalty, then greedy below MIN_TEMPERATURE,
    else temperature, top-k, top-p): VLMGenerator draws each row from its own torch.Generator seeded by its
    params' `seed`, as KVCacheGenerator does; `generate` from one generator shared by the rows.
    Why a loop of its own and not KVCacheGenerator's: the first forward takes pixel_values, positions start at 1
    and the prefill is bidirectional over the prefix; the rest (stops, log-probs, Completion) is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from workbench.errors import DataError
from workbench.inference.generator import (
    Completion,
    SamplingParams,
    apply_repetition_penalty,
    cut_at_stop,
    per_row_params,
    sample_next,
)
from workbench.nn.attention import MaskSpec

PDF_MAGIC = b"%PDF-"
PDF_HEADER_WINDOW = 1024  # readers accept the header anywhere in the first 1024 bytes (PDF 1.7, annex H)


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
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path}: not found" if not path.exists() else f"image {path}: not a file")
    if page is not None and page < 1:
        raise DataError(f"--page {page}: pages are numbered from 1")
    with open(path, "rb") as f:
        is_pdf = PDF_MAGIC in f.read(PDF_HEADER_WINDOW)
    if is_pdf:
        return to_rgb(_load_pdf_page(path, page or 1, dpi))
    if page is not None:
        raise DataError(f"{path}: --page {page} given but the file is not a PDF")
    try:
        with Image.open(path) as img:
            img.load()
            # a camera's EXIF orientation: the picture as it is meant to be seen (transformers' load_image too)
            return to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:  # not an OSError: PIL refuses images past MAX_IMAGE_PIXELS
        raise DataError(f"{path}: too large to decode safely ({e})") from None
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


class ImagePrompt(list):
    """A prompt for `VLMGenerator`: its token ids (a list, so it is the `Sequence[int]` the Generator protocol
    takes) carrying its image. pixel_values: (3, S, S) from `preprocess`, or None for a text-only prompt (then the
    ids hold no <image> placeholder). prefix_len: how many leading ids form the bidirectional prefix (default:
    all of them, as transformers' generate does)."""

    def __init__(self, ids: Sequence[int], pixel_values: torch.Tensor | None = None, prefix_len: int | None = None):
        super().__init__(int(i) for i in ids)
        self.pixel_values = pixel_values
        self.prefix_len = prefix_len


def image_prompt(model: torch.nn.Module, tokenizer, image, prompt: str) -> ImagePrompt:
    """The `ImagePrompt` of a PIL image and a question for a paligemma2 model (preprocess + build_prompt)."""
    cfg = model.cfg
    ids = build_prompt(tokenizer, prompt, cfg.num_image_tokens, cfg.image_token_id)
    return ImagePrompt(ids, preprocess(image, cfg.vision.image_size))


class VLMGenerator:
    """`workbench.inference.generator.Generator` for a vision-language model: prompts are `ImagePrompt`s (plain
    id lists are text-only prompts), one `SamplingParams` for all or one per prompt, `Completion`s out with the
    same meaning as `KVCacheGenerator`'s (tokens with the eos or stop id that ended them, log-probs under the
    unmodified distribution, finish_reason, text cut before a stop string). What differs from KVCacheGenerator
    is the model input (pixel_values, PaliGemma's 1-indexed positions, the prefix-LM prefill; see the module
    notes), so generate / evals / RL can take either through the one protocol."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, eos_ids: Sequence[int] | None = None,
                 pad_id: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        if eos_ids is None:
            eos_ids = sorted(tokenizer.eos_ids) if tokenizer is not None else []
        self.eos_ids = set(int(e) for e in eos_ids)
        self.pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "pad_id", None) or 0)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        B = len(prompts)
        per_row = per_row_params(params, B)
        for p in per_row:
            p.validate()
        if any(p.stop for p in per_row) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the continuation")
        images = [getattr(p, "pixel_values", None) for p in prompts]
        pixels = torch.stack([x for x in images if x is not None]) if any(x is not None for x in images) else None
        prefix = [getattr(p, "prefix_len", None) for p in prompts]
        prefix = [len(p) if n is None else n for n, p in zip(prefix, prompts)]
        device = next(self.model.parameters()).device
        rngs = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in per_row]
        results = _decode(self.model, prompts, pixels, prefix, per_row, rngs, self.eos_ids, self.pad_id,
                          self._hit_stop)
        if self.tokenizer is not None:
            for r, p in zip(results, per_row):
                r.text = cut_at_stop(self.tokenizer.decode(r.tokens), p.stop)
        return results

    def _hit_stop(self, r: Completion, p: SamplingParams) -> bool:
        return bool(p.stop) and any(s in self.tokenizer.decode(r.tokens) for s in p.stop)


def _decode(model, prompts, pixel_values, prefix, per_row, rngs, eos, pad_id, hit_stop=None) -> list[Completion]:
    """The decoding loop behind `generate` and `VLMGenerator` (see the module notes). rngs: per row, a
    torch.Generator or None (`generate` passes one shared generator to every row: draws in row order)."""
    prompts = [list(map(int, p)) for p in prompts]
    B = len(prompts)
    results = [Completion(prompt_tokens=p) for p in prompts]
    if B == 0:
        return results
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if pixel_values is not None and pixel_values.shape[0] > B:
        raise ValueError(f"{pixel_values.shape[0]} images for {B} prompts (at most one image per prompt)")
    if len(prefix) != B or any(not 0 <= n <= len(p) for n, p in zip(prefix, prompts)):
        raise ValueError(f"prefix_len must give, per prompt, a count between 0 and its length, got {prefix}")
    budget = max(p.max_new_tokens for p in per_row)
    if budget == 0:
        return results
    w = next(model.parameters())
    device = w.device
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.ones(B, L + budget, dtype=torch.bool, device=device)  # key slots with real tokens
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid[b, : L - len(p)] = False
    pads = torch.tensor([L - len(p) for p in prompts], device=device)
    # positions: 1 on each row's first real token (PaliGemma's 1-indexed positions)
    positions = valid[:, :L].long().cumsum(-1).clamp(min=1)  # (B, L)
    cache = model.make_kv_cache(B, L + budget)
    done = [p.max_new_tokens == 0 for p in per_row]
    pix = pixel_values.to(device=device, dtype=w.dtype) if pixel_values is not None else None

    # prefill: the prefix (pad slots + prefix tokens) bidirectional, the rest causal
    mask = MaskSpec(prefix_len=pads + torch.tensor(prefix, device=device), key_padding=valid[:, :L])
    res = model({"input_ids": ids, "pixel_values": pix, "positions": positions, "mask": mask, "kv_cache": cache})
    for _ in range(budget):
        logits = model.logits(res.hidden[:, -1:])[:, 0].float()  # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        toks = [pad_id] * B
        for b in range(B):
            if done[b]:
                continue
            p, r = per_row[b], results[b]
            row = logits[b] if p.repetition_penalty == 1.0 else \
                apply_repetition_penalty(logits[b], prompts[b] + r.tokens, p.repetition_penalty)
            toks[b] = sample_next(row, p, rngs[b])
            r.tokens.append(toks[b])
            r.logprobs.append(float(logp[b, toks[b]]))
            if toks[b] in eos or toks[b] in p.stop_token_ids or (hit_stop is not None and hit_stop(r, p)):
                r.finish_reason, done[b] = "stop", True
            elif len(r.tokens) >= p.max_new_tokens:
                done[b] = True
        if all(done):
            break
        x = torch.tensor(toks, dtype=torch.long, device=device)[:, None]  # (B, 1)
        positions = positions[:, -1:] + 1
        mask = MaskSpec(key_padding=valid[:, : cache.seen + 1])
        res = model({"input_ids": x, "positions": positions, "mask": mask, "kv_cache": cache})
    return results


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
    """New token ids per row (an eos that ended a row is kept, as in `Completion.tokens`): the loop of
    `VLMGenerator` with one set of sampling settings and one torch.Generator shared by the rows.

    input_ids: one prompt per row (lists of ids, any lengths: they are left-padded here) or a (B, T) tensor
    of unpadded prompts. pixel_values: (B, 3, S, S) (one image per row) or None for text-only prompts.
    prefix_len: per row, how many leading prompt tokens form the bidirectional prefix (default: the whole
    prompt, as transformers' generate does); the prompt tokens after it are read causally.
    """
    prompts = [list(map(int, p)) for p in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    B = len(prompts)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    params.validate()
    if pixel_values is not None and pixel_values.shape[0] != B:
        raise ValueError(f"{pixel_values.shape[0]} images for {B} prompts (one image per prompt)")
    prefix = [len(p) for p in prompts] if prefix_len is None else [int(n) for n in prefix_len]
    device = next(model.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    results = _decode(model, prompts, pixel_values, prefix, [params] * B, [rng] * B, set(int(e) for e in eos_ids),
                      pad_id)
    return [r.tokens for r in results]


def generate_text(model, tokenizer, image, prompt: str, page: int | None = None, **sampling) -> str:
    """The decoded continuation of `prompt` about `image` (a PIL image, or the path of an image or PDF, `page`
    of it) through `VLMGenerator`; `sampling`: SamplingParams fields."""
    if isinstance(image, (str, Path)):
        image = load_image(image, page)
    params = SamplingParams(**sampling)
    return VLMGenerator(model, tokenizer).generate([image_prompt(model, tokenizer, image, prompt)], params)[0].text
