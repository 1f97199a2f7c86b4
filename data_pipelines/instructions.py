"""Instruction pairs mined from documented code in any source tree (default: the Python standard library).

Documented code is a free source of question/answer pairs whose answers are written by the code's
authors: a docstring's summary describes its function, a def line matches its docstring, a doctest's
expected output belongs to its source. Each pair is one chat record

    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}],
     "prompt": PROMPT, "answer": ANSWER, "kind": "docstring", "source": "json/decoder.py:332"}

(`workbench.data.chat.messages_of` reads it; "prompt"/"answer" repeat the turns for exact-match evals;
"source" is the file, relative to the tree, and the line of the def, the example or the definition).

Python files (parsed with `ast`; a file that does not parse is skipped and counted). Every function and
method (module level, or in a class at any depth) that has a docstring gives up to three kinds:

    docstring   user: the function's source with its docstring removed (decorators kept, dedented) and an
                instruction ("Write the first line of a docstring for this function.");
                assistant: the docstring's first line, its summary
    signature   user: where it lives ("In module json.decoder, class JSONDecoder:"), the docstring and
                "Write the def line of this function."; assistant: the def line exactly as written,
                without its indentation. Only defs whose header fits on one line (`def f(a, b=1):`).
    doctest     one per `>>>` example with an expected output: user: the module, the earlier examples of
                the same example block (consecutive `>>>` lines with their outputs: the state the example
                runs in), the example itself and "What does this print?"; assistant: the expected output
                as written in the docstring (examples marked `+SKIP` are left out)

Other files: a generic miner pairs a comment block that sits directly above a definition (no blank line
between) with that definition, in two kinds:

    comment     user: the definition (the header: up to the end of a Verilog port list, a C function's
                header lines, an XML start tag) and "Write the comment that documents this definition.";
                assistant: the comment block as written
    definition  user: the comment block and "Write the definition line this comment documents.";
                assistant: the definition's first line (for a C function the whole header, since C
                headers are often split after the return type)

    Verilog/SystemVerilog  .v .sv       `//` lines or a `/* */` block above `module|interface|package|
                                        program|class|function|task NAME`
    C/C++                  .c .h .cpp .cc .hpp   the same comments above a function definition: a header
                                        starting at column 0, with `(...)`, no `;`, followed by `{`
    ROS launch / XML       .launch .xml  a `<!-- -->` block above an element's start tag
Comments that are licence headers (mentioning copyright, licence or SPDX) are skipped. Nothing more clever
is attempted: macros, K&R declarations and templates spanning lines are missed, not misread.

Verilog modules besides (`data_pipelines.verilog` reads their headers: ANSI and non-ANSI ports, parameters),
each module with ports gives two more kinds, its header as the prompt:

    ports       user: "Verilog:\n" + the header (for non-ANSI modules with their port declarations) and "List the
                ports of this module ..."; assistant: one port per line, `input wire [7:0] data`
    instance    the same header and "Write an instantiation of this module ..."; assistant: the instantiation
                template (parameters at their defaults, every port connected by name)

Which miner reads a file goes by its extension (`miner_for`): Python, Verilog, the generic comment miner.

Design choices
    Lengths: a pair whose prompt is longer than `max_prompt_chars` or whose answer is longer than
    `max_answer_chars` is skipped (counted), so that records fit a 256-512 token window of a small byte-level
    BPE: code costs 1.5-3 characters per token there, and the defaults (800 + 200 characters) keep all but about
    one record in a thousand of the standard library's within 512 tokens of a 512-entry BPE. For an exact bound,
    give a tokenizer and `max_tokens`: records whose chat encoding (`workbench.data.chat.ChatTemplate`, bos,
    role and end tokens included) is longer are skipped.
    Held-out split by file (`split_records`): files taken in the order of a sha256 hash of their path go to
    validation until they hold `val_fraction` of the records, as `data_pipelines.shards.split_documents`
    does for documents, so no held-out pair comes from a file that was trained on; validation records
    whose prompt also occurs in training (the same code in two files) are dropped.
    Determinism: files are read in path order and pairs kept in source order; the seed only chooses the
    instruction's wording (one of a few, by a hash of seed, kind and source, so a pair's wording does not
    depend on which other pairs exist), the subsample of `max_per_kind` and the order of the written files
    (shuffled with the seed, since a trainer reading them in order would otherwise see one module at a time).

    python -m data_pipelines.instructions --source DIR --out DIR [--val-fraction 0.1] [--max-per-kind N]
        [--seed S] [--kinds docstring,signature,...] [--max-prompt-chars 800] [--max-answer-chars 200]
        [--tokenizer tokenizer.json --max-tokens 512]
writes OUT/train.jsonl and OUT/val.jsonl and prints the counts per kind and split.
"""

from __future__ import annotations

import argparse
import ast
import doctest
import hashlib
import inspect
import json
import random
import re
import textwrap
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from data_pipelines import verilog
from data_pipelines.corpus import Document, iter_documents, stdlib_root
from workbench.errors import DataError
from workbench.train.metrics import atomic_write_text

PY_KINDS = ("docstring", "signature", "doctest")
OTHER_KINDS = ("comment", "definition")
KINDS = PY_KINDS + OTHER_KINDS + verilog.KINDS

INSTRUCTIONS = {
    "docstring": ("Write the first line of a docstring for this function.",
                  "Summarize this function in one line, as the first line of its docstring would.",
                  "What would the first line of this function's docstring say?"),
    "signature": ("Write the def line of this function.",
                  "Write the `def` line of the function this docstring documents.",
                  "Which def line goes with this docstring? Write it."),
    "doctest": ("What does this print?",
                "What is the output of the last line?",
                "What does the last `>>>` line print?"),
    "comment": ("Write the comment that documents this definition.",
                "Write the comment block that goes above this definition."),
    "definition": ("Write the definition line this comment documents.",
                   "Which definition does this comment document? Write its first line."),
}

LANGUAGES = {".v": "Verilog", ".sv": "SystemVerilog", ".c": "C", ".h": "C", ".cpp": "C++", ".cc": "C++",
             ".hpp": "C++", ".launch": "ROS launch", ".xml": "XML"}
EXTENSIONS = (".py", *LANGUAGES)
LICENSE_RE = re.compile(r"copyright|licen[cs]e|spdx", re.IGNORECASE)
VERILOG_DEF_RE = re.compile(r"^\s*(?:(?:virtual|static|automatic|extern)\s+)*"
                            r"(module|macromodule|interface|package|program|class|function|task)\b\s*\S")
XML_TAG_RE = re.compile(r"^\s*<[A-Za-z_][\w:.-]*(\s|/?>|$)")
C_KEYWORDS = {"if", "else", "for", "while", "do", "switch", "case", "return", "goto", "typedef", "struct",
              "union", "enum", "sizeof", "default", "break", "continue", "extern", "namespace", "using",
              "template", "public", "private", "protected", "class"}


def stable_unit(text: str) -> float:
    """A uniform number in [0, 1) that depends only on `text` (sha256), the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def pick(options: Sequence[str], *key) -> str:
    """One of `options`, chosen by a hash of `key`: the choice for a record depends on nothing else."""
    return options[int(stable_unit("\x1f".join(map(str, key))) * len(options))]


def module_name(path: str) -> str:
    """The dotted module name of a relative path: json/decoder.py -> json.decoder, json/__init__.py -> json."""
    parts = path[: -len(".py")].split("/") if path.endswith(".py") else path.split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def record(prompt: str, answer: str, kind: str, source: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "prompt": prompt, "answer": answer, "kind": kind, "source": source, **extra}


# ---- Python ------------------------------------------------------------------------------------------------


def documented_functions(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, list[str]]]:
    """(def node, enclosing class names) of every function at module level or in a class (at any depth) whose
    body starts with a string literal, in source order."""

    def walk(body, classes):
        for node in body:
            if isinstance(node, ast.ClassDef):
                yield from walk(node.body, [*classes, node.name])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and docstring_node(node) is not None:
                yield node, classes

    yield from walk(tree.body, [])


def docstring_node(node) -> ast.Expr | None:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def summary_line(docstring: str) -> str:
    """The first line of a docstring, stripped (the summary, by PEP 257)."""
    lines = inspect.cleandoc(docstring).splitlines()
    return lines[0].strip() if lines else ""


def where(module: str, classes: Sequence[str]) -> str:
    return f"In module {module}" + (f", class {'.'.join(classes)}:" if classes else ":")


def source_without_docstring(lines: list[str], node, doc: ast.Expr) -> str | None:
    """The function's source (decorators included, dedented) with its docstring's lines removed, or None when
    the docstring shares a line with other code (a one-line def, `"doc"; x = 1`)."""
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    if doc.lineno <= node.lineno:  # def f(): "doc"
        return None
    before = lines[doc.lineno - 1][: doc.col_offset]
    after = lines[doc.end_lineno - 1][doc.end_col_offset :]
    if before.strip() or after.strip():
        return None
    body = lines[start - 1 : doc.lineno - 1]
    if len(node.body) == 1:  # the docstring was the whole body: keep the function a function
        body.append(" " * doc.col_offset + "...")
    body += lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("\n".join(body)).strip("\n")


def one_line_def(lines: list[str], node) -> str | None:
    """The def line as written (indentation removed) when the whole header is on that line, else None."""
    line = lines[node.lineno - 1].strip()
    if node.body[0].lineno <= node.lineno or not line.endswith(":"):
        return None
    if not (line.startswith("def ") or line.startswith("async def ")):
        return None
    try:
        ast.parse(line + "\n    pass\n")
    except SyntaxError:
        return None
    return line


def example_blocks(docstring: str) -> list[list[doctest.Example]]:
    """The docstring's `>>>` examples grouped into blocks of consecutive examples (no prose between)."""
    try:
        parts = doctest.DocTestParser().parse(docstring)
    except ValueError:  # inconsistent indentation and the like: the docstring is not a valid doctest
        return []
    blocks, current = [], []
    for part in parts:
        if isinstance(part, doctest.Example):
            current.append(part)
        elif part.strip() and current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def transcript(examples: Sequence[doctest.Example], with_last_want: bool = True) -> str:
    """Examples written back as an interactive session (`>>> `, `... ` continuation lines, outputs)."""
    out = []
    for i, ex in enumerate(examples):
        src = ex.source.rstrip("\n").split("\n")
        out += [">>> " + src[0]] + ["... " + s for s in src[1:]]
        if ex.want and (with_last_want or i < len(examples) - 1):
            out += ex.want.rstrip("\n").split("\n")
    return "\n".join(out)


def python_pairs(doc: Document, seed: int, kinds: Sequence[str], stats: Counter) -> list[dict]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes and the like in old files
            tree = ast.parse(doc.text, filename=doc.path)
    except (SyntaxError, ValueError):
        stats["unparsable_files"] += 1
        return []
    lines = doc.text.split("\n")
    module = module_name(doc.path)
    out = []
    for node, classes in documented_functions(tree):
        doc_node = docstring_node(node)
        raw = doc_node.value.value
        stats["documented_functions"] += 1
        if "docstring" in kinds:
            code, summary = source_without_docstring(lines, node, doc_node), summary_line(raw)
            if code and summary:
                prompt = f"{code}\n\n{pick(INSTRUCTIONS['docstring'], seed, 'docstring', doc.path, node.lineno)}"
                out.append(("docstring", prompt, summary, node.lineno))
        if "signature" in kinds:
            defline, cleaned = one_line_def(lines, node), inspect.cleandoc(raw).strip()
            if defline and cleaned:
                instruction = pick(INSTRUCTIONS["signature"], seed, "signature", doc.path, node.lineno)
                out.append(("signature", f"{where(module, classes)}\n{cleaned}\n\n{instruction}", defline,
                            node.lineno))
        if "doctest" in kinds:
            for block in example_blocks(raw):
                for i, ex in enumerate(block):
                    if not ex.want.strip() or ex.options.get(doctest.SKIP):
                        continue
                    line = doc_node.lineno + ex.lineno
                    instruction = pick(INSTRUCTIONS["doctest"], seed, "doctest", doc.path, line)
                    prompt = f"{where(module, classes)}\n{transcript(block[: i + 1], with_last_want=False)}\n\n{instruction}"
                    out.append(("doctest", prompt, ex.want.rstrip("\n"), line))
    return [record(p, a, k, f"{doc.path}:{line}") for k, p, a, line in out]


# ---- other languages: a comment block directly above a definition ------------------------------------------


def comment_above(lines: list[str], i: int, xml: bool) -> tuple[int, str] | None:
    """(first line index, text as written, dedented) of the comment block that ends on line i - 1, if any."""
    if i == 0:
        return None
    above = lines[i - 1].strip()
    if xml:
        if not above.endswith("-->"):
            return None
        start = i - 1
        while start >= 0 and "<!--" not in lines[start] and i - start < 40:
            start -= 1
    elif above.endswith("*/"):
        start = i - 1
        while start >= 0 and "/*" not in lines[start] and i - start < 40:
            start -= 1
    elif above.startswith("//"):
        start = i - 1
        while start > 0 and lines[start - 1].strip().startswith("//"):
            start -= 1
    else:
        return None
    if start < 0 or i - start >= 40 or not lines[start].lstrip().startswith(("/*", "//", "<!--")):
        return None
    text = textwrap.dedent("\n".join(lines[start:i])).strip("\n")
    return start, text


def c_header(lines: list[str], i: int) -> tuple[str, str] | None:
    """(header as written, header without a trailing `{`) of a C/C++ function definition starting on line i."""
    first = lines[i]
    if not first or not (first[0].isalpha() or first[0] == "_") or first.split()[0].strip("(*") in C_KEYWORDS:
        return None
    header = []
    for j in range(i, min(i + 6, len(lines))):
        header.append(lines[j].rstrip())
        if ";" in lines[j]:
            return None
        text = "\n".join(header)
        if "{" in lines[j] or (text.count("(") and text.count("(") == text.count(")")
                               and j + 1 < len(lines) and lines[j + 1].strip().startswith("{")):
            break
    else:
        return None
    text = "\n".join(header)
    if "(" not in text or text.count("(") != text.count(")") or "=" in text.split("(")[0]:
        return None
    head = text.split("{")[0].rstrip()
    if "{" in text and text.split("{", 1)[1].strip():
        return None  # a one-line body: `int f(void) { return 1; }` is not worth the trouble
    return head, head


def definition_at(lines: list[str], i: int, ext: str) -> tuple[str, str] | None:
    """(the definition's header snippet, its definition line) when a definition starts on line i."""
    line = lines[i]
    if ext in (".v", ".sv"):
        if not VERILOG_DEF_RE.match(line) or line.strip().startswith("end"):
            return None
        snippet = []
        for j in range(i, min(i + 15, len(lines))):
            snippet.append(lines[j].rstrip())
            if ";" in lines[j]:
                break
        return textwrap.dedent("\n".join(snippet)).strip("\n"), line.strip()
    if ext in (".launch", ".xml"):
        if not XML_TAG_RE.match(line):
            return None
        snippet = []
        for j in range(i, min(i + 8, len(lines))):
            snippet.append(lines[j].rstrip())
            if ">" in lines[j]:
                break
        return textwrap.dedent("\n".join(snippet)).strip("\n"), line.strip()
    return c_header(lines, i)


def comment_pairs(doc: Document, seed: int, kinds: Sequence[str], stats: Counter) -> list[dict]:
    ext = "." + doc.path.rsplit(".", 1)[-1]
    language = LANGUAGES[ext]
    lines = doc.text.split("\n")
    xml = ext in (".launch", ".xml")
    out = []
    for i in range(1, len(lines)):
        found = definition_at(lines, i, ext)
        if found is None:
            continue
        comment = comment_above(lines, i, xml)
        if comment is None:
            continue
        _, text = comment
        bare = re.sub(r"<!--|-->|/\*+|\*+/|^\s*\*|//+", " ", text, flags=re.MULTILINE)
        if len(bare.split()) < 2 or LICENSE_RE.search(bare):
            stats["comments_skipped"] += 1
            continue
        snippet, defline = found
        source = f"{doc.path}:{i + 1}"
        if "comment" in kinds:
            out.append(record(f"{language}:\n{snippet}\n\n{pick(INSTRUCTIONS['comment'], seed, 'comment', source)}",
                              text, "comment", source))
        if "definition" in kinds:
            instruction = pick(INSTRUCTIONS["definition"], seed, "definition", source)
            out.append(record(f"{language}:\n{text}\n\n{instruction}", defline, "definition", source))
    return out


def verilog_pairs(doc: Document, seed: int, kinds: Sequence[str], stats: Counter) -> list[dict]:
    """The comment/definition pairs of a Verilog file, and its modules' `ports` and `instance` pairs (read by
    `data_pipelines.verilog`; a module it cannot read is counted as `verilog_skipped_<reason>`)."""
    modules = verilog.parse_modules(doc.text, doc.path, stats) if set(kinds) & set(verilog.KINDS) else []
    return comment_pairs(doc, seed, kinds, stats) + verilog.instruction_records(modules, seed, kinds)


def miner_for(path: str):
    """The miner of a file, by its extension: (doc, seed, kinds, stats) -> records."""
    if path.endswith(".py"):
        return python_pairs
    if path.endswith(verilog.EXTENSIONS):
        return verilog_pairs
    return comment_pairs


# ---- the miner and the split ---------------------------------------------------------------------------------


def source_key(rec: dict) -> tuple[str, int, int]:
    """(file, line, kind index): the order records are kept in."""
    path, _, line = rec["source"].rpartition(":")
    return path, int(line) if line.isdigit() else 0, KINDS.index(rec["kind"]) if rec["kind"] in KINDS else 99


def mine_instructions(source: str | Path | None = None, *, seed: int = 0, kinds: Sequence[str] = KINDS,
                      max_per_kind: int | None = None, max_prompt_chars: int = 800, max_answer_chars: int = 200,
                      max_tokens: int | None = None, tokenizer=None, include: Sequence[str] | None = None,
                      progress: bool = True, stats: dict | None = None) -> list[dict]:
    """Instruction records (see the module notes) mined from every file of the tree `source` (default: the
    standard library) with a known extension, in source order.

    `include`: glob patterns of relative paths to mine (all files when None), e.g. ["json/*", "textwrap.py"].
    `max_tokens` with `tokenizer` (a `workbench.data.tokenizer.Tokenizer` with the reserved tokens): skip
    records whose chat encoding has more tokens.
    `stats`, when given a dict, is filled with counts: files read per language, files that did not parse,
    documented functions, pairs skipped for length, pairs per kind before and after `max_per_kind`.
    Raises DataError for a missing tree, unknown kinds or bad limits, and when the tree gives no pair."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise DataError(f"instructions: unknown kind(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(KINDS)})")
    for name, value in (("max_prompt_chars", max_prompt_chars), ("max_answer_chars", max_answer_chars),
                        ("max_per_kind", max_per_kind), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"instructions: {name} must be a positive integer, got {value!r}")
    if (max_tokens is None) != (tokenizer is None):
        raise DataError("instructions: max_tokens and tokenizer go together (the tokens are counted with it)")
    template = None
    if tokenizer is not None:
        from workbench.data.chat import ChatTemplate

        template = ChatTemplate(tokenizer)
    root = stdlib_root() if source is None else Path(source)
    counts: Counter = Counter(dict.fromkeys(["python_files", "unparsable_files", "documented_functions",
                                             "other_files", "comments_skipped"], 0))
    counts.update({f"{what}_{k}": 0 for what in ("too_long", "pairs") for k in kinds})
    counts["too_many_tokens"] = 0
    docs = iter_documents(root, EXTENSIONS)
    if include is not None:
        from fnmatch import fnmatch

        docs = (d for d in docs if any(fnmatch(d.path, pattern) for pattern in include))
    records = []
    for doc in tqdm(docs, desc="mining instructions", unit=" files", disable=not progress, dynamic_ncols=True):
        counts["python_files" if doc.path.endswith(".py") else "other_files"] += 1
        found = miner_for(doc.path)(doc, seed, kinds, counts)
        for rec in found:
            if len(rec["prompt"]) > max_prompt_chars or len(rec["answer"]) > max_answer_chars:
                counts[f"too_long_{rec['kind']}"] += 1
            elif template is not None and len(template.encode(rec["messages"]).ids) > max_tokens:
                counts["too_many_tokens"] += 1
            else:
                records.append(rec)
    by_kind = Counter(r["kind"] for r in records)
    counts.update({f"pairs_{k}": n for k, n in by_kind.items()})
    if max_per_kind is not None:
        rng = random.Random(seed)
        kept = []
        for kind in KINDS:
            group = [r for r in records if r["kind"] == kind]
            kept += group if len(group) <= max_per_kind else rng.sample(group, max_per_kind)
        records = sorted(kept, key=source_key)
    if stats is not None:
        stats.update(counts)
    if not records:
        raise DataError(f"instructions: no pair found under {root} (kinds {', '.join(kinds)}; "
                        f"{counts['python_files']} Python files, {counts['unparsable_files']} unparsable, "
                        f"{counts['other_files']} other files)")
    return records


def file_of(rec: dict) -> str:
    """The file a record was mined from: its "source" without the line."""
    source = rec.get("source")
    if not isinstance(source, str) or not source:
        raise DataError(f"record {str(rec)[:80]}...: needs a 'source' field (\"path:LINE\") to be split by file")
    return source.rpartition(":")[0] or source


def split_by_file(records: Sequence[dict], val_fraction: float) -> tuple[list[dict], list[dict], int]:
    """(train, val, val records dropped because their prompt is a train prompt); see `split_records`."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(records), [], 0
    files = Counter(file_of(r) for r in records)
    if len(files) < 2:
        raise DataError(f"the records come from {len(files)} file(s): at least 2 are needed to hold out whole "
                        f"files (or use a val fraction of 0)")
    ranked = sorted(files, key=stable_unit)
    target, held, val_files = val_fraction * len(records), 0, set()
    for path in ranked[:-1]:  # at least one file is left to train on
        val_files.add(path)
        held += files[path]
        if held >= target:
            break
    train = [r for r in records if file_of(r) not in val_files]
    seen = {r.get("prompt") for r in train}
    val = [r for r in records if file_of(r) in val_files and r.get("prompt") not in seen]
    return train, val, held - len(val)


def split_records(records: Sequence[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val): whole files, taken in the order of their path's sha256, go to validation until they hold
    `val_fraction` of the records (at least one file each side); validation records whose prompt is also a
    training prompt are dropped. Order within each split is the input order."""
    train, val, _ = split_by_file(records, val_fraction)
    return train, val


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One JSON object per line, written whole or not at all (PATH.tmp renamed over PATH)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def count_table(splits: dict[str, Sequence[dict]], kinds: Sequence[str]) -> str:
    """A plain-text table of record counts per kind (rows) and split (columns)."""
    names = list(splits)
    rows = [["kind", *names]] + [[k, *(str(sum(r["kind"] == k for r in splits[n])) for n in names)] for k in kinds]
    rows.append(["total", *(str(len(splits[n])) for n in names)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.instructions", description=__doc__.split("\n")[0])
    p.add_argument("--source", default=None, help="the source tree (default: the Python standard library)")
    p.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the records held out, by file")
    p.add_argument("--max-per-kind", type=int, default=None, help="keep at most N pairs of each kind (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    p.add_argument("--max-prompt-chars", type=int, default=800)
    p.add_argument("--max-answer-chars", type=int, default=200)
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to count tokens with (with --max-tokens)")
    p.add_argument("--max-tokens", type=int, default=None, help="skip records longer than this in chat tokens")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    stats: dict = {}
    kinds = [k for k in args.kinds.split(",") if k]
    try:
        tokenizer = None
        if args.tokenizer is not None:
            from workbench.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_file(args.tokenizer)
        records = mine_instructions(args.source, seed=args.seed, kinds=kinds, max_per_kind=args.max_per_kind,
                                    max_prompt_chars=args.max_prompt_chars, max_answer_chars=args.max_answer_chars,
                                    max_tokens=args.max_tokens, tokenizer=tokenizer, stats=stats)
        train, val, dropped = split_by_file(records, args.val_fraction)
    except DataError as e:
        p.error(str(e))
    out = Path(args.out)
    for name, split in (("train", train), ("val", val)):
        shuffled = list(split)
        random.Random(f"{args.seed}-{name}").shuffle(shuffled)
        write_jsonl(out / f"{name}.jsonl", shuffled)
    print(f"{stats['python_files']} Python files ({stats['unparsable_files']} did not parse, "
          f"{stats['documented_functions']} documented functions), {stats['other_files']} other files; "
          f"skipped as too long: " + (", ".join(f"{k} {stats[f'too_long_{k}']}" for k in kinds))
          + (f"; over {args.max_tokens} tokens: {stats['too_many_tokens']}" if args.max_tokens else ""))
    print(count_table({"train": train, "val": val}, kinds))
    if dropped:
        print(f"{dropped} val records dropped: their prompt is also a train prompt")
    print(f"-> {out / 'train.jsonl'}, {out / 'val.jsonl'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
