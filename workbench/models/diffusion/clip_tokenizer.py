"""CLIP's byte-level BPE tokenizer, read from `vocab.json` + `merges.txt` (or a `tokenizer.json`).

What it is
    The tokenizer of CLIP's text tower and so of Stable Diffusion's prompts, equal to transformers'
    `CLIPTokenizer` (tests/parity/test_diffusion_hf.py compares them on varied prompts).

The algorithm
    1. Normalize: Unicode NFC, every whitespace run -> one space, lower-case character by character.
    2. Pre-tokenize with CLIP's pattern, scanning left to right and dropping whitespace:
           <|startoftext|> | <|endoftext|> | 's 't 're 've 'm 'll 'd | letters+ | one number char
           | a run of anything else that is not a space, letter or number
       ("letters" = Unicode category L*, "number" = N*; so "2024" is four pieces).
    3. Byte-level: each piece's UTF-8 bytes become printable characters (GPT-2's byte -> unicode table),
       and the last character gets the end-of-word suffix `</w>`.
    4. BPE: repeatedly merge the adjacent pair with the lowest rank in `merges.txt` until none applies;
       each resulting symbol is looked up in `vocab.json` (unknown -> the unk token).
    5. Frame and pad: [bos] + ids[: max_length - 2] + [eos], then pad with the pad token up to max_length
       (77 for SD). The pad token comes from the tokenizer config: "<|endoftext|>" (SD 1.x) or "!" (SD 2.x).

Design choices
    The pattern is a hand-written scanner over `unicodedata` categories instead of a third-party regex
    engine (Python's `re` has no \\p{L}). The special tokens (bos, eos, pad, unk) are split out of the raw
    text first, leftmost-longest, like transformers' added tokens. Words are cached.

Sources
    Radford et al. 2021 (CLIP) and its `simple_tokenizer.py`; Sennrich et al., "Neural Machine
    Translation of Rare Words with Subword Units" (1508.07909); transformers tokenization_clip.py
    (read, not copied).
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

from workbench.errors import DataError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
EOW = "</w>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the others to unused code points from 256 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_space(c: str) -> bool:
    # Unicode White_Space (what the reference's \s means), not Python's isspace (which adds \x1c-\x1f)
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def _kind(c: str) -> str:
    if _is_space(c):
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lower-case."""
    text = unicodedata.normalize("NFC", text)
    out, prev_space = [], False
    for c in text:
        if _is_space(c):
            if not prev_space:
                out.append(" ")
            prev_space = True
        else:
            out.append(c)
            prev_space = False
    # per character, as the reference does: str.lower() would apply the final-sigma rule (Σ -> ς at a word end)
    return "".join(c.lower() for c in out)


def pre_tokenize(text: str) -> list[str]:
    """CLIP's pattern on normalized text: the pieces in order, whitespace dropped."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        special = next((s for s in (BOS, EOS) if text.startswith(s, i)), None)
        if special:
            pieces.append(special)
            i += len(special)
            continue
        if c == "'":
            suffix = next((s for s in CONTRACTIONS if text.startswith(s, i + 1)), None)
            if suffix:
                pieces.append("'" + suffix)
                i += 1 + len(suffix)
                continue
        kind = _kind(c)
        if kind == " ":
            i += 1
        elif kind == "N":
            pieces.append(c)
            i += 1
        else:  # a run of letters, or a run of "other" characters
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            pieces.append(text[i:j])
            i = j
    return pieces


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 unk_token: str = EOS, model_max_length: int = 77, where: str = "tokenizer"):
        self.vocab = vocab
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        for name, tok in (("bos", BOS), ("eos", EOS), ("pad", pad_token), ("unk", unk_token)):
            if tok not in vocab:
                raise DataError(f"{where}: the {name} token {tok!r} is not in the vocabulary")
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_id, self.unk_id = vocab[pad_token], vocab[unk_token]
        self.model_max_length = model_max_length
        self.specials = sorted({BOS, EOS, pad_token, unk_token})
        self.byte_table = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, folder: str | Path) -> CLIPTokenizer:
        """`vocab.json` + `merges.txt` (or `tokenizer.json`), with `tokenizer_config.json` /
        `special_tokens_map.json` for the pad/unk tokens and `model_max_length`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: tokenizer folder not found")
        settings: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                settings.update(_read_json(folder / name))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = _read_json(folder / "tokenizer.json").get("model") or {}
            vocab, merges = model.get("vocab"), model.get("merges") or []
            if not isinstance(vocab, dict):
                raise DataError(f"{folder / 'tokenizer.json'}: no BPE model vocab")
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
        else:
            raise DataError(f"{folder}: no vocab.json + merges.txt (or tokenizer.json): not a CLIP tokenizer folder")
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise DataError(f"{folder / 'merges.txt'}: a merge must be two symbols, got {' '.join(bad)!r}")

        def token(key, default):
            v = settings.get(key, default)
            return v.get("content", default) if isinstance(v, dict) else (v or default)

        max_len = settings.get("model_max_length", 77)
        max_len = max_len if isinstance(max_len, int) and 0 < max_len < 10**6 else 77
        return cls(vocab, merges, pad_token=token("pad_token", EOS), unk_token=token("unk_token", EOS),
                   model_max_length=max_len, where=str(folder))

    def bpe(self, piece: str) -> list[int]:
        """The ids of one pre-token."""
        if piece in self._cache:
            return self._cache[piece]
        word = [self.byte_table[b] for b in piece.encode("utf-8")]
        word[-1] += EOW
        while len(word) > 1:
            ranked = [(self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            ranked = [(r, i) for r, i in ranked if r is not None]
            if not ranked:
                break
            _, i = min(ranked)  # the lowest rank, leftmost on ties
            word[i:i + 2] = [word[i] + word[i + 1]]
        ids = [self.vocab.get(sym, self.unk_id) for sym in word]
        if len(self._cache) < 50000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without bos/eos. The special tokens (bos, eos, pad, unk) written in the raw text
        are their ids (SD 2.x's pad token is "!", so "!!" there is two pad ids, as in the reference); the
        text between them is normalized, pre-tokenized and BPE-encoded."""
        ids: list[int] = []
        for segment, special in self._split_special(text):
            if special:
                ids.append(self.vocab[segment])
            else:
                ids.extend(i for piece in pre_tokenize(normalize(segment)) for i in self.bpe(piece))
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """Leftmost-longest matches of the special tokens in the raw text, and the text between them."""
        out, start, i = [], 0, 0
        while i < len(text):
            match = max((s for s in self.specials if text.startswith(s, i)), key=len, default=None)
            if match is None:
                i += 1
                continue
            if i > start:
                out.append((text[start:i], False))
            out.append((match, True))
            i = start = i + len(match)
        if start < len(text):
            out.append((text[start:], False))
        return out

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}: (B, max_length) int64, bos + ids (truncated) + eos, padded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        L = max_length or self.model_max_length
        if L < 2:
            raise ValueError(f"max_length: must be >= 2 (bos and eos), got {L}")
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.long)
        for b, text in enumerate(texts):
            row = [self.bos_id, *self.encode(text)[: L - 2], self.eos_id]
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def learn_bpe(texts: list[str], n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-format vocabulary learned from `texts` (tests, and tiny caption models): the 256 byte
    symbols, the same with `</w>`, then the `n_merges` most frequent pairs merged greedily, then bos, eos."""
    from collections import Counter

    table = bytes_to_unicode()
    words = Counter(pre_tokenize(normalize(" ".join(texts))))
    seqs = {}
    for w in words:
        if w in (BOS, EOS):
            continue
        sym = [table[b] for b in w.encode("utf-8")]
        sym[-1] += EOW
        seqs[w] = sym
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, sym in seqs.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for sym in seqs.values():
            i = 0
            while i < len(sym) - 1:
                if (sym[i], sym[i + 1]) == best:
                    sym[i:i + 2] = [sym[i] + sym[i + 1]]
                i += 1
    symbols = list(table.values())
    symbols += [c + EOW for c in symbols] + ["".join(m) for m in merges]
    vocab = {}
    for sym in [*symbols, BOS, EOS]:
        vocab.setdefault(sym, len(vocab))
    return vocab, merges


def save_vocab(folder: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
               model_max_length: int = 77) -> None:
    """Write `vocab.json`, `merges.txt` and a `tokenizer_config.json` that transformers' CLIPTokenizer reads too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
              "pad_token": pad_token, "model_max_length": model_max_length}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data
