"""An FVD-style distance, temporal consistency, flicker and motion / shape / colour accuracy of a video run's samples.

    workbench eval --task video --ckpt runs/video-shapes [--video.per_prompt 2 --video.prompts all ...]

What it measures
    The run generates `per_prompt` videos for each prompt of a set (`prompts`: every shape x colour x direction
    of the moving-shapes data, or every shape x direction in one colour), with its own sampler and guidance
    (or --video.steps / guidance). A judge the project trains on the run's own data (its training split,
    evals/video_metrics.py) scores them:
        fvd                   Frechet distance between Gaussian fits of the judge's penultimate features of the
                              generated videos and of as many training videos (lower is better);
        temporal_consistency  the lag-1 autocorrelation of per-frame features (1: smooth; about -1/(T-1):
                              frames with no order);
        flicker_ratio         mean |x_{t+1} - x_t| over the real training videos' (1 is right, 0 a still video);
        motion_accuracy       the share of videos the judge reads as moving in the direction asked
                              (shape_accuracy, colour_accuracy, all_accuracy likewise).
    This is not the published FVD (I3D on Kinetics-400, which cannot be downloaded here and would not know
    32-pixel shapes): numbers compare between runs on the same data setting only.

References (computed by the same judge at the same n; `details.references`)
    real (held-out test videos: the ceiling), noise (uniform pixels: the floor), and three temporal failures
    made from the real videos: shuffled (frames in random order), jumbled (each frame from another video),
    static (the first frame repeated). `baselines` holds their FVD.

The judge is trained once per data setting and recipe and cached in `cache` (default RUN_DIR/eval_nets/<key>/).
Any object with `data_settings` (load_moving_shapes' arguments) and `generate(prompts, seed, steps, guidance)`
-> uint8 (N, T, 3, H, W) can be scored: `workbench.train.video.load_run` gives one for a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from evals.registry import EvalContext, TaskResult
from evals.video_metrics import (
    HEADS,
    TEMPORAL_FAILURES,
    JudgeConfig,
    VideoEvalNet,
    plot_references,
    temporal_consistency,
)
from evals.video_metrics import references as video_references
from workbench.config import fail, field_
from workbench.errors import WorkbenchError

PROMPT_SETS = ("all", "shape_direction")


@dataclass
class Config:
    per_prompt: int = field_(3, gt=0, doc="videos generated per prompt (the references hold as many videos in all; "
                                          "the test split must hold that many)")
    prompts: str = field_("all", doc="all: every shape x colour x direction; shape_direction: every shape x "
                                     "direction in the colour `colour`")
    colour: int = field_(0, ge=0, doc="the colour (an index into moving_shapes.COLOURS) of prompts=shape_direction")
    guidance: float = field_(-1.0, doc="classifier-free guidance weight; < 0 = the run's own")
    steps: int = field_(0, ge=0, doc="sampler steps; 0 = the run's own")
    seed: int = field_(0, ge=0, doc="the seed of the generator's noise and of the references' draws")
    show: int = field_(8, ge=0, doc="generated videos drawn in video-samples.png / .gif (one per prompt, in order)")
    cache: str = field_("", doc="folder of the cached judge; '' = RUN_DIR/eval_nets")
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={
        "doc": "the judge's recipe (evals/video_metrics.py JudgeConfig); another recipe trains and caches another"})

    def validate(self) -> None:
        from workbench.data.moving_shapes import COLOURS

        if self.prompts not in PROMPT_SETS:
            fail("prompts", f"expected one of {', '.join(PROMPT_SETS)}, got {self.prompts!r}")
        if self.colour >= len(COLOURS):  # checked here, before the judge trains
            fail("colour", f"expected an index in 0..{len(COLOURS) - 1} ({', '.join(COLOURS)}), got {self.colour}")


def prompt_set(cfg: Config) -> list[tuple[int, int, int, str]]:
    """(shape, colour, direction, prompt) of every prompt asked for, in order."""
    from workbench.data import moving_shapes as ms

    if cfg.prompts == "all":
        return ms.all_prompts()
    return [(s, cfg.colour, d, ms.prompt(s, cfg.colour, d)) for s in range(len(ms.SHAPES))
            for d in range(len(ms.DIRECTIONS))]


class VideoEval:
    name = "video"
    description = ("FVD-style distance, temporal consistency, flicker and motion/shape/colour accuracy of a video "
                   "run's samples, judged by a video classifier the project trains on the same data, beside real, "
                   "noise and temporally broken videos")
    Config = Config
    model_kind = "video"  # evals.runner loads a video run (workbench.train.video.load_run)

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        from workbench.data import moving_shapes as ms

        run = ctx.model
        if not (hasattr(run, "generate") and hasattr(run, "data_settings")):
            raise WorkbenchError("eval video: needs a video run (--ckpt RUN_DIR of a `workbench video` run)")
        settings = dict(run.data_settings)
        splits = ms.load_moving_shapes(**settings)
        run_dir = ctx.source.get("run_dir")
        if not cfg.cache and run_dir is None:
            raise WorkbenchError("eval video: --video.cache: give a folder for the judge (the model has no run folder)")
        cache = Path(cfg.cache) if cfg.cache else Path(run_dir) / "eval_nets"
        device = next(run.net.parameters()).device if isinstance(getattr(run, "net", None), torch.nn.Module) else "cpu"
        net = VideoEvalNet.load_or_train(cache, splits, settings, cfg.judge, device, ctx.log)
        plan = [p for p in prompt_set(cfg) for _ in range(cfg.per_prompt)]
        n = len(plan)
        refs = video_references(net, splits, n, cfg.seed)  # first: a test split too small fails before sampling
        asked = {k: torch.tensor([p[i] for p in plan]) for i, k in enumerate(HEADS)}
        prompts = [p[3] for p in plan]
        ctx.log(f"eval video: generating {n} videos ({cfg.per_prompt} for each of {n // cfg.per_prompt} prompts)")
        videos = run.generate(prompts, seed=cfg.seed, steps=cfg.steps or None,
                              guidance=None if cfg.guidance < 0 else cfg.guidance)
        want = (n, settings["frames"], 3, settings["size"], settings["size"])
        if not isinstance(videos, torch.Tensor) or videos.dtype != torch.uint8 or tuple(videos.shape) != want:
            got = f"{videos.dtype} {tuple(videos.shape)}" if isinstance(videos, torch.Tensor) else type(videos).__name__
            raise WorkbenchError(f"eval video: the run's generate returned {got}, expected uint8 {want}")
        read = net.read(videos)
        model = net.score_read(read, asked, refs["ref"])
        pred = {k: read.logits[k].argmax(1) for k in HEADS}
        tc = temporal_consistency(read.frames)  # (N,) per video, NaN below 3 frames like the aggregate
        x = videos.float() / 255.0
        flick = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3, 4)) / refs["ref"]["flicker"]  # (N,)
        names = {"shape": ms.SHAPES, "colour": ms.COLOURS, "direction": ms.DIRECTIONS}
        per_direction = {d: (pred["direction"][asked["direction"] == i] == i).double().mean().item()
                         for i, d in enumerate(ms.DIRECTIONS) if (asked["direction"] == i).any()}
        order = ("direction", "shape", "colour")  # the report's table shows the first columns: motion first
        samples = [{"index": i, "prompt": prompts[i],
                    **{f"predicted_{k}": names[k][int(pred[k][i])] for k in order},
                    "temporal_consistency": round(float(tc[i]), 4), "flicker_ratio": round(float(flick[i]), 4),
                    **{f"{k}_correct": bool(pred[k][i] == asked[k][i]) for k in order}}
                   for i in range(n)]
        plots = []
        if cfg.show:
            first = list(range(0, n, cfg.per_prompt))[:cfg.show]  # one video per prompt
            ms.write_strip(videos[first], ctx.out_dir / "video-samples.png", scale=2)
            ms.write_gif(list(videos[first]), ctx.out_dir / "video-samples.gif", fps=6, scale=2, columns=min(4, len(first)))
            plots += ["video-samples.png", "video-samples.gif"]
        plots.append(plot_references(ctx.out_dir / "video-metrics.png", model, refs))
        meta = net.meta
        acc = ", ".join(f"{k} {v:.3f}" for k, v in meta["test_accuracy"].items())
        return TaskResult(
            task=self.name, primary="fvd", higher_is_better=False, metrics=model,
            baselines={"real held-out videos": refs["real"]["fvd"], "uniform noise": refs["noise"]["fvd"],
                       **{f"{k} real videos": refs[k]["fvd"] for k in TEMPORAL_FAILURES}},
            n=n, samples=samples, plots=plots,
            details={
                "judge": (f"a (2+1)D/3D conv video classifier trained by the project on {meta['trained_on']} "
                          f"(test accuracy {acc}); FVD features = its penultimate layer; not I3D on Kinetics"),
                "references": {k: v for k, v in refs.items() if k != "ref"},
                "per_direction_motion_accuracy": per_direction,
                "chance": {k: 1 / len(v) for k, v in names.items()}, "prompts": cfg.prompts,
                "per_prompt": cfg.per_prompt, "data_settings": settings, "eval_nets": str(net.folder),
                "judge_test_accuracy": meta["test_accuracy"]})


TASK = VideoEval()
