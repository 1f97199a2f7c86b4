"""The diffusion training task (workbench/train/diffusion.py) and its captioned data (workbench/data/captioned.py):
EMA math, that a few steps lower the loss, exact resume after a signal (trained and EMA weights), sample grids,
guidance, config errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.data.captioned import EOS, Vocab, load_captioned
from workbench.errors import ConfigError
from workbench.train import diffusion as D
from workbench.train.fundamentals import runner


def tiny_job(tmp_path: Path, name: str, **task) -> dict:
    return {"run": {"name": name, "out_dir": str(tmp_path), "seed": 0, "threads": 1},
            "task": {"name": "diffusion", "dataset": "shapes", "n": 60, "size": 8, "channels": [8, 16],
                     "norm_groups": 4, "context_dim": 8, "sample_steps": 3, "grid_every": 1, "grid_per_class": 2,
                     "eval_batch_size": 64, **task},
            "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "schedule": "constant", "log_every": 1,
                      "ckpt_every": 1, "keep_last": 5}}


def tiny_net(conditioning: str = "caption", size: int = 8) -> tuple[D.TextToImage, object, D.Config]:
    data = load_captioned("shapes", n=60, size=size)
    cfg = D.Config(n=60, size=size, channels=[8, 16], norm_groups=4, context_dim=8, conditioning=conditioning)
    torch.manual_seed(0)
    return D._build(cfg, data), data, cfg


# ----------------------------------------------------------------------------------------------------
# data


def test_captions_follow_the_labels_and_the_seed():
    a, b = load_captioned("shapes", n=60, size=8, seed=1), load_captioned("shapes", n=60, size=8, seed=1)
    assert a.captions == b.captions
    for split in ("train", "val", "test"):
        labels = getattr(a.images, split)[1]
        assert len(a.captions[split]) == len(labels)
        for caption, y in zip(a.captions[split], labels.tolist()):
            assert caption.split()[-1] == a.classes[y]  # every template ends with the class word
    assert len({c.rsplit(" ", 1)[0] for c in a.captions["train"]}) > 1  # the wording varies
    assert a.prompt(0) == "a circle"
    ids = a.tokens("train")
    assert ids.shape == (len(a.captions["train"]), a.vocab.length) and (ids == EOS).sum(1).eq(1).all()
    assert a.vocab.decode(ids[0]) == a.captions["train"][0]
    d = load_captioned("digits", size=8)
    assert d.prompt(7) == "a handwritten seven"
    with pytest.raises(ValueError, match="at most"):
        Vocab(["a"], 3).encode(["a a"])


# ----------------------------------------------------------------------------------------------------
# EMA


def test_ema_update_is_the_exponential_average():
    net = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in ema.parameters()]
    thetas = []
    d = 0.9
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        thetas.append([p.detach().clone() for p in net.parameters()])
        D.ema_update(ema, net, d)
    for i, p in enumerate(ema.parameters()):
        # e_n = d^n e_0 + sum_k (1 - d) d^(n - k) theta_k
        expect = d**5 * e0[i] + sum((1 - d) * d ** (4 - k) * thetas[k][i] for k in range(5))
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-6)
    assert D.ema_decay_at(1, 0.999, True) == pytest.approx(2 / 11)
    assert D.ema_decay_at(10_000, 0.999, True) == 0.999
    assert D.ema_decay_at(1, 0.999, False) == 0.999
    D.ema_update(ema, net, 0.0)  # d = 0 copies
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), net.parameters()))


# ----------------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("conditioning,prediction", [("caption", ""), ("class", ""), ("caption", "epsilon")])
def test_a_few_steps_lower_the_loss(conditioning, prediction):
    import dataclasses

    from workbench.models.diffusion.schedulers import NoiseSchedule, diffusion_loss

    net, data, cfg = tiny_net(conditioning)
    cfg = dataclasses.replace(cfg, prediction_type=prediction)  # "": the schedule's own (v on cosine-v)
    assert D.schedule_config(cfg).prediction_type == (prediction or "v_prediction")
    sched_cfg = D.schedule_config(cfg)
    sched = NoiseSchedule(sched_cfg)
    x, y = data.images.train
    x0 = 2 * x[:32] - 1
    cond = data.tokens("train")[:32] if conditioning == "caption" else y[:32]
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sched.add_noise(x0, noise, t)

    def loss() -> torch.Tensor:
        return diffusion_loss(net(x_t, t, cond), x0, noise, t, sched_cfg.prediction_type, sched)

    first = loss().item()
    assert first == pytest.approx(sched.target(x0, noise, t).square().mean().item(), rel=1e-5)  # zero-init output
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * first


def test_guidance_zero_ignores_the_prompt_and_sampling_is_seeded():
    net, data, cfg = tiny_net()
    with torch.no_grad():  # a trained-looking net: the zero-init output layer would make every sample the same
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched_cfg = D.schedule_config(cfg)
    a = D.class_conditions(net, data, torch.tensor([0, 1]))
    b = D.class_conditions(net, data, torch.tensor([2, 3]))

    def run(cond, w, seed=0):
        return D.sample(net, cond, (3, 8, 8), sched_cfg, steps=4, guidance=w, generator=torch.Generator().manual_seed(seed))

    assert run(a, 0.0).shape == (2, 3, 8, 8) and 0 <= run(a, 0.0).min() and run(a, 0.0).max() <= 1
    torch.testing.assert_close(run(a, 0.0), run(b, 0.0))  # w = 0: the unconditional model only
    assert not torch.allclose(run(a, 3.0), run(b, 3.0))  # w > 0: the prompt matters
    torch.testing.assert_close(run(a, 3.0), run(a, 3.0))  # the same seed, the same images
    assert not torch.allclose(run(a, 3.0), run(a, 3.0, seed=1))


def test_config_errors_name_the_key(tmp_path):
    for override, key in ((["--task.channels", "[8, 10]"], "channels[1]"), (["--task.size", "9"], "task.size"),
                          (["--task.schedule", "nope"], "task.schedule"), (["--task.n", "7"], "task.n")):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            runner.load_job(tiny_job(tmp_path, "x"), override)


# ----------------------------------------------------------------------------------------------------
# the run: grids, results, exact resume


def test_a_run_writes_grids_and_resume_after_a_signal_is_exact(tmp_path, monkeypatch):
    straight = runner.run_job(tiny_job(tmp_path, "straight"), log=lambda m: None)
    run_dir = Path(straight["run_dir"])
    results = json.loads((run_dir / "results.json").read_text())
    files = [f["file"] for f in results["figures"]]
    assert {"samples.png", "samples-raw.png", "real.png"} <= set(files)
    steps = [int(f[len("samples-step-"):-4]) for f in files if f.startswith("samples-step-")]
    assert len(steps) == 1  # grid_every = 1: after epoch 1; the end's grid is samples.png
    for f in files:
        with Image.open(run_dir / f) as im:
            assert im.size[0] > 50 and im.size[1] > 50
    for key in ("val_loss", "val_loss_ema", "val_loss_predict_zero", "parameters"):
        assert key in results["results"], key
    assert results["results"]["val_loss"]["value"] < results["results"]["val_loss_predict_zero"]["value"]
    state = load_model_state(latest_checkpoint(run_dir))
    assert any(k.startswith("ema.") for k in state) and any(k.startswith("net.") for k in state)
    assert not all(torch.equal(state[k], state["ema." + k[4:]]) for k in state if k.startswith("net."))

    # the same run, stopped by SIGINT after step 4 (mid-epoch 2), then resumed
    calls = {"n": 0}
    real_update = D.ema_update

    def update_then_signal(ema, net, decay):
        real_update(ema, net, decay)
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(D, "ema_update", update_then_signal)
    with pytest.raises(runner.Interrupted):
        runner.run_job(tiny_job(tmp_path, "cut"), log=lambda m: None)
    monkeypatch.setattr(D, "ema_update", real_update)
    assert latest_checkpoint(tmp_path / "cut").name == "step-4"
    resumed = runner.run_job(tiny_job(tmp_path, "cut"), resume=True, log=lambda m: None)
    a, b = state, load_model_state(latest_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # net and EMA, bit for bit
    assert resumed["val_loss_ema"] == straight["val_loss_ema"]

    # the evals' loader gets the EMA weights
    run = D.load_run(run_dir)
    assert all(torch.equal(v, a["ema." + k]) for k, v in run.net.state_dict().items())
    images = run.generate(torch.tensor([0, 5]), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8)
