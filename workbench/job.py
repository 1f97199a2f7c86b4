"""The schema of a run: `JobConfig`, one typed section per component.

An experiment file under `configs/` sets any subset of it; `workbench train FILE --section.key value`
overrides single fields; the resolved result is printed and saved as `config.toml` in the run folder,
from which `--ckpt RUN_DIR` rebuilds the model later. See `workbench.config` for the rules.

    [run]       name, output folder, seed, device, precision
    [model]     family, flavor, and overrides of the family's Config (workbench.models.base.ModelSection)
    [data]      corpus, tokenizer, sequence length
    [optim]     AdamW and the learning-rate schedule
    [train]     steps, batch, accumulation, logging and checkpoint cadence, the closing sample
    [parallel]  backend and degrees (workbench/parallel/dims.py says what composes)
    [objective] which objective trains the policy, and its options (sft, dpo, distill)
    [lora]      LoRA / DoRA adapters on the policy (workbench.nn.lora); r = 0 is off
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipelines.corpus import DEFAULT_EXTENSIONS
from workbench.config import fail, field_
from workbench.models.base import ModelSection
from workbench.nn.lora import LoraConfig


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = field_("runs", doc="run folders are created as out_dir/name")
    seed: int = field_(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = field_(
        "auto", doc="bf16 = autocast (CUDA or CPU); auto = bf16 on CUDA, fp32 on CPU; fp32 weights always")


@dataclass
class DataSection:
    dir: str = field_("data/stdlib", doc="the dataset folder `workbench data` writes and `train` reads")
    source: str = field_("", doc="folder of source files; empty = the Python standard library")
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    max_bytes: int = field_(4_000_000, gt=0, doc="corpus size cap (bytes of text)")
    tokenizer: str = field_("", doc="path to a tokenizer.json; empty = train a byte-level BPE on the corpus")
    vocab_size: int = field_(512, ge=268, doc="size of the BPE tokenizer trained when `tokenizer` is empty")
    val_fraction: float = field_(0.05, gt=0, lt=1, doc="share of the text held out for validation")
    shard_bytes: int = field_(1_000_000, gt=0, doc="text per shard (a shard closes once it holds this much)")
    seq_len: int = field_(256, gt=0)
    shuffle_windows: int = field_(1024, gt=0, doc="samples are shuffled in blocks of this many (1 = stream order)")
    strict: bool = field_(False, doc="a dropped shard or sample stops the run instead of being logged")
    passkey_fraction: float = field_(
        0.0, ge=0, lt=1, doc="share of the text (characters) that is synthetic passkey documents (data_pipelines."
                             "long_context.passkey_document), mixed evenly among the corpus's documents in both "
                             "splits; the tokenizer is trained on the corpus alone; 0 = none")
    passkey_filler: list[int] = field_(
        [8, 40], doc="[min, max] filler sentences per passkey document, drawn uniformly; choose them so a "
                     "document fits data.seq_len (`workbench data` logs the documents' token lengths)")
    passkey_digits: int = field_(5, ge=1, le=12, doc="digits of each passkey")
    train_file: str = field_(
        "", doc="a jsonl of examples for objective sft, dpo or distill: conversations ({messages} or {prompt, "
                "response}) or preference pairs ({prompt, chosen, rejected}); empty = data.dir's packed windows "
                "(data.dir still gives the tokenizer)")
    val_file: str = field_("", doc="held-out examples in data.train_file's format; empty = no validation set")
    pack: bool = field_(False, doc="conversations: pack them into rows of data.seq_len with document masks "
                                   "(otherwise each is a row, right-padded to the longest of its micro-batch)")
    train_on: Literal["assistant", "last"] = field_(
        "assistant", doc="conversations: which assistant turns are targets (every one, or the last)")

    def validate(self) -> None:
        if not self.extensions or not all(isinstance(e, str) and e.startswith(".") for e in self.extensions):
            fail("extensions", f"expected a non-empty list of suffixes like '.py', got {self.extensions!r}")
        f = self.passkey_filler
        ints = all(isinstance(n, int) and not isinstance(n, bool) for n in f)
        if len(f) != 2 or not ints or not 0 <= f[0] <= f[1]:
            fail("passkey_filler", f"expected [min, max] filler sentences with 0 <= min <= max, got {f!r}")


@dataclass
class OptimSection:
    name: Literal["adamw", "sgd", "muon"] = field_(
        "adamw", doc="sgd: plain SGD with optional momentum (layout tests); muon: Muon + AdamW (train/optim/muon.py)")
    lr: float = field_(3e-3, gt=0)
    min_lr_ratio: float = field_(0.1, ge=0, le=1, doc="final lr of cosine and wsd, as a fraction of lr")
    warmup_steps: int = field_(20, ge=0)
    schedule: Literal["constant", "cosine", "wsd"] = field_("cosine", doc="wsd = warmup, stable, decay")
    decay_fraction: float = field_(0.2, gt=0, le=1, doc="wsd: the final share of steps that decays the lr")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = field_(1e-8, gt=0)
    weight_decay: float = field_(0.1, ge=0, doc="applied to matrices only (not norms, not embeddings)")
    grad_clip: float = field_(1.0, ge=0, doc="max global grad norm; 0 = off")
    momentum: float = field_(0.0, ge=0, lt=1, doc="sgd only")
    muon_momentum: float = field_(0.95, ge=0, lt=1, doc="muon: mu of M_t = mu M_(t-1) + G_t")
    ns_steps: int = field_(5, gt=0, doc="muon: Newton-Schulz iterations")
    qk_clip_tau: float = field_(0.0, ge=0, doc="QK-Clip: rescale heads whose max logit exceeds this; 0 = off (K2: 100)")

    def validate(self) -> None:
        if self.name == "adamw" and self.momentum:
            fail("momentum", f"is for optim.name = 'sgd'; AdamW's momentum is betas[0] (got momentum = {self.momentum})")
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                fail(f"betas[{i}]", f"expected a number in [0, 1), got {b}")


@dataclass
class TrainSection:
    steps: int = field_(200, gt=0)
    micro_batch_size: int = field_(16, gt=0)
    grad_accum: int = field_(1, gt=0)
    log_every: int = field_(10, gt=0)
    ckpt_every: int = field_(0, ge=0, doc="0 = only at the end (and on SIGINT/SIGTERM)")
    eval_every: int = field_(0, ge=0, doc="validation every N steps (and at the start and end); 0 = start and end")
    eval_tokens: int = field_(65536, gt=0, doc="validation budget: the first windows of the val split up to this")
    keep_last: int = field_(2, gt=0, doc="checkpoints kept in the run folder")
    sample_prompt: str = "def"
    sample_tokens: int = field_(64, ge=0, doc="tokens generated after training; 0 = none")
    init_from: str = field_(
        "", doc="a run folder or checkpoint folder whose model weights (model.safetensors) start this run: a new "
                "run (step 0, fresh optimizer and schedule), whose model config may differ in anything that "
                "keeps the tensor shapes (RoPE scaling, max_seq_len: context extension); empty = random init")


@dataclass
class ParallelSection:
    backend: Literal["single", "ddp", "fsdp2", "zero1", "zero2", "zero3"] = "single"
    dp_replicate: int = field_(1, gt=0)
    dp_shard: int = field_(1, gt=0)
    tp: int = field_(1, gt=0)
    cp: int = field_(1, gt=0)
    ep: int = field_(1, gt=0)
    cp_method: Literal["ring", "ulysses"] = field_(
        "ring", doc="context parallel attention (parallel.cp > 1): K/V passed around a ring, or heads by all-to-all")
    timeout_s: float = field_(600.0, gt=0, doc="a collective waiting longer than this ends every rank with an error")
    reshard_after_forward: bool = field_(True, doc="fsdp2: free gathered parameters after each block's forward")
    cpu_offload: bool = field_(False, doc="fsdp2: keep parameter shards and optimizer state in host memory")
    fsdp_mixed_precision: Literal["params", "autocast"] = field_(
        "params", doc="fsdp2 with bf16 (run.precision): 'params' gathers the parameters in bf16 and computes every op "
                      "in bf16 (half the all-gather bytes; norms and the residual stream in bf16 too); 'autocast' "
                      "gathers fp32 parameters and autocasts like single, ddp and zero (the same numbers as one "
                      "process); gradients reduce in fp32 either way")
    activation_checkpointing: Literal["none", "full", "selective"] = field_(
        "none", doc="recompute each block's activations in backward (selective keeps the matmul outputs)")
    loss_parallel: bool = field_(False, doc="tp: the loss on vocabulary-split logits (none gathers (B, T, V))")
    compile: bool = field_(False, doc="torch.compile each block (for CUDA; works but slow to start on CPU)")
    deepspeed_config: str = field_("", doc="zero1-3: a DeepSpeed JSON file merged over the generated config")

    def validate(self) -> None:
        if self.loss_parallel and self.tp == 1:
            fail("loss_parallel", "needs parallel.tp > 1 (it splits the loss over the tensor-parallel ranks)")
        if self.compile and self.backend.startswith("zero"):
            fail("compile", f"does not compose with backend {self.backend!r} yet (ZeRO's gather hooks inside "
                            f"compiled blocks are untested); use fsdp2, ddp or single")


# which objective each [objective] field belongs to (a field set for another objective is an error)
# (RL fields are shared by ppo and grpo; `reference` and `logprob_chunk` by dpo too; `loss_chunk` by lm and sft)
RL_FIELDS = ("reward", "format_weight", "group_size", "max_new_tokens", "sampling_temperature", "kl_coef",
             "clip_eps", "clip_eps_high", "epochs", "rollout_batch")
OBJECTIVE_FIELDS = {
    "lm": ("loss_chunk",),
    "sft": ("loss_chunk",),
    "dpo": ("beta", "loss_type", "label_smoothing", "rpo_alpha", "reference", "precompute_reference",
            "precompute_batch", "logprob_chunk"),
    "distill": ("teacher", "divergence", "temperature", "alpha", "jsd_beta"),
    "grpo": (*RL_FIELDS, "reference", "logprob_chunk", "aggregation", "scale_rewards"),
    "ppo": (*RL_FIELDS, "reference", "logprob_chunk", "vf_coef", "value_clip", "gamma", "lam", "whiten_advantages"),
    "vlm": ("train_parts", "blind", "val_questions", "answer_tokens"),
}
RL_OBJECTIVES = ("ppo", "grpo")


@dataclass
class ObjectiveSection:
    name: Literal["lm", "sft", "dpo", "distill", "ppo", "grpo", "vlm"] = field_(
        "lm", doc="lm: pretraining on data.dir's windows; sft: conversations of data.train_file, loss on the "
                  "assistant's tokens; dpo: preference pairs of data.train_file; distill: a student matching "
                  "objective.teacher; ppo, grpo: reinforcement learning from rewards on the prompts of "
                  "data.train_file; vlm: questions about the images of the vision folder data.dir, loss on the "
                  "answers (workbench/train/objectives/vlm.py)")
    # dpo (workbench/train/objectives/dpo.py)
    beta: float = field_(0.1, gt=0, doc="dpo: the strength of the anchor to the reference (TRL's default 0.1)")
    loss_type: Literal["sigmoid", "ipo"] = field_("sigmoid", doc="dpo: sigmoid (DPO, cDPO with label_smoothing) or ipo")
    label_smoothing: float = field_(0.0, ge=0, lt=0.5, doc="dpo, sigmoid: the assumed share of flipped labels (cDPO)")
    rpo_alpha: float = field_(0.0, ge=0, doc="dpo: weight of the chosen answer's NLL per token added to each pair's "
                                             "loss (RPO; keeps the preferred answers likely); 0 = plain DPO")
    reference: str = field_("", doc="dpo: run folder or checkpoint of the frozen reference; empty = train.init_from's "
                                    "weights, or with LoRA the policy with its adapters off")
    precompute_reference: bool = field_(
        False, doc="dpo: compute every training pair's reference log-probs once before the first step, then drop "
                   "the reference model (memory for a pass over the data)")
    precompute_batch: int = field_(16, gt=0, doc="dpo: pairs per forward when precomputing the reference")
    logprob_chunk: int = field_(
        1024, ge=0, doc="dpo: target tokens per chunk of the head (each chunk's logits recomputed in backward "
                        "instead of kept); 0 = all at once")
    # lm and sft (workbench/train/objectives/lm.py)
    loss_chunk: int = field_(
        0, ge=0, doc="lm, sft: target tokens per chunk of the head in the training loss (each chunk's float32 logits "
                     "recomputed in backward instead of the whole micro-batch's (B, T, V) logits kept); 0 = all "
                     "logits at once")
    # distill (workbench/train/objectives/distill.py)
    teacher: str = field_("", doc="distill: run folder or checkpoint of the teacher (the dataset's tokenizer)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = field_(
        "forward_kl", doc="distill: KL(teacher || student) (Hinton), KL(student || teacher), or generalised JSD")
    temperature: float = field_(1.0, gt=0, doc="distill: both distributions are softened by z / T; the divergence x T^2")
    alpha: float = field_(0.5, ge=0, le=1, doc="distill: weight of the divergence; 1 - alpha weighs the label CE")
    jsd_beta: float = field_(0.5, gt=0, lt=1, doc="distill, jsd: M = beta p_teacher + (1 - beta) p_student")
    # ppo and grpo (workbench/train/objectives/{ppo,grpo,rollout,rewards}.py)
    reward: Literal["r1", "planted"] = field_(
        "r1", doc="ppo, grpo: r1 = the answer checked by a program (the record's kind and params, "
                  "data_pipelines.reasoning) plus format_weight x the R1 format (<think> then <answer>); planted = "
                  "the share of the completion's tokens whose id is even (a test task any model can learn)")
    format_weight: float = field_(0.2, ge=0, doc="ppo, grpo, reward r1: weight of the format reward")
    group_size: int = field_(0, ge=0, doc="ppo, grpo: completions sampled per prompt; 0 = the objective's "
                                          "default (grpo 8, ppo 1)")
    max_new_tokens: int = field_(64, gt=0, doc="ppo, grpo: the longest completion sampled")
    sampling_temperature: float = field_(1.0, gt=0, doc="ppo, grpo: rollouts sample from softmax(z / T), and every "
                                                         "log-prob of the loss uses the same T")
    kl_coef: float = field_(0.05, ge=0, doc="ppo, grpo: weight of the KL penalty to the reference (ppo: in the "
                                            "per-token reward; grpo: the k3 estimate in the loss); 0 = no reference")
    clip_eps: float = field_(0.2, gt=0, lt=1, doc="ppo, grpo: the ratio is clipped to [1 - eps, 1 + eps_high]")
    clip_eps_high: float = field_(0.0, ge=0, doc="ppo, grpo: the upper clip (DAPO's clip-higher, 0.28); 0 = clip_eps")
    epochs: int = field_(0, ge=0, doc="ppo, grpo: optimizer updates over each batch of experience (PPO epochs; "
                                      "GRPO's mu); 0 = the objective's default (ppo 4, grpo 1)")
    rollout_batch: int = field_(64, gt=0, doc="ppo, grpo: completions decoded together")
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = field_(
        "grpo", doc="grpo: grpo = each completion's token mean, then the mean over completions; dr_grpo = the sum "
                    "over tokens / (completions x max_new_tokens) (Dr. GRPO in full also sets scale_rewards = "
                    "false); dapo = the sum / all completion tokens")
    scale_rewards: bool = field_(True, doc="grpo: divide each group's advantages by its reward std (off in Dr. GRPO)")
    vf_coef: float = field_(0.1, ge=0, doc="ppo: weight of the value loss")
    value_clip: float = field_(0.2, gt=0, doc="ppo: new values are clipped to the old ones +- this")
    gamma: float = field_(1.0, ge=0, le=1, doc="ppo: discount")
    lam: float = field_(0.95, ge=0, le=1, doc="ppo: GAE's lambda")
    whiten_advantages: bool = field_(True, doc="ppo: advantages normalised to mean 0, std 1 over the step's tokens")
    # vlm (workbench/train/objectives/vlm.py)
    train_parts: Literal["all", "projector", "vision"] = field_(
        "all", doc="vlm: what trains: all; projector (multi_modal_projector alone: the warm-up of PaliGemma's "
                   "recipe); vision (the vision tower and the projector, the language model frozen)")
    blind: bool = field_(False, doc="vlm: every image replaced by a constant (the blind, question-only baseline)")
    val_questions: int = field_(64, gt=0, doc="vlm: held-out samples (the first of data.dir's val split) scored by "
                                               "loss and greedy exact match at each validation")
    answer_tokens: int = field_(16, gt=0, doc="vlm: the longest greedy answer decoded for exact match")

    def rl_defaults(self) -> tuple[int, int]:
        """(group_size, epochs) with 0 replaced by the objective's default."""
        group = self.group_size or (8 if self.name == "grpo" else 1)
        return group, self.epochs or (4 if self.name == "ppo" else 1)

    def updates_per_step(self) -> int:
        """Optimizer updates per training step: the PPO epochs over each batch of experience, else 1."""
        return self.rl_defaults()[1] if self.name in RL_OBJECTIVES else 1

    def validate(self) -> None:
        defaults = ObjectiveSection.__dataclass_fields__
        owners: dict[str, list[str]] = {}
        for owner, names in OBJECTIVE_FIELDS.items():
            for n in names:
                owners.setdefault(n, []).append(owner)
        for n, its in owners.items():
            if self.name not in its and getattr(self, n) != defaults[n].default:
                fail(n, f"is an option of objective.name = {' or '.join(repr(o) for o in its)}, but objective.name "
                        f"is '{self.name}'")
        if self.name == "grpo" and self.rl_defaults()[0] < 2:
            fail("group_size", "grpo needs at least 2 completions per prompt (its advantages compare them)")
        if self.name == "distill" and not self.teacher:
            fail("teacher", "objective.name = 'distill' needs a teacher: a run folder or checkpoint folder")
        if self.loss_type == "ipo" and self.label_smoothing:
            fail("label_smoothing", "is cDPO's, for loss_type = 'sigmoid'; IPO has no label smoothing")


@dataclass
class JobConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=lambda: ModelSection.of("llama3", "debug"))
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        from workbench.parallel.cp import check_seq_len

        check_seq_len(self.data.seq_len, self.parallel.cp)  # 2 x cp zig-zag chunks per sequence
        backend = self.parallel.backend
        if backend.startswith("zero") and (self.optim.name == "muon" or self.optim.qk_clip_tau):
            what = "optim.name = 'muon'" if self.optim.name == "muon" else "optim.qk_clip_tau > 0 (QK-Clip)"
            fail("optim.name" if self.optim.name == "muon" else "optim.qk_clip_tau",
                 f"{what} does not compose with parallel.backend = {backend!r}: DeepSpeed ZeRO owns the optimizer "
                 f"and its fp32 partitions; use parallel.backend fsdp2, ddp or single")
        if self.optim.qk_clip_tau and (self.parallel.tp > 1 or self.parallel.cp > 1):
            fail("optim.qk_clip_tau", "QK-Clip with parallel.tp > 1 or parallel.cp > 1 is not built (heads or keys "
                                      "are split across ranks, so a rank's recorded logits are partial)")
        if (self.parallel.cp > 1 and self.parallel.cp_method == "ring"
                and getattr(self.model.config, "moba_block_size", None) is not None):
            fail("parallel.cp_method", "ring attention does not run MoBA (each query picks blocks from the whole "
                                       "sequence, which no rank holds); use parallel.cp_method = 'ulysses'")
        if self.objective.loss_chunk and self.parallel.tp > 1:
            what = "parallel.loss_parallel = true (vocabulary-split logits)" if self.parallel.loss_parallel else \
                "parallel.tp > 1"
            fail("objective.loss_chunk", f"a chunked loss with {what} is not built (the head's logits are split "
                                         f"over the tensor-parallel ranks); set objective.loss_chunk = 0 (with "
                                         f"tp, parallel.loss_parallel keeps each rank's logits to its vocabulary "
                                         f"slice) or parallel.tp = 1")
        self._validate_objective()
        model_vocab = self.model.config.vocab_size
        if not self.data.tokenizer and self.data.vocab_size > model_vocab:
            fail("data.vocab_size", f"the tokenizer to train ({self.data.vocab_size} tokens) must fit "
                                    f"model.vocab_size ({model_vocab})")

    def _validate_objective(self) -> None:
        """What each objective needs from the data and the layout (post-training: workbench/train/objectives)."""
        name, data, par = self.objective.name, self.data, self.parallel
        if name == "vlm" and (data.train_file or data.val_file):
            fail("data.train_file", "objective.name = 'vlm' reads the vision folder data.dir (`workbench diagrams "
                                    "DIR`), not examples files")
        if name == "vlm" and not hasattr(self.model.config, "image_token_id"):
            fail("model.family", f"objective.name = 'vlm' needs a vision-language model (paligemma2), got "
                                 f"{self.model.family!r}")
        if name == "lm" and (data.train_file or data.val_file):
            fail("data.train_file", "objective.name = 'lm' trains on data.dir's shards; examples files are for "
                                    "sft, dpo, distill, ppo and grpo (set objective.name)")
        if name in ("sft", "dpo", *RL_OBJECTIVES) and not data.train_file:
            what = {"sft": "conversations", "dpo": "preference pairs"}.get(name, "prompts (what the reward reads, e.g. "
                                                                          "data_pipelines.reasoning's problems)")
            fail("data.train_file", f"objective.name = '{name}' needs a jsonl of {what}")
        if data.val_file and not data.train_file:
            fail("data.val_file", "is the held-out part of data.train_file, which is empty")
        chat = name == "sft" or (name == "distill" and data.train_file)
        defaults = DataSection.__dataclass_fields__
        for key in ("pack", "train_on"):  # options of conversations only
            if not chat and getattr(data, key) != defaults[key].default:
                reads = {"dpo": "pairs", "ppo": "prompts", "grpo": "prompts", "vlm": "images"}.get(name, "windows")
                fail(f"data.{key}", f"applies to conversations (objective sft, or distill with data.train_file); "
                                    f"objective.name = '{name}' reads {reads}")
        mtp = getattr(self.model.config, "mtp_layers", 0)
        if name in ("dpo", "distill") and mtp and par.backend == "ddp":
            fail("model.mtp_layers", f"objective.name = '{name}' does not train the multi-token-prediction modules, "
                                     f"and DDP refuses parameters without gradients; set model.mtp_layers = 0 or "
                                     f"use parallel.backend fsdp2 or zero1-3")
        if name == "dpo" and not (self.objective.reference or self.train.init_from):
            fail("objective.reference", "DPO needs a reference model: set train.init_from (the model to improve, "
                                        "usually the SFT run) or objective.reference")
        if self.lora.enabled:
            if not self.train.init_from:
                fail("lora.r", "LoRA adapts a trained model: set train.init_from (a run folder or checkpoint)")
            if self.optim.name == "muon" or self.optim.qk_clip_tau:
                fail("optim.name" if self.optim.name == "muon" else "optim.qk_clip_tau",
                     "Muon and QK-Clip are not built for LoRA adapters (QK-Clip rescales the frozen base weights)")
            if par.tp > 1:
                fail("parallel.tp", "LoRA with tensor parallelism is not built (the adapters are not split)")
            sharded = (par.backend == "fsdp2" and par.dp_replicate * par.dp_shard > 1) or par.backend == "zero3"
            if name in RL_OBJECTIVES and sharded:
                fail("lora.r", f"LoRA with objective.name = '{name}' under sharded parameters ({par.backend}) is not "
                               f"built: rollouts decode a gathered plain copy of the policy, which would need the "
                               f"adapters merged into it; use parallel.backend ddp, zero1 or zero2, or no LoRA")
        if name != "lm":
            for key in ("tp", "cp"):
                if getattr(par, key) > 1:
                    fail(f"parallel.{key}", f"objective.name = '{name}' runs under data parallelism (ddp, fsdp2, "
                                            f"zero1-3); parallel.{key} > 1 is built for language modelling only")
            if name in ("dpo", "distill", *RL_OBJECTIVES) and par.ep > 1:
                fail("parallel.ep", f"objective.name = '{name}' has a frozen second model, which is not laid out "
                                    f"for expert parallelism; use parallel.ep = 1")
