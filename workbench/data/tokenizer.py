"""The runtime tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

Training, data preparation and generation all go through `Tokenizer`, which loads either a bare
`tokenizer.json` (`Tokenizer.from_file`) or a Hugging Face model directory (`Tokenizer.from_hf_dir`).
It depends only on the Rust `tokenizers` library; `transformers` is a test-time reference, never a
runtime dependency.

Reserved tokens
---------------
Every tokenizer this project trains (see `data_pipelines.tokenizer`) reserves `SPECIAL_TOKENS` as
ids 0..11, in that order, from the very first tokenizer on:

- `<|bos|>`, `<|eos|>`, `<|pad|>`: document boundaries and batch padding for pretraining;
- `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`: chat turns for supervised fine-tuning;
- `<think>`, `</think>`, `<answer>`, `</answer>`: R1-style reasoning traces and final answers;
- `<image>`: the placeholder a vision-language model replaces with image embeddings.

A tokenizer is frozen once a model has been trained with it: adding a token later changes the
vocabulary, and retraining the tokenizer reassigns every id, which orphans every checkpoint trained
on the old one. Reserving the tokens up front lets a base model pretrained today be fine-tuned for
chat, reasoning or vision later with the same tokenizer and embedding table. The reserved tokens are
registered as special added tokens, so they are never split, and a literal `<think>` in text encodes
as the single reserved id.

Which ids mark the beginning and end of a sequence, and which pads a batch, come from the model's
metadata when loading a Hugging Face directory (see `Tokenizer.from_hf_dir`), otherwise from the
reserved names above when the vocabulary has them. Whether `encode` prepends a bos is left to the
tokenizer's own post-processor, exactly as in Hugging Face, so that encodings match the reference
tokenizer of a pretrained model token for token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from workbench.errors import DataError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<image>",
)
"""The reserved tokens, in id order: tokenizers this project trains give them ids 0..11."""

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS[:3]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids that begin, end and pad a sequence.

    `bos_id`, `eos_ids` and `pad_id` given here win; any left out fall back to the reserved tokens
    `<|bos|>`, `<|eos|>` and `<|pad|>` when the vocabulary has them. `eos_id` is the id appended to
    end a document, `eos_ids` every id at which generation stops (it always contains `eos_id`), and
    `pad_id` falls back to `eos_id` for tokenizers without a pad token.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.special_ids: dict[str, int] = {
            name: token_id for name in SPECIAL_TOKENS if (token_id := backend.token_to_id(name)) is not None
        }
        self.bos_id: int | None = bos_id if bos_id is not None else self.special_ids.get(BOS_TOKEN)
        if not eos_ids and EOS_TOKEN in self.special_ids:
            eos_ids = (self.special_ids[EOS_TOKEN],)
        self.eos_id: int | None = eos_ids[0] if eos_ids else None
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        if pad_id is None:
            pad_id = self.special_ids.get(PAD_TOKEN, self.eos_id)
        self.pad_id: int | None = pad_id

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` file; bos/eos/pad ids come from the reserved tokens, if present."""
        return cls(_load_backend(Path(path)))

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """Load `directory/tokenizer.json` and take the bos/eos/pad ids from the model's metadata.

        Each id comes from the first of these that sets it: `generation_config.json` (whose
        `eos_token_id` may be a list), `config.json` (`bos_token_id`, `eos_token_id`,
        `pad_token_id`), `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, as token
        strings or `{"content": ...}` dicts), and finally the reserved tokens. `eos_ids` is the
        union of the eos ids all three files name, so generation stops wherever any of them says.
        """
        directory = Path(directory)
        if not directory.is_dir():
            state = "is not a directory" if directory.exists() else "does not exist"
            raise DataError(
                f"tokenizer directory {directory} {state}: expected a Hugging Face model directory"
            )
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"tokenizer directory {directory} has no tokenizer.json: expected a Hugging Face tokenizer"
            )
        backend = _load_backend(path)

        sources = [
            _ids_from_config(directory / "generation_config.json", backend),
            _ids_from_config(directory / "config.json", backend),
            _ids_from_tokenizer_config(directory / "tokenizer_config.json", backend),
        ]
        bos_id = next((s["bos"][0] for s in sources if s["bos"]), None)
        pad_id = next((s["pad"][0] for s in sources if s["pad"]), None)
        eos_ids: list[int] = []
        for source in sources:  # the first source's first eos id leads, as `eos_id`
            eos_ids += [i for i in source["eos"] if i not in eos_ids]
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id)

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included: the model's embedding must have at least this many."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_reserved_tokens(self) -> bool:
        """Whether every token in `SPECIAL_TOKENS` is in the vocabulary."""
        return len(self.special_ids) == len(SPECIAL_TOKENS)

    def require_reserved(self) -> None:
        """Raise `DataError` unless the vocabulary has every reserved token (chat, reasoning, VLM data need them)."""
        missing = [name for name in SPECIAL_TOKENS if name not in self.special_ids]
        if missing:
            raise DataError(
                f"tokenizer lacks the reserved tokens {', '.join(missing)}: "
                "use a tokenizer built by data_pipelines.tokenizer"
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the post-processor may add a bos."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once, in parallel."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (any iterable of ints: a list, a numpy array, a 1-D tensor)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of `token_id`, or None if the id is out of range."""
        return self.backend.id_to_token(token_id)

    def token_bytes(self) -> list[int]:
        """How many bytes of text each id stands for (0 for special tokens): the denominator of bits per byte.

        Byte-level tokenizers map every byte to one symbol, so a token's byte count is the length of its
        string; for others, the UTF-8 length of the token decoded alone.
        """
        byte_level = json.loads(self.backend.to_str()).get("decoder", {}) or {}
        byte_level = byte_level.get("type") == "ByteLevel"
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        out = []
        for i in range(self.vocab_size):
            token = self.backend.id_to_token(i)
            if token is None or token in special:
                out.append(0)
            elif byte_level:
                out.append(len(token))
            else:
                out.append(len(self.backend.decode([i], skip_special_tokens=True).encode("utf-8")))
        return out

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as `tokenizer.json` to `path`, or into `path` if it is a directory; return the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)}, pad_id={self.pad_id})"
        )


def check_fits(tokenizer: Tokenizer, vocab_size: int, what: str = "model") -> None:
    """Raise `DataError` if `tokenizer` has ids that a `what` with `vocab_size` embeddings cannot embed."""
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the {what}'s vocab_size is {vocab_size}: "
            f"use a {what} whose vocab_size is at least {tokenizer.vocab_size}"
        )


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    """Read a `tokenizer.json`, turning every failure into a one-line `DataError` naming the file."""
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"tokenizer file {path} {state}: expected a tokenizers JSON file (tokenizer.json)")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for bad JSON or schema
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file {path}: not a valid tokenizers JSON file ({reason})") from e


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_id(path: Path, key: str, value: Any, backend: tokenizers.Tokenizer) -> int:
    """`value` as a token id, or a `DataError` naming the file and key if it is not one."""
    size = backend.get_vocab_size(with_added_tokens=True)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise DataError(f"{path}: {key} must be a token id in [0, {size}), got {value!r}")
    return value


def _ids_from_config(path: Path, backend: tokenizers.Tokenizer) -> dict[str, list[int]]:
    """The bos/eos/pad ids `config.json` or `generation_config.json` sets (each a list, maybe empty)."""
    data = _read_json(path)
    ids: dict[str, list[int]] = {}
    for name in ("bos", "eos", "pad"):
        key = f"{name}_token_id"
        value = data.get(key)
        values = [] if value is None else value if isinstance(value, list) else [value]
        ids[name] = [_check_id(path, key, v, backend) for v in values]
    return ids


def _ids_from_tokenizer_config(path: Path, backend: tokenizers.Tokenizer) -> dict[str, list[int]]:
    """The ids of the bos/eos/pad token strings `tokenizer_config.json` names (each a list, maybe empty)."""
    data = _read_json(path)
    ids: dict[str, list[int]] = {}
    for name in ("bos", "eos", "pad"):
        key = f"{name}_token"
        token = data.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            ids[name] = []
            continue
        token_id = backend.token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise DataError(f"{path}: {key} {token!r} is not a token of the tokenizer")
        ids[name] = [token_id]
    return ids
