"""`workbench diagrams OUT`: the diagram dataset as webdataset shards with a manifest, a Verilog tree and a PDF.

    OUT/manifest.json         {"format": "workbench-vision/1",
                               "settings": {"kinds", "counts": {"train", "val", "test"}, "size", "seed", "version"},
                               "splits": {"train"|"val"|"test": [{"file", "sha256", "size", "samples", "keys"}]},
                               "verilog": {"dir", "split", "files"}, "documents": {"file", "sha256", "pages",
                               "index"},
                               "stats": {"kinds", "answers", "blind"}}
    OUT/{split}-{k:05d}.tar   SAMPLES_PER_SHARD samples each: KEY.png (size x size RGB) and KEY.json
                              ({"id", "kind", "caption", "qa", ...the structure}; see data_pipelines.diagrams)
    OUT/verilog/NAME.v        every *training* circuit's gate-level netlist, one module per file: a Verilog
                              source tree for the expert-chatbot recipe (launch/expert_teacher.sh OUT/verilog);
                              held-out circuits are left out, since a netlist answers their questions
    OUT/documents.pdf         pages that show a diagram of the held-out split with a paragraph on how to read
                              it (`diagram_render.paragraph`: nothing a question asks)
    OUT/documents.json        per page (1-based, as `--page K` counts): the sample's id, kind, the page's
                              text, and the answer key (caption and qa)

Samples. Sample g (train first, then val, then test, so ids are unique across splits) has kind
`kinds[g % len(kinds)]`, id `KIND_{g:05d}` (also its tar key and, for a circuit, its module name) and its own
`random.Random(f"{seed}/{g}")`: the same settings give the same samples, shards and sha256s. A val or test sample
whose picture equals one of an earlier split (`diagrams.signature`: same structure and layout) is drawn again,
so no held-out picture was trained on. Layouts are jittered, so this rarely happens and does not make held-out
circuits larger than training ones (the manifest's stats count circuits by size per split).

Every circuit's netlist is evaluated from its text (`diagrams.netlist_truth_table`) and compared with the
simulated structure before anything is written; a difference is a bug and stops the build.

Builds share `data_pipelines.shards`' helpers (`building`, `write_tar`, `remove_stale_builds`): the folder is
written under a temporary name and renamed into place, so an interrupted build leaves the previous dataset or
nothing; tars are byte-for-byte reproducible; a folder built with the same settings is reused, and rebuilt
when only the dataset VERSION differs (older makers); one built with other settings is an error naming the
setting (by its flag) unless `force` is given.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from data_pipelines import diagrams
from data_pipelines.diagram_render import document_page, layout_circuit, paragraph, render, write_pdf
from data_pipelines.shards import building, remove_stale_builds, write_tar
from workbench.checkpoint.run import sha256_file
from workbench.errors import DataError

VERSION = 3  # bump when the makers change what a seed gives: folders built before are then rebuilt
SAMPLES_PER_SHARD = 256
MIN_SIZE, MAX_SIZE = 32, 1024
PAGES_PER_KIND = 2
RETRIES = 100  # redraws of a held-out sample whose picture is in an earlier split
# how a changed setting is named in the rebuild error: by the flags of `workbench diagrams` (and build's keywords)
SETTING_NAMES = {"kinds": "--kinds (kinds)", "counts": "--train/--val/--test (n_train/n_val/n_test)",
                 "size": "--size (size)", "seed": "--seed (seed)", "version": "the dataset version"}


def settings_of(*, n_train: int, n_val: int, n_test: int, size: int, seed: int, kinds: Sequence[str]) -> dict:
    """The settings that decide the content, checked; a bad one is a DataError naming it."""
    for name, value, least in (("n_train", n_train, 1), ("n_val", n_val, 0), ("n_test", n_test, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"diagrams: {name} must be an integer >= {least}, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"diagrams: size must be an integer number of pixels in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"diagrams: seed must be an integer, got {seed!r}")
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in diagrams.KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise DataError(f"diagrams: kinds must be distinct names among {', '.join(diagrams.KINDS)}, got "
                        f"{', '.join(kinds) or '(none)'}")
    return {"kinds": kinds, "counts": {"train": n_train, "val": n_val, "test": n_test}, "size": size, "seed": seed,
            "version": VERSION}


def make_samples(settings: dict) -> tuple[dict[str, list[dict]], int]:
    """({split: sample JSONs}, held-out samples that had to keep a picture of an earlier split)."""
    kinds, seed = settings["kinds"], settings["seed"]
    splits: dict[str, list[dict]] = {}
    seen: set[str] = set()
    g = kept_duplicates = 0
    for split in ("train", "val", "test"):
        samples, mine = [], set()
        for _ in range(settings["counts"][split]):
            kind = kinds[g % len(kinds)]
            rng = random.Random(f"{seed}/{g}")
            for _ in range(RETRIES + 1):
                sample = diagrams.make_sample(kind, rng, f"{kind}_{g:05d}", layout=layout_circuit)
                if split == "train" or diagrams.signature(sample) not in seen:
                    break
            else:
                kept_duplicates += 1
            mine.add(diagrams.signature(sample))
            samples.append(sample)
            g += 1
        seen |= mine
        splits[split] = samples
    return splits, kept_duplicates


def check_circuit(sample: dict) -> None:
    """The netlist text must compute what the structure does; a difference is a bug of this module."""
    if diagrams.netlist_truth_table(sample["netlist"]) != diagrams.truth_table(sample):
        raise RuntimeError(f"{sample['id']}: its netlist does not compute its circuit's truth table")


def write_shard(path: Path, items: list[tuple[str, bytes, bytes]]) -> dict:
    """One webdataset tar of (key, png, json) written deterministically (`shards.write_tar`); returns its
    manifest entry."""
    write_tar(path, [(key, [("png", png), ("json", meta)]) for key, png, meta in items])
    return {"file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size, "samples": len(items),
            "keys": [k for k, _, _ in items]}


def png_bytes(sample: dict, size: int) -> bytes:
    buf = io.BytesIO()
    render(sample, size).save(buf, "PNG")
    return buf.getvalue()


def statistics(splits: dict[str, list[dict]]) -> dict:
    """Kinds per split, circuit sizes per split, answer statistics per question type over all splits, and the
    blind guesser's accuracy (trained on train) on val and test."""
    every = [s for samples in splits.values() for s in samples]
    stats = {"kinds": {n: dict(Counter(s["kind"] for s in ss)) for n, ss in splits.items()},
             "circuit_gates": {n: dict(sorted(Counter(str(len(s["gates"])) for s in ss if s["kind"] == "circuit")
                                              .items())) for n, ss in splits.items()},
             "answers": diagrams.answer_stats(every),
             "blind": {n: diagrams.blind_accuracy(splits["train"], splits[n]) for n in ("val", "test") if splits[n]}}
    return stats


def build(out: str | Path, *, n_train: int, n_val: int, n_test: int, size: int, seed: int = 0,
          kinds: Sequence[str] = diagrams.KINDS, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build (or find up to date) the dataset folder `out` (see the module notes); returns its path."""
    out = Path(out)
    settings = settings_of(n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed, kinds=kinds)
    remove_stale_builds(out)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        from workbench.data.vision import load_vision_manifest

        try:
            existing = load_vision_manifest(out)["settings"]
        except DataError:
            if not force:  # `force` rebuilds even a folder whose manifest no longer loads
                raise
            existing = {}
        changed = [k for k in settings if existing.get(k) != settings[k]]
        if not changed and not force:
            log(f"diagrams: {out} is up to date")
            return out
        if changed == ["version"]:  # the same request, made by older makers: rebuild it with these
            log(f"diagrams: {out} was built by dataset version {existing.get('version')!r}; rebuilding it with "
                f"version {VERSION}")
        elif changed and not force:
            key = changed[0]
            raise DataError(f"diagrams: {SETTING_NAMES[key]}: {out} was built with {existing.get(key)!r}, this "
                            f"build asks for {settings[key]!r}; rebuild it with --force, or choose another folder")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"diagrams: {out} exists and is not a vision dataset (no manifest.json); choose another "
                        f"folder")

    t0 = time.perf_counter()
    splits, kept_duplicates = make_samples(settings)
    for samples in splits.values():
        for s in samples:
            if s["kind"] == "circuit":
                check_circuit(s)
    with building(out) as tmp:
        shard_lists = {}
        for name, samples in splits.items():
            shards = []
            for k, start in enumerate(range(0, len(samples), SAMPLES_PER_SHARD)):
                items = [(s["id"], png_bytes(s, size), json.dumps(s, sort_keys=True).encode())
                         for s in samples[start : start + SAMPLES_PER_SHARD]]
                shards.append(write_shard(tmp / f"{name}-{k:05d}.tar", items))
            shard_lists[name] = shards
        (tmp / "verilog").mkdir()
        circuits = [s for s in splits["train"] if s["kind"] == "circuit"]  # held-out netlists would give answers
        for s in circuits:
            (tmp / "verilog" / f"{s['name']}.v").write_text(s["netlist"])
        held_out = next((splits[n] for n in ("test", "val", "train") if splits[n]), [])
        chosen = [s for kind in settings["kinds"] for s in [x for x in held_out if x["kind"] == kind][:PAGES_PER_KIND]]
        write_pdf(tmp / "documents.pdf", [document_page(s, i + 1) for i, s in enumerate(chosen)])
        index = [{"page": i + 1, "id": s["id"], "kind": s["kind"], "text": paragraph(s), "caption": s["caption"],
                  "qa": s["qa"]} for i, s in enumerate(chosen)]
        (tmp / "documents.json").write_text(json.dumps(index, indent=1) + "\n")
        from workbench.data.vision import FORMAT

        manifest = {"format": FORMAT, "settings": settings, "splits": shard_lists,
                    "verilog": {"dir": "verilog", "split": "train", "files": len(circuits)},
                    "documents": {"file": "documents.pdf", "sha256": sha256_file(tmp / "documents.pdf"),
                                  "pages": len(chosen), "index": "documents.json"},
                    "stats": {**statistics(splits), "held_out_duplicates": kept_duplicates}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # last: it means complete
    log(summary(manifest, out) + f"\ndiagrams: built in {time.perf_counter() - t0:.1f}s")
    return out


def summary(manifest: dict, out: Path) -> str:
    """A few lines: samples per split and kind, files, and per question type the answer spread and the blind
    guesser's test accuracy."""
    st = manifest["stats"]
    lines = [f"diagrams: wrote {out} ({manifest['settings']['size']} px, seed {manifest['settings']['seed']})"]
    for name, shards in manifest["splits"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in st["kinds"][name].items())
        lines.append(f"  {name:5s} {sum(s['samples'] for s in shards):6d} samples in {len(shards)} shard(s)"
                     + (f": {kinds}" if kinds else ""))
    lines.append(f"  verilog/: {manifest['verilog']['files']} netlists; documents.pdf: "
                 f"{manifest['documents']['pages']} pages (index in documents.json)")
    blind = st["blind"].get("test") or st["blind"].get("val") or {}
    lines.append(f"  {'question type':14s} {'questions':>9s} {'answers':>7s} {'top answer':>18s} {'blind acc':>9s}")
    for t, a in st["answers"].items():
        top = f"{a['top'][:10]} {a['top_share']:.0%}"
        lines.append(f"  {t:14s} {a['n']:9d} {a['distinct']:7d} {top:>18s} "
                     f"{format(blind[t], '.3f') if t in blind else '-':>9s}")
    return "\n".join(lines)
