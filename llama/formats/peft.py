"""LoRA adapters in PEFT's folder layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

``save_peft_adapter(model, config, folder, base)`` writes what ``peft.PeftModel.from_pretrained(base_model, folder)``
loads onto the base exported by ``llama.export``; ``load_peft_adapter(model, folder)`` adapts our model with a
PEFT LoRA adapter trained elsewhere. Keys are PEFT's: ``base_model.model.<module>.lora_A.weight``. Only plain
LoRA on ``q k v o gate up down`` is read; DoRA, per-layer ranks, trained biases or extra saved modules are
refused in one line rather than half-loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..lora import TARGETS, LoraConfig, adapter_state_dict, apply_lora, load_adapter_state_dict
from .hf_io import ExportError, read_json, write_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MODULE_TO_TARGET = {path.rsplit(".", 1)[1]: name for name, path in TARGETS.items()}
#: adapter_config.json fields that change what the weights mean; we refuse anything but their plain value.
UNSUPPORTED = {
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "fan_in_fan_out": False,
}


def peft_config(config: LoraConfig, base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT writes for such a LoRA on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": sorted(config.target_modules),
        "inference_mode": True,
        "init_lora_weights": True,
        **UNSUPPORTED,
    }


def save_peft_adapter(model: nn.Module, config: LoraConfig, folder: str | Path, base_model: str) -> Path:
    """Write the adapters of ``model`` (fp32, PEFT's key names) and their config into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {PEFT_PREFIX + k: v.float().contiguous().cpu() for k, v in sorted(adapter_state_dict(model).items())}
    if not state:
        raise ExportError("this model has no LoRA adapters to save")
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(folder / ADAPTER_CONFIG, peft_config(config, base_model))
    return folder


def lora_config_of(folder: Path) -> LoraConfig:
    """Our :class:`LoraConfig` for a PEFT ``adapter_config.json``, or a one-line ExportError saying what it has."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ExportError(f"{folder} has no {ADAPTER_CONFIG}: give a PEFT LoRA adapter folder")
    saved = read_json(path)
    if saved.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{path}: peft_type {saved.get('peft_type')!r}; only LoRA adapters can be loaded")
    for key, plain in UNSUPPORTED.items():
        value = saved.get(key)
        if value is not None and value != plain and value not in ([], {}):
            raise ExportError(f"{path}: {key} = {saved[key]!r} is not supported (only plain LoRA: {key} = {plain!r})")
    modules = saved.get("target_modules")
    if isinstance(modules, str) or not modules or any(m not in MODULE_TO_TARGET for m in modules):
        raise ExportError(
            f"{path}: target_modules {modules!r}; a list of {', '.join(MODULE_TO_TARGET)} is what a Llama adapter has"
        )
    return LoraConfig(
        r=int(saved["r"]),
        alpha=float(saved.get("lora_alpha", 8)),
        dropout=float(saved.get("lora_dropout", 0.0)),
        targets=tuple(MODULE_TO_TARGET[m] for m in modules),
        rslora=bool(saved.get("use_rslora", False)),
    )


def load_peft_adapter(model: nn.Module, folder: str | Path, base_dtype: torch.dtype | None = None) -> LoraConfig:
    """Adapt ``model`` in place with the PEFT LoRA adapter in ``folder``; returns its config."""
    folder = Path(folder)
    config = lora_config_of(folder)
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{folder / ADAPTER_WEIGHTS} cannot be read ({e}): copy the adapter folder again") from None
    ours = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in state.items()}
    apply_lora(model, config, base_dtype)
    try:
        load_adapter_state_dict(model, ours)
    except ValueError as e:
        raise ExportError(f"{folder}: {e}") from None
    return config
