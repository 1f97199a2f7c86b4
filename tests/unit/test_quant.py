"""Int8 weight-only quantization and LLM.int8() (workbench/inference/quant.py): the quantization math by hand, the
decode kernel and the fallback against the dequantized matmul, the outlier decomposition, the logits bound on a
random llama3, MoE and MLA models, save -> load through safetensors, and the errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from workbench.errors import CheckpointError, ConfigError, WorkbenchError
from workbench.inference import quant
from workbench.inference.quant import Int8Linear, int8_linear, llm_int8_linear, quantize_model
from workbench.models.base import ModelSection, build_model
from workbench.nn.linear import Linear, int8_linear_op

# measured on the llama3 debug model over seeds 0-9 (4 x 32 random tokens): max |logits - fp32| / max |fp32 logits|
# 8.2e-3 for int8, 1.2e-2 for llm-int8; greedy tokens agree on >= 96.9% / 96.1% of positions. Asserted with 2x margin.
INT8_REL_BOUND, LLM_INT8_REL_BOUND, MIN_AGREEMENT = 1.6e-2, 2.4e-2, 0.9


def debug_model(family="llama3", seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSection.of(family, "debug")).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model.logits(model({"input_ids": ids}).hidden)


def test_quantize_weight_by_hand_half_to_even_zero_row_and_symmetric_range():
    w = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.5],    # absmax 127: s = 1, halves go to the even neighbour
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],        # all zero: eps scale, zeros
                      [-254.0, 5.0, 7.0, 1.0, -3.0, 254.0],  # absmax 254: s = 2; the negative max is -127, never -128
                      [1.0, -1.0, 0.25, 0.0, 0.0, 0.0]])
    q, s = quant.quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (4,)
    assert q[0].tolist() == [127, 2, 4, -2, 0, 0]
    assert q[1].tolist() == [0] * 6 and s[1] > 0 and torch.isfinite(s[1])
    assert q[2].tolist() == [-127, 2, 4, 0, -2, 127]
    assert q[3].tolist() == [127, -127, 32, 0, 0, 0]  # 0.25 * 127 = 31.75 -> 32
    assert s[0].item() == 1.0 and s[2].item() == 2.0 and s[3].item() == pytest.approx(1 / 127)
    rnd = torch.randn(64, 48)
    rnd[5] = -rnd[5].abs()  # a row whose absmax is a negative entry
    q, s = quant.quantize_weight(rnd)
    assert q.min().item() >= -127 and q.max().item() <= 127
    assert q[5].min().item() == -127
    # every weight within half a step of its row: |W - Wq s| <= s / 2
    assert ((rnd - q.float() * s[:, None]).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 37, 80])  # the kernel: 4 rows per pass up to 64; 80: the fallback
@pytest.mark.parametrize("kernel", [True, False])
def test_int8_linear_matches_the_dequantized_matmul(rows, kernel):
    if kernel and int8_linear_op() is None:
        pytest.skip("the CPU kernel did not build here (see workbench.nn.linear.skinny_linear_error())")
    torch.manual_seed(rows)
    lin = Linear(100, 300, bias=True)  # K = 100: the vector loop and the scalar tail
    q = Int8Linear.from_linear(lin).eval()
    x = torch.randn(rows, 100)
    ref = F.linear(x.double(), q.dequantize().double(), lin.bias.double())
    with torch.no_grad():
        y = int8_linear(x, q.weight, q.scale, q.bias, kernel=kernel)
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(q(x), int8_linear(x, q.weight, q.scale, q.bias))  # the module = the function
        # the (B, T, K) shape of a decoder, batch 2 x 2 rows: the kernel's 4 rows
        x3 = torch.randn(2, 2, 100)
        assert torch.allclose(q(x3), int8_linear(x3, q.weight, q.scale, q.bias, kernel=False), rtol=1e-5, atol=1e-5)


def test_int8_linear_keeps_the_input_dtype():
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear.from_linear(lin).eval()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), q.dequantize(), lin.bias.detach())
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_int_mm_emulation_is_exact_at_the_extremes():
    for k in (128, 1040, 1041, 3000):  # float32 up to K = 1040, float64 beyond
        a = torch.full((3, k), -127, dtype=torch.int8)
        a[1] = 127
        b = torch.full((k, 5), -127, dtype=torch.int8)
        exact = (a.long() @ b.long()).to(torch.int32)
        assert torch.equal(quant.int_mm_emulated(a, b), exact)
        assert torch.equal(torch._int_mm(a, b), exact)  # the op it stands in for
    a = torch.randint(-127, 128, (17, 300), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 300), dtype=torch.int8)
    assert torch.equal(quant.int_mm(a, b.t()), (a.long() @ b.long().t()).to(torch.int32))


def test_llm_int8_outlier_columns_run_in_floating_point():
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False))
    wd = q.dequantize()
    x = torch.randn(5, 16) * 0.5
    x[2, 3], x[0, 11] = 40.0, -9.0  # two outlier feature columns: 3 and 11
    outliers = [3, 11]
    rest = x.clone()
    rest[:, outliers] = 0
    y = llm_int8_linear(x, q.weight, q.scale, threshold=6.0)
    # Y = int8 part of X without the outlier columns + X[:, O] (Wq[:, O] s)^T in fp
    expected = llm_int8_linear(rest, q.weight, q.scale, threshold=0.0) + x[:, outliers] @ wd[:, outliers].t()
    assert torch.allclose(y, expected, rtol=1e-6, atol=1e-6)
    # with the outliers in fp the rest of each row keeps its resolution: close to the fp product over Wq s
    fp = x @ wd.t()
    err_split = (y - fp).abs().max()
    err_plain = (llm_int8_linear(x, q.weight, q.scale, threshold=0.0) - fp).abs().max()
    assert err_split < 0.05 and err_split * 4 < err_plain


def test_llm_int8_threshold_0_is_plain_vector_wise_int8():
    torch.manual_seed(1)
    q = Int8Linear.from_linear(torch.nn.Linear(32, 12, bias=False))
    x = torch.randn(6, 32) * 3
    # by hand: c_x per row, X8 = round(127 x / c_x), Y = (X8 Wq^T) c_x c_w / 127^2 with c_w = 127 s
    c_x = x.abs().amax(1)
    x8 = torch.round(x * (127 / c_x)[:, None])
    by_hand = (x8 @ q.weight.float().t()) * (c_x[:, None] / 127) * q.scale[None, :]
    assert torch.allclose(llm_int8_linear(x, q.weight, q.scale, threshold=0.0), by_hand, rtol=1e-6, atol=1e-6)
    # a threshold no entry reaches takes no columns out: the same product
    assert torch.equal(llm_int8_linear(x, q.weight, q.scale, threshold=1e6),
                       llm_int8_linear(x, q.weight, q.scale, threshold=0.0))


@pytest.mark.parametrize("method,bound", [("int8", INT8_REL_BOUND), ("llm-int8", LLM_INT8_REL_BOUND)])
def test_int8_logits_bound(method, bound):
    """The documented bound: a random llama3 debug model's logits against fp32 (docs/quantization.md)."""
    for seed in (0, 1):
        model = debug_model(seed=seed)
        ids = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
        ref = logits_of(model, ids)
        names = quantize_model(model, method)
        assert "output" in names and len(names) == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per block, and the head
        out = logits_of(model, ids)
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        assert 0 < rel < bound, f"{method} seed {seed}: relative logits error {rel:.2e}"
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= MIN_AGREEMENT


def test_what_stays_floating_point():
    model = debug_model("mixtral")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = logits_of(model, ids)
    names = quantize_model(model)
    assert not any(n.endswith(".gate") for n in names)  # the routers (DEFAULT_SKIP)
    assert model.tok_embeddings.weight.dtype == torch.float32
    experts = [p for n, p in model.named_parameters() if p.ndim == 3]  # stacked experts: not nn.Linear
    assert experts and all(p.dtype == torch.float32 for p in experts)
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
    assert ((logits_of(model, ids) - ref).abs().max() / ref.abs().max()) < 0.05
    # skip patterns: the head stays fp
    model = debug_model()
    names = quantize_model(model, skip=("output", "*.w2"))
    assert "output" not in names and not any(n.endswith("w2") for n in names)
    assert type(model.output) is Linear and "logits" not in vars(model)  # the class's logits, unchanged
    # a tied head is the embedding: it stays fp, and logits() reads it as before
    torch.manual_seed(0)
    tied = build_model(ModelSection.of("llama3", "debug", tie_embeddings=True)).eval()
    ids = torch.randint(0, tied.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = logits_of(tied, ids)
    names = quantize_model(tied)
    assert len(names) == 2 * 7 and "logits" not in vars(tied)
    assert 0 < ((logits_of(tied, ids) - ref).abs().max() / ref.abs().max()) < INT8_REL_BOUND


def test_mla_absorbed_decode_reads_the_dequantized_wkv_b():
    """DeepSeek-V3's cached (absorbed) decode reads wkv_b as a weight: through effective_weight, dequantized."""
    from workbench.inference.generator import KVCacheGenerator, SamplingParams

    model = debug_model("deepseek_v3")
    names = quantize_model(model)
    assert any(n.endswith("wkv_b") for n in names)
    prompt = torch.randint(0, model.cfg.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    out = KVCacheGenerator(model, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=4))[0]
    ids = torch.tensor([prompt + out.tokens[:-1]])
    full = logits_of(model, ids)[0, len(prompt) - 1:].argmax(-1)  # the same model recomputing every position
    assert full.tolist() == out.tokens


def test_errors_are_named():
    from workbench.nn.lora import LoraConfig, inject_lora

    model = debug_model()
    with pytest.raises(ConfigError, match="unknown quantization method 'int4'.*none, int8, llm-int8"):
        quantize_model(model, "int4")
    with pytest.raises(ConfigError, match="--quant: unknown quantization method 'fp8'"):
        quant.apply_quant(model, "fp8")
    model.train()
    with pytest.raises(WorkbenchError, match="training mode.*model.eval"):
        quantize_model(model)
    model.eval()
    lora = copy.deepcopy(model)
    inject_lora(lora, LoraConfig(r=2))
    with pytest.raises(WorkbenchError, match=r"layers\.0\.attention\.wq is a LoRA layer; merge"):
        quantize_model(lora.eval())
    quantize_model(model)
    with pytest.raises(WorkbenchError, match="quantized already"):
        quantize_model(model)
    x = torch.randn(1, 4, model.cfg.dim, requires_grad=True)
    with pytest.raises(WorkbenchError, match="requires a gradient"):
        model.layers[0].attention.wq(x)
    model.train()
    with pytest.raises(WorkbenchError, match="inference-only"):
        model.layers[0].attention.wq(x.detach())


@pytest.mark.parametrize("method", ["int8", "llm-int8"])
def test_save_and_load_give_identical_logits(tmp_path, hf_llama_dir, method):
    from workbench.checkpoint.hf import load_hf_dir

    model, tokenizer, section = load_hf_dir(hf_llama_dir)
    fp_bytes = quant.linear_weight_bytes(model)
    quantize_model(model, method, threshold=2.0)
    ids = torch.randint(0, section.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    before = logits_of(model, ids)
    out = quant.save_quantized(model, section, tokenizer, tmp_path / "q", tokenizer_source=hf_llama_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"method": method, "threshold": 2.0 if method == "llm-int8" else 0.0,
                                      "bits": 8, "scheme": "per-channel-absmax"}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "I8"
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_dtype() == "F32"
        assert f.get_slice("lm_head.weight").get_dtype() == "I8"
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    loaded, tok2, _ = load_hf_dir(out)  # the quantization entry sends it through quant.load_quantized
    assert loaded.quantization["method"] == method and tok2.encode("def f():") == tokenizer.encode("def f():")
    assert torch.equal(logits_of(loaded, ids), before)
    assert fp_bytes / quant.linear_weight_bytes(loaded) > 3.5
    # switching the method of a loaded directory: the stored weights serve both
    quant.apply_quant(loaded, "int8" if method == "llm-int8" else "llm-int8")
    assert not torch.equal(logits_of(loaded, ids), before)


def test_a_damaged_quantized_directory_is_named(tmp_path, hf_llama_dir):
    from safetensors.torch import load_file, save_file

    from workbench.checkpoint.hf import load_hf_dir

    model, tokenizer, section = load_hf_dir(hf_llama_dir)
    quantize_model(model)
    out = quant.save_quantized(model, section, tokenizer, tmp_path / "q", tokenizer_source=hf_llama_dir)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="int8 tensor layers.1.feed_forward.w2.weight has no _scale"):
        load_hf_dir(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["method"] = "int4"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization.method 'int4' unknown"):
        load_hf_dir(out)
