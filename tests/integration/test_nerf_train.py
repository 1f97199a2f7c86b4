"""`workbench nerf`: a tiny NeRF run beats the mean colour on held-out views, writes its pictures and GIF, resumes;
the eval task scores it beside a second render of the scene, the mean colour and noise."""

import json

import pytest
import torch

from workbench.train.fundamentals.runner import run_job


def _job(out, name, **train):
    return {
        "run": {"name": name, "out_dir": str(out), "seed": 0, "device": "cpu", "threads": 1},
        "task": {"name": "nerf", "scene": "shapes", "size": 12, "n_train": 12, "n_val": 1, "n_test": 2,
                 "supersample": 2, "flavor": "small", "n_coarse": 16, "n_fine": 16, "render_every": 1,
                 "gif_frames": 3, "chunk": 4096},
        "train": {"epochs": 10, "batch_size": 256, "lr": 1e-2, "min_lr_ratio": 0.1, "log_every": 10,
                  "ckpt_every": 1, "keep_last": 1} | train,
    }


@pytest.fixture(scope="module")
def nerf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nerf")
    torch.set_num_threads(1)
    first = run_job(_job(out, "tiny", max_steps=40), log=lambda *_: None)
    return out, first


def test_tiny_run_beats_the_mean_colour_and_writes_its_pictures(nerf_run):
    out, r = nerf_run
    run_dir = out / "tiny"
    assert r["test_psnr"] > r["mean_colour_psnr"] + 3 > r["noise_psnr"] + 3, r
    assert r["test_ssim"] > r["mean_colour_ssim"] > r["noise_ssim"], r
    gif = run_dir / "novel-views.gif"
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (48, 48)  # 12 px frames scaled 4x
    results = json.loads((run_dir / "results.json").read_text())
    files = {f["file"] for f in results["figures"]}
    assert {"test-views.png", "novel-views.png", "ray-samples.png"} <= files and all((run_dir / f).is_file() for f in files)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [rec["val_psnr"] for rec in records if "val_psnr" in rec]
    assert len(val) >= 2 and val[-1] > val[0] + 3  # held-out PSNR rose during training


def test_resume_continues_and_a_second_start_is_refused(nerf_run, tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.train.nerf import is_nerf_run, load_run

    out, _ = nerf_run
    with pytest.raises(WorkbenchError, match="--resume"):
        run_job(_job(out, "tiny", max_steps=40), log=lambda *_: None)
    r = run_job(_job(out, "tiny", max_steps=44), resume=True, log=lambda *_: None)
    assert (out / "tiny" / "checkpoints" / "step-44" / "COMPLETE").is_file() and "test_psnr" in r
    assert is_nerf_run(out / "tiny") and not is_nerf_run(tmp_path)
    run = load_run(out / "tiny")
    assert run.source["step"] == 44 and run.cfg.flavor == "small"
    rgb, depth = run.render(run.data().test)
    assert rgb.shape == (2, 12, 12, 3) and depth.shape == (2, 12, 12)


def test_a_run_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path):
    from workbench.checkpoint.run import latest_checkpoint, load_model_state

    def job(name, **train):  # 2 epochs of 7 steps, no val pictures during training
        j = _job(tmp_path, name, epochs=2, schedule="constant", **train)
        j["task"]["render_every"] = 0
        return j

    run_job(job("straight"), log=lambda *_: None)
    run_job(job("cut", max_steps=3), log=lambda *_: None)  # stopped mid-epoch 1
    assert latest_checkpoint(tmp_path / "cut").name == "step-3"
    run_job(job("cut"), resume=True, log=lambda *_: None)
    a, b = (load_model_state(latest_checkpoint(tmp_path / n)) for n in ("straight", "cut"))
    assert latest_checkpoint(tmp_path / "cut").name == latest_checkpoint(tmp_path / "straight").name
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_task_scores_the_run_beside_real_mean_colour_and_noise(nerf_run, tmp_path):
    from evals.runner import run_eval
    from workbench.errors import WorkbenchError

    out, _ = nerf_run
    folder = run_eval("nerf", ckpt=str(out / "tiny"), out=str(tmp_path / "ev"), log=lambda *_: None)
    task = json.loads((folder / "results.json").read_text())["tasks"]["nerf"]
    m, refs = task["metrics"], task["details"]["references"]
    # the scale is validated: a second correct render >> the mean colour > noise, on PSNR and SSIM
    assert refs["real"]["psnr"] > refs["mean_colour"]["psnr"] + 5 > refs["noise"]["psnr"] + 5
    assert refs["real"]["ssim"] > refs["mean_colour"]["ssim"] > refs["noise"]["ssim"]
    assert m["psnr"] > refs["mean_colour"]["psnr"] + 3 and m["beats_baselines"] == 1.0
    assert (folder / "nerf-views.png").is_file() and task["n"] == 2
    with pytest.raises(WorkbenchError, match="real_supersample"):
        run_eval("nerf", ckpt=str(out / "tiny"), out=str(tmp_path / "ev2"), options=["--nerf.real_supersample", "2"],
                 log=lambda *_: None)


def test_cli_refuses_a_config_of_another_task(capsys):
    from workbench.cli import main

    assert main(["nerf", "configs/diffusion/shapes.toml"]) == 2
    assert "not a nerf config" in capsys.readouterr().err
