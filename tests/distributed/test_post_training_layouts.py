"""Post-training on gloo ranks (torchrun) against the single-process run of the same global batch.

SFT and DPO under fsdp2 and DeepSpeed zero2 on 2 ranks, SFT under ddp; also SFT with LoRA under fsdp2, DPO with its
reference log-probs precomputed under fsdp2 (the sharded reference runs the precomputation in lockstep), and
distillation under fsdp2 (the teacher sharded like the student), and PPO and GRPO under fsdp2, zero2 and zero3 (each
rank samples its prompts' completions on a whole copy of the policy, gathered for generation, with seeds drawn from
the step and the prompt's position in the file, so the rollouts and rewards are the single process's; the sharded
reference and PPO's value head in the root unit run in lockstep). DPO computes its log-probs a chunk of 16 targets at
a time, each chunk's logits recomputed in backward, so that path runs under FSDP2 and ZeRO too; the pairs' lengths
differ widely, so the ranks hold different numbers of targets and FSDP2's head gathers stay in lockstep only
because every rank pads its chunks to the most targets on any rank (without that, the ranks wait on each other
until parallel.timeout_s). SFT also runs under fsdp2 with `objective.loss_chunk` = 16 (the training loss's head a
chunk of 16 targets at a time, padded to the most targets on any rank) against the unchunked single process: the
chunked loss must give the same losses and gradient norms. Per-step losses and gradient norms must equal the single
process's at rtol 1e-5 (fp32): the examples are split by the global cursor, each micro-batch's loss is divided by
the step's global count of targets (SFT, distillation) or pairs (DPO), and the frozen models give every rank the
same numbers. One launch trains every case (tests/distributed/train_worker.py), the single runs train here.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_parallel import STEPS, torchrun, train_single

from data_pipelines.reasoning import make_sft_records

# a collective left waiting (ranks calling a sharded model's head unequally often) fails in a minute, not ten
PER_RANK = [*STEPS, "--train.micro_batch_size", "2", "--train.grad_accum", "2", "--parallel.dp_shard", "2",
            "--parallel.timeout_s", "60"]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def post_setup(tmp_path_factory, debug_data):
    """A pretrained start (4 LM steps; the single runs use test_parallel's global batch of 4 x 2), chat records and preference pairs built from verifiable problems, and the
    single-process references of every case."""
    out = tmp_path_factory.mktemp("post")
    train_single(out, "base", debug_data, "--train.steps", "4")
    records = make_sft_records(40, seed=5, kinds=["add", "compare", "parity"])
    pairs = [{"prompt": r["prompt"], "chosen": r["messages"][1]["content"],
              "rejected": r["messages"][1]["content"].replace(f"<answer>{r['answer']}</answer>", "<answer>7</answer>")
              if r["answer"] != "7" else r["messages"][1]["content"].replace("<answer>7", "<answer>8")}
             for r in records]
    for i, pair in enumerate(pairs):  # lengths far apart, so the ranks hold different numbers of targets
        pair["chosen"] += " Checked again, step by step." * (i % 3)
        pair["rejected"] += " Checked again." * (i % 3)
    sft = ["--objective.name", "sft", "--data.train_file", write(out / "sft.jsonl", records[:32]),
           "--data.val_file", write(out / "sft-val.jsonl", records[32:]), "--train.init_from", str(out / "base"),
           "--data.seq_len", "128"]
    dpo = ["--objective.name", "dpo", "--data.train_file", write(out / "pairs.jsonl", pairs[:32]),
           "--data.val_file", write(out / "pairs-val.jsonl", pairs[32:]), "--train.init_from", str(out / "base"),
           "--data.seq_len", "128", "--optim.lr", "1e-3",
           "--objective.logprob_chunk", "16"]  # the head a chunk at a time, recomputed in backward (every engine)
    lora = ["--lora.r", "4", "--optim.lr", "1e-2"]
    distill = ["--objective.name", "distill", "--objective.teacher", str(out / "base"), "--model.dim", "32",
               "--model.n_heads", "2", "--model.n_kv_heads", "1", "--objective.temperature", "2.0"]
    # RL on the planted reward (the share of even token ids: non-zero advantages from any start), 4 completions of
    # 8 tokens per prompt, two updates per batch of experience (old log-probs, ratios and clipping), KL to the start
    # prompts of different lengths: each rank's decoding batches are left-padded differently from the single run's
    prompts = [{"prompt": p} for p in ("Hi", "Write about a river", "Tell me a long story about the old stone bridge",
                                       "Describe a cloud") * 8]
    rl = ["--objective.reward", "planted", "--data.train_file", write(out / "prompts.jsonl", prompts),
          "--data.val_file", write(out / "prompts-val.jsonl", prompts[:4]), "--train.init_from", str(out / "base"),
          "--objective.group_size", "4", "--objective.max_new_tokens", "8", "--objective.epochs", "2",
          "--objective.logprob_chunk", "16", "--optim.lr", "3e-3"]
    cases = {"sft": sft, "dpo": dpo, "sft-lora": [*sft, *lora],
             "grpo": ["--objective.name", "grpo", *rl], "ppo": ["--objective.name", "ppo", *rl],
             "dpo-precompute": [*dpo, "--objective.precompute_reference", "true"], "distill": distill}
    singles = {name: train_single(out, f"single-{name}", debug_data, *args) for name, args in cases.items()}
    return out, cases, singles


LAYOUTS = {"fsdp2": ["--parallel.backend", "fsdp2"], "zero2": ["--parallel.backend", "zero2"],
           "zero3": ["--parallel.backend", "zero3"],
           "fsdp2-loss-chunk": ["--parallel.backend", "fsdp2", "--objective.loss_chunk", "16"],
           "ddp": ["--parallel.backend", "ddp", "--parallel.dp_shard", "1", "--parallel.dp_replicate", "2"]}
RUNS = {"sft-fsdp2": ("sft", "fsdp2"), "sft-zero2": ("sft", "zero2"), "sft-ddp": ("sft", "ddp"),
        "sft-fsdp2-loss-chunk": ("sft", "fsdp2-loss-chunk"),  # compared with the unchunked single process
        "dpo-fsdp2": ("dpo", "fsdp2"),
        "dpo-zero2": ("dpo", "zero2"), "sft-lora-fsdp2": ("sft-lora", "fsdp2"),
        "dpo-precompute-fsdp2": ("dpo-precompute", "fsdp2"), "distill-fsdp2": ("distill", "fsdp2"),
        **{f"{rl}-{layout}": (rl, layout) for rl in ("grpo", "ppo") for layout in ("fsdp2", "zero2", "zero3")}}


@pytest.fixture(scope="module")
def launched(post_setup, debug_data, tmp_path_factory):
    out, cases, _ = post_setup
    runs = {name: [*PER_RANK, *LAYOUTS[layout], *cases[case]] for name, (case, layout) in RUNS.items()}
    where = tmp_path_factory.mktemp("post-dp")
    return where, torchrun(where, debug_data, runs)


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_post_training_layouts_match_single_process(run, launched, post_setup):
    _, _, singles = post_setup
    case, _ = RUNS[run]
    history = singles[case]
    got = launched[1][run]
    assert got["world_size"] == 2 and len(got["losses"]) == len(history) == 6
    assert isinstance(got["sample"], str)
    rl = case in ("grpo", "ppo")
    if rl:  # the same rollouts, so the same rewards (up to the order their float64 sum was taken in)
        assert got["rewards"] == pytest.approx([r["reward"] for r in history], rel=1e-12)
    # RL losses are small differences of larger terms (ratio 1 and group-centred advantages at the first update): a
    # float32 sum in another order moves them by ~1e-7 absolutely
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor([r["loss"] for r in history]),
                               rtol=1e-5, atol=1e-6 if rl else 0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor([r["grad_norm"] for r in history]),
                               rtol=1e-5, atol=0)
    assert len(set(got["losses"])) > 1  # it trained


def test_single_references_learn(post_setup):
    """The references themselves move: SFT's loss falls, DPO's starts at log 2 (the policy is its reference)."""
    _, _, singles = post_setup
    assert singles["sft"][-1]["loss"] < singles["sft"][0]["loss"]
    assert singles["dpo"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert singles["dpo"][-1]["loss"] < singles["dpo"][0]["loss"]
    # the precomputed table holds the same reference log-probs as the frozen model gives step by step
    torch.testing.assert_close(torch.tensor([r["loss"] for r in singles["dpo-precompute"]]),
                               torch.tensor([r["loss"] for r in singles["dpo"]]), rtol=1e-5, atol=0)
