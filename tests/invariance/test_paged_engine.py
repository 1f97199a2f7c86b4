"""The paged continuous-batching engine gives, for every request, what that request gets alone from the simple
static-cache generator: for every decoder family and attention type, with chunked prefill, preemption,
permuted physical blocks, mixed lengths, and per-request sampling."""

import random

import pytest
import torch

from workbench.inference.engine import Engine, RequestOutput
from workbench.inference.generator import Generator, KVCacheGenerator, SamplingParams
from workbench.models.base import ModelSection, build_model

KINDS = {
    "llama3-gqa": ("llama3", "debug", {}),
    "llama3-window": ("llama3", "debug", {"sliding_window": 6}),
    "llama3-moba": ("llama3", "debug", {"moba_block_size": 4, "moba_topk": 2, "moba_full_last_layers": 1}),
    "mixtral": ("mixtral", "debug", {}),
    "mla-absorb": ("deepseek_v3", "debug", {"mla_decode": "absorb"}),
    "mla-expand": ("deepseek_v3", "debug", {"mla_decode": "expand"}),
    "kimi-k2": ("deepseek_v3", "kimi-k2-debug", {}),
}
LENGTHS = (5, 31, 9, 17, 3, 44, 12)


def tiny(kind: str):
    family, flavor, over = KINDS[kind]
    torch.manual_seed(0)
    return build_model(ModelSection.of(family, flavor, **over)).eval()


def prompts_for(model, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompts, params):
    gen = KVCacheGenerator(model, eos_ids=[])
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else params
    return [gen.generate([p], sp)[0] for p, sp in zip(prompts, per_row)]


def shuffle_pool(engine: Engine, seed: int = 0) -> None:
    """Hand out physical blocks in a random order, so block tables are far from the identity."""
    random.Random(seed).shuffle(engine.cache.allocator._free)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_engine_equals_each_request_alone(kind):
    """Mixed lengths and budgets; blocks of 4 tokens handed out in a random order; a 16-token step budget
    (long prompts are read in chunks); a pool too small for everything at once (requests get preempted and
    recomputed). Every request's tokens equal its unbatched greedy run, log-probs to 1e-4."""
    model = tiny(kind)
    prompts = prompts_for(model)
    budgets = [14, 6, 14, 10, 14, 14, 3]
    params = [SamplingParams(max_new_tokens=n) for n in budgets]
    expected = alone(model, prompts, params)
    engine = Engine(model, eos_ids=[], block_size=4, max_batch=4, max_step_tokens=16, num_blocks=18)
    shuffle_pool(engine)
    got = engine.generate(prompts, params)
    for e, g, n in zip(expected, got, budgets):
        assert g.tokens == e.tokens and len(g.tokens) == n
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=0)
        assert g.finish_reason == "length"
    assert engine.free_blocks == engine.cache.allocator.capacity  # every block came back
    assert not engine.has_unfinished()
    if kind not in ("llama3-moba", "llama3-window"):  # MoBA: one request per step; a window gives blocks back
        assert engine.stats["preemptions"] > 0 and engine.stats["prefill_steps"] > len(prompts) // 4


def test_continuous_batching_of_mixed_lengths_equals_one_by_one_and_batches():
    """The same requests through one engine one at a time, all at once, and with a large pool and budget:
    identical tokens each way (and equal to the static generator)."""
    model = tiny("llama3-gqa")
    prompts = prompts_for(model, (3, 25, 7, 40, 11, 2, 19, 33), seed=5)
    params = [SamplingParams(max_new_tokens=n) for n in (12, 3, 20, 8, 16, 1, 9, 5)]
    one_engine = Engine(model, eos_ids=[], block_size=8, max_batch=8)
    one_by_one = [one_engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    together = [c.tokens for c in Engine(model, eos_ids=[], block_size=8, max_batch=8).generate(prompts, params)]
    narrow = [c.tokens for c in Engine(model, eos_ids=[], block_size=2, max_batch=3, max_step_tokens=7)
              .generate(prompts, params)]
    static = [c.tokens for c in alone(model, prompts, params)]
    assert one_by_one == together == narrow == static


@pytest.mark.parametrize("kind", ["llama3-gqa", "mla-absorb"])
def test_paged_decode_equals_argmax_of_the_full_forward(kind):
    """Against the model itself (no cache at all): each greedy token is the argmax of a full forward over the
    sequence so far, with blocks of 3 (partial last blocks) in a random order."""
    model = tiny(kind)
    prompts = prompts_for(model, (7, 13), seed=2)
    engine = Engine(model, eos_ids=[], block_size=3, max_batch=2)
    shuffle_pool(engine, seed=4)
    for prompt, out in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=6))):
        seq = list(prompt)
        with torch.no_grad():
            for tok, lp in zip(out.tokens, out.logprobs):
                logits = model.logits(model({"input_ids": torch.tensor([seq])}).hidden)[0, -1]
                assert tok == int(logits.argmax())
                assert abs(lp - float(torch.log_softmax(logits, -1)[tok])) < 1e-4
                seq.append(tok)


def test_sampling_is_per_request_whatever_the_batch():
    """Seeded temperature / top-k / top-p / repetition-penalty requests sample the same tokens alone (static
    generator) and continuously batched with other requests; unseeded ones still run."""
    model = tiny("llama3-gqa")
    prompts = prompts_for(model, (4, 20, 9, 14), seed=3)
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, seed=7),
              SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.8, seed=8),
              SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.5),
              SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=9)]
    expected = alone(model, prompts, params)
    got = Engine(model, eos_ids=[], block_size=4, max_batch=2, max_step_tokens=8).generate(prompts, params)
    assert [g.tokens for g in got] == [e.tokens for e in expected]
    # the penalty changes greedy output here (else the test would not check it)
    plain = alone(model, prompts[2:3], SamplingParams(max_new_tokens=12))[0].tokens
    assert plain != got[2].tokens
    unseeded = Engine(model, eos_ids=[]).generate(prompts[:1], SamplingParams(max_new_tokens=5, temperature=1.0))
    assert len(unseeded[0].tokens) == 5


def test_repetition_penalty_rule():
    from workbench.inference.generator import apply_repetition_penalty

    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert apply_repetition_penalty(logits, [0], 1.0) is logits


def test_scheduler_respects_the_batch_the_budget_and_the_window():
    """No step feeds more than max_step_tokens or runs more than max_batch rows; a sliding-window model
    never holds more blocks per request than its window needs; the Generator protocol holds."""
    model = tiny("llama3-window")
    engine = Engine(model, eos_ids=[], block_size=2, max_batch=3, max_step_tokens=10)
    assert isinstance(engine, Generator)
    seen = []
    run = engine._run

    def spy(rows, feeds):
        seen.append((len(rows), sum(feeds), max(sum(b != 0 for b in r.blocks) for r in rows)))
        return run(rows, feeds)

    engine._run = spy
    engine.generate(prompts_for(model, (30, 5, 12, 21), seed=6), SamplingParams(max_new_tokens=15))
    assert seen and all(rows <= 3 and fed <= 10 for rows, fed, _ in seen)
    # window 6 and blocks of 2: at most ceil((6 - 1) / 2) + 1 older-or-current blocks, plus a chunk's worth
    assert max(held for *_, held in seen) <= 3 + 10 // 2 + 1
    assert max(fed for _, fed, _ in seen) == 10  # the budget was used, prompts were chunked


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from workbench.data.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok")
    from tests.conftest import save_test_tokenizer

    save_test_tokenizer(path)
    return Tokenizer.from_hf_dir(path)


def test_streamed_text_never_shows_what_a_stop_string_cuts(tokenizer):
    """Deltas concatenate to the final text; a stop string taken from the middle of the unstopped output ends
    the request there, and no delta ever carried a character past the cut."""
    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug", vocab_size=max(512, tokenizer.vocab_size))).eval()
    prompt = tokenizer.encode("def main():")
    engine = Engine(model, tokenizer, eos_ids=[])
    full = engine.generate([prompt], SamplingParams(max_new_tokens=40))[0].text
    assert len(full) > 12
    stop = full[8:11]
    cut = full[: full.find(stop)]
    deltas: list[RequestOutput] = list(engine.stream(prompt, SamplingParams(max_new_tokens=40, stop=[stop])))
    streamed = "".join(d.new_text for d in deltas)
    assert streamed == cut == deltas[-1].completion.text
    assert deltas[-1].finished and deltas[-1].completion.finish_reason == "stop"
    shown = ""
    for d in deltas:
        shown += d.new_text
        assert cut.startswith(shown)
    # without a stop string the stream is the generate text, token by token
    plain = list(engine.stream(prompt, SamplingParams(max_new_tokens=40)))
    assert "".join(d.new_text for d in plain) == full and len(plain) == 40
    assert engine.free_blocks == engine.cache.allocator.capacity


def test_abort_frees_blocks_and_errors_name_the_field():
    model = tiny("llama3-gqa")
    engine = Engine(model, eos_ids=[], block_size=4, num_blocks=20, max_len=64)
    rid = engine.add_request(list(range(3, 30)), SamplingParams(max_new_tokens=20))
    other = engine.add_request(list(range(3, 10)), SamplingParams(max_new_tokens=20))
    for _ in range(4):
        engine.step()
    assert engine.free_blocks < engine.cache.allocator.capacity
    assert engine.abort(rid) and engine.abort(other)
    assert engine.free_blocks == engine.cache.allocator.capacity and not engine.has_unfinished()
    assert not engine.abort(rid)
    with pytest.raises(ValueError, match="prompt: every prompt needs at least one token"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_len 64"):
        engine.add_request(list(range(64)), SamplingParams())
    with pytest.raises(ValueError, match="exceed the KV cache's 16 .4 blocks of 4.; raise num_blocks"):
        Engine(model, block_size=4, num_blocks=5).add_request(list(range(3, 13)), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="adapter: 'x'"):
        engine.add_request([3], SamplingParams(), adapter="x")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request([3], SamplingParams(stop=["a"]))
    with pytest.raises(ValueError, match="max_batch: expected an integer >= 1"):
        Engine(model, max_batch=0)
    assert engine.generate([[3, 4]], SamplingParams(max_new_tokens=0))[0].tokens == []


def test_engine_serves_many_adapters_in_one_batch_like_each_merged_model(tmp_path):
    """Requests naming different LoRA/DoRA adapters (and none) share the engine's batches; each gets the tokens
    of the base model with its adapter merged, run alone."""
    from tests.unit.test_multi_adapter import LLAMA_ADAPTERS, make_adapter, merged_model
    from workbench.inference.adapters import load_adapters

    folders = {name: make_adapter(tmp_path / name, "llama3", cfg, seed=10 + i)
               for i, (name, cfg) in enumerate(LLAMA_ADAPTERS.items())}
    model = tiny("llama3-gqa")
    registry = load_adapters(model, folders)
    names = ["a", None, "c", "b", "a", "c", None]
    prompts = prompts_for(model, (6, 19, 3, 11, 25, 8, 14), seed=8)
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(model, eos_ids=[], block_size=4, max_batch=4, max_step_tokens=20, adapters=registry)
    got = engine.generate(prompts, params, adapters=names)
    refs = {n: merged_model("llama3", folders[n] if n else None) for n in set(names)}
    differs = 0
    for name, prompt, g in zip(names, prompts, got):
        want = KVCacheGenerator(refs[name], eos_ids=[]).generate([prompt], params)[0]
        assert g.tokens == want.tokens, name
        differs += g.tokens != KVCacheGenerator(refs[None], eos_ids=[]).generate([prompt], params)[0].tokens
    assert differs >= 3  # the adapters change the outputs, so the equality above checks their rows
    with pytest.raises(Exception, match="zzz"):
        engine.add_request([3, 4], params, adapter="zzz")


def test_bad_settings_are_refused_and_a_failed_step_ends_only_its_requests():
    """Params built in code are range-checked (a request cannot break a shared step); a temperature below 1e-5
    is greedy; when a step's forward fails, its requests are aborted with their blocks returned and the queued
    ones still run."""
    from workbench.errors import ConfigError
    from workbench.inference.engine import StepError

    model = tiny("llama3-gqa")
    engine = Engine(model, eos_ids=[], max_batch=1)
    for bad, field in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                       (dict(top_p=0.0), "top_p"), (dict(temperature=float("inf")), "temperature"),
                       (dict(seed=2**64), "seed")):
        with pytest.raises(ConfigError, match=field):
            engine.add_request([3, 4], SamplingParams(**bad))
    prompt = prompts_for(model, (6,))[0]
    tiny_t = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=1e-30, seed=1))[0]
    assert tiny_t.tokens == engine.generate([prompt], SamplingParams(max_new_tokens=6))[0].tokens

    first = engine.add_request(prompt, SamplingParams(max_new_tokens=4))
    second = engine.add_request(prompt[:3], SamplingParams(max_new_tokens=4))
    forward = model.forward
    model.forward = lambda batch: (_ for _ in ()).throw(RuntimeError("planted"))
    with pytest.raises(StepError) as err:
        engine.step()
    model.forward = forward
    assert err.value.request_ids == [first] and isinstance(err.value.__cause__, RuntimeError)
    assert not engine.abort(first)  # gone already
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == [second]
    assert engine.free_blocks == engine.cache.allocator.capacity
