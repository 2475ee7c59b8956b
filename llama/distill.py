"""Knowledge distillation: ``python -m llama.distill --teacher out/big-sft --init out/small-sft --data chat.jsonl``.

The student (``--init``) learns the teacher's next-token distributions on ``--data``: SFT conversations (packed by
``python -m engine.prepare --kind sft``, or raw conversations packed into a cache beside them exactly as
``llama.sft`` does; the loss counts the assistant tokens) or a packed pretraining corpus (``engine.prepare --kind
pretrain``; cut into fixed chunks of --seq-len + 1 tokens, shuffled per epoch, every token counted). The loss is
``(1 − α)·CE + α·T²·D``, D the ``--divergence`` between the temperature-T distributions of teacher and student:
``forward`` KL(teacher‖student) (default), ``reverse`` KL(student‖teacher) or ``jsd`` (generalised Jensen-Shannon,
``--jsd-beta`` β; TRL's GKD convention), computed in float32 over chunks of tokens, never whole ``[tokens, vocab]``
logits. Teacher and student must share the tokenizer (sha256) and may differ in every other dimension; the teacher
runs frozen, without gradients, in the run's precision. Every log step reports ``ce`` and the divergence (``kl`` or
``jsd``), validation the loss, ``ce`` and the divergence. The run records its teacher (path and weights sha256) and
the kind of data, and resumes against them. The loop, profiles, LoRA, resume and logging are the other tasks'.

A teacher too big to sit beside the student: ``--teacher-top-k K`` first runs the teacher alone on the device over
the training and validation data, once, and keeps each counted token's K largest teacher log-probs (at T) beside
the data (``NAME.topk-KEY.{ids.bin,logprobs.bin,json}``, keyed by the data, the teacher's weights, K, T, --seq-len
and the precision: reused by the next run and on resume; N tokens × K × 4 bytes (6 for vocabularies > 65,536)).
Training then reads them and never loads the teacher; D is the forward KL over the K ids, the teacher's top-K
probabilities renormalised (K = the vocabulary: exactly the forward KL). Delete the files to drop the cache.

    python -m llama.distill --teacher out/sft-big --init out/sft-small --data data/sft
    python -m llama.distill --teacher out/sft-big --init out/sft-small --data chat.jsonl --alpha 0.9 --temperature 1
    python -m llama.distill --teacher out/sft-big --init out/sft-small --data data/sft --divergence jsd --jsd-beta 0.1
    python -m llama.distill --teacher out/pretrain-big --init out/pretrain-small --data data/corpus --alpha 1
    python -m llama.distill --teacher out/pretrain-big --init out/pretrain-small --data data/corpus --teacher-top-k 64
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.cli import setup_logging
from engine.conversations import parse_field_names
from engine.format import DatasetPaths, PackedFiles, open_packed
from engine.tokenizer import tokenizer_mismatch

from .dpo import load_reference, validation_prefix
from .model import LlamaConfig
from .precision import resolve_precision
from .sft import add_raw_data_arguments, check_reasoning_flags, sft_data
from .training import adapters
from .training.cli import run_training
from .training.config import TrainConfig, check_values
from .training.distill import DIVERGENCES, TOPK_DIVERGENCE_REFUSAL, Distill, DistillSettings, Teacher
from .training.distill_data import DATA_KINDS, distill_dataset, n_samples, open_rows
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
from .training.objectives import place_frozen
from .training.resume import resolve_init
from .training.run import AUTOCAST_DTYPES
from .training.runtime import choose_device
from .training.teacher_cache import CacheSettings, teacher_caches

logger = logging.getLogger("llama.distill")

DISTILL_DEFAULTS: dict[str, Any] = {"out_dir": "out/distill", "lr": 5e-5, "min_lr": 5e-6, "eval_every": 100}
DISTILL_RULES: dict[str, dict[str, Any]] = {
    **FINETUNE_RULES,
    "alpha": {"at_least": 0, "at_most": 1},
    "temperature": {"above": 0},
    "jsd_beta": {"above": 0, "below": 1},
    "teacher_top_k": {"at_least": 1, "float": False},
}


def open_distill_data(prefix: str | os.PathLike[str]) -> PackedFiles:
    """Open a packed dataset and insist it holds SFT conversations or a pretraining corpus (one-line error naming
    what is accepted)."""
    paths = DatasetPaths.of(prefix)
    if not paths.meta.is_file():
        raise ValueError(
            f"{paths.bin} has no {paths.meta.name}: distillation needs data packed by `python -m engine.prepare` "
            "(--kind sft for conversations, --kind pretrain for a corpus), or raw conversations (.jsonl)"
        )
    files = open_packed(paths.prefix)
    if files.kind not in DATA_KINDS:
        raise ValueError(
            f"{paths.prefix} is a {files.kind} dataset: llama.distill takes SFT conversations (raw, or packed with "
            "`python -m engine.prepare --kind sft`) or a pretraining corpus (`--kind pretrain`)"
        )
    return files


def count_samples(prefix: Path, kind: str, seq_len: int) -> tuple[int, str]:
    """Rows (conversations) or chunks (a corpus) of one epoch, and what they hold, for the plan and its log line."""
    dataset = open_quietly(lambda: open_rows(prefix, kind, seq_len, pin_memory=False))
    files = dataset.files
    if kind == "sft":
        return n_samples(dataset), f"{files.n_docs:,} conversations"
    return n_samples(dataset), f"{files.n_docs:,} documents, {files.n_tokens:,} tokens"


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
        data="packed SFT dataset (data/sft or data/sft.bin) or packed pretraining corpus (data/corpus), or raw "
        "conversations: a .jsonl/.json/.csv file or a folder of them, packed into a cache beside them",
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
    group.add_argument(
        "--teacher-top-k",
        type=int,
        metavar="K",
        help="precompute the teacher's K largest log-probs of every counted token once (the teacher alone on the "
        "device), cache them beside the data, and train from them without loading the teacher; forward KL only, "
        "over the K ids renormalised (default: run the teacher during training)",
    )


def check_top_k(args: argparse.Namespace, planned: Planned) -> None:
    """Refuse a --teacher-top-k that cannot work, or that a resumed run was not trained with, in one line."""
    k = args.teacher_top_k
    if k is not None and args.divergence != "forward":
        raise ValueError(TOPK_DIVERGENCE_REFUSAL.format(args.divergence))
    if k is not None and k > planned.config.vocab_size:
        raise ValueError(
            f"--teacher-top-k {k} is more than the vocabulary ({planned.config.vocab_size:,} ids): give at most that"
        )
    recorded = (planned.saved.get("task") or {}) if planned.resuming else {}
    if recorded.get("name") == "distill" and (recorded.get("teacher_cache") or {}).get("top_k") != k:
        was = (recorded.get("teacher_cache") or {}).get("top_k")
        given = f"--teacher-top-k {k}" if k else "no --teacher-top-k"
        raise ValueError(
            f"{planned.checkpoint} was distilled with {f'--teacher-top-k {was}' if was else 'the teacher run online'}, "
            f"not {given}: resume with the same setting, or use another --out-dir"
        )


def build_teacher(
    args: argparse.Namespace,
    planned: Planned,
    cfg: TrainConfig,
    sets: list[Path],
    kind: str,
    teacher: tuple[Path, dict[str, Any]],
) -> tuple[Teacher | None, dict[Path, Any] | None, dict[str, Any] | None]:
    """The online teacher (loaded now), or with --teacher-top-k its caches (computed first where missing; the
    teacher is loaded for that pass only) and what the run records of them."""
    checkpoint, saved = teacher
    if args.teacher_top_k is None:
        return Teacher(load_reference(checkpoint, saved, cfg.kernels)), None, None
    device = choose_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    settings = CacheSettings(
        teacher_path=str(checkpoint.resolve()),
        teacher_sha256=adapters.weights_identity(checkpoint, saved),
        top_k=args.teacher_top_k,
        temperature=args.temperature,
        seq_len=planned.seq_len,
        precision=precision,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )

    def load_teacher() -> tuple[Any, Any]:
        dtype = AUTOCAST_DTYPES.get(precision)  # the run's precision, as an online teacher runs
        model = place_frozen(load_reference(checkpoint, saved, cfg.kernels), device, dtype)
        return model, torch.autocast(device.type, dtype, enabled=precision != "fp32")

    caches = teacher_caches(sets, kind, settings, planned.config.vocab_size, load_teacher)
    record = {"top_k": settings.top_k, "files": [caches[p.resolve()].paths.meta.name for p in sets]}
    return None, caches, record


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, Path, Distill, dict[str, Any], str, Any]:
    """Model and training configs, the packed training prefix, the objective, the task record, a summary line and
    the dataset factory."""
    check_values(vars(args), extra=DISTILL_RULES)  # every number first, before anything is read, packed or written
    settings = DistillSettings(args.alpha, args.temperature, args.divergence, args.jsd_beta)
    check_reasoning_flags(args)
    field_names = parse_field_names(args.fields) if args.fields else {}
    planned = plan_finetune(args)
    check_top_k(args, planned)
    checkpoint, saved = teacher_checkpoint(args, planned)  # a missing or foreign teacher: refused before packing
    check_teacher(checkpoint, saved, planned)
    prefix, _ = sft_data(args, planned.checkpoint, planned.saved, field_names)
    kind = open_distill_data(prefix).kind
    if kind == "pretrain":  # fixed chunks, so --epochs means passes and a token's context never changes
        planned.values["data_mode"] = "epoch"
    rows, what = count_samples(prefix, kind, planned.seq_len)
    cfg, steps, per_step = finish_plan(args, planned, rows)
    sets = [prefix] + ([val] if (val := validation_prefix(args, prefix, cfg)) else [])
    teacher, caches, cache_record = build_teacher(args, planned, cfg, sets, kind, (checkpoint, saved))
    record = companion_record(checkpoint, saved)
    inherited = planned.saved.get("task") or {}  # the student's chat settings, for chat and evaluate
    task = {
        **{key: inherited.get(key) for key in ("template", "think_off_prefix", "system") if inherited.get(key)},
        "name": "distill",
        "alpha": settings.alpha,
        "temperature": settings.temperature,
        "divergence": settings.divergence,
        "jsd_beta": settings.jsd_beta,
        "teacher": record,
        "data_kind": kind,
        "teacher_cache": cache_record,
        "source": str(args.data),
    }
    summary = describe(planned, cfg, prefix, what, rows, steps, per_step)
    summary += f"; teacher {record['path']}, α {settings.alpha:g}, T {settings.temperature:g}, {settings.divergence}"
    if cache_record:
        summary += f" over its cached top-{cache_record['top_k']} (the teacher is not loaded)"
    factory = partial(distill_dataset, kind=kind, caches=caches)
    return planned.config, cfg, prefix, Distill(settings, teacher), task, summary, factory


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, cfg, prefix, objective, task, summary, factory = configure(args)
        logger.info("%s", summary)
        train(config, cfg, prefix, args.val, dataset_factory=factory, task=task, objective=objective)

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(main())
