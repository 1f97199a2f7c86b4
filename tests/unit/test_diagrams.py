"""The diagram documents (data_pipelines/diagrams.py, diagram_render.py, vision_shards.py) and their reader
(workbench/data/vision.py): netlists compute their circuits, the Verilog reader and the expert-chatbot makers
read them, answers come from the structure and need the picture, pictures are deterministic and drawn where
the structure says, and the shards round trip through load_vision_split, which refuses damaged files."""

import itertools
import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from data_pipelines import diagram_render as dr
from data_pipelines import diagrams as dg
from data_pipelines import verilog as vl
from data_pipelines import vision_shards as vs
from workbench.data.vision import build_vision_dataset, load_vision_manifest, load_vision_split
from workbench.errors import DataError

# hand-made structures: answers below are worked out by hand, not by the code under test
CIRCUIT = {"name": "circuit_hand", "inputs": ["A", "B", "C"],
           "gates": [{"name": "G1", "type": "AND", "inputs": ["A", "B"], "output": "n1"},
                     {"name": "G2", "type": "XOR", "inputs": ["n1", "C"], "output": "Y"},
                     {"name": "G3", "type": "NOT", "inputs": ["C"], "output": "Z"}],
           "outputs": {"Y": "G2", "Z": "G3"}}
FLOW = {"nodes": [{"id": "n0", "kind": "start", "label": "start", "row": 0, "col": 0},
                  {"id": "n1", "kind": "step", "label": "mix", "row": 1, "col": 0},
                  {"id": "n2", "kind": "decision", "label": "hot", "row": 2, "col": 0},
                  {"id": "n3", "kind": "step", "label": "wait", "row": 3, "col": 0},
                  {"id": "n4", "kind": "end", "label": "end", "row": 4, "col": 0},
                  {"id": "s2", "kind": "step", "label": "cool", "row": 2, "col": 1}],
        "edges": [{"src": "n0", "dst": "n1", "label": "", "route": "main"},
                  {"src": "n1", "dst": "n2", "label": "", "route": "main"},
                  {"src": "n2", "dst": "n3", "label": "yes", "route": "main"},
                  {"src": "n2", "dst": "s2", "label": "no", "route": "side"},
                  {"src": "s2", "dst": "n3", "label": "", "route": "rejoin"},
                  {"src": "n3", "dst": "n4", "label": "", "route": "main"}]}


def test_hand_made_circuit_truth_table_netlist_and_questions():
    table = dg.truth_table(CIRCUIT)
    rows = list(itertools.product((0, 1), repeat=3))
    assert table["Y"] == [(a & b) ^ c for a, b, c in rows]
    assert table["Z"] == [1 - c for _, _, c in rows]
    text = dg.netlist(CIRCUIT)
    assert "and G1(n1, A, B);" in text and "xor G2(Y, n1, C);" in text and "not G3(Z, C);" in text
    assert "module circuit_hand(input A, input B, input C, output Y, output Z);" in text
    assert dg.netlist_truth_table(text) == table
    assert dg.expression(CIRCUIT, "Y") == "(A AND B) XOR C"
    seen = Counter()
    for seed in range(40):
        for q in dg.circuit_qa(CIRCUIT, random.Random(seed)):
            seen[q["type"]] += 1
            if q["type"] == "output":
                out = q["question"].split()[4]
                values = dict(kv.split("=") for kv in q["question"].rstrip("?").split(" for ")[1].split(", "))
                a, b, c = (int(values[k]) for k in "ABC")
                assert q["answer"] == str((a & b) ^ c if out == "Y" else 1 - c)
            elif q["type"] == "driver":
                assert (q["question"], q["answer"]) in {("Which gate drives Y?", "XOR"), ("Which gate drives Z?", "NOT")}
            else:
                name = q["question"].split()[-1].rstrip("?")
                assert q["answer"] == {"G1": "AND", "G2": "XOR", "G3": "NOT"}[name]
    assert seen == {"output": 80, "driver": 80, "gate_type": 40}  # always G1: G2 and G3 drive outputs
    one = {"name": "one", "inputs": ["A", "B"], "outputs": {"Y": "G1"},
           "gates": [{"name": "G1", "type": "NOR", "inputs": ["A", "B"], "output": "Y"}]}
    assert [q["type"] for q in dg.circuit_qa(one, random.Random(0))] == ["output", "driver"]  # no repeat


def test_netlist_evaluator_reads_any_gate_order_and_refuses_what_it_cannot_evaluate():
    adder = """// a half adder, gates listed out of order
    module half(input A, input B, output S, output C);
      wire t;
      nand G3(C, t, t);
      xor G1(S, A, B);
      nand G2(t, A, B);
    endmodule"""
    assert dg.netlist_truth_table(adder) == {"S": [0, 1, 1, 0], "C": [0, 0, 0, 1]}
    every = ("module all(input A, input B, output P, output Q, output R, output S, output T, output U, output V);\n"
             + "".join(f"  {g} g{i}({o}, A{', B' if g != 'not' else ''});\n"
                       for i, (g, o) in enumerate(zip(("and", "or", "nand", "nor", "xor", "xnor", "not"), "PQRSTUV")))
             + "endmodule")
    assert dg.netlist_truth_table(every) == {"P": [0, 0, 0, 1], "Q": [0, 1, 1, 1], "R": [1, 1, 1, 0],
                                             "S": [1, 0, 0, 0], "T": [0, 1, 1, 0], "U": [1, 0, 0, 1], "V": [1, 1, 0, 0]}
    for kind, want in (("AND", [0, 0, 0, 1]), ("OR", [0, 1, 1, 1]), ("NAND", [1, 1, 1, 0]), ("NOR", [1, 0, 0, 0]),
                       ("XOR", [0, 1, 1, 0])):  # the structure's simulator, gate by gate
        one = {"inputs": ["A", "B"], "gates": [{"name": "G1", "type": kind, "inputs": ["A", "B"], "output": "Y"}],
               "outputs": {"Y": "G1"}}
        assert dg.truth_table(one) == {"Y": want}
    with pytest.raises(ValueError, match="never driven"):
        dg.netlist_truth_table("module m(input A, output Y); and G1(Y, A, q); endmodule")
    with pytest.raises(ValueError, match="only gate primitives"):
        dg.netlist_truth_table("module m(input A, output Y); assign Y = A; endmodule")


def test_generated_netlists_match_their_circuits_and_verilog_parse_modules_reads_them():
    stats = Counter()
    for i in range(150):
        s = dg.make_sample("circuit", random.Random(i), f"circuit_{i:05d}", layout=dr.layout_circuit)
        assert dg.netlist_truth_table(s["netlist"]) == dg.truth_table(s)
        assert all(len(set(v)) == 2 for v in dg.truth_table(s).values())  # no constant output
        assert {s["outputs"]["Y"]} == {s["gates"][-1]["name"]}
        (module,) = vl.parse_modules(s["netlist"], f"{s['name']}.v", stats)
        assert module.name == s["name"]
        assert [(p.name, p.direction) for p in module.ports] == \
            [(n, "input") for n in s["inputs"]] + [(o, "output") for o in s["outputs"]]
        assert module.description.startswith("Combinational logic computing Y = ")
        read = {n for g in s["gates"] for n in g["inputs"]}
        assert set(s["inputs"]) <= read  # every input is used
        assert {g["output"] for g in s["gates"]} - read == set(s["outputs"])  # every other gate output is read
        assert max(g["level"] for g in s["gates"]) <= dg.MAX_LEVELS
    assert sum(stats.values()) == 0  # nothing skipped


def test_hand_made_flowchart_questions_and_caption():
    qa = {(q["question"], q["answer"], q["type"]) for q in dg.flowchart_qa(FLOW, random.Random(0))}
    assert qa == {("What step follows mix?", "hot", "next_step"), ("What step follows cool?", "wait", "next_step"),
                  ("What happens if hot is yes?", "wait", "branch_yes"),
                  ("What happens if hot is no?", "cool", "branch_no")}  # "wait" -> "end" is not asked
    assert dg.flowchart_caption(FLOW) == "A flowchart: start, mix, if hot then wait, else cool, wait, end."
    loop = json.loads(json.dumps(FLOW))
    loop["nodes"].pop()
    loop["edges"][3:5] = [{"src": "n2", "dst": "n1", "label": "no", "route": "loop"}]
    assert {q["answer"] for q in dg.flowchart_qa(loop, random.Random(0)) if q["type"] == "branch_no"} == {"mix"}
    assert "else mix again" in dg.flowchart_caption(loop)


def test_generated_flowcharts_are_well_formed():
    for i in range(200):
        f = dg.make_flowchart(random.Random(i))
        labels = [n["label"] for n in f["nodes"] if n["kind"] in ("step", "decision")]
        assert len(labels) == len(set(labels))  # distinct words: a question names one node
        assert 1 + max(n["row"] for n in f["nodes"]) <= 5
        decisions = [n for n in f["nodes"] if n["kind"] == "decision"]
        assert 1 <= len(decisions) <= 2
        for d in decisions:
            assert sorted(e["label"] for e in f["edges"] if e["src"] == d["id"]) == ["no", "yes"]
        out = Counter(e["src"] for e in f["edges"])
        assert all(out[n["id"]] == (2 if n["kind"] == "decision" else 0 if n["kind"] == "end" else 1)
                   for n in f["nodes"])


def test_shapes_captions_and_questions():
    s = {"shapes": [{"shape": "circle", "colour": "red", "x": 0.7, "y": 0.5, "r": 0.15},
                    {"shape": "square", "colour": "orange", "x": 0.3, "y": 0.5, "r": 0.15}],
         "arrangement": "horizontal"}
    assert dg.shapes_caption(s) == "a red circle to the right of an orange square"
    vertical = {**s, "arrangement": "vertical", "shapes": [{**s["shapes"][0], "x": 0.5, "y": 0.2},
                                                             {**s["shapes"][1], "x": 0.5, "y": 0.8}]}
    assert dg.shapes_caption(vertical) == "a red circle above an orange square"
    for seed in range(20):
        qa = {q["type"]: q for q in dg.shapes_qa(s, random.Random(seed))}
        colour_of = {"circle": "red", "square": "orange"}
        assert qa["colour"]["answer"] == colour_of[qa["colour"]["question"].split()[-1].rstrip("?")]
        assert qa["shape"]["answer"] == {"red": "circle", "orange": "square"}[qa["shape"]["question"].split()[-1][:-1]]
        assert qa["count"]["answer"] == "2" and qa["caption"]["answer"] == dg.shapes_caption(s)


def test_pictures_are_deterministic_and_drawn_where_the_structure_says():
    s = {"kind": "shapes", "shapes": [{"shape": k, "colour": c, "x": x, "y": 0.5, "r": 0.1}
                                      for k, c, x in (("circle", "red", 0.18), ("star", "blue", 0.5),
                                                      ("triangle", "yellow", 0.82))], "arrangement": "row"}
    for size in (64, 96):
        im = np.asarray(dr.render(s, size))
        assert im.shape == (size, size, 3) and np.array_equal(im, np.asarray(dr.render(s, size)))
        for x in s["shapes"]:
            centre = im[int(0.5 * size), int(x["x"] * size)].astype(int)
            assert np.abs(centre - dg.COLOURS[x["colour"]]).max() <= 10, (x, centre)
        assert (im[2, 2] == 255).all()  # background
    # a flowchart label is drawn inside its own box: changing one word changes only that box's pixels
    other = json.loads(json.dumps(FLOW))
    other["nodes"][1]["label"] = "fold"
    a, b = (np.asarray(dr.render({"kind": "flowchart", **f}, 96)).astype(int) for f in (FLOW, other))
    rows, cols = np.nonzero(np.abs(a - b).sum(-1))
    assert len(rows) > 20
    box_y, half_h = (1 + 0.5) / 5, dr.BOX_H / 5 / 2
    assert rows.min() >= (box_y - half_h) * 96 - 1 and rows.max() <= (box_y + half_h) * 96 + 1
    assert cols.min() >= (dr.MAIN_X - dr.BOX_W / 2) * 96 - 1 and cols.max() <= (dr.MAIN_X + dr.BOX_W / 2) * 96 + 1
    # a circuit: ink on the wires and gates, the inputs' letters where they are placed, mostly white paper
    c = dg.make_sample("circuit", random.Random(3), "circuit_00003", layout=dr.layout_circuit)
    im = np.asarray(dr.render(c, 96)).min(-1)
    assert 0.04 < (im < 128).mean() < 0.35
    for y in c["input_y"]:
        patch = im[int(y * 96) - 4 : int(y * 96) + 4, int(dr.IN_X * 96) - 4 : int(dr.IN_X * 96) + 4]
        assert (patch < 100).any()


_TEXT = dr.Canvas.text


def _gate_names_only(monkeypatch, circuit, names):
    """The circuit at 96 px (darkest channel) with only the gate names in `names` written."""
    gates = {g["name"] for g in circuit["gates"]}
    monkeypatch.setattr(dr.Canvas, "text", lambda self, x, y, s, h, anchor="mm":
                        None if s in gates and s not in names else _TEXT(self, x, y, s, h, anchor))
    return np.asarray(dr.render(circuit, 96)).min(-1).astype(int)


def test_gate_names_stay_clear_of_every_outline_and_wire(monkeypatch):
    # every type alone, then generated circuits (two gate columns, names between stacked gates)
    circuits = [{"kind": "circuit", "name": t, "inputs": ["A", "B"], "outputs": {"Y": "G1"},
                 "gates": [{"name": "G1", "type": t, "inputs": ["A"] if t == "NOT" else ["A", "B"], "output": "Y"}]}
                for t in dg.GATES]
    for c in circuits:
        dr.layout_circuit(c, random.Random(0))
    circuits += [dg.make_sample("circuit", random.Random(i), f"c{i}", layout=dr.layout_circuit) for i in range(40)]
    assert max(len(c["gates"]) for c in circuits) >= 3
    for c in circuits:
        bare = _gate_names_only(monkeypatch, c, set())
        for g in c["gates"]:
            ys, xs = np.nonzero(np.abs(_gate_names_only(monkeypatch, c, {g["name"]}) - bare) > 8)  # the name's ink
            assert len(ys) > 15, (c["name"], g["name"])
            y0, y1, x0, x1 = ys.min() - 1, ys.max() + 2, xs.min() - 1, xs.max() + 2  # its box and 1 px around
            assert y0 >= 0 and (bare[y0:y1, x0:x1] > 230).all(), (c["name"], g["name"], g["type"])
            gh = dr._geometry(max(x["level"] for x in c["gates"]))[2]
            assert ys.max() < (g["y"] - gh / 2) * 96  # above its own gate


def test_flowchart_side_step_arrow_enters_the_next_node_apart_from_the_main_column():
    def ink(chart):
        return np.asarray(dr.render({"kind": "flowchart", **chart}, 96)).min(-1).astype(int)

    charts = [FLOW] + [f for f in (dg.make_flowchart(random.Random(i)) for i in range(40))
                       if any(e["route"] == "rejoin" for e in f["edges"])][:8]
    for chart in charts:
        rows = 1 + max(n["row"] for n in chart["nodes"])
        nodes = {n["id"]: n for n in chart["nodes"]}
        bare = json.loads(json.dumps(chart))
        bare["edges"] = [e for e in chart["edges"] if e["route"] != "rejoin"]
        ys, xs = np.nonzero(np.abs(ink(chart) - ink(bare)) > 60)  # the side steps' arrows back
        assert len(ys) and xs.min() > (dr.MAIN_X + dr.LINE) * 96 + 1  # they never meet the main column
        for e in (e for e in chart["edges"] if e["route"] == "rejoin"):
            dec_bottom = (nodes[e["src"]]["row"] + 0.5 + dr.DIAMOND_H / 2) / rows * 96
            nxt = nodes[e["dst"]]
            tip_x = (dr.MAIN_X + dr.REJOIN_DX) * 96
            near = (np.abs(xs - tip_x) < 6) & (ys > dec_bottom - 6) & (ys < (nxt["row"] + 0.5) / rows * 96)
            widths = [np.ptp(xs[near & (ys == r)]) + 1 for r in np.unique(ys[near])]
            # an arrowhead: some row of the final drop at least 4 px wide (the line is 2), narrowing to its tip
            assert max(widths) >= 4 and widths[-1] <= 2, widths


def test_answer_distributions_need_the_picture():
    settings = vs.settings_of(n_train=450, n_val=0, n_test=240, size=64, seed=0, kinds=dg.KINDS)
    splits, kept = vs.make_samples(settings)
    assert kept == 0
    stats = dg.answer_stats(splits["train"] + splits["test"])
    blind = dg.blind_accuracy(splits["train"], splits["test"])
    assert set(stats) == {t for ts in dg.QA_TYPES.values() for t in ts} == set(blind)
    for t, a in stats.items():
        assert a["distinct"] >= 2 and a["top_share"] < 0.6, (t, a)
        assert blind[t] < 0.6, (t, blind[t])  # a perfect reader scores 1: the answers are derived, not guessed
    assert stats["output"]["distinct"] == 2 and 0.4 < stats["output"]["top_share"] < 0.6
    train_pictures = {dg.signature(s) for s in splits["train"]}
    assert not any(dg.signature(s) in train_pictures for s in splits["test"])  # no held-out picture was trained on


def test_build_round_trip_rebuild_rules_and_documents(tmp_path):
    import pypdfium2

    out = tmp_path / "ds"
    logs = []
    build_vision_dataset(out, n_train=21, n_val=6, n_test=9, size=64, seed=1, log=logs.append)
    manifest = load_vision_manifest(out)
    assert manifest["settings"] == {"kinds": list(dg.KINDS), "counts": {"train": 21, "val": 6, "test": 9},
                                    "size": 64, "seed": 1, "version": vs.VERSION}
    assert [s["file"] for s in manifest["splits"]["train"]] == ["train-00000.tar"]
    test = load_vision_split(out, "test")
    assert [e.kind for e in test] == ["flowchart", "circuit", "shapes"] * 3
    ids = [e.id for split in ("train", "val", "test") for e in load_vision_split(out, split)]
    assert len(set(ids)) == 36
    for e in test:
        assert e.image.shape == (64, 64, 3) and e.image.dtype == np.uint8
        sample = {"id": e.id, "kind": e.kind, "caption": e.caption, "qa": e.qa, **e.meta}
        assert np.array_equal(e.image, np.asarray(dr.render(sample, 64)))
        assert all(set(q) == {"question", "answer", "type"} for q in e.qa) and e.qa
        if e.kind == "circuit":
            assert not (out / "verilog" / f"{e.id}.v").exists()  # a held-out netlist would answer its questions
            assert dg.netlist_truth_table(e.meta["netlist"]) == dg.truth_table(e.meta)
    train_circuits = [e for e in load_vision_split(out, "train") if e.kind == "circuit"]
    for e in train_circuits:
        assert (out / "verilog" / f"{e.id}.v").read_text() == e.meta["netlist"]
    assert len(list((out / "verilog").glob("*.v"))) == len(train_circuits) == 7 == manifest["verilog"]["files"]
    pages = json.loads((out / "documents.json").read_text())
    assert [p["page"] for p in pages] == [1, 2, 3, 4, 5, 6] and pages[0]["id"] == test[0].id
    for p in pages:  # the page's text answers none of its questions (only the picture does)
        assert p["text"] == dr.paragraph(next(e for e in test if e.id == p["id"]).meta | {"kind": p["kind"]})
        words = set(re.findall(r"\w+", p["text"]))
        assert p["caption"] not in p["text"] and p["qa"]
        for q in p["qa"]:
            assert q["answer"] not in words and q["answer"] not in p["text"], (q, p["text"])
    pdf = pypdfium2.PdfDocument(str(out / "documents.pdf"))
    assert len(pdf) == 6
    page = np.asarray(pdf[2].render(scale=dr.PAGE_DPI / 72).to_pil().convert("L"))  # 8.5 x 11 in at 100 dpi
    pdf.close()
    assert page.shape == (1100, 850) and 0.01 < (page < 128).mean() < 0.2
    import webdataset  # plain webdataset shards: the library reads them as they are

    wds = list(webdataset.WebDataset([str(out / s["file"]) for s in manifest["splits"]["test"]], shardshuffle=False))
    assert [w["__key__"] for w in wds] == [e.id for e in test]
    assert json.loads(wds[1]["json"])["netlist"] == test[1].meta["netlist"]
    assert logs[0].startswith(f"diagrams: wrote {out} (64 px, seed 1)")
    # the same settings again: reused; into another folder: the same bytes
    first = (out / "manifest.json").read_text()
    build_vision_dataset(out, n_train=21, n_val=6, n_test=9, size=64, seed=1, log=logs.append)
    assert logs[-1].endswith("is up to date") and (out / "manifest.json").read_text() == first
    build_vision_dataset(tmp_path / "again", n_train=21, n_val=6, n_test=9, size=64, seed=1, log=logs.append)
    assert (tmp_path / "again" / "manifest.json").read_text() == first
    # built by older makers (another dataset version) with the same settings: rebuilt, the same bytes again
    stale = json.loads(first)
    stale["settings"]["version"] = vs.VERSION - 1
    (out / "manifest.json").write_text(json.dumps(stale))
    build_vision_dataset(out, n_train=21, n_val=6, n_test=9, size=64, seed=1, log=logs.append)
    assert "rebuilding it with version" in logs[-2] and (out / "manifest.json").read_text() == first
    # other settings: an error naming the setting, unless forced
    with pytest.raises(DataError, match="--seed.*built with 1.*asks for 2"):
        build_vision_dataset(out, n_train=21, n_val=6, n_test=9, size=64, seed=2, log=logs.append)
    build_vision_dataset(out, n_train=3, n_val=0, n_test=0, size=48, seed=2, force=True, kinds=["shapes"],
                         log=logs.append)
    assert load_vision_split(out, "val") == [] and len(load_vision_split(out, "train")) == 3
    with pytest.raises(DataError, match="--train/--val/--test.*'train': 3.*'train': 4"):
        build_vision_dataset(out, n_train=4, n_val=0, n_test=0, size=48, seed=2, kinds=["shapes"])
    assert load_vision_split(out, "train")[0].image.shape == (48, 48, 3)
    for bad, key in ((dict(n_train=0), "n_train"), (dict(size=8), "size"), (dict(kinds=["circle"]), "kinds")):
        args = dict(n_train=3, n_val=0, n_test=0, size=48, seed=2) | bad
        with pytest.raises(DataError, match=key):
            build_vision_dataset(tmp_path / "bad", **args)


def test_damaged_datasets_are_refused_naming_the_file(tmp_path):
    out = build_vision_dataset(tmp_path / "ds", n_train=6, n_val=3, n_test=0, size=32, log=lambda m: None)
    shard = out / "train-00000.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])
    with pytest.raises(DataError, match="train-00000.tar: sha256 differs"):
        load_vision_split(out, "train")
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="train-00000.tar: sha256 differs"):
        load_vision_split(out, "train")
    shard.unlink()
    with pytest.raises(DataError, match="train-00000.tar cannot be read"):
        load_vision_split(out, "train")
    assert len(load_vision_split(out, "val")) == 3  # the other split is intact
    with pytest.raises(DataError, match="no split 'dev'"):
        load_vision_split(out, "dev")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        load_vision_split(out, "val")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="has no manifest.json"):
        load_vision_split(out, "val")
    with pytest.raises(DataError, match="does not exist"):
        load_vision_split(tmp_path / "nowhere", "val")


def test_the_verilog_tree_feeds_the_expert_chatbot_makers(tmp_path):
    from data_pipelines.instructions import mine_instructions
    from data_pipelines.preferences import make_pairs

    out = build_vision_dataset(tmp_path / "ds", n_train=30, n_val=0, n_test=0, size=32, kinds=["circuit"],
                               log=lambda m: None)
    tree = out / "verilog"
    records = mine_instructions(tree, progress=False)
    kinds = Counter(r["kind"] for r in records)
    assert kinds["ports"] == kinds["instance"] == kinds["comment"] == kinds["definition"] == 30
    one = next(r for r in records if r["kind"] == "ports" and r["source"].startswith("circuit_00000.v"))
    assert "input A" in one["answer"] and "output Y" in one["answer"]
    pairs = make_pairs(tree, pairs_per_subject=2)
    assert len(pairs) == 60 and {p["language"] for p in pairs} == {"verilog"}
    modules = {m.name: m for f in tree.glob("*.v") for m in vl.parse_modules(f.read_text(), f.name)}
    for p in pairs:
        module = modules[p["subject"]]
        assert vl.check_answer(p["chosen"], module)["passes"]
        assert p["kind"] == "terse" or not vl.check_answer(p["rejected"], module)["passes"]


def test_cli_builds_and_reports(tmp_path, capsys):
    from workbench.cli import main

    assert main(["diagrams", str(tmp_path / "d"), "--train", "6", "--val", "3", "--test", "3", "--size", "32",
                 "--kinds", "shapes,circuit"]) == 0
    err = capsys.readouterr()
    text = err.out + err.err
    assert "train      6 samples in 1 shard(s): shapes 3, circuit 3" in text and "colour" in text
    assert main(["diagrams", str(tmp_path / "d"), "--train", "6", "--val", "3", "--test", "3", "--size", "40",
                 "--kinds", "shapes,circuit"]) == 2
    assert "diagrams: --size (size): " in capsys.readouterr().err
    assert main(["diagrams", str(tmp_path / "e"), "--kinds", "shapes,circle"]) == 2
    assert "kinds must be distinct names" in capsys.readouterr().err
