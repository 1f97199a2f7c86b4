"""Run-folder checkpoints: complete or absent, verified, crash-safe; nested state as tensors + JSON."""

import json

import pytest
import torch

import workbench.checkpoint.run as run
from workbench.errors import CheckpointError


def model_state(v: float):
    return {"w": torch.full((4, 4), v), "b": torch.arange(3.0)}


def write_engine(folder):
    """An engine's resume state as every engine writes it: files of its own under the folder it is given."""
    folder.mkdir(parents=True, exist_ok=True)
    run.write_json_state(folder / "state.json", {"scheduler": {"last_epoch": 5, "betas": (0.9, 0.95)}})


def save(root, step, v=1.0, **kw):
    return run.save_checkpoint(root, step, model_state(v), {"step": step}, write_engine, **kw)


def test_layout_and_round_trip(tmp_path):
    ckpt = save(tmp_path, 5)
    names = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert names == ["COMPLETE", "engine/state.json", "manifest.json", "model.safetensors", "train_state.json"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest) == {"engine/state.json", "model.safetensors", "train_state.json"}
    assert torch.equal(run.load_model_state(ckpt)["w"], model_state(1.0)["w"])
    weights, train_state, engine_dir = run.load_for_resume(ckpt)
    assert torch.equal(weights["b"], torch.arange(3.0)) and train_state == {"step": 5}
    assert run.read_json_state(engine_dir / "state.json") == {"scheduler": {"last_epoch": 5, "betas": (0.9, 0.95)}}
    assert run.resolve_checkpoint(tmp_path) == ckpt == run.resolve_checkpoint(ckpt)


def test_a_flipped_byte_in_the_engine_state_stops_the_resume_before_it_is_read(tmp_path):
    """DCP metadata and DeepSpeed files are pickles: the manifest is checked before anything is loaded."""
    ckpt = save(tmp_path, 5)
    path = ckpt / "engine" / "state.json"
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"engine/state.json: sha256 differs"):
        run.load_for_resume(ckpt)
    with pytest.raises(TypeError, match="tensors at"):
        run.write_json_state(tmp_path / "x.json", {"m": torch.ones(2)})


def test_flatten_keeps_types():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}, 7: {}},
             "groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0, 7], "name": None}]}
    tensors, skeleton = run.flatten_state(state)
    back = run.unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    assert set(back["state"]) == {0, 7} and back["groups"][0]["betas"] == (0.9, 0.95)
    assert back["groups"][0]["name"] is None and torch.equal(back["state"][0]["exp_avg"], torch.zeros(2))
    with pytest.raises(TypeError, match="tensors and JSON only"):
        run.flatten_state({"x": object()})


def test_crash_while_writing_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    first = save(tmp_path, 1)
    real = run.save_file

    def dies_on_model(tensors, path, **kw):
        if path.endswith("model.safetensors"):
            folder = tmp_path / "checkpoints" / "step-2.tmp"
            assert str(folder) in path  # written aside, renamed into place only when complete
            assert not (folder / "COMPLETE").exists()  # the marker comes last
            real(tensors, path, **kw)
            raise KeyboardInterrupt("killed after the weights")  # before the state, manifest and marker
        return real(tensors, path, **kw)

    monkeypatch.setattr(run, "save_file", dies_on_model)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, v=2.0)
    assert run.list_checkpoints(tmp_path) == [first] and run.latest_checkpoint(tmp_path) == first
    run.verify(first)
    assert torch.equal(run.load_model_state(run.resolve_checkpoint(tmp_path))["w"], model_state(1.0)["w"])
    assert (tmp_path / "checkpoints" / "step-2.tmp").is_dir()  # the partial write, never read

    monkeypatch.setattr(run, "save_file", real)
    third = save(tmp_path, 3, v=3.0)
    assert not (tmp_path / "checkpoints" / "step-2.tmp").exists()  # cleaned by the next save
    assert run.latest_checkpoint(tmp_path) == third


def test_crash_before_the_marker_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "_fsync_tree", lambda folder: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        save(tmp_path, 1)
    assert run.list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run.resolve_checkpoint(tmp_path)


def test_a_complete_checkpoint_is_never_overwritten(tmp_path):
    save(tmp_path, 4)
    with pytest.raises(CheckpointError, match="already exists"):
        save(tmp_path, 4, v=9.0)
    assert torch.equal(run.load_model_state(tmp_path / "checkpoints" / "step-4")["w"], model_state(1.0)["w"])


def test_keep_last(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in run.list_checkpoints(tmp_path)] == ["step-4", "step-5"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no-marker", "manifest"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    ckpt = save(tmp_path, 1)
    target = ckpt / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
        target.write_bytes(bytes(data))
        match = "model.safetensors: sha256 differs"
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-8]))
        match = "model.safetensors: .* bytes, the manifest says"
    elif damage == "delete":
        target.unlink()
        match = "model.safetensors: missing"
    elif damage == "no-marker":
        (ckpt / "COMPLETE").unlink()
        match = "no COMPLETE marker"
    else:
        (ckpt / "manifest.json").write_text("{")
        match = "unreadable manifest.json"
    with pytest.raises(CheckpointError, match=match):
        run.verify(ckpt)
