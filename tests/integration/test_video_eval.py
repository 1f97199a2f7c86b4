"""`workbench eval --task video --ckpt RUN_DIR` end to end on a tiny `workbench video` run (a debug VAE run, then
a debug DiT run on its latents): results.json holds the metrics beside the five references, the report, the
sample strip / GIF and the references plot are written into RUN_DIR/evals/step-N for the DiT's own checkpoint, a
second eval reuses the cached judge and measures the same numbers; wrong inputs are refused."""

import json
from pathlib import Path

from workbench.cli import main

ROOT = Path(__file__).resolve().parents[2]
VAE = ["--task.n", "160", "--task.frames", "5", "--task.size", "16", "--task.test_fraction", "0.2", "--task.flavor",
       "debug", "--task.encoder_channels", "[]", "--task.decoder_channels", "[]", "--task.stats_videos", "32",
       "--task.recon_videos", "2", "--train.epochs", "1", "--train.warmup_steps", "0"]
DIT = ["--task.flavor", "debug", "--task.sample_steps", "2", "--task.samples_every", "0", "--train.epochs", "1",
       "--train.warmup_steps", "0"]
EVAL = ["--video.prompts", "shape_direction", "--video.per_prompt", "1", "--video.judge.epochs", "2", "--video.show", "4"]
METRICS = {"fvd", "temporal_consistency", "flicker_ratio", "motion_accuracy", "shape_accuracy", "colour_accuracy",
           "all_accuracy"}


def test_train_then_eval_video_writes_metrics_beside_references(tmp_path, capsys):
    assert main(["video", str(ROOT / "configs/video/vae.toml"), "--run.out_dir", str(tmp_path), "--run.name", "vae",
                 *VAE]) == 0
    assert main(["video", str(ROOT / "configs/video/dit.toml"), "--run.out_dir", str(tmp_path), "--run.name", "dit",
                 "--task.vae_run", str(tmp_path / "vae"), *DIT]) == 0
    run_dir = tmp_path / "dit"
    capsys.readouterr()
    assert main(["eval", "--task", "video", "--ckpt", str(run_dir), *EVAL]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1]).parent
    step = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert out == run_dir / "evals" / f"step-{step}"  # the DiT's checkpoint, not the VAE's
    results = json.loads((out / "results.json").read_text())
    assert results["source"]["ckpt"] == str(run_dir / "checkpoints" / f"step-{step}")
    task = results["tasks"]["video"]
    assert task["primary"] == "fvd" and task["higher_is_better"] is False and task["n"] == 16
    assert set(task["metrics"]) == METRICS
    refs = task["details"]["references"]
    assert set(refs) == {"real", "noise", "shuffled", "jumbled", "static"}
    assert all(set(r) == METRICS for r in refs.values())
    assert task["baselines"]["real held-out videos"] == refs["real"]["fvd"]
    assert refs["static"]["flicker_ratio"] == 0 and refs["noise"]["flicker_ratio"] > 5  # pixel measures: any judge
    assert "not I3D" in task["details"]["judge"]
    for name in ("video-samples.png", "video-samples.gif", "video-metrics.png"):
        assert (out / name).stat().st_size > 500
    report = (out / "report.md").read_text()
    assert "| metric | model | real | noise | shuffled | jumbled | static |" in report
    assert len((out / "samples" / "video.jsonl").read_text().splitlines()) == 16
    judges = list((run_dir / "eval_nets").iterdir())
    assert len(judges) == 1 and (judges[0] / "meta.json").is_file()

    # again: the cached judge, the same numbers (same seeds)
    assert main(["eval", "--task", "video", "--ckpt", str(run_dir), *EVAL]) == 0
    assert "loaded from" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["tasks"]["video"]["metrics"] == task["metrics"]

    # refusals: a language-model task beside it; no run folder; the VAE run is not a video diffusion run
    assert main(["eval", "--task", "video,perplexity", "--ckpt", str(run_dir)]) == 2
    assert "different models" in capsys.readouterr().err
    assert main(["eval", "--task", "video", "--hf-dir", str(tmp_path)]) == 2
    assert "--ckpt RUN_DIR" in capsys.readouterr().err
    assert main(["eval", "--task", "video", "--ckpt", str(tmp_path / "vae")]) == 2
    assert "not a video run" in capsys.readouterr().err
    assert main(["eval", "--task", "video", "--ckpt", str(run_dir), "--video.prompts", "some"]) == 2
    assert "prompts" in capsys.readouterr().err
