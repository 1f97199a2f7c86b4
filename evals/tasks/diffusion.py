"""FID, class-conditional accuracy and a CLIP-style score of a `workbench diffusion` run, beside real and noise.

    workbench eval --task diffusion --ckpt runs/diffusion-shapes [--diffusion.per_class 50 ...]

What it measures
    The run's EMA model generates `per_class` images of every class, each prompted with its class's plain
    caption ("a circle"), with the run's sampler and guidance (or --diffusion.guidance / steps). The images
    are judged by networks *the project trains on the same data* (the run's dataset, size, n and seed;
    training split only), evals/image_metrics.py:
        fid              Frechet distance between Gaussian fits of a classifier's penultimate features of the
                         generated images and of the training images (lower is better);
        class_accuracy   the share of generated images that classifier assigns the class that was asked for;
        clip_score       100 * max(cos, 0) between the image and its prompt under the project's own contrastive
                         text-image model (workbench/models/contrastive.py).
    These are not the published FID (Inception-v3 on ImageNet) or CLIP-score (OpenAI's CLIP): numbers are
    comparable between runs on the same data setting only, and the report says so.

References (the validation of each metric, computed with the same judges and the same n per class)
    real    held-out test images: the best a generator can expect (FID's finite-sample floor, the classifier's
            test accuracy, the real-pair CLIP-score);
    noise   uniform random pixels: the worst (large FID, about chance accuracy, low CLIP-score).
    `baselines` holds both for the primary metric (FID); `details.references` all three metrics of both.

The judges are trained once per data setting and cached in `cache` (default: RUN_DIR/eval_nets/<key>/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from evals.image_metrics import EvalNets, NetsConfig, references
from evals.registry import EvalContext, TaskResult
from workbench.config import field_
from workbench.errors import WorkbenchError


@dataclass
class Config:
    per_class: int = field_(30, gt=1, doc="images generated per class (and real / noise references per class; the "
                                          "test split must hold as many: digits has 35-37 a class)")
    guidance: float = field_(-1.0, doc="classifier-free guidance weight; < 0 = the run's own")
    steps: int = field_(0, ge=0, doc="sampler steps; 0 = the run's own")
    seed: int = field_(0, ge=0, doc="the generator's seed for the starting noise")
    cache: str = field_("", doc="folder of the cached eval networks; '' = RUN_DIR/eval_nets")
    guidance_sweep: list[float] = field_([], doc="also score these guidance weights (per_class images each) and plot "
                                               "the three metrics against w (diffusion-guidance.png)")
    nets: NetsConfig = field(default_factory=NetsConfig, metadata={
        "doc": "the judges' recipe, e.g. --diffusion.nets.classifier_epochs 20 (evals/image_metrics.py NetsConfig); "
               "another recipe trains and caches another pair"})


class DiffusionEval:
    name = "diffusion"
    description = ("FID, class-conditional accuracy and CLIP-style score of a diffusion run's samples, judged by a "
                   "classifier and a text-image model the project trains on the same data, beside real and noise")
    Config = Config
    model_kind = "diffusion"  # evals.runner loads a `workbench diffusion` run (workbench.train.diffusion.load_run)

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        from workbench.train.diffusion import DiffusionRun
        from workbench.train.fundamentals.plots import image_grid

        run = ctx.model if isinstance(ctx.model, DiffusionRun) else None
        if run is None:
            raise WorkbenchError("eval diffusion: needs a `workbench diffusion` run (--ckpt RUN_DIR)")
        data = run.data()
        tc = run.cfg
        device = next(run.net.parameters()).device
        cache = Path(cfg.cache) if cfg.cache else Path(run.source["run_dir"]) / "eval_nets"
        nets = EvalNets.load_or_train(cache, data, tc.dataset, tc.n, tc.size, run.seed, tc.val_fraction, cfg.nets,
                                      device, ctx.log)
        k = len(data.classes)
        asked = torch.arange(k).repeat_interleave(cfg.per_class)
        guidance = tc.guidance if cfg.guidance < 0 else cfg.guidance
        refs = references(nets, data, cfg.per_class, cfg.seed)  # first: a test split too small fails before sampling
        ctx.log(f"eval diffusion: generating {len(asked)} images ({cfg.per_class} per class), guidance {guidance}")
        images = run.generate(asked, guidance=guidance, steps=cfg.steps or None,
                              generator=torch.Generator().manual_seed(cfg.seed))
        model = nets.score(images, asked, data.prompts(), refs["ref"])
        logits, _, emb = nets.judge(images)
        pred = logits.argmax(1)
        text = nets.text(data.prompts())
        cos = (emb * text[asked]).sum(-1)
        per_class = {data.classes[i]: (pred[asked == i] == i).double().mean().item() for i in range(k)}
        samples = [{"index": i, "asked": data.classes[int(a)], "prompt": data.prompt(int(a)),
                    "predicted": data.classes[int(p)], "correct": bool(p == a), "clip_cosine": round(float(c), 4)}
                   for i, (a, p, c) in enumerate(zip(asked, pred, cos))]
        show = min(cfg.per_class, 10)
        grid = torch.cat([images[asked == i][:show] for i in range(k)])
        image_grid(grid, show, ctx.out_dir / "diffusion-samples.png", title=f"samples, guidance {guidance}",
                   row_labels=[f"{data.prompt(i)} ({per_class[data.classes[i]]:.2f})" for i in range(k)])
        meta = nets.meta
        plots, sweep = ["diffusion-samples.png"], {}
        for w in cfg.guidance_sweep:
            ctx.log(f"eval diffusion: guidance sweep, w = {w}")
            sweep[str(w)] = nets.score(run.generate(asked, guidance=w, steps=cfg.steps or None,
                                                    generator=torch.Generator().manual_seed(cfg.seed)),
                                       asked, data.prompts(), refs["ref"])
        if sweep:
            plots.append(_plot_sweep(ctx.out_dir / "diffusion-guidance.png", sweep, refs, tc.dataset))
        return TaskResult(
            task=self.name, primary="fid", higher_is_better=False, metrics=model,
            baselines={"real held-out images": refs["real"]["fid"], "uniform noise": refs["noise"]["fid"]},
            n=len(asked), samples=samples, plots=plots,
            details={
                "judges": (f"trained by the project on the same data: {meta['trained_on']}; a {cfg.nets.classifier} "
                           f"classifier (FID features = its penultimate layer; test accuracy "
                           f"{meta['test_accuracy']:.4f}) and a {cfg.nets.clip} {cfg.nets.clip_loss} text-image model "
                           f"(real-pair CLIP-score {meta['real_clip_score']:.1f}); not Inception-v3 or OpenAI CLIP"),
                "references": {"real": refs["real"], "noise": refs["noise"]},
                "per_class_accuracy": per_class, "chance_accuracy": 1 / k, "guidance": guidance,
                "steps": cfg.steps or tc.sample_steps, "sampler": tc.sampler, "eval_nets": str(nets.folder),
                "classifier_test_accuracy": meta["test_accuracy"], "real_pair_clip_score": meta["real_clip_score"],
                "mismatched_pair_clip_score": meta["mismatched_clip_score"], "guidance_sweep": sweep})


def _plot_sweep(out: Path, sweep: dict[str, dict], refs: dict, dataset: str) -> str:
    """FID, class accuracy and CLIP-score against the guidance weight, real and noise as dashed lines."""
    from evals.plots import new_figure, save_figure

    ws = [float(w) for w in sweep]
    fig = new_figure((11.0, 3.4))
    for ax, key, label in zip(fig.subplots(1, 3), ("fid", "class_accuracy", "clip_score"),
                              ("FID (lower is better)", "class accuracy", "CLIP-style score")):
        ax.plot(ws, [m[key] for m in sweep.values()], "o-", label="samples")
        for name, style in (("real", "g--"), ("noise", "r:")):
            ax.axhline(refs[name][key], color=style[0], linestyle=style[1:], label=f"{name} ({refs[name][key]:.3g})")
        if key == "fid":
            ax.set_yscale("log")
        ax.set_xlabel("guidance weight w")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"classifier-free guidance on {dataset}: judges trained by the project on the same data", fontsize=10)
    save_figure(fig, out)
    return out.name


TASK = DiffusionEval()
