"""Preference pairs about documented functions (data_pipelines.preferences): every chosen example really runs
and shows its real output, every wrong answer runs and fails, terse answers have no example; and the sandboxed
checker refuses process creation, sockets and writes outside its directory, leaving the host untouched."""

import json
import os
import time

import pytest

from data_pipelines import preferences as pf
from data_pipelines.instructions import file_of, split_records
from workbench.errors import DataError

GEOMETRY = '''\
"""Tiny geometry."""


def area(width, height):
    """Return the area of a width x height rectangle.

    >>> area(2, 3)
    6
    >>> area(4, 5)
    20
    """
    return width * height


def scale(points, k):
    """Scale every point by k.

    >>> scale([(1, 2)], 3)
    [(3, 6)]
    """
    return [(x * k, y * k) for x, y in points]


def describe(n):
    """Describe a number in words.

    >>> describe(3)
    'three'
    """
    return {1: "one", 3: "three"}.get(n, "many")


def double(x):
    """Double x (the docstring's output is wrong: the pair must show the real one).

    >>> double(2)
    5
    """
    return 2 * x


def broken():
    """Raise at once.

    >>> broken()
    1
    """
    raise RuntimeError("no")


def fresh():
    """Return a new object.

    >>> fresh()
    <object object at 0x...>
    """
    return object()


def _private():
    """Not public.

    >>> _private()
    1
    """
    return 1
'''

CIRCLE = '''\
class Circle:
    """A circle."""

    def __init__(self, r):
        self.r = r

    def area(self):
        """Return the area, with pi taken as 3.

        >>> c = Circle(2)
        >>> c.area()
        12
        """
        return 3 * self.r ** 2
'''


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "shapes").mkdir(parents=True)
    (root / "geometry.py").write_text(GEOMETRY)
    (root / "shapes" / "circle.py").write_text(CIRCLE)
    (root / "tests").mkdir()
    (root / "tests" / "test_geo.py").write_text('def check():\n    """Check.\n\n    >>> 1 + 1\n    2\n    """\n')
    (root / "adder.v").write_text("// An adder.\nmodule adder (input a);\nendmodule\n")
    return root


def test_pairs_from_a_tree_show_real_outputs_and_pass_the_checker(tree):
    stats = {}
    everything = pf.make_pairs(tree, seed=0, workers=2, stats=stats)
    adder = [r for r in everything if r.get("language") == "verilog"]  # the tree's Verilog module (test_verilog.py)
    assert [r["subject"] for r in adder] == ["adder"] and stats["verilog_modules"] == 1
    records = [r for r in everything if r not in adder]
    by_subject = {r["subject"]: r for r in records}
    assert set(by_subject) == {"geometry.area", "geometry.scale", "geometry.describe", "geometry.double",
                               "shapes.circle.Circle.area"}  # broken, fresh, _private and tests/ give none
    assert stats["doctest_subjects"] == 7 and stats["dropped_no_usable_output"] == 2
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected", "kind", "subject", "source"} and r["kind"] in pf.KINDS
        assert r["subject"] in r["prompt"] and r["prompt"] in {p.format(s=r["subject"]) for p in pf.PROMPTS}
    area = by_subject["geometry.area"]
    assert area["source"] == "geometry.py:4"
    assert area["chosen"] == ("`geometry.area(width, height)` returns the area of a width x height rectangle.\n"
                              "Example:\n>>> from geometry import area\n>>> area(2, 3)\n6\n>>> area(4, 5)\n20")
    assert by_subject["geometry.double"]["chosen"].endswith(">>> double(2)\n4")  # the real output, not the docstring's
    circle = by_subject["shapes.circle.Circle.area"]["chosen"]
    assert circle.startswith("`shapes.circle.Circle.area()` returns the area") and "\n>>> c.area()\n12" in circle

    chosen = pf.check_many([r["chosen"] for r in records], paths=[tree])
    rejected = pf.check_many([r["rejected"] for r in records], paths=[tree])
    assert all(c["passes"] for c in chosen), chosen
    for r, c in zip(records, rejected):
        if r["kind"] == "wrong":
            assert c["runs"] and not c["passes"] and c["found"]
            assert r["rejected"].split("Example:")[0] == r["chosen"].split("Example:")[0]  # same form
        else:
            assert not c["found"] and "\n" not in r["rejected"] and ">>>" not in r["rejected"]
    assert pf.make_pairs(tree, seed=0, workers=2) == everything  # deterministic
    some = pf.make_pairs(tree, wrong_fraction=1.0, max_pairs=2)
    assert len(some) == 2 and {r["kind"] for r in some} == {"wrong"}


def test_held_out_split_is_by_file(tree):
    for i in range(4):
        (tree / f"extra{i}.py").write_text(GEOMETRY.replace("def area", f"def area{i}").replace("area(", f"area{i}("))
    records = pf.make_pairs(tree)
    train, val = split_records(records, 0.3)
    assert train and val and not {file_of(r) for r in train} & {file_of(r) for r in val}


def test_a_slice_of_the_standard_library_with_synthesized_calls():
    stats = {}
    records = pf.make_pairs(None, include=["statistics.py"], modules=["math", "itertools"],
                            stats=stats)
    subjects = {r["subject"]: r for r in records}
    assert "statistics.median" in subjects and subjects["statistics.median"]["source"].startswith("statistics.py:")
    assert "math.gcd" in subjects and "itertools.pairwise" in subjects
    assert ">>> list(itertools." in subjects["itertools.pairwise"]["chosen"]  # iterators are shown as lists
    assert subjects["math.gcd"]["chosen"] == ("`math.gcd(*integers)`: Greatest Common Divisor.\nExample:\n"
                                              ">>> import math\n>>> math.gcd(12, 18)\n6")
    verdicts = pf.check_many([r["chosen"] for r in records] + [r["rejected"] for r in records])
    n = len(records)
    assert all(v["passes"] for v in verdicts[:n])
    assert all((v["runs"] and not v["passes"]) if r["kind"] == "wrong" else not v["found"]
               for r, v in zip(records, verdicts[n:]))
    assert all(len(r["chosen"]) < 1000 for r in records)


def test_non_python_trees_and_bad_arguments_are_refused_by_name(tmp_path):
    (tmp_path / "rtl").mkdir()
    (tmp_path / "rtl" / "adder.v").write_text("// An adder.\nmodule adder (input a);\nendmodule\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "util.c").write_text("/* Add. */\nint add(int a, int b)\n{\n    return a + b;\n}\n")
    with pytest.raises(DataError, match="no Python .* or Verilog .* files.*data_pipelines.instructions"):
        pf.make_pairs(tmp_path / "c")
    (tmp_path / "rtl" / "bad.v").write_text("module bad (a);\nendmodule\n")  # a is never declared
    with pytest.raises(DataError, match="no pair could be made.*1 skipped_port_without_direction"):
        pf.make_pairs(tmp_path / "rtl", include=["bad.v"])
    with pytest.raises(DataError, match="pairs_per_subject must be in \\[1, 7\\]"):
        pf.make_pairs(tmp_path / "rtl", pairs_per_subject=8)
    with pytest.raises(DataError, match="does not exist"):
        pf.make_pairs(tmp_path / "missing")
    with pytest.raises(DataError, match="wrong_fraction"):
        pf.make_pairs(tmp_path, wrong_fraction=2)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.py").write_text("def f():\n    'No example.'\n")
    with pytest.raises(DataError, match="no pair could be made"):
        pf.make_pairs(tmp_path / "plain")


def test_perturb_and_explanation():
    import random

    rng = random.Random(0)
    assert pf.perturb("True\n", rng) == "False\n"
    assert pf.perturb("[1, 2, 3]\n", rng) == "[3, 2, 1]\n"
    assert pf.perturb("'ab'\n", rng) == "'a'\n"
    assert pf.perturb("7\n", rng) in ("8\n", "6\n", "9\n")
    assert pf.perturb("<Thing>\n", rng) is None and pf.perturb("Fraction(22, 7)\n", rng) == "Fraction(32, 7)\n"
    assert pf.explanation("m.f", "(x)", "Return x and apply y.") == "`m.f(x)` returns x and applies y."
    assert pf.explanation("m.f", "(x)", "The x of y.") == "`m.f(x)`: The x of y."
    assert pf.display_signature("(x, /, *, _normalize=True)") == "(x)"
    assert pf.doc_signature("islice(iterable, stop) --> islice object", "islice") == (
        "(iterable, stop)", [["iterable", "POSITIONAL_OR_KEYWORD", False], ["stop", "POSITIONAL_OR_KEYWORD", False]])


# ---- the checker and its sandbox -----------------------------------------------------------------------------


def test_checker_verdicts():
    ok = pf.check_examples("`sorted(xs)` sorts.\nExample:\n>>> sorted([3, 1, 2])\n[1, 2, 3]\n")
    assert ok == {"found": True, "runs": True, "passes": True, "detail": "1 example(s) ran and printed what they show"}
    wrong = pf.check_examples(">>> 1 + 1\n3\n")
    assert wrong["runs"] and not wrong["passes"] and "shows '3' but prints '2'" in wrong["detail"]
    boom = pf.check_examples(">>> 1 / 0\n")
    assert boom["found"] and not boom["runs"] and "ZeroDivisionError" in boom["detail"]
    assert pf.check_examples("Use sorted(). See a >>> b.")["found"] is False
    assert pf.check_examples("```python\n>>> 2 * 3\n6\n```\n")["passes"]  # code fences are not output
    assert pf.check_examples(">>> print('a   b')\na b\n")["passes"]  # whitespace normalised
    assert not pf.check_examples(">>> 1 == 1\n1\n")["passes"]  # True is not 1
    assert not pf.check_examples(">>> 'abc'  # doctest: +ELLIPSIS\n...\n")["passes"]  # directives ignored
    assert not pf.check_examples(">>> x = 1\n>>> y\n")["runs"]
    slow = pf.check_examples(">>> while True: pass\n", timeout=1.0)
    assert not slow["runs"] and "timed out after 1 s" in slow["detail"]
    big = pf.check_examples(">>> x = bytearray(4 * 1024 ** 3)\n")
    assert not big["runs"] and "MemoryError" in big["detail"]
    huge = pf.check_examples(">>> open('big.bin', 'wb').write(b'x' * (32 * 1024 * 1024))\n")
    assert not huge["runs"] and "File too large" in huge["detail"]
    here = pf.check_examples(">>> with open('note.txt', 'w') as f: f.write('hi')\n2\n>>> open('note.txt').read()\n'hi'\n")
    assert here["passes"]  # its own temporary directory is writable


VICTIM = "precious data\n"


@pytest.mark.parametrize("code", [
    "import subprocess; subprocess.run(['touch', '{new}'])",
    "import os; os.system('touch {new}')",
    "import os; os.fork()",
    "import os; os.posix_spawn('/bin/touch', ['touch', '{new}'], {{}})",
    "import os; os.execv('/bin/touch', ['touch', '{new}'])",
    "import socket; socket.create_connection(('127.0.0.1', 9))",
    "import socket; socket.socket()",
    "open('{new}', 'w').write('x')",
    "open('{victim}', 'a').write('x')",
    "import os; os.remove('{victim}')",
    "import os; os.rename('{victim}', '{new}')",
    "import shutil; shutil.rmtree('{dir}')",
    "import os; os.mkdir('{new}')",
    "import os; os.chmod('{victim}', 0o777)",
    "import os; os.symlink('{victim}', 'link')",
    "import os; os.chdir('{dir}')",
    "import os; os.kill(os.getppid(), 9)",
    "import ctypes",
    "import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    "import pathlib; pathlib.Path('{new}').write_text('x')",
    "import os; fd = os.open('{dir}', os.O_RDONLY); os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
])
def test_sandbox_refuses_and_the_host_is_untouched(tmp_path, code):
    victim, new = tmp_path / "victim.txt", tmp_path / "new.txt"
    victim.write_text(VICTIM)
    before = sorted(os.listdir(tmp_path))
    result = pf.check_examples(">>> " + code.format(victim=victim, new=new, dir=tmp_path) + "\n")
    assert result["found"] and not result["runs"] and not result["passes"]
    assert "sandbox:" in result["detail"] and "refused" in result["detail"], result["detail"]
    assert victim.read_text() == VICTIM and oct(victim.stat().st_mode)[-3:] != "777"
    assert sorted(os.listdir(tmp_path)) == before and not new.exists()


def test_check_many_keeps_order_and_isolates_texts(tmp_path):
    texts = [">>> 2 + 2\n4\n", ">>> import os; os._exit(3)\n", "no example", ">>> import builtins; builtins.len = None\n",
             ">>> len('abc')\n3\n"] * 4
    t0 = time.perf_counter()
    results = pf.check_many(texts, workers=2)
    elapsed = time.perf_counter() - t0
    expected = [pf.check_examples(t) for t in texts[:5]] * 4
    assert results == expected
    assert [r["passes"] for r in results[:5]] == [True, False, False, True, True]  # len() untouched by text 4
    assert "ended its process" in results[1]["detail"]
    assert elapsed < 10


def test_cli_writes_splits_and_counts(tree, tmp_path, capsys):
    for i in range(4):
        (tree / f"extra{i}.py").write_text(GEOMETRY.replace("def area", f"def area{i}").replace("area(", f"area{i}("))
    out = tmp_path / "out"
    assert pf.main(["--source", str(tree), "--out", str(out), "--val-fraction", "0.3", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    total = next(line for line in printed.splitlines() if line.startswith("total")).split()
    assert total[1:] == [str(len(train)), str(len(val))] and train and val
    with pytest.raises(SystemExit):
        pf.main(["--source", str(tmp_path / "missing"), "--out", str(out)])


def test_several_phrasings_demonstrations_rephrased_and_own_answer_pairs(tree, tmp_path, capsys):
    """--pairs-per-subject asks each subject in distinct phrasings; --demonstrations turns each training subject's
    first record into an SFT demonstration; rephrased.jsonl asks each training subject in a phrasing none of its
    records uses; own-answer pairs reject a model's failing answers."""
    for i in range(4):
        (tree / f"extra{i}.py").write_text(GEOMETRY.replace("def area", f"def area{i}").replace("area(", f"area{i}("))
    out = tmp_path / "out"
    assert pf.main(["--source", str(tree), "--out", str(out), "--val-fraction", "0.2", "--pairs-per-subject", "3",
                    "--demonstrations", "1"]) == 0
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    train, demos, again = read("train.jsonl"), read("sft.jsonl"), read("rephrased.jsonl")
    by_subject = {}
    for r in [*train, *demos]:
        by_subject.setdefault(r["subject"], []).append(r["prompt"])
    assert all(len(p) == 3 == len(set(p)) for p in by_subject.values())  # three distinct phrasings each
    assert sorted(d["subject"] for d in demos) == sorted(by_subject)  # one demonstration per training subject
    assert all(sum(r["subject"] == s for r in train) == 2 for s in by_subject)  # and its other two stay pairs
    assert all(d["messages"][1]["content"] == d["answer"] and ">>>" in d["answer"] for d in demos)
    assert {r["subject"] for r in again} == set(by_subject)
    assert all(r["prompt"] not in by_subject[r["subject"]] for r in again)
    assert "SFT demonstrations" in capsys.readouterr().out
    pair = train[0]
    answers = [{"prompt": pair["prompt"], "output": ">>> import nothing_here", "passes": False},
               {"prompt": pair["prompt"], "output": pair["chosen"], "passes": True, "on_topic": True},
               {"prompt": "an unknown prompt", "output": "x", "passes": False}]
    own = pf.own_answer_pairs(train, answers)
    assert own == [{"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": ">>> import nothing_here",
                    "kind": "own", "subject": pair["subject"], "source": pair["source"]}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    assert pf.main(["--own-answers", str(tmp_path / "answers.jsonl"), "--pairs", str(out / "train.jsonl"),
                    "--out", str(tmp_path / "own")]) == 0
    assert len((tmp_path / "own" / "train.jsonl").read_text().splitlines()) == len(train) + 1
