"""Architecture rules written as tests (the rules listed in docs/architecture.md).

- Nothing under workbench/models or workbench/nn imports torch.distributed or deepspeed: model code is
  single-device and parallelism is applied from outside.
- Scripts (benchmarks/, and launch/ once it exists) never import each other, and the library never imports a script.
- Nothing outside tests loads with `weights_only=False` or unpickles.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("launch", "benchmarks")
LIBRARY_DIRS = ("workbench", "evals", "data_pipelines")


def imported_modules(source: str) -> set[str]:
    """Every module a file imports, fully qualified (`from a import b` yields a and a.b)."""
    mods = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            mods.add("." * node.level + (node.module or ""))
    return mods


def distributed_uses(source: str) -> list[str]:
    bad = [m for m in imported_modules(source)
           if m == "deepspeed" or m.startswith("deepspeed.") or m.startswith("torch.distributed")]
    bad += re.findall(r"torch\.distributed\b", source)  # attribute use without an import of its own
    return bad


def py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))]


def test_checker_catches_each_form():
    for src in ("import torch.distributed as dist", "from torch.distributed import all_reduce",
                "from torch.distributed.tensor import DTensor", "import deepspeed",
                "from deepspeed.runtime import zero", "import torch\nx = torch.distributed.get_rank()"):
        assert distributed_uses(src), src
    assert not distributed_uses("import torch\nfrom torch import nn\n")


def test_model_code_is_single_device():
    files = py_files("workbench/models", "workbench/nn")
    assert len(files) >= 6
    offenders = {str(p.relative_to(ROOT)): distributed_uses(p.read_text()) for p in files}
    assert not {k: v for k, v in offenders.items() if v}


def _script_modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for p in py_files(*SCRIPT_DIRS)}


def imports_a_script(source: str, own_dir: str | None, scripts: dict[str, Path]) -> list[str]:
    hits = []
    stems = {name.split(".")[1]: name for name in scripts}
    for m in imported_modules(source):
        top = m.split(".")[0]
        if top in SCRIPT_DIRS or m.startswith("."):
            hits.append(m)
        elif own_dir is not None and top in stems:  # `import sibling` from inside a script folder
            hits.append(m)
    return hits


def test_scripts_do_not_import_each_other_and_the_library_imports_no_script():
    scripts = _script_modules()
    assert imports_a_script("from benchmarks import llama_cpu", "benchmarks", {"benchmarks.llama_cpu": Path()})
    assert imports_a_script("import llama_cpu", "benchmarks", {"benchmarks.llama_cpu": Path()})
    for name, path in scripts.items():
        assert not imports_a_script(path.read_text(), name.split(".")[0], scripts), name
    for path in py_files(*LIBRARY_DIRS):
        assert not [m for m in imported_modules(path.read_text()) if m.split(".")[0] in SCRIPT_DIRS], path


@pytest.mark.parametrize("pattern", [r"weights_only\s*=\s*False", r"\bpickle\.loads?\(", r"\btorch\.load\("])
def test_no_unsafe_loading_outside_tests(pattern):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in py_files(*LIBRARY_DIRS, *SCRIPT_DIRS)
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits
