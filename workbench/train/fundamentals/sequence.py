"""Sequence tasks for the from-scratch RNN and LSTM (workbench/models/fundamentals/rnn.py; notes in docs/rnn.md).

"sequence": next-value prediction on noisy periodic signals (data_pipelines/signals.py)
    The model reads x_0 .. x_t and predicts x_{t+1} at every step (readout "steps", mean squared error over
    all steps in training). Scored on held-out sequences from step `score_from` on, beside three reference
    points computed on exactly the same steps: persistence (x_hat_{t+1} = x_t), a linear autoregression
    of order `ar_order` fitted by least squares to the training set, and the noise floor (the noise
    variance: no predictor of the noisy value can beat it on average). The model's error against the
    clean signal is reported too (how well it denoises). Pictures: predictions against the truth on test
    sequences, and the gradient of the last prediction with respect to every earlier input, for the
    trained model and for an untrained RNN and LSTM of the same size (vanishing gradients, measured).

"sentiment": classification of generated reviews (data_pipelines/sentiment.py)
    Embedding -> LSTM -> linear head, cross-entropy, trained on token ids (padded batches with `lengths`).
    Baselines trained on the same split: the majority class, and L2-regularised logistic regression on a
    bag of words (word counts) and on a bag of words and word pairs (bigrams), their L2 strength chosen on
    the validation split. Accuracies are reported overall and per form (plain / negation / contrast), which
    is where a bag of words fails and word order matters. Pictures: the model's confusion matrix and the
    per-form accuracies of every classifier.

Design choices
    Both tasks draw their data from run.seed, so a config is one reproducible experiment. Batches of reviews
    are trimmed to their longest review before the forward pass (the recurrent loop costs one step per
    column). The logistic-regression baselines are fitted here with torch's L-BFGS in float64 (full batch,
    a convex problem) rather than with another library.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from data_pipelines.sentiment import FORMS, SentimentConfig, build_vocab, encode, make_splits, tokenize
from data_pipelines.signals import SignalConfig, make_signals
from workbench.config import fail, field_
from workbench.models.fundamentals.rnn import Config as ModelConfig
from workbench.models.fundamentals.rnn import SequenceModel
from workbench.train.fundamentals.plots import confusion_matrix, plot_confusion
from workbench.train.fundamentals.runner import Context, Task
from workbench.train.metrics import save_png

EVAL_BATCH = 512


# ----------------------------------------------------------------------------------------------------
# "sequence": next-value prediction


@dataclass
class SequenceConfig:
    n_train: int = field_(4000, gt=0, doc="training sequences")
    n_val: int = field_(500, gt=0)
    n_test: int = field_(1000, gt=0)
    data: SignalConfig = field(default_factory=SignalConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(cell="rnn", readout="steps"))
    score_from: int = field_(10, ge=0, doc="predictions made after reading fewer values are not scored")
    ar_order: int = field_(8, gt=0, doc="lags of the linear autoregressive baseline (<= score_from + 1)")
    plot_examples: int = field_(3, gt=0, doc="test sequences drawn in the predictions picture")

    def validate(self) -> None:
        if self.model.readout != "steps":
            fail("model.readout", f"the sequence task predicts at every step: expected 'steps', got {self.model.readout!r}")
        if self.score_from >= self.data.length - 1:
            fail("score_from", f"must be < data.length - 1 ({self.data.length - 1}), got {self.score_from}")
        if self.ar_order > self.score_from + 1:
            fail("ar_order", f"must be <= score_from + 1 ({self.score_from + 1}) so every scored step has its "
                             f"lags, got {self.ar_order}")


def _predict_steps(model, x: Tensor, device) -> Tensor:
    """One-step-ahead predictions (N, T) for inputs x (N, T), in batches."""
    # (n, T) -> (n, T, 1) features -> (n, T, 1) predictions -> (n, T)
    return torch.cat([model(x[i:i + EVAL_BATCH, :, None].to(device))[..., 0].cpu() for i in range(0, len(x), EVAL_BATCH)])


def _fit_ar(noisy: Tensor, p: int) -> Tensor:
    """Least-squares coefficients c (p + 1,) of x_hat_{t+1} = c_0 x_t + ... + c_{p-1} x_{t-p+1} + c_p."""
    lags, target = _ar_design(noisy.double(), p, p - 1)
    return torch.linalg.lstsq(lags, target[:, None]).solution[:, 0]


def _ar_design(x: Tensor, p: int, start: int) -> tuple[Tensor, Tensor]:
    """Rows [x_t, x_{t-1}, ..., x_{t-p+1}, 1] and targets x_{t+1} for t = start .. T-2, over all sequences."""
    T = x.shape[1]
    # column j holds x_{t-j} for t = start .. T-2: (N, T-1-start) each
    cols = [x[:, start - j:T - 1 - j] for j in range(p)]
    lags = torch.stack(cols + [torch.ones_like(cols[0])], dim=-1)  # (N, T-1-start, p+1)
    return lags.reshape(-1, p + 1), x[:, start + 1:].reshape(-1)  # (N*(T-1-start), p+1), (N*(T-1-start),)


def _input_gradients(model, x: Tensor) -> Tensor:
    """Mean |d y_hat_{T-1} / d x_t| over a batch, by lag T-1-t: (T,) with index 0 = the last input."""
    x = x[:, :, None].clone().requires_grad_(True)  # (B, T) -> (B, T, 1)
    with torch.enable_grad():
        last = model(x)[:, -1, 0].sum()  # the final step's prediction, summed over the batch
        (grad,) = torch.autograd.grad(last, x)
    return grad[:, :, 0].abs().mean(0).flip(0)  # (B, T, 1) -> (T,), reversed so index = lag


def run_sequence(ctx: Context, cfg: SequenceConfig) -> None:
    seed, dev = ctx.job.run.seed, ctx.device
    noisy, clean = make_signals(cfg.n_train + cfg.n_val + cfg.n_test, seed, cfg.data)
    a, b = cfg.n_train, cfg.n_train + cfg.n_val
    # inputs x_0 .. x_{T-2}, targets x_1 .. x_{T-1}: (N, T) -> (N, T-1) each
    train_x, train_y = noisy[:a, :-1], noisy[:a, 1:]
    val_x, val_y = noisy[a:b, :-1], noisy[a:b, 1:]
    test_x, test_y, test_clean = noisy[b:, :-1], noisy[b:, 1:], clean[b:, 1:]
    s = cfg.score_from  # prediction index i predicts x_{i+1} after reading x_0 .. x_i; scored for i >= s
    ctx.log(f"signals: {cfg.data.components} sines, noise {cfg.data.noise}, length {cfg.data.length}; "
            f"{a} train, {cfg.n_val} val, {cfg.n_test} test sequences")

    model = SequenceModel(cfg.model, num_outputs=1, input_size=1)

    def loss_fn(model, batch):
        x, y = batch
        pred = model(x[:, :, None])[..., 0]  # (B, T-1, 1) -> (B, T-1)
        return F.mse_loss(pred, y), {}

    def evaluate(model):
        pred = _predict_steps(model, val_x, dev)
        return {"mse": F.mse_loss(pred[:, s:], val_y[:, s:]).item()}

    ctx.fit(model, (train_x, train_y), loss_fn, evaluate)
    model.eval()
    with torch.no_grad():
        pred = _predict_steps(model, test_x, dev)
    mse = lambda p, y: F.mse_loss(p[:, s:].double(), y[:, s:].double()).item()  # noqa: E731
    persistence = test_x  # x_hat_{t+1} = x_t
    coef = _fit_ar(noisy[:a], cfg.ar_order)
    lags, _ = _ar_design(noisy[b:].double(), cfg.ar_order, s)
    # x_hat_{t+1} = c . [x_t, ..., x_{t-p+1}, 1], for t = s .. T-2
    ar_pred = torch.full_like(test_y, float("nan"))
    ar_pred[:, s:] = (lags @ coef).reshape(len(test_y), -1).float()

    cell = cfg.model.cell.upper()
    scored = f"test steps {s + 1}..{cfg.data.length - 1}"
    ctx.result("test_mse", mse(pred, test_y), f"{cell}: mean squared error of x_t+1 over the {scored}")
    ctx.result("persistence_mse", mse(persistence, test_y), "baseline x_hat_t+1 = x_t, same steps")
    ctx.result("ar_mse", mse(ar_pred, test_y), f"baseline: linear AR({cfg.ar_order}) fitted on the training set")
    ctx.result("noise_floor", cfg.data.noise ** 2, "noise variance: no predictor of the noisy value does better")
    ctx.result("test_mse_vs_clean", mse(pred, test_clean), f"{cell} predictions against the clean signal s_t+1")
    ctx.result("persistence_mse_vs_clean", mse(persistence, test_clean), "x_t against the clean s_t+1")

    _plot_predictions(ctx, cfg, test_x, test_y, test_clean, pred, ar_pred)
    _plot_gradients(ctx, cfg, model, test_x)


def _plot_predictions(ctx, cfg, test_x, test_y, test_clean, pred, ar_pred) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = min(cfg.plot_examples, len(test_x))
    fig = Figure(figsize=(10, 2.4 * k), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, 1, squeeze=False)[:, 0]
    t = torch.arange(1, test_y.shape[1] + 1)  # prediction i is for step i + 1
    for n, ax in enumerate(axes):
        ax.plot(t, test_y[n], ".", color="0.55", ms=3, label="observed x_t")
        ax.plot(t, test_clean[n], "-", color="0.2", lw=1, label="clean s_t")
        ax.plot(t, ar_pred[n], "-", color="tab:green", lw=1, alpha=0.8, label=f"AR({cfg.ar_order})")
        ax.plot(t, pred[n], "-", color="tab:red", lw=1.3, label=f"{cfg.model.cell.upper()} one step ahead")
        ax.axvline(cfg.score_from + 0.5, color="0.7", ls=":", lw=1)
        ax.set_ylabel(f"test #{n}")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", fontsize=8, ncol=4)
    axes[-1].set_xlabel("step t (dotted line: scoring starts)")
    out = ctx.figure("predictions.png", f"one-step-ahead predictions of {k} test sequences against the truth")
    save_png(fig, out)


def _plot_gradients(ctx, cfg, model, test_x) -> None:
    """|d prediction_last / d x_t| against the lag, for the trained model and fresh RNN and LSTM cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = test_x[:64].to(ctx.device)
    curves = {f"trained {cfg.model.cell.upper()}": _input_gradients(model, x).cpu()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.job.run.seed + 1)
        for cell in ("rnn", "lstm"):
            fresh = SequenceModel(dataclasses.replace(cfg.model, cell=cell), num_outputs=1, input_size=1).to(ctx.device)
            curves[f"untrained {cell.upper()}"] = _input_gradients(fresh, x).cpu()
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, g in curves.items():
        ax.semilogy(torch.arange(len(g)), g.clamp(min=1e-30), label=name)
    ax.set_xlabel("lag T - 1 - t (steps back from the last input)")
    ax.set_ylabel("mean |d y_hat_last / d x_t|")
    ax.set_title(f"how far back the last prediction depends on its inputs (hidden {cfg.model.hidden_size})")
    ax.legend(fontsize=8)
    save_png(fig, ctx.figure("gradients.png", "gradient of the last prediction with respect to each earlier input"))
    for name, g in curves.items():
        lag = min(len(g) - 1, 30)
        ctx.log(f"{name}: mean |grad| at lag 0 {g[0]:.3g}, at lag {lag} {g[lag]:.3g}")


# ----------------------------------------------------------------------------------------------------
# "sentiment": review classification


@dataclass
class SentimentTaskConfig:
    n_train: int = field_(8000, gt=0, doc="training reviews")
    n_val: int = field_(1000, gt=0)
    n_test: int = field_(2000, gt=0)
    data: SentimentConfig = field(default_factory=SentimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bow_l2: list[float] = field_([1e-4, 1e-3, 1e-2, 1e-1], doc="L2 strengths tried for the bag-of-words "
                                                                "baselines; the best on val is kept")
    bigram_min_count: int = field_(2, gt=0, doc="word pairs seen fewer times in train are not features")

    def validate(self) -> None:
        if self.model.readout == "steps":
            fail("model.readout", "a classifier reads one vector per review: expected 'last' or 'mean', got 'steps'")
        if not self.bow_l2 or any(v < 0 for v in self.bow_l2):
            fail("bow_l2", f"expected a non-empty list of numbers >= 0, got {self.bow_l2}")


def _encode_split(records: list[dict], vocab: dict[str, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids right-padded with 0 (N, T_max), lengths (N,), labels (N,)."""
    ids = [encode(r["text"], vocab) for r in records]
    x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, seq in enumerate(ids):
        x[i, :len(seq)] = torch.tensor(seq)
    return x, torch.tensor([len(s) for s in ids]), torch.tensor([r["label"] for r in records])


def _classify(model, x: Tensor, lengths: Tensor, device) -> Tensor:
    """Logits (N, 2) in batches, each trimmed to its longest review."""
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        n = lengths[i:i + EVAL_BATCH]
        out.append(model(x[i:i + EVAL_BATCH, :int(n.max())].to(device), n.to(device)).cpu())
    return torch.cat(out)


def bag_features(texts: list[str], vocab: dict[str, int], bigrams: bool) -> Tensor:
    """Counts (N, len(vocab)) float64 of the words (and word pairs "a b") of each text that are in `vocab`."""
    X = torch.zeros(len(texts), len(vocab), dtype=torch.float64)
    for i, text in enumerate(texts):
        words = tokenize(text)
        grams = words + ([f"{u} {v}" for u, v in zip(words, words[1:])] if bigrams else [])
        for g in grams:
            if g in vocab:
                X[i, vocab[g]] += 1
    return X


def bag_vocab(texts: list[str], bigrams: bool, min_count: int) -> dict[str, int]:
    """Every training word, plus the word pairs seen at least `min_count` times (if bigrams)."""
    counts: dict[str, int] = {}
    for text in texts:
        words = tokenize(text)
        for g in words + ([f"{u} {v}" for u, v in zip(words, words[1:])] if bigrams else []):
            counts[g] = counts.get(g, 0) + 1
    keep = sorted(g for g, c in counts.items() if " " not in g or c >= min_count)
    return {g: i for i, g in enumerate(keep)}


def fit_logistic(X: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Minimise mean BCE(sigmoid(X w + b), y) + l2/2 |w|^2 by full-batch L-BFGS (a convex problem)."""
    w = torch.zeros(X.shape[1], dtype=X.dtype, requires_grad=True)
    b = torch.zeros((), dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # loss = mean BCE(X w + b, y) + l2/2 |w|^2
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y.to(X.dtype)) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def bag_of_words_baseline(splits: dict[str, list[dict]], l2s: list[float], bigrams: bool,
                          min_count: int) -> tuple[Tensor, float, int]:
    """Test predictions (N_test,) of the logistic regression whose L2 did best on val; that L2; the feature count."""
    texts = {k: [r["text"] for r in v] for k, v in splits.items()}
    labels = {k: torch.tensor([r["label"] for r in v]) for k, v in splits.items()}
    vocab = bag_vocab(texts["train"], bigrams, min_count)
    X = {k: bag_features(t, vocab, bigrams) for k, t in texts.items()}
    best = None
    for l2 in l2s:
        w, b = fit_logistic(X["train"], labels["train"], l2)
        acc = ((X["val"] @ w + b > 0).long() == labels["val"]).double().mean().item()
        if best is None or acc > best[0]:
            best = (acc, l2, w, b)
    _, l2, w, b = best
    return (X["test"] @ w + b > 0).long(), l2, len(vocab)


def run_sentiment(ctx: Context, cfg: SentimentTaskConfig) -> None:
    dev = ctx.device
    splits = make_splits(cfg.n_train, cfg.n_val, cfg.n_test, ctx.job.run.seed, cfg.data)
    vocab = build_vocab(r["text"] for r in splits["train"])
    data = {k: _encode_split(v, vocab) for k, v in splits.items()}
    forms = {k: [r["form"] for r in v] for k, v in splits.items()}
    (train_x, train_len, train_y), (val_x, val_len, val_y), (test_x, test_len, test_y) = (
        data["train"], data["val"], data["test"])
    ctx.log(f"reviews: {len(train_y)} train, {len(val_y)} val, {len(test_y)} test; vocabulary {len(vocab)} "
            f"words; longest review {train_x.shape[1]} tokens")

    model = SequenceModel(cfg.model, num_outputs=2, vocab_size=len(vocab))

    def loss_fn(model, batch):
        x, lengths, y = batch
        logits = model(x[:, :int(lengths.max())], lengths)  # trimmed to the batch's longest review
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean().item()}

    def evaluate(model):
        logits = _classify(model, val_x, val_len, dev)
        return {"loss": F.cross_entropy(logits, val_y).item(), "acc": (logits.argmax(-1) == val_y).float().mean().item()}

    ctx.fit(model, (train_x, train_len, train_y), loss_fn, evaluate)
    model.eval()
    with torch.no_grad():
        pred = _classify(model, test_x, test_len, dev).argmax(-1)

    def accuracy(p: Tensor, form: str | None = None) -> float:
        keep = torch.tensor([form is None or f == form for f in forms["test"]])
        return (p[keep] == test_y[keep]).double().mean().item() if keep.any() else math.nan  # nan: not drawn

    bow, bow_l2, bow_v = bag_of_words_baseline(splits, cfg.bow_l2, False, cfg.bigram_min_count)
    bi, bi_l2, bi_v = bag_of_words_baseline(splits, cfg.bow_l2, True, cfg.bigram_min_count)
    majority = int(train_y.float().mean() >= 0.5)
    cell = cfg.model.cell.upper()
    ctx.result("test_accuracy", accuracy(pred), f"{cell} classifier on {len(test_y)} held-out reviews")
    ctx.result("bow_accuracy", accuracy(bow), f"logistic regression on word counts ({bow_v} words, L2 {bow_l2:g})")
    ctx.result("bow_bigram_accuracy", accuracy(bi),
               f"logistic regression on word and word-pair counts ({bi_v} features, L2 {bi_l2:g})")
    ctx.result("majority_accuracy", accuracy(torch.full_like(test_y, majority)),
               f"always the training set's majority label ({majority})")
    for form in FORMS:
        n = forms["test"].count(form)
        if not n:  # a form the data knobs switched off
            continue
        ctx.result(f"test_accuracy_{form}", accuracy(pred, form), f"{cell} on the {n} {form} test reviews")
        ctx.result(f"bow_accuracy_{form}", accuracy(bow, form), f"bag of words on the {n} {form} test reviews")

    wrong = (pred != test_y).nonzero()[:, 0].tolist()
    for i in wrong[:5]:
        r = splits["test"][i]
        ctx.log(f"misclassified ({r['form']}, label {r['label']}): {r['text']}")
    cm = confusion_matrix(test_y, pred, 2)
    plot_confusion(cm, ["negative", "positive"], ctx.figure("confusion.png", f"{cell} test confusion matrix"),
                   title=f"{cell} sentiment")
    _plot_forms(ctx, {cell: pred, "bag of words + pairs": bi, "bag of words": bow}, accuracy, forms["test"])


def _plot_forms(ctx, preds: dict[str, Tensor], accuracy, test_forms: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*FORMS, None]
    fig = Figure(figsize=(7, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(preds)
    for j, (name, p) in enumerate(preds.items()):
        accs = [accuracy(p, g) for g in groups]
        bars = ax.bar([i + (j - (len(preds) - 1) / 2) * width for i in range(len(groups))], accs, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(0.5, color="0.5", ls=":", lw=1)
    ax.set_xticks(range(len(groups)),
                  [f"{g}\n({test_forms.count(g)})" for g in FORMS] + [f"all\n({len(test_forms)})"])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy by review form (dotted: chance)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=8, ncol=len(preds))
    save_png(fig, ctx.figure("forms.png", "test accuracy by review form: the model against the bag-of-words baselines"))


TASKS = {
    "sequence": Task(config=SequenceConfig, run=run_sequence),
    "sentiment": Task(config=SentimentTaskConfig, run=run_sentiment),
}
