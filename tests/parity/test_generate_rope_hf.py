"""`workbench generate --hf-dir` on Llama and DeepSeek-V3 directories with every rope type prints transformers'
greedy text, for a prompt that already runs past the original context window and a continuation that goes
further.

Each directory is a real one (save_pretrained + the test tokenizer) whose config.json carries the rope type;
the original window is 16 tokens (for dynamic NTK, whose original is `max_position_embeddings`, that too is 16),
the prompt is about 60 tokens and 24 more are generated, so YaRN's ramp, LongRoPE's long factors and dynamic
NTK's growing base are all exercised where they differ from the unscaled frequencies. The CLI runs in-process
(the subprocess path is tested once in test_hf_interop.py).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from conftest import make_hf_deepseek_v3_dir, make_hf_llama_dir  # noqa: E402

from workbench.cli import main  # noqa: E402

ORIGINAL = 16
PROMPT = ("import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the arguments and run.\"\"\"\n"
          "    args = parse(argv or sys.argv[1:])\n    for name in os.listdir(args.path):\n")
N_NEW = 24


def rope(kind: str, theta: float, rope_dim: int) -> tuple[dict, int]:
    """The rope_parameters of `kind` and the directory's max_position_embeddings."""
    half = rope_dim // 2
    params = {
        "default": {},
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 4.0},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32.0, "beta_slow": 1.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL},
        "longrope": {"original_max_position_embeddings": ORIGINAL,
                     "short_factor": [1.0 + 0.1 * i for i in range(half)],
                     "long_factor": [1.0 + 0.9 * i for i in range(half)]},
    }[kind]
    return {"rope_type": kind, "rope_theta": theta, **params}, ORIGINAL if kind == "dynamic" else 8 * ORIGINAL


def hf_greedy(directory) -> tuple[str, int]:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def generate_cli(directory, capsys) -> str:
    capsys.readouterr()
    rc = main(["generate", "--hf-dir", str(directory), "--prompt", PROMPT, "--max-new-tokens", str(N_NEW),
               "--temperature", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


KINDS = ["default", "linear", "dynamic", "yarn", "llama3", "longrope"]


@pytest.mark.parametrize("kind", KINDS)
def test_llama_directory_generates_transformers_greedy_text(kind, tmp_path, capsys):
    params, max_pos = rope(kind, 10000.0, rope_dim=16)
    d = make_hf_llama_dir(tmp_path / kind, rope=params, max_positions=max_pos, seed=1)
    expected, prompt_len = hf_greedy(d)
    assert prompt_len > 3 * ORIGINAL  # the prompt alone runs past the original window
    assert generate_cli(d, capsys) == expected + "\n"
    assert len(expected.strip()) > 5  # a real continuation


@pytest.mark.parametrize("kind", KINDS)
def test_deepseek_v3_directory_generates_transformers_greedy_text(kind, tmp_path, capsys):
    params, max_pos = rope(kind, 10000.0, rope_dim=8)  # qk_rope_head_dim = 8
    if kind == "yarn":
        params.update(mscale=1.0, mscale_all_dim=1.0)  # DeepSeek's softmax-scale correction as well
    d = make_hf_deepseek_v3_dir(tmp_path / kind, rope=params, max_positions=max_pos, seed=1)
    expected, prompt_len = hf_greedy(d)
    assert prompt_len > 3 * ORIGINAL
    assert generate_cli(d, capsys) == expected + "\n"
    assert len(expected.strip()) > 5
