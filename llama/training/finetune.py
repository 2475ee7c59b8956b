"""What every task that continues from a checkpoint shares (``llama.sft``, ``llama.dpo``): the checkpoint it starts
from or resumes, the tokenizer its raw data is packed with, the model and the profile's plan, and ``--epochs`` made
into steps once the rows are counted."""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.format import DatasetError
from engine.tokenizer import Tokenizer, load_tokenizer, tokenizer_mismatch

from ..model import LlamaConfig
from . import adapters
from . import checkpoint as ckpt
from .cli import add_train_arguments, choose_seq_len, model_overrides, planned_values
from .config import TrainConfig
from .profiles import PROFILES, Plan, Profile, get_profile
from .resume import resolve_init, resolve_resume

#: TrainConfig fields the profile decides unless given on the command line (steps: from --epochs).
PLANNED = ("batch_size", "grad_accum", "precision", "activation_checkpointing", "steps", "seq_len", "warmup_steps")
#: The fine-tune CLIs' own numeric flags, checked with TrainConfig's (``check_values``) before anything is packed.
FINETUNE_RULES: dict[str, dict[str, Any]] = {
    "epochs": {"above": 0},
    "val_fraction": {"at_least": 0, "below": 1},
    "max_bad": {"at_least": 0, "at_most": 1},
    "pack_workers": {"at_least": 0, "float": False, "help": "(0 = one per core)"},
}


def add_data_arguments(parser: argparse.ArgumentParser, data: str, val: str, init: str) -> None:
    """``--data``, ``--val``, ``--init`` and ``--tokenizer``, each help naming what this task reads."""
    parser.add_argument("--data", required=True, help=data)
    parser.add_argument("--val", help=f"{val} (default: the .val beside the data, when present)")
    parser.add_argument(
        "--init",
        help=f"{init}: an --out-dir or a step_N folder (required unless --out-dir already holds this run's "
        "checkpoints, which are resumed)",
    )
    parser.add_argument(
        "--tokenizer",
        help="the tokenizer to pack raw data with (default: the one the checkpoint names; must be the same vocabulary)",
    )


def add_packing_arguments(group: argparse._ArgumentGroup, records: str, val_fraction: float) -> None:
    """How raw ``records`` are packed into the cache: ``--max-bad``, ``--val-fraction``, ``--cache-dir``,
    ``--pack-workers``."""
    group.add_argument(
        "--max-bad",
        type=float,
        default=0.01,
        help="raw data: fail when more than this share of the records is malformed (they are skipped and counted; "
        "default: 0.01)",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        default=val_fraction,
        help=f"raw data: share of {records} held out for validation (default: {val_fraction:g})",
    )
    group.add_argument(
        "--cache-dir", help="raw data: where to keep the packed cache (default: .DATA.zhllm-cache beside it)"
    )
    group.add_argument(
        "--pack-workers",
        type=int,
        default=0,
        help="raw data: tokenizing processes, 0 = one per core, 1 = none (default: 0)",
    )


def add_finetune_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any], epochs: float) -> None:
    """``--epochs``, ``--profile``, ``--model`` and every TrainConfig flag (the planned ones left to the profile)."""
    parser.add_argument(
        "--epochs",
        type=float,
        default=epochs,
        help=f"passes over the training rows, when neither --steps nor --tokens is given (default: {epochs:g})",
    )
    parser.add_argument(
        "--profile",
        default="auto",
        choices=("auto", *PROFILES),
        help="hardware profile that sizes the run to fit (default: auto, from this machine)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a runtime model field, value as JSON (e.g. dropout=0.1); the architecture "
        "must stay the checkpoint's",
    )
    add_train_arguments(
        parser, defaults={**defaults, **{name: None for name in PLANNED}}, exclude=("data_mode", "doc_masking", "init")
    )


def base_checkpoint(args: argparse.Namespace) -> tuple[Path, dict[str, Any], bool]:
    """(checkpoint, its config, resuming?): this run's own latest when resuming, else ``--init``'s."""
    resume_from = resolve_resume(args.resume, Path(args.out_dir))
    if resume_from is not None:
        return resume_from, ckpt.read_config(resume_from), True
    if not args.init:
        raise ValueError(
            f"--init is required: name the checkpoint to fine-tune (e.g. --init out/pretrain); "
            f"{args.out_dir} holds no run to resume"
        )
    found, config = resolve_init(args.init)
    return found, config, False


def data_tokenizer(args: argparse.Namespace, checkpoint: Path, saved: dict[str, Any]) -> Tokenizer:
    """The tokenizer to pack raw data with: ``--tokenizer`` or the checkpoint's, and always the checkpoint's
    vocabulary."""
    reference = saved.get("tokenizer") or {}
    path = args.tokenizer or reference.get("path")
    if not path:
        raise ValueError(
            f"{checkpoint} names no tokenizer: pass --tokenizer (the one its pretraining data was packed with)"
        )
    if not Path(path).exists():
        raise ValueError(f"{checkpoint} was trained with tokenizer {path}, which is not here: pass --tokenizer")
    tokenizer = load_tokenizer(path)
    refusal = tokenizer_mismatch(
        reference,
        {"path": path, "sha256": tokenizer.sha256},
        owner=str(checkpoint),
        other="the tokenizer given",
        fix="pass the checkpoint's tokenizer",
    )
    if refusal:
        raise ValueError(refusal)
    return tokenizer


@dataclass
class Planned:
    """The model a fine-tune builds, its profile and sequence length, and the TrainConfig values planned so far."""

    checkpoint: Path
    saved: dict[str, Any]
    resuming: bool
    config: LlamaConfig
    profile: Profile
    seq_len: int
    values: dict[str, Any]
    chosen: Plan


def plan_finetune(args: argparse.Namespace) -> Planned:
    """The checkpoint (resumed, or ``--init``), its model with ``--model`` overrides, and the profile's plan; the
    whole TrainConfig checked before any data is packed (one step stands in for ``--epochs`` until rows are
    counted)."""
    checkpoint, saved, resuming = base_checkpoint(args)
    config = LlamaConfig.from_saved(
        saved.get("model"), str(checkpoint / ckpt.CONFIG_FILE), **model_overrides(args.model)
    )
    profile = get_profile(args.profile)
    seq_len = choose_seq_len(args.seq_len, profile, config, "the model's")
    values, chosen = planned_values(args, profile, config, seq_len)
    values["doc_masking"], values["init"] = True, None if resuming else str(checkpoint)
    probe = {**values, "steps": values["steps"] if values["steps"] or values["tokens"] else 1}
    TrainConfig(**probe).validate()
    return Planned(checkpoint, saved, resuming, config, profile, seq_len, values, chosen)


def open_quietly(open_dataset: Callable[[], Any]) -> Any:
    """``open_dataset()`` with the engine's dataset warnings held back (they show once, when the loop builds it);
    a dataset error becomes a one-line ValueError."""
    quiet = logging.getLogger("engine.dataset")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return open_dataset()
    except DatasetError as e:
        raise ValueError(str(e)) from None
    finally:
        quiet.setLevel(level)


def finish_plan(args: argparse.Namespace, planned: Planned, rows: int) -> tuple[TrainConfig, int, int]:
    """The TrainConfig, ``--epochs`` over ``rows`` made into steps (warmup: 3% of them, at most 100) when neither
    ``--steps`` nor ``--tokens`` is given; returns it with the steps and rows per step."""
    values = planned.values
    rows_per_step = values["batch_size"] * values["grad_accum"] * int(os.environ.get("WORLD_SIZE", "1"))
    if args.steps is None and args.tokens is None:
        values["steps"] = max(1, math.ceil(args.epochs * rows / rows_per_step))
    steps = values["steps"] or math.ceil((args.tokens or 0) / (rows_per_step * planned.seq_len))
    if args.warmup_steps is None:  # 3% of the run, as fine-tunes usually do, at most 100 steps
        values["warmup_steps"] = min(100, max(1, round(0.03 * steps)))
    return TrainConfig(**values), steps, rows_per_step


def describe(planned: Planned, cfg: TrainConfig, prefix: Path, what: str, rows: int, steps: int, per_step: int) -> str:
    """The one line a fine-tune logs before it starts: what it trains, on what, for how long, how."""
    config, seq_len = planned.config, planned.seq_len
    return (
        f"profile {planned.profile.name}: {'resuming' if planned.resuming else 'fine-tuning'} {planned.checkpoint} "
        f"({config.dim}d x {config.n_layers} layers, vocab {config.vocab_size:,}) on {prefix} "
        f"({what} in {rows:,} rows of {seq_len}); {steps} steps ({steps * per_step / rows:.1f} epochs) of "
        f"micro-batch {cfg.batch_size} x accumulation {cfg.grad_accum}, {cfg.precision}, activation checkpointing "
        f"{'on' if cfg.activation_checkpointing else 'off'} (profile plan: {planned.chosen.describe(seq_len)})"
    )


def companion_record(checkpoint: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """What a run records of a second model it trains against (DPO's reference, a distillation teacher): the path
    and the weights' sha256, checked again on resume by :func:`recorded_companion`."""
    return {"path": str(checkpoint.resolve()), "sha256": adapters.weights_identity(checkpoint, saved)}


def recorded_companion(
    planned: Planned, key: str, given: str | None, flag: str, relation: str
) -> tuple[Path, dict[str, Any]] | None:
    """A resumed run's recorded ``task[key]`` checkpoint (``--flag`` ``given`` must name it), refused in one line when
    its weights changed since; None for a fresh run or one that recorded none. ``relation`` reads "was distilled
    from the teacher" / "was trained against the reference" in the errors."""
    recorded = (planned.saved.get("task") or {}).get(key) if planned.resuming else None
    if not recorded:
        return None
    if given and resolve_init(given)[0].resolve() != Path(recorded["path"]):
        raise ValueError(
            f"{planned.checkpoint} {relation} {recorded['path']}, not {flag} {given}: resume with the one it was "
            "trained against, or use another --out-dir"
        )
    found, saved = resolve_init(recorded["path"])
    if adapters.weights_identity(found, saved) != recorded["sha256"]:
        raise ValueError(
            f"{planned.checkpoint} {relation} {recorded['path']}, whose weights changed since: put the original back, "
            "or start a new run in another --out-dir"
        )
    return found, saved
