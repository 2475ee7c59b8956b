"""The tokenizer's own ceiling: SentencePiece encoding text already in memory on every core.

Reads every poem's text first (not timed), then times only
``encode(list_of_all_texts, num_threads=os.cpu_count())``. No pipeline built on this tokenizer
on this machine can encode faster than that, whatever it does around the call.

    python bench/ceiling_sentencepiece.py --tokenizer tokenizer.model DIR [DIR ...]

Prints one JSON line: documents, tokens, text bytes (UTF-8), encode seconds, MB/s, threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import sentencepiece as spm


def read_texts(folders: list[str]) -> list[str]:
    texts: list[str] = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            with open(path, encoding="utf-8") as f:
                texts.extend(p["title"] + "\n" + "\n".join(p["paragraphs"]) for p in json.load(f))
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders of poet.*.json files")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    texts = read_texts(args.folders)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    started = time.perf_counter()
    encoded = sp.encode(texts, num_threads=args.threads)
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) + 1 for ids in encoded)  # + EOS, as the packers write
    print(
        json.dumps(
            {
                "docs": len(texts),
                "tokens": tokens,
                "text_bytes": text_bytes,
                "seconds": seconds,
                "mb_per_s": text_bytes / 1e6 / seconds,
                "threads": args.threads,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
