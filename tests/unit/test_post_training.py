"""Post-training pieces against hand-computed tensors: the chat template, examples and their batches, SFT's
normalization, chunked log-probs, the DPO loss and its three reference sources, the distillation divergences."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.tokenizer import train_bpe
from workbench.data.chat import ChatTemplate, messages_of
from workbench.data.examples import ExampleSet
from workbench.data.packed import IGNORE_INDEX
from workbench.errors import DataError
from workbench.models.base import ModelSection, build_model
from workbench.parallel.single import SingleEngine
from workbench.train.objectives.distill import DistillObjective, divergence
from workbench.train.objectives.dpo import DPOObjective, dpo_loss
from workbench.train.objectives.logprobs import sequence_logprobs, target_logprobs
from workbench.train.objectives.sft import SFTObjective

TEXTS = ["def add(a, b):\n    return a + b\n", "What is 2 + 3? The answer is 5.", "Sort these numbers: 3, 1, 2."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 300)


@pytest.fixture(scope="module")
def template(tok):
    return ChatTemplate(tok)


def tiny(seed=0, **over):
    torch.manual_seed(seed)
    return build_model(ModelSection.of("llama3", "debug", **over))


def objective_cfg(**over):
    base = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0, logprob_chunk=0, precompute_reference=False,
                precompute_batch=4, divergence="forward_kl", temperature=1.0, alpha=0.5, jsd_beta=0.5)
    return SimpleNamespace(**{**base, **over})


def job_for(train_file=""):
    return SimpleNamespace(data=SimpleNamespace(train_file=train_file))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CONVS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                       {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 3 + 3?"},
                       {"role": "assistant", "content": "The answer is 6."}]},
         {"prompt": "Sort these numbers: 3, 1, 2.", "response": "1, 2, 3"},
         {"prompt": "def add(a, b):", "response": "    return a + b"}]
PAIRS = [{"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "6"},
         {"prompt": [{"role": "user", "content": "Sort 3, 1, 2."}], "chosen": "1, 2, 3", "rejected": "3, 2, 1 no"},
         {"prompt": "def add(a, b):", "chosen": "    return a + b", "rejected": "    return a - b"}]


# ---- chat template ------------------------------------------------------------------------------


def test_template_equals_encoding_the_rendered_text_and_marks_only_assistant_turns(tok, template):
    messages = messages_of(CONVS[0])
    enc = template.encode(messages)
    # the rendered string (bos spelled out) encoded at once gives the same ids
    assert enc.ids == tok.encode(template.render(messages), add_special_tokens=False)
    trained = [i for i, t in zip(enc.ids, enc.targets) if t]
    # the two assistant texts and each one's closing <|end|>
    expected = (tok.encode("5", add_special_tokens=False) + [template.end_id]
                + tok.encode("The answer is 6.", add_special_tokens=False) + [template.end_id])
    assert trained == expected
    last = template.encode(messages, train_on="last")
    assert [i for i, t in zip(last.ids, last.targets) if t] == expected[len(tok.encode("5", add_special_tokens=False)) + 1:]
    prompt = template.prompt_ids(messages[:2])
    assert prompt[-1] == template.role_ids["assistant"] and prompt[:-1] == template.encode(messages[:2]).ids
    assert template.end_id in template.stop_ids and tok.eos_id in template.stop_ids


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system message may only"),
    ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
    ({"text": "no conversation"}, "expected 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "a", "response": "done<|end|><|user|>more"}, "reserved token '<|user|>'|reserved token '<|end|>'"),
])
def test_bad_conversations_are_refused_naming_the_problem(record, match):
    with pytest.raises(DataError, match=match):
        messages_of(record, "f.jsonl:3")


def test_a_tokenizer_without_the_reserved_tokens_has_no_chat_template():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from workbench.data.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    with pytest.raises(DataError, match="reserved tokens"):
        ChatTemplate(Tokenizer(backend))


# ---- examples and batches -----------------------------------------------------------------------


def test_padded_conversation_labels_are_the_next_target_token(tmp_path, template):
    path = write_jsonl(tmp_path / "c.jsonl", CONVS)
    data = ExampleSet(path, "chat", template, seq_len=128, shuffle=False, log=lambda *_: None)
    batch = data.batch([1, 2])
    for b, ex in enumerate(data.examples[1:3]):
        n = len(ex.ids) - 1
        assert batch["input_ids"][b, :n].tolist() == ex.ids[:-1].tolist()
        want = [int(y) if t else IGNORE_INDEX for y, t in zip(ex.ids[1:], ex.targets[1:])]
        assert batch["labels"][b, :n].tolist() == want
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()  # padding is never a target
    assert batch["lengths"].tolist() == [len(e.ids) - 1 for e in data.examples[1:3]]


def test_packing_keeps_every_target_and_gives_the_padded_loss(tmp_path, template):
    path = write_jsonl(tmp_path / "c.jsonl", CONVS * 3)
    kw = dict(seq_len=64, shuffle=False, log=lambda *_: None)
    padded = ExampleSet(path, "chat", template, **kw).batch(range(9))
    packed = ExampleSet(path, "chat", template, pack=True, **kw).batch(range(9))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] and packed["input_ids"].shape[1] <= 64
    assert sorted(padded["labels"][padded["labels"] != IGNORE_INDEX].tolist()) == \
        sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist())
    # positions restart at each conversation; padding is a document of its own
    docs, pos = packed["document_ids"], packed["positions"]
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert (pos[starts & (docs >= 0)] == 0).all()
    obj, model = SFTObjective(), tiny()
    engine = SingleEngine(model)
    losses = [float(obj.loss({"policy": engine}, b, obj.units(b)).loss) for b in (padded, packed)]
    assert obj.units(padded) == obj.units(packed)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_sft_loss_is_normalized_by_the_step_count_whatever_the_accumulation(tmp_path, template):
    """1 x 6 and 3 x 2 micro-batches give the same gradient when each sum is divided by the global count; dividing
    by each micro-batch's own count (a per-micro-batch mean) does not."""
    path = write_jsonl(tmp_path / "c.jsonl", CONVS * 2)
    data = ExampleSet(path, "chat", template, seq_len=128, shuffle=False, log=lambda *_: None)
    obj = SFTObjective()

    def grads(splits, global_count=True):
        model = tiny(seed=1)
        engine = SingleEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
        mbs = [data.batch(s) for s in splits]
        total = sum(obj.units(mb) for mb in mbs)
        for mb in mbs:
            units = total if global_count else obj.units(mb) * len(mbs)
            obj.loss({"policy": engine}, mb, units).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = grads([range(6)])
    assert torch.allclose(grads([range(0, 2), range(2, 4), range(4, 6)]), whole, atol=1e-6)
    assert not torch.allclose(grads([range(0, 2), range(2, 4), range(4, 6)], global_count=False), whole, atol=1e-4)


def test_sample_order_visits_every_example_once_per_epoch_and_is_reproducible(tmp_path, template):
    path = write_jsonl(tmp_path / "c.jsonl", CONVS * 4)
    data = ExampleSet(path, "chat", template, seq_len=128, seed=3, log=lambda *_: None)
    n = len(data)
    for epoch in range(2):
        assert sorted(data.sample(epoch * n + k).index for k in range(n)) == list(range(n))
    again = ExampleSet(path, "chat", template, seq_len=128, seed=3, log=lambda *_: None)
    assert [data.sample(g).index for g in range(2 * n)] == [again.sample(g).index for g in range(2 * n)]
    assert [data.sample(g).index for g in range(n)] != [data.sample(g).index for g in range(n, 2 * n)]


def test_pairs_batch_holds_chosen_then_rejected_with_targets_on_the_completions(tmp_path, template, tok):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    data = ExampleSet(path, "pairs", template, seq_len=128, shuffle=False, log=lambda *_: None)
    batch = data.batch([0, 1])
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [0, 1]
    for row, (i, side) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        want = tok.encode(PAIRS[i][side], add_special_tokens=False) + [template.end_id]
        got = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert got == want


def test_pairs_equal_once_cut_are_dropped_and_non_utf8_lines_are_named(tmp_path, template):
    same_start = {"prompt": "Hi", "chosen": "The answer is 5. " * 30 + "yes", "rejected": "The answer is 5. " * 30 + "no"}
    logs = []
    data = ExampleSet(write_jsonl(tmp_path / "p.jsonl", [same_start, PAIRS[0]]), "pairs", template, seq_len=40,
                      log=logs.append)
    assert len(data) == 1 and data.dropped == 1  # cut to the window, the two answers were the same
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8"):
        ExampleSet(bad, "pairs", template, seq_len=64, log=lambda *_: None)


def test_long_examples_are_cut_and_hopeless_ones_dropped(tmp_path, template):
    long = {"prompt": "What is 2 + 3? " * 30, "response": "5"}
    fits = {"prompt": "Hi", "response": "The answer is 5. " * 30}
    logs = []
    data = ExampleSet(write_jsonl(tmp_path / "c.jsonl", [long, fits, CONVS[1]]), "chat", template, seq_len=40,
                      log=logs.append)
    assert len(data) == 2 and data.dropped == 1 and data.truncated == 2
    assert all(len(e.ids) <= 41 for e in data.examples) and "1 dropped" in logs[0]


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "a", "chosen": "b"}', "missing key 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "the same text"),
    ('{"prompt": "a", "chosen": 3, "rejected": "b"}', "'chosen' must be a non-empty string"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "not JSON"),
])
def test_bad_pair_files_name_the_line_and_field(tmp_path, template, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{match}"):
        ExampleSet(path, "pairs", template, seq_len=64, log=lambda *_: None)


# ---- chunked log-probs --------------------------------------------------------------------------


def test_chunked_logprobs_equal_the_full_log_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 512, (3, 20))
    labels = ids.roll(-1, 1).clone()
    labels[:, :7] = IGNORE_INDEX
    labels[1, 15:] = IGNORE_INDEX

    calls = []

    def logits(h):
        calls.append(h.shape[1])
        return model.logits(h)

    def run(chunk, agree=None):
        model.zero_grad()
        calls.clear()
        hidden = model({"input_ids": ids}).hidden
        sums, counts = sequence_logprobs(logits, hidden, labels, chunk, agree)
        sums.sum().backward()
        return sums.detach(), counts, model.tok_embeddings.weight.grad.clone(), model.layers[0].attention.wq.weight.grad.clone()

    full_logits = model.logits(model({"input_ids": ids}).hidden).float().log_softmax(-1)
    keep = labels != IGNORE_INDEX
    manual = torch.where(keep, full_logits.gather(2, labels.clamp(min=0)[..., None])[..., 0], 0.0).sum(1)
    whole, chunked = run(0), run(5)
    assert torch.allclose(whole[0], manual.detach(), atol=1e-5)
    assert whole[1].tolist() == keep.sum(1).tolist()
    for a, b in zip(whole, chunked):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    n = int(keep.sum())
    # padded to the most targets on any rank (here 10 more than this one's 34): the head is called as often as on
    # that rank, forward and backward (checkpointed chunks recompute), and the values and gradients do not change
    padded = run(5, agree=lambda mine: mine + 10)
    assert n == 34 and sorted(calls) == [4, 4] + [5] * 16  # 44 rows in chunks of 5, forward and backward
    for a, b in zip(whole, padded):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert target_logprobs(model.logits, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), 4).numel() == 0
    calls.clear()  # a rank with no targets still calls the head as often as the others
    assert target_logprobs(logits, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), 4, rows=7).numel() == 0
    assert calls == [4, 3]
    with pytest.raises(ValueError, match="rows = 3 is fewer than the 5 targets"):
        target_logprobs(logits, torch.zeros(5, 64), torch.zeros(5, dtype=torch.long), 4, rows=3)


# ---- DPO ----------------------------------------------------------------------------------------


def test_dpo_loss_against_hand_computation():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0])
    rc, rr = torch.tensor([-1.5, -3.5]), torch.tensor([-1.5, -3.5])
    beta = 0.1
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta)
    # h = (pc - pr) - (rc - rr) = [1, -1]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([-math.log(sig(0.1)), -math.log(sig(-0.1))], rel=1e-6)
    assert cr.tolist() == pytest.approx([0.05, -0.05]) and rjr.tolist() == pytest.approx([-0.05, 0.05])
    eps = 0.2  # cDPO: -(1 - eps) log s(beta h) - eps log s(-beta h)
    smoothed = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)[0]
    assert smoothed[0].item() == pytest.approx(-(0.8 * math.log(sig(0.1)) + 0.2 * math.log(sig(-0.1))), rel=1e-6)
    nc, nr = torch.tensor([2.0, 4.0]), torch.tensor([4.0, 2.0])  # IPO: (h_avg - 1 / (2 beta))^2 on token means
    ipo = dpo_loss(pc, pr, rc, rr, beta, "ipo", nc=nc, nr=nr)[0]
    h_avg = [(-1 / 2 - -2 / 4) - (-1.5 / 2 - -1.5 / 4), (-4 / 4 - -3 / 2) - (-3.5 / 4 - -3.5 / 2)]
    assert ipo.tolist() == pytest.approx([(h - 5.0) ** 2 for h in h_avg], rel=1e-6)
    with pytest.raises(ValueError, match="nc and nr"):
        dpo_loss(pc, pr, rc, rr, beta, "ipo")


def test_dpo_objective_equals_the_loss_on_log_probs_from_full_logits(tmp_path, template):
    data = ExampleSet(write_jsonl(tmp_path / "p.jsonl", PAIRS), "pairs", template, seq_len=128, shuffle=False,
                      log=lambda *_: None)
    batch = data.batch(range(3))
    policy, reference = tiny(seed=0), tiny(seed=1)
    obj = DPOObjective(objective_cfg(logprob_chunk=4))
    models = {"policy": SingleEngine(policy, torch.optim.SGD(policy.parameters(), lr=0.0)),
              "reference": SingleEngine(reference)}
    [mb] = obj.experience(0, models, [dict(batch)])
    out = obj.loss(models, mb, total_units=obj.units(mb))

    def logps(model):
        logp = model.logits(model({"input_ids": batch["input_ids"]}).hidden).float().log_softmax(-1)
        keep = batch["labels"] != IGNORE_INDEX
        return torch.where(keep, logp.gather(2, batch["labels"].clamp(min=0)[..., None])[..., 0], 0.0).sum(1)

    p, r = logps(policy), logps(reference).detach()
    losses, cr, rjr = dpo_loss(p[:3], p[3:], r[:3], r[3:], 0.1)
    assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert out.sums["reward_margin"] == pytest.approx(float((cr - rjr).sum()), rel=1e-4)
    assert out.sums["reward_acc"] == float((cr > rjr).sum())
    # RPO adds alpha times each chosen answer's mean NLL per token
    rpo = DPOObjective(objective_cfg(rpo_alpha=0.5)).loss(models, mb, total_units=3)
    n_chosen = (batch["labels"][:3] != IGNORE_INDEX).sum(1)
    assert rpo.loss.item() == pytest.approx((losses + 0.5 * (-p[:3] / n_chosen)).mean().item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in policy.parameters()) and not any(p.requires_grad for p in reference.parameters())


def test_dpo_reference_sources_agree(tmp_path, template):
    """A frozen copy of the starting weights, the LoRA policy with its adapters off, and the precomputed table give
    the same reference log-probs."""
    from workbench.nn.lora import LoraConfig, inject_lora

    data = ExampleSet(write_jsonl(tmp_path / "p.jsonl", PAIRS), "pairs", template, seq_len=128, shuffle=False,
                      log=lambda *_: None)
    batch = data.batch(range(3))
    frozen = DPOObjective(objective_cfg()).reference_logps({"reference": SingleEngine(tiny(seed=4))}, batch)
    policy = tiny(seed=4)
    inject_lora(policy, LoraConfig(r=4))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the outputs
    engine = SingleEngine(policy, torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0))
    lora = DPOObjective(objective_cfg()).reference_logps({"policy": engine}, batch)
    adapted = DPOObjective(objective_cfg()).logps(engine, batch)[0]
    table_obj = DPOObjective(objective_cfg(precompute_reference=True, precompute_batch=2))
    table_obj.prepare({"policy": engine, "reference": SingleEngine(tiny(seed=4))}, data, [], log=lambda *_: None)
    table = table_obj.reference_logps({"policy": engine}, batch)
    assert torch.allclose(frozen, lora, atol=1e-5) and torch.allclose(frozen, table, atol=1e-5)
    assert not torch.allclose(adapted, frozen, atol=1e-3)  # the adapters were on for the policy itself


# ---- distillation -------------------------------------------------------------------------------


def test_divergences_against_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.5, 2.0]])
    T = 2.0
    ps, pt = F.softmax(s.double() / T, -1), F.softmax(t.double() / T, -1)
    fkl = (pt * (pt.log() - ps.log())).sum(-1)
    rkl = (ps * (ps.log() - pt.log())).sum(-1)
    m = 0.3 * pt + 0.7 * ps
    jsd = 0.3 * (pt * (pt.log() - m.log())).sum(-1) + 0.7 * (ps * (ps.log() - m.log())).sum(-1)
    assert torch.allclose(divergence(s, t, "forward_kl", T).double(), fkl, atol=1e-6)
    assert torch.allclose(divergence(s, t, "reverse_kl", T).double(), rkl, atol=1e-6)
    assert torch.allclose(divergence(s, t, "jsd", T, beta=0.3).double(), jsd, atol=1e-6)
    assert divergence(s, t, "forward_kl", T)[1] == pytest.approx(0.0, abs=1e-7)  # equal distributions
    # forward KL is torch's kl_div(student log-probs, teacher log-probs), summed over the vocabulary
    torch_kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(divergence(s, t, "forward_kl", T), torch_kl, atol=1e-6)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        divergence(s, t, "jsd", beta=1.0)


def test_distill_loss_mixes_t2_kd_and_ce_for_a_smaller_student_with_a_larger_vocabulary_teacher(tok):
    student = tiny(seed=0, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    teacher = tiny(seed=1, vocab_size=640)  # other width, depth and vocabulary size; the same tokenizer
    cfg = objective_cfg(temperature=2.0, alpha=0.25)
    obj = DistillObjective(cfg)
    obj.setup(job_for(), tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=g)
    labels = ids.roll(-1, 1).clone()
    labels[:, -1] = IGNORE_INDEX
    mb = {"input_ids": ids, "labels": labels}
    models = {"policy": SingleEngine(student, torch.optim.SGD(student.parameters(), lr=0.0)),
              "teacher": SingleEngine(teacher)}
    out = obj.loss(models, mb, total_units=obj.units(mb))
    keep = labels != IGNORE_INDEX
    z_s = student.logits(student({"input_ids": ids}).hidden)[keep].float()
    z_t = teacher.logits(teacher({"input_ids": ids}).hidden)[keep].float()
    V = tok.vocab_size
    kd = divergence(z_s[:, :V], z_t[:, :V], "forward_kl", 2.0).detach()
    ce = F.cross_entropy(z_s, labels[keep], reduction="none").detach()
    n = int(keep.sum())
    assert out.loss.detach().item() == pytest.approx(float((0.25 * 4.0 * kd + 0.75 * ce).sum()) / n, rel=1e-5)
    assert float(out.metrics["lm_loss"]) == pytest.approx(float(ce.sum()) / n, rel=1e-5)
    assert out.sums["kd"] == pytest.approx(float(kd.sum()), rel=1e-5)
    sums = obj.validation_sums(models, mb)
    metrics = obj.validation_metrics(sums)
    assert metrics["val_loss"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert metrics["val_teacher_loss"] == pytest.approx(float(F.cross_entropy(z_t, labels[keep])), rel=1e-5)


def test_distill_reads_conversations_when_given_a_train_file(tok):
    obj = DistillObjective(objective_cfg())
    obj.setup(job_for("train.jsonl"), tok)
    ids, stop = obj.sample_prompt("Hi")
    assert obj.data == "chat" and ids[-1] == obj.template.role_ids["assistant"] and obj.template.end_id in stop
    assert DistillObjective(objective_cfg()).data == "windows"
