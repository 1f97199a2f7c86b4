"""`workbench data`: a source tree -> a tokenizer and tokenized webdataset shards with a manifest.

    documents   data_pipelines.corpus: every file under `data.source` with one of `data.extensions`
    split       documents taken in the order of their path's hash go to validation until they hold
                `val_fraction` of the text: deterministic, independent of file order, and no directory
                is favoured; at least one document lands on each side
    tokenizer   byte-level BPE (data_pipelines.tokenizer) trained on the train split only, so the
                validation text is never seen, or `data.tokenizer` when given
    passkeys    with `data.passkey_fraction` > 0, synthetic passkey documents (data_pipelines.corpus.
                passkey_documents) make up that share of the text: split like the corpus, then interleaved
                evenly with each split's documents (after the tokenizer, which stays the corpus's own)
    shards      per split, documents in path order, a new tar once the current one holds `shard_bytes`
                of text; each document is the sample KEY with KEY.ids (token ids, little-endian),
                KEY.txt and KEY.json; tars are written deterministically (fixed mtime, owner, order),
                so the same inputs give the same bytes and the same sha256
    manifest    written last: shard files, sha256, keys, token and byte counts, the tokenizer's sha256,
                the build settings, and the train split's unigram counts (the baseline a model must beat)

The whole folder is built under a temporary name beside `data.dir` and renamed into place at the end: an
interrupted build leaves the previous dataset (or nothing) and never half a one. A folder built from other
settings is not replaced unless `force` is given; an up-to-date one is reused (`force` rebuilds it anyway,
e.g. after the source files changed).

The reader is `workbench.data.shards.ShardStream`; the tars are plain webdataset shards (`webdataset.
WebDataset` reads them too, see tests/unit/test_shards.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines.corpus import Document, interleave, load_documents, passkey_documents, stdlib_root
from workbench.checkpoint.run import sha256_file
from workbench.data.shards import MANIFEST, Manifest, ShardInfo, token_dtype, unigram_loss
from workbench.data.tokenizer import Tokenizer
from workbench.errors import DataError

ENCODE_BATCH = 64  # documents per tokenizer call


def build_settings(data) -> dict:
    """The settings that decide a dataset's content; a folder built from others is a different dataset."""
    source = str(Path(data.source).resolve()) if data.source else f"stdlib:{stdlib_root()}"
    tokenizer = sha256_file(Path(data.tokenizer)) if data.tokenizer and Path(data.tokenizer).is_file() else ""
    settings = {"source": source, "extensions": sorted(data.extensions), "max_bytes": data.max_bytes,
                "tokenizer": tokenizer, "vocab_size": 0 if data.tokenizer else data.vocab_size,
                "val_fraction": data.val_fraction, "shard_bytes": data.shard_bytes}
    if getattr(data, "passkey_fraction", 0.0):  # only when on, so folders built before these keys stay valid
        settings.update(passkey_fraction=data.passkey_fraction, passkey_filler=list(data.passkey_filler),
                        passkey_digits=data.passkey_digits)
    return settings


def mix_passkeys(data, train: list[Document], val: list[Document], tokenizer: Tokenizer,
                 log: Callable[[str], None] = print) -> tuple[list[Document], list[Document]]:
    """(train, val) with synthetic passkey documents making up `data.passkey_fraction` of the text: the
    documents are split like the corpus (val_fraction of their text to validation) and interleaved evenly
    with each split's corpus documents (`data_pipelines.corpus.interleave`)."""
    corpus = sum(len(d.text) for d in train) + sum(len(d.text) for d in val)
    # fraction f of the mixture: f / (1 - f) characters of passkeys per character of corpus
    wanted = data.passkey_fraction / (1 - data.passkey_fraction) * corpus
    keys = passkey_documents(int(wanted), data.passkey_filler, data.passkey_digits)
    key_train, key_val = split_documents(keys, data.val_fraction)
    lengths = sorted(len(ids) + 1 for ids in tokenizer.encode_batch([d.text for d in keys]))  # + eos
    over = sum(n > data.seq_len for n in lengths)
    log(f"data: {len(keys)} passkey documents ({len(key_train)} train, {len(key_val)} validation; "
        f"{data.passkey_fraction:.0%} of the text), {lengths[0]}-{lengths[-1]} tokens each (median "
        f"{lengths[len(lengths) // 2]}); {over} longer than data.seq_len = {data.seq_len}")
    return interleave(train, key_train), interleave(val, key_val)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val), each in path order; see the module notes."""
    if len(docs) < 2:
        raise DataError(f"the corpus has {len(docs)} document(s): at least 2 are needed (train and validation)")

    def u(doc):  # a stable uniform number in [0, 1) per path
        return int.from_bytes(hashlib.sha256(doc.path.encode()).digest()[:8], "big") / 2**64

    # documents in hash order until they hold val_fraction of the text; one at least, and one left to train
    ranked = sorted(docs, key=u)
    target, val, held = val_fraction * sum(len(d.text) for d in docs), [], 0
    for doc in ranked[:-1]:
        val.append(doc)
        held += len(doc.text)
        if held >= target:
            break
    chosen = {id(d) for d in val}
    return [d for d in docs if id(d) not in chosen], [d for d in docs if id(d) in chosen]


def build_dataset(data, *, force: bool = False, log: Callable[[str], None] = print) -> Manifest:
    """Build (or find up to date) the dataset folder `data.dir` from a `[data]` config section."""
    out = Path(data.dir)
    settings = build_settings(data)
    if data.tokenizer and not Path(data.tokenizer).is_file():
        raise DataError(f"config key 'data.tokenizer': {data.tokenizer} does not exist")
    remove_stale_builds(out)
    if (out / MANIFEST).is_file():
        try:
            existing = Manifest.load(out)
        except DataError:
            if not force:  # `--force` rebuilds even a folder whose manifest no longer loads
                raise
            existing = None
        changed = [k for k in settings if existing is None or existing.build.get(k) != settings[k]]
        if not changed and not force:
            existing.check_tokenizer()
            log(f"data: {out} is up to date")
            return existing
        if not force:
            key = changed[0]
            raise DataError(f"config key 'data.{key}': {out} was built with {existing.build.get(key)!r}, this "
                            f"config has {settings[key]!r}; rebuild it with `workbench data CONFIG --force`, "
                            f"or set data.dir to another folder")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"config key 'data.dir': {out} exists and is not a workbench dataset (no {MANIFEST}); "
                        f"choose another folder")

    t0 = time.perf_counter()
    docs = load_documents(data.source or None, data.extensions, max_bytes=data.max_bytes)
    train, val = split_documents(docs, data.val_fraction)
    log(f"data: {len(docs)} documents ({sum(len(d.text) for d in docs):,} characters) from "
        f"{data.source or stdlib_root()}: {len(train)} train, {len(val)} validation")
    if data.tokenizer:
        tokenizer = Tokenizer.from_file(data.tokenizer)
    else:
        from data_pipelines.tokenizer import train_bpe

        log(f"data: training a byte-level BPE tokenizer of {data.vocab_size} tokens on the train split")
        tokenizer = train_bpe((d.text for d in train), data.vocab_size, show_progress=True)
    tokenizer.require_reserved()
    if getattr(data, "passkey_fraction", 0.0):  # after the tokenizer: it is the corpus's alone
        train, val = mix_passkeys(data, train, val, tokenizer, log)

    with building(out) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
        dtype = token_dtype(tokenizer.vocab_size)
        splits, counts = {}, np.zeros(tokenizer.vocab_size, dtype=np.int64)
        labels_val = []
        for name, split_docs in (("train", train), ("val", val)):
            shards, labels = write_split(tmp, name, split_docs, tokenizer, dtype, data.shard_bytes)
            splits[name] = shards
            if name == "train":
                for lab in labels:
                    counts += np.bincount(lab, minlength=tokenizer.vocab_size)
            else:
                labels_val = labels
        manifest = Manifest(root=out, build=settings, tokenizer_sha256=sha256_file(tmp / "tokenizer.json"),
                            vocab_size=tokenizer.vocab_size, dtype=dtype, splits=splits,
                            unigram_counts=counts.tolist())
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json()))  # last: its presence means complete
    baseline = unigram_loss(counts, np.concatenate(labels_val)) if labels_val else float("nan")
    tok = {n: manifest.tokens(n) for n in splits}
    log(f"data: wrote {out}: {len(splits['train'])} train shards ({tok['train']:,} tokens), "
        f"{len(splits['val'])} validation shards ({tok['val']:,} tokens), tokenizer of "
        f"{tokenizer.vocab_size} tokens; unigram baseline on the whole validation split {baseline:.3f} "
        f"nats/token; "
        f"{time.perf_counter() - t0:.1f}s")
    return manifest


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` to build into (`.NAME.building-PID`). When the block ends normally it
    replaces `out` (the previous folder steps aside as `.NAME.old-PID` and is deleted after the swap); on any
    exception, KeyboardInterrupt included, it is removed and the previous folder stays (put back if the swap
    itself failed). Shared by every dataset builder (`build_dataset`, `data_pipelines.vision_shards`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    tmp.mkdir()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        yield tmp
        if out.exists():
            out.rename(old)  # the previous dataset steps aside (put back below if the swap fails)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_tar(path: Path, samples: Iterable[tuple[str, Sequence[tuple[str, bytes]]]]) -> None:
    """A webdataset tar, byte-for-byte reproducible: for each (KEY, [(EXT, payload), ...]) the members KEY.EXT
    in the order given, USTAR format, mtime 0, mode 0644, no owner names."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))


def remove_stale_builds(out: Path) -> None:
    """Clean up after builds of `out` whose process is gone (killed mid-build): their unfinished folders are
    deleted, and a previous dataset left aside during the final swap is put back if `out` is missing."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = stale.name.rpartition("-")
        if not (kind.endswith((".building", ".old")) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)  # that process still runs: its build is not ours to touch
        except ProcessLookupError:
            if kind.endswith(".old") and not out.exists():
                stale.rename(out)
            else:
                shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def write_split(folder: Path, name: str, docs: list[Document], tokenizer: Tokenizer, dtype: str,
                shard_bytes: int) -> tuple[list[ShardInfo], list[np.ndarray]]:
    """Tokenize and write one split's shards; returns their manifest entries and each document's labels
    (its ids after the first, then eos: the tokens a model is asked to predict)."""
    shards: list[ShardInfo] = []
    labels: list[np.ndarray] = []
    current: list[tuple[str, Document, np.ndarray]] = []
    size = 0
    bar = tqdm(total=sum(len(d.text) for d in docs), desc=f"shards ({name})", unit="char", unit_scale=True,
               dynamic_ncols=True)

    def flush():
        nonlocal current, size
        if current:
            shards.append(write_shard(folder / f"{name}-{len(shards):06d}.tar", current, dtype))
        current, size = [], 0

    for start in range(0, len(docs), ENCODE_BATCH):
        batch = docs[start : start + ENCODE_BATCH]
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
            ids = np.asarray(ids, dtype=np.int64)
            key = f"{len(labels):08d}"  # the document's index in its split
            labels.append(np.append(ids[1:], tokenizer.eos_id))
            current.append((key, doc, ids))
            size += len(doc.text.encode("utf-8"))
            if size >= shard_bytes:
                flush()
            bar.update(len(doc.text))
    flush()
    bar.close()
    return shards, labels


def write_shard(path: Path, samples: list[tuple[str, Document, np.ndarray]], dtype: str) -> ShardInfo:
    """One webdataset tar, byte-for-byte reproducible; returns its manifest entry."""
    item = np.dtype(dtype).newbyteorder("<")
    members = []
    for key, doc, ids in samples:
        text = doc.text.encode("utf-8")
        meta = {"path": doc.path, "bytes": len(text), "tokens": len(ids)}
        members.append((key, [("ids", ids.astype(item).tobytes()), ("json", json.dumps(meta).encode()),
                              ("txt", text)]))
    write_tar(path, members)
    total_tokens = sum(len(ids) for _, _, ids in samples)
    total_bytes = sum(len(doc.text.encode("utf-8")) for _, doc, _ in samples)
    return ShardInfo(file=path.name, sha256=sha256_file(path), size=path.stat().st_size,
                     keys=[k for k, _, _ in samples], tokens=total_tokens, bytes=total_bytes)
