"""LoRA and DoRA adapters (workbench/nn/lora.py): equal to the base model at init, equal to PEFT on copied
weights (outputs and adapter gradients), merge/unmerge and the pure state-dict merge, adapter files,
freezing, the default targets of every decoder family, DeepSeek-V3's absorbed decode through an adapted
wkv_b, the trainable fraction of the 1B flavor, and `disabled` as the base model."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from workbench.errors import CheckpointError, ConfigError
from workbench.models.base import ModelSection, build_model, load_state_strict
from workbench.nn.lora import (
    LoraConfig,
    LoRALinear,
    disabled,
    effective_weight,
    format_report,
    inject_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merged,
    merged_state_dict,
    save_adapter,
    split_state,
    trainable_report,
)


def tiny(family="llama3", seed=0, **over):
    torch.manual_seed(seed)
    return build_model(ModelSection.of(family, "debug", **over))


def ids(B=2, T=10, seed=1):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model.logits(model({"input_ids": x}).hidden)


@torch.no_grad()
def perturb(model, seed=3):
    """Non-zero B (and m != ||W0|| for DoRA), as after some training."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
        if m.lora_magnitude is not None:
            m.lora_magnitude.mul_(torch.rand(m.lora_magnitude.shape, generator=g) * 0.4 + 0.8)


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapted_model_equals_its_base_at_init(dora):
    model = tiny()
    x = ids()
    base = logits(model, x)
    inject_lora(model, LoraConfig(r=4, dora=dora))
    assert torch.equal(logits(model, x), base)  # B = 0 (and m / ||W0|| = 1 exactly)
    mod = model.layers[0].attention.wq
    assert isinstance(mod, LoRALinear) and isinstance(mod, nn.Linear)
    assert mod.lora_A.abs().sum() > 0 and mod.lora_B.abs().sum() == 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_forward_and_adapter_gradients_equal_peft(kind, bias):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    r, alpha = 4, 8.0

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 10, bias=bias)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    ours = LoRALinear.from_linear(nn.Linear(12, 10, bias=bias), LoraConfig(
        r=r, alpha=alpha, dora=kind == "dora", rslora=kind == "rslora", targets=["proj"]))
    with torch.no_grad():
        ours.weight.copy_(holder.proj.weight)
        if bias:
            ours.bias.copy_(holder.proj.bias)
    peft = get_peft_model(holder, PeftConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0,
                                             use_dora=kind == "dora", use_rslora=kind == "rslora"))
    layer = peft.base_model.model.proj
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_(0, 0.3)
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        if kind == "dora":
            layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(10) + 0.5)
            ours.lora_magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 5, 12)
    ya, yb = ours(x), peft(x)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
    w = torch.randn_like(ya) / ya.numel() ** 0.5  # a loss whose gradients are O(1)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    pairs = [(ours.lora_A, layer.lora_A["default"].weight), (ours.lora_B, layer.lora_B["default"].weight)]
    if kind == "dora":
        pairs.append((ours.lora_magnitude, layer.lora_magnitude_vector["default"].weight))
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)
    assert ours.weight.grad is None and not ours.weight.requires_grad


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_restores_the_base_weight(dora):
    model = tiny()
    inject_lora(model, LoraConfig(r=4, dora=dora))
    perturb(model)
    x = ids()
    w0 = {p: m.weight.detach().clone() for p, m in lora_modules(model)}
    adapted = logits(model, x)
    eff = {p: effective_weight(m).detach().clone() for p, m in lora_modules(model)}
    with merged(model):
        assert all(m.merged for _, m in lora_modules(model))
        torch.testing.assert_close(logits(model, x), adapted, atol=1e-6, rtol=0)  # adapter not applied twice
        for p, m in lora_modules(model):
            torch.testing.assert_close(m.weight, eff[p], atol=1e-7, rtol=0)  # effective_weight == merged W
        with pytest.raises(RuntimeError, match="merged already"):
            model.layers[0].attention.wq.merge()
    err = max((m.weight - w0[p]).abs().max().item() for p, m in lora_modules(model))
    assert err < 1e-8  # measured 3.7e-9 (2^-28) for both: one fp32 rounding of the merged weight
    assert not any(m.merged for _, m in lora_modules(model))
    with pytest.raises(RuntimeError, match="not merged"):
        model.layers[0].attention.wq.unmerge()
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_state_dict_loads_into_a_plain_model_with_the_adapted_logits(dora):
    cfg = LoraConfig(r=4, alpha=8.0, dora=dora)
    model = tiny()
    inject_lora(model, cfg)
    perturb(model)
    x = ids()
    state = model.state_dict()
    plain_state, adapters = split_state(state, cfg)
    plain = tiny(seed=9)  # never adapted, other weights
    load_state_strict(plain, plain_state, "merged state")  # exactly the plain model's keys
    torch.testing.assert_close(logits(plain, x), logits(model, x), atol=1e-6, rtol=0)
    assert set(adapters) == set(lora_state_dict(model)) and all(k.startswith("layers.") for k in adapters)
    assert torch.equal(merged_state_dict(state, cfg)["layers.0.attention.wq.weight"],
                       plain.layers[0].attention.wq.weight)
    with merged(model):  # the pure function agrees with merging the modules
        for p, m in lora_modules(model):
            assert torch.equal(plain_state[f"{p}.weight"], m.weight)
    with pytest.raises(CheckpointError, match="lora_magnitude"):
        merged_state_dict(state, dataclasses.replace(cfg, dora=not dora))


def test_adapter_files_round_trip_and_damage_names_the_file(tmp_path):
    cfg = LoraConfig(r=4, dora=True, targets=["layers.*.attention.wq", "layers.*.attention.wv"])
    model = tiny()
    inject_lora(model, cfg)
    perturb(model)
    x = ids()
    folder = save_adapter(model, tmp_path / "adapter", cfg, meta={"family": "llama3", "flavor": "debug"})
    doc = json.loads((folder / "adapter_config.json").read_text())
    assert doc["lora"] == dataclasses.asdict(cfg) and doc["meta"]["flavor"] == "debug"
    assert doc["modules"] == ["layers.0.attention.wq", "layers.0.attention.wv", "layers.1.attention.wq",
                              "layers.1.attention.wv"]
    fresh = tiny()  # the same base weights, never adapted
    assert load_adapter(fresh, folder) == cfg
    assert torch.equal(logits(fresh, x), logits(model, x))

    (folder / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        load_adapter(tiny(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(tiny(), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json.*missing"):
        load_adapter(tiny(), folder)


def test_only_adapters_train_and_bad_targets_name_the_key():
    model = tiny()
    paths = inject_lora(model, LoraConfig(r=2, dropout=0.1))
    model.train()
    model.logits(model({"input_ids": ids()}).hidden).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{p}.{k}" for p in paths for k in ("lora_A", "lora_B")}
    assert all(n.rpartition(".")[2] in ("lora_A", "lora_B") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=r"lora.targets.*nothing\.here.*layers\.0\.attention\.wq"):
        inject_lora(tiny(), LoraConfig(r=2, targets=["nothing.here"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        inject_lora(model, LoraConfig(r=2))
    assert inject_lora(tiny(), LoraConfig(r=0)) == []  # LoRA off


@pytest.mark.parametrize("family,names", [
    ("llama3", ["wq", "wk", "wv", "wo"]),
    ("mixtral", ["wq", "wk", "wv", "wo"]),
    ("deepseek_v3", ["wq_a", "wq_b", "wkv_a", "wkv_b", "wo"]),
])
def test_default_targets_adapt_every_attention_projection(family, names):
    model = tiny(family)
    paths = inject_lora(model, LoraConfig(r=2))
    n_layers = model.cfg.n_layers
    assert paths == [f"layers.{i}.attention.{n}" for i in range(n_layers) for n in names]


def test_deepseek_absorbed_decode_reads_the_adapted_wkv_b():
    model = tiny("deepseek_v3").eval()
    cfg = LoraConfig(r=4, dora=True, targets=["layers.*.attention.wkv_b"])
    inject_lora(model, cfg)
    perturb(model)
    x = ids(2, 12)
    full = logits(model, x)
    with disabled(model):
        base_full = logits(model, x)
    assert (full - base_full).abs().max() > 1e-3  # the adapter changes what decode must reproduce
    assert model.cfg.mla_decode == "absorb"
    cache = model.make_kv_cache(2, 16)
    with torch.no_grad():
        steps = [model.logits(model({"input_ids": x[:, :6], "kv_cache": cache}).hidden)]
        for t in range(6, 12):
            steps.append(model.logits(model({"input_ids": x[:, t:t + 1], "kv_cache": cache,
                                              "positions": torch.full((2, 1), t)}).hidden))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)


def test_the_1b_flavor_trains_under_one_percent_on_meta():
    from workbench.models.llama3 import FLAVORS, Model

    with torch.device("meta"):
        model = Model(FLAVORS["1B"])
    inject_lora(model, LoraConfig(r=8))
    report = trainable_report(model)
    # 16 layers x 8 x (2048+2048 + 2048+512 + 2048+512 + 2048+2048) = 1,703,936 of 1,237,518,336 (0.138%)
    assert (report["trainable"], report["total"], report["modules"]) == (1_703_936, 1_237_518_336, 64)
    assert report["fraction"] < 0.01
    assert format_report(report) == "LoRA r=8 on 64 modules: 1,703,936 trainable of 1,237,518,336 parameters (0.14%)"


def test_disabled_gives_the_base_model_and_restores_the_adapters():
    model = tiny()
    x = ids()
    base = logits(model, x)
    inject_lora(model, LoraConfig(r=4, dora=True))
    perturb(model)
    adapted = logits(model, x)
    assert (adapted - base).abs().max() > 1e-3
    with disabled(model):
        assert torch.equal(logits(model, x), base)
        assert torch.equal(effective_weight(model.layers[0].attention.wq), model.layers[0].attention.wq.weight)
    assert torch.equal(logits(model, x), adapted)
    with merged(model), pytest.raises(RuntimeError, match="unmerge"), disabled(model):
        pass


def test_config_rules():
    from workbench.config import from_dict

    cfg = from_dict(LoraConfig, {"r": 16, "alpha": 32.0, "rslora": True}, "lora")
    assert cfg.scale == pytest.approx(32 / 4) and LoraConfig(r=8).scale == 2.0 and not LoraConfig().enabled
    with pytest.raises(ConfigError, match="lora.dora.*r > 0"):
        from_dict(LoraConfig, {"dora": True}, "lora")
    with pytest.raises(ConfigError, match="lora.dropout"):
        from_dict(LoraConfig, {"r": 4, "dropout": 1.0}, "lora")
    with pytest.raises(ConfigError, match="lora.targets"):
        from_dict(LoraConfig, {"r": 4, "targets": []}, "lora")
