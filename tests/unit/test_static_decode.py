"""StaticDecoder (workbench/inference/static_decode.py): the fixed-shape greedy decoder gives KVCacheGenerator's
tokens and log-probs (one prompt, equal lengths, left padding; llama3, mixtral, int8), reuses its buffers across
batches, cuts at eos, and refuses what it cannot do. The CUDA-graph path is in tests/gpu/test_static_decode_gpu.py."""

import pytest
import torch

from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.inference.quant import quantize_model
from workbench.inference.static_decode import SlotKVCache, StaticDecoder
from workbench.models.base import ModelSection, build_model

SINGLE = [[5, 17, 300, 42, 9]]
EQUAL = [[5, 17, 300, 42], [7, 7, 1, 99], [400, 3, 2, 250]]
PADDED = [[5, 17, 300, 42, 9, 11, 60], [7, 1], [400, 3, 2, 250]]


def debug(family="llama3"):
    torch.manual_seed(0)
    return build_model(ModelSection.of(family, "debug", init_std=0.2)).eval()


@pytest.fixture(scope="module")
def llama():
    return debug("llama3")


def assert_same(model, prompts, n=10, decoder=None):
    ref = KVCacheGenerator(model, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=n))
    dec = decoder or StaticDecoder(model, max_batch=4, max_len=32)
    got = dec.generate(prompts, SamplingParams(max_new_tokens=n))
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens and len(g.tokens) == n
        assert g.finish_reason == r.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("prompts", [SINGLE, EQUAL, PADDED], ids=["single", "equal", "padded"])
def test_llama3_matches_kv_cache_generator(llama, prompts):
    assert_same(llama, prompts)


@pytest.mark.parametrize("prompts", [SINGLE, PADDED], ids=["single", "padded"])
def test_mixtral_matches_kv_cache_generator(prompts):
    assert_same(debug("mixtral"), prompts)


def test_int8_model_matches_kv_cache_generator():
    model = debug("llama3")
    quantize_model(model)
    assert_same(model, PADDED)


def test_tokens_are_not_all_the_same(llama):
    """The comparisons above mean something only if the debug model does not repeat one token."""
    out = StaticDecoder(llama, 1, 32).generate_ids(torch.tensor(SINGLE), 10)
    assert len(set(out[0].tolist())) > 2


def test_decoder_reused_across_batches_of_the_same_size(llama):
    dec = StaticDecoder(llama, max_batch=3, max_len=32)
    assert_same(llama, PADDED, decoder=dec)  # longest prompt 7
    assert_same(llama, EQUAL, decoder=dec)  # the same B, a shorter L: the buffers are refilled
    assert_same(llama, SINGLE, n=6, decoder=dec)  # another B
    assert_same(llama, PADDED, n=12, decoder=dec)
    assert set(dec._rows) == {(3, True), (1, True)}


def test_generate_ids_matches_generate_and_logprobs_are_optional(llama):
    dec = StaticDecoder(llama, max_batch=4, max_len=32)
    L = max(map(len, PADDED))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PADDED])
    lengths = torch.tensor([len(p) for p in PADDED])
    toks = dec.generate_ids(ids, 8, prompt_lengths=lengths)
    toks2, logp = dec.generate_ids(ids, 8, prompt_lengths=lengths, logprobs=True)
    assert toks.shape == logp.shape == (3, 8) and logp.dtype == torch.float32
    assert torch.equal(toks, toks2)
    comps = dec.generate(PADDED, SamplingParams(max_new_tokens=8))
    assert [c.tokens for c in comps] == toks.tolist()
    assert dec.generate_ids(ids, 0, prompt_lengths=lengths).shape == (3, 0)


def test_eos_and_stop_tokens_cut_rows(llama):
    free = StaticDecoder(llama, 4, 32).generate(PADDED, SamplingParams(max_new_tokens=10))
    eos = free[0].tokens[3]
    first = free[0].tokens.index(eos)
    dec = StaticDecoder(llama, 4, 32, eos_ids=[eos])
    ref = KVCacheGenerator(llama, eos_ids=[eos]).generate(PADDED, SamplingParams(max_new_tokens=10))
    got = dec.generate(PADDED, SamplingParams(max_new_tokens=10))
    assert got[0].tokens == free[0].tokens[: first + 1] and got[0].finish_reason == "stop"
    assert len(got[0].logprobs) == first + 1
    for r, g in zip(ref, got):
        assert (g.tokens, g.finish_reason) == (r.tokens, r.finish_reason)
    # per-row stop_token_ids and per-row budgets
    stop = free[1].tokens[2]
    params = [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=10, stop_token_ids=[stop]),
              SamplingParams(max_new_tokens=10)]
    got = StaticDecoder(llama, 4, 32).generate(PADDED, params)
    assert got[0].tokens == free[0].tokens[:4] and got[0].finish_reason == "length"
    assert got[1].tokens == free[1].tokens[: free[1].tokens.index(stop) + 1] and got[1].finish_reason == "stop"
    assert got[2].tokens == free[2].tokens and got[2].finish_reason == "length"
    assert StaticDecoder(llama, 4, 32).generate(PADDED, SamplingParams(max_new_tokens=0))[0].tokens == []


@pytest.mark.parametrize("field,value", [("temperature", 0.7), ("top_k", 5), ("top_p", 0.9),
                                         ("repetition_penalty", 1.2), ("stop", ["\n"])])
def test_sampling_params_are_refused(llama, field, value):
    with pytest.raises(ValueError, match=f"{field}.*KVCacheGenerator"):
        StaticDecoder(llama, 2, 32).generate(SINGLE, SamplingParams(max_new_tokens=3, **{field: value}))


def test_errors(llama):
    dec = StaticDecoder(llama, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="longer than max_len - max_new_tokens"):
        dec.generate([[1] * 10], SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match="max_batch 2"):
        dec.generate(EQUAL, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate([[1, 2], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty prompt"):
        dec.generate_ids(torch.tensor([[1, 2]]), 2, prompt_lengths=torch.tensor([0]))
    with pytest.raises(ValueError, match="cuda_graph"):
        StaticDecoder(llama, 1, 16, cuda_graph=True)
    with pytest.raises(ValueError, match="kv_entry_shapes, make_kv_cache"):
        StaticDecoder(torch.nn.Linear(2, 2), 1, 16)
    dynamic = build_model(ModelSection.of("llama3", "debug", rope={"scaling": "dynamic", "factor": 2.0})).eval()
    with pytest.raises(ValueError, match="cuda_graph=True: 'dynamic' RoPE"):
        StaticDecoder(dynamic, 1, 16, cuda_graph=True)
    windowed = build_model(ModelSection.of("llama3", "debug", sliding_window=4)).eval()
    with pytest.raises(ValueError, match="sliding_window"):
        StaticDecoder(windowed, 1, 16)


def test_slot_cache_writes_at_the_device_position():
    cache = SlotKVCache.allocate(n_layers=1, batch_size=2, max_len=6, entry_shapes=[(1, 2)])
    k = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 1, 2)
    (full,) = cache.update(0, k)
    assert full.shape == (2, 6, 1, 2) and torch.equal(full[:, :3], k) and not full[:, 3:].any()
    cache.advance(3)
    cache.pin(6)
    (full,) = cache.update(0, torch.ones(2, 1, 1, 2))
    cache.advance(1)
    assert torch.equal(full[:, 3], torch.ones(2, 1, 2)) and int(cache.pos) == 4 and cache.seen == 6
    cache.reset()
    assert int(cache.pos) == 0 and cache.seen == 0 and not cache.pinned


def test_compiled_step_matches_and_compiles_once(llama, monkeypatch):
    """compile=True: the same tokens for two batches of one size, from a single graph with no break and no
    recompile per token (the pinned `seen`). The "aot_eager" backend traces and functionalizes the mutating
    step in seconds; Inductor, the default, took 18 to 29 s to build its C++ on this 2-core machine, so the
    GPU tests run it (compile + CUDA graph)."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    dec = StaticDecoder(llama, max_batch=3, max_len=32, compile=True)
    assert_same(llama, PADDED, decoder=dec)
    assert_same(llama, EQUAL, decoder=dec)
    assert (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())) == (before[0] + 1, before[1])


def test_warm_up_before_a_capture_leaves_the_decode_exact(llama, monkeypatch):
    """What the CUDA-graph path does before capturing (run the step twice, restore the state it moved),
    checked on the CPU: the tokens afterwards are still KVCacheGenerator's."""
    from workbench.inference import static_decode

    calls = []

    def run_step(self, use_graph):
        if not calls:
            self.warm_up()
        calls.append(1)
        self.fn()

    monkeypatch.setattr(static_decode._Rows, "run_step", run_step)
    assert_same(llama, PADDED, n=6, decoder=StaticDecoder(llama, max_batch=3, max_len=13))  # L 7 + 6: no spare slot
    assert len(calls) == 5
