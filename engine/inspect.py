"""Inspect a packed dataset: its meta, token statistics, a decoded sample, and a check of the files.

Example::

    python -m engine.inspect data/corpus
    python -m engine.inspect data/sft --sample 2 --tokenizer tokenizers/demo
    python -m engine.inspect someone_elses.bin --dtype uint16 --vocab-size 64794
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from engine.cli import run_cli, setup_logging
from engine.format import DatasetPaths, PackedFiles, describe_bad_ids, find_bad_ids, open_packed

logger = logging.getLogger("engine.inspect")


@dataclass
class DatasetSummary:
    name: str
    kind: str
    dtype: str
    n_tokens: int
    n_docs: int
    vocab_size: int
    doc_length: dict[str, float]
    distinct_ids: int
    loss_token_share: float | None
    problems: list[str] = field(default_factory=list)


def verify(files: PackedFiles, chunk: int = 1 << 24) -> list[str]:
    """Deep checks beyond sizes: ids below the vocab size, every document ends with EOS, mask is 0/1."""
    problems: list[str] = []
    eos = files.meta.get("eos_id")
    bad = find_bad_ids(files, chunk)
    if bad is not None:
        problems.append(describe_bad_ids(files, bad))
    if eos is not None and files.n_docs and not files.meta.get("bare"):
        last = np.asarray(files.tokens[files.offsets[1:] - 1])
        missing = int(np.count_nonzero(last != eos))
        if missing:
            problems.append(f"{missing:,} documents do not end with EOS id {eos}")
    if files.mask is not None:
        for start in range(0, files.n_tokens, chunk):
            if int(np.asarray(files.mask[start : start + chunk]).max(initial=0)) > 1:
                problems.append("mask holds values other than 0 and 1")
                break
    return problems


def summarize(files: PackedFiles) -> DatasetSummary:
    lengths = files.doc_lengths()
    stats = {
        "mean": float(lengths.mean()) if lengths.size else 0.0,
        "median": float(np.median(lengths)) if lengths.size else 0.0,
        "p95": float(np.percentile(lengths, 95)) if lengths.size else 0.0,
        "max": float(lengths.max()) if lengths.size else 0.0,
    }
    # bincount over a vocab-sized array: one pass, no per-token Python work
    counts = np.zeros(files.vocab_size, dtype=np.int64)
    for start in range(0, files.n_tokens, 1 << 24):
        block = np.asarray(files.tokens[start : start + (1 << 24)])
        counts += np.bincount(block, minlength=files.vocab_size)[: files.vocab_size]
    share = float(np.asarray(files.mask).mean()) if files.mask is not None and files.n_tokens else None
    return DatasetSummary(
        name=str(files.paths.prefix),
        kind=files.kind,
        dtype=str(files.tokens.dtype),
        n_tokens=files.n_tokens,
        n_docs=files.n_docs,
        vocab_size=files.vocab_size,
        doc_length=stats,
        distinct_ids=int(np.count_nonzero(counts)),
        loss_token_share=share,
        problems=verify(files),
    )


def _decode_sample(files: PackedFiles, tokenizer_path: str | None, n: int, max_tokens: int) -> list[str]:
    from engine.tokenizer import TokenizerError, load_tokenizer

    path = tokenizer_path or files.meta.get("tokenizer", {}).get("path")
    if not path:
        return ["(no tokenizer known: pass --tokenizer to decode a sample)"]
    try:
        tokenizer = load_tokenizer(path)
    except (ValueError, OSError) as e:
        return [f"(cannot load tokenizer {path}: {e}; pass --tokenizer)"]
    picks = np.linspace(0, files.n_docs - 1, num=min(n, files.n_docs)).astype(int) if files.n_docs else []
    out = []
    for doc in picks:
        s, e = int(files.offsets[doc]), int(files.offsets[doc + 1])
        ids = np.asarray(files.tokens[s : min(e, s + max_tokens)]).tolist()
        try:
            text = tokenizer.decode(ids).rstrip("\ufffd")  # the cut may fall inside a byte-fallback character
            if files.mask is not None:
                mask = np.asarray(files.mask[s : s + len(ids)])
                loss = tokenizer.decode([t for t, m in zip(ids, mask) if m])
                text += f"\n  [loss on]: {loss}"
        except TokenizerError as error:  # an id beyond the vocabulary: the check line reports it
            text = f"(cannot decode: {error})"
        out.append(f"doc {doc:,} ({e - s:,} tokens): {text}")
    return out


def format_summary(summary: DatasetSummary, meta: dict[str, Any]) -> str:
    lines = [
        f"dataset   {summary.name} ({summary.kind}, {summary.dtype}, vocab {summary.vocab_size:,})",
        f"tokens    {summary.n_tokens:,} in {summary.n_docs:,} documents; {summary.distinct_ids:,} distinct ids",
        "doc len   mean {mean:.1f}, median {median:.0f}, p95 {p95:.0f}, max {max:.0f} tokens".format(
            **summary.doc_length
        ),
    ]
    if summary.loss_token_share is not None:
        lines.append(f"loss mask {summary.loss_token_share:.1%} of tokens count for the loss")
    if not meta.get("bare"):
        tok = meta.get("tokenizer", {})
        lines.append(f"tokenizer {tok.get('path')} (sha256 {str(tok.get('sha256'))[:12]})")
        if meta.get("n_chars"):
            lines.append(
                f"text      {meta['n_chars']:,} characters packed, "
                f"{meta['n_chars'] / max(summary.n_tokens - summary.n_docs, 1):.2f} chars/token"
            )
        dropped = meta.get("dropped") or {}
        lines.append("dropped   " + (", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items())) or "nothing"))
    lines.append(
        "check     "
        + (
            "OK: sizes, offsets, ids and EOS agree with the meta"
            if not summary.problems
            else "FAILED: " + "; ".join(summary.problems)
        )
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.inspect",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("dataset", help="dataset prefix or file: data/corpus, data/corpus.bin, data/corpus.meta.json")
    parser.add_argument(
        "--tokenizer", help="decode the sample with this tokenizer (default: the one named in the meta)"
    )
    parser.add_argument("--sample", type=int, default=1, help="documents to decode (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens decoded per sample document")
    parser.add_argument("--dtype", choices=["uint16", "uint32"], help="for a bare .bin without meta")
    parser.add_argument("--vocab-size", type=int, help="for a bare .bin without meta")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    paths = DatasetPaths.of(args.dataset)
    ok = True
    for target in [paths, paths.val()]:
        if target is not paths and not target.meta.exists():
            continue
        files = open_packed(target.prefix, dtype=args.dtype, vocab_size=args.vocab_size, check_ids=False)  # verify
        summary = summarize(files)
        print(format_summary(summary, files.meta))
        for line in _decode_sample(files, args.tokenizer, args.sample, args.max_tokens):
            print("sample    " + line)
        print()
        ok = ok and not summary.problems
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
