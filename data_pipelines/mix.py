"""Mix jsonl files of examples into one, in a seeded order: several data makers' outputs as one training file.

    python -m data_pipelines.mix --out data/post/sft/train.jsonl A/train.jsonl B/train.jsonl:2000 C/sft.jsonl*4

`FILE:N` takes the first N records of FILE, `FILE*K` every record K times (a small set weighted up). Records are
copied as they are (every maker's records carry a `kind`, so the mix can still be scored per kind), then shuffled
with the seed: a trainer that reads a file in order would otherwise see one maker's records at a time. The counts
per input and the total are printed. Every line must be a JSON object; an error names the file and the line.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from data_pipelines.instructions import write_jsonl
from workbench.data.examples import jsonl_records
from workbench.errors import DataError


def _suffix(spec: str, sep: str) -> tuple[str, int | None]:
    """(what comes before `sep`, the number after it) when `spec` ends with `sep` and digits, else (spec, None)."""
    head, _, tail = spec.rpartition(sep)
    return (head, int(tail)) if head and tail.isdigit() else (spec, None)


def read_records(spec: str) -> list[dict]:
    """The records of `FILE`, the first N of `FILE:N`, or each K times for `FILE*K` (`FILE:N*K` both)."""
    spec, k = _suffix(spec, "*")
    path, n = _suffix(spec, ":")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    records = [rec for _, rec in jsonl_records(p)]
    return (records[:n] if n is not None else records) * (1 if k is None else k)


def mix(specs: list[str], out: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the records of every spec to `out` in a seeded random order; returns the count per spec."""
    counts, records = {}, []
    for spec in specs:
        got = read_records(spec)
        counts[spec] = len(got)
        records += got
    random.Random(seed).shuffle(records)
    write_jsonl(Path(out), records)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.mix", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="FILE[:N]")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        counts = mix(args.inputs, args.out, args.seed)
    except DataError as e:
        print(f"error: {e}")
        return 2
    for spec, n in counts.items():
        print(f"{n:7d}  {spec}")
    print(f"{sum(counts.values()):7d}  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
