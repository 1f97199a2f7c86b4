"""The GPU suite: correctness on CUDA first, then every headline speed of the workbench against transformers on the
identical config, in one call, on one card. docs/benchmarks.md ("GPU suite") has the method and the results.

    python benchmarks/gpu_suite.py --out OUT                      # every case, full size (an H100 or H200)
    python benchmarks/gpu_suite.py --out OUT --cases check train  # some cases (each call adds to OUT/results.jsonl)
    python benchmarks/gpu_suite.py --smoke --out OUT              # every case tiny, on the CPU (CI runs this)
    python benchmarks/gpu_suite.py --render OUT/results.jsonl --docs docs/benchmarks.md   # rows into the docs
    python benchmarks/gpu_suite.py --floors                       # the computed floors (no device)

Cases (each is time-capped: `--cap` seconds of measuring per variant, `--long-cap` per long-context probe)
    check     bf16 training steps track fp32 (relative loss gap per step); the workbench's logits equal
              transformers' on the same weights (fp32); greedy tokens of the static decoder (CUDA graph, and
              compiled) equal the eager KVCacheGenerator's (fp32), and their agreement in bf16. A failed check
              makes the exit status 1, after every other case has run.
    train     tokens/s and strict MFU of one training step (LM loss, backward, fused AdamW, bf16 autocast over fp32
              master weights: the trainer's policy) for the 124M shape (16 x 1024) and the 1B shape (4 x 2048),
              eager and compiled (each block: parallel.compile); transformers' LlamaForCausalLM on the identical
              config and policy, eager and (124M) whole-model compiled
    parallel  the 124M step under FSDP2 and ZeRO-2 on a 1-rank process group, eager (ZeRO refuses compile), and
              FSDP2 compiled, each against the plain model in the same mode
    moe       a Mixtral-style MoE (8 experts, top-2, 1 shared expert; active-parameter MFU) against the dense
              Llama 3 whose FFN is as wide as the active experts together, compiled
    decode    the 1B shape in bf16 at batch 1: the memory-bandwidth floor (weight + cache bytes per token / the
              copy bandwidth measured first) and the fraction of it reached by KVCacheGenerator (eager), the
              static decoder (CUDA graph) and the static decoder compiled; batch 32; int8 weight-only against
              bf16 (both compiled + graph, Inductor's coordinate-descent tuning on); transformers' generate at batch
              1 and 32 (64 new tokens), same weights
    long      the longest trainable context (one training step, batch 1, fused AdamW) of the 1B shape: a bounded
              doubling search (1K, 2K, ... up to `--long-max`), then `--bisect` halvings between the last length
              that fit and the first that did not, for: eager attention (the T x T scores kept) and SDPA's fused
              kernel (attention computed tile by tile: chunked), each with and without activation
              checkpointing, and the fused kernel + checkpointing + the chunked LM head (objective.loss_chunk)

Conventions (../shared/reference/performance.md): strict MFU = (6 N + 12 L H Q T) x tokens/s / peak, N the matmul
weights (the head counted, the embedding lookup not; `model.flops_per_token`), peak the card's dense bf16
(workbench.train.trainer.PEAK_BF16: 989 TFLOP/s for the H100 SXM and the H200). A MoE counts its active
parameters. Timing: warm-up steps (compilation happens there) are excluded; then steps until `--steps` or
the cap, synchronised at both ends; tokens/s = tokens / wall time.

Output: OUT/results.jsonl (one record per measurement, appended as each finishes, so a run cut short keeps what
it measured), OUT/results.md (the table), printed as it goes. `--render` turns records into the docs table.
Compiled records carry `graph_breaks` (dynamo's count for that variant: each break splits the compiled region).
`--smoke` shrinks every shape to the debug flavors, 1-2 steps, bf16 autocast for training (fp32 weights for
decoding), compiled variants traced by dynamo but run eagerly (no Inductor kernels), no CUDA graphs, long-context
lengths 64..256 against an out-of-memory simulated above 128 tokens, so the whole suite runs in about a minute on 2
CPU cores: it checks the code paths (and that the workbench's compiled graphs do not break), not the speeds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from workbench.config import from_dict
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.job import JobConfig
from workbench.models.base import ModelSection, build_model, count_params
from workbench.parallel.dims import ParallelDims
from workbench.train.objectives.lm import LMObjective
from workbench.train.trainer import PEAK_BF16, build_engine, peak_flops

# ------------------------------------------------------------------------------------------------ shapes

# name -> (family, flavor, overrides); smoke twin in SMOKE
SHAPES = {
    "124M": ("llama3", "20M", dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000)),
    "1B": ("llama3", "1B", {}),  # the Llama-3.2-1B shape: d 2048, 16 layers, 32 / 8 heads of 64, ffn 8192, tied
    # 8 experts of width 2048, top-2 + 1 shared: 3 x 2048 active FFN width per layer, as the dense twin's ffn
    "moe": ("mixtral", "debug", dict(dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, ffn_dim=2048, n_experts=8,
                                     top_k=2, n_shared_experts=1, vocab_size=32000, max_seq_len=2048)),
    "moe-dense": ("llama3", "20M", dict(dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, ffn_dim=3 * 2048,
                                        vocab_size=32000, max_seq_len=2048)),
    "check": ("llama3", "20M", {}),
}
SMOKE = {
    "124M": ("llama3", "debug", {}),
    "1B": ("llama3", "debug", dict(tie_embeddings=True)),
    "moe": ("mixtral", "debug", dict(n_experts=8, top_k=2, n_shared_experts=1)),
    "moe-dense": ("llama3", "debug", dict(ffn_dim=3 * 128)),
    "check": ("llama3", "debug", dict(init_std=0.2)),
}
# (batch, seq) per training shape; smoke: tiny
TRAIN_BATCH = {"124M": (16, 1024), "1B": (4, 2048), "moe": (8, 2048), "moe-dense": (8, 2048)}
SMOKE_BATCH = (2, 64)
GOALS = {  # the GPU issue's goals
    "mfu_124M": 0.50, "mfu_1B": 0.60, "mfu_moe": 0.40,  # strict MFU (MoE: active parameters)
    "wrapper_gap": 0.05,  # fsdp2 and zero2 on one GPU within 5% of the plain model's tokens/s
    "floor_fraction": 0.75,  # batch-1 decode >= 75% of the memory-bandwidth floor
    "int8_speedup": 1.5,  # int8 weight-only >= 1.5x bf16 tokens/s at batch 1
}


class Suite:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        if not self.smoke and self.device.type != "cuda":
            raise SystemExit("gpu_suite: no CUDA device (torch.cuda.is_available() is False); "
                             "run with --smoke on a CPU")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.failed_checks: list[str] = []
        self.card = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        self.peak = peak_flops(self.device)
        self.compile = not args.no_compile
        self.run_id = time.strftime("%Y-%m-%dT%H:%M:%S")  # `render` keeps each case's newest run
        self._compile = torch.compile
        if self.smoke and self.compile:
            # smoke mode traces every compiled variant with dynamo but runs the graphs eagerly (Inductor's CPU
            # build of each would take minutes): graph breaks (counted in the records) and tracing errors show,
            # kernels are not built; `close` restores torch.compile
            torch.compile = functools.partial(torch.compile, backend="eager")

    def close(self) -> None:
        torch.compile = self._compile
        end_group()

    # ------------------------------------------------------------------------------------------- plumbing

    def section(self, name: str, **extra) -> ModelSection:
        family, flavor, over = (SMOKE if self.smoke else SHAPES)[name]
        return ModelSection.of(family, flavor, **{**over, **extra})

    def batch_shape(self, name: str) -> tuple[int, int]:
        return SMOKE_BATCH if self.smoke else TRAIN_BATCH[name]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Between variants: drop compiled code (each model would add cache entries to the shared Block.forward
        code up to dynamo's recompile limit) and the memory of the last one; reset the peak."""
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # graph_breaks() counts from here
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    @staticmethod
    def graph_breaks() -> int:
        """Graph breaks dynamo counted since the last `free()`: each splits a compiled region in two (a host round
        trip and a lost fusion); the compiled variants' records carry the count, and smoke mode fails on any."""
        return sum(torch._dynamo.utils.counters["graph_break"].values())

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def timed(self, fn, warmup: int, steps: int) -> tuple[float, int]:
        """(seconds per call, calls measured): `warmup` calls (compilation, capture), then up to `steps` calls or
        the `--cap` seconds, synchronised at both ends."""
        if self.smoke:
            warmup, steps = min(warmup, 1), min(steps, 2)
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        n = 0
        while n < steps:
            fn()
            n += 1
            if time.perf_counter() - t0 > self.args.cap:
                break
        self.sync()
        return (time.perf_counter() - t0) / n, n

    def record(self, **rec) -> dict:
        rec = {"card": self.card, "smoke": self.smoke, "torch": torch.__version__, "run": self.run_id, **rec}
        self.records.append(rec)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(format_record(rec), flush=True)
        return rec

    def run_case(self, name: str, fn) -> None:
        print(f"\n== {name} ({self.card})", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one broken case must not cost the others' measurements
            self.error(name, name, e)
            if name == "check":
                self.failed_checks.append(f"check raised {type(e).__name__}")
        finally:
            self.free()
        print(f"== {name} took {time.perf_counter() - t0:.0f} s", flush=True)

    def error(self, case: str, what: str, e: Exception) -> None:
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.record(case=case, what=f"{what}: stopped by an error", status="error",
                    note=f"{type(e).__name__}: {first}"[:300])

    def attempt(self, case: str, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None after recording the error: one variant's failure (a compile error, an
        out-of-memory) must not cost the case's other variants."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.error(case, what, e)
            return None
        finally:
            self.free()

    def mfu(self, flops_per_token: float, tokens_s: float) -> float | None:
        return flops_per_token * tokens_s / self.peak if self.peak else None

    # ---------------------------------------------------------------------------------------------- models

    def job(self, section: ModelSection, batch: tuple[int, int], backend: str = "single", compile: bool = False,
            ac: str = "none", loss_chunk: int = 0, fsdp_precision: str = "autocast") -> JobConfig:
        """The trainer's config for one step of `section`: AdamW, bf16 autocast over fp32 weights (on the CPU too
        in smoke mode, so the policy's code paths run), no data set (batches are random). FSDP2 autocasts as the
        plain model does unless `fsdp_precision` = "params" (its default policy: bf16 parameters)."""
        objective = {"name": "lm", **({"loss_chunk": loss_chunk} if loss_chunk else {})}
        return from_dict(JobConfig, {
            "run": {"name": "gpu-suite", "device": self.device.type, "precision": "bf16"},
            "model": section.to_config_dict(),
            "data": {"seq_len": batch[1]},
            "train": {"steps": 1000, "micro_batch_size": batch[0]},
            "optim": {"name": "adamw", "lr": 1e-4, "warmup_steps": 0, "grad_clip": 1.0},
            "objective": objective,
            "parallel": {"backend": backend, "compile": compile, "activation_checkpointing": ac,
                         "fsdp_mixed_precision": fsdp_precision},
        })

    def engine(self, job: JobConfig):
        """(model, engine) as the trainer builds them (build_engine: checkpointing, compile, then the wrapper);
        fsdp2 and zero2 on a 1-rank process group (ParallelDims.one_rank)."""
        backend = job.parallel.backend
        dims = (ParallelDims.from_config(job.parallel, 1, job.model.config) if backend == "single"
                else ParallelDims.one_rank(backend))
        if backend != "single":
            one_rank_group(self.device)
        model = build_model(job.model, self.device)
        autocast = torch.bfloat16 if job.run.precision == "bf16" else None
        return model, build_engine(model, job, dims, autocast)

    def random_batch(self, batch: tuple[int, int], vocab: int, seed: int = 0) -> dict:
        """One micro-batch of random tokens, one document per row (plain causal attention: no document mask)."""
        B, T = batch
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
        mb = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        return {k: v.to(self.device) for k, v in mb.items()}

    def step_fn(self, engine, job: JobConfig, mb: dict):
        """One training step as Trainer._update runs it: the LM loss, backward, the optimizer step with the
        gradient norm and its finiteness check (one host sync, as in the trainer)."""
        objective = LMObjective(job.objective)
        engines = {"policy": engine}
        units = objective.units(mb)
        losses = []

        def step():
            out = objective.loss(engines, mb, units)
            engine.backward(out.loss)
            loss = float(out.loss.detach())
            engine.optimizer_step(job.optim.grad_clip, loss)
            losses.append(loss)

        return step, losses

    def hf_model(self, section: ModelSection, ours=None, dtype=torch.float32):
        """transformers' model on the identical config (and `ours`' weights when given)."""
        import transformers

        from workbench.checkpoint.hf import adapter_for

        names = {"llama3": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
        adapter = adapter_for(section.family)
        cfg_cls = getattr(transformers, names[section.family].replace("ForCausalLM", "Config"))
        cfg = cfg_cls(**adapter.config_to_hf(section.config), attn_implementation="sdpa")
        with torch.device(self.device):
            model = getattr(transformers, names[section.family])(cfg).to(dtype)
        if ours is not None:
            model.load_state_dict(adapter.state_dict_to_hf(ours.state_dict()), strict=not section.config.tie_embeddings)
        return model

    # ------------------------------------------------------------------------------------------------ check

    def case_check(self) -> None:
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
        try:
            self.checks()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def checks(self) -> None:
        dev = self.device
        section = self.section("check")
        # 1. bf16 training tracks fp32: the same weights and batches, 8 steps
        curves = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            job = self.job(section, (8, 128) if not self.smoke else SMOKE_BATCH)
            job.run.precision = precision
            model, engine = self.engine(job)
            step, losses = self.step_fn(engine, job, self.random_batch((8, 128) if not self.smoke else SMOKE_BATCH,
                                                                    section.config.vocab_size))
            for _ in range(8 if not self.smoke else 3):
                step()
            curves[precision] = losses
            del model, engine
        gap = max(abs(a - b) / abs(a) for a, b in zip(curves["fp32"], curves["bf16"]))
        ok = gap < 2e-2 and all(math.isfinite(x) for x in curves["bf16"])
        self.check("bf16 training tracks fp32", ok, f"max relative loss gap {gap:.2e} over {len(curves['fp32'])} "
                   f"steps (bound 2e-2); losses fp32 {curves['fp32'][0]:.3f} -> {curves['fp32'][-1]:.3f}")
        # 2. logits equal transformers' on the same weights (fp32)
        torch.manual_seed(0)
        ours = build_model(section, dev).eval()
        theirs = self.hf_model(section, ours).eval()
        ids = torch.randint(0, section.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            a = ours.logits(ours({"input_ids": ids}).hidden)
            b = theirs(input_ids=ids).logits
        err = float((a - b).abs().max() / b.abs().max())
        self.check("logits equal transformers' (fp32)", err < 1e-4, f"max abs diff / max abs logit = {err:.1e} (bound 1e-4)")
        del theirs
        # 3. greedy tokens: static decoder (eager / CUDA graph / compiled) == KVCacheGenerator, fp32 and bf16
        from workbench.inference.static_decode import StaticDecoder

        prompts = [[1, 5, 9, 33, 7, 2], [1, 7, 4, 4, 8, 3]]
        n_new = 32
        ref = [c.tokens for c in KVCacheGenerator(ours, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=n_new))]
        ids = torch.tensor(prompts, device=dev)
        graphed = dev.type == "cuda"
        modes = {"eager": dict(cuda_graph=False)}
        if graphed:
            modes["cuda graph"] = dict(cuda_graph=True)
        if self.compile:
            modes["compiled" + (" + cuda graph" if graphed else "")] = dict(cuda_graph=graphed, compile=True)
        for mode, kw in modes.items():
            dec = StaticDecoder(ours, max_batch=2, max_len=len(prompts[0]) + n_new, **kw)
            got = dec.generate_ids(ids, n_new).tolist()
            self.check(f"static decoder ({mode}) = KVCacheGenerator, fp32", got == ref,
                       f"{sum(x == y for r, s in zip(got, ref) for x, y in zip(r, s))} of {2 * n_new} tokens equal")
        ours_bf16 = build_model(section, dev, dtype=torch.bfloat16).eval()  # RoPE's buffer stays fp32
        ours_bf16.load_state_dict(ours.state_dict())
        ref16 = [c.tokens for c in KVCacheGenerator(ours_bf16, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=n_new))]
        for mode, kw in modes.items():
            got = StaticDecoder(ours_bf16, max_batch=2, max_len=len(prompts[0]) + n_new, **kw).generate_ids(ids, n_new).tolist()
            same = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), n_new) for r, s in zip(got, ref16)]
            self.record(case="check", what=f"static decoder ({mode}) vs KVCacheGenerator, bf16", status="info",
                        note=f"identical prefixes of {same} of {n_new} tokens (bf16 kernels may round differently)")

    def check(self, what: str, ok: bool, note: str, case: str = "check") -> None:
        self.record(case=case, what=what, status="pass" if ok else "FAIL", note=note)
        if not ok:
            self.failed_checks.append(what)

    # ------------------------------------------------------------------------------------------------ train

    def train_ours(self, name: str, case: str, backend: str = "single", compile: bool = False, label: str = "",
                   fsdp_precision: str = "autocast") -> dict:
        """The workbench's training step on `name`'s shape and batch: tokens/s, strict MFU, peak memory and the
        first step's loss (the same seed, weights and batch for every backend)."""
        section = self.section(name)
        batch = self.batch_shape(name)
        self.free()
        torch.manual_seed(0)
        job = self.job(section, batch, backend=backend, compile=compile, fsdp_precision=fsdp_precision)
        try:
            model, engine = self.engine(job)
            fpt = model.flops_per_token(batch[1])
            n_params = count_params(model)
            step, losses = self.step_fn(engine, job, self.random_batch(batch, section.config.vocab_size))
            sec, n = self.timed(step, warmup=3 if compile else 2, steps=self.args.steps)
            breaks = self.graph_breaks() if compile else None
            del model, engine, step
        finally:
            if backend != "single":
                end_group()
        tokens_s = batch[0] * batch[1] / sec
        policy = f" (bf16 {fsdp_precision})" if backend == "fsdp2" else ""
        return self.record(case=case, what=label or f"workbench {name} {backend}{policy}{' compiled' if compile else ''}",
                           impl="workbench", shape=name, params=n_params, batch=list(batch), backend=backend,
                           compile=compile, tokens_s=tokens_s, mfu=self.mfu(fpt, tokens_s), steps=n,
                           peak_gib=self.peak_gib(), flops_per_token=fpt, first_loss=losses[0], graph_breaks=breaks)

    def train_theirs(self, name: str, case: str, compile: bool = False) -> dict:
        """transformers' LlamaForCausalLM on the identical config, batch and policy (fp32 weights, bf16 autocast,
        fused AdamW on CUDA, clipping at 1.0); compiled whole when `compile`."""
        section = self.section(name)
        batch = self.batch_shape(name)
        self.free()
        torch.manual_seed(0)
        model = self.hf_model(section).train()
        fpt = build_model(section, "meta").flops_per_token(batch[1])  # the same convention for both
        fused = {"fused": True} if self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
        fwd = torch.compile(model) if compile else model
        mb = self.random_batch(batch, section.config.vocab_size)

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = fwd(input_ids=mb["input_ids"], labels=mb["input_ids"]).loss  # HF shifts the labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())

        sec, n = self.timed(step, warmup=3 if compile else 2, steps=self.args.steps)
        tokens_s = batch[0] * batch[1] / sec
        rec = self.record(case=case, what=f"transformers {name}{' compiled' if compile else ''}", impl="transformers",
                          shape=name, params=count_params(model), batch=list(batch), compile=compile, tokens_s=tokens_s,
                          mfu=self.mfu(fpt, tokens_s), steps=n, peak_gib=self.peak_gib(), flops_per_token=fpt,
                          graph_breaks=self.graph_breaks() if compile else None)
        return rec  # the model and its optimizer go with this frame

    def case_train(self) -> None:
        modes = [False, True] if self.compile else [False]
        for name in ("124M", "1B"):
            ours = {c: self.attempt("train", f"workbench {name}{' compiled' if c else ''}", self.train_ours, name,
                                    "train", compile=c) for c in modes}
            ref_modes = modes if name == "124M" else [False]  # transformers 1B compiled: minutes of compile, not run
            refs = {c: self.attempt("train", f"transformers {name}{' compiled' if c else ''}", self.train_theirs, name,
                                    "train", compile=c) for c in ref_modes}
            done = [r for r in ours.values() if r]
            if not done:
                continue
            best = max(done, key=lambda r: r["tokens_s"])
            # the reference in the same mode when it ran, else its best
            ref = refs.get(best["compile"]) or max((r for r in refs.values() if r), key=lambda r: r["tokens_s"],
                                                   default=None)
            self.goal(f"strict MFU {name} >= {GOALS[f'mfu_{name}']:.0%}", best, best["mfu"], GOALS[f"mfu_{name}"], ref)

    def goal(self, what: str, best: dict, value: float | None, goal: float, ref: dict | None = None,
             higher: bool = True, note: str = "") -> None:
        """A goal of the issue: met when `value` >= goal (`higher`) or <= goal; not judged in smoke mode (CPU
        speeds say nothing about a GPU) or without a value (no MFU on a card of unknown peak)."""
        met = None if self.smoke or value is None else (value >= goal if higher else value <= goal)
        ratio = best["tokens_s"] / ref["tokens_s"] if ref else None
        self.record(case=best["case"], what=f"goal: {what}", status="goal", value=value, goal=goal, met=met,
                    best=best["what"], ratio_to_reference=ratio, reference=ref["what"] if ref else None, note=note)

    # --------------------------------------------------------------------------------------------- parallel

    def case_parallel(self) -> None:
        """FSDP2 and ZeRO-2 on one device against the plain model under one precision policy (fp32 weights, bf16
        autocast: FSDP2 with fsdp_mixed_precision = "autocast"), eager and (FSDP2; ZeRO refuses compile) compiled.
        The same seed, weights and batch, so the first step's loss must be the plain model's. FSDP2's default
        policy (bf16 parameters) is measured too, as information: it computes in another precision."""
        name = "124M"
        for compile in [False, True] if self.compile else [False]:
            mode = "compiled" if compile else "eager"
            plain = self.attempt("parallel", f"workbench {name} single {mode}", self.train_ours, name, "parallel",
                                 compile=compile)
            variants = [("fsdp2", "autocast")] + ([] if compile else [("zero2", "autocast"), ("fsdp2", "params")])
            for backend, policy in variants:
                rec = self.attempt("parallel", f"workbench {name} {backend} {mode}", self.train_ours, name, "parallel",
                                   backend=backend, compile=compile, fsdp_precision=policy)
                if rec is None or plain is None:
                    continue
                rel = abs(rec["first_loss"] - plain["first_loss"]) / abs(plain["first_loss"])
                same_policy = policy == "autocast"
                bound = 1e-5 if same_policy else 2e-2  # the same ops in the same precision, or bf16 parameters
                self.check(f"{rec['what']} computes the plain model's first loss", rel < bound,
                           f"{rec['first_loss']:.6f} vs {plain['first_loss']:.6f} (relative gap {rel:.1e}, bound "
                           f"{bound:.0e})", case="parallel")
                if same_policy:
                    gap = 1 - rec["tokens_s"] / plain["tokens_s"]  # the share of tokens/s lost to the wrapper
                    self.goal(f"{backend} within 5% of the plain model ({mode})", rec, gap, GOALS["wrapper_gap"],
                              plain, higher=False)

    # -------------------------------------------------------------------------------------------------- moe

    def case_moe(self) -> None:
        compile = self.compile
        tag = " compiled" if compile else ""
        moe = self.attempt("moe", "workbench MoE", self.train_ours, "moe", "moe", compile=compile,
                           label=f"workbench MoE 8x top-2 + 1 shared{tag}")
        dense = self.attempt("moe", "workbench dense twin", self.train_ours, "moe-dense", "moe", compile=compile,
                             label=f"workbench dense, equal active size{tag}")
        if moe is not None:
            self.goal("MoE active-parameter MFU >= 40%", moe, moe["mfu"], GOALS["mfu_moe"], dense)

    # ----------------------------------------------------------------------------------------------- decode

    def bandwidth(self) -> float:
        """Bytes per second of a device-to-device copy of 1 GiB (read + write counted), best of 10, timed with CUDA
        events (the CPU's clock in smoke mode)."""
        n = (2**30 if not self.smoke else 2**24) // 2
        src = torch.empty(n, dtype=torch.bfloat16, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        best = math.inf
        for _ in range(10):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                dst.copy_(src)
                best = min(best, time.perf_counter() - t0)
        return 2 * n * 2 / best

    def case_decode(self) -> None:
        """Batch-1 and batch-32 greedy decoding of the 1B shape (bf16 weights; fp32 in smoke mode) against the
        memory-bandwidth floor: the bytes a step reads (the weights, the tied head, the cache's mean length) over the
        copy bandwidth measured first. The ladder: KVCacheGenerator (eager Python loop), the static decoder as one
        CUDA graph per step, the same compiled first; then int8 weight-only through the best compiled mode, and
        transformers' generate on the same weights. Compiled decode sets Inductor's coordinate-descent tuning, which
        is what turns a one-row matmul (and the int8 dequantising one) into a fused reduction instead of a cuBLAS call
        beside a separate cast (gpt-fast does the same)."""
        from workbench.inference.quant import linear_weight_bytes, quantize_model
        from workbench.inference.static_decode import StaticDecoder

        section = self.section("1B")
        prompt_len, n_new = (16, 256) if not self.smoke else (8, 8)
        bw = self.bandwidth()
        self.record(case="decode", what="memory bandwidth (device-to-device copy of 1 GiB)", status="info",
                    value=bw / 1e12, note="TB/s, read + write bytes / time, best of 10")
        torch.manual_seed(0)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = build_model(section, self.device, dtype=dtype).eval()
        cfg = section.config
        weight_bytes = weight_bytes_per_token(model)
        kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.hd * model.tok_embeddings.weight.element_size()

        def floor(batch: int, wbytes: float, new: int) -> float:  # tokens/s at the bandwidth bound
            return batch * bw / (wbytes + batch * kv_bytes * (prompt_len + new / 2))

        g = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(0, cfg.vocab_size, (b, prompt_len), generator=g).to(self.device) for b in (1, 32)}
        if self.smoke:
            prompts = {b: p[: min(b, 4)] for b, p in prompts.items()}

        def run(label: str, fn, batch: int, wbytes=weight_bytes, new=n_new, warmup: int = 1, compiled: bool = False,
                **extra) -> dict:
            sec, n = self.timed(fn, warmup=warmup, steps=5)
            if compiled:
                extra["graph_breaks"] = self.graph_breaks()
            rows = prompts[batch].shape[0]
            tokens_s = rows * new / sec
            bound = floor(rows, wbytes, new)
            return self.record(case="decode", what=label, impl="transformers" if "transformers" in label else "workbench",
                               batch=rows, new_tokens=new, tokens_s=tokens_s, floor_tokens_s=bound,
                               floor_fraction=tokens_s / bound, steps=n, weight_gb=wbytes / 1e9, **extra)

        def static(label: str, batches=(1, 32), wbytes=weight_bytes, **kw) -> dict | None:
            """The static decoder in one mode, per batch; its batch-1 record."""
            dec = StaticDecoder(model, max_batch=max(prompts[b].shape[0] for b in batches), max_len=prompt_len + n_new,
                                **kw)
            recs = {b: run(f"{label}, batch {b}", lambda b=b: dec.generate_ids(prompts[b], n_new), b, wbytes=wbytes,
                           warmup=2, compiled=kw.get("compile", False)) for b in batches}  # the first call captures (and compiles)
            return recs[1]

        # the ladder at batch 1 (and 32): eager loop, CUDA graph, compiled + graph
        eager = KVCacheGenerator(model, eos_ids=[])
        p1 = prompts[1][0].tolist()
        ladder = [self.attempt("decode", "KVCacheGenerator", run, "KVCacheGenerator (eager), batch 1",
                               lambda: eager.generate([p1], SamplingParams(max_new_tokens=n_new)), 1)]
        graphed = self.device.type == "cuda"
        graph_label = "static decoder" + (" + CUDA graph" if graphed else " (eager: no CUDA)")
        ladder.append(self.attempt("decode", graph_label, static, graph_label, cuda_graph=graphed))
        compiled = None
        if self.compile:
            label = "static decoder compiled" + (" + CUDA graph" if graphed else "")
            with inductor_tuning():
                compiled = self.attempt("decode", "static decoder compiled", static, label, cuda_graph=graphed,
                                        compile=True)
            ladder.append(compiled)
        ref1 = self.attempt("decode", "transformers generate", self.decode_reference, section, model, dtype, prompts,
                            run, n_new)
        done = [r for r in ladder if r]
        if done:
            best = max(done, key=lambda r: r["tokens_s"])
            self.goal("batch-1 decode >= 75% of the bandwidth floor", best, best["floor_fraction"],
                      GOALS["floor_fraction"], ref1)
        # int8 weight-only against bf16 in the same mode: compiled + graph (uncompiled, each step would widen every
        # weight to bf16 in a separate kernel: more bytes than bf16 itself); the graph mode in smoke / --no-compile
        base = compiled if self.compile else ladder[1]
        if base is None:
            return
        kw = dict(cuda_graph=graphed, compile=self.compile)
        before = linear_weight_bytes(model)
        quantize_model(model, "int8")
        q_bytes = weight_bytes - before + linear_weight_bytes(model)
        mode = base["what"].rsplit(",", 1)[0]
        with inductor_tuning() if self.compile else contextlib.nullcontext():
            q = self.attempt("decode", "int8 weight-only", static, f"int8 weight-only, {mode}", batches=(1,),
                             wbytes=q_bytes, **kw)
        if q is not None:
            speedup = q["tokens_s"] / base["tokens_s"]
            self.goal("int8 weight-only >= 1.5x bf16 at batch 1", q, speedup, GOALS["int8_speedup"], base,
                      note=f"weights read per token {weight_bytes / 1e9:.2f} -> {q_bytes / 1e9:.2f} GB (the bound on "
                           f"the speed-up: {weight_bytes / q_bytes:.2f}x)")

    def decode_reference(self, section, model, dtype, prompts: dict, run, n_new: int) -> dict:
        """transformers' generate on the same weights and dtype, batch 1 and 32 (at most 64 new tokens: its eager
        loop is slow); returns the batch-1 record. The reference model is freed with this frame."""
        theirs = self.hf_model(section, model, dtype=dtype).eval()
        new = min(n_new, 64)

        @torch.inference_mode()
        def generate(batch: int):
            theirs.generate(prompts[batch], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            eos_token_id=None, pad_token_id=0)

        ref1 = run("transformers generate, batch 1", lambda: generate(1), 1, new=new)
        run("transformers generate, batch 32", lambda: generate(32), 32, new=new)
        return ref1

    # ------------------------------------------------------------------------------------------------- long

    def case_long(self) -> None:
        """The longest context one training step of the 1B shape fits in at batch 1, per variant (module notes).
        Every probe is a record (status "probe"), so a call cut off mid-search keeps what it learnt. Smoke mode
        searches 64..256 tokens with an out-of-memory simulated above 128 (the CPU has no memory limit to hit),
        so the bisection and the no-fit path run, and chunks the head by 48 tokens so the chunks are many."""
        start = 1024 if not self.smoke else 64
        top = self.args.long_max if not self.smoke else 256
        chunk = 4096 if not self.smoke else 48
        variants = [("eager attention (T x T scores kept)", "math", "none", 0),
                    ("eager attention + activation checkpointing", "math", "full", 0),
                    ("fused attention (chunked)", "sdpa", "none", 0),
                    ("fused attention + activation checkpointing", "sdpa", "full", 0),
                    ("fused attention + checkpointing + chunked LM head", "sdpa", "full", chunk)]
        for label, attn, ac, loss_chunk in variants:
            self.attempt("long", label, self.long_variant, label, attn, ac, loss_chunk, start, top)

    def long_variant(self, label: str, attn: str, ac: str, loss_chunk: int, start: int, top: int) -> None:
        section = self.section("1B", attn_backend=attn)
        what = f"longest trainable context, 1B, batch 1: {label}"
        probes: list[dict] = []

        def fits(T: int) -> bool:
            ok, info = self.long_probe(section, T, ac, loss_chunk)
            probes.append({"T": T, "fits": ok, **info})
            self.record(case="long", what=f"{what}: {T} tokens", status="probe", T=T, fits=ok, **info)
            return ok

        def too_slow() -> bool:  # the next doubling would take about 4x as long (attention is O(T^2))
            return 4 * probes[-1].get("seconds", 0) > self.args.long_cap

        best, first_fail, why = doubling_search(fits, start, top, self.args.bisect, too_slow=too_slow)
        last = next((p for p in reversed(probes) if p["T"] == best), {})
        self.record(case="long", what=what, impl="workbench", status="info", value=best, first_fail=first_fail,
                    stopped_by=why, peak_gib=last.get("peak_gib"), tokens_s=last.get("tokens_s"),
                    seconds=last.get("seconds"), attn_backend=attn, activation_checkpointing=ac, loss_chunk=loss_chunk)

    def long_probe(self, section: ModelSection, T: int, ac: str, loss_chunk: int) -> tuple[bool, dict]:
        """One training step at batch 1 x T, then a second one timed when the first took under 5 s (the first
        allocates AdamW's state, so it sets the peak): (fits, {peak memory, seconds, tokens/s} or {why})."""
        self.free()
        model = engine = step = None
        try:
            if self.smoke and T > 128:
                raise torch.OutOfMemoryError("smoke mode: out of memory simulated above 128 tokens")
            job = self.job(section, (1, T), ac=ac, loss_chunk=loss_chunk)
            model, engine = self.engine(job)
            step, _ = self.step_fn(engine, job, self.random_batch((1, T), section.config.vocab_size))
            self.sync()
            t0 = time.perf_counter()
            step()
            self.sync()
            sec = time.perf_counter() - t0
            if sec < 5:
                t0 = time.perf_counter()
                step()
                self.sync()
                sec = time.perf_counter() - t0
            return True, {"peak_gib": self.peak_gib(), "seconds": sec, "tokens_s": T / sec}
        except RuntimeError as e:  # torch.OutOfMemoryError is one; cuBLAS / cuDNN report theirs as RuntimeError
            if not is_out_of_memory(e):
                raise
            return False, {"peak_gib": self.peak_gib(), "why": f"{type(e).__name__}: {str(e).strip()[:160]}"}
        finally:
            del model, engine, step
            self.free()


# ---------------------------------------------------------------------------------------------------- helpers

def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table (a lookup reads one row),
    plus the head when it is the tied embedding (the head reads all of it)."""
    total, seen = 0, set()
    for name, p in model.named_parameters():
        if id(p) in seen or "tok_embeddings" in name:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    for name, b in model.named_buffers():  # int8 weights and their scales are buffers once quantized
        if "rope" not in name:
            total += b.numel() * b.element_size()
    if getattr(model, "output", None) is None:
        w = model.tok_embeddings.weight
        total += w.numel() * w.element_size()
    return total


OOM_MARKS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
"""Allocation failures only: a cuDNN internal or execution error may be a real kernel bug (or a sticky CUDA error
that would fail every later probe), so it stops the variant as an error instead of passing for a memory limit."""


@contextlib.contextmanager
def inductor_tuning():
    """Inductor's coordinate-descent tuning for the duration (it turns a one-row matmul into a fused reduction,
    which decoding needs; it makes compiles slower, so nothing else gets it)."""
    import torch._inductor.config as inductor

    before = inductor.coordinate_descent_tuning
    inductor.coordinate_descent_tuning = True
    try:
        yield
    finally:
        inductor.coordinate_descent_tuning = before


def floors() -> str:
    """The computed floors of docs/benchmarks.md (no device: models on the meta device): FLOPs per token and the
    tokens/s at 50% / 60% strict MFU per training shape; the 1B's decode bytes per token in bf16 and int8 and the
    tokens/s those allow at the H100 SXM's specified and the H200's measured (gpu-baseline.md) bandwidth."""
    lines = ["| shape | params | GFLOP / token (T) | tok/s at 50% / 60% MFU |", "|---|---|---|---|"]
    for name in ("124M", "1B", "moe-dense"):
        family, flavor, over = SHAPES[name]
        model = build_model(ModelSection.of(family, flavor, **over), "meta")
        T = TRAIN_BATCH[name][1]
        fpt = model.flops_per_token(T)
        peak = PEAK_BF16["H100 SXM"]
        lines.append(f"| {name} | {count_params(model) / 1e6:,.1f}M | {fpt / 1e9:.3f} (T = {T}) | "
                     f"{0.5 * peak / fpt:,.0f} / {0.6 * peak / fpt:,.0f} |")
    model = build_model(ModelSection.of(*SHAPES["1B"][:2], **SHAPES["1B"][2]), "meta", dtype=torch.bfloat16)
    bf16 = weight_bytes_per_token(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # int8: each linear's weight 1 byte per entry plus an fp32 scale per output row, instead of 2 bytes per entry
    int8 = bf16 - sum(m.weight.numel() * 2 - m.weight.numel() - m.out_features * 4 for m in linears)
    lines += ["", "| 1B decode, batch 1 | bytes / token | tok/s at 3.35 TB/s | at 4.26 TB/s |", "|---|---|---|---|"]
    for label, nbytes in (("bf16", bf16), ("int8 weight-only", int8)):
        lines.append(f"| {label} | {nbytes / 1e9:.3f} GB | {3.35e12 / nbytes:,.0f} | {4.26e12 / nbytes:,.0f} |")
    lines.append(f"\nint8 / bf16 bound: {bf16 / int8:.2f}x")
    return "\n".join(lines)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure, however the library reports it (PyTorch's OutOfMemoryError, or a cuBLAS / cuDNN
    status inside a RuntimeError when their workspace cannot be allocated)."""
    return isinstance(e, torch.OutOfMemoryError) or any(m in str(e) for m in OOM_MARKS)


def doubling_search(fits, start: int, top: int, bisect: int, too_slow=lambda: False) -> tuple[int, int | None, str]:
    """The largest T in [start, top] for which fits(T), to a resolution of (first fail - last fit) / 2^bisect:
    T = start, 2 start, ... while it fits (stopping at `top`, or once `too_slow()` says a probe took too long),
    then `bisect` halvings of the gap. Returns (largest T that fit (0: not even start), smallest T that did not
    (None: none failed), why the search stopped)."""
    lo, hi, T = 0, None, start
    while T <= top:
        if not fits(T):
            hi = T
            break
        lo = T
        if too_slow():
            return lo, None, "step time cap"
        T *= 2
    if hi is None:
        return lo, None, "length cap" if lo else "no fit"
    if lo == 0:
        return 0, hi, "no fit"
    for _ in range(bisect):
        mid = (lo + hi) // 2 // 64 * 64  # lengths stay multiples of 64
        if mid <= lo or mid >= hi:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, "out of memory"


_GROUP: dict = {}


def one_rank_group(device: torch.device) -> None:
    """A 1-rank process group on 127.0.0.1 (nccl on CUDA, gloo on CPU) for the 1-rank FSDP2 / ZeRO layouts."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    _GROUP["store"] = store


def end_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP.clear()
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


def fmt(x, spec: str = ",.0f") -> str:
    return "—" if x is None else format(x, spec)


def speed_details(r: dict) -> list[str]:
    """What a speed record adds to its tokens/s: strict MFU, the share of the decode floor, peak memory."""
    parts = []
    if r.get("mfu") is not None:
        parts.append(f"strict MFU {r['mfu']:.1%}")
    if r.get("floor_fraction") is not None:
        parts.append(f"{r['floor_fraction']:.0%} of the {fmt(r['floor_tokens_s'])} tok/s floor")
    if r.get("peak_gib") is not None:
        parts.append(f"peak {r['peak_gib']:.1f} GiB")
    return parts


def format_record(r: dict) -> str:
    if r.get("status") == "probe":
        if r["fits"]:
            return (f"    {r['T']:>8,} tokens: fits, {r['seconds']:.2f} s a step, peak "
                    f"{fmt(r.get('peak_gib'), '.1f')} GiB")
        return f"    {r['T']:>8,} tokens: does not fit ({r.get('why')})"
    if r.get("status") == "goal":
        unit = ".1%" if isinstance(r.get("goal"), float) and r["goal"] < 1 else ".2f"
        met = {True: "met", False: "NOT met", None: "—"}[r.get("met")]
        return f"  {r['what']}: {fmt(r.get('value'), unit)} (goal {fmt(r.get('goal'), unit)}) {met}; best {r.get('best')}"
    if "tokens_s" in r and r.get("case") != "long":
        return f"  {r['what']}: " + ", ".join([f"{fmt(r['tokens_s'])} tok/s", *speed_details(r)])
    value = f" {r['value']:,}" if isinstance(r.get("value"), int) else (f" {r['value']:.3g}" if isinstance(r.get("value"), float) else "")
    return f"  [{r.get('status', '')}] {r['what']}:{value} {r.get('note', '') or ''}".rstrip()


def render(records: list[dict]) -> str:
    """The docs table: per card and case, the records of its newest run (older runs' rows, an error since fixed
    included, drop out), in case order; smoke records only when there is nothing else; no per-probe rows."""
    order = ["check", "train", "parallel", "moe", "decode", "long"]
    real = [r for r in records if not r.get("smoke")]
    records = [r for r in (real or records) if r.get("status") != "probe"]
    newest: dict = {}
    for r in records:
        key = (r["card"], r["case"])
        newest[key] = max(newest.get(key, ""), r.get("run", ""))
    latest: dict = {}
    for r in records:
        if r.get("run", "") == newest[(r["card"], r["case"])]:
            latest[(r["card"], r["case"], r["what"])] = r
    rows = ["| card | case | what | figure | detail |", "|---|---|---|---|---|"]
    for (card, case, what), r in sorted(latest.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])
                                                                      if kv[0][1] in order else 99)):
        figure, detail = row_cells(r)
        rows.append(f"| {card} | {case} | {what} | {figure} | {detail} |")
    return "\n".join(rows)


def row_cells(r: dict) -> tuple[str, str]:
    if r.get("status") == "goal":
        pct = isinstance(r.get("goal"), float) and r["goal"] < 1
        spec = ".1%" if pct else ".2f"
        met = {True: "**met**", False: "not met", None: "—"}[r.get("met")]
        detail = f"goal {fmt(r['goal'], spec)}; {r.get('best')}"
        if r.get("ratio_to_reference") is not None:
            detail += f"; {r['ratio_to_reference']:.2f}x {r.get('reference')}"
        return f"{fmt(r.get('value'), spec)} ({met})", detail
    if r.get("case") == "long" and "value" in r:
        return f"{r['value']:,} tokens", (f"first failure {fmt(r.get('first_fail'), ',')}; stopped by "
                                         f"{r.get('stopped_by')}; peak {fmt(r.get('peak_gib'), '.1f')} GiB")
    if "tokens_s" in r:
        batch = [f"batch {r['batch']}"] if r.get("batch") else []
        return f"{fmt(r['tokens_s'])} tok/s", "; ".join([*speed_details(r), *batch])
    return r.get("status", ""), (r.get("note") or "").replace("|", "/")


MARK_BEGIN, MARK_END = "<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"


def write_docs(path: Path, table: str) -> None:
    """Replace the text between the suite's markers in `path` with `table`."""
    text = path.read_text()
    if MARK_BEGIN not in text or MARK_END not in text:
        raise SystemExit(f"{path}: no {MARK_BEGIN} ... {MARK_END} block to fill")
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    path.write_text(f"{head}{MARK_BEGIN}\n{table}\n{MARK_END}{tail}")


def read_records(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{i}: not a JSON record (a run cut off mid-line?); skipped", file=sys.stderr)
    return records


CASES = ("check", "train", "parallel", "moe", "decode", "long")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu-suite", help="folder for results.jsonl and results.md")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES,
                    help="which cases, run in the order given (default: all, in this order)")
    ap.add_argument("--smoke", action="store_true", help="every case tiny on the CPU (code paths, not speeds)")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per variant (at most)")
    ap.add_argument("--cap", type=float, default=20.0, help="seconds of measuring per variant (at most)")
    ap.add_argument("--long-max", type=int, default=262144, help="longest context the long-context search tries")
    ap.add_argument("--long-cap", type=float, default=30.0, help="stop doubling once one step takes longer (s)")
    ap.add_argument("--bisect", type=int, default=2, help="halvings between the last fit and the first failure")
    ap.add_argument("--no-compile", action="store_true", help="eager only (skip every compiled variant)")
    ap.add_argument("--floors", action="store_true", help="print the computed floors (no device, seconds)")
    ap.add_argument("--render", type=Path, help="a results.jsonl to turn into the docs table (no measuring)")
    ap.add_argument("--docs", type=Path, help="with --render: write the table into this file's gpu-suite block")
    args = ap.parse_args(argv)
    for name in ("steps", "cap", "long_cap"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.long_max < 1024:
        ap.error(f"--long-max must be >= 1024 (the search starts there), got {args.long_max}")
    if args.bisect < 0:
        ap.error(f"--bisect must be >= 0, got {args.bisect}")
    if args.floors:
        print(floors())
        return 0
    if args.render is not None:
        if not args.render.is_file():
            ap.error(f"--render: no file {args.render}")
        table = render(read_records(args.render))
        if args.docs:
            write_docs(args.docs, table)
            print(f"wrote the table into {args.docs}")
        else:
            print(table)
        return 0
    if args.docs:
        ap.error("--docs goes with --render (measure first, then render the records into the docs)")
    suite = Suite(args)
    print(f"gpu_suite on {suite.card} ({suite.device}), torch {torch.__version__}, peak "
          f"{fmt(suite.peak and suite.peak / 1e12)} TFLOP/s, compile {'on' if suite.compile else 'off'}", flush=True)
    t0 = time.perf_counter()
    try:
        for case in dict.fromkeys(args.cases):  # in the order given: the most wanted figures first
            suite.run_case(case, getattr(suite, f"case_{case}"))
    except KeyboardInterrupt:
        print("\ngpu_suite: interrupted; the records so far are kept", file=sys.stderr)
        return 130
    finally:
        suite.close()
        if (suite.out / "results.jsonl").is_file():
            (suite.out / "results.md").write_text(render(read_records(suite.out / "results.jsonl")) + "\n")
        print(f"\ngpu_suite: {len(suite.records)} records in {time.perf_counter() - t0:.0f} s -> "
              f"{suite.out}/results.jsonl, results.md", flush=True)
    errors = [r["what"] for r in suite.records if r.get("status") == "error"]
    if suite.failed_checks or errors:
        print(f"gpu_suite: failed checks {suite.failed_checks}; cases stopped by errors {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
