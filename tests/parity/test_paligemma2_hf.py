"""PaliGemma 2 and SigLIP parity with transformers on tiny random configs (fp32, eager attention).

SigLIP: every hidden state and the last one. PaliGemma (Gemma 2 text config): logits and hidden states
with the training mask (labels + token_type_ids), the inference prefill mask and the plain causal one; a
batch of two with left padding; sliding layers whose window (4) is shorter than the sequence; soft-caps
small enough to bite (attention 0.7, final 2). Then the KV cache (prefill + decode == one forward), greedy
generation against transformers' `generate` (left-padded batch), preprocessing and prompt ids against the
processors, and the HF directory round trip (import, export bit for bit, transformers reloads the export).
"""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from conftest import PALIGEMMA2_IMAGE_TOKEN, make_hf_paligemma2_dir, save_test_tokenizer  # noqa: E402
from conftest import make_hf_paligemma2 as make_hf  # noqa: E402

from workbench.checkpoint.hf.paligemma2 import config_from_hf, state_dict_from_hf  # noqa: E402
from workbench.models.paligemma2 import PaliGemma2  # noqa: E402
from workbench.nn.attention import MaskSpec  # noqa: E402

IMAGE_TOKEN, BOS, N_IMG = PALIGEMMA2_IMAGE_TOKEN, 0, 4  # <image> x 4: 28 px / 14 px patches -> 2 x 2


def ours_from(hf_model, backend: str = "sdpa") -> PaliGemma2:
    cfg = config_from_hf(hf_model.config.to_dict())
    cfg.attn_backend = backend
    cfg.vision.attn_backend = backend
    model = PaliGemma2(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model


def rows(seed: int = 0, lens=(13, 10), prefix=(9, 7), vocab: int = 320):
    """Left-padded rows: <image> x 4, bos, random text; `prefix` real tokens of each row are the prefix."""
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.full((len(lens), T), 2, dtype=torch.long)
    att = torch.zeros(len(lens), T, dtype=torch.long)
    tt = torch.ones(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        row = torch.randint(12, vocab, (n,), generator=g)
        row[:N_IMG], row[N_IMG] = IMAGE_TOKEN, BOS
        ids[b, T - n:], att[b, T - n:] = row, 1
        tt[b, : T - n + prefix[b]] = 0
    pos = (att.cumsum(-1) - 1).clamp(min=0)  # HF's positions for padded rows (before PaliGemma's + 1)
    pix = torch.randn(len(lens), 3, 28, 28, generator=g)
    return ids, att, tt, pos, pix


# ------------------------------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_siglip_hidden_states_match(backend):
    hf = make_hf()
    ours = ours_from(hf, backend)
    pix = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ref = hf.model.vision_tower(pix, output_hidden_states=True)
        last, states = ours.vision_tower(pix, output_hidden_states=True)
    assert len(states) == len(ref.hidden_states) == 3
    for a, b in zip(states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert (last - ref.last_hidden_state).abs().max() < 1e-5 < last.abs().max()


def test_siglip_rejects_wrong_image_size():
    ours = ours_from(make_hf())
    with pytest.raises(ValueError, match=r"pixel_values: expected \(B, 3, 28, 28\)"):
        ours.vision_tower(torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------- PaliGemma


def _check_forward(hf, ours, ids, att, tt, pos, pix, mask, labels: bool):
    kw = dict(input_ids=ids, pixel_values=pix, attention_mask=att, position_ids=pos + 1, output_hidden_states=True)
    if tt is not None:
        kw["token_type_ids"] = tt
    if labels:
        kw["labels"] = torch.where(tt == 1, ids, -100)
    with torch.no_grad():
        ref = hf(**kw)
        out = ours({"input_ids": ids, "pixel_values": pix, "positions": pos + 1, "mask": mask,
                    "output_hidden_states": True})
        logits = ours.logits(out.hidden)
    real = att.bool()
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden[real], ref.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    return logits, ref.logits


@pytest.mark.parametrize("backend", ["sdpa", "math", "flex"])
def test_paligemma_logits_match_with_every_mask(backend):
    """Training mask (labels), inference prefill (token_type_ids, whole prompt as prefix), causal; padded batch."""
    hf = make_hf()
    ours = ours_from(hf, backend)
    ids, att, tt, pos, pix = rows()
    pad = (att == 0).sum(-1)
    kp = att.bool()
    # training: prefix = image + bos + question + "\n" (the first `prefix` real tokens), suffix causal
    prefix_slots = pad + torch.tensor([9, 7])
    _check_forward(hf, ours, ids, att, tt, pos, pix, MaskSpec(prefix_len=prefix_slots, key_padding=kp), labels=True)
    # inference prefill: every real token is prefix
    tt_all = torch.zeros_like(tt)
    full = torch.full((2,), ids.shape[1])
    _check_forward(hf, ours, ids, att, tt_all, pos, pix, MaskSpec(prefix_len=full, key_padding=kp), labels=False)
    # no token_type_ids: transformers is plain causal, and so is our default spec (plus padding)
    lg, ref = _check_forward(hf, ours, ids, att, None, pos, pix, MaskSpec(key_padding=kp), labels=False)
    real = att.bool()
    assert (lg - ref)[real].abs().max() < 1e-5 < lg[real].std()


def test_the_mask_features_actually_bite():
    """Each feature the parity test covers changes the logits when removed, so the parity is not vacuous."""
    hf = make_hf()
    ours = ours_from(hf)
    ids, att, tt, pos, pix = rows(lens=(13, 13), prefix=(9, 9))
    T = ids.shape[1]

    def logits(model, mask):
        with torch.no_grad():
            return model.logits(model({"input_ids": ids, "pixel_values": pix, "positions": pos + 1,
                                       "mask": mask}).hidden)

    base = logits(ours, MaskSpec(prefix_len=torch.tensor([9, 9])))
    assert (base - logits(ours, MaskSpec())).abs().max() > 1e-3  # prefix-LM vs causal
    cfg = ours.cfg
    for change in (dict(sliding_window=0), dict(attn_softcap=0.0), dict(final_softcap=0.0)):
        other = PaliGemma2(type(cfg)(**{**cfg.__dict__, **change})).eval()
        other.load_state_dict(ours.state_dict())
        assert (base - logits(other, MaskSpec(prefix_len=torch.tensor([9, 9])))).abs().max() > 1e-3, change
    assert T > cfg.sliding_window + 4  # the window is shorter than the suffix part of the sequence


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_math_backend_is_bit_equal_to_eager_in_bf16_and_float64(dtype):
    """The same operations in the same order as transformers' eager path: equal logits, not close ones (the
    (1 + w) norm in fp32, sqrt(d) rounded through float32, soft-caps and softmax as eager does them)."""
    hf = make_hf()
    freqs = {n: b.clone() for n, b in hf.named_buffers() if n.endswith("inv_freq")}
    hf = hf.to(dtype)
    for n, b in freqs.items():  # `.to` rounds transformers' RoPE buffer too; from_pretrained(dtype=) does not
        hf.get_submodule(n.rpartition(".")[0]).inv_freq = b
    ours = ours_from(hf, "math")
    for p in ours.parameters():
        p.data = p.data.to(dtype)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), ours.cfg), strict=True)
    ids, att, tt, pos, pix = rows(lens=(12, 12), prefix=(8, 6))
    pix = pix.to(dtype)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix, token_type_ids=tt).logits
        got = ours.logits(ours({"input_ids": ids, "pixel_values": pix,
                                "mask": MaskSpec(prefix_len=torch.tensor([8, 6]))}).hidden)
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_layer_types_from_the_config_are_followed():
    types = ["full_attention", "sliding_attention", "sliding_attention"]
    hf = make_hf(layer_types=types)
    ours = ours_from(hf)
    assert [ours.cfg.sliding(i) for i in range(3)] == [False, True, True]
    ids, att, tt, pos, pix = rows(seed=1)
    _check_forward(hf, ours, ids, att, tt, pos, pix,
                   MaskSpec(prefix_len=(att == 0).sum(-1) + torch.tensor([9, 7]), key_padding=att.bool()), labels=True)


def test_layer_masks_keep_global_layers_global_whatever_the_callers_window():
    from workbench.models.paligemma2 import FLAVORS

    model = PaliGemma2(FLAVORS["debug"])
    cfg = model.cfg
    assert [cfg.sliding(i) for i in range(cfg.n_layers)] == [True, False]
    for given, want in ((None, cfg.sliding_window), (2, 2)):
        spec = MaskSpec(prefix_len=torch.tensor([5]), sliding_window=given)
        sliding, full = model.language_model.layer_masks(spec)
        assert (sliding.sliding_window, full.sliding_window) == (want, None)
        assert sliding.soft_cap == full.soft_cap == cfg.attn_softcap and full.prefix_len is spec.prefix_len


def test_embed_then_inputs_embeds_equals_input_ids_and_text_only_forward():
    hf = make_hf()
    ours = ours_from(hf)
    ids, att, tt, pos, pix = rows(lens=(12, 12), prefix=(8, 8))
    mask = MaskSpec(prefix_len=torch.tensor([8, 8]))
    with torch.no_grad():
        a = ours({"input_ids": ids, "pixel_values": pix, "mask": mask}).hidden
        b = ours({"inputs_embeds": ours.embed(ids, pix), "mask": mask}).hidden
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        # image slots hold the projector output unscaled; text slots E * sqrt(d)
        emb = ours.embed(ids, pix)
        torch.testing.assert_close(emb[:, :N_IMG], ours.image_features(pix), atol=0, rtol=0)
        # text only: no placeholder replaced, same as transformers without pixel_values
        ref = hf(input_ids=ids[:, N_IMG:]).logits
        got = ours.logits(ours({"input_ids": ids[:, N_IMG:]}).hidden)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image placeholders"):
        ours.embed(ids[:, 1:], pix)


def test_kv_cache_prefill_and_decode_equal_one_forward():
    """Bidirectional prefill of the prompt, then causal decode steps == one forward with prefix_len = prompt."""
    ours = ours_from(make_hf())
    ids, att, tt, pos, pix = rows(lens=(14, 11), prefix=(9, 7))
    P, T = 9, ids.shape[1]  # prompt slots (row 1's padding included: its prefix ends at slot 3 + 7 - 1 = 9)
    prefix = torch.tensor([P, P])
    kp = att.bool()
    with torch.no_grad():
        full = ours({"input_ids": ids, "pixel_values": pix, "positions": pos + 1,
                     "mask": MaskSpec(prefix_len=prefix, key_padding=kp)}).hidden
        cache = ours.make_kv_cache(2, T)
        parts = [ours({"input_ids": ids[:, :P], "pixel_values": pix, "positions": pos[:, :P] + 1, "kv_cache": cache,
                       "mask": MaskSpec(prefix_len=prefix, key_padding=kp[:, :P])}).hidden]
        for t in range(P, T):
            parts.append(ours({"input_ids": ids[:, t:t + 1], "positions": pos[:, t:t + 1] + 1, "kv_cache": cache,
                               "mask": MaskSpec(key_padding=kp[:, :t + 1])}).hidden)
    torch.testing.assert_close(torch.cat(parts, 1)[kp], full[kp], atol=1e-5, rtol=1e-5)
    assert T - P > ours.cfg.sliding_window  # decode steps run past the window


def test_greedy_generate_matches_transformers_on_a_left_padded_batch():
    from workbench.inference.vlm import generate

    hf = make_hf()
    ours = ours_from(hf)
    ids, att, tt, pos, pix = rows(lens=(12, 9), prefix=(12, 9))
    n = 10
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=att, token_type_ids=torch.zeros_like(tt), pixel_values=pix,
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)[:, ids.shape[1]:]
    prompts = [ids[b, att[b].bool()].tolist() for b in range(2)]
    got = generate(ours, prompts, pix, max_new_tokens=n, temperature=0.0)
    assert got == ref.tolist()
    assert len(set(got[0])) > 1  # not a degenerate repeat of one token


def test_vlm_generator_protocol_matches_transformers_and_each_row_alone():
    from workbench.inference.generator import Generator, SamplingParams
    from workbench.inference.vlm import ImagePrompt, VLMGenerator

    hf = make_hf()
    ours = ours_from(hf)
    ids, att, tt, pos, pix = rows(lens=(12, 9), prefix=(12, 9))
    n = 10
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=att, token_type_ids=torch.zeros_like(tt), pixel_values=pix,
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2,
                          output_scores=True, return_dict_in_generate=True)
    gen = VLMGenerator(ours, eos_ids=[])
    assert isinstance(gen, Generator)
    prompts = [ImagePrompt(ids[b, att[b].bool()].tolist(), pix[b]) for b in range(2)]
    got = gen.generate(prompts, SamplingParams(max_new_tokens=n))
    assert [c.tokens for c in got] == ref.sequences[:, ids.shape[1]:].tolist()
    want = torch.stack([torch.log_softmax(s.float(), -1) for s in ref.scores], 1)  # (B, n, V)
    for b, c in enumerate(got):
        torch.testing.assert_close(torch.tensor(c.logprobs), want[b].gather(1, torch.tensor(c.tokens)[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-5)
        assert c.finish_reason == "length" and c.prompt_tokens == list(prompts[b])
    # per-row params: a seeded sampled row and a text-only row compute what they compute alone
    text_only = ImagePrompt(prompts[1][N_IMG:])  # its bos and text, no placeholder
    alone = gen.generate([text_only], SamplingParams(max_new_tokens=6))[0].tokens
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, top_k=40, seed=5),
              SamplingParams(max_new_tokens=6, stop_token_ids=[alone[2]])]
    both = gen.generate([prompts[0], text_only], params)
    assert both[0].tokens == gen.generate([prompts[0]], params[0])[0].tokens != got[0].tokens[:8]
    assert both[1].tokens == alone[: alone.index(alone[2]) + 1] and both[1].finish_reason == "stop"


def test_sampling_is_seeded_and_stops_at_eos():
    from workbench.inference.vlm import generate

    ours = ours_from(make_hf())
    ids, att, tt, pos, pix = rows(lens=(10,), prefix=(10,))
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(ours, ids, pix, seed=3, **kw)
    assert a == generate(ours, ids, pix, seed=3, **kw) and a != generate(ours, ids, pix, seed=4, **kw)
    greedy = generate(ours, ids, pix, max_new_tokens=12)[0]
    stop = generate(ours, ids, pix, max_new_tokens=12, eos_ids=[greedy[2]])[0]
    assert stop == greedy[: greedy.index(greedy[2]) + 1]


# ------------------------------------------------------------------------------------------ processors


def _processor(tmp_path, size=28):
    save_test_tokenizer(tmp_path)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    image_proc = transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
    image_proc.image_seq_length = (size // 14) ** 2
    return transformers.PaliGemmaProcessor(image_processor=image_proc, tokenizer=fast)


def test_preprocess_and_prompt_ids_equal_the_paligemma_processor(tmp_path):
    from PIL import Image

    from workbench.data.tokenizer import Tokenizer
    from workbench.inference.vlm import build_prompt, preprocess

    proc = _processor(tmp_path)
    ours_tok = Tokenizer.from_hf_dir(tmp_path)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (53, 37, 4), dtype=np.uint8), "RGBA")
    images = {"RGBA 37x53": rgba, "L 300x17": Image.fromarray(rng.integers(0, 256, (17, 300), dtype=np.uint8), "L"),
              "P": rgba.convert("RGB").convert("P"), "CMYK": rgba.convert("CMYK"), "RGB 28x28": rgba.convert("RGB").crop((0, 0, 28, 28))}
    for prompt in ("caption en", "what is the gate's output?", " two  spaces\tand tab"):
        for name, img in images.items():
            ref = proc(images=img, text="<image>" + prompt, return_tensors="pt")
            got = preprocess(img, 28)
            assert got.dtype == ref["pixel_values"].dtype == torch.float32
            torch.testing.assert_close(got, ref["pixel_values"][0], atol=0, rtol=0, msg=name)
        ids = build_prompt(ours_tok, prompt, N_IMG, IMAGE_TOKEN)
        assert ids == ref["input_ids"][0].tolist(), prompt
        assert ref["token_type_ids"][0].tolist() == [0] * len(ids)  # the whole prompt is prefix


# ------------------------------------------------------------------------------------------ HF directories


def test_hf_dir_import_export_round_trip(tmp_path):
    from workbench.checkpoint.hf import export_hf_dir, load_hf_dir
    from workbench.checkpoint.safetensors_io import read_dir

    src = make_hf_paligemma2_dir(tmp_path / "src")
    model, tok, section = load_hf_dir(src)
    assert section.family == "paligemma2" and section.config.image_token_id == IMAGE_TOKEN
    out = export_hf_dir(model, section, tok, tmp_path / "out", tokenizer_source=src)
    a, b = read_dir(src), read_dir(out)
    a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # transformers reads the export and computes the same logits as the source and as ours
    ids, att, tt, pos, pix = rows(lens=(10,), prefix=(10,))
    with torch.no_grad():
        ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(src, attn_implementation="eager").eval()
        back = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
        want = ref(input_ids=ids, pixel_values=pix, token_type_ids=torch.zeros_like(tt)).logits
        got = back(input_ids=ids, pixel_values=pix, token_type_ids=torch.zeros_like(tt)).logits
        mine = model.logits(model({"input_ids": ids, "pixel_values": pix, "mask": MaskSpec(prefix_len=torch.tensor([10]))}).hidden)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5)
    # and importing the export gives the same model again
    again, _, section2 = load_hf_dir(out)
    assert section2.config == section.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_hub_layout_and_config_errors():
    """The hub's older tensor names (vision_tower.vision_model.*) load too; unsupported configs name the field."""
    from workbench.errors import CheckpointError

    hf = make_hf()
    cfg = config_from_hf(hf.config.to_dict())
    hub = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("model.")
        k = k.replace("vision_tower.", "vision_tower.vision_model.").replace("language_model.", "language_model.model.")
        hub[k] = v
    ours = PaliGemma2(cfg)
    ours.load_state_dict(state_dict_from_hf(hub, cfg), strict=True)
    with pytest.raises(CheckpointError, match="unexpected tensor 'vision_tower.head.probe'"):
        state_dict_from_hf({**hub, "vision_tower.head.probe": torch.zeros(1)}, cfg)
    d = hf.config.to_dict()
    for change, match in ((dict(text_config={**d["text_config"], "model_type": "gemma"}), "text_config.model_type"),
                          (dict(vision_config={**d["vision_config"], "vision_use_head": True}), "vision_use_head"),
                          (dict(projection_dim=32), "projection_dim"),
                          (dict(text_config={**d["text_config"], "num_key_value_heads": 3}), "num_key_value_heads")):
        with pytest.raises(CheckpointError, match=match):
            config_from_hf(json.loads(json.dumps({**d, **change})))


# the hub's config.json of google/paligemma2-3b-pt-224 (fields as published: the text config lists only
# what differs from Gemma 2's defaults)
HUB_3B_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2304,
    "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
                    "num_image_tokens": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "torch_dtype": "bfloat16", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "image_size": 224, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_image_tokens": 256, "patch_size": 14, "projection_dim": 2304,
                      "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}


def test_hub_config_gives_the_3B_flavor_and_configs_round_trip():
    from workbench.checkpoint.hf.paligemma2 import config_to_hf
    from workbench.config import to_dict
    from workbench.models.base import ModelSection

    cfg = config_from_hf(HUB_3B_224)
    flavor = ModelSection.of("paligemma2", "3B").config
    assert cfg == flavor
    assert cfg.num_image_tokens == 256 and [cfg.sliding(i) for i in range(4)] == [True, False, True, False]
    # our config -> config.json -> our config, and through the TOML dict of a run folder
    for name in ("debug", "small", "3B", "10B", "28B"):
        c = ModelSection.of("paligemma2", name).config
        assert config_from_hf(config_to_hf(c)) == dataclass_with_layer_types(c)
        section = ModelSection.of("paligemma2", name)
        assert ModelSection.from_config_dict(to_dict(section)).config == c


def dataclass_with_layer_types(c):
    import dataclasses

    return dataclasses.replace(c, layer_types=["sliding_attention" if c.sliding(i) else "full_attention"
                                               for i in range(c.n_layers)])


def test_meta_build_init_and_config_errors():
    from workbench.errors import ConfigError
    from workbench.models.base import ModelSection, build_model

    model = build_model(ModelSection.of("paligemma2", "debug"))  # meta, to_empty, init_weights
    assert model.language_model.layers[0].post_ffn_norm.weight.abs().sum() == 0  # (1 + w) starts at 1
    ids = torch.tensor([[IMAGE_TOKEN] * N_IMG + [BOS, 20, 21, 22]])
    with torch.no_grad():
        out = model({"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28)})
        assert torch.isfinite(model.logits(out.hidden)).all()
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.language_model.named_parameters() if p.ndim == 2 and "embed" not in name)
    lm = 6 * (n + cfg.vocab_size * cfg.dim) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 64
    assert model.flops_per_token(64) > lm  # the image side is counted on top
    for over, key in ((dict(layer_types=["full_attention"]), "layer_types"),
                      (dict(layer_types=["global"] * 2), "layer_types[0]"),
                      (dict(n_kv_heads=3), "n_kv_heads"), (dict(vision={"patch_size": 5}), "vision.patch_size")):
        with pytest.raises(ConfigError, match=rf"model\.{re_escape(key)}"):
            ModelSection.of("paligemma2", "debug", **over)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_parity_benchmark_smoke(tmp_path):
    """benchmarks/paligemma2_parity.py still runs: math rows equal in every dtype, the speed table, the picture."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = str(root / "benchmarks" / "paligemma2_parity.py")
    png = tmp_path / "masks.png"
    res = subprocess.run([sys.executable, script, "--smoke", "--masks", str(png)], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr
    math_rows = [line.split() for line in res.stdout.splitlines() if line.split()[1:2] == ["math"]]
    assert [r[0] for r in math_rows] == ["float64", "float32", "bfloat16"]
    assert all(float(x) == 0.0 for r in math_rows for x in r[2:5])
    assert "prefill forward" in res.stdout and "greedy generate" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
