"""The contracts of the interfaces everything plugs into: Engine, Objective, Generator, the data cursor and collator."""

import math

import numpy as np
import pytest
import torch

from data_pipelines.tokenizer import byte_tokenizer
from workbench.data.cursor import DataCursor
from workbench.data.packed import IGNORE_INDEX, collate
from workbench.inference.generator import (
    Generator,
    KVCacheGenerator,
    SamplingParams,
    per_row_params,
    sample_next,
)
from workbench.models.base import ModelSection, build_model
from workbench.parallel.engine import Engine
from workbench.parallel.single import SingleEngine
from workbench.train.objectives.base import LossOutput, Objective
from workbench.train.objectives.lm import LMObjective


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return build_model(ModelSection.of("llama3", "debug", **over))


def lm_batch(B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (B, T + 1), generator=g)
    docs = (torch.arange(T + 1) >= 9).long().expand(B, -1)  # two documents per row
    return collate([{"tokens": t.numpy(), "doc_ids": d.numpy()} for t, d in zip(tokens, docs)])


# ---- Engine -------------------------------------------------------------------------------------


def test_single_engine_satisfies_the_protocol_and_steps():
    model = tiny_model()
    engine = SingleEngine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(engine, Engine)
    before = model.norm.weight.clone()
    out = LMObjective().loss({"policy": engine}, lm_batch(), total_units=LMObjective().units(lm_batch()))
    engine.backward(out.loss)
    norm = engine.clip_grad_norm(0.0)
    assert norm > 0 and engine.clip_grad_norm(1e-3) == pytest.approx(float(norm), rel=1e-5)
    measured, applied = engine.optimizer_step(1e-3, float(out.loss.detach()))
    assert applied and measured == pytest.approx(1e-3, rel=1e-4)  # the norm after the clip above
    assert not torch.equal(before, model.norm.weight)
    assert all(p.grad is None for p in model.parameters())
    with engine.gather_for_generation() as m:
        assert m is model and not m.training
    assert model.training


def test_frozen_engine_has_no_optimizer():
    model = tiny_model()
    engine = SingleEngine(model)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="frozen"):
        engine.step()


def test_optimizer_step_skips_a_non_finite_loss_or_norm():
    model = tiny_model()
    engine = SingleEngine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.clone() for p in model.parameters()]
    out = LMObjective().loss({"policy": engine}, lm_batch(), total_units=LMObjective().units(lm_batch()))
    engine.backward(out.loss)
    norm, applied = engine.optimizer_step(1.0, float("nan"))
    assert not applied and norm > 0 and all(p.grad is None for p in model.parameters())
    engine.backward(LMObjective().loss({"policy": engine}, lm_batch(), 64).loss * float("inf"))
    norm, applied = engine.optimizer_step(1.0, 1.0)
    assert not applied and not math.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_engine_state_round_trip_restores_optimizer(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = SingleEngine(model, opt)
    for _ in range(2):
        LMObjective().loss({"policy": engine}, lm_batch(), 64).loss.backward()
        engine.step()
        engine.zero_grad()
    engine.save_state(tmp_path / "engine")  # DCP shards + JSON, as a checkpoint holds them
    model2 = tiny_model(seed=1)
    model2.load_state_dict(model.state_dict())
    engine2 = SingleEngine(model2, torch.optim.AdamW(model2.parameters(), lr=1e-2))
    engine2.load_state(tmp_path / "engine")
    for e in (engine, engine2):
        LMObjective().loss({"policy": e}, lm_batch(seed=5), 64).loss.backward()
        e.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ---- Objective + loss normalization ------------------------------------------------------------


def test_lm_objective_protocol_and_label_shift():
    obj = LMObjective()
    assert isinstance(obj, Objective) and obj.roles["policy"].trainable
    data = [lm_batch()]
    assert obj.experience(0, {}, data) is data  # identity for language modelling
    mb = data[0]
    assert obj.units(mb) == int((mb["labels"] != IGNORE_INDEX).sum()) == 4 * 15  # one boundary label masked per row


def test_loss_is_the_global_token_mean_however_the_step_is_split():
    """Sum / global count: two micro-batches of uneven target counts give the full batch's loss and grads."""
    obj = LMObjective()
    model = tiny_model()
    engine = SingleEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
    full = lm_batch(B=4)
    full["labels"][0, :10] = IGNORE_INDEX  # make the halves uneven
    halves = [{k: v[:1] for k, v in full.items()}, {k: v[1:] for k, v in full.items()}]
    n = obj.units(full)
    ref = obj.loss({"policy": engine}, full, n)
    assert isinstance(ref, LossOutput) and ref.units["tokens"] == 4 * 16
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    engine.zero_grad()
    total = sum(obj.units(h) for h in halves)
    assert total == n
    split = 0.0
    for h in halves:
        out = obj.loss({"policy": engine}, h, total)
        out.loss.backward()
        split += float(out.loss.detach())
    assert split == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    # and it is the plain mean cross-entropy over the real targets (documents masked apart)
    from workbench.nn.attention import MaskSpec

    with torch.no_grad():
        logits = model.logits(model({"input_ids": full["input_ids"], "positions": full["positions"],
                                     "mask": MaskSpec(document_ids=full["document_ids"])}).hidden)
    mean_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), full["labels"].flatten(),
                                                ignore_index=IGNORE_INDEX)
    assert float(ref.loss.detach()) == pytest.approx(float(mean_ce), rel=1e-5)


@pytest.mark.parametrize("family,chunk", [("llama3", 7), ("llama3", 4096), ("deepseek_v3", 7)])
def test_a_chunked_lm_loss_equals_the_whole_logits_loss_and_its_gradients(family, chunk):
    """objective.loss_chunk: the head runs `chunk` target rows at a time (7 does not divide the 33 targets; 4096
    holds them all), each chunk's logits recomputed in backward, and the loss and every parameter's gradient equal
    the unchunked objective's (fp32; DeepSeek-V3's MTP loss and balance loss ride along unchanged). With the most
    targets on any rank above this rank's (a sharded head), the rows are padded to that count: as many head calls
    as the other ranks make, the same values."""
    from types import SimpleNamespace

    batch = lm_batch(B=3, T=16)
    batch["labels"][0, :5] = IGNORE_INDEX
    batch["labels"][2, 9:] = IGNORE_INDEX
    n = LMObjective().units(batch)
    assert n == 33 and n % 7
    model = tiny_model() if family == "llama3" else build_model(ModelSection.of(family, "debug"))
    engine = SingleEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
    ref = LMObjective().loss({"policy": engine}, batch, 50)
    extra = 1 if family == "deepseek_v3" else 0  # the MTP module's head call (whole, as before)
    ref.loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    engine.zero_grad()

    shapes, head = [], engine.logits

    def counted(hidden, positions=None):
        shapes.append(tuple(hidden.shape))
        return head(hidden, positions)

    engine.logits = counted
    obj = LMObjective(SimpleNamespace(loss_chunk=chunk))
    for most in (n, n + 20):  # this rank's count; another rank holding 20 targets more
        engine.all_reduce = lambda t, op="sum", most=most: torch.tensor(most) if op == "max" else t
        shapes.clear()
        got = obj.loss({"policy": engine}, batch, 50)
        calls = math.ceil(most / chunk)
        assert len(shapes) == calls + extra and all(s[:2] == (1, min(chunk, most)) for s in shapes[:calls - 1])
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=0)
        assert got.metrics["nll_sum"] == pytest.approx(ref.metrics["nll_sum"], rel=1e-5)
        assert got.metrics["targets"] == n
        got.loss.backward()
        assert len(shapes) == (2 * calls if calls > 1 else 1) + extra  # chunks recompute their logits in backward
        for key in ("mtp_loss", "aux_loss"):
            if key in ref.metrics:
                assert got.metrics[key] == pytest.approx(ref.metrics[key], rel=1e-5)
        for name, p in model.named_parameters():  # fp32 sums in another order: relative to each gradient's norm
            assert float((p.grad - want[name]).norm() / want[name].norm()) < 1e-5, name
        engine.zero_grad()


# ---- Generator ---------------------------------------------------------------------------------


def test_generator_protocol_sampling_options():
    model = tiny_model().eval()
    tok = byte_tokenizer()
    gen = KVCacheGenerator(model, tok)
    assert isinstance(gen, Generator)
    prompt = tok.encode("def f(")
    greedy = gen.generate([prompt], SamplingParams(max_new_tokens=10))[0]
    assert len(greedy.tokens) == len(greedy.logprobs) <= 10
    # top-k 1 at any temperature is greedy
    top1 = gen.generate([prompt], SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.tokens == greedy.tokens
    # a seed makes sampling reproducible; different seeds differ (over a few tries)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    a, b = gen.generate([prompt, prompt], [p, p])
    assert a.tokens == b.tokens == gen.generate([prompt], p)[0].tokens
    others = {tuple(gen.generate([prompt], SamplingParams(max_new_tokens=12, temperature=1.0, seed=s))[0].tokens)
              for s in range(4)}
    assert len(others) > 1
    # per-request params in one batch: lengths honoured
    c = gen.generate([prompt, prompt], [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=6)])
    assert [len(x.tokens) for x in c] == [3, 6] and all(x.finish_reason == "length" for x in c)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(s))
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    seen_k = {sample_next(logits, SamplingParams(temperature=1.0, top_k=3), torch.Generator().manual_seed(s))
              for s in range(300)}
    assert seen_k == {0, 1, 2}


def test_eos_and_stop_strings_end_a_row():
    model = tiny_model(vocab_size=268, init_std=0.3).eval()  # every id decodes to text
    tok = byte_tokenizer()
    prompt = tok.encode("x")
    free = KVCacheGenerator(model, tok, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=8))[0]
    first = free.tokens[0]
    stopped = KVCacheGenerator(model, tok, eos_ids=[first]).generate([prompt], SamplingParams(max_new_tokens=8))[0]
    assert stopped.tokens == [first] and stopped.finish_reason == "stop"
    text = tok.decode(free.tokens)
    stop = text[2:4]
    assert stop
    s = KVCacheGenerator(model, tok, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=8, stop=[stop]))[0]
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)] and stop not in s.text
    assert len(s.tokens) < 8 or tok.decode(s.tokens).find(stop) >= 0


# ---- data cursor and collator ------------------------------------------------------------------


def test_cursor_ranks_partition_contiguous_blocks():
    seen = []
    cursors = [DataCursor() for _ in range(3)]
    for _ in range(4):
        for r, c in enumerate(cursors):
            idx = c.take(2, rank=r, world_size=3)
            assert all(k % 3 == r for k in idx)
            seen += idx
    assert sorted(seen) == list(range(24)) and len({c.position for c in cursors}) == 1


@pytest.mark.parametrize("w1,w2", [(2, 1), (1, 2), (4, 2), (2, 3)])
def test_cursor_resumes_at_another_world_size_without_repeats_or_gaps(w1, w2):
    global_batch = 12
    taken = []
    cursors = [DataCursor() for _ in range(w1)]
    for _ in range(3):
        for r, c in enumerate(cursors):
            taken += c.take(global_batch // w1, r, w1)
    state = cursors[0].state_dict()
    cursors = [DataCursor() for _ in range(w2)]
    for c in cursors:
        c.load_state_dict(state)
    for _ in range(2):
        for r, c in enumerate(cursors):
            taken += c.take(global_batch // w2, r, w2)
    assert sorted(taken) == list(range(5 * global_batch))


def test_collate_shifts_labels_masks_boundaries_and_restarts_positions():
    tokens = np.array([1, 2, 3, 0, 7, 8, 9], dtype=np.int64)  # doc A = 1 2 3 eos | doc B = 7 8 9
    docs = np.array([0, 0, 0, 0, 1, 1, 1], dtype=np.int64)
    b = collate([{"tokens": tokens, "doc_ids": docs}])
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 7, 8]]
    assert b["labels"].tolist() == [[2, 3, 0, IGNORE_INDEX, 8, 9]]  # eos -> next doc's first token is masked
    assert b["positions"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from workbench.train.optim import lr_multiplier

    lrs = [lr_multiplier(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr_multiplier(50, 100, 10, "constant", 0.1) == 1.0
    assert lr_multiplier(3, 2, 10, "cosine", 0.1) == pytest.approx(0.4)  # run shorter than warmup


def test_per_row_params_repeats_one_or_checks_the_count():
    p, q = SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=5)
    assert per_row_params(p, 3) == [p, p, p] and per_row_params([p, q], 2) == [p, q]
    with pytest.raises(ValueError, match="1 sampling params for 2 prompts"):
        per_row_params([p], 2)
