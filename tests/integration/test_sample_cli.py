"""`workbench sample` on a tiny diffusers Stable Diffusion folder gives diffusers' image for the same seed.

The folder is a `StableDiffusionPipeline` assembled from tiny random components (UNet, VAE, CLIP text model),
a CLIP tokenizer whose vocab.json/merges.txt are learned here, and a DDIM scheduler with SD's settings,
written by `save_pretrained`. Tolerance: the float image before 8-bit quantisation within 1e-4 of diffusers'
(`output_type="np"`), and the PNG's pixels within 1/255 of diffusers' PIL image (a value can sit on a
rounding boundary)."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from workbench.checkpoint.hf.diffusers_sd import load_sd_dir  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.models.diffusion import clip_tokenizer as ct  # noqa: E402
from workbench.models.diffusion.pipeline import sample_from  # noqa: E402

CORPUS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere", "a cat on a mat, oil painting",
          "blurry, low quality, watermark", "the quick brown fox jumps over the lazy dog"]
PROMPT = "a photograph of an astronaut riding a horse"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd")
    vocab, merges = ct.learn_bpe(CORPUS, 200)
    ct.save_vocab(root / "tok-src", vocab, merges)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tok-src")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=4)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=1000,
        bos_token_id=vocab[ct.BOS], eos_token_id=vocab[ct.EOS], pad_token_id=vocab[ct.EOS]))
    # larger random weights than the default init, so the image has structure worth comparing
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (unet, vae):
            for name, p in m.named_parameters():
                if p.ndim > 1 and "conv_out" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    return root / "sd"


def _reference(sd_dir, *, steps, guidance, seed, negative=None, scheduler="ddim", eta=0.0, size=32, rescale=0.0,
               output="np"):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    if scheduler == "ddpm":
        pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(eta=eta) if scheduler == "ddim" else {}
    out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, height=size,
               width=size, generator=torch.Generator("cpu").manual_seed(seed), output_type=output,
               guidance_rescale=rescale, **kw)
    return out.images


CASES = [
    dict(steps=4, guidance=7.5, seed=0),
    dict(steps=3, guidance=3.0, seed=5, negative="blurry, low quality", eta=0.7),
    dict(steps=3, guidance=1.0, seed=2, size=24),  # no guidance: one UNet call per step
    dict(steps=3, guidance=5.0, seed=3, scheduler="ddpm", rescale=0.7),  # with guidance rescale
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_sample_cli_gives_the_diffusers_image(sd_dir, tmp_path, capsys, i):
    from PIL import Image

    case = CASES[i]
    size = case.get("size", 32)
    out = tmp_path / "img.png"
    argv = ["sample", "--hf-dir", str(sd_dir), "--prompt", PROMPT, "--steps", str(case["steps"]),
            "--guidance", str(case["guidance"]), "--seed", str(case["seed"]), "--out", str(out), "--device", "cpu",
            "--height", str(size), "--width", str(size), "--scheduler", case.get("scheduler", "ddim"),
            "--eta", str(case.get("eta", 0.0))]
    if case.get("negative"):
        argv += ["--negative-prompt", case["negative"]]
    if case.get("rescale"):
        argv += ["--guidance-rescale", str(case["rescale"])]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    want_pil = np.asarray(_reference(sd_dir, **case, output="pil")[0])
    got_png = np.asarray(Image.open(out).convert("RGB"))
    assert got_png.shape == want_pil.shape == (size, size, 3)
    assert np.abs(got_png.astype(int) - want_pil.astype(int)).max() <= 1
    # before quantisation, through the library call the CLI makes
    want = _reference(sd_dir, **case)[0]
    assert want.std() > 0.02  # an image with structure, not a flat field
    comps = load_sd_dir(sd_dir)
    got = sample_from(comps, PROMPT, negative_prompt=case.get("negative"), steps=case["steps"], guidance=case["guidance"],
                      seed=case["seed"], height=size, width=size, scheduler=case.get("scheduler", "ddim"),
                      eta=case.get("eta", 0.0), guidance_rescale=case.get("rescale", 0.0))[0].numpy()
    assert np.abs(got - want).max() < 1e-4
    if i == 0:  # another seed is another image
        other = sample_from(comps, PROMPT, steps=case["steps"], guidance=case["guidance"], seed=1, height=32, width=32)
        assert np.abs(other[0].numpy() - got).max() > 0.05


def test_sample_cli_bad_inputs(sd_dir, tmp_path, capsys):
    import shutil

    def err(argv):
        assert main(argv) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("error: ") and "\n" not in msg
        return msg

    base = ["sample", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--steps", "1"]
    assert "multiple of 8" in err([*base, "--hf-dir", str(sd_dir), "--height", "30"])
    assert "--steps" in err(["sample", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--steps", "0",
                             "--hf-dir", str(sd_dir)])
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    assert "vae/" in err([*base, "--hf-dir", str(broken)])
    pickled = tmp_path / "pickled"
    shutil.copytree(sd_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    assert "diffusion_pytorch_model.bin" in err([*base, "--hf-dir", str(pickled)])
    cfg = json.loads((sd_dir / "unet" / "config.json").read_text())
    odd = tmp_path / "odd"
    shutil.copytree(sd_dir, odd)
    (odd / "unet" / "config.json").write_text(json.dumps({**cfg, "class_embed_type": "timestep"}))
    assert "class_embed_type" in err([*base, "--hf-dir", str(odd)])
    assert "model_index.json" in err([*base, "--hf-dir", str(tmp_path)])


def test_half_precision_load_keeps_the_vae_in_float32(sd_dir):
    """--dtype float16: UNet and CLIP in float16, the VAE upcast (diffusers' force_upcast); the image stays
    close to the float32 one."""
    half = load_sd_dir(sd_dir, dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16 and half.text_encoder.final_layer_norm.weight.dtype == torch.float16
    assert half.vae.decoder.conv_out.weight.dtype == torch.float32
    kw = dict(steps=3, guidance=7.5, seed=0, height=32, width=32)
    got = sample_from(half, PROMPT, **kw)
    want = sample_from(load_sd_dir(sd_dir), PROMPT, **kw)
    assert torch.isfinite(got).all() and (got - want).abs().mean() < 0.02


def test_sharded_weights_load(sd_dir, tmp_path):
    """A UNet saved in shards (diffusion_pytorch_model.safetensors.index.json) loads to the same weights."""
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(sd_dir, sharded)
    shutil.rmtree(sharded / "unet")
    diffusers.UNet2DConditionModel.from_pretrained(sd_dir / "unet").save_pretrained(sharded / "unet", max_shard_size="50KB")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1
    a, b = load_sd_dir(sd_dir).unet.state_dict(), load_sd_dir(sharded).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
