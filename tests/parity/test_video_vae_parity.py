"""The causal video VAE vs diffusers' AutoencoderKLMochi (fp32, tiny random configs, Mochi's 6x / 8x factors).

The reference gets random weights everywhere (norms included), is saved with `save_pretrained`, loaded through
the adapter (`workbench.checkpoint.hf.mochi_vae`) and compared: posterior mean and log-variance, decode, a
single frame; then our model is exported and diffusers loads it back."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "AutoencoderKLMochi"):  # added in diffusers 0.31
    pytest.skip(f"diffusers {diffusers.__version__} has no AutoencoderKLMochi", allow_module_level=True)

from workbench.checkpoint.hf import mochi_vae as io  # noqa: E402
from workbench.errors import CheckpointError  # noqa: E402
from workbench.models.video.vae import FLAVORS, CausalVideoVAE  # noqa: E402

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CASES = {
    # Mochi's factors and attention placement; two ResBlocks + attention layers at the third level
    "mochi-factors": dict(encoder_block_out_channels=(32, 32, 32, 64), decoder_block_out_channels=(32, 32, 64, 64),
                          latent_channels=4, layers_per_block=(1, 1, 1, 2, 1)),
    # two levels, attention everywhere in the encoder (block_in included), 3x temporal then 1x
    "two-levels": dict(encoder_block_out_channels=(32, 64, 32), decoder_block_out_channels=(64, 32, 32),
                       latent_channels=3, layers_per_block=(1, 2, 1, 1), temporal_expansions=(3, 1),
                       spatial_expansions=(2, 1), add_attention_block=(True, True, True, True)),
}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """atol 1e-5 on the reference's scale (float32 rounding differs: diffusers normalizes frames in chunks
    of 8, a different memory layout)."""
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL * max(1.0, want.abs().max().item()))


def _reference(kw: dict, seed: int):
    n = kw["latent_channels"]
    g = torch.Generator().manual_seed(seed)
    ref = diffusers.AutoencoderKLMochi(latents_mean=tuple(torch.randn(n, generator=g).tolist()),
                                       latents_std=tuple((torch.rand(n, generator=g) + 0.5).tolist()), **kw).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:  # norm gains near 1 and biases near 0 instead of exactly 1 / 0
                gain = "norm" in name and name.endswith("weight")
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float(gain))
            else:  # convs and linears: PyTorch's init, redrawn from the test's generator
                bound = 1 / p[0].numel() ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    return ref


@pytest.mark.parametrize("case", list(CASES))
def test_matches_autoencoder_kl_mochi(case, tmp_path):
    ref = _reference(CASES[case], seed=1)
    ref.save_pretrained(tmp_path / "vae")
    ours = io.load_mochi_vae_dir(tmp_path)  # the pipeline-root form: finds vae/
    tf, s = ours.temporal_factor, ours.spatial_factor
    assert (tf, s) == (ref.temporal_compression_ratio, ref.spatial_compression_ratio)
    torch.testing.assert_close(ours.latents_mean, torch.tensor(ref.config.latents_mean), rtol=0, atol=0)
    torch.testing.assert_close(ours.latents_std, torch.tensor(ref.config.latents_std), rtol=0, atol=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for T in (2 * tf + 1, 1):
            x = torch.rand(2, 3, T, 2 * s, 3 * s, generator=g) * 2 - 1
            want, got = ref.encode(x).latent_dist, ours.encode(x)
            _close(got.mean, want.mean)
            _close(got.logvar, want.logvar)
            assert want.mean.abs().max() > 0.1  # not a vacuous comparison
            z = torch.randn(want.mean.shape, generator=g)
            dec_want, dec_got = ref.decode(z).sample, ours.decode(z)
            assert dec_got.shape == dec_want.shape == x.shape
            _close(dec_got, dec_want)
            _close(ours(x, sample_posterior=False)[0], ref(x).sample)


def test_export_round_trip_loads_in_diffusers(tmp_path):
    ours = CausalVideoVAE(io.config_from_diffusers(dict(_reference(CASES["mochi-factors"], 3).config))).eval()
    with torch.no_grad():
        ours.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        ours.latents_std.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
    io.save_mochi_vae_dir(ours, tmp_path)
    ref = diffusers.AutoencoderKLMochi.from_pretrained(tmp_path).eval()
    assert ref.config.latents_std == pytest.approx([1.5, 0.5, 1.0, 2.0])
    x = torch.rand(1, 3, 7, 16, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, rtol=0, atol=ATOL)
    back = io.load_mochi_vae_dir(tmp_path)
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_mochi_flavor_is_diffusers_default_and_bad_configs_are_refused():
    assert io.config_from_diffusers({}) == FLAVORS["mochi"]
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLMochi()
        ours = CausalVideoVAE(FLAVORS["mochi"])
    ours_keys = set(io.state_dict_to_diffusers(ours.state_dict()))
    assert ours_keys == set(ref.state_dict())
    with pytest.raises(CheckpointError, match="scaling_factor=0.5 is not supported"):
        io.config_from_diffusers({"scaling_factor": 0.5})
    with pytest.raises(CheckpointError, match="act_fn='relu'"):
        io.config_from_diffusers({"act_fn": "relu"})
    with pytest.raises(CheckpointError, match="'norm_num_groups': diffusers' AutoencoderKLMochi fixes it at 32"):
        io.config_to_diffusers(FLAVORS["small"], torch.zeros(4), torch.ones(4))
    with pytest.raises(CheckpointError, match="latents_mean must list latent_channels = 12"):
        io.state_dict_from_diffusers({}, {"latents_mean": [0.0, 1.0]})
