"""The baseline packer: seed 004's method (baby-llama2-chinese ``data_process.py``), rewritten from its description.

Read each JSON array file, build every poem's text (title, newline, paragraphs joined by newlines),
call SentencePiece ``encode`` on each document directly, append its ids and the EOS id to ONE
Python list, and at the end turn the list into a ``uint16`` array written to a ``.bin``. This calls
SentencePiece without the Hugging Face wrapper the original goes through, so it is a generous
baseline. Memory grows with every token (a Python int list costs ~8 bytes of pointer per token plus
the ints, then the final array copy).

    python bench/baseline_seed004.py --tokenizer tokenizer.model --out /tmp/base.bin DIR [DIR ...]

Prints one JSON line: documents, tokens, seconds (the caller knows the text size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm


def poem_text(poem: dict) -> str:
    return poem["title"] + "\n" + "\n".join(poem["paragraphs"])


def json_files(folders: list[str]) -> list[Path]:
    files: list[Path] = []
    for folder in folders:  # the same folder given k times is read k times, like k shards
        files.extend(sorted(Path(folder).glob("*.json")))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders of poet.*.json files")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    parser.add_argument("--out", required=True, help="output .bin")
    args = parser.parse_args()

    started = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
    all_ids: list[int] = []
    docs = 0
    for path in json_files(args.folders):
        with open(path, encoding="utf-8") as f:
            poems = json.load(f)
        for poem in poems:
            text = poem_text(poem)
            ids = sp.encode(text)
            ids.append(eos)
            all_ids += ids
            docs += 1
    arr = np.array(all_ids, dtype=np.uint16)
    with open(args.out, "wb") as f:
        f.write(arr.tobytes())
    print(json.dumps({"docs": docs, "tokens": int(arr.shape[0]), "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
