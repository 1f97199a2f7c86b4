"""Preference accuracy on held-out pairs: does the model rank the chosen answer above the rejected one?

Data: a jsonl of preference pairs {"prompt", "chosen", "rejected"} (`--preference.data FILE`; the held-out split
`data_pipelines.preferences` writes). Each side is scored as DPO trains it: the prompt as a user turn of the chat
template, the completion's tokens and its closing `<|end|>` as targets, log p(y | x) = the sum of their
log-probs (`evals.scoring.score`, the same request machinery as perplexity and lm-eval).

Metrics
    logp_acc        log p(y_w | x) > log p(y_l | x): the model's own preference, no reference needed
    logp_acc_mean   the same on per-token means (a longer answer is not penalised for its length)
    with `--preference.reference RUN_DIR` (the model DPO started from), DPO's implicit rewards
    r = beta (log p(y | x) - log p_ref(y | x)):
    reward_acc      r_w > r_l (ties are not accurate, as in training; the reference itself scores 0)
    reward_margin   mean r_w - r_l, in nats times beta
    chosen_reward, rejected_reward   their means
The primary metric is reward_acc with a reference, else logp_acc; chance is 0.5 for both accuracies (a coin
flip per pair). A histogram of the per-pair margins is drawn, and per-kind accuracies when the pairs have a
`kind` (e.g. "terse" and "wrong" rejected answers).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from evals.plots import histogram
from evals.registry import EvalContext, TaskResult, data_file
from workbench.config import fail, field_
from workbench.errors import WorkbenchError


@dataclass
class Config:
    data: str | None = field_(None, doc="jsonl of {prompt, chosen, rejected} (required)")
    n: int = field_(500, gt=0, doc="at most this many pairs (the first n)")
    reference: str | None = field_(None, doc="run folder or checkpoint of the reference model: adds DPO's rewards")
    beta: float = field_(0.1, gt=0, doc="the beta of the implicit reward r = beta (log p - log p_ref)")

    def validate(self) -> None:
        if self.data is None:
            fail("data", "required: a jsonl of preference pairs (prompt, chosen, rejected)")
        data_file(self.data, "preference.data")


def sequence_scores(ctx: EvalContext, model, examples, desc: str) -> list[tuple[float, int, float, int]]:
    """(sum of log p over the chosen completion, its tokens, the same for the rejected one) per pair."""
    from evals.scoring import score

    requests = [(e.ids.tolist(), side.tolist()) for e in examples for side in (e.chosen, e.rejected)]
    scored = score(model, requests, ctx.batch_size, ctx.max_length, progress=desc)
    out = []
    for i in range(0, len(scored), 2):
        (lc, _), (lr, _) = scored[i], scored[i + 1]
        out.append((float(lc.sum()), len(lc), float(lr.sum()), len(lr)))
    return out


def load_reference(path: str, ctx: EvalContext):
    """The reference model, on the evaluated model's device; its tokenizer must be the evaluated model's."""
    from workbench.checkpoint.load import load_run

    device = next(ctx.model.parameters()).device
    try:
        model, tokenizer, _ = load_run(path, device)
    except WorkbenchError as e:
        raise type(e)(f"preference.reference: {e}") from e
    if tokenizer.backend.to_str() != ctx.tokenizer.backend.to_str():
        raise WorkbenchError(f"preference.reference: {path} uses another tokenizer than the evaluated model; the "
                             f"log-probs would be of other tokens")
    return model


class Preference:
    name = "preference"
    description = "held-out preference pairs: the model's ranking of chosen over rejected, and DPO's implicit rewards"
    Config = Config

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        from workbench.data.chat import ChatTemplate
        from workbench.data.examples import ExampleSet

        pairs = ExampleSet(cfg.data, "pairs", ChatTemplate(ctx.tokenizer), ctx.max_length - 1, shuffle=False,
                           option="preference.data", log=ctx.log)
        examples = pairs.examples[: cfg.n]
        policy = sequence_scores(ctx, ctx.model, examples, "preference")
        ref = sequence_scores(ctx, load_reference(cfg.reference, ctx), examples, "reference") if cfg.reference else None
        samples = []
        for i, (e, (lc, nc, lr, nr)) in enumerate(zip(examples, policy)):
            s = {"kind": e.meta.get("kind"), "subject": e.meta.get("subject"), "logp_chosen": lc,
                 "logp_rejected": lr, "tokens_chosen": nc, "tokens_rejected": nr,
                 "logp_correct": lc > lr, "logp_mean_correct": lc / nc > lr / nr}
            if ref is not None:
                rc, _, rr, _ = ref[i]
                s["chosen_reward"], s["rejected_reward"] = cfg.beta * (lc - rc), cfg.beta * (lr - rr)
                s["reward_margin"] = s["chosen_reward"] - s["rejected_reward"]
                s["reward_correct"] = s["chosen_reward"] > s["rejected_reward"]
            samples.append(s)
        n = len(samples)
        mean = lambda key: sum(float(s[key]) for s in samples) / n  # noqa: E731
        metrics = {"logp_acc": mean("logp_correct"), "logp_acc_mean": mean("logp_mean_correct")}
        if ref is not None:
            metrics.update(reward_acc=mean("reward_correct"), reward_margin=mean("reward_margin"),
                           chosen_reward=mean("chosen_reward"), rejected_reward=mean("rejected_reward"))
        primary = "reward_acc" if ref is not None else "logp_acc"
        by_kind = defaultdict(list)
        for s in samples:
            if isinstance(s["kind"], str):
                by_kind[s["kind"]].append(s)
        correct = "reward_correct" if ref is not None else "logp_correct"
        per_kind = {k: {"accuracy": sum(s[correct] for s in g) / len(g), "n": len(g)} for k, g in sorted(by_kind.items())}
        margin_key = "reward_margin" if ref is not None else None
        values = ([s["reward_margin"] for s in samples] if margin_key
                  else [s["logp_chosen"] - s["logp_rejected"] for s in samples])
        plot = "preference.png"
        histogram(ctx.out_dir / plot, values, mark={"tie": 0.0, "mean": sum(values) / n},
                  title=f"{'reward margin' if margin_key else 'log p(chosen) - log p(rejected)'} over {n} pairs",
                  xlabel="beta (log-ratio chosen - log-ratio rejected)" if margin_key else "nats")
        return TaskResult(task=self.name, primary=primary, metrics=metrics, baselines={"chance": 0.5}, n=n,
                          samples=samples, plots=[plot],
                          details={"data": cfg.data, "reference": cfg.reference, "beta": cfg.beta, "per_kind": per_kind,
                                   "pairs_cut_to_fit": pairs.truncated, "pairs_dropped": pairs.dropped})


TASK = Preference()
