"""The Mochi AsymmDiT (workbench.models.video.mochi) vs diffusers' MochiTransformer3DModel on the tiny config of
models.md section 7 (fp32): random weights everywhere (the learned RoPE frequencies included), a batch whose text
is padded (encoder_attention_mask), odd latent grids; the state dict goes through workbench.checkpoint.hf.mochi,
and a save_pretrained directory is imported, exported and imported again by diffusers."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from workbench.checkpoint.hf import mochi as mochi_io  # noqa: E402
from workbench.errors import CheckpointError  # noqa: E402
from workbench.models.video import mochi  # noqa: E402

ATOL = 1e-5
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, pooled_projection_dim=16, in_channels=4,
            text_embed_dim=16, time_embed_dim=4, max_sequence_length=16)

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              # diffusers computes its RoPE under a float32 CPU autocast, which torch ignores with a warning
              pytest.mark.filterwarnings("ignore:In CPU autocast")]


def _reference(seed: int = 0, **over):
    torch.manual_seed(seed)
    ref = diffusers.MochiTransformer3DModel(**{**TINY, **over}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():  # diffusers leaves norms at 1 and pos_frequencies at 0: randomize all
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ref


def _ours(ref) -> mochi.AsymmDiT:
    cfg = mochi_io.config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        model = mochi.AsymmDiT(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(mochi_io.state_dict_from_diffusers(ref.state_dict(), cfg))
    return model.eval()


def _inputs(B, T, H, W, L=6, C=4, text_dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g)
    text = torch.randn(B, L, text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, L - 1 - 2 * b:] = False  # row b: 2b + 1 padded tokens (row 0: one, row 1: three)
    sigma = torch.linspace(0.0, 1.0, B)  # the ends of the schedule included
    return x, text, mask, sigma


@pytest.mark.parametrize("shape", [(2, 3, 6, 10), (3, 1, 2, 2), (2, 5, 4, 6)], ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_diffusers(shape):
    ref = _reference()
    model = _ours(ref)
    B, T, H, W = shape
    x, text, mask, sigma = _inputs(B, T, H, W)
    with torch.no_grad():
        # diffusers' timestep is Mochi's reversed one: 1000 (1 - sigma) (flow.py's docstring)
        want = ref(x, text, 1000 * (1 - sigma), mask, return_dict=False)[0]
        got = model(x, sigma, text, mask)
    assert got.shape == want.shape == x.shape
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_padded_text_is_ignored_like_diffusers():
    """Changing the features under padded text tokens (or adding more padding) changes neither model."""
    ref = _reference(seed=3)
    model = _ours(ref)
    x, text, mask, sigma = _inputs(2, 2, 4, 4, seed=4)
    noisy = text.clone()
    noisy[~mask] = 100.0
    longer = torch.cat([noisy, torch.randn(2, 3, 16)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        base = model(x, sigma, text, mask)
        torch.testing.assert_close(model(x, sigma, noisy, mask), base, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(x, sigma, longer, longer_mask), base, atol=ATOL, rtol=0)
        want = ref(x, longer, 1000 * (1 - sigma), longer_mask, return_dict=False)[0]
        torch.testing.assert_close(base, want, atol=ATOL, rtol=0)
        changed = text.clone()
        changed[0, 0] += 1.0  # a real token does matter
        assert (model(x, sigma, changed, mask) - base)[0].abs().max() > 1e-3


def test_state_dict_round_trip_is_exact():
    ref = _reference(seed=5)
    model = _ours(ref)
    back = mochi_io.state_dict_to_diffusers(model.state_dict())
    want = ref.state_dict()
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_directory_import_export(tmp_path):
    ref = _reference(seed=6)
    ref.save_pretrained(tmp_path / "src")
    model, cfg = mochi_io.load_mochi_dir(tmp_path / "src")
    assert cfg.n_layers == 2 and cfg.text_width == 16 and cfg.dim == 16
    x, text, mask, sigma = _inputs(2, 3, 4, 6, seed=7)
    with torch.no_grad():
        want = ref(x, text, 1000 * (1 - sigma), mask, return_dict=False)[0]
        torch.testing.assert_close(model(x, sigma, text, mask), want, atol=ATOL, rtol=0)
    mochi_io.export_mochi_dir(model, tmp_path / "out")
    again = diffusers.MochiTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == \
        {k: v for k, v in ref.config.items() if not k.startswith("_")}
    with pytest.raises(CheckpointError, match="not empty"):
        mochi_io.export_mochi_dir(model, tmp_path / "out")
    # a pipeline folder: its transformer/ subfolder is read
    (tmp_path / "pipe").mkdir()
    (tmp_path / "src").rename(tmp_path / "pipe" / "transformer")
    model2, _ = mochi_io.load_mochi_dir(tmp_path / "pipe")
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model.state_dict().values()))
    # sharded weights (an index file naming the shards)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model3, _ = mochi_io.load_mochi_dir(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(model3.state_dict().values(), model.state_dict().values()))


def test_unsupported_configs_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="qk_norm"):
        mochi_io.config_from_diffusers({**TINY, "qk_norm": "layer_norm"})
    with pytest.raises(CheckpointError, match="out_channels"):
        mochi_io.config_from_diffusers({**TINY, "out_channels": 8})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "MochiTransformer3DModel", **TINY}))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        mochi_io.load_mochi_dir(tmp_path)
    with pytest.raises(CheckpointError, match="pool_heads"):
        model = mochi.AsymmDiT(mochi.FLAVORS["debug"])
        mochi_io.config_to_diffusers(model.cfg)


def test_10b_flavor_equals_diffusers_defaults_on_meta():
    """diffusers' defaults are Mochi 1 preview's: the same config and parameter count, nothing allocated."""
    with torch.device("meta"):
        ref = diffusers.MochiTransformer3DModel()
    cfg = mochi_io.config_from_diffusers(dict(ref.config))
    ours = mochi.FLAVORS["10B"]
    assert {k: getattr(cfg, k) for k in ("dim", "text_width", "n_layers", "n_heads", "head_dim", "text_dim",
                                          "in_channels", "hidden_x", "hidden_y")} == \
        {k: getattr(ours, k) for k in ("dim", "text_width", "n_layers", "n_heads", "head_dim", "text_dim",
                                       "in_channels", "hidden_x", "hidden_y")}
    assert mochi.param_count(ours) == sum(p.numel() for p in ref.parameters()) == 10_027_677_744


def test_bfloat16_matches_diffusers_bfloat16():
    """Both models cast to bf16 (our RoPE and norms still compute in fp32, as diffusers'): close at bf16 precision."""
    ref = _reference()
    model = _ours(ref).to(torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    x, text, mask, sigma = _inputs(2, 3, 6, 10)
    with torch.no_grad():
        want = ref(x.bfloat16(), text.bfloat16(), 1000 * (1 - sigma), mask, return_dict=False)[0].float()
        got = model(x.bfloat16(), sigma, text.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
