"""Objective vlm (workbench/train/objectives/vlm.py) and its rows (workbench/data/vqa.py), on a tiny paligemma2.

Rows: the prompt is PaliGemma's (the inference builder's ids exactly), targets only on the answer and its eos,
prefix_len where the answer starts. Loss: the micro-batch's summed answer NLL over the step's global target count,
equal to a hand computation, and the same step loss for any micro-batch split. The mask: the prefix is
bidirectional and the answer causal through the real model. Decoding: the full-forward greedy decoder on
right-padded rows gives the KV-cache generator's tokens. Warm-up: frozen parts do not move under AdamW (weight
decay included), trained parts do. The job schema refuses vlm options where they do not belong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.tokenizer import train_bpe
from workbench.config import from_dict
from workbench.data.packed import IGNORE_INDEX
from workbench.data.vqa import (
    VQASample,
    collate_rows,
    encode_prompt,
    greedy_answers,
    mask_of,
    model_logits,
    normalize,
    pixel_values,
    prompt_batch,
)
from workbench.errors import ConfigError
from workbench.inference.vlm import build_prompt, generate
from workbench.job import JobConfig, OptimSection
from workbench.models.base import ModelSection, build_model
from workbench.parallel.single import SingleEngine
from workbench.train.objectives.vlm import VLMObjective, freeze_parts
from workbench.train.optim import build_optimizer

TEXTS = ["What colour is the circle?", "red", "blue", "Which gate drives Y?", "XOR", "a red circle above a blue "
         "square", "What step follows mix?", "heat", "caption"] * 4


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 300)


def tiny_model(seed: int = 0, **over):
    torch.manual_seed(seed)
    # paligemma2 debug: 28 px images in 14 px patches -> 4 image tokens; the project tokenizer's <image> is id 11
    section = ModelSection.of("paligemma2", "debug", image_token_id=11, sliding_window=0, **over)
    return build_model(section, torch.device("cpu")).eval()


def samples_of(tok, pairs, n_image=4):
    out = []
    for i, (q, a) in enumerate(pairs):
        prompt = np.asarray(encode_prompt(tok, q, n_image, 11))
        target = np.asarray(tok.encode(a, add_special_tokens=False) + [tok.eos_id])
        out.append(VQASample(i, i % 2, "t", q, a, prompt, target))
    return out


def images(n=2, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


PAIRS = [("What colour is the circle?", "red"), ("Which gate drives Y?", "XOR"), ("caption", "a red circle above "
                                                                                               "a blue square")]


def test_prompt_is_paligemmas_and_targets_are_the_answer_only(tok):
    samples = samples_of(tok, PAIRS)
    for s, (q, _) in zip(samples, PAIRS):
        assert s.prompt.tolist() == build_prompt(tok, q, 4, 11)  # what inference answers
        assert s.prompt[:4].tolist() == [11] * 4 and s.prompt[4] == tok.bos_id
        assert tok.decode(s.prompt[5:]) == q + "\n"
    b = collate_rows(samples, images(), tok.pad_id)
    T = b["input_ids"].shape[1]
    for i, s in enumerate(samples):
        n, p = len(s.prompt) + len(s.target), len(s.prompt)
        assert b["prefix_len"][i] == p and b["lengths"][i] == n
        assert b["input_ids"][i, :n].tolist() == s.prompt.tolist() + s.target.tolist()
        assert (b["input_ids"][i, n:] == tok.pad_id).all()
        keep = b["labels"][i] != IGNORE_INDEX
        # slot t predicts t + 1: targets on slots p - 1 .. n - 2 only, and they are the answer ids then eos
        assert keep.nonzero().flatten().tolist() == list(range(p - 1, n - 1))
        assert b["labels"][i, keep].tolist() == s.target.tolist()
        assert tok.decode(b["labels"][i, keep]) == PAIRS[i][1]
    mask = mask_of(b)
    assert mask.causal and mask.prefix_len.tolist() == b["prefix_len"].tolist()
    assert mask.key_padding.sum(1).tolist() == b["lengths"].tolist() and mask.key_padding.shape == (3, T)
    px = b["pixel_values"]
    assert px.shape == (3, 3, 28, 28) and px.min() >= -1 and px.max() <= 1
    assert torch.equal(px[0], pixel_values(images()[0:1])[0]) and torch.equal(px[0], px[2])  # rows 0, 2: image 0
    assert normalize("  Red \n") == "red"


def test_loss_is_the_answer_nll_over_the_step_count_for_any_split(tok):
    torch.set_num_threads(1)
    model = tiny_model()
    engine = SingleEngine(model)
    obj = VLMObjective()
    obj.tokenizer = tok
    obj.blind = False
    samples = samples_of(tok, PAIRS + [("What step follows mix?", "heat")])
    ims = images()
    whole = collate_rows(samples, ims, tok.pad_id)
    N = obj.units(whole)
    assert N == sum(len(s.target) for s in samples)
    # by hand: log-softmax of the full model's logits at the answer slots
    out = model({"input_ids": whole["input_ids"], "pixel_values": whole["pixel_values"], "mask": mask_of(whole)})
    logp = F.log_softmax(model.logits(out.hidden).double(), -1)
    hand = 0.0
    for i, s in enumerate(samples):
        p = len(s.prompt)
        for j, t in enumerate(s.target):
            hand -= float(logp[i, p - 1 + j, t])
    got = obj.loss({"policy": engine}, whole, N)
    assert got.loss.item() == pytest.approx(hand / N, rel=1e-5)
    assert got.units == {"tokens": int(whole["lengths"].sum()), "images": 4}
    # two micro-batches of the same step, each over the step's count, add up to the whole batch's loss
    parts = [collate_rows(samples[:1], ims, tok.pad_id), collate_rows(samples[1:], ims, tok.pad_id)]
    split = sum(obj.loss({"policy": engine}, mb, N).loss.item() for mb in parts)
    assert split == pytest.approx(got.loss.item(), rel=1e-5)
    # blind: the same rows with a constant image give another loss (the images matter to this model)
    obj.blind = True
    assert obj.loss({"policy": engine}, whole, N).loss.item() != pytest.approx(got.loss.item(), rel=1e-4)


def test_prefix_is_bidirectional_and_the_answer_causal(tok):
    torch.set_num_threads(1)
    model = tiny_model(1)
    (s,) = samples_of(tok, [("What colour is the circle?", "blue red")])
    b = collate_rows([s], images(1), tok.pad_id)
    p, n = int(b["prefix_len"][0]), int(b["lengths"][0])
    fn = model_logits(model)

    def logits(ids):
        return fn({**b, "input_ids": ids})

    base = logits(b["input_ids"])
    late_prefix = b["input_ids"].clone()
    late_prefix[0, p - 2] = (late_prefix[0, p - 2] + 1) % 300  # a question token near the end of the prefix
    changed = logits(late_prefix)
    assert not torch.allclose(changed[0, 4], base[0, 4])  # an earlier prefix slot sees it: bidirectional
    late_answer = b["input_ids"].clone()
    late_answer[0, n - 2] = (late_answer[0, n - 2] + 1) % 300  # an answer token
    changed = logits(late_answer)
    torch.testing.assert_close(changed[0, : n - 2], base[0, : n - 2], rtol=0, atol=0)  # nothing before sees it
    assert not torch.allclose(changed[0, n - 1], base[0, n - 1])


def test_greedy_decoder_matches_the_kv_cache_generator(tok):
    torch.set_num_threads(1)
    model = tiny_model(2)
    samples = samples_of(tok, PAIRS + [("What?", "x")])  # prompts of different lengths, right-padded together
    # (the generator left-pads them with their own positions; the greedy decoder right-pads: the same answers)
    ims = images(2, seed=3)
    batch = prompt_batch(samples, ims, tok.pad_id)
    pixels = pixel_values(ims[[s.image for s in samples]])
    prompts = [s.prompt.tolist() for s in samples]
    full = generate(model, prompts, pixels, max_new_tokens=6, pad_id=tok.pad_id)  # no stop: 6 tokens each
    assert greedy_answers(model_logits(model), batch, 6, [-1], tok.pad_id) == full
    # a stop id: each row ends before its first occurrence (the generator keeps the stop token itself)
    stop = next(t for row in full for t in row[1:] if t != row[0])  # not every row's first token
    ref = generate(model, prompts, pixels, max_new_tokens=6, eos_ids=[stop], pad_id=tok.pad_id)
    ours = greedy_answers(model_logits(model), batch, 6, [stop], tok.pad_id)
    assert ours == [r[: r.index(stop)] if stop in r else r for r in ref]
    assert ours == [r[: r.index(stop)] if stop in r else r for r in full]
    assert any(len(o) < 6 for o in ours) and any(len(o) > 0 for o in ours)


@pytest.mark.parametrize("parts, moving", [("projector", {"multi_modal_projector"}),
                                           ("vision", {"multi_modal_projector", "vision_tower"}),
                                           ("all", {"multi_modal_projector", "vision_tower", "language_model"})])
def test_frozen_parts_do_not_move(tok, parts, moving):
    torch.set_num_threads(1)
    model = tiny_model(3).train()
    counts = freeze_parts(model, parts)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in moving)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.1))
    engine = SingleEngine(model, opt)
    obj = VLMObjective()
    obj.tokenizer, obj.blind = tok, False
    b = collate_rows(samples_of(tok, PAIRS), images(), tok.pad_id)
    for _ in range(2):
        obj.loss({"policy": engine}, b, obj.units(b)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n.split(".")[0] not in moving:
            assert torch.equal(p, before[n]), n
    for top in moving:
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(top + "."))


def job(**over):
    base = {"model": {"family": "paligemma2", "flavor": "debug", "image_token_id": 11},
            "objective": {"name": "vlm"}, "data": {"dir": "x", "vocab_size": 300}}
    for key, value in over.items():
        section, field = key.split("__")
        base.setdefault(section, {})[field] = value
    return from_dict(JobConfig, base)


def test_job_schema_for_vlm():
    assert job(objective__train_parts="projector").objective.train_parts == "projector"
    with pytest.raises(ConfigError, match="model.family"):
        from_dict(JobConfig, {"objective": {"name": "vlm"}, "data": {"dir": "x"}})  # llama3
    with pytest.raises(ConfigError, match="data.train_file"):
        job(data__train_file="a.jsonl")
    with pytest.raises(ConfigError, match="train_parts"):
        job(objective__name="sft", objective__train_parts="projector", data__train_file="a.jsonl")
    with pytest.raises(ConfigError, match="train_parts"):
        job(objective__train_parts="text")
    with pytest.raises(ConfigError, match="parallel.tp"):
        job(parallel__tp=2)
