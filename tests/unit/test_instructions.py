"""Instruction pairs mined from documented code (data_pipelines.instructions): each kind's prompt and answer,
the generic comment/definition miner for Verilog, C and launch files, the held-out split by file, limits,
determinism, bad input and the CLI."""

import json

import pytest

from data_pipelines import instructions as ins
from workbench.data.chat import messages_of
from workbench.errors import DataError

GEOMETRY = '''\
"""Small geometry helpers."""

import math


def area(width, height):
    """Return the area of a rectangle.

    >>> area(2, 3)
    6
    >>> w = 4
    >>> area(w, 5)
    20
    >>> area(1, 1)  # doctest: +SKIP
    1
    """
    return width * height


@staticmethod
def hypot(a,
          b):
    """Length of the hypotenuse."""
    return math.sqrt(a * a + b * b)


def stub():
    """Do nothing at all."""


def inline(): "one line"; return 1


class Circle:
    """A circle."""

    def __init__(self, r):
        self.r = r

    def circumference(self):
        """Return the circumference.

        >>> Circle(1).circumference() > 6
        True
        """
        return 2 * math.pi * self.r

    class Unit:
        def scale(self, k):
            """Scale by k."""
            return k
'''

UTIL = '''\
def clamp(x, lo, hi):
    """Clamp x into [lo, hi].

    >>> clamp(5, 0, 3)
    3
    """
    return max(lo, min(x, hi))
'''

ALU = '''\
// Copyright 2024 Example Corp. Licensed under the Apache License.
module top (input clk);
endmodule

// A 4-bit adder with carry out.
// Adds a and b.
module adder4 (
    input  [3:0] a,
    input  [3:0] b,
    output [4:0] sum
);
  assign sum = a + b;
endmodule

/* Two-input AND gate,
   the smallest cell. */
module and2 (input a, input b, output y);
  assign y = a & b;
endmodule

module nocomment (input a);
endmodule
'''

UTIL_C = '''\
#include <stdio.h>

/* Add two integers and return the sum. */
static int
add(int a, int b)
{
    return a + b;
}

// Print a greeting to stdout.
void greet(const char *name) {
    printf("hi %s", name);
}

/* A prototype, not a definition. */
int sub(int a, int b);
'''

LAUNCH = '''\
<launch>
  <!-- The camera driver, publishing raw images. -->
  <node name="camera" pkg="usb_cam" type="usb_cam_node">
    <param name="rate" value="30"/>
  </node>
</launch>
'''


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "geo").mkdir(parents=True)
    (root / "geo" / "__init__.py").write_text("")  # blank: not read
    (root / "geo" / "shapes.py").write_text(GEOMETRY)
    (root / "util.py").write_text(UTIL)
    (root / "broken.py").write_text("def f(:\n    pass\n")
    (root / "latin.py").write_bytes(b'def f():\n    """Caf\xe9 au lait."""\n    return 1\n')  # not UTF-8
    (root / "rtl").mkdir()
    (root / "rtl" / "alu.v").write_text(ALU)
    (root / "util.c").write_text(UTIL_C)
    (root / "robot.launch").write_text(LAUNCH)
    return root


def by(records, kind, source=None):
    return [r for r in records if r["kind"] == kind and (source is None or r["source"].startswith(source))]


def test_python_kinds_prompt_answer_and_source_line(tree):
    stats = {}
    records = ins.mine_instructions(tree, progress=False, stats=stats)
    assert stats["python_files"] == 4 and stats["unparsable_files"] == 1 and stats["other_files"] == 3
    lines = (tree / "geo" / "shapes.py").read_text().split("\n")
    for r in records:
        assert messages_of(r) == r["messages"]  # the chat reader takes every record as is
        assert r["messages"][0]["content"] == r["prompt"] and r["messages"][1]["content"] == r["answer"]
        verilog = {"language"} if r["kind"] in ("ports", "instance") else set()
        assert set(r) == {"messages", "prompt", "answer", "kind", "source"} | verilog

    doc = {r["answer"]: r for r in by(records, "docstring", "geo/shapes.py")}
    assert set(doc) == {"Return the area of a rectangle.", "Length of the hypotenuse.", "Do nothing at all.",
                        "Return the circumference.", "Scale by k."}  # `inline`'s docstring shares its line
    area = doc["Return the area of a rectangle."]
    assert area["prompt"].startswith("def area(width, height):\n    return width * height\n\n")
    assert "rectangle" not in area["prompt"] and area["source"] == "geo/shapes.py:6"
    assert lines[5] == "def area(width, height):"
    assert doc["Length of the hypotenuse."]["prompt"].startswith("@staticmethod\ndef hypot(a,")  # decorators kept
    assert doc["Do nothing at all."]["prompt"].startswith("def stub():\n    ...\n")  # still a function
    method = doc["Return the circumference."]["prompt"]
    assert method.startswith("def circumference(self):\n    return 2")  # dedented out of its class

    sig = {r["answer"]: r for r in by(records, "signature", "geo/shapes.py")}
    assert set(sig) == {"def area(width, height):", "def stub():", "def circumference(self):", "def scale(self, k):"}
    assert sig["def scale(self, k):"]["prompt"].startswith("In module geo.shapes, class Circle.Unit:\nScale by k.\n\n")
    assert sig["def area(width, height):"]["prompt"].startswith("In module geo.shapes:\nReturn the area")
    assert ">>> area(2, 3)" in sig["def area(width, height):"]["prompt"]  # the whole docstring

    tests = by(records, "doctest", "geo/shapes.py")
    assert [(r["answer"], r["source"]) for r in tests] == [("6", "geo/shapes.py:9"), ("20", "geo/shapes.py:12"),
                                                          ("True", "geo/shapes.py:43")]  # +SKIP left out
    assert lines[8].strip() == ">>> area(2, 3)" and lines[11].strip() == ">>> area(w, 5)"
    second = tests[1]["prompt"]
    assert second.startswith("In module geo.shapes:\n>>> area(2, 3)\n6\n>>> w = 4\n>>> area(w, 5)\n\n")
    assert "20" not in second  # the answer is not in the prompt
    assert by(records, "docstring", "latin.py")[0]["answer"] == "Caf\ufffd au lait."  # decoded with replacement
    assert by(records, "doctest", "util.py")[0]["prompt"].startswith("In module util:\n>>> clamp(5, 0, 3)\n")


def test_comment_miner_for_verilog_c_and_launch_files(tree):
    records = ins.mine_instructions(tree, progress=False, kinds=["comment", "definition"])
    v = {r["source"]: r for r in by(records, "definition", "rtl/alu.v")}
    assert set(v) == {"rtl/alu.v:7", "rtl/alu.v:17"}  # the licence header and the bare module give nothing
    assert v["rtl/alu.v:7"]["answer"] == "module adder4 ("
    assert v["rtl/alu.v:7"]["prompt"].startswith("Verilog:\n// A 4-bit adder with carry out.\n// Adds a and b.\n\n")
    assert v["rtl/alu.v:17"]["answer"] == "module and2 (input a, input b, output y);"
    comment = {r["source"]: r for r in by(records, "comment", "rtl/alu.v")}
    assert comment["rtl/alu.v:7"]["answer"] == "// A 4-bit adder with carry out.\n// Adds a and b."
    assert comment["rtl/alu.v:7"]["prompt"].startswith("Verilog:\nmodule adder4 (\n    input  [3:0] a,")
    assert "output [4:0] sum\n);" in comment["rtl/alu.v:7"]["prompt"]  # the header up to the port list's end
    assert comment["rtl/alu.v:17"]["answer"] == "/* Two-input AND gate,\n   the smallest cell. */"

    c = {r["answer"]: r for r in by(records, "definition", "util.c")}
    assert set(c) == {"static int\nadd(int a, int b)", "void greet(const char *name)"}  # the prototype is not one
    assert c["static int\nadd(int a, int b)"]["source"] == "util.c:4"
    launch = by(records, "definition", "robot.launch")
    assert [r["answer"] for r in launch] == ['<node name="camera" pkg="usb_cam" type="usb_cam_node">']
    assert by(records, "comment", "robot.launch")[0]["answer"] == "<!-- The camera driver, publishing raw images. -->"


def test_verilog_modules_give_ports_and_instance_pairs_from_their_headers(tree):
    stats = {}
    records = ins.mine_instructions(tree, progress=False, kinds=["ports", "instance"], stats=stats)
    assert {ins.file_of(r) for r in records} == {"rtl/alu.v"} and all(r["language"] == "verilog" for r in records)
    ports = {r["source"]: r for r in by(records, "ports")}
    assert set(ports) == {"rtl/alu.v:2", "rtl/alu.v:7", "rtl/alu.v:17", "rtl/alu.v:21"}  # every module with ports
    assert ports["rtl/alu.v:7"]["answer"] == "input [3:0] a\ninput [3:0] b\noutput [4:0] sum"
    assert ports["rtl/alu.v:7"]["prompt"].startswith("Verilog:\nmodule adder4 (\n    input  [3:0] a,")
    instance = {r["source"]: r["answer"] for r in by(records, "instance")}
    assert instance["rtl/alu.v:17"] == "and2 u_and2 (\n    .a(a),\n    .b(b),\n    .y(y)\n);"


def test_split_holds_out_whole_files_and_drops_repeated_prompts(tree):
    for i in range(12):  # more files, one of them a copy: its prompts must not reach val when train has them
        (tree / f"m{i}.py").write_text(UTIL.replace("clamp", f"clamp{i}"))
    (tree / "copy.py").write_text(GEOMETRY)
    records = ins.mine_instructions(tree, progress=False)
    train, val = ins.split_records(records, 0.25)
    train_files, val_files = {ins.file_of(r) for r in train}, {ins.file_of(r) for r in val}
    assert val and train and not train_files & val_files
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}
    assert len(train) + len(val) <= len(records) and len(val) >= 0.1 * len(records)
    assert [r for r in records if r in train] == train  # order kept
    assert ins.split_records(records, 0.25) == (train, val)  # deterministic
    assert ins.split_records(records, 0.0) == (records, [])
    # the hash of a path decides, not the order or the other files: the same files are held out when shuffled
    assert {ins.file_of(r) for r in ins.split_records(records[::-1], 0.25)[1]} == val_files
    with pytest.raises(DataError, match="val_fraction must be in"):
        ins.split_records(records, 1.0)
    with pytest.raises(DataError, match="1 file"):
        ins.split_records(by(records, "doctest", "util.py"), 0.5)


def test_limits_kinds_seed_and_determinism(tree):
    a = ins.mine_instructions(tree, progress=False, seed=1)
    assert a == ins.mine_instructions(tree, progress=False, seed=1)
    b = ins.mine_instructions(tree, progress=False, seed=2)  # the seed only changes wordings
    assert [(r["answer"], r["source"], r["kind"]) for r in a] == [(r["answer"], r["source"], r["kind"]) for r in b]
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    stats = {}
    short = ins.mine_instructions(tree, progress=False, max_prompt_chars=120, stats=stats)
    assert all(len(r["prompt"]) <= 120 for r in short) and len(short) < len(a) and stats["too_long_docstring"] > 0
    capped = ins.mine_instructions(tree, progress=False, max_per_kind=2, seed=1)
    assert all(sum(r["kind"] == k for r in capped) <= 2 for k in ins.KINDS)
    assert capped == ins.mine_instructions(tree, progress=False, max_per_kind=2, seed=1)
    from data_pipelines.tokenizer import byte_tokenizer
    from workbench.data.chat import ChatTemplate

    tok = byte_tokenizer()
    stats = {}
    fitted = ins.mine_instructions(tree, progress=False, max_tokens=100, tokenizer=tok, stats=stats)
    assert fitted and all(len(ChatTemplate(tok).encode(r["messages"]).ids) <= 100 for r in fitted)
    assert stats["too_many_tokens"] > 0 and len(fitted) + stats["too_many_tokens"] == len(a)
    with pytest.raises(DataError, match="max_tokens and tokenizer go together"):
        ins.mine_instructions(tree, progress=False, max_tokens=100)
    only = ins.mine_instructions(tree, progress=False, kinds=["doctest"], include=["geo/*"])
    assert {r["kind"] for r in only} == {"doctest"} and {ins.file_of(r) for r in only} == {"geo/shapes.py"}


def test_bad_input_names_the_problem(tree, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ins.mine_instructions(tmp_path / "nope", progress=False)
    with pytest.raises(DataError, match="unknown kind.*poem"):
        ins.mine_instructions(tree, kinds=["poem"], progress=False)
    with pytest.raises(DataError, match="max_prompt_chars must be a positive integer"):
        ins.mine_instructions(tree, max_prompt_chars=0, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="no pair found under"):
        ins.mine_instructions(tmp_path / "empty", progress=False)
    with pytest.raises(DataError, match="needs a 'source' field"):
        ins.split_records([{"prompt": "p"}, {"prompt": "q"}], 0.5)


def test_cli_writes_splits_and_prints_counts(tree, tmp_path, capsys):
    from data_pipelines.tokenizer import byte_tokenizer

    for i in range(6):
        (tree / f"m{i}.py").write_text(UTIL.replace("clamp", f"clamp{i}"))
    out = tmp_path / "out"
    tok = byte_tokenizer().save(tmp_path / "tokenizer.json")
    assert ins.main(["--source", str(tree), "--out", str(out), "--val-fraction", "0.3", "--seed", "3",
                     "--tokenizer", str(tok), "--max-tokens", "400"]) == 0
    printed = capsys.readouterr().out
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert train and val and not {ins.file_of(r) for r in train} & {ins.file_of(r) for r in val}
    table = printed.split("\n")
    row = next(line for line in table if line.startswith("total"))
    assert row.split()[1:] == [str(len(train)), str(len(val))]
    assert "1 did not parse" in printed and "doctest" in printed and "over 400 tokens: " in printed
    with pytest.raises(SystemExit):
        ins.main(["--source", str(tree / "missing"), "--out", str(out)])
    assert "does not exist" in capsys.readouterr().err


def test_a_slice_of_the_standard_library():
    stats = {}
    records = ins.mine_instructions(None, include=["json/*.py", "textwrap.py"], progress=False, stats=stats)
    kinds = {r["kind"] for r in records}
    assert {"docstring", "signature", "doctest"} <= kinds and stats["unparsable_files"] == 0
    assert all(len(r["prompt"]) <= 800 and len(r["answer"]) <= 200 for r in records)
    dedent = next(r for r in records if r["kind"] == "signature" and r["answer"].startswith("def dedent("))
    assert dedent["answer"] == "def dedent(text):" and dedent["source"].startswith("textwrap.py:")
