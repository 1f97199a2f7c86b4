"""Single-GPU smoke tests: bf16 training steps and generation on CUDA. Run with `make test-gpu`.

Without a CUDA GPU these are skipped by tests/conftest.py, which says so.
"""

import pytest
import torch

from workbench.data.packed import collate
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.job import OptimSection
from workbench.models.base import ModelSection, build_model
from workbench.parallel.single import SingleEngine
from workbench.train.objectives.lm import LMObjective
from workbench.train.optim import build_optimizer

pytestmark = pytest.mark.gpu


def batch(device, B=8, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (B, T + 1), generator=g)
    docs = torch.zeros(B, T + 1, dtype=torch.long)
    mb = collate([{"tokens": t.numpy(), "doc_ids": d.numpy()} for t, d in zip(tokens, docs)])
    return {k: v.to(device) for k, v in mb.items()}


def losses(autocast, steps=8):
    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug"), device="cuda")
    engine = SingleEngine(model, build_optimizer(model, OptimSection(lr=3e-3)), autocast_dtype=autocast)
    obj, mb, out = LMObjective(), batch("cuda"), []
    for _ in range(steps):
        loss = obj.loss({"policy": engine}, mb, obj.units(mb)).loss
        engine.backward(loss)
        engine.clip_grad_norm(1.0)
        engine.step()
        engine.zero_grad()
        out.append(float(loss.detach()))
    return out


def test_bf16_training_steps_track_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32, bf16 = losses(None), losses(torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16[-1] < bf16[0] - 0.5  # it learns the repeated batch
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 2e-2


def test_generation_on_cuda_equals_cpu():
    torch.manual_seed(0)
    cpu = build_model(ModelSection.of("llama3", "debug", init_std=0.2)).eval()
    gpu = build_model(ModelSection.of("llama3", "debug", init_std=0.2), device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    prompts = [[1, 5, 9, 33], [1, 7]]
    params = SamplingParams(max_new_tokens=16)
    torch.backends.cuda.matmul.allow_tf32 = False
    a = KVCacheGenerator(cpu, eos_ids=[]).generate(prompts, params)
    b = KVCacheGenerator(gpu, eos_ids=[]).generate(prompts, params)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    # bf16 weights generate too (values may differ; shapes and finiteness must not)
    gpu_bf16 = build_model(ModelSection.of("llama3", "debug"), device="cuda", dtype=torch.bfloat16).eval()
    out = KVCacheGenerator(gpu_bf16, eos_ids=[]).generate(prompts, params)
    assert all(len(c.tokens) == 16 and all(torch.isfinite(torch.tensor(c.logprobs))) for c in out)
