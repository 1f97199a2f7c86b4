"""A text corpus read from a source tree, by default the running Python's standard library.

The standard library is a corpus every machine already has: a few tens of megabytes of code and
prose, enough to train a tokenizer and a small model with no download. Any other tree of source and
text files (an HDL project, a ROS workspace, documentation) works the same way.

Design choices:

- Deterministic: files are yielded in the sorted order of their paths relative to the root, so the
  same tree always gives the same corpus, and so the same tokenizer and the same shards.
- Lossless where possible, never failing: files are read as bytes and decoded as UTF-8 with
  `errors="replace"`, because a few files (even in the standard library) are not valid UTF-8.
- Only what a model should read: files are chosen by extension, whitespace-only files are skipped,
  directories named in `exclude_dirs` (installed packages, caches, VCS data) are not entered, and
  symlinked directories are not followed, so nothing is read twice or from outside the root.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import DataError

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".py",
    ".v",
    ".sv",
    ".vhd",
    ".md",
    ".txt",
    ".c",
    ".cpp",
    ".h",
    ".launch",
    ".xml",
)
DEFAULT_EXCLUDE_DIRS: tuple[str, ...] = ("site-packages", "__pycache__", ".git", "node_modules")


@dataclass(frozen=True)
class Document:
    """One file of the corpus: its path relative to the root (POSIX separators) and its text."""

    path: str
    text: str


def stdlib_root() -> Path:
    """The folder holding the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_documents(
    root: str | Path | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    *,
    max_bytes: int | None = None,
    exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS,
) -> Iterator[Document]:
    """Yield the non-blank files under `root` whose names end with one of `extensions`, sorted by path.

    `root` defaults to `stdlib_root()`. With `max_bytes`, iteration stops as soon as the documents
    yielded hold at least `max_bytes` bytes in all (counted as file sizes): the document that
    crosses the limit is still yielded whole, so a corpus is never cut mid-file. A missing root or
    a bad `max_bytes` raises `DataError` here, before the first document is read.
    """
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"corpus path {root} {state}")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"corpus max_bytes must be positive, got {max_bytes}")
    suffixes = (extensions,) if isinstance(extensions, str) else tuple(extensions)
    return _read_documents(_find_files(root, suffixes, set(exclude_dirs)), max_bytes)


def load_documents(
    root: str | Path | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    *,
    max_bytes: int | None = None,
    exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS,
) -> list[Document]:
    """`iter_documents` as a list; raises `DataError` if the tree has no matching non-blank file."""
    documents = list(iter_documents(root, extensions, max_bytes=max_bytes, exclude_dirs=exclude_dirs))
    if not documents:
        shown = stdlib_root() if root is None else root
        wanted = ", ".join((extensions,) if isinstance(extensions, str) else extensions)
        raise DataError(f"corpus path {shown}: no files with extensions {wanted} found")
    return documents


def _find_files(root: Path, suffixes: tuple[str, ...], exclude_dirs: set[str]) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every matching regular file under `root`, sorted by relative path."""
    found = []
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [name for name in dirnames if name not in exclude_dirs]
        for name in filenames:
            path = Path(folder, name)
            if name.endswith(suffixes) and path.is_file():  # is_file() drops broken symlinks, sockets
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def _read_documents(files: list[tuple[str, Path]], max_bytes: int | None) -> Iterator[Document]:
    """Read `files` in order, skipping blank ones, until `max_bytes` have been yielded."""
    total = 0
    for relative, path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"corpus file {path}: cannot be read ({e.strerror or e})") from e
        text = data.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        yield Document(relative, text)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return


def passkey_documents(n_chars: int, filler: Sequence[int], digits: int = 5, seed: int = 0,
                      prefix: str = "passkey", min_documents: int = 2) -> list[Document]:
    """Synthetic passkey documents (`data_pipelines.long_context.passkey_document`: filler sentences, a
    key at a uniform depth, the question and the answer) holding at least `n_chars` characters in all, and
    at least `min_documents` of them (2: one for each split).

    Each has a uniform number of filler sentences in [filler[0], filler[1]], and the path
    `{prefix}/{index:08d}.txt`; the same arguments give the same documents (one `random.Random(seed)`).
    """
    import random

    from data_pipelines.long_context import passkey_document

    rng, docs, total = random.Random(seed), [], 0
    while total < n_chars or len(docs) < min_documents:
        text = passkey_document(rng, rng.randint(filler[0], filler[1]), digits=digits)
        docs.append(Document(f"{prefix}/{len(docs):08d}.txt", text))
        total += len(text)
    return docs


def interleave(a: list[Document], b: list[Document]) -> list[Document]:
    """`a` and `b` merged so that both advance through their text at the same pace: at every point of
    the result, the share of `a`'s characters written is the share of `b`'s (to within one document).
    Each keeps its own order. Shards are cut in this order, so a mixture stays a mixture in every shard."""
    size_a, size_b = max(1, sum(len(d.text) for d in a)), max(1, sum(len(d.text) for d in b))
    out, i, j, done_a, done_b = [], 0, 0, 0, 0
    while i < len(a) or j < len(b):
        # take from the list that is behind: compare (chars written)/(total) of each
        if j >= len(b) or (i < len(a) and done_a / size_a <= done_b / size_b):
            out.append(a[i])
            done_a += len(a[i].text)
            i += 1
        else:
            out.append(b[j])
            done_b += len(b[j].text)
            j += 1
    return out
