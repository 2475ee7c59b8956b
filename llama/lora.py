"""LoRA as a model transform: low-rank adapters on a Llama's linear layers, the rest frozen.

``apply_lora(model, LoraConfig(r=16, alpha=32, targets=("all",)))`` replaces each targeted ``nn.Linear`` (``q k v
o gate up down``; GQA's narrower ``k``/``v`` included) by a :class:`LoraLinear` computing ``W x + (alpha / r) B A
dropout(x)`` (rsLoRA: ``alpha / sqrt(r)``). The initialisation is PEFT's: ``A`` Kaiming-uniform, ``B`` zero, so the
adapted model starts exactly equal to the base. Base weights are frozen (the adapted layers' may be stored in the
run's half precision, ``base_dtype``); the adapters stay fp32. ``merge_lora`` folds ``B A`` into the base weights
once (merging twice is refused), ``unmerge_lora`` takes it out again, ``strip_lora`` returns plain ``nn.Linear``
layers.

The adapter names are Hugging Face's module names (``model.layers.0.self_attn.q_proj``), so the adapter files of
:mod:`llama.formats.peft` are PEFT's own layout.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

#: ``--lora targets=`` names → the Llama module names they adapt.
TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class LoraConfig:
    """Rank ``r``, scale ``alpha`` (``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``), dropout before ``A``, targets."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all",)
    rslora: bool = False
    target_modules: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"--lora r must be ≥ 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora dropout must be in [0, 1), got {self.dropout}")
        names = tuple(TARGETS) if "all" in self.targets else self.targets
        unknown = [t for t in names if t not in TARGETS]
        if unknown or not names:
            raise ValueError(
                f"--lora targets {'+'.join(self.targets) or '(none)'}: unknown {', '.join(unknown) or 'empty list'}; "
                f"use all or a '+'-list of {', '.join(TARGETS)}"
            )
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in names))  # canonical order
        object.__setattr__(self, "target_modules", tuple(TARGETS[t].rsplit(".", 1)[1] for t in self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def describe(self) -> str:
        rs = ", rsLoRA" if self.rslora else ""
        return f"LoRA r={self.r} alpha={self.alpha:g}{rs} dropout={self.dropout:g} on {'+'.join(self.targets)}"


def parse_lora(spec: str) -> LoraConfig:
    """``"r=16,alpha=32,dropout=0.05,targets=q+k+v,rslora=true"`` (every key optional) → :class:`LoraConfig`."""
    values: dict[str, object] = {}
    kinds = {"r": int, "alpha": float, "dropout": float}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            if not sep:
                raise ValueError("expected key=value")
            if key in kinds:
                values[key] = kinds[key](value)
            elif key == "targets":
                values["targets"] = tuple(t.strip() for t in value.split("+") if t.strip())
            elif key == "rslora":
                values["rslora"] = {"true": True, "1": True, "false": False, "0": False}[value.strip().lower()]
            else:
                raise ValueError(f"unknown key {key!r}")
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"--lora {spec!r}: {item!r} is not understood ({e}); write e.g. r=16,alpha=32,dropout=0.05,targets=all"
            ) from None
    return LoraConfig(**values)  # type: ignore[arg-type]


class LoraLinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))``; ``merged`` means ``B A`` already sits in ``base.weight``."""

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling
        self.merged = False
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialisation
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        low_rank = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (low_rank * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        if self.merged:
            raise ValueError("the LoRA adapters are already merged into the base weights; merging twice doubles them")
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("the LoRA adapters are not merged; there is nothing to unmerge")
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(module name, layer)`` of every adapted layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def apply_lora(model: nn.Module, config: LoraConfig, base_dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze ``model`` and adapt its target layers in place (returns it). ``base_dtype``: store the adapted layers'
    frozen weights in it (an fp16/bf16 run's autocast casts them so for every matmul anyway: the same numbers, half
    the memory); embeddings, norms and the head keep theirs."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("this model already has LoRA adapters; apply LoRA once")
    model.requires_grad_(False)
    suffixes = tuple("." + TARGETS[t] for t in config.targets)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]
    if not targets:
        raise ValueError(f"{config.describe()}: the model has no such linear layers")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraLinear(linear.to(dtype=base_dtype), config))
    return model


def lora_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters (tied weights counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (refused if already merged); the adapters stay, inactive."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def strip_lora(model: nn.Module) -> nn.Module:
    """The plain model: adapters merged (if they were not) and every :class:`LoraLinear` replaced by its base."""
    for name, layer in list(lora_layers(model)):
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block (a DPO reference under LoRA: the same weights, adapters off)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("the adapters are merged into the weights: unmerge them before switching them off")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.enabled = was


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights by our parameter names (``model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    return {
        f"{name}.{part}.weight": getattr(layer, part).weight.detach()
        for name, layer in lora_layers(model)
        for part in ("lora_A", "lora_B")
    }


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights in; a missing, unexpected or misshapen tensor is a one-line ValueError."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the adapter weights do not match this model's LoRA layers: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}): same targets and base model?"
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"adapter weight {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(state[key])
