"""One loader for every command that consumes a model: `--ckpt RUN_DIR` or `--hf-dir DIR`.

A run folder is rebuilt from its own files: `config.toml` (the resolved config: family, flavor, every
model field), `tokenizer.json`, and the newest complete checkpoint's `model.safetensors`, whose manifest
is verified first. A specific `checkpoints/step-N` folder can be named instead of the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.checkpoint.hf import load_hf_dir
from workbench.checkpoint.run import load_model_state, resolve_checkpoint
from workbench.config import load_config
from workbench.data.tokenizer import Tokenizer, check_fits
from workbench.errors import CheckpointError, WorkbenchError
from workbench.models.base import ModelSection, build_model


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def load_run_config(path: str | Path):
    """The resolved JobConfig (`config.toml`) of a run folder or one of its checkpoints."""
    from workbench.job import JobConfig

    run_dir = run_dir_of(resolve_checkpoint(path))
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise CheckpointError(f"run folder {run_dir}: no config.toml, so the model cannot be rebuilt")
    return load_config(JobConfig, config_path)


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, section) from a run folder or one of its checkpoints."""
    ckpt = resolve_checkpoint(path)
    run_dir = run_dir_of(ckpt)
    job = load_run_config(ckpt)
    tokenizer = Tokenizer.from_file(run_dir / "tokenizer.json")
    check_fits(tokenizer, job.model.config.vocab_size)
    state = load_model_state(ckpt)
    model = build_model(job.model, device, dtype, state=state, where=str(ckpt / "model.safetensors"))
    return model.eval(), tokenizer, job.model


def check_adapter_base(adapter: Path, family: str, tokenizer: Path | None) -> None:
    """Refuse a LoRA adapter whose recorded base (adapter_config.json's `meta`, written by the trainer) is another
    model family or used another tokenizer: its deltas would be added to weights they were not trained for.
    `tokenizer`: the base model's tokenizer.json, or None when the caller has none (the family is still checked)."""
    from workbench.checkpoint.run import sha256_file

    try:
        meta = json.loads((adapter / "adapter_config.json").read_text()).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return  # load_adapter names what is wrong with the file
    if meta.get("family") and meta["family"] != family:
        raise CheckpointError(f"LoRA adapter {adapter} was trained on a {meta['family']} model, not {family}")
    sha = meta.get("tokenizer_sha256")
    if sha and tokenizer is not None and tokenizer.is_file() and sha256_file(tokenizer) != sha:
        raise CheckpointError(f"LoRA adapter {adapter} was trained on a base with another tokenizer than {tokenizer}; "
                              f"load it onto the model it was trained from ({meta.get('base') or 'see its meta'})")


def load_for_inference(
    ckpt: str | None = None, hf_dir: str | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None, adapter: str | None = None, quant: str | None = None,
) -> tuple[torch.nn.Module, Tokenizer, ModelSection]:
    """(model, tokenizer, model section) of a run folder / checkpoint or a Hugging Face directory; with `adapter`,
    a LoRA adapter folder (adapter.safetensors + adapter_config.json, e.g. a checkpoint's `adapter/`) is loaded
    onto it and merged into its weights; `quant` ("int8" | "llm-int8"; None / "none": as stored) then quantizes
    its linear layers (workbench.inference.quant; a directory exported with --quant is int8 already)."""
    if (ckpt is None) == (hf_dir is None):
        raise WorkbenchError("give exactly one of --ckpt RUN_DIR or --hf-dir DIR")
    model, tokenizer, section = load_hf_dir(hf_dir, device, dtype) if hf_dir is not None else load_run(ckpt, device, dtype)
    if adapter is not None:
        from workbench.nn.lora import load_adapter, merge_and_unload

        base_tokenizer = Path(hf_dir) / "tokenizer.json" if hf_dir else run_dir_of(resolve_checkpoint(ckpt)) / "tokenizer.json"
        check_adapter_base(Path(adapter), section.family, base_tokenizer)
        load_adapter(model, adapter)
        merge_and_unload(model)  # plain linears again: every decode path, and export, read them as they are
    if quant not in (None, "none"):
        from workbench.inference.quant import apply_quant

        apply_quant(model, quant)  # after the merge: LoRA layers cannot be quantized
    return model, tokenizer, section
