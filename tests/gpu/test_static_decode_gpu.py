"""StaticDecoder on CUDA: eager, CUDA graph and compile + CUDA graph give KVCacheGenerator's tokens (fp32, TF32
off), bf16 runs with finite log-probs, and a second batch of the same size replays the same graph.
Run with `make test-gpu`; without a CUDA GPU tests/conftest.py skips these and says so."""

import pytest
import torch

from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.inference.static_decode import StaticDecoder
from workbench.models.base import ModelSection, build_model

pytestmark = pytest.mark.gpu

PADDED = [[5, 17, 300, 42, 9, 11, 60], [7, 1], [400, 3, 2, 250]]
OTHER = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]  # the same B, another L


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def debug_model(dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(ModelSection.of("llama3", "debug", init_std=0.2), device="cuda").to(dtype).eval()


def check(model, dec, prompts, n=16):
    ref = KVCacheGenerator(model, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=n))
    got = dec.generate(prompts, SamplingParams(max_new_tokens=n))
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["eager", "graph", "compile+graph"])
def test_modes_match_kv_cache_generator_and_reuse_the_graph(no_tf32, mode):
    model = debug_model()
    dec = StaticDecoder(model, max_batch=4, max_len=64, compile=mode == "compile+graph", cuda_graph=mode != "eager")
    assert dec.cuda_graph == (mode != "eager")
    check(model, dec, PADDED)
    rows = dec._rows[(3, True)]
    graph = rows.graph
    assert (graph is not None) == dec.cuda_graph
    check(model, dec, OTHER)  # refilled in place, replayed by the same graph
    assert rows.graph is graph and set(dec._rows) == {(3, True)}
    check(model, dec, [PADDED[0]])  # another batch size: its own graph
    assert set(dec._rows) == {(3, True), (1, True)}


def test_default_is_a_cuda_graph_and_ids_stay_on_the_device(no_tf32):
    model = debug_model()
    dec = StaticDecoder(model, max_batch=2, max_len=32)
    assert dec.cuda_graph
    out = dec.generate_ids(torch.tensor([[5, 17, 300]]), 8)
    assert out.device.type == "cuda" and out.shape == (1, 8)


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compile+graph"])
def test_bf16_runs_with_finite_logprobs(compile):
    model = debug_model(torch.bfloat16)
    dec = StaticDecoder(model, max_batch=4, max_len=64, compile=compile)
    L = max(map(len, PADDED))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PADDED])
    toks, logp = dec.generate_ids(ids, 16, prompt_lengths=torch.tensor([len(p) for p in PADDED]), logprobs=True)
    assert toks.shape == logp.shape == (3, 16)
    assert bool(torch.isfinite(logp).all()) and bool((logp <= 0).all())
    assert int(toks.min()) >= 0 and int(toks.max()) < model.cfg.vocab_size


def test_masked_gqa_decode_attention_runs_on_the_memory_efficient_kernel():
    """The decode step's attention (one query, a boolean mask over every cache slot, 32 query heads over 8 KV heads)
    folds the query groups so SDPA's memory-efficient kernel takes it: with only that kernel allowed it runs, and it
    equals the math reference (bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from workbench.nn.attention import MaskSpec, attention_math, attention_sdpa

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, KV, T, D = 4, 32, 8, 272, 64
    q = torch.randn(B, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(B, KV, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    valid = torch.arange(T, device="cuda")[None] < torch.tensor([[40], [100], [200], [272]], device="cuda")
    spec = MaskSpec(causal=False, key_padding=valid)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = attention_sdpa(q, k, v, spec, T, D ** -0.5)
    ref = attention_math(q.float(), k.float(), v.float(), spec, T, D ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
