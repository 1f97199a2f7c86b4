"""The expert-teacher recipe (launch/expert_teacher.sh, docs/expert-teacher.md) end to end on a small Verilog tree
that this file writes, with tiny step counts: every stage leaves its outputs (the corpus, the runs with
checkpoints, the teaching data with the counts the tree gives, the held-out evals), and the printed chat command
answers a piped question. Its pieces connect, not its accuracy (the measured figures are in the doc).

`python tests/integration/test_expert_teacher.py DIR` writes the same tree into DIR (the doc's Verilog run)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import verilog as vl

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "expert_teacher.sh"

TREE = {
    "rtl/counter.v": """\
// counter.v
// An up-counter with synchronous reset and count enable.
// The count wraps around to zero after 2**WIDTH - 1.
module counter #(
    parameter WIDTH = 8
) (
    input  wire             clk,    // clock, rising edge
    input  wire             rst,    // synchronous reset, active high
    input  wire             en,     // count enable
    output reg  [WIDTH-1:0] count   // the current count
);
    always @(posedge clk) begin
        if (rst)
            count <= {WIDTH{1'b0}};
        else if (en)
            count <= count + 1'b1;
    end
endmodule
""",
    "rtl/mux.v": """\
/* A two-input multiplexer: y follows a when sel is low and b when sel is high. */
module mux2 (a, b, sel, y);
    parameter W = 4;
    input  [W-1:0] a;    // selected when sel = 0
    input  [W-1:0] b;    // selected when sel = 1
    input          sel;  // the select line
    output [W-1:0] y;    // the selected input
    assign y = sel ? b : a;
endmodule

// A four-input multiplexer built from three two-input ones.
module mux4 #(parameter W = 4) (
    input  [W-1:0] d0, d1, d2, d3,
    input  [1:0]   sel,
    output [W-1:0] y
);
    wire [W-1:0] lo, hi;
    mux2 #(.W(W)) m_lo (.a(d0), .b(d1), .sel(sel[0]), .y(lo));
    mux2 #(.W(W)) m_hi (.a(d2), .b(d3), .sel(sel[0]), .y(hi));
    mux2 #(.W(W)) m_out (.a(lo), .b(hi), .sel(sel[1]), .y(y));
endmodule
""",
    "rtl/adder.v": """\
// A ripple-carry adder of N bits with carry in and carry out.
module adder #(parameter N = 8) (
    input  [N-1:0] a,     // first operand
    input  [N-1:0] b,     // second operand
    input          cin,   // carry in
    output [N-1:0] sum,   // a + b + cin, low N bits
    output         cout   // carry out
);
    assign {cout, sum} = a + b + cin;
endmodule

// One bit of a full adder.
module full_adder (input a, b, cin, output s, cout);
    assign s = a ^ b ^ cin;
    assign cout = (a & b) | (cin & (a ^ b));
endmodule
""",
    "rtl/fifo.sv": """\
// A synchronous first-in first-out buffer of DEPTH words of W bits.
// Writes are ignored when full and reads when empty.
module fifo #(
    parameter int W     = 8,
    parameter int DEPTH = 16
) (
    input  logic                   clk,
    input  logic                   rst_n,   // asynchronous reset, active low
    input  logic                   wr_en,   // write din this cycle
    input  logic [W-1:0]           din,
    input  logic                   rd_en,   // read dout this cycle
    output logic [W-1:0]           dout,
    output logic                   full,
    output logic                   empty,
    output logic [$clog2(DEPTH):0] level    // words stored
);
    logic [W-1:0] mem [DEPTH];
    logic [$clog2(DEPTH)-1:0] wp, rp;
    always_ff @(posedge clk or negedge rst_n) begin
        if (!rst_n) begin
            wp <= '0; rp <= '0; level <= '0;
        end else begin
            if (wr_en && !full) begin mem[wp] <= din; wp <= wp + 1'b1; end
            if (rd_en && !empty) begin dout <= mem[rp]; rp <= rp + 1'b1; end
            level <= level + (wr_en && !full) - (rd_en && !empty);
        end
    end
    assign full = level == DEPTH;
    assign empty = level == 0;
endmodule
""",
    "rtl/uart_tx.v": """\
// UART transmitter: sends one byte as a start bit, eight data bits (LSB first) and a stop bit.
// CLKS_PER_BIT is the clock frequency divided by the baud rate.
module uart_tx #(
    parameter CLKS_PER_BIT = 868
) (
    input  wire       clk,
    input  wire       rst,
    input  wire       start,   // pulse high for one cycle to send data
    input  wire [7:0] data,    // the byte to send
    output reg        tx,      // the serial line, idle high
    output wire       busy     // high while a byte is being sent
);
    reg [3:0]  bit_idx;
    reg [15:0] clk_cnt;
    reg [9:0]  shifter;
    reg        active;
    assign busy = active;
    always @(posedge clk) begin
        if (rst) begin
            active <= 1'b0; tx <= 1'b1;
        end else if (!active && start) begin
            shifter <= {1'b1, data, 1'b0}; active <= 1'b1; bit_idx <= 0; clk_cnt <= 0;
        end else if (active) begin
            tx <= shifter[0];
            if (clk_cnt == CLKS_PER_BIT - 1) begin
                clk_cnt <= 0; shifter <= shifter >> 1; bit_idx <= bit_idx + 1'b1;
                if (bit_idx == 9) active <= 1'b0;
            end else clk_cnt <= clk_cnt + 1'b1;
        end
    end
endmodule
""",
    "rtl/shift_reg.v": """\
// A serial-in parallel-out shift register of LEN bits; shifts in on every enabled clock.
module shift_reg #(parameter LEN = 8) (
    input                clk,
    input                en,
    input                din,    // the serial input
    output reg [LEN-1:0] q       // the last LEN bits shifted in, newest in bit 0
);
    always @(posedge clk)
        if (en) q <= {q[LEN-2:0], din};
endmodule
""",
    "rtl/edge_detect.v": """\
// Detects rising and falling edges of a synchronous input signal.
module edge_detect (
    input  wire clk,
    input  wire sig,      // the signal watched
    output wire rise,     // high for one cycle after sig goes high
    output wire fall      // high for one cycle after sig goes low
);
    reg prev;
    always @(posedge clk) prev <= sig;
    assign rise = sig & ~prev;
    assign fall = ~sig & prev;
endmodule
""",
    "rtl/pwm.v": """\
// Pulse-width modulation: out is high for duty of every 2**BITS clock cycles.
module pwm #(parameter BITS = 8) (
    input             clk,
    input             rst,
    input  [BITS-1:0] duty,   // the high time in clock cycles
    output            out
);
    reg [BITS-1:0] phase;
    always @(posedge clk) phase <= rst ? 0 : phase + 1'b1;
    assign out = phase < duty;
endmodule
""",
    "rtl/debounce.v": """\
// Debounces a noisy push button: the output follows the input once it has been stable for STABLE cycles.
module debounce #(parameter STABLE = 50000) (
    input      clk,
    input      btn,       // the raw button input
    output reg clean      // the debounced level
);
    reg [31:0] cnt;
    always @(posedge clk) begin
        if (btn == clean) cnt <= 0;
        else if (cnt == STABLE - 1) begin clean <= btn; cnt <= 0; end
        else cnt <= cnt + 1;
    end
endmodule
""",
    "rtl/alu.v": """\
// A small arithmetic and logic unit.
// op selects the operation: 0 add, 1 subtract, 2 and, 3 or, 4 xor, 5 shift left by one.
module alu #(parameter W = 16) (
    input      [W-1:0] a,
    input      [W-1:0] b,
    input      [2:0]   op,     // the operation
    output reg [W-1:0] y,      // the result
    output             zero    // high when y is zero
);
    always @(*) begin
        case (op)
            3'd0: y = a + b;
            3'd1: y = a - b;
            3'd2: y = a & b;
            3'd3: y = a | b;
            3'd4: y = a ^ b;
            3'd5: y = a << 1;
            default: y = {W{1'b0}};
        endcase
    end
    assign zero = (y == 0);
endmodule
""",
    "rtl/regfile.v": """\
// A register file of 2**AW registers of DW bits: two read ports and one write port.
module regfile #(parameter AW = 5, parameter DW = 32) (
    input           clk,
    input           we,       // write enable
    input  [AW-1:0] waddr,
    input  [DW-1:0] wdata,
    input  [AW-1:0] raddr_a,
    input  [AW-1:0] raddr_b,
    output [DW-1:0] rdata_a,
    output [DW-1:0] rdata_b
);
    reg [DW-1:0] regs [0:(1<<AW)-1];
    always @(posedge clk) if (we) regs[waddr] <= wdata;
    assign rdata_a = regs[raddr_a];
    assign rdata_b = regs[raddr_b];
endmodule
""",
    "rtl/clk_div.v": """\
// Divides the input clock by 2*DIV: the output toggles every DIV input cycles.
module clk_div #(parameter DIV = 4) (
    input      clk_in,
    input      rst,
    output reg clk_out
);
    reg [15:0] cnt;
    always @(posedge clk_in) begin
        if (rst) begin cnt <= 0; clk_out <= 1'b0; end
        else if (cnt == DIV - 1) begin cnt <= 0; clk_out <= ~clk_out; end
        else cnt <= cnt + 1;
    end
endmodule
""",
    "rtl/prio_enc.v": """\
// A priority encoder: idx is the position of the highest set bit of req.
module prio_enc (
    input      [7:0] req,    // the request lines
    output reg [2:0] idx,    // the highest request
    output           valid   // high when any request is set
);
    integer i;
    always @(*) begin
        idx = 3'd0;
        for (i = 0; i < 8; i = i + 1)
            if (req[i]) idx = i[2:0];
    end
    assign valid = |req;
endmodule
""",
    "rtl/sync.v": """\
// A two-flop synchronizer for a single-bit signal crossing into the clk domain.
module sync2 (
    input  clk,
    input  d,     // the asynchronous input
    output q      // d, synchronized to clk
);
    reg s1, s2;
    always @(posedge clk) begin s1 <= d; s2 <= s1; end
    assign q = s2;
endmodule
""",
    "rtl/broken.v": """\
// A module left half written: its header never closes, so it is skipped and counted.
module unfinished (input a, output b
endmodule
""",
    "README.md": "# A small RTL library\n\nCounters, multiplexers, a FIFO and a UART transmitter, for the tests.\n",
}
MODULES = 16  # readable modules in TREE (unfinished is not one of them)


def write_tree(root: Path) -> Path:
    for rel, text in TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def run_script(*args, env_extra: dict, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, WORKBENCH=f"{sys.executable} -m workbench.cli",
               PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


@pytest.mark.slow
def test_the_recipe_runs_every_stage_on_a_small_verilog_tree_and_ends_in_a_working_chat(tmp_path):
    tree = write_tree(tmp_path / "rtl-lib")
    runs, data = tmp_path / "runs", tmp_path / "data"
    quick = "--train.micro_batch_size 4 --train.eval_every 0 --train.sample_tokens 0"
    env = {"RUNS": str(runs), "DATA": str(data), "NAME": "vt", "VOCAB": "500", "PRETRAIN_STEPS": "6",
           "SFT_STEPS": "6", "DPO_STEPS": "4", "N_EVAL": "4", "SEQ_LEN": "256", "MODEL_ARGS": "--model.flavor debug",
           "PRETRAIN_ARGS": quick, "SFT_ARGS": quick, "DPO_ARGS": quick, "EVAL_ARGS": "--exact_match.max_new_tokens 12",
           # the optional GRPO stage on generated checkable questions, two steps of it
           "GRPO": "1", "GRPO_ARGS": f"{quick} --train.steps 2 --objective.group_size 2 --objective.max_new_tokens 8"}
    done = run_script(str(tree), env_extra=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # 1. corpus and tokenizer from the tree
    manifest = json.loads((data / "corpus" / "manifest.json").read_text())
    assert manifest["build"]["source"] == str(tree) and (data / "corpus" / "tokenizer.json").is_file()
    # 2.-5. every run finished with a complete checkpoint; SFT starts from the pretrained run, DPO from SFT
    for name, steps in (("vt-pretrain", 6), ("vt-sft", 6), ("vt-dpo", 4), ("vt-grpo", 2)):
        assert (runs / name / "checkpoints" / f"step-{steps}" / "COMPLETE").is_file(), name
    assert "vt-pretrain" in (runs / "vt-sft" / "config.toml").read_text()
    assert "vt-sft" in (runs / "vt-dpo" / "config.toml").read_text()
    assert "vt-dpo" in (runs / "vt-grpo" / "config.toml").read_text()  # GRPO=1: from the DPO model
    grpo = [json.loads(x) for x in (runs / "vt-grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "accuracy", "format"} <= set(grpo[1]) and "val_accuracy" in grpo[-1]
    # 3. teaching data: every readable module gives its pairs; held out by file
    prefs = {split: lines(data / "preferences" / f"{split}.jsonl") for split in ("train", "val", "sft", "rephrased")}
    subjects = {r["subject"] for split in prefs.values() for r in split}
    assert len(subjects) == MODULES and "unfinished" not in subjects
    train_subjects = {r["subject"] for r in prefs["train"]}
    assert len(prefs["sft"]) == 3 * len(train_subjects) and len(prefs["train"]) == 2 * len(train_subjects)
    assert len(prefs["val"]) == 5 * (MODULES - len(train_subjects)) > 0
    assert len(prefs["rephrased"]) == len(train_subjects)
    assert not {r["source"].split(":")[0] for r in prefs["val"]} & {r["source"].split(":")[0] for r in prefs["train"]}
    assert all(r["language"] == "verilog" and r["kind"] in ("wrong", "terse") for r in prefs["train"])
    instructions = lines(data / "instructions" / "train.jsonl") + lines(data / "instructions" / "val.jsonl")
    kinds = {r["kind"] for r in instructions}
    assert {"ports", "instance", "comment", "definition"} <= kinds
    modules = [m for rel, text in TREE.items() if rel.endswith((".v", ".sv")) for m in vl.parse_modules(text, rel)]
    assert len(modules) == MODULES
    by_source = {f"{m.path}:{m.line}": m for m in modules}
    instances = [r for r in instructions if r["kind"] == "instance"]  # those within the recipe's length limits
    assert len(instances) >= MODULES // 2
    assert all(r["answer"] == vl.instantiation(by_source[r["source"]]) for r in instances)
    sft = lines(data / "sft" / "train.jsonl")  # with GRPO=1, its questions' answer format too
    reasoning = lines(data / "reasoning" / "train.jsonl")
    assert len(sft) == len(lines(data / "instructions" / "train.jsonl")) + len(prefs["sft"]) + len(reasoning)
    # 6. held-out evals of the three models
    for name in ("vt-pretrain", "vt-sft", "vt-dpo"):
        results = json.loads((runs / name / "evals" / "held-out" / "results.json").read_text())["tasks"]
        assert results["exact_match"]["n"] > 0 and results["exact_match"]["details"]["chat"] is True
    dpo = json.loads((runs / "vt-dpo" / "evals" / "held-out" / "results.json").read_text())["tasks"]
    assert dpo["preference"]["n"] == min(4, len(prefs["val"])) and "reward_acc" in dpo["preference"]["metrics"]
    assert "teaching" not in dpo  # a Verilog tree: no Python examples to run
    figures = (runs / "vt-figures.txt").read_text()
    assert "vt-dpo" in figures and "stage times" in figures and figures in done.stdout
    times = dict(line.split("\t") for line in (runs / "vt-times.tsv").read_text().splitlines())
    assert set(times) == {"data", "pretrain", "teaching-data", "sft", "dpo", "grpo", "eval-pretrained", "eval-sft",
                          "eval-dpo", "eval-dpo-reasoning", "eval-grpo"}
    assert "reasoning accuracy on held-out checkable questions (4): vt-dpo" in figures and "-> vt-grpo" in figures
    # 7. the printed chat command answers a piped question with a non-empty reply
    command = next(line for line in done.stdout.splitlines() if " chat --ckpt " in line)
    question = "How do I instantiate uart_tx?"
    chat = subprocess.run(shlex.split(command) + ["--max-new-tokens", "24"], input=question + "\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), chat.stderr
    assert f"--ckpt {runs / 'vt-grpo'}" in command

    # a rerun reuses every stage (data built, runs finished) and prints the same figures' models
    again = run_script(str(tree), env_extra=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "vt-grpo" in again.stdout


def test_bad_source_trees_are_named(tmp_path):
    env = {"RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data")}
    done = run_script(str(tmp_path / "missing"), env_extra=env, timeout=60)
    assert done.returncode == 2 and "SOURCE_TREE" in done.stderr and "does not exist" in done.stderr
    (tmp_path / "file.v").write_text("module m; endmodule\n")
    done = run_script(str(tmp_path / "file.v"), env_extra=env, timeout=60)
    assert done.returncode == 2 and "is not a folder" in done.stderr
    (tmp_path / "c-only").mkdir()
    (tmp_path / "c-only" / "main.c").write_text("int main(void) { return 0; }\n")
    done = run_script(str(tmp_path / "c-only"), env_extra=env, timeout=60)
    assert done.returncode == 2 and "no Python (.py) or Verilog (.v, .sv) files" in done.stderr
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":
    print(write_tree(Path(sys.argv[1])))
