"""Shared test set-up: the `gpu` marker skips, naming why, on machines without CUDA."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# the C++ ops `make ops` prebuilds (DeepSpeed's CPU comm op, the decode kernel): found there by a bare pytest
# too, instead of being compiled inside the first test that needs them
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch-extensions"))
DEBUG_TOML = ROOT / "configs" / "llama3" / "debug.toml"  # tests run from any working directory


@pytest.fixture(scope="session")
def debug_data(tmp_path_factory) -> Path:
    """The debug config's dataset (tokenizer, shards, manifest), built once per test session."""
    from data_pipelines.shards import build_dataset
    from workbench.config import load_config
    from workbench.job import JobConfig

    folder = tmp_path_factory.mktemp("data") / "stdlib-512"
    build_dataset(load_config(JobConfig, DEBUG_TOML, ["--data.dir", str(folder)]).data, log=lambda *_: None)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, debug_data) -> Path:
    """A run folder `tiny` of the debug config trained 6 steps, built once per test session for the tests
    that only read it (chat, generate, quantized loading, serve)."""
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny-run")
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", "tiny", "--data.dir",
                                              str(debug_data), "--train.sample_tokens", "0", "--train.steps", "6"])
    Trainer(job, log=lambda *_: None).fit()
    return out / "tiny"


@pytest.fixture
def debug_job(debug_data):
    """make(out_dir, *overrides) -> the debug JobConfig writing runs under out_dir, reading `debug_data`."""
    from workbench.config import load_config
    from workbench.job import JobConfig

    def make(out_dir, *overrides):
        return load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out_dir), "--data.dir", str(debug_data),
                                                   "--train.sample_tokens", "0", *overrides])

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine: `make test-gpu` runs these on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_test_tokenizer(path):
    """A byte-level BPE trained on a slice of the standard library (with the reserved tokens), saved into
    `path` through transformers' PreTrainedTokenizerFast exactly as a hub model would be; returns ours."""
    transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    from data_pipelines.corpus import load_documents
    from data_pipelines.tokenizer import train_bpe

    docs = load_documents(max_bytes=200_000)
    tok = train_bpe((d.text for d in docs), 320)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<|bos|>",
                                                eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(path)
    return tok


def make_hf_mixtral_dir(path, *, dtype: torch.dtype = torch.float32, seed: int = 0, vocab_size: int = 384,
                        init_std: float = 0.2, sliding_window: int | None = None):
    """A small real Hugging Face Mixtral directory (4 experts, top-2) with the test tokenizer.

    transformers 5 saves the experts under the hub's per-expert names (block_sparse_moe.experts.{e}.w1/w2/w3),
    so this directory also exercises the adapter's 4.x import path.
    """
    transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    tok = save_test_tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=init_std, sliding_window=sliding_window,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    model = transformers.MixtralForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return path


DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def make_hf_deepseek_v3_dir(path, *, dtype: torch.dtype = torch.float32, seed: int = 0, vocab_size: int = 384,
                            init_std: float = 0.2, rope: dict | None = None, max_positions: int = 256):
    """A small real Hugging Face DeepSeek-V3 directory (MLA, 1 dense + 2 MoE layers of 8 experts in 4 groups,
    top-2 + 1 shared, YaRN unless `rope` says otherwise, a random selection bias) with the test tokenizer;
    experts saved one by one."""
    transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    tok = save_test_tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, rms_norm_eps=1e-6,
        max_position_embeddings=max_positions, initializer_range=init_std, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, rope_scaling=rope or DEEPSEEK_YARN)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    model.to(dtype).save_pretrained(path)
    return path


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def make_hf_llama_dir(path, *, tie: bool = False, dtype: torch.dtype = torch.float32, max_shard_size=None,
                      seed: int = 0, vocab_size: int = 384, init_std: float = 0.2, rope: dict | None = None,
                      max_positions: int = 256):
    """A small but real Hugging Face Llama directory: sharded safetensors, config, tokenizer files.

    The tokenizer is a byte-level BPE trained on a slice of the standard library (with the reserved
    tokens), saved through transformers' PreTrainedTokenizerFast exactly as a hub model would be.
    A large init std keeps greedy decoding away from near-ties between logits.
    """
    transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    tok = save_test_tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=max_positions, tie_word_embeddings=tie, initializer_range=init_std,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        rope_parameters=rope or LLAMA31_ROPE)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """A sharded fp32 HF Llama directory, shared by the tests that only read it."""
    return make_hf_llama_dir(tmp_path_factory.mktemp("hf-llama"), max_shard_size="40KB")


PALIGEMMA2_IMAGE_TOKEN = 11  # "<image>" among the reserved tokens (workbench.data.tokenizer.SPECIAL_TOKENS)


def paligemma2_hf_config(vocab_size: int = 320, attn_cap: float | None = 0.7, final_cap: float | None = 2.0,
                         layer_types=None, **text):
    """models.md's tiny PaliGemma 2 config (28 px, 14 px patches: 4 image tokens), 3 Gemma 2 layers (sliding,
    full, sliding) with a 4-token window, and soft-caps small enough to bite."""
    transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    text_config = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       vocab_size=vocab_size, sliding_window=4, attn_logit_softcapping=attn_cap,
                       final_logit_softcapping=final_cap, initializer_range=0.2, bos_token_id=0,
                       eos_token_id=1, pad_token_id=2, **text)
    if layer_types is not None:
        text_config["layer_types"] = layer_types
    return transformers.PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14, vision_use_head=False, initializer_range=0.2),
        text_config=text_config, image_token_index=PALIGEMMA2_IMAGE_TOKEN, projection_dim=64,
        attn_implementation="eager", bos_token_id=0, eos_token_id=1, pad_token_id=2)


def make_hf_paligemma2(seed: int = 0, embed_std: float = 0.05, **kw):
    """A random PaliGemmaForConditionalGeneration of `paligemma2_hf_config(**kw)`, in eval mode."""
    transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(paligemma2_hf_config(**kw)).eval()
    with torch.no_grad():  # random norms, so a swapped norm or a missing (1 + w) cannot hide
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(0.0 if "language_model" in name else 1.0, 0.3)
        # small embeddings: with tied ones at the init scale, a random model's top token is its input token
        # (e . e * sqrt(d) dominates), and greedy text would repeat one token
        model.model.language_model.embed_tokens.weight.normal_(0.0, embed_std)
    return model


def make_hf_paligemma2_dir(path, seed: int = 0):
    """A tiny real PaliGemma 2 directory (save_pretrained) with the project's test tokenizer (bos 0, eos 1,
    pad 2, <image> 11); returns the path."""
    tok = save_test_tokenizer(path)
    assert tok.token_to_id("<image>") == PALIGEMMA2_IMAGE_TOKEN and tok.bos_id == 0
    make_hf_paligemma2(seed, vocab_size=tok.vocab_size).save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops gain nothing from more threads, only contention on the shared
    CI cores. The old setting comes back after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
