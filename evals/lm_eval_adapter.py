"""Any workbench decoder as an lm-evaluation-harness model: `WorkbenchLM`, registered as "workbench".

    import evals.lm_eval_adapter  # registers the name
    lm_eval.simple_evaluate(model="workbench", model_args="ckpt=runs/NAME,batch_size=8", tasks=[...])
    lm_eval.simple_evaluate(model=WorkbenchLM(model, tokenizer), tasks=[...])

`model_args` keys are those of `WorkbenchLM.from_source`: ckpt or hf_dir, device, dtype, batch_size,
max_length (default: a run's data.seq_len, 2048 for a Hugging Face directory), max_gen_toks. Every
score goes through evals.scoring, so the harness and our own tasks compute the same numbers.

What each request computes
    loglikelihood((context, continuation))
        (sum of log p(continuation tokens | prefix + context), whether greedy decoding reproduces every
        continuation token). The boundary rule is lm-eval's for causal models: whitespace at the end of
        the context moves to the front of the continuation ("Q: 2+2 =", " 4"), then context+continuation
        is encoded as one text and the continuation is the tokens beyond the encoded context's length, so
        a BPE merge across the boundary is resolved the way the harness resolves it. The context is
        always preceded by `prefix_ids` (the bos the tokenizer adds); an empty context leaves the prefix
        alone. A continuation longer than `max_length` is scored in windows like a rolling document
        (each of its tokens once, with the longest context that fits); a shorter one is scored with the
        last `max_length` tokens of context + continuation as input.
    loglikelihood_rolling((text,))
        the document's total log-likelihood after the prefix, each token predicted once with the longest
        context up to `max_length` (`rolling_nll`): lm-eval's perplexity / bits_per_byte then match our
        perplexity task on the same text.
    generate_until((context, gen_kwargs))
        greedy continuation of prefix + context with the workbench `KVCacheGenerator`, up to
        gen_kwargs' max_gen_toks (or its aliases; default `max_gen_toks`) or a stop string of `until`
        (a string or a list), returned cut before the first stop string. Only greedy decoding is
        supported: temperature 0 or do_sample false (neither given is greedy); anything else is a
        ValueError. Generation also stops at the tokenizer's eos ids. The context keeps its last
        max_length - max_gen_toks - len(prefix) tokens, so prompt and completion fit in `max_length`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from evals.scoring import fit_prompts, generate, prefix_ids, rolling_nll, rolling_requests, score
from workbench.inference.generator import KVCacheGenerator, SamplingParams

log = logging.getLogger(__name__)

_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # by priority
_GREEDY_IRRELEVANT = {"until", "do_sample", "temperature", "top_k", "top_p", *_MAX_TOKEN_KEYS}
_SOURCE_KEYS = ("ckpt", "hf_dir", "device", "dtype", "batch_size", "max_length", "max_gen_toks")


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"WorkbenchLM: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"WorkbenchLM: dtype {value!r} is not a torch dtype (e.g. float32, bfloat16)")
    return found


@register_model("workbench")
class WorkbenchLM(LM):
    """lm-eval's LM over a workbench decoder (`model(batch).hidden`, `model.logits`) and its Tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16, max_length: int = 2048,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_length = _positive_int(max_length, "max_length", 2)
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.prefix = prefix_ids(tokenizer)
        self.generator = KVCacheGenerator(model, tokenizer)
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------------------
    # construction from a run folder or a Hugging Face directory

    @classmethod
    def from_source(cls, ckpt: str | Path | None = None, hf_dir: str | Path | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    batch_size: int = 16, max_length: int | None = None,
                    max_gen_toks: int = 256) -> WorkbenchLM:
        """Load through `load_for_inference`; max_length defaults to a run's data.seq_len (its training
        window), or 2048 for a Hugging Face directory."""
        from evals.runner import default_max_length, load_source
        from workbench.train.trainer import pick_device

        if isinstance(device, str):
            device = pick_device(device, "WorkbenchLM device")  # "auto": cuda when there is one
        model, tokenizer, _, job = load_source(None if ckpt is None else str(ckpt),
                                               None if hf_dir is None else str(hf_dir), device, _dtype(dtype))
        if max_length is None:
            max_length = default_max_length(job, model)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks)

    @classmethod
    def _from_args(cls, args: dict[str, Any], additional: dict[str, Any] | None) -> WorkbenchLM:
        merged = dict(args)
        for key, value in (additional or {}).items():
            if value is not None:
                merged[key] = value
        merged.pop("max_batch_size", None)  # lm-eval's automatic batch sizing: not supported, not needed
        if isinstance(merged.get("batch_size"), str) and merged["batch_size"].startswith("auto"):
            log.warning("WorkbenchLM: batch_size=%s is not supported; using 16", merged["batch_size"])
            merged["batch_size"] = 16
        if isinstance(merged.get("batch_size"), str) and merged["batch_size"].isdigit():
            merged["batch_size"] = int(merged["batch_size"])
        unknown = sorted(set(merged) - set(_SOURCE_KEYS))
        if unknown:
            raise ValueError(f"WorkbenchLM: unknown model_args {', '.join(unknown)} "
                             f"(known: {', '.join(_SOURCE_KEYS)})")
        return cls.from_source(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> WorkbenchLM:
        """From lm-eval's "ckpt=runs/x,batch_size=8": simple_evaluate(model="workbench", model_args=...)."""
        return cls._from_args(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> WorkbenchLM:
        return cls._from_args(dict(arg_dict), additional_config)

    # ------------------------------------------------------------------------------------------------
    # encoding

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prefix + context tokens, continuation tokens) under lm-eval's boundary rule (module notes)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not context:
            return list(self.prefix), self._encode(continuation)
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return list(self.prefix) + context_ids, whole[len(context_ids):]

    # ------------------------------------------------------------------------------------------------
    # the three request types

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            context, continuation = req.args
            context_ids, target = self.encode_pair(context, continuation)
            for window in rolling_requests(context_ids, target, self.max_length):
                windows.append(window)
                owner.append(i)
        totals = [[0.0, True] for _ in requests]  # an empty continuation: log 1, trivially greedy
        scored = score(self.model, windows, self.batch_size, self.max_length,
                       progress=None if disable_tqdm else "lm-eval loglikelihood")
        for i, (logp, greedy) in zip(owner, scored):
            totals[i][0] += float(logp.sum())
            totals[i][1] = totals[i][1] and greedy
        return [(float(ll), bool(g)) for ll, g in totals]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        documents = [self._encode(req.args[0]) for req in requests]
        scored = rolling_nll(self.model, self.prefix, documents, self.max_length, self.batch_size,
                             progress=None if disable_tqdm else "lm-eval loglikelihood_rolling")
        return [-nll for nll, _ in scored]

    def sampling_params(self, gen_kwargs: dict | None) -> SamplingParams:
        """lm-eval's gen_kwargs as greedy SamplingParams (ValueError for anything but greedy decoding)."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until")
        stop = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(s, str) for s in stop):
            raise ValueError(f"generate_until: `until` must be a string or a list of strings, got {until!r}")
        budget = next((kw[k] for k in _MAX_TOKEN_KEYS if kw.get(k) is not None), self.max_gen_toks)
        budget = _positive_int(int(budget), "max_gen_toks")
        do_sample, temperature = kw.get("do_sample"), kw.get("temperature")
        greedy = (do_sample is False or (temperature is not None and float(temperature) == 0.0)
                  or (do_sample is None and temperature is None))
        if not greedy:
            raise ValueError(f"generate_until: WorkbenchLM decodes greedily only (temperature 0 or do_sample "
                             f"False), got do_sample={do_sample!r}, temperature={temperature!r}")
        return SamplingParams(max_new_tokens=budget, temperature=0.0, stop=[s for s in stop if s])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts: list[Sequence[int]] = []
        params: list[SamplingParams] = []
        ignored: set[str] = set()
        for req in requests:
            context, gen_kwargs = req.args
            p = self.sampling_params(gen_kwargs)
            ignored |= set(gen_kwargs or {}) - _GREEDY_IRRELEVANT
            prompts.append(fit_prompts(self.tokenizer, [context], self.max_length, p.max_new_tokens, "max_gen_toks")[0][0])
            params.append(p)
        if ignored:
            log.warning("generate_until: ignoring gen_kwargs %s (decoding is greedy)",
                        ", ".join(sorted(ignored)))
        completions = generate(self.generator, prompts, params, self.batch_size,
                               progress=None if disable_tqdm else "lm-eval generate_until")
        return [c.text or "" for c in completions]
