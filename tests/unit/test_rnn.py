"""The from-scratch RNN and LSTM (workbench/models/fundamentals/rnn.py) against torch.nn.RNN / torch.nn.LSTM on
copied weights, and the sentiment data generator (data_pipelines/sentiment.py) against its documented rule."""

import collections
import itertools
import json

import pytest
import torch
from torch import nn

from data_pipelines.sentiment import (
    FORMS,
    NEGATIVE,
    NEGATORS,
    POSITIVE,
    SentimentConfig,
    build_vocab,
    encode,
    make_splits,
    rule_label,
    tokenize,
    write_jsonl,
)
from data_pipelines.signals import SignalConfig, make_signals
from workbench.config import ConfigError, from_dict
from workbench.models.fundamentals.rnn import (
    LSTM,
    RNN,
    Config,
    LSTMCell,
    RNNCell,
    SequenceModel,
    load_torch_weights,
)

I, H, T, B = 5, 7, 6, 3
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

CASES = [  # (kind, layers, batch_first, with initial state, dtype)
    (kind, layers, bf, init, dtype)
    for kind, layers, bf, init in itertools.product(("tanh", "relu", "lstm"), (1, 2), (False, True), (False, True))
    for dtype in (torch.float64,)
] + [(kind, 2, True, True, torch.float32) for kind in ("tanh", "relu", "lstm")]


def make_pair(kind: str, layers: int, batch_first: bool, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "lstm":
        ref = nn.LSTM(I, H, layers, batch_first=batch_first, dtype=dtype)
        ours = LSTM.from_torch(ref)
    else:
        ref = nn.RNN(I, H, layers, nonlinearity=kind, batch_first=batch_first, dtype=dtype)
        ours = RNN.from_torch(ref)
    return ref, ours


def initial_state(kind, layers, dtype, requires_grad=True):
    make = lambda: torch.randn(layers, B, H, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return (make(), make()) if kind == "lstm" else make()


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("kind,layers,batch_first,with_init,dtype", CASES)
def test_stack_matches_torch_outputs_states_and_gradients(kind, layers, batch_first, with_init, dtype):
    ref, ours = make_pair(kind, layers, batch_first, dtype)
    torch.manual_seed(1)
    x = torch.randn(*((B, T) if batch_first else (T, B)), I, dtype=dtype)
    state = initial_state(kind, layers, dtype) if with_init else None
    inputs = [x] + (flat(state) if with_init else [])
    results = []
    for module in (ref, ours):
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]
        st = None if not with_init else (tuple(xs[1:]) if kind == "lstm" else xs[1])
        out, final = module(xs[0], st)
        # a loss that weights every output and every final state differently
        w = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        loss = (out * w).sum() + sum((s * s).sum() * 0.5 for s in flat(final))
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, xs + params)
        results.append((out, flat(final), grads))
    (o_ref, f_ref, g_ref), (o_us, f_us, g_us) = results
    tol = TOL[dtype]
    assert o_us.shape == o_ref.shape == ((B, T, H) if batch_first else (T, B, H))
    torch.testing.assert_close(o_us, o_ref, atol=tol, rtol=0)
    for a, b in zip(f_us, f_ref):
        assert a.shape == b.shape == (layers, B, H)
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    assert len(g_us) == len(g_ref)  # same parameter count and order: weight_ih, weight_hh, bias_ih, bias_hh
    for a, b in zip(g_us, g_ref):
        assert a.abs().sum() > 0  # every input, state and parameter receives a gradient
        torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["tanh", "lstm"])
def test_unbatched_input_matches_torch(kind):
    ref, ours = make_pair(kind, 2, False, torch.float64)
    x = torch.randn(T, I, dtype=torch.float64)
    out_ref, fin_ref = ref(x)
    out_us, fin_us = ours(x)
    assert out_us.shape == (T, H)
    torch.testing.assert_close(out_us, out_ref, atol=1e-10, rtol=0)
    for a, b in zip(flat(fin_us), flat(fin_ref)):
        assert a.shape == (2, H)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["relu", "lstm"])
def test_lengths_match_torch_packed_sequences(kind):
    ref, ours = make_pair(kind, 2, True, torch.float64)
    x = torch.randn(4, T, I, dtype=torch.float64)
    lengths = torch.tensor([T, 2, 4, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_ref, fin_ref = ref(packed)
    out_ref, _ = nn.utils.rnn.pad_packed_sequence(out_ref, batch_first=True, total_length=T)
    out_us, fin_us = ours(x, lengths=lengths)
    torch.testing.assert_close(out_us, out_ref, atol=1e-10, rtol=0)
    for a, b in zip(flat(fin_us), flat(fin_ref)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # padding content does not matter
    x2 = x.clone()
    x2[1, 2:] = 100.0
    torch.testing.assert_close(ours(x2, lengths=lengths)[0], out_us)


def test_cells_match_torch_cells():
    torch.manual_seed(0)
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    for nl in ("tanh", "relu"):
        ref = nn.RNNCell(I, H, nonlinearity=nl)
        ours = RNNCell(I, H, nonlinearity=nl)
        ours.load_state_dict(ref.state_dict())
        torch.testing.assert_close(ours(x, h), ref(x, h), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    ref = nn.LSTMCell(I, H)
    ours = LSTMCell(I, H)
    ours.load_state_dict(ref.state_dict())  # same names and shapes as torch's cell
    for a, b in zip(ours(x, (h, c)), ref(x, (h, c))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_forget_bias_and_torch_init():
    torch.manual_seed(0)
    lstm = LSTM(I, H, forget_bias=1.0)
    b = lstm.layers[0].bias_ih
    k = 1 / H**0.5
    assert (b[H:2 * H] >= 1 - k).all() and (b[H:2 * H] <= 1 + k).all()
    assert b[:H].abs().max() <= k and b[2 * H:].abs().max() <= k
    plain = LSTM(I, H, forget_bias=0.0)
    assert all(p.abs().max() <= k for p in plain.parameters())
    assert LSTM(I, H, device="meta").layers[0].weight_ih.is_meta  # nothing allocated on meta


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="nonlinearity"):
        RNN(I, H, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="input_size 5"):
        RNN(I, H)(torch.randn(T, B, I + 1))
    with pytest.raises(ValueError, match=r"initial state of shape \(1, 3, 7\)"):
        RNN(I, H)(torch.randn(T, B, I), torch.zeros(2, B, H))
    with pytest.raises(ValueError, match="bidirectional"):
        LSTM.from_torch(nn.LSTM(I, H, bidirectional=True))
    with pytest.raises(ValueError, match="proj_size"):
        LSTM.from_torch(nn.LSTM(I, H, proj_size=3))
    with pytest.raises(ValueError, match="cannot load a torch LSTM"):
        load_torch_weights(RNN(I, H), nn.LSTM(I, H))
    with pytest.raises(ValueError, match="num_layers=2"):
        load_torch_weights(LSTM(I, H), nn.LSTM(I, H, 2))


@pytest.mark.parametrize("readout", ["last", "mean", "steps"])
def test_sequence_model_readouts_respect_lengths(readout):
    torch.manual_seed(0)
    model = SequenceModel(Config(cell="lstm", embed_dim=4, hidden_size=8, readout=readout), num_outputs=3,
                          vocab_size=11).double()
    tokens = torch.randint(1, 11, (2, T))
    lengths = torch.tensor([T, 3])
    padded = tokens.clone()
    padded[1, 3:] = 0
    out = model(padded, lengths)
    alone = model(tokens[1:, :3])  # the short sequence on its own, no padding
    if readout == "steps":
        assert out.shape == (2, T, 3)
        torch.testing.assert_close(out[1, :3], alone[0])
    else:
        assert out.shape == (2, 3)
        torch.testing.assert_close(out[1], alone[0])


def test_sequence_model_real_valued_inputs():
    model = SequenceModel(Config(cell="rnn", hidden_size=8, readout="steps"), num_outputs=1, input_size=2)
    assert model(torch.randn(4, T, 2)).shape == (4, T, 1)
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        SequenceModel(Config(), num_outputs=1, vocab_size=3, input_size=2)


# ----------------------------------------------------------------------------------------------------
# The sentiment generator and its label rule


@pytest.mark.parametrize("text,label", [
    ("the plot was good.", 1),
    ("the plot was not good.", 0),
    ("the movie was never boring.", 1),
    ("the plot was dull, but the acting was superb.", 1),
    ("the plot was superb, but the acting was dull.", 0),
    ("although the plot was dull, the acting was superb.", 1),
    ("the plot was dull, although the acting was superb.", 0),
    ("the plot was not very good, but the ending was never boring.", 1),
    ("i would not say the cast was good.", 0),
    ("i would not say the cast was not good.", 1),  # two negators cancel
    ("i had not read the book. the plot was good.", 1),  # a negator in filler does not touch the opinion
    ("we watched it at home. the ending felt extremely tedious. my sister picked it.", 0),
])
def test_rule_label_on_written_cases(text, label):
    assert rule_label(text) == label


def test_rule_label_refuses_text_without_one_opinion():
    with pytest.raises(ValueError, match="exactly one sentence"):
        rule_label("we watched it at home.")
    with pytest.raises(ValueError, match="exactly one sentence"):
        rule_label("the plot was good. the cast was bad.")


def test_generator_is_deterministic_disjoint_and_follows_the_rule():
    a = make_splits(600, 100, 200, seed=3)
    assert a == make_splits(600, 100, 200, seed=3)
    assert a["train"] != make_splits(600, 100, 200, seed=4)["train"]
    assert [len(a[k]) for k in ("train", "val", "test")] == [600, 100, 200]
    texts = [r["text"] for split in a.values() for r in split]
    assert len(set(texts)) == len(texts)  # no review in two splits (or twice in one)
    records = [r for split in a.values() for r in split]
    for r in records:
        assert r["label"] == rule_label(r["text"]), r
        words = tokenize(r["text"])
        if r["form"] == "contrast":
            assert "but" in words or "although" in words
        opinion = [s for s in r["text"].split(".") if any(w in POSITIVE or w in NEGATIVE for w in tokenize(s))][0]
        negated = any(w in NEGATORS for w in tokenize(opinion))
        if r["form"] == "plain":
            assert not negated and "but" not in words and "although" not in words
        if r["form"] == "negation":
            assert negated
    forms = collections.Counter(r["form"] for r in records)
    assert set(forms) == set(FORMS) and min(forms.values()) > 0.1 * len(records)
    positive = sum(r["label"] for r in records) / len(records)
    assert 0.45 < positive < 0.55  # balanced by construction
    # the double negation and filler negation cases occur
    assert any(tokenize(r["text"]).count("not") + tokenize(r["text"]).count("never") >= 2 for r in records)


def test_generator_knobs_and_jsonl(tmp_path):
    plain = make_splits(200, 0, 0, seed=0, cfg=SentimentConfig(p_contrast=0, p_negate=0, max_filler=0))["train"]
    assert {r["form"] for r in plain} == {"plain"}
    assert all(r["text"].count(".") == 1 for r in plain)
    path = write_jsonl(plain, tmp_path / "x" / "train.jsonl")
    back = [json.loads(line) for line in path.read_text().splitlines()]
    assert back == plain and set(back[0]) == {"text", "label", "form"}
    vocab = build_vocab(r["text"] for r in plain)
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1 and encode("the zzz", vocab) == [vocab["the"], 1]


def test_signals_are_deterministic_and_noise_has_its_variance():
    cfg = SignalConfig(length=50, noise=0.2)
    noisy, clean = make_signals(400, 7, cfg)
    assert noisy.shape == clean.shape == (400, 50)
    assert torch.equal(noisy, make_signals(400, 7, cfg)[0])
    assert abs((noisy - clean).std().item() - 0.2) < 0.01
    assert clean.abs().max() <= 2 * cfg.amp_max  # K = 2 sines of amplitude <= amp_max
    with pytest.raises(ConfigError, match="freq_min"):
        from_dict(SignalConfig, {"freq_min": 0.3, "freq_max": 0.1})


def test_bag_of_words_baseline_learns_plain_reviews_at_the_optimum():
    from workbench.train.fundamentals.sequence import (
        bag_features,
        bag_of_words_baseline,
        bag_vocab,
        fit_logistic,
    )

    splits = make_splits(400, 100, 200, seed=1, cfg=SentimentConfig(p_contrast=0, p_negate=0))
    pred, l2, n_features = bag_of_words_baseline(splits, [1e-3, 1e-2], bigrams=False, min_count=2)
    y_test = torch.tensor([r["label"] for r in splits["test"]])
    assert (pred == y_test).double().mean() > 0.95  # without negation or contrast, the words decide
    assert l2 in (1e-3, 1e-2) and n_features > len(POSITIVE) + len(NEGATIVE)
    # the fit is the minimum of the convex objective: its gradient vanishes there
    texts = [r["text"] for r in splits["train"]]
    X = bag_features(texts, bag_vocab(texts, True, 2), bigrams=True)
    y = torch.tensor([r["label"] for r in splits["train"]])
    w, b = fit_logistic(X, y, 1e-2)
    w, b = w.requires_grad_(True), b.requires_grad_(True)
    loss = nn.functional.binary_cross_entropy_with_logits(X @ w + b, y.double()) + 0.5e-2 * (w @ w)
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-6 and gb.abs() < 1e-6
