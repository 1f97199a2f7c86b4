"""`workbench diffusion`, `workbench sample --ckpt` and `workbench eval --task diffusion` end to end on a tiny run of configs/diffusion/shapes.toml:
the eval writes results.json with FID, class accuracy and CLIP-score beside the real and noise references, the
report table, a sample grid, and reuses the cached judges on a second eval; mixing it with a language-model task
or giving it a non-diffusion run is refused."""

import json
from pathlib import Path

import pytest

from workbench.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "diffusion" / "shapes.toml"
TINY = ["--task.n", "120", "--task.size", "8", "--task.channels", "[8, 16]", "--task.context_dim", "8",
        "--task.sample_steps", "3", "--task.grid_every", "0", "--task.grid_per_class", "2", "--train.epochs", "1",
        "--train.batch_size", "32", "--train.warmup_steps", "0"]
NETS = ["--diffusion.per_class", "4", "--diffusion.nets.classifier_epochs", "2", "--diffusion.nets.clip_epochs", "2",
        "--diffusion.nets.warmup_steps", "2"]


def test_train_then_eval_writes_metrics_beside_references(tmp_path, capsys):
    assert main(["diffusion", str(CONFIG), "--run.out_dir", str(tmp_path), "--run.name", "d", *TINY]) == 0
    run_dir = tmp_path / "d"
    assert "val_loss_ema" in capsys.readouterr().out
    assert (run_dir / "samples.png").is_file()
    # workbench sample --ckpt: one PNG of the run's size from a prompt in its caption words
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "a star", "--out", str(tmp_path / "star.png"),
                 "--steps", "2", "--guidance", "3"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "star.png") as im:
        assert im.size == (8, 8) and im.mode == "RGB"
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "a dog", "--out", str(tmp_path / "dog.png")]) == 2
    assert "'dog' is not in this run's caption vocabulary" in capsys.readouterr().err

    assert main(["eval", "--task", "diffusion", "--ckpt", str(run_dir), *NETS]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1]).parent
    assert out.parent == run_dir / "evals"
    results = json.loads((out / "results.json").read_text())["tasks"]["diffusion"]
    assert results["primary"] == "fid" and results["higher_is_better"] is False and results["n"] == 6 * 4
    metrics = results["metrics"]
    assert set(metrics) == {"fid", "class_accuracy", "clip_score"}
    refs = results["details"]["references"]
    for name in ("real", "noise"):
        assert set(refs[name]) == set(metrics)
        assert 0 <= refs[name]["class_accuracy"] <= 1 and 0 <= refs[name]["clip_score"] <= 100
    assert 0 <= metrics["class_accuracy"] <= 1 and metrics["fid"] >= 0
    assert results["baselines"] == {"real held-out images": refs["real"]["fid"], "uniform noise": refs["noise"]["fid"]}
    assert "trained by the project on the same data" in results["details"]["judges"]
    report = (out / "report.md").read_text()
    assert "| metric | model | real | noise |" in report and "diffusion-samples.png" in report
    assert (out / "diffusion-samples.png").stat().st_size > 1000
    lines = (out / "samples" / "diffusion.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {"asked", "predicted", "correct", "clip_cosine"} <= set(json.loads(lines[0]))
    nets = list((run_dir / "eval_nets").iterdir())
    assert len(nets) == 1 and (nets[0] / "meta.json").is_file()

    # a second eval loads the cached judges and measures the same numbers (same seed)
    # (with a guidance sweep: the same three metrics per w, and their plot)
    assert main(["eval", "--task", "diffusion", "--ckpt", str(run_dir), *NETS, "--diffusion.guidance_sweep", "[0, 2]"]) == 0
    assert "loaded from" in capsys.readouterr().err
    again = json.loads((out / "results.json").read_text())["tasks"]["diffusion"]
    assert again["metrics"] == metrics
    assert set(again["details"]["guidance_sweep"]) == {"0.0", "2.0"}
    assert set(again["details"]["guidance_sweep"]["2.0"]) == set(metrics)
    assert (out / "diffusion-guidance.png").stat().st_size > 1000 and "diffusion-guidance.png" in again["plots"]

    # refusals: a language-model task beside it; an LM run folder
    assert main(["eval", "--task", "diffusion,perplexity", "--ckpt", str(run_dir)]) == 2
    assert "different models" in capsys.readouterr().err


def test_eval_diffusion_needs_a_diffusion_run(tmp_path, capsys):
    assert main(["eval", "--task", "diffusion", "--hf-dir", str(tmp_path)]) == 2
    assert "--ckpt RUN_DIR" in capsys.readouterr().err
    assert main(["diffusion", str(ROOT / "configs" / "fundamentals" / "vae.toml")]) == 2
    assert "not a diffusion config" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--diffusion.per_class", "1"], ["--diffusion.nets.classifier", "nope"]])
def test_bad_eval_options_name_the_key(tmp_path, capsys, bad):
    assert main(["eval", "--task", "diffusion", "--ckpt", str(tmp_path), *bad]) == 2
    err = capsys.readouterr().err
    assert bad[0][2:] in err
