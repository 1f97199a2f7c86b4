"""The measured part of a recipe's document: what the report scripts of launch/ share.

A recipe (launch/post_training.sh, launch/rl.sh) ends by running its report script (`report_main`: the options, the
sections in order, the rewrite), which rewrites only the text
between two markers of its document, `<!-- measured:begin (SCRIPT) -->` and `<!-- measured:end -->`, from the run
folders; the hand-written rest is kept. Here: reading a run's eval results, formatting numbers, naming the machine,
the table of stage wall times, and the rewrite itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

END = "<!-- measured:end -->"


def begin_marker(script: str) -> str:
    return f"<!-- measured:begin ({script}) -->"


def eval_results(run: Path, folder: str) -> dict:
    """The tasks of RUN/evals/FOLDER/results.json (`workbench eval --out`), or {} when it was not run."""
    path = run / "evals" / folder / "results.json"
    return json.loads(path.read_text())["tasks"] if path.is_file() else {}


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}"


def times_table(times: Path | None, recipe: str, note: str = "") -> list[str]:
    """The stages' wall times recorded by launch/lib.sh's `stage` (NAME<TAB>SECONDS lines), as a table."""
    if times is None or not times.is_file():
        return []
    rows = [line.split("\t") for line in times.read_text().splitlines() if "\t" in line]
    head = f"Each stage's seconds on the run of `{recipe}` that did its work" + (f"; {note}" if note else ".")
    return ["### Wall times", "", head, "", "| stage | seconds |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]


def write_measured(doc: Path, body: list[str], script: str) -> None:
    """Replace the text between the document's markers for `script` with `body` (appended, markers and all, to
    a document without them)."""
    begin = begin_marker(script)
    text = doc.read_text() if doc.is_file() else ""
    block = "\n".join([begin, *body, END])
    if begin in text and END in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def report_main(argv: list[str] | None, description: str, doc: str, script: str, recipe: str,
                sections: Callable[[Path, Path, str, list[str], Path | None], list[list[str]]]) -> int:
    """A report script's command line: --runs, --doc, --images, --times, --seeds; `sections(runs, images, rel,
    seeds, times)` gives the measured sections in order (`rel`: the plot folder as the document links it)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", default="runs")
    p.add_argument("--doc", default=doc)
    p.add_argument("--images", default="docs/images")
    p.add_argument("--times", default=None)
    p.add_argument("--seeds", default="0 1 2")
    args = p.parse_args(argv)
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(images, Path(args.doc).parent)
    body = [f"Measured on {time.strftime('%Y-%m-%d')}, {machine()}, by `{recipe}`.", ""]
    for section in sections(Path(args.runs), images, rel, args.seeds.split(), Path(args.times) if args.times else None):
        if section:
            body += section + [""]
    write_measured(Path(args.doc), body, script)
    print(f"wrote {args.doc}")
    return 0
