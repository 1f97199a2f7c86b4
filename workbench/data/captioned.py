"""Captioned images for text-to-image work: the shapes or digits of `workbench.data.images`, each with a caption.

What it is
    `load_captioned(name, seed=..., n=..., size=...)` returns the `ImageSet` of `load_images` (same splits,
    same seed rule) plus, for every image of every split, a caption made from its class: "a circle",
    "a drawing of a star", "a handwritten seven". The template is drawn per image from the seed, so the
    captions vary in wording while the class decides what they mean. `prompt(k)` is the plain caption
    of class k ("a circle"): what a sampler or an eval asks for.

    `Vocab` is the word-level tokenizer of these captions: every word any template and class can make,
    sorted, after four reserved ids (pad 0, bos 1, eos 2, unk 3). `encode` gives (N, L) int64 ids of
    `bos words eos pad...`; an unknown word becomes unk. The text towers (the diffusion model's caption
    encoder, the contrastive model) pool at the eos position, `eos_index(ids)`.

Design choices
    The captions say only what the label says. `render_shapes` draws the colours but does not return them,
    and the issue's "(and colour if available)" is not available without changing that function; the shape
    (or the digit) is the whole content a caption can be checked against, which is what the evals
    (class accuracy, CLIP-style score) measure.
    A word vocabulary instead of the project's BPE tokenizer: the caption language has a few dozen words,
    so a text tower of a few thousand parameters learns it in seconds; a sub-word vocabulary would spend
    most of the model on embeddings no caption uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from workbench.data.images import ImageSet, load_images

__all__ = ["CaptionedImages", "Vocab", "load_captioned", "TEMPLATES", "DIGIT_WORDS", "class_words"]

TEMPLATES = {
    "shapes": ("a {}", "a picture of a {}", "a drawing of a {}", "one {}"),
    "digits": ("a handwritten {}", "the digit {}", "a picture of a {}", "a {}"),
    "cifar10": ("a {}", "a photo of a {}", "a picture of a {}", "one {}"),
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


def class_words(name: str, classes: list[str]) -> list[str]:
    """The word a caption uses for each class: digits are spelt out, other class names are used as they are."""
    return [DIGIT_WORDS[int(c)] for c in classes] if name == "digits" else list(classes)


class Vocab:
    """Word-level ids of captions (see the module notes)."""

    def __init__(self, words: list[str], length: int):
        self.words = list(SPECIAL) + sorted(set(words) - set(SPECIAL))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.length = length  # ids per caption: bos + the longest caption's words + eos

    @classmethod
    def for_set(cls, name: str, classes: list[str]) -> Vocab:
        captions = [t.format(w) for t in TEMPLATES[name] for w in class_words(name, classes)]
        return cls([w for c in captions for w in c.split()], 2 + max(len(c.split()) for c in captions))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: list[str]) -> Tensor:
        """(N, length) int64: bos, the words' ids, eos, then pad; a caption too long for `length` is an error."""
        out = torch.full((len(captions), self.length), PAD, dtype=torch.int64)
        for i, caption in enumerate(captions):
            ids = [BOS] + [self.index.get(w, UNK) for w in caption.lower().split()] + [EOS]
            if len(ids) > self.length:
                raise ValueError(f"caption {caption!r} has {len(ids) - 2} words; this vocabulary holds "
                                 f"captions of at most {self.length - 2}")
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Tensor) -> str:
        return " ".join(self.words[i] for i in ids.tolist() if i not in (PAD, BOS, EOS))


def eos_index(ids: Tensor) -> Tensor:
    """(N,) the position of each row's eos (its first one)."""
    return (ids == EOS).int().argmax(dim=1)


@dataclass
class CaptionedImages:
    images: ImageSet
    captions: dict[str, list[str]]  # split -> one caption per image, in the split's order
    vocab: Vocab
    words: list[str]  # the word of each class

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def prompt(self, k: int) -> str:
        """The plain caption of class k, the first template (what samplers and evals ask for)."""
        return TEMPLATES[self.images.name][0].format(self.words[k])

    def prompts(self) -> list[str]:
        return [self.prompt(k) for k in range(len(self.classes))]

    def tokens(self, split: str) -> Tensor:
        return self.vocab.encode(self.captions[split])


def load_captioned(name: str, data_dir: str = "", *, seed: int = 0, val_fraction: float = 0.1, n: int = 0,
                   size: int = 0) -> CaptionedImages:
    """`load_images(...)` with a caption per image; the templates are drawn from `seed` (see the module notes)."""
    data = load_images(name, data_dir, seed=seed, val_fraction=val_fraction, n=n, size=size)
    words = class_words(name, data.classes)
    templates = TEMPLATES[name]
    rng = np.random.default_rng([seed, 0xCA9])
    captions = {}
    for split in ("train", "val", "test"):
        labels = getattr(data, split)[1].tolist()
        picks = rng.integers(0, len(templates), len(labels))
        captions[split] = [templates[t].format(words[y]) for t, y in zip(picks, labels)]
    return CaptionedImages(data, captions, Vocab.for_set(name, data.classes), words)
