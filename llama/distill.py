"""Knowledge distillation: ``python -m llama.distill --teacher out/big-sft --init out/small-sft --data chat.jsonl``.

The student (``--init``) learns the teacher's next-token distributions on SFT conversations (``--data``: packed by
``python -m engine.prepare --kind sft``, or raw conversations packed into a cache beside them exactly as
``llama.sft`` does). The loss over the assistant tokens is ``(1 − α)·CE + α·T²·D``, D the ``--divergence``
between the temperature-T distributions of teacher and student: ``forward`` KL(teacher‖student) (default),
``reverse`` KL(student‖teacher) or ``jsd`` (generalised Jensen-Shannon, ``--jsd-beta`` β; TRL's GKD convention),
computed in float32 over chunks of tokens, never whole ``[tokens, vocab]`` logits. Teacher and student must share
the tokenizer (sha256) and may differ in every other dimension; the teacher runs frozen, without gradients, in the
run's precision. Every log step reports ``ce`` and the divergence (``kl`` or ``jsd``), validation the loss, ``ce``
and the divergence. The run records its teacher (path and weights sha256) and resumes against it. The loop,
profiles, LoRA, resume and logging are the other tasks'.

    python -m llama.distill --teacher out/sft-big --init out/sft-small --data data/sft
    python -m llama.distill --teacher out/sft-big --init out/sft-small --data chat.jsonl --alpha 0.9 --temperature 1
    python -m llama.distill --teacher out/sft-big --init out/sft-small --data data/sft --divergence jsd --jsd-beta 0.1
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from engine.cli import setup_logging
from engine.conversations import parse_field_names
from engine.dataset import SFTDataset
from engine.format import DatasetPaths, PackedFiles, open_packed
from engine.tokenizer import tokenizer_mismatch

from .dpo import load_reference
from .model import LlamaConfig
from .sft import add_raw_data_arguments, check_reasoning_flags, sft_data, sft_dataset
from .training.cli import run_training
from .training.config import TrainConfig, check_values
from .training.distill import DIVERGENCES, Distill, DistillSettings, Teacher
from .training.finetune import (
    FINETUNE_RULES,
    Planned,
    add_data_arguments,
    add_finetune_arguments,
    companion_record,
    describe,
    finish_plan,
    open_quietly,
    plan_finetune,
    recorded_companion,
)
from .training.loop import train
from .training.resume import resolve_init

logger = logging.getLogger("llama.distill")

DISTILL_DEFAULTS: dict[str, Any] = {"out_dir": "out/distill", "lr": 5e-5, "min_lr": 5e-6, "eval_every": 100}
DISTILL_RULES: dict[str, dict[str, Any]] = {
    **FINETUNE_RULES,
    "alpha": {"at_least": 0, "at_most": 1},
    "temperature": {"above": 0},
    "jsd_beta": {"above": 0, "below": 1},
}


def open_conversations(prefix: str | os.PathLike[str]) -> PackedFiles:
    """Open a packed dataset and insist it holds SFT conversations (one-line error naming what is accepted)."""
    paths = DatasetPaths.of(prefix)
    if not paths.meta.is_file():
        raise ValueError(
            f"{paths.bin} has no {paths.meta.name}: distillation needs conversations packed by "
            "`python -m engine.prepare --kind sft` (or give the raw .jsonl)"
        )
    files = open_packed(paths.prefix)
    if files.kind != "sft":
        raise ValueError(
            f"{paths.prefix} is a {files.kind} dataset: llama.distill takes SFT conversations, raw or packed with "
            "`python -m engine.prepare --kind sft` (a pretraining corpus is not supported yet)"
        )
    return files


# ---------------------------------------------------------------- the teacher


def teacher_checkpoint(args: argparse.Namespace, planned: Planned) -> tuple[Path, dict[str, Any]]:
    """The teacher: a resumed run's own record (``--teacher`` must agree), else ``--teacher``."""
    recorded = recorded_companion(planned, "teacher", args.teacher, "--teacher", "was distilled from the teacher")
    if recorded:
        return recorded
    if not args.teacher:
        raise ValueError("--teacher is required: name the checkpoint to distil from (e.g. --teacher out/sft-big)")
    return resolve_init(args.teacher)


def check_teacher(checkpoint: Path, saved: dict[str, Any], planned: Planned) -> None:
    """Refuse a teacher of another tokenizer or vocabulary size than the student's, naming both."""
    refusal = tokenizer_mismatch(
        saved.get("tokenizer"),
        planned.saved.get("tokenizer"),
        owner=f"the teacher {checkpoint}",
        other=f"the student {planned.checkpoint}'s",
        fix="distil between models of one tokenizer",
    )
    if refusal:
        raise ValueError(refusal)
    vocab = LlamaConfig.from_saved(saved.get("model"), str(checkpoint)).vocab_size
    if vocab != planned.config.vocab_size:
        raise ValueError(
            f"the teacher {checkpoint} has a vocabulary of {vocab:,} ids, the student {planned.checkpoint} "
            f"{planned.config.vocab_size:,}: distil between models of one tokenizer and vocabulary"
        )


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.distill",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_data_arguments(
        parser,
        data="packed SFT dataset (data/sft or data/sft.bin), or raw conversations: a .jsonl/.json/.csv file or a "
        "folder of them, packed into a cache beside them",
        val="packed validation set",
        init="the student checkpoint to train",
    )
    _add_distill_arguments(parser.add_argument_group("distillation"))
    add_raw_data_arguments(parser.add_argument_group("raw conversations: how they are packed"))
    add_finetune_arguments(parser, DISTILL_DEFAULTS, epochs=1.0)
    return parser


def _add_distill_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--teacher", help="the teacher checkpoint (same tokenizer; required unless resuming)")
    group.add_argument("--alpha", type=float, default=0.5, help="α: the divergence's share of the loss (default: 0.5)")
    group.add_argument("--temperature", type=float, default=2.0, help="T, for both models (default: 2)")
    group.add_argument(
        "--divergence",
        choices=DIVERGENCES,
        default="forward",
        help="forward KL(teacher‖student), reverse KL(student‖teacher), or jsd (generalised JS) (default: forward)",
    )
    group.add_argument("--jsd-beta", type=float, default=0.5, help="β of --divergence jsd, in (0, 1) (default: 0.5)")


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, Path, Distill, dict[str, Any], str]:
    """Model and training configs, the packed training prefix, the objective, the task record, a summary line."""
    check_values(vars(args), extra=DISTILL_RULES)  # every number first, before anything is read, packed or written
    settings = DistillSettings(args.alpha, args.temperature, args.divergence, args.jsd_beta)
    check_reasoning_flags(args)
    field_names = parse_field_names(args.fields) if args.fields else {}
    planned = plan_finetune(args)
    checkpoint, saved = teacher_checkpoint(args, planned)  # a missing or foreign teacher: refused before packing
    check_teacher(checkpoint, saved, planned)
    prefix, _ = sft_data(args, planned.checkpoint, planned.saved, field_names)
    files = open_conversations(prefix)
    rows = open_quietly(lambda: SFTDataset(prefix, planned.seq_len, pin_memory=False)).n_rows
    cfg, steps, per_step = finish_plan(args, planned, rows)
    teacher, record = Teacher(load_reference(checkpoint, saved, cfg.kernels)), companion_record(checkpoint, saved)
    inherited = planned.saved.get("task") or {}  # the student's chat settings, for chat and evaluate
    task = {
        **{key: inherited.get(key) for key in ("template", "think_off_prefix", "system") if inherited.get(key)},
        "name": "distill",
        "alpha": settings.alpha,
        "temperature": settings.temperature,
        "divergence": settings.divergence,
        "jsd_beta": settings.jsd_beta,
        "teacher": record,
        "source": str(args.data),
    }
    summary = describe(planned, cfg, prefix, f"{files.n_docs:,} conversations", rows, steps, per_step)
    summary += f"; teacher {record['path']}, α {settings.alpha:g}, T {settings.temperature:g}, {settings.divergence}"
    return planned.config, cfg, prefix, Distill(settings, teacher), task, summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, cfg, prefix, objective, task, summary = configure(args)
        logger.info("%s", summary)
        train(config, cfg, prefix, args.val, dataset_factory=sft_dataset, task=task, objective=objective)

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(main())
