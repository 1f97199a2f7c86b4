"""The Verilog module reader and the teaching data made from it (data_pipelines/verilog.py), on hand-written
snippets: ANSI and non-ANSI ports, parameters, comments, several modules per file, files it must skip (and
count), the checker on right, wrong and terse answers, and the pairs the makers write."""

import random
from collections import Counter

import pytest

from data_pipelines import instructions as ins
from data_pipelines import preferences as pf
from data_pipelines import verilog as vl

COUNTER = """\
// Copyright 2024 Example Corp. Licensed under the MIT licence.

`timescale 1ns / 1ps
//------------------------------------------------------------
// File: counter.v
// An up-counter with synchronous reset and enable.
// Wraps around after 2**WIDTH - 1.
//------------------------------------------------------------
module counter #(
    parameter WIDTH = 8,
    parameter [3:0] STEP = 4'd1,
    localparam MAX = 2**WIDTH - 1
) (
    input  wire             clk,    // clock, rising edge
    input  wire             rst,    // synchronous reset, active high
    input                   en,
    output reg [WIDTH-1:0]  count   // the current count
);
    function [3:0] plus;  // a function's inputs are not the module's ports
        input [3:0] x;
        plus = x + STEP;
    endfunction
    always @(posedge clk) begin
        if (rst) count <= 0;
        else if (en) count <= count + STEP;
    end
endmodule
"""

MUX = """\
/* A 2-to-1 multiplexer,
 * W bits wide. */
module mux2 (a, b, sel, y);
    parameter W = 4;
    localparam UNUSED = 0;
    input [W-1:0] a, b;   // the two inputs
    input sel;
    output [W-1:0] y;
    reg [W-1:0] y;
    always @(*) y = sel ? b : a;
endmodule

// A full adder cell.
module full_adder(input a, b, cin, output s, cout);
  assign {cout, s} = a + b + cin;
endmodule
"""

FIFO_SV = """\
// A synchronous FIFO.
module fifo #(parameter int DEPTH = 16, parameter int W = 8) (
  input  logic                     clk, rst_n,
  input  logic [W-1:0]             din,
  output logic [$clog2(DEPTH):0]   level,
  output logic [3:0][7:0]          bytes_out,
  bus_if.master                    bus
);
endmodule
"""

BROKEN = """\
// A module whose header never ends.
module open_header (input a, output b
endmodule

// A port in the list that is never declared.
module undeclared (a, b);
  input a;
endmodule

module twice (a);
  input a;
  output a;
endmodule

module nested (input a);
module inner (input b);
endmodule
"""


def parse(text, path="rtl/x.v"):
    stats = Counter()
    return {m.name: m for m in vl.parse_modules(text, path, stats)}, stats


def port(m, name):
    return next(p for p in m.ports if p.name == name)


def test_ansi_ports_parameters_and_the_header_comment():
    mods, stats = parse(COUNTER, "rtl/counter.v")
    m = mods["counter"]
    assert not stats and m.line == 9 and m.ansi
    assert [(p.name, p.direction, p.type, p.dims) for p in m.ports] == [
        ("clk", "input", "wire", ""), ("rst", "input", "wire", ""), ("en", "input", "", ""),
        ("count", "output", "reg", "[WIDTH-1:0]")]
    assert port(m, "clk").comment == "clock, rising edge" and port(m, "en").comment == ""
    # localparam in the parameter list is not overridable; the function's `input` is not a port
    assert [(p.name, p.default) for p in m.parameters] == [("WIDTH", "8"), ("STEP", "4'd1")]
    # the licence block and the banner/label lines are left out
    assert m.description == "An up-counter with synchronous reset and enable. Wraps around after 2**WIDTH - 1."
    assert m.bits(port(m, "count")) == 8 and m.bits(port(m, "clk")) == 1
    assert m.header.startswith("module counter #(\n    parameter WIDTH = 8,") and m.header.endswith(");")


def test_non_ansi_ports_take_direction_and_type_from_the_body_and_several_modules_per_file():
    mods, stats = parse(MUX)
    assert list(mods) == ["mux2", "full_adder"] and not stats
    mux = mods["mux2"]
    assert not mux.ansi and [p.name for p in mux.ports] == ["a", "b", "sel", "y"]  # the list's order
    assert (port(mux, "b").direction, port(mux, "b").dims) == ("input", "[W-1:0]")  # `input [W-1:0] a, b`
    assert (port(mux, "y").type, port(mux, "y").dims) == ("reg", "[W-1:0]")  # `reg` makes it a variable
    assert [(p.name, p.default) for p in mux.parameters] == [("W", "4")]  # no #() list: body parameters count
    assert mux.description == "A 2-to-1 multiplexer, W bits wide."
    assert port(mux, "a").comment == ""  # a line declaring two ports gives neither its comment
    assert "input [W-1:0] a, b;" in mux.header and "reg [W-1:0] y" not in mux.header
    fa = mods["full_adder"]  # ANSI names without their own direction inherit the previous one
    assert [(p.name, p.direction) for p in fa.ports] == [("a", "input"), ("b", "input"), ("cin", "input"),
                                                         ("s", "output"), ("cout", "output")]
    assert fa.description == "A full adder cell."


def test_systemverilog_types_interfaces_and_widths_from_parameters():
    mods, _ = parse(FIFO_SV, "rtl/fifo.sv")
    m = mods["fifo"]
    assert [(p.name, p.default, p.type) for p in m.parameters] == [("DEPTH", "16", "int"), ("W", "8", "int")]
    assert [(p.name, p.direction, p.type) for p in m.ports] == [
        ("clk", "input", "logic"), ("rst_n", "input", "logic"), ("din", "input", "logic"),
        ("level", "output", "logic"), ("bytes_out", "output", "logic"), ("bus", "interface", "bus_if.master")]
    assert m.bits(port(m, "level")) == 5  # [$clog2(16):0]
    assert m.bits(port(m, "bytes_out")) == 32 and m.bits(port(m, "din")) == 8
    assert vl.width_bits("[N-1:0]", {"N": "M*2", "M": "3"}) == 6
    assert vl.width_bits("[X-1:0]", {}) is None and vl.width_bits("[i+:4]", {}) is None
    assert "`bus`: interface bus_if.master\n" in vl.answer(m) + "\n"


def test_broken_modules_are_skipped_and_counted_by_reason():
    mods, stats = parse(BROKEN + MUX)
    assert list(mods) == ["inner", "mux2", "full_adder"]  # the readable ones, the file is not given up on
    assert stats == {"verilog_skipped_unterminated_header": 1, "verilog_skipped_port_without_direction": 1,
                     "verilog_skipped_port_declared_twice": 1, "verilog_skipped_no_endmodule": 1}
    _, stats = parse("module m (.a(x));\nendmodule\n")
    assert stats == {"verilog_skipped_unsupported_port_style": 1}
    _, stats = parse("module m (a);\n  input a;\n  input b;\nendmodule\n")
    assert stats == {"verilog_skipped_declared_port_not_in_list": 1}
    assert parse("// just a comment\n`define X 1\n")[0] == {}


def test_comments_strings_attributes_and_directives_do_not_confuse_the_reader():
    text = """\
`ifdef SIM
`define W 4
`endif
(* keep_hierarchy = "yes" *)
// Drives a constant "module fake (input z);" string.
module const_out (
    output [3:0] y  /* four bits */
);
  initial $display("module fake (input z); endmodule // not code");
  assign y = 4'hA;
endmodule
"""
    mods, stats = parse(text)
    assert list(mods) == ["const_out"] and not stats
    assert mods["const_out"].description == 'Drives a constant "module fake (input z);" string.'
    assert [(p.name, p.dims) for p in mods["const_out"].ports] == [("y", "[3:0]")]


def test_the_checker_passes_the_teaching_answer_and_fails_every_perturbation_and_terse_answers():
    mods, _ = parse(COUNTER + MUX + FIFO_SV, "rtl/all.sv")
    for m in mods.values():
        chosen = vl.answer(m)
        verdict = vl.check_answer(chosen, m)
        assert verdict["passes"] and verdict["errors"] == [], (m.name, verdict)
        for how in vl.PERTURBATIONS:
            wrong = vl.wrong_answer(m, how, random.Random(0))
            if wrong is None:
                continue
            bad = vl.check_answer(wrong, m)
            assert not bad["passes"] and bad["errors"], (m.name, how)
            assert bad["instance"]
        terse = vl.check_answer(vl.terse(m, random.Random(0)), m)
        assert not terse["passes"] and not terse["instance"] and not terse["listed"]
    m = mods["counter"]
    chosen = vl.answer(m)
    assert "- `count`: output reg [WIDTH-1:0] (8 bits with the default parameters): the current count" in chosen
    assert chosen.endswith("counter #(\n    .WIDTH(8),\n    .STEP (4'd1)\n) u_counter (\n    .clk  (clk),\n"
                           "    .rst  (rst),\n    .en   (en),\n    .count(count)\n);")
    # an instantiation alone is judged on its connections; positional connections and unknown parameters fail
    assert vl.check_answer("counter u0 (.clk(c), .rst(r), .en(1'b1), .count(q));", m)["passes"]
    assert not vl.check_answer("counter u0 (c, r, 1'b1, q);", m)["passes"]
    assert "overrides DEPTH" in vl.check_answer("counter #(.DEPTH(4)) u0 (.clk(c), .rst(r), .en(e), .count(q));",
                                                m)["errors"][0]
    direction = vl.wrong_answer(m, "direction", random.Random(0))
    assert any("it is" in e for e in vl.check_answer(direction, m)["errors"])


def test_preference_records_are_checked_held_out_by_file_and_deterministic(tmp_path):
    from data_pipelines.corpus import iter_documents

    (tmp_path / "rtl").mkdir()
    (tmp_path / "rtl" / "counter.v").write_text(COUNTER)
    (tmp_path / "rtl" / "mux.v").write_text(MUX)
    (tmp_path / "rtl" / "fifo.sv").write_text(FIFO_SV)
    (tmp_path / "rtl" / "broken.v").write_text(BROKEN)
    (tmp_path / "rtl" / "copy.v").write_text(MUX)  # the same module names again: asked about once
    stats = Counter()
    modules = vl.read_modules(iter_documents(tmp_path, vl.EXTENSIONS), stats)
    assert [m.name for m in modules] == ["inner", "mux2", "full_adder", "counter", "fifo"]  # in path order
    assert stats["verilog_duplicate_names"] == 2 and stats["verilog_files"] == 5
    records = pf.make_pairs(tmp_path, seed=3, pairs_per_subject=4, wrong_fraction=0.75)
    assert records == pf.make_pairs(tmp_path, seed=3, pairs_per_subject=4, wrong_fraction=0.75)
    assert len(records) == 5 * 4
    by_module = {m.name: m for m in modules}
    for r in records:
        m = by_module[r["subject"]]
        assert r["language"] == "verilog" and r["source"] == f"{m.path}:{m.line}"
        assert r["prompt"] in {p.format(s=m.name) for p in vl.PROMPTS}
        assert vl.check_answer(r["chosen"], m)["passes"] and not vl.check_answer(r["rejected"], m)["passes"]
        assert (r["kind"] == "wrong") == ("perturbation" in r)
    assert {r["kind"] for r in records} == {"wrong", "terse"}
    assert len({r["prompt"] for r in records}) == len(records)  # distinct phrasings per module
    train, val, _ = ins.split_by_file(records, 0.3)
    assert val and not {ins.file_of(r) for r in train} & {ins.file_of(r) for r in val}
    demos, pairs = pf.demonstrations(train, 2)
    again = pf.rephrased(train, 3)
    assert {r["subject"] for r in again} == {r["subject"] for r in train}
    for r in again:  # a phrasing none of the subject's records used
        assert r["prompt"] in {p.format(s=r["subject"]) for p in vl.PROMPTS}
        assert r["prompt"] not in {x["prompt"] for x in train if x["subject"] == r["subject"]}
    assert len(demos) == 2 * len({r["subject"] for r in train}) and len(pairs) == len(train) - len(demos)


def test_instruction_records_ask_for_ports_and_instantiation_from_the_header():
    mods, _ = parse(MUX, "rtl/mux.v")
    records = vl.instruction_records(list(mods.values()), 0, vl.KINDS)
    assert [(r["kind"], r["source"]) for r in records] == [("ports", "rtl/mux.v:3"), ("instance", "rtl/mux.v:3"),
                                                          ("ports", "rtl/mux.v:14"), ("instance", "rtl/mux.v:14")]
    ports = records[0]
    assert ports["prompt"].startswith("Verilog:\nmodule mux2 (a, b, sel, y);\n    input [W-1:0] a, b;")
    assert ports["answer"] == "input [W-1:0] a\ninput [W-1:0] b\ninput sel\noutput reg [W-1:0] y"
    assert records[1]["answer"] == vl.instantiation(mods["mux2"])
    assert vl.check_answer(records[1]["answer"], mods["mux2"])["passes"]


@pytest.mark.parametrize("text", ["", "module", "module (", "module m #(", "endmodule", "module m; endmodule x ("])
def test_fragments_never_raise(text):
    vl.parse_modules(text, "x.v", Counter())
