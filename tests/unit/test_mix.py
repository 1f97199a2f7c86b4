"""data_pipelines.mix: several makers' files as one, every record once, in a seeded order."""

import json

import pytest

from data_pipelines.mix import main, mix
from workbench.errors import DataError


def test_mix_keeps_every_record_once_in_a_seeded_order_and_takes_a_prefix(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"kind": "a", "i": i}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"kind": "b", "i": i}) + "\n" for i in range(10)) + "\n")
    counts = mix([str(a), f"{b}:4"], tmp_path / "out" / "m.jsonl", seed=1)
    got = [json.loads(x) for x in (tmp_path / "out" / "m.jsonl").read_text().splitlines()]
    assert counts == {str(a): 20, f"{b}:4": 4} and len(got) == 24
    assert sorted((r["kind"], r["i"]) for r in got) == [("a", i) for i in range(20)] + [("b", i) for i in range(4)]
    assert [r["kind"] for r in got] != ["a"] * 20 + ["b"] * 4  # shuffled
    assert mix([f"{b}:2*3"], tmp_path / "rep.jsonl") == {f"{b}:2*3": 6}  # the first 2, three times each
    assert sorted(json.loads(x)["i"] for x in (tmp_path / "rep.jsonl").read_text().splitlines()) == [0, 0, 0, 1, 1, 1]
    mix([str(a), f"{b}:4"], tmp_path / "again.jsonl", seed=1)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "out" / "m.jsonl").read_text()


def test_mix_names_the_bad_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        mix([str(bad)], tmp_path / "o.jsonl")
    assert main([str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().out
