"""LoRA runs on the one loop: ``--lora r=16,alpha=32,…`` with ``--init BASE`` adapts the base and trains the adapters.

A LoRA run's checkpoint is small: ``model.safetensors`` holds only the adapters, and ``config.json``'s ``lora``
names the base checkpoint with the sha256 of its weights file. Resume rebuilds the base from there (refusing a
base whose weights changed, or another ``--init``), adds the adapters and loads them, exactly as any run resumes.
Inference and export (:func:`load_weights`) do the same and merge the adapters into the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engine.publish import file_sha256

from ..lora import (
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    lora_parameter_count,
    parse_lora,
    strip_lora,
)
from ..model import Llama
from . import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraRun:
    """A LoRA run's adapters (``config``), the checkpoint they adapt (``base``) and what ``config.json`` records."""

    config: LoraConfig
    base: Path
    record: dict[str, Any]


def weights_sha256(checkpoint: Path) -> str:
    """sha256 of a checkpoint's ``model.safetensors`` (streamed)."""
    return file_sha256(checkpoint / ckpt.MODEL_FILE)


def weights_identity(checkpoint: Path, saved: dict[str, Any]) -> str:
    """A sha256 naming the weights a checkpoint stands for: its weights file's, or for a LoRA run its adapters'
    together with its base's."""
    own, lora = weights_sha256(checkpoint), saved.get("lora")
    return hashlib.sha256(f"{own}:{lora['base']['sha256']}".encode()).hexdigest() if lora else own


def lora_record(config: LoraConfig, base: Path) -> dict[str, Any]:
    """What a LoRA run's ``config.json`` says: the adapters' settings and the base they adapt."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "target_modules"}
    return {"config": settings, "base": {"path": str(base.resolve()), "sha256": weights_sha256(base)}}


def config_of(record: dict[str, Any]) -> LoraConfig:
    settings = dict(record["config"])
    settings["targets"] = tuple(settings["targets"])
    return LoraConfig(**settings)


def plan_lora(
    spec: str | None, init_from: Path | None, resumed: dict[str, Any] | None, resume_from: Path | None, fsdp: bool
) -> LoraRun | None:
    """The run's LoRA plan, or None. A fresh run adapts ``init_from`` (``--init``); a resumed one (``resumed``: its
    checkpoint's config.json) the base its checkpoint names, with the same ``--lora``. One-line errors otherwise."""
    if resume_from is not None and resumed is not None:
        return _resumed_plan(spec, resumed, resume_from)
    if not spec:
        return None
    config = parse_lora(spec)
    if init_from is None:
        raise ValueError("--lora adapts a trained model: give it with --init BASE (a checkpoint or an --out-dir)")
    if fsdp:
        raise ValueError("--lora trains a few adapters: use --parallel ddp (the default), not fsdp")
    return LoraRun(config, init_from, lora_record(config, init_from))


def _resumed_plan(spec: str | None, saved: dict[str, Any], checkpoint: Path) -> LoraRun | None:
    record = saved.get("lora")
    if not record:
        if spec:
            raise ValueError(f"{checkpoint} is a full training run: resume it without --lora, or use another --out-dir")
        return None
    config = config_of(record)
    if spec is None or parse_lora(spec) != config:
        raise ValueError(
            f"{checkpoint} trains {config.describe()}: resume it with the same --lora "
            f"({saved.get('train', {}).get('lora')!r}), or use another --out-dir"
        )
    base = check_base(checkpoint, record)
    return LoraRun(config, base, record)


def check_base(checkpoint: Path, record: dict[str, Any]) -> Path:
    """The base checkpoint a LoRA checkpoint adapts, refused in one line when it is gone or its weights changed."""
    base, expected = Path(record["base"]["path"]), record["base"]["sha256"]
    if ckpt.find_checkpoint(base) != base or not (base / ckpt.MODEL_FILE).is_file():
        raise ckpt.CheckpointError(
            f"{checkpoint} adapts the base checkpoint {base}, which is gone: put it back (LoRA checkpoints hold only "
            "the adapters)"
        )
    if weights_sha256(base) != expected:
        raise ckpt.CheckpointError(
            f"{checkpoint} adapts {base}, whose weights changed since (sha256 now differs from {expected[:12]}…): "
            "the adapters were trained on other weights; put the original base back"
        )
    return base


def check_init_is_base(init: Path, plan: LoraRun, checkpoint: Path) -> None:
    """A resumed LoRA run given ``--init`` must name the base it was trained on (same weights)."""
    theirs = weights_sha256(init)
    if theirs != plan.record["base"]["sha256"]:
        raise ckpt.CheckpointError(
            f"{checkpoint} adapts base {plan.base} (weights sha256 {plan.record['base']['sha256'][:12]}…), not "
            f"--init {init} ({theirs[:12]}…): resume with the base it was trained on, or use another --out-dir"
        )


def lora_transform(plan: LoraRun, base_dtype: torch.dtype | None, is_main: bool) -> Callable[[Llama], Llama]:
    """The model transform: adapters on the targets, everything else frozen; logs what trains."""

    def transform(model: Llama) -> Llama:
        apply_lora(model, plan.config, base_dtype)
        trainable, total = lora_parameter_count(model)
        if is_main:
            log.info(
                "%s on %s: %s of %s parameters train (%.2f%%)",
                plan.config.describe(),
                plan.base,
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / total,
            )
        return model

    return transform


def saved_state(model: nn.Module, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint's ``model.safetensors`` holds: the adapters only."""
    names = set(adapter_state_dict(model))
    return {k: v for k, v in model_state.items() if k in names}


def load_adapters(checkpoint: Path, model: nn.Module) -> None:
    """The adapters of a LoRA checkpoint into ``model`` (already adapted); one line when they do not fit."""
    try:
        load_adapter_state_dict(model, ckpt.read_model_state(checkpoint))
    except ValueError as e:
        raise ckpt.CheckpointError(f"{checkpoint / ckpt.MODEL_FILE}: {e}") from None


def load_weights(checkpoint: Path, saved: dict[str, Any], model: Llama) -> Llama:
    """A checkpoint's weights into ``model`` (plain, fresh) for inference or export; a LoRA run's are its base's
    with the adapters merged in, so the result is a plain model either way (returned)."""
    record = saved.get("lora")
    if not record:
        ckpt.load_model_weights(checkpoint, model)
        return model
    base = check_base(checkpoint, record)
    model = load_weights(base, ckpt.read_config(base), model)  # a base may itself be a LoRA run
    apply_lora(model, config_of(record))
    load_adapters(checkpoint, model)
    return strip_lora(model)


def adapted_model(checkpoint: Path, saved: dict[str, Any], model: Llama) -> tuple[Llama, LoraConfig, Path]:
    """A LoRA checkpoint as base + (unmerged) adapters, for writing the adapters in PEFT's layout."""
    record = saved["lora"]
    base = check_base(checkpoint, record)
    model = load_weights(base, ckpt.read_config(base), model)
    config = config_of(record)
    apply_lora(model, config)
    load_adapters(checkpoint, model)
    return model, config, base
