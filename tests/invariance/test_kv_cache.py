"""KV-cache decoding equals a full forward; left-padded batches equal single prompts. For Llama 3 (K/V cache) and
DeepSeek-V3 (MLA's latent cache, read by the absorbed and the expanded path)."""

import pytest
import torch

from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.models.base import ModelSection, build_model
from workbench.nn.attention import MaskSpec

FAMILIES = {"llama3": {}, "mla-absorb": {"mla_decode": "absorb"}, "mla-expand": {"mla_decode": "expand"}}
SCALED_ROPE = {"llama3": {"scaling": "llama3", "factor": 4.0, "original_max_seq_len": 16},
               "deepseek_v3": {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 16, "mscale": 0.707,
                               "mscale_all_dim": 1.0}}


def tiny(backend="sdpa", kind="llama3", **over):
    torch.manual_seed(0)
    family = "llama3" if kind == "llama3" else "deepseek_v3"
    model = build_model(ModelSection.of(family, "debug", attn_backend=backend, **FAMILIES[kind], **over)).eval()
    return model


@pytest.mark.parametrize("kind", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_prefill_then_decode_equals_full_forward(backend, kind):
    model = tiny(backend, kind, rope=SCALED_ROPE["llama3" if kind == "llama3" else "deepseek_v3"])
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.logits(model({"input_ids": ids}).hidden)  # (B, T, V)
        cache = model.make_kv_cache(2, 24)
        pieces = [model.logits(model({"input_ids": ids[:, :10], "kv_cache": cache}).hidden)]
        # a chunked prefill (5 tokens at offset 10: dense mask with a query offset), then 1-token decode
        pieces.append(model.logits(model({"input_ids": ids[:, 10:15], "kv_cache": cache}).hidden))
        for t in range(15, 24):
            pieces.append(model.logits(model({"input_ids": ids[:, t : t + 1], "kv_cache": cache}).hidden))
    assert cache.seen == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    model = tiny()
    cache = model.make_kv_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        model({"input_ids": torch.zeros(1, 5, dtype=torch.long), "kv_cache": cache})


@pytest.mark.parametrize("kind", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_left_padded_batch_equals_single_prompts(backend, kind):
    model = tiny(backend, kind)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 13, 9)]
    # logits of the padded prefill at every real position equal the single-prompt forward
    L = 13
    ids = torch.zeros(3, L, dtype=torch.long)
    valid = torch.zeros(3, L, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        valid[b, L - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model.logits(model({"input_ids": ids, "positions": positions,
                                      "mask": MaskSpec(key_padding=valid)}).hidden)
        for b, p in enumerate(prompts):
            single = model.logits(model({"input_ids": torch.tensor([p])}).hidden)[0]
            torch.testing.assert_close(batched[b, L - len(p):], single, atol=1e-5, rtol=1e-5)
    # and greedy generation through the cache gives the same tokens and log-probs batched or alone
    gen = KVCacheGenerator(model, eos_ids=[])
    params = SamplingParams(max_new_tokens=12)
    together = gen.generate(prompts, params)
    for p, c in zip(prompts, together):
        alone = gen.generate([p], params)[0]
        assert c.tokens == alone.tokens and len(c.tokens) == 12
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_generation_equals_argmax_of_full_forward(kind):
    model = tiny(kind=kind)
    prompt = [5, 17, 300, 42]
    out = KVCacheGenerator(model, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=8))[0]
    seq = list(prompt)
    with torch.no_grad():
        for tok, lp in zip(out.tokens, out.logprobs):
            logits = model.logits(model({"input_ids": torch.tensor([seq])}).hidden)[0, -1]
            assert tok == int(logits.argmax())
            assert abs(lp - float(torch.log_softmax(logits, -1)[tok])) < 1e-5
            seq.append(tok)


@pytest.mark.parametrize("pattern", [{"moba_block_size": 4, "moba_topk": 2, "moba_full_last_layers": 1},
                                     {"sliding_window": 6}], ids=["moba-hybrid", "window"])
@pytest.mark.parametrize("backend", ["math", "block"])
def test_attention_patterns_prefill_then_decode_equals_full_forward(backend, pattern):
    """MoBA and a sliding window through the cache: prefill, chunked prefill at an offset, 1-token decode."""
    model = tiny(backend, **pattern)
    ids = torch.randint(0, 512, (2, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.logits(model({"input_ids": ids}).hidden)  # (B, T, V)
        cache = model.make_kv_cache(2, 26)
        pieces = [model.logits(model({"input_ids": ids[:, :9], "kv_cache": cache}).hidden)]
        pieces.append(model.logits(model({"input_ids": ids[:, 9:15], "kv_cache": cache}).hidden))
        for t in range(15, 26):
            pieces.append(model.logits(model({"input_ids": ids[:, t : t + 1], "kv_cache": cache}).hidden))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
