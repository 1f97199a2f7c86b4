"""The video tasks (workbench/train/video.py) end to end on tiny data and debug flavors: the VAE run (latent
statistics in its buffers, recon strip, exact resume), the diffusion run (samples PNG + GIF, EMA, exact resume
after a signal), `load_run(...).generate`, the pixel judge, and the errors for a missing / unfinished VAE run
and bad config values."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from workbench import cli
from workbench.checkpoint.run import latest_checkpoint, list_checkpoints, load_model_state, step_of
from workbench.data import moving_shapes as ms
from workbench.errors import ConfigError, WorkbenchError
from workbench.train import video as V
from workbench.train.fundamentals import runner

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = ["--task.n", "48", "--task.frames", "5", "--task.size", "16"]


def vae_args(out: Path, name: str, *extra: str) -> list[str]:
    return [str(ROOT / "configs/video/vae.toml"), "--run.out_dir", str(out), "--run.name", name, "--run.threads", "1",
            *TINY_DATA, "--task.flavor", "debug", "--task.encoder_channels", "[]", "--task.decoder_channels", "[]",
            "--task.stats_videos", "16", "--task.recon_videos", "2", "--train.epochs", "2", "--train.batch_size", "8",
            "--train.schedule", "constant", "--train.warmup_steps", "0", "--train.log_every", "1", *extra]


def dit_job(out: Path, name: str, vae_run: Path, **task) -> dict:
    return {"run": {"name": name, "out_dir": str(out), "seed": 0, "threads": 1},
            "task": {"name": "video", "vae_run": str(vae_run), "flavor": "debug", "sample_steps": 3,
                     "samples_every": 1, "eval_batch_size": 64, **task},
            "train": {"epochs": 2, "batch_size": 8, "lr": 2e-3, "schedule": "constant", "log_every": 1,
                      "ckpt_every": 1, "keep_last": 5}}


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video")
    torch.set_num_threads(1)
    assert cli.main(["video", *vae_args(out, "vae")]) == 0
    return out / "vae"


def test_vae_run_sets_latent_statistics_and_writes_recon(vae_run):
    results = json.loads((vae_run / "results.json").read_text())["results"]
    state = load_model_state(latest_checkpoint(vae_run))
    # the buffers of the final checkpoint are the statistics the results report, and not the init's 0 / 1
    assert torch.allclose(state["latents_mean"], torch.tensor(results["latents_mean"]["value"]), atol=1e-5)
    assert torch.allclose(state["latents_std"], torch.tensor(results["latents_std"]["value"]), atol=1e-5)
    assert not torch.all(state["latents_std"] == 1)
    vae, settings, _ = V.load_vae_run(vae_run)
    data = ms.load_moving_shapes(**settings)
    z = V.encode_means(vae, data["train"].videos[:16], 16, "cpu")
    zc = z.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(vae.latents_mean, zc.mean(1))
    torch.testing.assert_close(vae.normalize(z).transpose(0, 1).reshape(4, -1).std(1), torch.ones(4))
    assert settings == {"n": 48, "frames": 5, "size": 16, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1}
    with Image.open(vae_run / "recon.png") as im:  # 2 videos x (input, recon) rows, 5 frames, scale 3
        assert im.size == (3 * (5 * 17 - 1), 3 * (4 * 17 - 1))
    records = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]  # ten steps lower the training loss
    for key in ("val_recon_mse", "val_recon_mse_mean_video", "val_kl_per_element"):
        assert results[key]["value"] > 0, key


def test_vae_resume_is_exact(vae_run, tmp_path):
    # stop after 3 steps (mid-epoch 1), then continue to the end: the same weights as the uninterrupted run
    assert cli.main(["video", *vae_args(tmp_path, "cut", "--train.max_steps", "3")]) == 0
    assert latest_checkpoint(tmp_path / "cut").name == "step-3"
    assert cli.main(["video", *vae_args(tmp_path, "cut"), "--resume"]) == 0
    a, b = load_model_state(latest_checkpoint(vae_run)), load_model_state(latest_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_video_run_samples_resume_and_load_run(vae_run, tmp_path, monkeypatch):
    straight = runner.run_job(dit_job(tmp_path, "straight", vae_run), log=lambda m: None)
    run_dir = Path(straight["run_dir"])
    results = json.loads((run_dir / "results.json").read_text())
    files = {f["file"] for f in results["figures"]}
    assert {"samples.png", "samples-step-5.png"} <= files  # 38 videos, 5 batches per epoch: samples after epoch 1
    for stem in ("samples", "samples-step-5"):
        with Image.open(run_dir / f"{stem}.gif") as im:  # 16 prompts, 4 per row, 16 px frames x 3
            assert im.n_frames == 5 and im.size == (3 * (4 * 17 - 1), 3 * (4 * 17 - 1))
        with Image.open(run_dir / f"{stem}.png") as im:  # 16 rows, 5 frames, x 2
            assert im.size == (2 * (5 * 17 - 1), 2 * (16 * 17 - 1))
    r = results["results"]
    assert r["val_loss"]["value"] < r["val_loss_predict_zero"]["value"]
    assert r["val_videos_direction_match"]["value"] == 1.0 and r["val_videos_colour_match"]["value"] == 1.0
    state = load_model_state(latest_checkpoint(run_dir))
    assert any(k.startswith("vae.") for k in state)
    assert not all(torch.equal(state[k], state["ema." + k[4:]]) for k in state if k.startswith("net."))

    # the same run stopped by SIGINT after step 4 (mid-epoch 1), then resumed: bit for bit
    calls = {"n": 0}
    real_update = V.ema_update

    def update_then_signal(ema, net, decay):
        real_update(ema, net, decay)
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(V, "ema_update", update_then_signal)
    with pytest.raises(runner.Interrupted):
        runner.run_job(dit_job(tmp_path, "cut", vae_run), log=lambda m: None)
    monkeypatch.setattr(V, "ema_update", real_update)
    assert latest_checkpoint(tmp_path / "cut").name == "step-4"
    resumed = runner.run_job(dit_job(tmp_path, "cut", vae_run), resume=True, log=lambda m: None)
    b = load_model_state(latest_checkpoint(tmp_path / "cut"))
    assert state.keys() == b.keys() and all(torch.equal(state[k], b[k]) for k in state)
    assert resumed["val_loss_ema"] == straight["val_loss_ema"]

    # the evals' loader: EMA weights, the VAE's data settings, videos of the contract's shape, seeded
    assert V.is_video_run(run_dir) and not V.is_video_run(vae_run)
    shutil.move(str(vae_run), str(tmp_path / "vae-moved"))  # the run folder alone generates videos
    try:
        run = V.load_run(run_dir)
        assert all(torch.equal(v, state["ema." + k]) for k, v in run.net.state_dict().items())
        assert run.data_settings == {"n": 48, "frames": 5, "size": 16, "seed": 0, "val_fraction": 0.1,
                                     "test_fraction": 0.1}
        prompts = ["a red circle moving left", "one blue cross going up", "a yellow square that moves down"]
        videos = run.generate(prompts, seed=3, steps=2)
        assert videos.shape == (3, 5, 3, 16, 16) and videos.dtype == torch.uint8
        assert torch.equal(videos, run.generate(prompts, seed=3, steps=2))
        assert not torch.equal(videos, run.generate(prompts, seed=4, steps=2))
        with pytest.raises(WorkbenchError, match="purple"):
            run.generate(["a purple circle moving left"])
        with pytest.raises(WorkbenchError, match="no prompts"):
            run.generate([])
        # the run's grid with its sampler (seed run.seed + 1) redraws samples.gif's videos: the judge's
        # scores of them are the recorded ones
        grid = V.grid_prompts()
        direction, colour = V.judge(run.generate([ms.prompt(*p) for p in grid], seed=1))
        asked = torch.tensor(grid)
        assert (direction == asked[:, 2]).float().mean().item() == r["samples_direction_match"]["value"]
        assert (colour == asked[:, 1]).float().mean().item() == r["samples_colour_match"]["value"]
        # source: the DiT's checkpoint and step (the VAE's under "vae"), also for an older checkpoint
        first = list_checkpoints(run_dir)[0]
        early = V.load_run(first)
        assert early.source["ckpt"] == str(first) and early.source["step"] == step_of(first) < step_of(
            latest_checkpoint(run_dir))
        assert run.source["ckpt"] == str(latest_checkpoint(run_dir)) and run.source["step"] == step_of(
            latest_checkpoint(run_dir))
        assert Path(run.source["vae"]["ckpt"]).parent.parent == vae_run
    finally:
        shutil.move(str(tmp_path / "vae-moved"), str(vae_run))


def test_errors_for_the_vae_run_and_bad_values(vae_run, tmp_path):
    with pytest.raises(WorkbenchError, match="vae_run .*not a run folder"):
        runner.run_job(dit_job(tmp_path, "a", tmp_path / "nowhere"), log=lambda m: None)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(vae_run, unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(WorkbenchError, match="has not finished"):
        runner.run_job(dit_job(tmp_path, "b", unfinished), log=lambda m: None)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ROOT / "configs/diffusion/shapes.toml", other / "config.toml")
    with pytest.raises(WorkbenchError, match="a 'diffusion' run, expected a 'video_vae' run"):
        V.load_vae_run(other)
    for override, key in ((["--task.frames", "6"], "frames"), (["--task.size", "18"], "size"),
                          (["--task.flavor", "huge"], "flavor"), (["--task.test_fraction", "0.95"], "val_fraction"),
                          (["--task.encoder_channels", "[8, 12]"], "encoder_channels")):
        with pytest.raises(ConfigError, match=key):
            runner.load_job(str(ROOT / "configs/video/vae.toml"), ["--task.flavor", "debug", *override])
    with pytest.raises(ConfigError, match="task.flavor"):
        runner.load_job(dit_job(tmp_path, "c", vae_run), ["--task.flavor", "nope"])
    assert cli.main(["video", str(ROOT / "configs/diffusion/shapes.toml")]) == 2


def test_the_judge_reads_direction_and_colour_from_pixels():
    d = ms.load_moving_shapes(n=64, frames=5, size=16, seed=1, val_fraction=0.0, test_fraction=0.0)["train"]
    direction, colour = V.judge(d.videos)
    assert torch.equal(direction, d.direction) and torch.equal(colour, d.colour)
    # played backwards, every video moves the other way: left <-> right, up <-> down
    back, _ = V.judge(d.videos.flip(1))
    assert torch.equal(back, d.direction ^ 1)
    # a video that does not move has no direction to match: at most chance on still frames
    still, _ = V.judge(d.videos[:, :1].expand(-1, 5, -1, -1, -1))
    assert (still == d.direction).float().mean() < 0.5
