"""How to train: :class:`TrainConfig` (one field per ``--flag``, its help in the metadata) and its checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..lora import parse_lora
from ..model import KERNEL_CHOICES, LlamaConfig, ModelOptions

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


SCHEDULES = ("cosine", "wsd", "constant")


DECAY_SHAPES = ("linear", "sqrt")


PARALLEL = ("ddp", "fsdp")


DATA_MODES = ("random", "epoch")


#: ``--model`` items that are run options (:class:`ModelOptions`), and the TrainConfig field each one sets.
OPTION_FIELDS = {"kernels": "kernels", "checkpointing": "activation_checkpointing", "dropout": "dropout"}


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """How to train; each field's ``metadata['help']`` is its one-line ``--help``."""

    steps: int | None = _opt(None, "optimizer steps to train (give this or --tokens)", at_least=1)
    tokens: int | None = _opt(None, "tokens to train on, rounded up to whole steps (instead of --steps)", at_least=1)
    batch_size: int = _opt(8, "sequences per micro-batch on each device", at_least=1)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", at_least=1)
    seq_len: int | None = _opt(None, "tokens per sequence (default: the model's max_seq_len)", at_least=1)
    data_mode: str = _opt("random", "'random' windows or 'epoch' (shuffled non-overlapping chunks)", choices=DATA_MODES)
    doc_masking: bool = _opt(False, "attend only within each packed document (position and document ids)")
    lr: float = _opt(3e-4, "peak learning rate", above=0)
    min_lr: float = _opt(3e-5, "learning rate at the end of the decay", at_least=0)
    warmup_steps: int = _opt(100, "steps of linear warmup from ~0 to --lr", at_least=0)
    schedule: str = _opt("cosine", "'cosine' decay, 'wsd' (warmup-stable-decay) or 'constant'", choices=SCHEDULES)
    decay_fraction: float = _opt(0.2, "wsd: share of the steps spent decaying at the end", above=0, at_most=1)
    decay_shape: str = _opt("linear", "wsd: decay 'linear' or '1-sqrt' shaped ('sqrt')", choices=DECAY_SHAPES)
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only, never norms)", at_least=0)
    beta1: float = _opt(0.9, "AdamW beta1", at_least=0, below=1)
    beta2: float = _opt(0.95, "AdamW beta2", at_least=0, below=1)
    eps: float = _opt(1e-8, "AdamW epsilon", above=0)
    grad_clip: float = _opt(
        1.0, "clip the global gradient norm to this (0 = no clipping; the norm is logged)", at_least=0
    )
    precision: str = _opt(
        "auto", "'fp32', 'fp16' (loss scaling), 'bf16', or 'auto' (bf16/fp16 on GPU, fp32 on CPU)", choices=PRECISIONS
    )
    compile: bool = _opt(False, "torch.compile the model")
    kernels: str = _opt(
        "auto", "'triton' (fused kernels), 'torch' (plain PyTorch) or 'auto' (Triton on CUDA)", choices=KERNEL_CHOICES
    )
    activation_checkpointing: bool | None = _opt(
        None, "recompute activations in backward to save memory (default: off; pretrain and sft: the profile's plan)"
    )
    dropout: float = _opt(0.0, "dropout on the embeddings and each sub-layer's output (0 = none)", at_least=0, below=1)
    parallel: str = _opt(
        "ddp", "multi-GPU under torchrun: 'ddp' (replicate) or 'fsdp' (shard, FSDP2)", choices=PARALLEL
    )
    device: str | None = _opt(None, "'cuda', 'cuda:1' or 'cpu' (default: the GPU when there is one)")
    max_memory_gb: float | None = _opt(None, "cap GPU memory to this many GiB (rehearse a smaller card)", above=0)
    eval_every: int = _opt(500, "validate every N steps and at the end (0 = never)", at_least=0)
    eval_batches: int = _opt(20, "fixed validation batches per evaluation", at_least=1)
    save_every: int = _opt(1000, "checkpoint every N steps (0 = only at the end)", at_least=0)
    keep_last: int = _opt(3, "checkpoints kept in --out-dir (0 = all)", at_least=0)
    log_every: int = _opt(10, "log metrics every N steps", at_least=1)
    seed: int = _opt(1337, "seed of the model init, the data order and every RNG", at_least=0)
    out_dir: str = _opt("out/train", "where checkpoints, metrics.jsonl and plots go")
    resume: bool | str | None = _opt(
        None, "auto (default: resume if --out-dir holds a checkpoint), true, false, or a checkpoint path"
    )
    init: str | None = _opt(
        None,
        "start from the weights of this checkpoint (a step_N folder or an --out-dir holding one); "
        "optimizer and schedule start fresh; ignored when resuming",
    )
    lora: str | None = _opt(
        None,
        "train LoRA adapters on a frozen --init model instead of every weight: 'r=16,alpha=32,dropout=0.05,"
        "targets=all' (targets: all or a '+'-list of q,k,v,o,gate,up,down; rslora=true scales alpha/sqrt(r)); "
        "checkpoints then hold only the adapters and name the base by path and sha256",
    )
    allow_config_change: bool = _opt(
        False,
        "resume even though a setting exact resume depends on changed (batch size, accumulation, sequence length, "
        "data, seed, ranks); the change is logged and recorded in the checkpoint's config.json",
    )
    peak_tflops: float | None = _opt(None, "the GPU's peak TFLOPS for MFU (default: looked up by name)", above=0)
    nan_patience: int = _opt(
        5, "stop after this many non-finite losses or skipped updates in a row (0 = never)", at_least=0
    )
    progress: bool = _opt(True, "show a progress bar")

    def validate(self) -> None:
        """Refuse contradictory or out-of-range settings with a one-line reason."""
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of --steps and --tokens")
        check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name, choices in (
            ("precision", PRECISIONS),
            ("schedule", SCHEDULES),
            ("decay_shape", DECAY_SHAPES),
            ("parallel", PARALLEL),
            ("data_mode", DATA_MODES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        self.model_options()  # kernels in range
        if self.lora:
            parse_lora(self.lora)  # the spec reads; --init is checked where the run starts

    def model_options(self) -> ModelOptions:
        """How the model runs in this run: kernels, activation checkpointing, dropout."""
        return ModelOptions(self.kernels, bool(self.activation_checkpointing), self.dropout)

    def total_steps(self, tokens_per_step: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.tokens / tokens_per_step))


#: Range rules a field's metadata may hold: the bound, and how the bound reads in an error.
BOUNDS = {"at_least": ">=", "above": ">", "at_most": "<=", "below": "<"}


def flag(name: str) -> str:
    """The ``--flag`` of TrainConfig field ``name``."""
    return "--" + name.replace("_", "-")


def _in_range(value: float, rules: dict[str, float]) -> bool:
    lowest, above = rules.get("at_least", -math.inf), rules.get("above", -math.inf)
    highest, below = rules.get("at_most", math.inf), rules.get("below", math.inf)
    return math.isfinite(value) and lowest <= value <= highest and above < value < below


def _numeric_rules(extra: dict[str, dict[str, Any]] | None) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(name, metadata, is_float) of every TrainConfig field, then of a task's own flags in ``extra``."""
    for f in dataclasses.fields(TrainConfig):
        yield f.name, dict(f.metadata), "float" in str(f.type)
    for name, metadata in (extra or {}).items():
        yield name, metadata, metadata.get("float", True)


def check_values(values: dict[str, Any], extra: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuse a TrainConfig value outside its field's range, in one line naming the flag and what is allowed
    (``None``, "not given", passes; 0 is a value like any other). The one place the numeric rules are applied.

    ``extra`` adds a task's own numeric flags, by name, with the same metadata as a field's (``above``,
    ``at_least``…, ``help``; ``float``: False for a whole number), e.g. ``{"epochs": {"above": 0}}``."""
    for name, metadata, is_float in _numeric_rules(extra):
        rules = {key: metadata[key] for key in BOUNDS if key in metadata}
        value = values.get(name)
        if not rules or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and (is_float or isinstance(value, int)) and _in_range(value, rules):
            continue
        allowed = " and ".join(f"{BOUNDS[key]} {bound:g}" for key, bound in rules.items())
        help_text = metadata.get("help", "")
        meaning = " " + help_text[help_text.index("(0 = ") :] if "(0 = " in help_text else ""
        kind = "a finite number" if is_float else "a whole number"
        raise ValueError(f"{flag(name)} must be {kind} {allowed}{meaning}, got {value!r}")


def check_seq_len(seq_len: int, config: LlamaConfig, whose: str = "the model's") -> int:
    """``seq_len`` when it fits ``config``'s context, else a one-line error naming what does."""
    check_values({"seq_len": seq_len})
    if seq_len > config.max_seq_len:
        raise ValueError(
            f"--seq-len {seq_len} is longer than {whose} context of {config.max_seq_len} tokens; "
            f"use --seq-len {config.max_seq_len} or less (or --model max_seq_len={seq_len})"
        )
    return seq_len
