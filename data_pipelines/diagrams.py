"""Diagram documents for a small vision-language model: flowcharts, logic circuits with their Verilog netlists,
and captioned shapes, each with questions whose exact short answers need the picture.

Everything is derived from a known structure, drawn from a seeded `random.Random`, so the answers are correct
by construction and the same seed gives the same data. This file holds the structures, their questions and
answers, the circuits' netlists with a simulator and a netlist evaluator, and the answer statistics;
`data_pipelines.diagram_render` draws them (PIL) and makes PDF pages; `data_pipelines.vision_shards` writes
the webdataset shards read back by `workbench.data.vision`.

Structures (plain JSON dicts: they travel in each sample's JSON and are all a renderer needs)
    flowchart  {"nodes": [{"id", "kind": start|step|decision|end, "label", "row", "col"}],
                "edges": [{"src", "dst", "label": ""|"yes"|"no", "route": main|side|rejoin|loop}]}
               A main column from `start` to `end` with 2 middle rows (3 in 30 % of charts) of steps and one
               or two decisions: 4 or 5 rows in all, so the words stay readable at 64-96 px. A decision's "yes"
               continues down the main column; its "no" goes right, either to a side step that rejoins the main column below the
               decision, or back up to an earlier step (a loop). Labels are distinct words from `STEP_WORDS`
               and `DECISION_WORDS`.
    circuit    {"name": "circuit_00042", "inputs": ["A", "B", ...], "gates": [{"name": "G1", "type": "AND",
                "inputs": [nets], "output": net, "level", "y"}], "outputs": {"Y": "G2", ...}, "input_y": [...]}
               2-4 inputs, 1-4 gates of `GATES` (NOT takes one input, the others two), gate k reading only
               inputs and earlier gates, every input and every gate output used, no constant output,
               at most `MAX_LEVELS` = 2 levels (gate columns).
               Y is driven by the last gate; a second output Z by another gate whose output nothing else
               reads, when there is one. Nets: an input's name, the output port's name for a gate that drives
               one, `n<k>` otherwise. "level", "y", "input_y" and "channels" are the drawing's layout (placed by
               `diagram_render.layout_circuit`, which refuses layouts where wires overlap or cross a gate).
    shapes     {"shapes": [{"shape", "colour", "x", "y", "r"}], "arrangement": single|horizontal|vertical|row|
                column}: 1-3 shapes of distinct kinds and distinct colours from `SHAPES` x `COLOURS`.

Questions (`flowchart_qa`, `circuit_qa`, `shapes_qa`: lists of {"question", "answer", "type"}; every answer
is computed from the structure)
    flowchart  next_step   "What step follows mix?" -> the label of the step's successor, asked only where
                           that is a labelled node (a step or a decision), since "end" would be a shortcut
               branch_no   "What happens if hot is no?" -> the label the decision's "no" arrow points to
               branch_yes  "What happens if hot is yes?" -> the label its "yes" arrow points to (not asked where
                           that is `end`, for the same reason)
    circuit    output      "What is the output Y for A=1, B=0?" -> "1" or "0"; the input row is chosen so
                           that 0 and 1 are equally likely answers (a coin picks the answer, then a row with it)
               driver      "Which gate drives Y?" -> the type of the gate whose output is Y, e.g. "XOR"
               gate_type   "What type of gate is G2?" -> e.g. "NAND", about a gate that drives no output when
                           there is one (the driver questions cover the others); none for a one-gate circuit
    shapes     caption     "Describe the image." -> the caption ("a red circle above a blue square")
               colour      "What colour is the circle?" -> "red"
               shape       "Which shape is blue?" -> "square"
               count       "How many shapes are there?" -> "2"
Every sample also has a caption (for flowcharts and circuits a sentence built from the structure) used by the
PDF pages.

Netlists (`netlist(circuit)`): a structural gate-level Verilog module with Verilog's gate primitives, the
output first (`and G1(n1, A, B);`), under a header comment stating the function, so that
`data_pipelines.verilog.parse_modules` reads it and the expert-chatbot recipe can learn from the tree.
`truth_table(circuit)` simulates the structure; `netlist_truth_table(text)` evaluates the Verilog text
(gate primitives only) independently, and the shard writer checks that they agree for every circuit.

Answer statistics (`answer_stats`, `blind_accuracy`): per question type, the share of the most common answer,
and the accuracy of a blind guesser that knows the question text but not the picture (the most common
answer of that exact question on the train split, else of its type): the level a model must clearly beat
to show it reads the image.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

KINDS = ("flowchart", "circuit", "shapes")
STEP_WORDS = ("mix", "heat", "cool", "wash", "dry", "cut", "fold", "pack", "load", "send", "sort", "fill",
              "read", "save", "test", "wait")
DECISION_WORDS = ("hot", "full", "done", "ok", "wet", "ready", "late", "big", "safe", "open")
GATES = ("AND", "OR", "NOT", "NAND", "NOR", "XOR")
INPUT_NAMES = ("A", "B", "C", "D")
OUTPUT_NAMES = ("Y", "Z")
# draws of 1-4 gates; larger circuits are refused more often (levels, unread outputs, clashing wires), so
# they are drawn more (kept: about 23 % one gate, 44 % two, 26 % three, 7 % four)
GATE_COUNT_WEIGHTS = (1, 2, 6, 14)
MAX_LEVELS = 2  # gate columns: a third makes gates and their names a few pixels wide at 96 px
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 225), "yellow": (240, 200, 0),
           "purple": (140, 50, 175), "orange": (245, 130, 0)}
QA_TYPES = {"flowchart": ("next_step", "branch_no", "branch_yes"), "circuit": ("output", "driver", "gate_type"),
            "shapes": ("caption", "colour", "shape", "count")}


# ---------------------------------------------------------------------------------------------- flowcharts


def make_flowchart(rng: random.Random) -> dict:
    """A random flowchart structure (see the module notes)."""
    n_dec = 2 if rng.random() < 0.3 else 1
    n_mid = 3 if rng.random() < 0.3 else 2  # middle rows: 4 or 5 rows with start and end (4 read better)
    kinds = ["decision"] * n_dec + ["step"] * (n_mid - n_dec)
    rng.shuffle(kinds)
    steps = iter(rng.sample(STEP_WORDS, 6))
    decisions = iter(rng.sample(DECISION_WORDS, 2))
    nodes = [{"id": "n0", "kind": "start", "label": "start", "row": 0, "col": 0}]
    for r, kind in enumerate(kinds, start=1):
        nodes.append({"id": f"n{r}", "kind": kind, "label": next(decisions if kind == "decision" else steps),
                      "row": r, "col": 0})
    end = {"id": f"n{n_mid + 1}", "kind": "end", "label": "end", "row": n_mid + 1, "col": 0}
    nodes.append(end)
    main = nodes[:]
    edges = []
    side_rows: set[int] = set()  # rows of the right column taken by side steps or loop spans
    for i, node in enumerate(main[:-1]):
        nxt = main[i + 1]
        if node["kind"] != "decision":
            edges.append({"src": node["id"], "dst": nxt["id"], "label": "", "route": "main"})
            continue
        edges.append({"src": node["id"], "dst": nxt["id"], "label": "yes", "route": "main"})
        r = node["row"]
        loop_targets = [m for m in main[1:i] if m["kind"] == "step"
                        and not side_rows & set(range(m["row"], r + 1))]
        if loop_targets and rng.random() < 0.4:
            target = rng.choice(loop_targets)
            side_rows |= set(range(target["row"], r + 1))
            edges.append({"src": node["id"], "dst": target["id"], "label": "no", "route": "loop"})
        else:
            side = {"id": f"s{r}", "kind": "step", "label": next(steps), "row": r, "col": 1}
            nodes.append(side)
            side_rows.add(r)
            edges.append({"src": node["id"], "dst": side["id"], "label": "no", "route": "side"})
            edges.append({"src": side["id"], "dst": nxt["id"], "label": "", "route": "rejoin"})
    return {"nodes": nodes, "edges": edges}


def _node(chart: dict, node_id: str) -> dict:
    return next(n for n in chart["nodes"] if n["id"] == node_id)


def flowchart_qa(chart: dict, rng: random.Random) -> list[dict]:
    qa = []
    out: dict[str, list[dict]] = defaultdict(list)
    for e in chart["edges"]:
        out[e["src"]].append(e)
    steps = [n for n in chart["nodes"] if n["kind"] == "step"]
    askable = [n for n in steps if _node(chart, out[n["id"]][0]["dst"])["kind"] in ("step", "decision")]
    for n in rng.sample(askable, min(2, len(askable))):
        qa.append({"question": f"What step follows {n['label']}?",
                   "answer": _node(chart, out[n["id"]][0]["dst"])["label"], "type": "next_step"})
    for n in chart["nodes"]:
        if n["kind"] != "decision":
            continue
        for e in out[n["id"]]:
            if _node(chart, e["dst"])["kind"] == "end":  # as for next_step: "end" would be a shortcut answer
                continue
            qa.append({"question": f"What happens if {n['label']} is {e['label']}?",
                       "answer": _node(chart, e["dst"])["label"], "type": f"branch_{e['label']}"})
    return qa


def flowchart_caption(chart: dict) -> str:
    out = {(e["src"], e["label"]): e["dst"] for e in chart["edges"]}
    parts = []
    for n in sorted((n for n in chart["nodes"] if n["col"] == 0), key=lambda n: n["row"]):
        if n["kind"] == "decision":
            yes, no = _node(chart, out[n["id"], "yes"]), _node(chart, out[n["id"], "no"])
            again = " again" if no["row"] < n["row"] and no["col"] == 0 else ""
            parts.append(f"if {n['label']} then {yes['label']}, else {no['label']}{again}")
        elif n["kind"] == "step":
            parts.append(n["label"])
    return "A flowchart: start, " + ", ".join(parts) + ", end."


# ---------------------------------------------------------------------------------------------- circuits


def _gate_value(kind: str, args: Sequence[int]) -> int:
    if kind == "NOT":
        return 1 - args[0]
    a, b = args
    return {"AND": a & b, "OR": a | b, "NAND": 1 - (a & b), "NOR": 1 - (a | b), "XOR": a ^ b, "XNOR": 1 - (a ^ b)}[kind]


def make_circuit(rng: random.Random, name: str) -> dict:
    """A random circuit structure without layout (see the module notes), drawn by rejection: gates take their
    inputs preferably from nets nothing reads yet, and a draw is kept when every input and every gate output
    is read (but the outputs'), no output is constant and there are at most `MAX_LEVELS` levels.
    `diagram_render.layout_circuit` adds "level"/"y" or refuses it, and the caller draws another."""
    while True:
        n_gates = rng.choices((1, 2, 3, 4), weights=GATE_COUNT_WEIGHTS)[0]
        types = [rng.choice(GATES) for _ in range(n_gates)]
        slots = sum(1 if t == "NOT" else 2 for t in types)
        most = min(len(INPUT_NAMES), slots - (n_gates - 1))  # each gate but the last feeds a later gate
        if most < 2:
            continue
        inputs = list(INPUT_NAMES[: rng.randint(2, most)])
        gates: list[dict] = []
        unread = list(inputs)  # nets nothing reads yet
        level = dict.fromkeys(inputs, 0)
        for k, t in enumerate(types):
            chosen: list[str] = []
            for _ in range(1 if t == "NOT" else 2):
                fresh = [s for s in unread if s not in chosen]
                every = [s for s in inputs + [g["output"] for g in gates] if s not in chosen]
                chosen.append(rng.choice(fresh if fresh and rng.random() < 0.85 else every))
            unread = [s for s in unread if s not in chosen] + [f"n{k + 1}"]
            level[f"n{k + 1}"] = 1 + max(level[s] for s in chosen)
            gates.append({"name": f"G{k + 1}", "type": t, "inputs": chosen, "output": f"n{k + 1}"})
        if any(s in inputs for s in unread) or len(unread) > 2 or max(level.values()) > MAX_LEVELS:
            continue
        outputs = {"Y": gates[-1]["name"]}
        if len(unread) == 2:
            outputs["Z"] = next(g["name"] for g in gates if g["output"] == unread[0])
        rename = {}
        for port, gname in outputs.items():
            g = next(g for g in gates if g["name"] == gname)
            rename[g["output"]] = port
            g["output"] = port
        for g in gates:
            g["inputs"] = [rename.get(s, s) for s in g["inputs"]]
        circuit = {"name": name, "inputs": inputs, "gates": gates, "outputs": outputs}
        if all(len(set(v)) == 2 for v in truth_table(circuit).values()):
            return circuit


def simulate(circuit: dict, values: dict[str, int]) -> dict[str, int]:
    """Every net's value for one input assignment (gates are in topological order by construction)."""
    nets = dict(values)
    for g in circuit["gates"]:
        nets[g["output"]] = _gate_value(g["type"], [nets[s] for s in g["inputs"]])
    return nets


def truth_table(circuit: dict) -> dict[str, list[int]]:
    """{output: [value for each input row]}, rows in binary order of the inputs (first input most significant)."""
    table: dict[str, list[int]] = {o: [] for o in circuit["outputs"]}
    for row in itertools.product((0, 1), repeat=len(circuit["inputs"])):
        nets = simulate(circuit, dict(zip(circuit["inputs"], row)))
        for o in table:
            table[o].append(nets[o])
    return table


def expression(circuit: dict, net: str, top: bool = True) -> str:
    """The net as a formula over the inputs, e.g. "(A AND B) XOR C"."""
    gate = next((g for g in circuit["gates"] if g["output"] == net), None)
    if gate is None:
        return net
    args = [expression(circuit, s, top=False) for s in gate["inputs"]]
    text = f"NOT {args[0]}" if gate["type"] == "NOT" else f"{args[0]} {gate['type']} {args[1]}"
    return text if top else f"({text})"


def circuit_caption(circuit: dict) -> str:
    gates = ", ".join(f"{g['name']} ({g['type']})" for g in circuit["gates"])
    funcs = "; ".join(f"{o} = {expression(circuit, o)}" for o in circuit["outputs"])
    return f"A logic circuit with inputs {', '.join(circuit['inputs'])} and gates {gates}: {funcs}."


def circuit_qa(circuit: dict, rng: random.Random) -> list[dict]:
    qa = []
    table = truth_table(circuit)
    rows = list(itertools.product((0, 1), repeat=len(circuit["inputs"])))
    for out in circuit["outputs"]:
        want = rng.randint(0, 1)
        matching = [r for r, v in zip(rows, table[out]) if v == want] or rows
        row = rng.choice(matching)
        assign = ", ".join(f"{n}={v}" for n, v in zip(circuit["inputs"], row))
        qa.append({"question": f"What is the output {out} for {assign}?",
                   "answer": str(table[out][rows.index(row)]), "type": "output"})
        driver = next(g for g in circuit["gates"] if g["name"] == circuit["outputs"][out])
        qa.append({"question": f"Which gate drives {out}?", "answer": driver["type"], "type": "driver"})
    # a gate that drives no output, when there is one: the driver questions already ask about the others
    # (a one-gate circuit's only gate drives Y, so it gets no gate_type question)
    drivers = set(circuit["outputs"].values())
    gates = circuit["gates"] if len(circuit["gates"]) > 1 else []
    choices = [g for g in gates if g["name"] not in drivers] or gates
    if choices:
        g = rng.choice(choices)
        qa.append({"question": f"What type of gate is {g['name']}?", "answer": g["type"], "type": "gate_type"})
    return qa


def netlist(circuit: dict) -> str:
    """The circuit as a structural gate-level Verilog module (see the module notes)."""
    name, ins, outs = circuit["name"], circuit["inputs"], list(circuit["outputs"])
    funcs = "; ".join(f"{o} = {expression(circuit, o)}" for o in outs)
    wires = [g["output"] for g in circuit["gates"] if g["output"] not in outs]
    gates = ", ".join(f"{g['name']} {g['type']}" for g in circuit["gates"])
    lines = [f"// Combinational logic computing {funcs}.",  # short: the instruction makers skip long comments
             "//",
             f"// Gate-level netlist of diagram {name}: {gates}.",
             f"module {name}(" + ", ".join([f"input {i}" for i in ins] + [f"output {o}" for o in outs]) + ");"]
    if wires:
        lines.append(f"  wire {', '.join(wires)};")
    for g in circuit["gates"]:
        lines.append(f"  {g['type'].lower()} {g['name']}({', '.join([g['output']] + g['inputs'])});")
    lines.append("endmodule")
    return "\n".join(lines) + "\n"


# Verilog's gate primitives, written apart from `_gate_value` so the netlist check does not share its code
PRIMITIVES = {"and": lambda v: int(all(v)), "or": lambda v: int(any(v)), "nand": lambda v: int(not all(v)),
              "nor": lambda v: int(not any(v)), "xor": lambda v: sum(v) % 2, "xnor": lambda v: 1 - sum(v) % 2,
              "not": lambda v: 1 - v[0]}
_MODULE_RE = re.compile(r"\bmodule\s+(\w+)\s*\((.*?)\)\s*;(.*?)\bendmodule\b", re.S)
_GATE_RE = re.compile(r"^\s*(and|or|not|nand|nor|xor|xnor)\s+(?:\w+\s*)?\(([^)]*)\)\s*;", re.M)


def netlist_truth_table(text: str) -> dict[str, list[int]]:
    """Evaluate a gate-level Verilog module from its text alone: {output: values}, rows in binary order of the
    inputs as declared. Only ANSI scalar ports and gate primitives are understood; anything else in the body
    (assignments, instances of modules) is a ValueError, as is a net no gate drives."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    m = _MODULE_RE.search(text)
    if m is None:
        raise ValueError("no `module NAME(...); ... endmodule` found")
    ins, outs = [], []
    for port in m.group(2).split(","):
        words = port.split()
        if len(words) != 2 or words[0] not in ("input", "output"):
            raise ValueError(f"port {port.strip()!r}: expected `input NAME` or `output NAME`")
        (ins if words[0] == "input" else outs).append(words[1])
    body = re.sub(r"^\s*wire\b[^;]*;", "", m.group(3), flags=re.M)
    gates = []
    for g in _GATE_RE.finditer(body):
        nets = [s.strip() for s in g.group(2).split(",")]
        gates.append((g.group(1), nets[0], nets[1:]))
    rest = _GATE_RE.sub("", body).strip()
    if rest:
        raise ValueError(f"cannot evaluate {rest.splitlines()[0]!r}: only gate primitives are understood")
    table: dict[str, list[int]] = {o: [] for o in outs}
    for row in itertools.product((0, 1), repeat=len(ins)):
        nets = dict(zip(ins, row))
        pending = list(gates)
        while pending:  # any order in the text: evaluate a gate once its inputs are known
            ready = [g for g in pending if all(s in nets for s in g[2])]
            if not ready:
                raise ValueError(f"nets {sorted({s for g in pending for s in g[2]} - set(nets))} are never driven")
            for kind, out, args in ready:
                if kind == "not" and len(args) != 1 or kind != "not" and len(args) < 2:
                    raise ValueError(f"gate {kind} driving {out}: wrong number of inputs ({len(args)})")
                nets[out] = PRIMITIVES[kind]([nets[a] for a in args])
                pending.remove((kind, out, args))
        for o in outs:
            if o not in nets:
                raise ValueError(f"output {o} is never driven")
            table[o].append(nets[o])
    return table


# ---------------------------------------------------------------------------------------------- shapes


def make_shapes(rng: random.Random) -> dict:
    n = rng.randint(1, 3)
    kinds, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    if n == 1:
        arrangement, centres = "single", [(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))]
        radius = rng.uniform(0.2, 0.27)
    elif n == 2:
        arrangement = rng.choice(("horizontal", "vertical"))
        across = [rng.uniform(0.35, 0.65) for _ in range(2)]
        along = (rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.78))
        centres = [(a, c) if arrangement == "horizontal" else (c, a) for a, c in zip(along, across)]
        radius = rng.uniform(0.15, 0.19)
    else:
        arrangement = rng.choice(("row", "column"))
        across = rng.uniform(0.4, 0.6)
        centres = [(a, across) if arrangement == "row" else (across, a) for a in (0.18, 0.5, 0.82)]
        radius = rng.uniform(0.11, 0.14)
    shapes = [{"shape": k, "colour": c, "x": round(x, 4), "y": round(y, 4), "r": round(radius, 4)}
              for k, c, (x, y) in zip(kinds, colours, centres)]
    return {"shapes": shapes, "arrangement": arrangement}


def shapes_caption(s: dict) -> str:
    name = [f"{'an' if x['colour'][0] in 'aeiou' else 'a'} {x['colour']} {x['shape']}" for x in s["shapes"]]
    if s["arrangement"] == "single":
        return name[0]
    if len(name) == 2:
        horizontal = s["arrangement"] == "horizontal"
        first_before = s["shapes"][0]["x" if horizontal else "y"] < s["shapes"][1]["x" if horizontal else "y"]
        relation = ("to the left of" if first_before else "to the right of") if horizontal else \
                   ("above" if first_before else "below")
        return f"{name[0]} {relation} {name[1]}"
    order = "from left to right" if s["arrangement"] == "row" else "from top to bottom"
    return f"{name[0]}, {name[1]} and {name[2]}, {order}"


def shapes_qa(s: dict, rng: random.Random) -> list[dict]:
    one = rng.choice(s["shapes"])
    other = rng.choice(s["shapes"])
    return [{"question": "Describe the image.", "answer": shapes_caption(s), "type": "caption"},
            {"question": f"What colour is the {one['shape']}?", "answer": one["colour"], "type": "colour"},
            {"question": f"Which shape is {other['colour']}?", "answer": other["shape"], "type": "shape"},
            {"question": "How many shapes are there?", "answer": str(len(s["shapes"])), "type": "count"}]


def shuffle_shapes(s: dict, rng: random.Random) -> dict:
    """The caption names the shapes in list order; a shuffled list varies which one is named first."""
    shapes = s["shapes"][:]
    rng.shuffle(shapes)
    if s["arrangement"] in ("row", "column"):  # these captions name them in reading order
        shapes.sort(key=lambda x: x["x"] if s["arrangement"] == "row" else x["y"])
    return {**s, "shapes": shapes}


# ---------------------------------------------------------------------------------------------- samples


def make_sample(kind: str, rng: random.Random, sample_id: str, layout=None) -> dict:
    """One sample's JSON: {"id", "kind", "caption", "qa", ...the structure}. `layout(circuit, rng)` places a
    circuit's gates (returns None when it cannot be drawn cleanly; another circuit is drawn then)."""
    if kind == "flowchart":
        chart = make_flowchart(rng)
        return {"id": sample_id, "kind": kind, "caption": flowchart_caption(chart), "qa": flowchart_qa(chart, rng),
                **chart}
    if kind == "circuit":
        while True:
            circuit = make_circuit(rng, sample_id)
            if layout is None or layout(circuit, rng) is not None:
                break
        return {"id": sample_id, "kind": kind, "caption": circuit_caption(circuit), "qa": circuit_qa(circuit, rng),
                **circuit, "netlist": netlist(circuit)}
    if kind == "shapes":
        s = shuffle_shapes(make_shapes(rng), rng)
        return {"id": sample_id, "kind": kind, "caption": shapes_caption(s), "qa": shapes_qa(s, rng), **s}
    raise ValueError(f"unknown diagram kind {kind!r} (known: {', '.join(KINDS)})")


def signature(sample: dict) -> str:
    """What the picture shows, without ids and question choices: equal signatures mean the same picture (a
    circuit's includes its layout, a shapes picture its positions)."""
    if sample["kind"] == "flowchart":
        return repr((sample["nodes"], sample["edges"]))
    if sample["kind"] == "circuit":
        return repr((sample["inputs"], sample.get("input_y"),
                     [(g["type"], g["inputs"], g["output"], g.get("y")) for g in sample["gates"]]))
    return repr(sample["shapes"])


def answer_stats(samples: Sequence[dict]) -> dict[str, dict]:
    """Per question type: questions, distinct answers, the most common answer and its share."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        for q in s["qa"]:
            by_type[q["type"]][q["answer"]] += 1
    out = {}
    for t, c in sorted(by_type.items()):
        top, n = c.most_common(1)[0]
        out[t] = {"n": sum(c.values()), "distinct": len(c), "top": top, "top_share": n / sum(c.values())}
    return out


def blind_accuracy(train: Sequence[dict], test: Sequence[dict]) -> dict[str, float]:
    """Per question type, the accuracy on `test` of a guesser that never sees the picture: the most common train
    answer of the same question text, or of the question's type when the text never occurred in train."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        for q in s["qa"]:
            by_question[q["question"]][q["answer"]] += 1
            by_type[q["type"]][q["answer"]] += 1
    hits: dict[str, list[int]] = defaultdict(list)
    for s in test:
        for q in s["qa"]:
            table = by_question.get(q["question"]) or by_type.get(q["type"])
            guess = table.most_common(1)[0][0] if table else ""
            hits[q["type"]].append(guess == q["answer"])
    return {t: sum(h) / len(h) for t, h in sorted(hits.items())}
