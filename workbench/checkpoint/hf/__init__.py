"""Hugging Face model directories in and out.

Import: `config.json` (architecture -> family, then the family adapter's `config_from_hf`), the weights
(`model.safetensors` or shards named by `model.safetensors.index.json`), `tokenizer.json` and the token
ids of `generation_config.json`/`config.json`. Export writes the same files back; importing a directory
and exporting it again reproduces every tensor bit for bit, in the dtype it was stored in.

Each family has an adapter module here (`llama3.py`, `mixtral.py`, ...) with `ARCHITECTURES`, `config_from_hf`,
`config_to_hf`, `state_dict_from_hf` and `state_dict_to_hf`. Only safetensors are read: `.bin` (pickle)
checkpoints are refused.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import torch

from workbench.checkpoint.safetensors_io import read_dir, write_dir
from workbench.data.tokenizer import Tokenizer, check_fits
from workbench.errors import CheckpointError
from workbench.models.base import ModelSection, build_model

ADAPTERS = {"llama3": "workbench.checkpoint.hf.llama3", "mixtral": "workbench.checkpoint.hf.mixtral",
            "deepseek_v3": "workbench.checkpoint.hf.deepseek_v3", "paligemma2": "workbench.checkpoint.hf.paligemma2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def adapter_for(family: str):
    if family not in ADAPTERS:
        raise CheckpointError(f"model family {family!r} has no Hugging Face adapter (have: {', '.join(ADAPTERS)})")
    return importlib.import_module(ADAPTERS[family])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def family_of(hf_config: dict, where: str) -> str:
    archs = hf_config.get("architectures") or []
    for family in ADAPTERS:
        if any(a in adapter_for(family).ARCHITECTURES for a in archs):
            return family
    supported = sorted(a for f in ADAPTERS for a in adapter_for(f).ARCHITECTURES)
    raise CheckpointError(f"{where}: architectures {archs} not supported (supported: {', '.join(supported)})")


def read_hf_config(directory: str | Path) -> tuple[ModelSection, dict]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory}: not found")
    path = directory / "config.json"
    hf = _read_json(path)
    family = family_of(hf, str(path))
    cfg = adapter_for(family).config_from_hf(hf, where=str(path))
    return ModelSection(family=family, flavor="custom", config=cfg), hf


def load_hf_dir(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, section) from a Hugging Face directory; dtype None keeps the stored dtype."""
    directory = Path(directory)
    section, hf = read_hf_config(directory)
    if "quantization" in hf:  # int8 weights + scales (`workbench export --quant`): workbench.inference.quant
        from workbench.inference.quant import load_quantized

        return load_quantized(directory, device, dtype)
    adapter = adapter_for(section.family)
    if not any(directory.glob("*.safetensors")) and any(directory.glob("*.bin")):
        raise CheckpointError(f"model directory {directory}: only .bin (pickle) weights; convert them to safetensors")
    hf_sd = read_dir(directory)
    if hasattr(adapter, "fit_config"):  # parts a config may declare that the weights leave out (MTP)
        section = ModelSection(family=section.family, flavor=section.flavor,
                               config=adapter.fit_config(section.config, hf_sd))
    tokenizer = Tokenizer.from_hf_dir(directory)
    check_fits(tokenizer, section.config.vocab_size)
    sd = adapter.state_dict_from_hf(hf_sd, section.config, where=str(directory))
    if dtype is None:  # the dtype most weights are stored in (float32 routers beside bf16 weights are common)
        sizes: dict[torch.dtype, int] = {}
        for t in sd.values():
            if t.is_floating_point():
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        dtype = max(sizes, key=sizes.get) if sizes else torch.float32
    model = build_model(section, device, dtype, state=sd, where=str(directory))
    return model.eval(), tokenizer, section


def export_hf_dir(
    model: torch.nn.Module,
    section: ModelSection,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    tokenizer_source: str | Path | None = None,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    hf_state: dict[str, torch.Tensor] | None = None,
    config_extra: dict | None = None,
) -> Path:
    """Write a directory transformers can load (`from_pretrained`) and `load_hf_dir` reads back exactly.

    `hf_state` (tensors under Hugging Face names) replaces the model's mapped state dict and `config_extra` is
    merged into config.json: how `workbench.inference.quant.save_quantized` writes int8 weights and scales.
    The export never overwrites: `out_dir` must not exist or be an empty directory. Files are written into
    `out_dir.tmp` and the folder is renamed into place at the end, so a crash leaves no half export.
    """
    out = Path(out_dir)
    src = Path(tokenizer_source) if tokenizer_source else None
    if src is not None and out.resolve() == src.resolve():
        raise CheckpointError(f"export directory {out}: is the source directory; choose a new one")
    adapter = adapter_for(section.family)
    eos = sorted(tokenizer.eos_ids)
    eos_value = eos[0] if len(eos) == 1 else eos
    # the config first: an adapter refuses what the HF architecture cannot hold before any folder is made
    config = adapter.config_to_hf(section.config, tokenizer.bos_id, eos_value, tokenizer.pad_id)
    tmp = staging_dir(out)
    params = {name for name, _ in model.named_parameters()}  # buffers keep their dtype (fp32 router biases)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k in params else v)
             for k, v in model.state_dict().items()}
    hf_sd = adapter.state_dict_to_hf(state) if hf_state is None else hf_state
    write_dir(hf_sd, tmp, max_shard_bytes=max_shard_bytes)
    stored = next(iter(hf_sd.values())).dtype
    config["dtype"] = str(stored).removeprefix("torch.")
    config.update(config_extra or {})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos_value, "pad_token_id": tokenizer.pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if src is not None and (src / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    else:
        tokenizer.save(tmp / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   "bos_token": tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
                   "eos_token": tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
                   "pad_token": tokenizer.id_to_token(tokenizer.pad_id) if tokenizer.pad_id is not None else None,
                   "model_max_length": section.config.max_seq_len}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return publish_dir(tmp, out)


def staging_dir(out: Path) -> Path:
    """The empty folder `out.tmp` an export writes into, after refusing an `out` that exists and is not empty
    (exports never overwrite). `publish_dir` renames it into place, so a crash leaves no half export."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"export directory {out}: already exists and is not empty (export never overwrites)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"export directory {out}: cannot be created ({e.strerror})") from None
    return tmp


def publish_dir(tmp: Path, out: Path) -> Path:
    """Rename the finished staging folder `tmp` to `out` (which is absent or empty, as `staging_dir` checked)."""
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


__all__ = ["load_hf_dir", "export_hf_dir", "read_hf_config", "adapter_for"]
