"""Multi-adapter serving (workbench/inference/adapters.py): one base model with several LoRA/DoRA adapters of
different ranks and targets serves a batch whose rows name different adapters (or none), and every row gets the
logits, and the greedy KV-cache decode, of the base model with its adapter merged; the errors name what is wrong."""

import pytest
import torch

from workbench.errors import CheckpointError
from workbench.inference.adapters import (
    AdapterRegistry,
    MultiLoRALinear,
    UnknownAdapterError,
    adapter_rows,
    load_adapters,
    multi_lora_modules,
)
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.models.base import ModelSection, build_model
from workbench.nn.lora import (
    LoraConfig,
    effective_weight,
    inject_lora,
    load_adapter,
    lora_modules,
    merge_and_unload,
    save_adapter,
)

# fp32 throughout. Measured worst |served - merged| over the logits of these tests (logits below 1 in
# magnitude): 2.7e-7 (the merged reference rounds W0 + s B A to fp32 once and runs one row; the served model
# adds s B (A x) to W0 x and runs the batch); the tolerance leaves a factor of 7
ATOL = 2e-6


def tiny(family="llama3", seed=0, **over):
    torch.manual_seed(seed)
    return build_model(ModelSection.of(family, "debug", **over)).eval()


def logits(model, x):
    with torch.no_grad():
        return model.logits(model({"input_ids": x}).hidden)


@torch.no_grad()
def make_adapter(folder, family, cfg, seed, **over):
    """An adapter of `cfg` on the debug base, with random non-zero B (and m != ||W0|| for DoRA), saved to `folder`."""
    model = tiny(family, **over)
    torch.manual_seed(seed)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        if m.lora_magnitude is not None:
            m.lora_magnitude.mul_(torch.rand(m.lora_magnitude.shape, generator=g) * 0.4 + 0.8)
    return save_adapter(model, folder, cfg, meta={"family": family, "flavor": "debug"})


def merged_model(family, folder, **over):
    """The reference: a fresh base with the adapter loaded and merged into its weights (None: the base)."""
    model = tiny(family, **over)
    if folder is not None:
        load_adapter(model, folder)
        merge_and_unload(model)
    return model


LLAMA_ADAPTERS = {
    # rank 4, every attention projection
    "a": LoraConfig(r=4, alpha=8.0),
    # rank 2 rsLoRA on the feed-forward and one attention projection of layer 0 only
    "b": LoraConfig(r=2, alpha=4.0, rslora=True, targets=["layers.*.feed_forward.w1", "layers.*.feed_forward.w2",
                                                            "layers.0.attention.wv"]),
    # rank 8 DoRA
    "c": LoraConfig(r=8, alpha=16.0, dora=True, targets=["layers.*.attention.wq", "layers.*.attention.wo",
                                                          "layers.*.feed_forward.w3"]),
}


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, "llama3", cfg, seed=10 + i)
            for i, (name, cfg) in enumerate(LLAMA_ADAPTERS.items())}


def test_a_mixed_batch_gives_each_row_its_merged_model(llama_folders):
    model = tiny()
    reg = load_adapters(model, llama_folders)
    assert reg.names == ["a", "b", "c"] and [reg.id_of(n) for n in (None, "a", "b", "c")] == [0, 1, 2, 3]
    assert model.adapter_registry is reg
    wq = model.layers[0].attention.wq
    assert isinstance(wq, MultiLoRALinear) and wq.n_slots == 4 and wq.ranks == [0, 4, 0, 8]
    assert set(model.state_dict()) == set(tiny().state_dict())  # the stacks are not in the state dict
    rows = ["a", "b", None, "c", "a"]
    x = torch.randint(0, 512, (len(rows), 10), generator=torch.Generator().manual_seed(1))
    with adapter_rows(model, reg.ids(rows)):
        served = logits(model, x)
    refs = {n: merged_model("llama3", llama_folders[n] if n else None) for n in (None, "a", "b", "c")}
    base = logits(refs[None], x)
    for i, name in enumerate(rows):
        want = logits(refs[name], x[i:i + 1])[0]
        torch.testing.assert_close(served[i], want, atol=ATOL, rtol=0)
        if name is not None:  # the adapter matters, so agreeing above is not trivial
            assert (want - base[i]).abs().max() > 1e-2
    assert torch.equal(served[2], base[2])  # a base row is the base model's computation (zeros add nothing)
    # uniform batches take the fast path: one adapter for all rows, and no adapter at all
    with adapter_rows(model, reg.ids(["c"] * 3)):
        torch.testing.assert_close(logits(model, x[:3]), logits(refs["c"], x[:3]), atol=ATOL, rtol=0)
    with adapter_rows(model, torch.zeros(3, dtype=torch.long)):
        assert torch.equal(logits(model, x[:3]), base[:3])


def test_kv_cache_decode_of_a_mixed_batch_equals_each_merged_model(llama_folders):
    model = tiny()
    reg = load_adapters(model, llama_folders)
    rows = ["a", "b", None, "c", "a"]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 3, 5, 9, 4)]  # left padding
    params = SamplingParams(max_new_tokens=6)
    with adapter_rows(model, reg.ids(rows)):
        served = KVCacheGenerator(model).generate(prompts, params)
    for name, prompt, got in zip(rows, prompts, served):
        ref = merged_model("llama3", llama_folders[name] if name else None)
        want = KVCacheGenerator(ref).generate([prompt], params)[0]
        assert got.tokens == want.tokens, name
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-5


def test_loading_in_two_calls_equals_loading_at_once(llama_folders):
    at_once, stepwise = tiny(), tiny()
    reg = load_adapters(at_once, llama_folders)
    first = load_adapters(stepwise, {"a": llama_folders["a"], "b": llama_folders["b"]})
    assert stepwise.layers[0].attention.wq.ranks == [0, 4, 0]
    second = load_adapters(stepwise, {"c": llama_folders["c"]})  # the rank-8 slot widens every stack
    assert second is first and second.names == reg.names
    assert stepwise.layers[0].attention.wq.r_max == 8 and stepwise.layers[1].feed_forward.w1.n_slots == 4
    ids = torch.tensor([3, 1, 0, 2])
    x = torch.randint(0, 512, (4, 8), generator=torch.Generator().manual_seed(3))
    with adapter_rows(at_once, ids), adapter_rows(stepwise, ids):
        torch.testing.assert_close(logits(stepwise, x), logits(at_once, x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="'a' is loaded already"):
        load_adapters(stepwise, {"a": llama_folders["a"]})


def test_two_models_and_nested_rows_do_not_interfere(llama_folders):
    m1, m2 = tiny(), tiny()
    load_adapters(m1, llama_folders)
    load_adapters(m2, llama_folders)
    x = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    with adapter_rows(m1, [1, 3]):
        with pytest.raises(RuntimeError, match="adapter_rows"):  # m2 has no ids set: refused, not the base model
            logits(m2, x)
        with adapter_rows(m1, [0, 0]):
            assert torch.equal(logits(m1, x), logits(tiny(), x))
        assert m1.layers[0].attention.wq._rows.present == (1, 3)  # the outer ids are back
    assert m1.layers[0].attention.wq._rows is None


@pytest.mark.parametrize("family,over,targets", [
    ("mixtral", {}, ["layers.*.attention.*"]),
    # the absorbed MLA decode reads wkv_b's weight, so in that mode adapters leave wkv_b alone
    ("deepseek_v3", {}, ["layers.*.attention.wq_a", "layers.*.attention.wq_b", "layers.*.attention.wkv_a",
                         "layers.*.attention.wo"]),
    ("deepseek_v3", {"mla_decode": "expand"}, ["layers.*.attention.*"]),
])
def test_other_families_serve_mixed_batches(tmp_path, family, over, targets):
    folders = {"lora": make_adapter(tmp_path / "lora", family, LoraConfig(r=4, targets=targets), seed=5, **over),
               "dora": make_adapter(tmp_path / "dora", family, LoraConfig(r=2, dora=True, targets=targets), seed=6,
                                    **over)}
    model = tiny(family, **over)
    reg = load_adapters(model, folders)
    rows = ["dora", None, "lora"]
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 512, (3, 8), generator=g)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 8, 3)]
    params = SamplingParams(max_new_tokens=4)
    with adapter_rows(model, reg.ids(rows)):
        served = logits(model, x)
        decoded = KVCacheGenerator(model).generate(prompts, params)
    for i, name in enumerate(rows):
        ref = merged_model(family, folders[name] if name else None, **over)
        torch.testing.assert_close(served[i], logits(ref, x[i:i + 1])[0], atol=ATOL, rtol=0)
        assert decoded[i].tokens == KVCacheGenerator(ref).generate([prompts[i]], params)[0].tokens


def test_deepseek_absorbed_decode_refuses_an_adapted_wkv_b(tmp_path):
    folder = make_adapter(tmp_path / "kv", "deepseek_v3", LoraConfig(r=2, targets=["layers.*.attention.wkv_b"]), 1)
    model = tiny("deepseek_v3")
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wkv_b.*mla_decode = \"expand\""):
        load_adapters(model, {"kv": folder})
    # a layer read through effective_weight: one weight for a uniform batch, refused for a mixed one
    expand = tiny("deepseek_v3", mla_decode="expand")
    load_adapters(expand, {"kv": folder})
    wkv_b = expand.layers[0].attention.wkv_b
    ref = merged_model("deepseek_v3", folder, mla_decode="expand").layers[0].attention.wkv_b.weight
    with adapter_rows(expand, [1, 1]):
        torch.testing.assert_close(effective_weight(wkv_b), ref, atol=1e-6, rtol=0)
    with adapter_rows(expand, [1, 0]), pytest.raises(RuntimeError, match=r"slots \(0, 1\)"):
        effective_weight(wkv_b)


def test_errors_name_the_adapter_and_what_is_wrong(tmp_path, llama_folders):
    model = tiny()
    reg = load_adapters(model, llama_folders)
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'zz' \(loaded adapters: 'a', 'b', 'c'\)"):
        reg.id_of("zz")
    with pytest.raises(UnknownAdapterError, match="loaded adapters: none"):
        AdapterRegistry().id_of("a")
    x = torch.randint(0, 512, (2, 5))
    with pytest.raises(RuntimeError, match="adapter_rows"):  # forgot the ids: refused, not the base model
        logits(model, x)
    with pytest.raises(ValueError, match="slot 4 is out of range: this model has 4 slots"):
        with adapter_rows(model, [0, 4]):
            pass
    with pytest.raises(ValueError, match="1-D integer"):
        with adapter_rows(model, torch.zeros(2, 1, dtype=torch.long)):
            pass
    with adapter_rows(model, [1, 2, 3]), pytest.raises(ValueError, match=r"3 row ids.*\(2, 5, 64\)"):
        logits(model, x)
    with pytest.raises(ValueError, match="no multi-adapter layers"):
        with adapter_rows(tiny(), [0]):
            pass

    def fresh_fails(folder, exc, match):
        plain = tiny()
        with pytest.raises(exc, match=match):
            load_adapters(plain, {"good": llama_folders["a"], "bad": folder})
        assert not list(multi_lora_modules(plain))  # all-or-nothing: the model is untouched

    # a module the model lacks: an adapter of a 3-layer base on the 2-layer one
    deeper = make_adapter(tmp_path / "deeper", "llama3", LoraConfig(r=2), 1, n_layers=3)
    fresh_fails(deeper, CheckpointError, r"'bad'.*targets module layers\.2\.attention\.wq, which this model lacks")
    # shape mismatch: a base with 4 KV heads has a wider wk
    wider = make_adapter(tmp_path / "wider", "llama3", LoraConfig(r=2), 1, n_kv_heads=4)
    fresh_fails(wider, CheckpointError, r"tensor layers\.0\.attention\.wk\.lora_B has shape \(64, 2\).*needs \(32, 2\)")
    # another family's adapter
    other = make_adapter(tmp_path / "other", "llama3", LoraConfig(r=2), 1)
    cfg = (other / "adapter_config.json").read_text().replace('"family": "llama3"', '"family": "mixtral"')
    (other / "adapter_config.json").write_text(cfg)
    fresh_fails(other, CheckpointError, "trained on a mixtral model, not llama3")
    # a folder without its tensors
    gone = make_adapter(tmp_path / "gone", "llama3", LoraConfig(r=2), 1)
    (gone / "adapter.safetensors").unlink()
    fresh_fails(gone, CheckpointError, r"adapter\.safetensors is missing")
    # a model holding a training adapter
    training = tiny()
    inject_lora(training, LoraConfig(r=2))
    with pytest.raises(ValueError, match="merge_and_unload"):
        load_adapters(training, {"a": llama_folders["a"]})
