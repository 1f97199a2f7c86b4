"""Offline tokenizer construction: byte-level BPE with the project's reserved tokens.

`train_bpe` learns a byte-level BPE tokenizer (the GPT-2 scheme) from an iterable of texts;
`byte_tokenizer` builds the same tokenizer with no merges, one id per byte, which needs no data and
serves tests and smoke runs. Both return a `workbench.data.tokenizer.Tokenizer`; save it with
`Tokenizer.save` and load it at training time with `Tokenizer.from_file`.

Design choices:

- Byte level: text is split with the GPT-2 regex and mapped byte by byte onto 256 printable symbols,
  all of which are in the vocabulary, so every string encodes without an unknown token and decodes
  back exactly. No normalizer and no prefix space: `decode(encode(s)) == s` for every `str`.
- `SPECIAL_TOKENS` come first, as ids 0..11, then the 256 byte symbols, then the merges in the order
  they were learned. They are special added tokens: never split and never merged into, so a literal
  `<think>` in text encodes as the reserved id (and `decode` drops it unless
  `skip_special_tokens=False`). See `workbench.data.tokenizer` for why they are reserved up front.
- The post-processor prepends `<|bos|>` to every sequence `encode` sees with
  `add_special_tokens=True`, so a document's tokens start with a bos like Llama's do; packing code
  appends the eos itself.
- Training is deterministic: the same texts in the same order give the same `tokenizer.json`.
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from workbench.data.tokenizer import BOS_TOKEN, SPECIAL_TOKENS, Tokenizer
from workbench.errors import DataError

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
"""The reserved tokens plus one symbol per byte: the vocabulary of a BPE with no merges."""


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most `vocab_size` tokens on `texts`.

    The result has fewer than `vocab_size` tokens when `texts` run out of pairs seen at least
    `min_frequency` times. `vocab_size` counts the reserved tokens and the 256 byte symbols, so it
    must be at least `MIN_VOCAB_SIZE` (268).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size must be an integer of at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} reserved tokens + 256 bytes), got {vocab_size!r}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..11, registered as special added tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the data or not
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
    )
    return Tokenizer(backend)


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer with no merges: 12 reserved tokens + 256 byte symbols = 268 ids."""
    return train_bpe((), MIN_VOCAB_SIZE)
