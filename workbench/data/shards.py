"""Reading tokenized webdataset shards back as packed training samples, with every lost sample counted.

A dataset folder (written by `workbench data`, see `data_pipelines.shards`) holds

    manifest.json          what should be there: per split, per shard, its file, sha256, sample keys,
                           token and byte counts; the tokenizer's sha256; the train split's unigram counts
    tokenizer.json
    train-000000.tar ...   webdataset tars: per document, `KEY.ids` (token ids, little-endian `dtype`),
    val-000000.tar ...     `KEY.txt` (the text) and `KEY.json` ({"path", "bytes", "tokens"})

The stream
    epoch e  : shards in the order permutation(seed, e); within a shard, documents in the order
               permutation(seed, e, shard); each document's ids, then eos, back to back
    windows  : window w of the epoch is tokens[w T : w T + T + 1] (T + 1 tokens: inputs and shifted labels),
               with the document ordinal of each token for the mask spec; the tail shorter than T + 1 is
               not used; windows are then shuffled in blocks of `shuffle_windows` (permutation(seed, e,
               block)), because neighbouring windows come from one document and a batch of them would
               all be one file
    global   : sample g is window g - epoch_start(e) of the epoch that holds it, so the global data cursor
               (workbench.data.cursor) alone says what comes next, at any world size

Nothing is lost silently. A tar reader can stop early without raising (a bad header checksum or a
truncation inside a header ends iteration quietly on Python 3.11), so each shard is checked against the
manifest: the whole file's sha256 first (a truncated, bit-flipped or missing shard is dropped whole, since
its tokens cannot be trusted), then the keys it yields (any manifest key not delivered is a drop) and each
sample (ids present, of the stated count, inside the vocabulary). Every drop is logged with the shard and
the keys, and at the end of every epoch `delivered + dropped == manifest` is checked and logged. With
`strict=True` the first drop is a `DataError` instead.

Resume: `state_dict()` holds the epoch, the global index where it began, and what each shard already read
in this epoch delivered; `sample(g)` after `load_state_dict` skips those shards by their recorded token
counts without reading them, then reads forward to window g. Every rank reads the whole stream and keeps
its own samples (the cursor's k mod W = r), which is what lets a run resume at another world size.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.checkpoint.run import sha256_file
from workbench.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "workbench-shards/1"
DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> str:
    """The smallest stored id type that holds every id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    file: str
    sha256: str
    size: int
    keys: list[str]
    tokens: int  # ids stored (eos not included)
    bytes: int  # UTF-8 bytes of the documents' text


@dataclass
class Manifest:
    root: Path
    build: dict[str, Any]
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    splits: dict[str, list[ShardInfo]]
    unigram_counts: list[int]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def documents(self, split: str) -> int:
        return sum(len(s.keys) for s in self.splits[split])

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits[split])

    def to_json(self) -> dict:
        return {"format": FORMAT, "build": self.build,
                "tokenizer": {"file": "tokenizer.json", "sha256": self.tokenizer_sha256,
                              "vocab_size": self.vocab_size},
                "dtype": self.dtype,
                "splits": {name: [vars(s) for s in shards] for name, shards in self.splits.items()},
                "unigram_counts": self.unigram_counts}

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read and check `root/manifest.json`; any problem is a `DataError` naming the file and the field."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist: build it with `workbench data CONFIG`")
        if not path.is_file():
            raise DataError(f"data folder {root} has no {MANIFEST}: it is not a workbench dataset "
                            f"(build one with `workbench data CONFIG`)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")

        def need(obj, key, kind, where):
            if not isinstance(obj, dict) or key not in obj:
                raise DataError(f"{path}: missing field '{where}{key}'")
            value = obj[key]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise DataError(f"{path}: field '{where}{key}' should be {kind.__name__}, got {value!r:.60}")
            return value

        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        tok = need(raw, "tokenizer", dict, "")
        dtype = need(raw, "dtype", str, "")
        if dtype not in DTYPES:
            raise DataError(f"{path}: field 'dtype' is {dtype!r}, expected one of {', '.join(DTYPES)}")
        splits = {}
        for name in SPLITS:
            shards = need(need(raw, "splits", dict, ""), name, list, "splits.")
            infos = []
            for i, s in enumerate(shards):
                where = f"splits.{name}[{i}]."
                info = ShardInfo(file=need(s, "file", str, where), sha256=need(s, "sha256", str, where),
                                 size=need(s, "size", int, where), keys=need(s, "keys", list, where),
                                 tokens=need(s, "tokens", int, where), bytes=need(s, "bytes", int, where))
                if Path(info.file).name != info.file:  # shards live in the folder, nowhere else
                    raise DataError(f"{path}: field '{where}file' must be a file name, got {info.file!r}")
                infos.append(info)
            if not infos:
                raise DataError(f"{path}: split '{name}' has no shards")
            splits[name] = infos
        counts = need(raw, "unigram_counts", list, "")
        vocab = need(tok, "vocab_size", int, "tokenizer.")
        if len(counts) != vocab:
            raise DataError(f"{path}: field 'unigram_counts' has {len(counts)} entries, expected {vocab}")
        return cls(root=root, build=need(raw, "build", dict, ""),
                   tokenizer_sha256=need(tok, "sha256", str, "tokenizer."), vocab_size=vocab,
                   dtype=dtype, splits=splits, unigram_counts=counts)

    def check_tokenizer(self) -> None:
        """The folder's tokenizer.json must be the one the shards were tokenized with."""
        if not self.tokenizer_path.is_file():
            raise DataError(f"data folder {self.root}: tokenizer.json is missing")
        if sha256_file(self.tokenizer_path) != self.tokenizer_sha256:
            raise DataError(f"{self.tokenizer_path}: sha256 differs from the manifest's: the shards were "
                            f"tokenized with another tokenizer (rebuild with `workbench data CONFIG --force`)")


# ---------------------------------------------------------------------------------------------- one shard


@dataclass
class ShardRead:
    """What reading one shard gave: documents in file order, and the keys lost with the reason."""

    documents: list[tuple[str, np.ndarray]]
    dropped: list[str]
    reason: str = ""
    texts: dict[str, str] = field(default_factory=dict)  # key -> the document's text (KEY.txt), delivered ones


def read_shard(root: Path, info: ShardInfo, dtype: str, vocab_size: int) -> ShardRead:
    """Read one shard, checked against its manifest entry (see the module notes)."""
    path = root / info.file
    try:
        data = path.read_bytes()
    except OSError as e:
        return ShardRead([], list(info.keys), f"cannot be read ({e.strerror or e})")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        what = "truncated" if len(data) < info.size else "corrupt"
        return ShardRead([], list(info.keys), f"sha256 mismatch ({what}: {len(data)} of {info.size} bytes)")

    samples: dict[str, dict[str, bytes]] = {}
    reason = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            last = None
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key != last and key in samples:  # a key's files must be adjacent, as webdataset reads them
                    reason = f"key {key} appears twice, not adjacent"
                    break
                last = key
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = f"unreadable tar ({e})"

    wanted = set(info.keys)
    documents, bad, texts = [], [], {}
    item = np.dtype(dtype).newbyteorder("<")
    for key in info.keys:
        fields = samples.get(key)
        if fields is None:
            continue
        raw = fields.get("ids")
        if raw is None or len(raw) % item.itemsize:
            bad.append(key)
            continue
        ids = np.frombuffer(raw, dtype=item).astype(np.int64)
        meta = _json_or_none(fields.get("json"))
        if meta is None or meta.get("tokens") != len(ids) or (len(ids) and int(ids.max()) >= vocab_size):
            bad.append(key)
            continue
        documents.append((key, ids))
        if "txt" in fields:
            texts[key] = fields["txt"].decode("utf-8", errors="replace")
    delivered = {k for k, _ in documents}
    dropped = [k for k in info.keys if k not in delivered]
    extra = sorted(set(samples) - wanted)
    if dropped and not reason:
        reason = "samples missing or malformed" if bad or len(samples) >= len(wanted) else \
            "the tar ended early (a reader stops silently at a bad header)"
    if extra:
        reason = (reason + "; " if reason else "") + f"{len(extra)} keys not in the manifest ignored"
    return ShardRead(documents, dropped, reason, texts)


def _json_or_none(raw: bytes | None) -> dict | None:
    try:
        value = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def describe_keys(keys: list[str]) -> str:
    return ", ".join(keys) if len(keys) <= 4 else f"{keys[0]}, {keys[1]}, ..., {keys[-1]}"


# ---------------------------------------------------------------------------------------------- the stream


class ShardStream:
    """Packed (T + 1)-token samples from one split, indexed by the global sample index (see module notes).

    `sample(g)` returns {"tokens", "doc_ids"} (int64 arrays of T + 1); calls must come in increasing g
    (each rank asks for its own increasing share). `epochs` records each finished epoch's accounting.
    """

    def __init__(self, root: str | Path, split: str, seq_len: int, *, eos_id: int, seed: int = 0,
                 shuffle: bool = True, shuffle_windows: int = 1024, strict: bool = False,
                 log: Callable[[str], None] = print, manifest: Manifest | None = None):
        self.manifest = manifest or Manifest.load(root)
        if split not in self.manifest.splits:
            raise DataError(f"{self.manifest.root}: no split '{split}'")
        self.split, self.seq_len, self.eos_id = split, seq_len, eos_id
        self.seed, self.shuffle, self.strict, self.log = seed, shuffle, strict, log
        self.shuffle_windows = max(1, shuffle_windows)
        self.shards = self.manifest.splits[split]
        self.epoch, self.epoch_start = 0, 0
        self.done: dict[str, list[int]] = {}  # shard file -> [documents, tokens incl. eos, dropped], this epoch
        self.epochs: list[dict] = []
        self._windows: Iterator[dict] | None = None
        self._next = 0  # the global index the window iterator yields next

    # --- state

    @property
    def fingerprint(self) -> str:
        """The split's shards (names and sha256): a resumed stream must read the very same ones."""
        listing = json.dumps([[s.file, s.sha256] for s in self.shards])
        return hashlib.sha256(listing.encode()).hexdigest()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_start": self.epoch_start,
                "done": {k: list(v) for k, v in self.done.items()}, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise DataError(f"data folder {self.manifest.root}: its {self.split} shards are not the ones this run "
                            f"was reading (was it rebuilt?); resume needs the same dataset")
        self.epoch, self.epoch_start = int(state["epoch"]), int(state["epoch_start"])
        self.done = {k: [int(x) for x in v] for k, v in state["done"].items()}
        self._windows = None

    # --- samples

    def sample(self, g: int) -> dict[str, np.ndarray]:
        if g < self.epoch_start:
            raise ValueError(f"sample {g} comes before the current epoch (which starts at {self.epoch_start})")
        if self._windows is None or g < self._next:
            self._windows, self._next = self._epoch_windows(skip=g - self.epoch_start), g
        while True:
            for window in self._windows:
                index = self._next
                self._next += 1
                if index == g:
                    return window
            self._end_epoch()
            self._windows = self._epoch_windows(skip=g - self.epoch_start)
            self._next = g

    def windows(self, count: int | None = None) -> list[dict[str, np.ndarray]]:
        """The first `count` windows of epoch 0 in order (all of them if None): a fixed validation set."""
        out = []
        for window in self._epoch_windows(skip=0, epoch=0):
            if count is not None and len(out) >= count:
                break
            out.append(window)
        return out

    # --- internals

    def _shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards)
        return list(np.random.default_rng([self.seed, epoch]).permutation(n)) if self.shuffle else list(range(n))

    def _documents(self, epoch: int, skip_tokens: int) -> Iterator[tuple[np.ndarray, int]]:
        """(ids + eos, ordinal) of each document of the epoch, starting `skip_tokens` tokens in."""
        ordinal = 0
        for index in self._shard_order(epoch):
            info = self.shards[index]
            record = self.done.get(info.file) if epoch == self.epoch else None
            if record is not None and record[1] <= skip_tokens:  # already read this epoch: skip unread
                skip_tokens -= record[1]
                ordinal += record[0]
                continue
            read = read_shard(self.manifest.root, info, self.manifest.dtype, self.manifest.vocab_size)
            if read.dropped:
                self._drop(info, read)
            elif read.reason:  # nothing lost, but worth knowing (e.g. samples the manifest does not list)
                self.log(f"data ({self.split}): shard {info.file}: {read.reason}")
            docs = read.documents
            if self.shuffle and docs:
                order = np.random.default_rng([self.seed, epoch, int(index)]).permutation(len(docs))
                docs = [docs[i] for i in order]
            if epoch == self.epoch:
                tokens = sum(len(ids) + 1 for _, ids in docs)
                self.done[info.file] = [len(docs), tokens, len(read.dropped)]
            for _, ids in docs:
                ids = np.append(ids, self.eos_id)
                if skip_tokens >= len(ids):
                    skip_tokens -= len(ids)
                else:
                    yield ids[skip_tokens:], ordinal
                    skip_tokens = 0
                ordinal += 1

    def _epoch_windows(self, skip: int, epoch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Windows skip, skip + 1, ... of `epoch` (default: the current one), block-shuffled."""
        epoch = self.epoch if epoch is None else epoch
        S = self.shuffle_windows if self.shuffle else 1
        block, offset = divmod(skip, S)
        raw = self._raw_windows(epoch, block * S)
        while True:
            windows = list(itertools.islice(raw, S))
            if not windows:
                return
            if S > 1:  # neighbouring windows come from one document: mix them within the block
                order = np.random.default_rng([self.seed, epoch, 1_000_003, block]).permutation(len(windows))
                windows = [windows[i] for i in order]
            yield from windows[offset:]
            block, offset = block + 1, 0

    def _raw_windows(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """Windows skip, skip + 1, ... of `epoch` in stream order."""
        T = self.seq_len
        tokens = np.empty(0, dtype=np.int64)
        docs = np.empty(0, dtype=np.int64)
        for ids, ordinal in self._documents(epoch, skip * T):
            tokens = np.concatenate([tokens, ids])
            docs = np.concatenate([docs, np.full(len(ids), ordinal, dtype=np.int64)])
            while len(tokens) >= T + 1:
                yield {"tokens": tokens[: T + 1], "doc_ids": docs[: T + 1]}
                tokens, docs = tokens[T:], docs[T:]

    def _drop(self, info: ShardInfo, read: ShardRead) -> None:
        msg = (f"data ({self.split}, epoch {self.epoch}): shard {info.file}: {read.reason}; "
               f"{len(read.dropped)} of {len(info.keys)} documents dropped ({describe_keys(read.dropped)})")
        if self.strict:
            raise DataError(msg + " [data.strict is on]")
        self.log(msg)

    def _end_epoch(self) -> None:
        delivered = sum(v[0] for v in self.done.values())
        dropped = sum(v[2] for v in self.done.values())
        tokens = sum(v[1] for v in self.done.values())
        expected = self.manifest.documents(self.split)
        windows = max(0, (tokens - 1) // self.seq_len)
        self.epochs.append({"epoch": self.epoch, "delivered": delivered, "dropped": dropped,
                            "manifest": expected, "windows": windows})
        if delivered + dropped != expected or len(self.done) != len(self.shards):
            raise DataError(f"data ({self.split}, epoch {self.epoch}): {delivered} delivered + {dropped} dropped "
                            f"!= {expected} documents in the manifest")
        self.log(f"data ({self.split}): epoch {self.epoch} done: {delivered} documents delivered + {dropped} "
                 f"dropped = {expected} in the manifest; {windows} samples")
        if windows == 0:
            raise DataError(f"data ({self.split}): epoch {self.epoch} gave no sample of {self.seq_len + 1} tokens")
        self.epoch_start += windows
        self.epoch += 1
        self.done = {}


def read_texts(root: str | Path, split: str, log: Callable[[str], None] = print,
               manifest: Manifest | None = None) -> list[tuple[str, str]]:
    """(key, text) of every document of a split in manifest order, each shard checked as the stream checks
    it; a dropped document is logged (shard and keys), not returned. What evaluations read: text, so a
    model with another tokenizer can score the same held-out documents."""
    manifest = manifest or Manifest.load(root)
    if split not in manifest.splits:
        raise DataError(f"{manifest.root}: no split '{split}' (it has {', '.join(manifest.splits)})")
    out = []
    for info in manifest.splits[split]:
        read = read_shard(manifest.root, info, manifest.dtype, manifest.vocab_size)
        if read.dropped:
            log(f"data ({split}): shard {info.file}: {read.reason}; {len(read.dropped)} of {len(info.keys)} "
                f"documents dropped ({describe_keys(read.dropped)})")
        out += [(key, read.texts[key]) for key, _ in read.documents if key in read.texts]
    return out


def unigram_loss(counts: list[int] | np.ndarray, labels: np.ndarray) -> float:
    """Cross-entropy (nats/token) of `labels` under the add-one-smoothed unigram distribution of `counts`:
    the loss of a model that knows only how often each token occurs, the baseline a trained model must beat."""
    counts = np.asarray(counts, dtype=np.float64) + 1.0
    logp = np.log(counts) - math.log(counts.sum())
    return float(-logp[labels].mean()) if len(labels) else float("nan")
