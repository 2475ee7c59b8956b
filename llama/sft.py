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
thinking is switched off at inference. OpenAI-style replies ``{"role": "assistant", "content": answer,
"reasoning_content": reasoning}`` (also in ShareGPT turns, and top-level in one-turn records) fill the block too; a
reply with both a reasoning_content and a leading ``<think>`` block is refused as a bad record. ``--no-think-share P``
empties the block of a share P of the conversations (the same ones in every run: chosen by a hash of their text), so
the model also learns to answer directly after the empty block. ``--drop-think`` deletes the data's reasoning
instead (a direct-answer model from reasoning data). The default ``chatml`` keeps replies exactly as given (a
reasoning_content is left out, counted and logged). ``--think-tag-weight W`` counts the loss on the ``<think>``,
``</think>`` (and ``<answer>``, ``</answer>`` where they are single tokens) targets W times (MiniMind uses 10: small
models otherwise skip the format) and logs their own loss as ``tag_loss``.

    python -m llama.sft --data data/sft --init out/pretrain
    python -m llama.sft --data ../shared/data/medicalgpt/medical_sft_1K_format.jsonl --init out/pretrain --epochs 3
    python -m llama.sft --data data/r1_mix.jsonl --init out/pretrain --template think --profile 3060-6gb
    python -m llama.sft --data data/r1_mix.jsonl --init out/pretrain --template think --think-tag-weight 10 \
        --no-think-share 0.2
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
from engine.reply_template import TEMPLATES, assistant_prefix, think_tag_ids
from engine.tokenizer import Tokenizer

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
PACKING_FLAGS = ("template", "drop_think", "no_think_share", "system", "fields", "chosen_only")
#: SFT's own numeric flags, checked with the fine-tune ones before anything is packed.
SFT_RULES: dict[str, dict[str, Any]] = {
    **FINETUNE_RULES,
    "think_tag_weight": {"above": 0},
    "no_think_share": {"at_least": 0, "at_most": 1},
}
#: The tags --think-tag-weight needs as single tokens (<answer>/</answer> are weighted too when they are).
REQUIRED_TAGS = ("<think>", "</think>")


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


def add_raw_data_arguments(group: argparse._ArgumentGroup) -> None:
    """How raw conversations are written and packed (packed data ignores these)."""
    group.add_argument(
        "--template",
        choices=TEMPLATES,
        default="chatml",
        help="raw data: 'chatml' keeps replies' content as given (a reasoning_content is left out, counted); 'think' "
        "writes each reply as <think>reasoning</think> + answer, the reasoning from a leading <think> block or the "
        "reply's reasoning_content, empty when the data has none (default: chatml)",
    )
    group.add_argument(
        "--drop-think",
        action="store_true",
        help="raw data: delete the reasoning (<think>…</think> or reasoning_content) of every reply before training",
    )
    group.add_argument(
        "--no-think-share",
        type=float,
        default=0.0,
        metavar="P",
        help="raw data, --template think: train this share of the conversations (0..1, the same ones in every run) "
        "with an empty think block, so thinking can be switched off at inference (default: 0)",
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
    add_raw_data_arguments(parser.add_argument_group("raw conversations: how they are packed"))
    parser.add_argument_group("reasoning SFT: the loss").add_argument(
        "--think-tag-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="count the loss on <think>, </think> (and <answer>, </answer> when single tokens) targets W times, "
        "logging their own loss as tag_loss; MiniMind uses 10 (default: 1, plain loss)",
    )
    add_finetune_arguments(parser, SFT_DEFAULTS, epochs=2.0)
    return parser


def check_reasoning_flags(args: argparse.Namespace) -> None:
    """Refuse --no-think-share where it means nothing, in one line (before anything is read or packed)."""
    if args.no_think_share and args.template != "think":
        raise ValueError("--no-think-share empties think blocks: use it with --template think")
    if args.no_think_share and args.drop_think:
        raise ValueError("--drop-think empties every think block already: give it or --no-think-share, not both")


def weighted_tags(args: argparse.Namespace, tokenizer: Tokenizer | None) -> dict[str, int]:
    """The tag tokens the objective weights (W != 1) or reports ``tag_loss`` of (``--template think``), by id."""
    if tokenizer is None:
        return {}
    tags = think_tag_ids(tokenizer)
    missing = [tag for tag in REQUIRED_TAGS if tag not in tags]
    if missing and args.think_tag_weight != 1:
        raise ValueError(
            f"--think-tag-weight weights the {'/'.join(REQUIRED_TAGS)} tokens, but tokenizer {tokenizer.path} has no "
            f"single token for {' '.join(missing)}: use one trained or trimmed by `python -m engine.tokenizer` (it "
            "adds them), or leave --think-tag-weight at 1"
        )
    return {} if missing else tags


def sft_data(
    args: argparse.Namespace,
    checkpoint: Path,
    saved: dict[str, Any],
    field_names: dict[str, str],
    tokenizer: Tokenizer | None = None,
) -> tuple[Path, bool]:
    """(the packed training prefix, whether it was packed here from raw conversations): ``--data`` as given, or
    raw data packed into its cache with ``tokenizer`` (default: the checkpoint's)."""
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
    prefix = pack_cached(
        args.data,
        tokenizer or data_tokenizer(args, checkpoint, saved),
        template=args.template,
        drop_think=args.drop_think,
        no_think_share=args.no_think_share,
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


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, Path, objectives.SFT, dict[str, Any], str]:
    """Model and training configs, the packed training prefix, the objective, the task record and a summary line."""
    check_values(vars(args), extra=SFT_RULES)  # every number first, before anything is read, packed or written
    check_reasoning_flags(args)
    field_names = parse_field_names(args.fields) if args.fields else {}
    planned = plan_finetune(args)
    reasoning = args.think_tag_weight != 1 or args.template == "think"
    tokenizer = data_tokenizer(args, planned.checkpoint, planned.saved) if reasoning else None
    tags = weighted_tags(args, tokenizer)
    objective = objectives.SFT(tag_ids=sorted(tags.values()), tag_weight=args.think_tag_weight)
    prefix, raw = sft_data(args, planned.checkpoint, planned.saved, field_names, tokenizer)
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
        "no_think_share": args.no_think_share if raw else None,
        "think_tag_weight": args.think_tag_weight,
        "think_tags": sorted(tags) or None,
        "source": str(args.data),
    }
    summary = describe(planned, cfg, prefix, f"{files.n_docs:,} conversations", rows, steps, per_step)
    if args.think_tag_weight != 1:
        summary += f"; the loss on {' '.join(tags)} targets counts x{args.think_tag_weight:g} (tag_loss: theirs)"
    return planned.config, cfg, prefix, objective, task, summary


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
