"""Tests for reading a text corpus from a source tree."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from data_pipelines.corpus import DEFAULT_EXTENSIONS, Document, iter_documents, load_documents, stdlib_root
from workbench.errors import DataError


def write(root: Path, relative: str, content: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write(root, "b.py", "print('b')\n")
    write(root, "a.py", "print('a')\n")
    write(root, "a/x.py", "x = 1\n")
    write(root, "a-b/y.md", "# y\n")
    write(root, "a/deeper/z.v", "module z; endmodule\n")
    write(root, "README.txt", "readme\n")
    write(root, "notes.rst", "not an allowed extension\n")
    write(root, "blank.py", "  \n\t\n")
    write(root, "empty.c", "")
    write(root, "__pycache__/a.cpython-311.py", "cached\n")
    write(root, "pkg/site-packages/dep.py", "installed\n")
    write(root, "pkg/.git/hook.py", "git\n")
    write(root, "web/node_modules/lib.md", "module\n")
    return root


EXPECTED = ["README.txt", "a-b/y.md", "a.py", "a/deeper/z.v", "a/x.py", "b.py"]


def test_documents_sorted_with_relative_posix_paths(tree: Path) -> None:
    docs = list(iter_documents(tree))
    assert [d.path for d in docs] == EXPECTED == sorted(EXPECTED)
    assert docs[3] == Document("a/deeper/z.v", "module z; endmodule\n")
    assert all(isinstance(d.path, str) and "\\" not in d.path and not d.path.startswith("/") for d in docs)


def test_order_is_deterministic_and_independent_of_creation_order(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for relative in reversed(EXPECTED):
        write(other, relative, (tree / relative).read_text())
    assert load_documents(tree) == load_documents(tree) == load_documents(other)


def test_blank_and_empty_files_are_skipped(tree: Path) -> None:
    paths = {d.path for d in iter_documents(tree)}
    assert "blank.py" not in paths and "empty.c" not in paths


def test_invalid_utf8_is_decoded_with_replacement(tmp_path: Path) -> None:
    write(tmp_path, "bad.txt", b"\xff\xfe bad")
    write(tmp_path, "good.txt", "caf\u00e9 \U0001f600")
    docs = load_documents(tmp_path)
    assert docs == [Document("bad.txt", "\ufffd\ufffd bad"), Document("good.txt", "caf\u00e9 \U0001f600")]


def test_extension_filter(tree: Path) -> None:
    assert [d.path for d in iter_documents(tree, (".py",))] == ["a.py", "a/x.py", "b.py"]
    assert [d.path for d in iter_documents(tree, (".rst", ".v"))] == ["a/deeper/z.v", "notes.rst"]
    assert [d.path for d in iter_documents(tree, ".md")] == ["a-b/y.md"]  # a bare string is one extension
    assert ".rst" not in DEFAULT_EXTENSIONS


def test_excluded_dirs(tree: Path) -> None:
    everything = [d.path for d in iter_documents(tree, exclude_dirs=())]
    hidden = {
        "__pycache__/a.cpython-311.py",
        "pkg/site-packages/dep.py",
        "pkg/.git/hook.py",
        "web/node_modules/lib.md",
    }
    assert hidden <= set(everything)
    assert not hidden & {d.path for d in iter_documents(tree)}
    assert [d.path for d in iter_documents(tree, exclude_dirs=("a", "__pycache__", "pkg", "web"))] == [
        "README.txt",
        "a-b/y.md",
        "a.py",
        "b.py",
    ]


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_symlinked_directories_are_not_followed(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.py", "outside the root\n")
    (tree / "link").symlink_to(outside, target_is_directory=True)
    (tree / "broken.py").symlink_to(tmp_path / "missing.py")
    assert [d.path for d in iter_documents(tree)] == EXPECTED


def test_max_bytes_stops_after_the_crossing_document(tmp_path: Path) -> None:
    for i in range(5):
        write(tmp_path, f"{i}.txt", "x" * 10)
    assert [d.path for d in iter_documents(tmp_path, max_bytes=25)] == ["0.txt", "1.txt", "2.txt"]
    assert [d.path for d in iter_documents(tmp_path, max_bytes=20)] == ["0.txt", "1.txt"]
    assert [d.path for d in iter_documents(tmp_path, max_bytes=1)] == ["0.txt"]
    assert len(load_documents(tmp_path, max_bytes=10**9)) == 5
    with pytest.raises(DataError, match="max_bytes must be positive, got 0"):
        iter_documents(tmp_path, max_bytes=0)


def test_stdlib_is_the_default_root() -> None:
    root = stdlib_root()
    assert (root / "json" / "__init__.py").is_file()
    paths = [d.path for d in iter_documents()]
    assert paths == sorted(paths)
    assert any(p.endswith("json/__init__.py") for p in paths)
    assert "json/__init__.py" in paths
    assert not any("site-packages/" in p or "__pycache__/" in p for p in paths)
    assert [d.path for d in iter_documents(max_bytes=1)] == paths[:1]


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(f"corpus path {missing} does not exist")):
        iter_documents(missing)  # raised eagerly, before iteration
    with pytest.raises(DataError, match=re.escape(f"corpus path {missing} does not exist")):
        load_documents(missing)
    write(tmp_path, "file.py", "x\n")
    with pytest.raises(DataError, match=re.escape(f"corpus path {tmp_path / 'file.py'} is not a directory")):
        load_documents(tmp_path / "file.py")


def test_empty_tree_is_a_data_error(tmp_path: Path) -> None:
    write(tmp_path, "only.rst", "text\n")
    write(tmp_path, "blank.py", "\n")
    message = f"corpus path {tmp_path}: no files with extensions {', '.join(DEFAULT_EXTENSIONS)} found"
    with pytest.raises(DataError, match=re.escape(message)):
        load_documents(tmp_path)
    with pytest.raises(
        DataError, match=re.escape(f"corpus path {tmp_path}: no files with extensions .md found")
    ):
        load_documents(tmp_path, (".md",))
    assert list(iter_documents(tmp_path)) == []
