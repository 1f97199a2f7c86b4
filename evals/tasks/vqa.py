"""Visual question answering: greedy exact match of a vision-language model on held-out diagram questions and
captions, beside the blind baselines, with the images replaced by noise as a check of the scorer.

    workbench eval --task vqa --ckpt runs/vlm-finetune [--vqa.blind_run runs/vlm-blind] [--vqa.split test]

Data: the `split` (default test: never seen in training or validation) of the vision folder the run trained on
(its `data.dir`; `--vqa.data DIR` for another), read as objective vlm reads it (`workbench.data.vqa`): one item
per (image, question) and one per image asking `caption`. Each prompt `<image> x N <bos> question "\\n"` is decoded
greedily up to `max_new_tokens` or the eos; an answer counts when it equals the truth after lowercasing and
collapsing whitespace.

Metrics
    exact_match         over the questions (captions apart), with the images the model was trained to see: the
                        real ones, or the constant image for a run trained with objective.blind = true
    em_<type>           per question type; `em_caption` is the caption's exact match (a whole sentence)
    exact_match_noise   the same questions with each image replaced by uniform noise (seeded): a model that reads
                        the images should fall to about the blind level, one that does not stays where it was
Baselines (same questions, same scoring)
    majority (train)    the train split's most frequent answer to the same question text, else to the same
                        question type: what the answer priors give
    blind run           `blind_run`'s greedy answers (a run trained with objective.blind = true on the same
                        questions): what the questions alone give a trained model
`margin_over_blind` (and `margin_over_majority`) = exact_match minus that baseline: the stated margin.
Plots: vqa_types.png (per type: real, noise, blind, majority) and vqa_examples.png (held-out images with the
question, the model's answer and the truth).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from evals.plots import new_figure, save_figure
from evals.registry import EvalContext, TaskResult
from workbench.config import field_
from workbench.data.vqa import CAPTION_TYPE, VQASet, answer_samples, normalize
from workbench.errors import WorkbenchError


@dataclass
class Config:
    data: str = field_("", doc="vision folder; empty = the run's data.dir")
    split: str = field_("test", doc="train | val | test")
    limit: int = field_(0, ge=0, doc="score the first `limit` items only; 0 = every item of the split")
    max_new_tokens: int = field_(64, gt=0, doc="the longest answer decoded (a circuit's caption is ~60 tokens)")
    blind_run: str = field_("", doc="a run folder (or checkpoint) trained with objective.blind = true: its answers "
                                    "to the same questions are the blind baseline; empty = the majority baseline only")
    noise: bool = field_(True, doc="also score with every image replaced by uniform noise (the scorer's check)")
    seed: int = field_(0, doc="the noise images' seed")
    examples: int = field_(8, ge=0, doc="held-out images drawn in vqa_examples.png")

    def validate(self) -> None:
        if self.split not in ("train", "val", "test"):
            from workbench.config import fail

            fail("split", f"expected train, val or test, got {self.split!r}")


def _data_dir(ctx: EvalContext, cfg: Config) -> str:
    if cfg.data:
        return cfg.data
    if ctx.job is None or ctx.job.objective.name != "vlm":
        raise WorkbenchError("vqa.data: give the vision folder (--vqa.data DIR); the model did not come from a run "
                             "trained with objective.name = 'vlm'")
    return ctx.job.data.dir


def _vqa_set(root: str, split: str, tokenizer, model, ctx: EvalContext, log, captions: bool = True) -> VQASet:
    cfg = model.cfg
    return VQASet(root, split, tokenizer, num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
                  image_size=cfg.vision.image_size, seq_len=1 << 30, shuffle=False, captions=captions,
                  option="vqa.data", log=log)


def _scores(samples, outputs) -> dict[str, float]:
    """exact_match over the questions (captions apart) and em_<type> for every type."""
    hits: dict[str, list[int]] = {}
    for s, out in zip(samples, outputs):
        hit = int(normalize(out) == normalize(s.answer))
        hits.setdefault(s.type, []).append(hit)
        if s.type != CAPTION_TYPE:
            hits.setdefault("all", []).append(hit)
    return {("exact_match" if k == "all" else f"em_{k}"): sum(v) / len(v) for k, v in sorted(hits.items())}


def majority_answers(train, samples) -> list[str]:
    """The blind guess for each sample: the train split's most frequent answer to that exact question, else to
    its type (what a model that knows the question but not the picture can learn)."""
    by_question: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    for s in train:
        by_question.setdefault(normalize(s.question), Counter())[normalize(s.answer)] += 1
        by_type.setdefault(s.type, Counter())[normalize(s.answer)] += 1
    out = []
    for s in samples:
        counts = by_question.get(normalize(s.question)) or by_type.get(s.type)
        out.append(counts.most_common(1)[0][0] if counts else "")
    return out


def _blind_answers(ctx: EvalContext, cfg: Config, root: str, device) -> tuple[list[str], VQASet]:
    from workbench.checkpoint.load import load_run, load_run_config

    job = load_run_config(cfg.blind_run)
    if job.objective.name != "vlm" or not job.objective.blind:
        raise WorkbenchError(f"vqa.blind_run: {cfg.blind_run} was not trained with objective.name = 'vlm' and "
                             f"objective.blind = true, so its answers are not a blind baseline")
    model, tokenizer, _ = load_run(cfg.blind_run, device)
    data = _vqa_set(root, cfg.split, tokenizer, model, ctx, lambda *a: None)
    samples = data.samples[: cfg.limit or None]
    return answer_samples(model, samples, data.images, tokenizer, cfg.max_new_tokens, ctx.batch_size, blind=True,
                          progress="vqa blind run"), data


def _plot_types(out: Path, metrics: dict, baselines_by_type: dict[str, dict[str, float]]) -> Path:
    types = [k[3:] for k in metrics if k.startswith("em_") and not k.startswith("em_noise_")]
    series = {"model": [metrics[f"em_{t}"] for t in types]}
    if f"em_noise_{types[0]}" in metrics:
        series["noise images"] = [metrics[f"em_noise_{t}"] for t in types]
    for name, per_type in baselines_by_type.items():
        series[name] = [per_type.get(t, 0.0) for t in types]
    fig = new_figure((max(5.0, 1.4 * len(types)), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(types))]
        ax.bar(xs, values, width, label=name, color=f"C{i}")
    ax.set_xticks(list(range(len(types))), types, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    ax.set_title("held-out exact match per question type")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, out)


def _plot_examples(out: Path, data: VQASet, samples, outputs, n: int) -> Path | None:
    """The first `n` images (one question each, not a caption, the types cycling) with question, answer, truth."""
    chosen, seen = [], set()
    for s, o in zip(samples, outputs):
        if s.type != CAPTION_TYPE and s.image not in seen:
            seen.add(s.image)
            chosen.append((s, o))
        if len(chosen) == n:
            break
    if not chosen:
        return None
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig = new_figure((3.0 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (s, o) in zip(axes.flat, chosen):
        ax.imshow(data.examples[s.image].image)
        ok = normalize(o) == normalize(s.answer)
        ax.set_title(f"{s.question}\nmodel: {o!r}\ntruth: {s.answer!r}", fontsize=7, color="green" if ok else "red")
    return save_figure(fig, out)


class VQATask:
    name = "vqa"
    description = ("VLM greedy exact match on held-out diagram questions and captions, per type, beside the blind "
                   "baselines (the train split's majority answer per question, a blind run) and the same questions on noise images")
    Config = Config

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        model = ctx.model
        if not hasattr(getattr(model, "cfg", None), "image_token_id"):
            raise WorkbenchError("task vqa needs a vision-language model (family paligemma2)")
        root = _data_dir(ctx, cfg)
        device = next(model.parameters()).device
        data = _vqa_set(root, cfg.split, ctx.tokenizer, model, ctx, ctx.log)
        samples = data.samples[: cfg.limit or None]
        blind_model = ctx.job is not None and ctx.job.objective.name == "vlm" and ctx.job.objective.blind
        outputs = answer_samples(model, samples, data.images, ctx.tokenizer, cfg.max_new_tokens, ctx.batch_size,
                                 blind=blind_model, progress="vqa")
        metrics = _scores(samples, outputs)
        noise_out = None
        if cfg.noise:
            gen = torch.Generator().manual_seed(cfg.seed)
            noise = torch.randint(0, 256, data.images.shape, generator=gen, dtype=torch.uint8)
            noise_out = answer_samples(model, samples, noise, ctx.tokenizer, cfg.max_new_tokens, ctx.batch_size,
                                       progress="vqa noise")
            metrics.update({k.replace("exact_match", "exact_match_noise").replace("em_", "em_noise_"): v
                            for k, v in _scores(samples, noise_out).items()})
        majority = majority_answers(_vqa_set(root, "train", ctx.tokenizer, model, ctx, lambda *a: None).samples,
                                    samples)
        majority_scores = _scores(samples, majority)
        baselines = {"majority (train)": majority_scores["exact_match"]}
        by_type = {"majority (train)": {k[3:]: v for k, v in majority_scores.items() if k.startswith("em_")}}
        metrics["margin_over_majority"] = metrics["exact_match"] - baselines["majority (train)"]
        blind_out = None
        if cfg.blind_run:
            blind_out, _ = _blind_answers(ctx, cfg, root, device)
            blind_scores = _scores(samples, blind_out)
            baselines["blind run"] = blind_scores["exact_match"]
            by_type["blind run"] = {k[3:]: v for k, v in blind_scores.items() if k.startswith("em_")}
            metrics["margin_over_blind"] = metrics["exact_match"] - baselines["blind run"]
            metrics.update({f"blind_em_{t}": v for t, v in by_type["blind run"].items()})
        metrics.update({f"majority_em_{t}": v for t, v in by_type["majority (train)"].items()})
        plots = [_plot_types(ctx.out_dir / "vqa_types.png", metrics, by_type).name]
        if cfg.examples:
            path = _plot_examples(ctx.out_dir / "vqa_examples.png", data, samples, outputs, cfg.examples)
            if path is not None:
                plots.append(path.name)
        records = []
        for i, (s, out) in enumerate(zip(samples, outputs)):
            rec = {"image": data.examples[s.image].id, "type": s.type, "question": s.question, "answer": s.answer,
                   "output": out, "correct": normalize(out) == normalize(s.answer), "majority": majority[i]}
            if noise_out is not None:
                rec["output_noise"] = noise_out[i]
            if blind_out is not None:
                rec["output_blind"] = blind_out[i]
            records.append(rec)
        n_questions = sum(s.type != CAPTION_TYPE for s in samples)
        details = {"data": str(root), "split": cfg.split, "questions": n_questions,
                   "captions": len(samples) - n_questions, "images": len({s.image for s in samples}),
                   "types": {t: sum(s.type == t for s in samples) for t in sorted({s.type for s in samples})},
                   "model_images": "constant (a blind run)" if blind_model else "real"}
        return TaskResult(task=self.name, primary="exact_match", metrics=metrics, baselines=baselines,
                          n=len(samples), details=details, samples=records, plots=plots)


TASK = VQATask()
