"""Supervised fine-tuning on conversations: ``python -m llama.sft --data data/sft --init out/pretrain``.

``--data`` is an SFT dataset packed by ``python -m engine.prepare --kind sft`` (its ``.val`` sibling is
used for validation), or raw conversations (a .jsonl/.json/.csv file or a folder of them: MiniMind,
ShareGPT, alpaca, {"question", "answer"}, {"prompt", "response"} or medical CSV records; other field names
with ``--fields question=q,answer=a``), which are packed once with the checkpoint's tokenizer into a
hidden cache beside them (``data/x.jsonl`` → ``data/.x.jsonl.zhllm-cache/<tokenizer sha256[:12]>/sft.*``;
hidden, so a later scan of ``data/`` never reads it as raw data) and reused while the files' contents, the
tokenizer and the packing options stay the same. Delete the folder to drop the cache. Malformed records are
skipped and counted; more than ``--max-bad`` of them (default 1%) fail the run. DPO preference pairs are not
conversations: ``--chosen-only`` trains on each prompt and its chosen reply.

Whole conversations are packed into rows with document masking (no conversation attends to another;
positions restart per conversation) and the loss counts only assistant replies and their
``<|im_end|>``. The model, its tokenizer and its architecture come from the ``--init`` checkpoint; a
checkpoint of another tokenizer than the data's is refused. Precision, micro-batch, accumulation and
activation checkpointing come from the hardware profile, as in pretraining; the same command again
resumes from ``--out-dir``.

Reasoning SFT (seed 001's format): ``--template think`` renders every assistant turn as
``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, taking the reasoning from a leading ``<think>…</think>``
in the data, and giving replies without one an empty block. A model trained so answers directly when
the generation prompt is followed by the empty block (``engine.reply_template.assistant_prefix``):
thinking is switched off at inference. ``--drop-think`` deletes the data's reasoning instead (a
direct-answer model from reasoning data). The default ``chatml`` keeps replies exactly as given.

    python -m llama.sft --data data/sft --init out/pretrain
    python -m llama.sft --data ../shared/data/medicalgpt/medical_sft_1K_format.jsonl --init out/pretrain --epochs 3
    python -m llama.sft --data data/r1_mix.jsonl --init out/pretrain --template think --profile 3060-6gb
    python -m llama.sft --data data/qa.jsonl --init out/pretrain --fields question=q,answer=a
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from engine.cli import setup_logging
from engine.conversations import ACCEPTED_SFT, parse_field_names
from engine.dataset import SFTDataset
from engine.format import DatasetPaths, PackedFiles, open_packed
from engine.pack_cache import pack_cached
from engine.reply_template import TEMPLATES, assistant_prefix

from .model import LlamaConfig
from .training import objectives
from .training.cli import run_training
from .training.config import TrainConfig, check_values
from .training.finetune import (
    FINETUNE_RULES,
    add_data_arguments,
    add_finetune_arguments,
    add_packing_arguments,
    data_tokenizer,
    describe,
    finish_plan,
    open_quietly,
    plan_finetune,
)
from .training.loop import train

logger = logging.getLogger("llama.sft")

SFT_DEFAULTS: dict[str, Any] = {
    "out_dir": "out/sft",
    "lr": 5e-5,
    "min_lr": 5e-6,
    "eval_every": 100,
    "save_every": 500,
    "doc_masking": True,
}
#: The flags that shape how raw data is packed: refused for data that is packed already.
PACKING_FLAGS = ("template", "drop_think", "system", "fields", "chosen_only")


# ---------------------------------------------------------------- data


def sft_dataset(
    path: Path,
    seq_len: int,
    *,
    validation: bool,
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    tokenizer_sha256: str | None,
) -> SFTDataset:
    """The loop's dataset factory for SFT: conversation rows, shuffled per epoch (validation: seed 0)."""
    return SFTDataset(
        path,
        seq_len,
        seed=0 if validation else cfg.seed,
        rank=rank,
        world_size=world_size,
        tokenizer_sha256=tokenizer_sha256,
    )


def open_sft(prefix: str | os.PathLike[str]) -> PackedFiles:
    """Open a packed dataset and insist it is SFT (one-line error for a pretrain corpus or a bare .bin)."""
    paths = DatasetPaths.of(prefix)
    if not paths.meta.is_file():
        raise ValueError(
            f"{paths.bin} has no {paths.meta.name}: SFT needs conversations packed by "
            "`python -m engine.prepare --kind sft` (or give the raw .jsonl)"
        )
    files = open_packed(paths.prefix)
    if files.kind == "dpo":
        raise ValueError(dpo_refusal(files))
    if files.kind != "sft":
        raise ValueError(
            f"{paths.prefix} is a {files.kind} dataset, not SFT conversations: pretrain on it with "
            "`python -m llama.pretrain`, or pack conversations with `python -m engine.prepare --kind sft`"
        )
    return files


def dpo_refusal(files: PackedFiles) -> str:
    """What to do with a packed DPO dataset given to SFT: it holds preference pairs, not conversations."""
    sources = [name for name in (files.meta.get("sources") or {}).get("sources") or {} if Path(name).exists()]
    raw = " ".join(sources[:2]) + (" …" if len(sources) > 2 else "") if sources else "the raw pairs file"
    return (
        f"{files.paths.prefix} is a dpo dataset: preference pairs (a prompt with chosen and rejected replies) for "
        f"preference training, not SFT conversations; to fine-tune on the chosen replies give --data {raw} "
        f"--chosen-only, or give conversations ({ACCEPTED_SFT})"
    )


# ---------------------------------------------------------------- command line


def _add_raw_data_arguments(group: argparse._ArgumentGroup) -> None:
    """How raw conversations are written and packed (packed data ignores these)."""
    group.add_argument(
        "--template",
        choices=TEMPLATES,
        default="chatml",
        help="raw data: 'chatml' keeps replies as given; 'think' writes each reply as "
        "<think>reasoning</think> + answer, empty when the data has none (default: chatml)",
    )
    group.add_argument(
        "--drop-think",
        action="store_true",
        help="raw data: delete the reasoning (<think>…</think>) that opens a reply before training",
    )
    group.add_argument("--system", help="raw data: system prompt for conversations that have none")
    group.add_argument(
        "--fields",
        metavar="NAME=KEY,…",
        help="raw data: the record keys that hold the conversation's fields, e.g. question=q,answer=a[,system=sys] "
        'for records {"q": …, "a": …} (known without it: conversations/messages, instruction/input/output, '
        "question/answer, prompt/response)",
    )
    group.add_argument(
        "--chosen-only",
        action="store_true",
        help="raw data: read DPO preference pairs (chosen/rejected) as conversations: the prompt and the chosen reply",
    )
    add_packing_arguments(group, "conversations", val_fraction=0.02)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.sft",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_data_arguments(
        parser,
        data="packed SFT dataset (data/sft or data/sft.bin), or raw conversations: a .jsonl/.json/.csv file or a "
        "folder of them, packed into a cache beside them",
        val="packed validation set",
        init="the checkpoint to fine-tune (a pretraining run)",
    )
    _add_raw_data_arguments(parser.add_argument_group("raw conversations: how they are packed"))
    add_finetune_arguments(parser, SFT_DEFAULTS, epochs=2.0)
    return parser


def sft_data(
    args: argparse.Namespace, checkpoint: Path, saved: dict[str, Any], field_names: dict[str, str]
) -> tuple[Path, bool]:
    """(the packed training prefix, whether it was packed here from raw conversations): ``--data`` as given, or
    raw data packed into its cache with the checkpoint's tokenizer."""
    paths = DatasetPaths.of(args.data)
    raw = not (paths.meta.exists() or paths.bin.exists())
    if raw and not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no packed dataset ({paths.bin.name}) and no file or folder of that name")
    given = [
        f"--{name.replace('_', '-')}" for name in PACKING_FLAGS if getattr(args, name) not in (None, False, "chatml")
    ]
    if not raw and given:
        raise ValueError(
            f"{'/'.join(given)} shape the packing, but {args.data} is already packed: "
            "give the raw conversations instead"
        )
    if not raw:
        return paths.prefix, False
    tokenizer = data_tokenizer(args, checkpoint, saved)
    prefix = pack_cached(
        args.data,
        tokenizer,
        template=args.template,
        drop_think=args.drop_think,
        system=args.system,
        val_fraction=args.val_fraction,
        cache_dir=args.cache_dir,
        workers=args.pack_workers,
        progress=args.progress,
        max_bad=args.max_bad,
        field_names=field_names,
        chosen_only=args.chosen_only,
    )
    return prefix, True


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, Path, dict[str, Any], str]:
    """Model and training configs, the packed training prefix, the task record and a summary line."""
    check_values(vars(args), extra=FINETUNE_RULES)  # every number first, before anything is read, packed or written
    field_names = parse_field_names(args.fields) if args.fields else {}
    planned = plan_finetune(args)
    prefix, raw = sft_data(args, planned.checkpoint, planned.saved, field_names)
    files = open_sft(prefix)
    rows = open_quietly(lambda: SFTDataset(prefix, planned.seq_len, pin_memory=False)).n_rows
    cfg, steps, per_step = finish_plan(args, planned, rows)
    task = {
        "name": "sft",
        "template": args.template if raw else None,
        "drop_think": args.drop_think if raw else None,
        "think_off_prefix": assistant_prefix(args.template, thinking=False) if raw else None,
        "system": args.system,
        "fields": field_names or None,
        "chosen_only": args.chosen_only if raw else None,
        "source": str(args.data),
    }
    summary = describe(planned, cfg, prefix, f"{files.n_docs:,} conversations", rows, steps, per_step)
    return planned.config, cfg, prefix, task, summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, cfg, prefix, task, summary = configure(args)
        logger.info("%s", summary)
        train(config, cfg, prefix, args.val, dataset_factory=sft_dataset, task=task, objective=objectives.SFT())

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(main())
