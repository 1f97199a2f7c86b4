"""The sharded data pipeline: `data_pipelines.shards` (build) and `workbench.data.shards` (read).

One small synthetic source tree is built once per module (a BPE of 320 tokens, ~8 train shards); tests that
damage a dataset work on a copy. Covers reliability.md "Data pipeline": D1/D2 (resume equals an
uninterrupted stream, across epoch boundaries, shuffled), D3 (every damaged shard is a counted, logged drop,
or a DataError with strict), D4 (two ranks read each window of an epoch exactly once; world 2 -> 1 resume).
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import math
import os
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

import data_pipelines.shards as build_mod
from data_pipelines.shards import build_dataset
from workbench.data.cursor import DataCursor
from workbench.data.shards import MANIFEST, Manifest, ShardStream, read_shard, unigram_loss
from workbench.data.tokenizer import Tokenizer
from workbench.errors import DataError
from workbench.job import DataSection

T = 16  # seq_len of every stream here
VOCAB = 320
SHARD_BYTES = 2500
N_FILES = 40
WORDS = ("def class return import self value index token shard window epoch stream data model layer "
         "for while if else lambda yield None True False").split()


def quiet(*_):
    pass


def section(out: Path, source: Path, **kw) -> DataSection:
    settings = dict(dir=str(out), source=str(source), vocab_size=VOCAB, shard_bytes=SHARD_BYTES,
                    val_fraction=0.15, seq_len=T)
    settings.update(kw)
    return DataSection(**settings)


def write_source(root: Path, n_files: int, seed: int = 0) -> None:
    """Varied generated text: .py and .md files of 2..60 lines, in sub-folders, with multi-byte characters."""
    rng = random.Random(seed)
    for i in range(n_files):
        ext = ".md" if i % 4 == 0 else ".py"
        lines = [f"# file {i}: {'é✓' if i % 2 else '日本🙂'}"]
        for _ in range(rng.choice([2, 5, 10, 25, 60])):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
            lines.append(f"{words} = {rng.randint(0, 10**6)}  # {rng.random():.5f}")
        path = root / f"pkg{i % 5}" / f"m{i:02d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: (content, mtime_ns), by relative path."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    """(member name, payload) in file order, read with plain tarfile (independently of the code under test)."""
    with tarfile.open(path, "r") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))


def rewrite_manifest_entry(root: Path, file: str) -> None:
    """Make the manifest's sha256/size of `file` match the (damaged) file, so only later checks can catch it."""
    raw = json.loads((root / MANIFEST).read_text())
    data = (root / file).read_bytes()
    for shards in raw["splits"].values():
        for s in shards:
            if s["file"] == file:
                s["sha256"], s["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (root / MANIFEST).write_text(json.dumps(raw))


def stream_tokens(windows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows overlap by one token: the stream (tokens, doc_ids) they were cut from."""
    if not windows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    tokens = [windows[0]["tokens"]] + [w["tokens"][1:] for w in windows[1:]]
    docs = [windows[0]["doc_ids"]] + [w["doc_ids"][1:] for w in windows[1:]]
    return np.concatenate(tokens), np.concatenate(docs)


def window_id(w: dict) -> bytes:
    return w["tokens"].tobytes() + b"|" + w["doc_ids"].tobytes()


def serve(stream: ShardStream, indices) -> list[dict]:
    return [{k: v.copy() for k, v in stream.sample(g).items()} for g in indices]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert np.array_equal(x["tokens"], y["tokens"]), f"window {i}: tokens differ"
        assert np.array_equal(x["doc_ids"], y["doc_ids"]), f"window {i}: doc_ids differ"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    write_source(root, N_FILES)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, source) -> Path:
    out = tmp_path_factory.mktemp("built") / "ds"
    build_dataset(section(out, source), log=quiet)
    return out


@pytest.fixture(scope="module")
def tok(built) -> Tokenizer:
    return Tokenizer.from_file(built / "tokenizer.json")


@pytest.fixture(scope="module")
def docs(built) -> dict[str, list[dict]]:
    """Per split, every document in manifest order, read from the tars with plain tarfile."""
    raw = json.loads((built / MANIFEST).read_text())
    out = {}
    for split, shards in raw["splits"].items():
        out[split] = []
        for s in shards:
            members = dict(read_tar(built / s["file"]))
            for key in s["keys"]:
                meta = json.loads(members[f"{key}.json"])
                out[split].append({"key": key, "file": s["file"], "path": meta["path"], "meta": meta,
                                   "text": members[f"{key}.txt"].decode("utf-8"),
                                   "ids": np.frombuffer(members[f"{key}.ids"], "<u2").astype(np.int64)})
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(built, dst)
    return dst


def epoch_windows_count(manifest: Manifest, split: str = "train") -> int:
    return (manifest.tokens(split) + manifest.documents(split) - 1) // T


# ---------------------------------------------------------------------------------------------- 1. build


def test_manifest_lists_every_shard_with_checksums_keys_and_counts(built, source, docs, tok):
    manifest = Manifest.load(built)
    assert manifest.dtype == "uint16" and manifest.vocab_size == tok.vocab_size == VOCAB
    assert len(manifest.splits["train"]) >= 4 and len(manifest.splits["val"]) >= 1
    listed = {s.file for shards in manifest.splits.values() for s in shards}
    assert {p.name for p in built.iterdir()} == listed | {MANIFEST, "tokenizer.json"}  # nothing else
    assert manifest.tokenizer_sha256 == hashlib.sha256((built / "tokenizer.json").read_bytes()).hexdigest()
    for split, shards in manifest.splits.items():
        assert [s.file for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        for s in shards:
            data = (built / s.file).read_bytes()
            assert s.sha256 == hashlib.sha256(data).hexdigest() and s.size == len(data)
            names = [name for name, _ in read_tar(built / s.file)]
            assert names == [f"{k}.{ext}" for k in s.keys for ext in ("ids", "json", "txt")]  # adjacent
            mine = [d for d in docs[split] if d["file"] == s.file]
            assert s.tokens == sum(len(d["ids"]) for d in mine)
            assert s.bytes == sum(len(d["text"].encode()) for d in mine)
            for d in mine:
                assert d["meta"] == {"path": d["path"], "bytes": len(d["text"].encode()), "tokens": len(d["ids"])}
        # keys are the document's index in its split, in path order
        assert [d["key"] for d in docs[split]] == [f"{i:08d}" for i in range(len(docs[split]))]
        assert [d["path"] for d in docs[split]] == sorted(d["path"] for d in docs[split])
    # the unigram counts are the train labels: each document's ids after the first, then eos
    counts = np.zeros(VOCAB, np.int64)
    for d in docs["train"]:
        counts += np.bincount(np.append(d["ids"][1:], tok.eos_id), minlength=VOCAB)
    assert manifest.unigram_counts == counts.tolist()
    assert manifest.build["source"] == str(source.resolve()) and manifest.build["shard_bytes"] == SHARD_BYTES


def test_train_and_val_split_the_documents(source, docs):
    train = {d["path"] for d in docs["train"]}
    val = {d["path"] for d in docs["val"]}
    assert train and val and not train & val
    files = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    assert len(files) == N_FILES and train | val == files
    for d in docs["train"] + docs["val"]:
        assert d["text"] == (source / d["path"]).read_text(encoding="utf-8")
    val_chars = sum(len(d["text"]) for d in docs["val"])
    assert val_chars >= 0.15 * sum(len(d["text"]) for d in docs["train"] + docs["val"])  # held until >= fraction


def test_ids_decode_to_the_text_and_token_bytes_sum_to_its_length(docs, tok):
    token_bytes = np.asarray(tok.token_bytes())
    assert any("é" in d["text"] or "🙂" in d["text"] for d in docs["train"])  # multi-byte text is in play
    for d in docs["train"] + docs["val"]:
        assert d["ids"][0] == tok.bos_id and tok.eos_id not in d["ids"]
        assert tok.decode(d["ids"]) == d["text"]
        assert int(token_bytes[d["ids"]].sum()) == len(d["text"].encode("utf-8"))


def test_build_is_deterministic(built, source, tmp_path):
    again = tmp_path / "again"
    build_dataset(section(again, source), log=quiet)
    a, b = snapshot(built), snapshot(again)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], f"{name} differs between two builds"


def test_rebuilding_the_same_config_is_a_no_op(copy, source):
    before = snapshot(copy)
    logs = []
    m = build_dataset(section(copy, source), log=logs.append)
    assert any("up to date" in line for line in logs)
    # seq_len, shuffle_windows and strict are read-time settings: not a different dataset
    build_dataset(section(copy, source, seq_len=7, shuffle_windows=3, strict=True), log=quiet)
    assert snapshot(copy) == before
    assert m.splits == Manifest.load(copy).splits


@pytest.mark.parametrize("key,value", [("shard_bytes", 999), ("val_fraction", 0.3), ("vocab_size", 300),
                                       ("max_bytes", 10_000), ("extensions", [".py"])])
def test_a_changed_setting_needs_force(copy, source, key, value):
    before = snapshot(copy)
    with pytest.raises(DataError, match=rf"'data\.{key}'.*--force"):
        build_dataset(section(copy, source, **{key: value}), log=quiet)
    assert snapshot(copy) == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ds"]


def test_force_rebuilds_in_place(copy, source):
    old = Manifest.load(copy)
    m = build_dataset(section(copy, source, shard_bytes=6000), force=True, log=quiet)
    assert m.build["shard_bytes"] == 6000 and Manifest.load(copy).build["shard_bytes"] == 6000
    assert len(m.splits["train"]) < len(old.splits["train"])
    assert m.documents("train") == old.documents("train") and m.tokens("train") == old.tokens("train")
    assert {p.name for p in copy.iterdir()} == {s.file for sh in m.splits.values() for s in sh} | {
        MANIFEST, "tokenizer.json"}  # the old shards are gone
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ds"]  # no temp or old folder left


def test_data_dir_that_is_not_a_dataset_is_refused(tmp_path, source):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(DataError, match=r"'data\.dir'.*no manifest\.json"):
        build_dataset(section(out, source), log=quiet)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_one_document_is_refused(tmp_path):
    src = tmp_path / "src"
    write_source(src, 1)
    with pytest.raises(DataError, match="1 document"):
        build_dataset(section(tmp_path / "out", src), log=quiet)
    assert not (tmp_path / "out").exists()


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(section(tmp_path / "out", tmp_path / "nowhere"), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def failing_after_first_shard(monkeypatch):
    real, calls = build_mod.write_shard, []

    def write_shard(path, samples, dtype):
        calls.append(path.name)
        if len(calls) > 1:
            raise OSError("disk full (injected)")
        return real(path, samples, dtype)

    monkeypatch.setattr(build_mod, "write_shard", write_shard)
    return calls


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, source, monkeypatch):
    calls = failing_after_first_shard(monkeypatch)
    parent = tmp_path / "parent"
    with pytest.raises(OSError, match="injected"):
        build_dataset(section(parent / "ds", source), log=quiet)
    assert calls == ["train-000000.tar", "train-000001.tar"]  # it did fail mid-split
    assert list(parent.iterdir()) == []  # neither ds nor .ds.building-*


def test_a_failed_forced_rebuild_keeps_the_previous_dataset(copy, source, monkeypatch):
    before = snapshot(copy)
    failing_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        build_dataset(section(copy, source, shard_bytes=6000), force=True, log=quiet)
    assert snapshot(copy) == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ds"]


# ---------------------------------------------------------------------------------------------- 2. webdataset


def test_webdataset_reads_the_shards(built):
    wds = pytest.importorskip("webdataset")
    manifest = Manifest.load(built)
    for split in ("train", "val"):
        shards = manifest.splits[split]
        samples = list(wds.WebDataset([str(built / s.file) for s in shards], shardshuffle=False))
        assert [s["__key__"] for s in samples] == [k for s in shards for k in s.keys]
        ours = [ids for s in shards for _, ids in read_shard(built, s, manifest.dtype, VOCAB).documents]
        assert len(ours) == len(samples)
        for sample, ids in zip(samples, ours):
            assert sample["ids"] == ids.astype("<u2").tobytes()
            assert json.loads(sample["json"])["tokens"] == len(ids)


# ---------------------------------------------------------------------------------------------- 3. order


def test_unshuffled_stream_is_the_documents_in_manifest_order(built, docs, tok):
    logs = []
    stream = ShardStream(built, "train", T, eos_id=tok.eos_id, shuffle=False, log=logs.append)
    expected = np.concatenate([np.append(d["ids"], tok.eos_id) for d in docs["train"]])
    ordinals = np.concatenate([np.full(len(d["ids"]) + 1, i) for i, d in enumerate(docs["train"])])
    W = (len(expected) - 1) // T
    windows = stream.windows()
    assert len(windows) == W == epoch_windows_count(stream.manifest)
    assert all(len(w["tokens"]) == len(w["doc_ids"]) == T + 1 for w in windows)
    tokens, doc_ids = stream_tokens(windows)
    assert np.array_equal(tokens, expected[: W * T + 1])
    assert np.array_equal(doc_ids, ordinals[: W * T + 1])
    # sample(g) serves the same windows; past the end, epoch 1 starts over in the same (unshuffled) order
    assert_same(serve(stream, range(W + 3)), windows + windows[:3])
    assert stream.epochs == [{"epoch": 0, "delivered": len(docs["train"]), "dropped": 0,
                              "manifest": len(docs["train"]), "windows": W}]
    assert not any("dropped (" in line for line in logs)
    assert any("epoch 0 done" in line for line in logs)


def check_doc_ids(tokens: np.ndarray, doc_ids: np.ndarray, eos: int) -> None:
    """The document ordinal steps by one exactly after each eos, and nowhere else."""
    steps = np.diff(doc_ids)
    assert set(np.unique(steps).tolist()) <= {0, 1}
    assert np.array_equal(steps == 1, tokens[:-1] == eos)


def split_at_eos(tokens: np.ndarray, eos: int) -> tuple[list[bytes], np.ndarray]:
    """Complete documents (ids + eos, as bytes) and the trailing partial one."""
    ends = np.flatnonzero(tokens == eos)
    out, start = [], 0
    for e in ends:
        out.append(tokens[start : e + 1].tobytes())
        start = e + 1
    return out, tokens[start:]


def test_shuffled_epochs_permute_the_documents(built, docs, tok):
    eos = tok.eos_id
    where = {np.append(d["ids"], eos).tobytes(): (d["file"], d["key"]) for d in docs["train"]}
    all_docs = set(where)
    assert len(all_docs) == len(docs["train"])
    stream = ShardStream(built, "train", T, eos_id=eos, seed=3, shuffle_windows=1, log=quiet)
    W = epoch_windows_count(stream.manifest)
    n_tokens = stream.manifest.tokens("train") + len(docs["train"])
    orders, shard_orders = [], []
    for epoch in range(3):
        windows = serve(stream, range(epoch * W, (epoch + 1) * W))
        tokens, doc_ids = stream_tokens(windows)
        check_doc_ids(tokens, doc_ids, eos)
        assert doc_ids[0] == 0
        complete, partial = split_at_eos(tokens, eos)
        assert len(set(complete)) == len(complete) and set(complete) <= all_docs
        missing = [np.frombuffer(d, np.int64) for d in all_docs - set(complete)]
        # the documents not seen whole are those overlapping the unused tail (< T tokens) of the epoch
        assert sum(len(m) for m in missing) == len(partial) + n_tokens - len(tokens)
        assert n_tokens - len(tokens) < T
        assert any(np.array_equal(m[: len(partial)], partial) for m in missing) or not len(partial)
        orders.append(complete)
        # shards in a shuffled order, each read whole, its documents shuffled too
        files = [file for file, _ in itertools.groupby(where[d][0] for d in complete)]
        assert len(files) == len(set(files)) >= len(stream.shards) - 1
        shard_orders.append(files)
        keys = {f: [where[d][1] for d in complete if where[d][0] == f] for f in files}
        assert any(k != sorted(k) for k in keys.values()), f"epoch {epoch}: no shard's documents were shuffled"
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert shard_orders[0] != shard_orders[1] and shard_orders[1] != shard_orders[2]
    assert [e["windows"] for e in stream.epochs] == [W, W]  # epoch 2 not finished yet
    assert all(e["delivered"] == e["manifest"] == len(docs["train"]) for e in stream.epochs)


def test_block_shuffle_permutes_windows_within_the_epoch(built, tok):
    plain = ShardStream(built, "train", T, eos_id=tok.eos_id, seed=5, shuffle_windows=1, log=quiet)
    blocks = ShardStream(built, "train", T, eos_id=tok.eos_id, seed=5, shuffle_windows=8, log=quiet)
    W = epoch_windows_count(plain.manifest)
    for epoch in range(2):
        g = range(epoch * W, (epoch + 1) * W)
        a, b = serve(plain, g), serve(blocks, g)
        ids_a, ids_b = [window_id(w) for w in a], [window_id(w) for w in b]
        assert collections.Counter(ids_a) == collections.Counter(ids_b)  # same windows
        assert ids_a != ids_b  # in another order
        perms = set()
        for start in range(0, W, 8):  # ... but only within blocks of 8, each block its own way
            assert sorted(ids_a[start : start + 8]) == sorted(ids_b[start : start + 8])
            if start + 8 <= W:
                perms.add(tuple(ids_a[start : start + 8].index(w) for w in ids_b[start : start + 8]))
        assert len(perms) > W // 8 // 2
        check_doc_ids(*stream_tokens(a), tok.eos_id)


def test_same_seed_same_order_other_seed_other_order(built, tok):
    def first(seed, n=200):
        return serve(ShardStream(built, "train", T, eos_id=tok.eos_id, seed=seed, shuffle_windows=4,
                                 log=quiet), range(n))

    a, b, c = first(1), first(1), first(2)
    assert_same(a, b)
    assert [window_id(w) for w in a] != [window_id(w) for w in c]


# ---------------------------------------------------------------------------------------------- 4. D1/D2 resume


@pytest.mark.parametrize("shuffle,shuffle_windows", [(False, 1), (True, 1), (True, 7)])
def test_resume_serves_what_an_uninterrupted_stream_serves(built, tok, shuffle, shuffle_windows):
    def make():
        return ShardStream(built, "train", T, eos_id=tok.eos_id, seed=11, shuffle=shuffle,
                           shuffle_windows=shuffle_windows, log=quiet)

    W = epoch_windows_count(Manifest.load(built))
    N = 25
    points = [0, 1, 10, W - 5, W - 1, W, W + 1, W + W // 2, 2 * W - 3]  # W - 5 and 2W - 3: N crosses a boundary
    reference = serve(make(), range(max(points) + N))
    for k in points:
        before = make()
        served = serve(before, range(k))
        assert_same(served, reference[:k])
        state = json.loads(json.dumps(before.state_dict()))  # it goes into a checkpoint
        after = make()
        after.load_state_dict(state)
        resumed = serve(after, range(k, k + N))
        assert_same(resumed, reference[k : k + N])
        if k + N > W > k or k + N > 2 * W > k:
            assert after.epochs and after.epochs[-1]["delivered"] == after.epochs[-1]["manifest"]


def test_resume_does_not_reread_finished_shards(built, tok, monkeypatch):
    import workbench.data.shards as reader

    def make():
        return ShardStream(built, "train", T, eos_id=tok.eos_id, seed=11, shuffle_windows=7, log=quiet)

    W = epoch_windows_count(Manifest.load(built))
    k = W - 30  # late in epoch 0: most shards are finished
    before = make()
    reference = serve(before, range(k + W))  # also runs through the end of epoch 1
    first = make()
    serve(first, range(k))
    state = first.state_dict()
    assert len(state["done"]) >= len(first.shards) - 2
    reads = []
    real = reader.read_shard
    monkeypatch.setattr(reader, "read_shard",
                        lambda root, info, *a: reads.append((after.epoch, info.file)) or real(root, info, *a))
    after = make()
    after.load_state_dict(state)
    assert_same(serve(after, range(k, k + W)), reference[k:])
    assert after.epochs[0] == before.epochs[0]  # the accounting of the interrupted epoch is whole
    epoch0 = [file for epoch, file in reads if epoch == 0]
    assert 1 <= len(epoch0) < len(first.shards) // 2, epoch0  # only the shards not finished before the save


# ---------------------------------------------------------------------------------------------- 5. D4 ranks


def test_two_ranks_read_each_window_of_an_epoch_exactly_once(built, tok):
    def make():
        return ShardStream(built, "train", T, eos_id=tok.eos_id, seed=4, shuffle_windows=8, log=quiet)

    W = epoch_windows_count(Manifest.load(built))
    reference = [window_id(w) for w in serve(make(), range(W))]
    assert len(set(reference)) == W  # windows are distinguishable, so the counts below mean something
    cursors, streams, got = [DataCursor(), DataCursor()], [make(), make()], [[], []]
    while cursors[0].position < W:
        for rank in (0, 1):
            for g in cursors[rank].take(4, rank, 2):
                if g < W:
                    got[rank].append(window_id(streams[rank].sample(g)))
    assert cursors[0].position == cursors[1].position
    assert not set(got[0]) & set(got[1])
    assert collections.Counter(got[0] + got[1]) == collections.Counter(reference)


def test_save_at_two_ranks_resume_at_one(built, tok):
    def make():
        return ShardStream(built, "train", T, eos_id=tok.eos_id, seed=4, shuffle_windows=8, log=quiet)

    W = epoch_windows_count(Manifest.load(built))
    total = W + W // 2
    reference = [window_id(w) for w in serve(make(), range(total))]
    for stop in (40, W - 4, W + 8):  # mid epoch; the last world-2 block crossing the epoch end; epoch 1
        cursors, streams, served = [DataCursor(), DataCursor()], [make(), make()], []
        while cursors[0].position < stop:
            for rank in (0, 1):
                for g in cursors[rank].take(4, rank, 2):
                    served.append((g, window_id(streams[rank].sample(g))))
        saved = json.loads(json.dumps({"cursor": cursors[0].state_dict(), "data": streams[0].state_dict()}))
        cursor, stream = DataCursor(), make()
        cursor.load_state_dict(saved["cursor"])
        stream.load_state_dict(saved["data"])
        while cursor.position < total:
            for g in cursor.take(4, 0, 1):
                if g < total:
                    served.append((g, window_id(stream.sample(g))))
        indices = sorted(g for g, _ in served)
        assert indices == list(range(total)), f"stop {stop}: repeated or skipped samples"
        assert [w for _, w in sorted(served)] == reference


# ---------------------------------------------------------------------------------------------- 6. D3 drops


def corrupt_header_checksum(path: Path, member: int) -> None:
    """Break the checksum of the header of member `member` (0-based); tarfile then stops silently there."""
    with tarfile.open(path, "r") as tar:
        offset = tar.getmembers()[member].offset
    data = bytearray(path.read_bytes())
    data[offset + 148 : offset + 156] = b"0000000\x00"
    path.write_bytes(bytes(data))
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r|") as tar:  # the premise: no error, fewer files
        assert len(list(tar)) == member


def damage(kind: str, root: Path, file: str, keys: list[str]) -> tuple[list[str], str]:
    """Damage `root/file`; returns the keys lost and a fragment of the logged reason."""
    path = root / file
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return keys, "sha256 mismatch (truncated"
    if kind == "bit_flip":
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(flipped))
        return keys, "sha256 mismatch (corrupt"
    if kind == "deleted":
        path.unlink()
        return keys, "cannot be read"
    members = read_tar(path)
    if kind == "bad_second_header":
        corrupt_header_checksum(path, 1)
        rewrite_manifest_entry(root, file)
        return keys, "dropped"
    if kind == "bad_header_of_second_sample":
        corrupt_header_checksum(path, 3)
        rewrite_manifest_entry(root, file)
        return keys[1:], "the tar ended early"
    if kind == "ids_length":
        name = f"{keys[1]}.ids"
        write_tar(path, [(n, p[:-2] if n == name else p) for n, p in members])  # one token short of .json
        rewrite_manifest_entry(root, file)
        return [keys[1]], "malformed"
    if kind == "keys_not_adjacent":
        a, b = keys[-2], keys[-1]
        head = [m for m in members if not m[0].startswith((a, b))]
        of = {k: [m for m in members if m[0].startswith(k)] for k in (a, b)}
        write_tar(path, head + of[a][:1] + of[b] + of[a][1:])  # a.ids, b.*, a.json, a.txt
        rewrite_manifest_entry(root, file)
        return [a], "not adjacent"
    raise AssertionError(kind)


KINDS = ["truncated", "bit_flip", "deleted", "bad_second_header", "bad_header_of_second_sample", "ids_length",
         "keys_not_adjacent"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_shard_is_a_counted_logged_drop(copy, docs, tok, kind):
    manifest = Manifest.load(copy)
    target = next(s for s in manifest.splits["train"][1:] if len(s.keys) >= 3)
    lost, reason = damage(kind, copy, target.file, target.keys)
    n_docs = len(docs["train"])

    # unshuffled: the stream is exactly the other documents, in order
    stream = ShardStream(copy, "train", T, eos_id=tok.eos_id, shuffle=False, log=quiet)
    kept = [np.append(d["ids"], tok.eos_id) for d in docs["train"] if not (d["file"] == target.file
                                                                            and d["key"] in lost)]
    expected = np.concatenate(kept)
    tokens, _ = stream_tokens(stream.windows())
    assert np.array_equal(tokens, expected[: len(tokens)]) and len(expected) - len(tokens) < T

    # shuffled, two full epochs: every epoch accounts for every document and logs the drop again
    logs = []
    stream = ShardStream(copy, "train", T, eos_id=tok.eos_id, seed=2, shuffle_windows=4, log=logs.append)
    g = 0
    while len(stream.epochs) < 2:
        stream.sample(g)
        g += 1
    for epoch in (0, 1):
        record = stream.epochs[epoch]
        assert record["manifest"] == n_docs
        assert record["dropped"] == len(lost) and record["delivered"] == n_docs - len(lost)
        drops = [line for line in logs if f"epoch {epoch})" in line and target.file in line]
        assert len(drops) == 1, logs
        assert reason in drops[0] and f"{len(lost)} of {len(target.keys)} documents dropped" in drops[0]
        assert lost[0] in drops[0]
    assert not any("dropped (" in line and target.file not in line for line in logs)  # nothing else

    strict = ShardStream(copy, "train", T, eos_id=tok.eos_id, shuffle=False, strict=True, log=quiet)
    with pytest.raises(DataError, match=rf"shard {target.file}: .*strict"):
        for g in range(len(expected)):
            strict.sample(g)


# ---------------------------------------------------------------------------------------------- 7. manifest


def edit(field_path: str, value=None, delete=False):
    def apply(raw):
        *parents, last = field_path.split(".")
        obj = raw
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        last = int(last) if isinstance(obj, list) else last
        if delete:
            del obj[last]
        else:
            obj[last] = value
    return apply


@pytest.mark.parametrize("change,message", [
    (edit("format", "workbench-shards/2"), "field 'format'"),
    (edit("format", delete=True), "field 'format'"),
    (edit("dtype", "float32"), "field 'dtype' is 'float32'"),
    (edit("dtype", delete=True), "missing field 'dtype'"),
    (edit("splits.train.0.sha256", delete=True), r"missing field 'splits\.train\[0\]\.sha256'"),
    (edit("splits.val", delete=True), r"missing field 'splits\.val'"),
    (edit("splits.train.0.size", "12"), r"field 'splits\.train\[0\]\.size' should be int"),
    (edit("splits.train.0.tokens", True), r"field 'splits\.train\[0\]\.tokens' should be int"),
    (edit("splits.train.0.file", "../x.tar"), r"field 'splits\.train\[0\]\.file' must be a file name"),
    (edit("splits.train.1.file", "sub/train-000001.tar"), r"field 'splits\.train\[1\]\.file' must be a file"),
    (edit("splits.val", []), "split 'val' has no shards"),
    (edit("tokenizer.vocab_size", delete=True), r"missing field 'tokenizer\.vocab_size'"),
    (edit("unigram_counts", [1, 2, 3]), "field 'unigram_counts' has 3 entries, expected 320"),
    (edit("build", delete=True), "missing field 'build'"),
])
def test_manifest_errors_name_the_field(copy, change, message):
    raw = json.loads((copy / MANIFEST).read_text())
    change(raw)
    (copy / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message) as err:
        Manifest.load(copy)
    assert str(copy / MANIFEST) in str(err.value)


def test_manifest_file_errors(copy, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Manifest.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no manifest.json"):
        Manifest.load(empty)
    (copy / MANIFEST).write_text('{"format": "workbench-shards/1", ')
    with pytest.raises(DataError, match=f"{copy / MANIFEST}: not valid JSON"):
        Manifest.load(copy)
    (copy / MANIFEST).write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="not valid JSON"):
        Manifest.load(copy)
    (copy / MANIFEST).write_text("[1, 2]")  # valid JSON, not an object
    with pytest.raises(DataError, match=f"{copy / MANIFEST}: expected a JSON object"):
        Manifest.load(copy)


def test_a_replaced_tokenizer_is_caught(copy, source):
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"<|eos|>"', '"<|EOS|>"'))
    with pytest.raises(DataError, match="tokenizer.json: sha256 differs"):
        Manifest.load(copy).check_tokenizer()
    with pytest.raises(DataError, match="sha256 differs"):
        build_dataset(section(copy, source), log=quiet)


# ---------------------------------------------------------------------------------------------- 8. unigram


def test_unigram_loss():
    V = 50
    labels = np.random.default_rng(0).integers(0, V, 1000)
    assert unigram_loss(np.full(V, 9), labels) == pytest.approx(math.log(V))
    assert unigram_loss(np.zeros(V), labels) == pytest.approx(math.log(V))  # add-one smoothing: finite
    peaked = np.ones(V, np.int64)
    peaked[7] = 10_000
    on_peak = np.full(100, 7)
    assert unigram_loss(peaked, on_peak) < 0.05 < math.log(V)
    assert unigram_loss(peaked, labels) > math.log(V)  # the wrong guess costs more than uniform
    # exact: -mean log((c + 1) / sum(c + 1))
    counts = np.array([3, 0, 1])
    assert unigram_loss(counts, np.array([0, 2])) == pytest.approx(-(math.log(4 / 7) + math.log(2 / 7)) / 2)
    assert math.isnan(unigram_loss(counts, np.array([], np.int64)))



def test_resuming_on_a_rebuilt_dataset_is_refused(copy, tok):
    stream = ShardStream(copy, "train", 16, eos_id=tok.eos_id, log=quiet)
    serve(stream, range(5))
    state = json.loads(json.dumps(stream.state_dict()))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"][0]["sha256"] = "0" * 64  # another build of the folder
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="train shards are not the ones this run was reading"):
        ShardStream(copy, "train", 16, eos_id=tok.eos_id, log=quiet).load_state_dict(state)


def test_force_rebuilds_a_folder_whose_manifest_no_longer_loads(copy, source):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        build_dataset(section(copy, source), log=quiet)
    assert Manifest.load(build_dataset(section(copy, source), force=True, log=quiet).root).documents("train") > 0


def test_a_build_killed_during_the_swap_gets_its_previous_dataset_back(copy, source):
    dead = 2**22 + 12345  # a pid no process has
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    before = snapshot(copy)
    aside = copy.parent / f".{copy.name}.old-{dead}"
    copy.rename(aside)  # killed between moving the old dataset aside and renaming the new one in
    (copy.parent / f".{copy.name}.building-{dead}").mkdir()
    assert build_dataset(section(copy, source), log=quiet).root == copy  # up to date: the old one, put back
    assert snapshot(copy) == before
    assert not list(copy.parent.glob(f".{copy.name}.*"))
