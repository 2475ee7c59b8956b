"""Pack a corpus into ``NAME.bin`` / ``NAME.idx.npy`` / ``NAME.mask.bin`` / ``NAME.meta.json``.

The main process streams records from :class:`engine.sources.Corpus` in batches to worker processes
(:mod:`engine.pack_workers`: clean + encode), keeps a bounded number of batches in flight so memory
stays flat whatever the corpus size, takes results back in submission order (the output is the same
for any worker count), drops exact duplicates, routes each document to the train or validation split
by its content hash, and appends tokens to temporary files that are renamed into place at the end,
meta last. An interrupt or an error leaves no dataset under the final name.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from tqdm import tqdm

from engine import __version__
from engine.clean import CleanConfig, CleanStats, warm_cleaner
from engine.format import FORMAT, KINDS, AtomicOutput, DatasetError, DatasetPaths, token_dtype
from engine.pack_workers import (
    EncodedBatch,
    RawRecord,
    WorkerConfig,
    encode_batch,
    encode_file,
    init_worker,
    small_files,
)
from engine.sources import Corpus
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
SMALL_FILE_BYTES = 16 << 20  # files up to this size are read whole by a worker (folders of many files)


@dataclass
class PackConfig:
    out: str  # dataset prefix: data/corpus -> data/corpus.bin, data/corpus.val.bin, ...
    kind: str = "pretrain"
    val_fraction: float = 0.0
    split_seed: int = 0
    workers: int = 0  # 0 = every CPU core; 1 = in this process (no pool)
    batch_chars: int = 1 << 20  # text per batch sent to a worker
    overwrite: bool = False
    clean: CleanConfig = field(default_factory=CleanConfig)
    system_prompt: str | None = None
    field_names: dict[str, str] = field(default_factory=dict)  # chat: --fields NAME=KEY
    chosen_only: bool = False  # SFT: read DPO pairs as their prompt and chosen reply
    progress: bool = True


class _SplitWriter:
    """Appends documents of one split (train or val) to temporary files; publishes them on commit."""

    def __init__(self, paths: DatasetPaths, dtype: np.dtype, with_mask: bool, overwrite: bool) -> None:
        self.paths = paths
        self.dtype = dtype
        self.output = AtomicOutput(paths, overwrite=overwrite).__enter__()
        self.bin: BinaryIO = open(self.output.tmp(paths.bin), "wb")
        self.mask: BinaryIO | None = open(self.output.tmp(paths.mask), "wb") if with_mask else None
        self.lengths: list[np.ndarray] = []  # per-batch document lengths: 8 bytes a document
        self.n_docs = 0
        self.n_tokens = 0
        self.n_chars = 0
        self.mask_tokens = 0

    def append(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None, chars: int) -> None:
        """Append whole documents: ``tokens`` is their concatenation, ``lengths`` their sizes."""
        if not lengths.size:
            return
        self.bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(lengths)
        self.n_docs += int(lengths.size)
        self.n_tokens += int(tokens.size)
        self.n_chars += chars
        if self.mask is not None and mask is not None:
            self.mask.write(mask.tobytes())
            self.mask_tokens += int(np.count_nonzero(mask))

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        self.bin.close()
        if self.mask is not None:
            self.mask.close()
        offsets = np.zeros(self.n_docs + 1, dtype=np.int64)
        if self.lengths:
            np.cumsum(np.concatenate(self.lengths), out=offsets[1:])
        with open(self.output.tmp(self.paths.idx), "wb") as f:
            np.save(f, offsets, allow_pickle=False)
        meta = {**meta, "n_tokens": self.n_tokens, "n_docs": self.n_docs, "n_chars": self.n_chars}
        if self.mask is not None:
            meta["n_loss_tokens"] = self.mask_tokens
        if meta["kind"] == "dpo":
            meta["n_pairs"] = meta["n_docs"] // 2
        self.output.commit(meta)
        return meta

    def abort(self) -> None:
        self.bin.close()
        if self.mask is not None:
            self.mask.close()
        self.output.__exit__(None, None, None)


Task = tuple[str, Any]  # ("records", [RawRecord, ...]) or ("file", path)


def _tasks(corpus: Corpus, kind: str, batch_chars: int, workers: int) -> Iterator[Task]:
    """Whole small files for the workers to read themselves, or batches of about ``batch_chars``
    characters (pretrain) / 256 records (chat) read here."""
    files = small_files(corpus.files, SMALL_FILE_BYTES) if workers > 1 else None
    if files is not None:
        for path in files:
            yield ("file", path)
        return
    batch: list[RawRecord] = []
    size = 0
    if kind == "pretrain":
        for doc in corpus.documents():
            batch.append((doc.text, doc.source, doc.lineno))
            size += len(doc.text)
            if size >= batch_chars:
                yield ("records", batch)
                batch, size = [], 0
    else:
        for record in corpus.records():
            batch.append((record.fields, record.source, record.lineno))
            if len(batch) >= 256:
                yield ("records", batch)
                batch = []
    if batch:
        yield ("records", batch)


def _run_task(task: Task) -> EncodedBatch:
    what, payload = task
    return encode_file(payload) if what == "file" else encode_batch(payload)


def _ordered_results(config: WorkerConfig, tasks: Iterator[Task], workers: int) -> Iterator[EncodedBatch]:
    """Run tasks on ``workers`` processes, yielding results in input order with bounded memory."""
    if workers <= 1:
        init_worker(config)
        for task in tasks:
            yield _run_task(task)
        return
    warm_cleaner()  # build the cleaner's tables once, before the fork, not once per worker
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=init_worker, initargs=(config,))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_run_task, (task,)))
            # Keep a couple of tasks per worker queued: enough to stay busy, never the whole corpus.
            while len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def is_val(digest: bytes, val_fraction: float) -> bool:
    """Deterministic document-level split: a document goes to validation when its hash falls below the fraction."""
    return int.from_bytes(digest[:8], "little") < val_fraction * 2**64


def pack_corpus(corpus: Corpus, tokenizer: Tokenizer, config: PackConfig) -> dict[str, Any]:
    """Pack ``corpus`` with ``tokenizer``; return the train split's meta (the val meta sits beside it)."""
    if config.kind not in KINDS:
        raise DatasetError(f"--kind must be one of {', '.join(KINDS)}, not {config.kind!r}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    dtype = token_dtype(tokenizer.vocab_size)
    with_mask = config.kind != "pretrain"
    train_paths = DatasetPaths.of(config.out)
    splits = {"train": train_paths}
    if config.val_fraction > 0:
        splits["val"] = train_paths.val()
    for paths in splits.values():  # refuse before doing any work
        if paths.exists() and not config.overwrite:
            raise DatasetError(
                f"{paths.prefix}.* already exists: pass --overwrite to replace it, or choose another --out"
            )

    workers = config.workers or os.cpu_count() or 1
    worker_config = WorkerConfig(
        str(tokenizer.path),
        config.kind,
        config.clean,
        config.split_seed,
        dtype.name,
        need_digests=config.clean.dedup or config.val_fraction > 0,
        source_options=corpus.options,
        system_prompt=config.system_prompt,
        field_names=config.field_names,
        chosen_only=config.chosen_only,
    )
    writers: dict[str, _SplitWriter] = {}
    stats = CleanStats()
    seen: set[bytes] | None = set() if config.clean.dedup else None  # 16-byte content digests
    chars = left_out = 0  # left_out: replies whose reasoning_content ChatML left out
    started = time.perf_counter()
    try:
        for name, paths in splits.items():
            writers[name] = _SplitWriter(paths, dtype, with_mask, config.overwrite)
        bar = tqdm(
            desc=f"packing {train_paths.prefix.name}", unit=" docs", disable=not config.progress, mininterval=1.0
        )
        for result in _ordered_results(
            worker_config, _tasks(corpus, config.kind, config.batch_chars, workers), workers
        ):
            if result.report is not None:
                corpus.report.merge(result.report)
            chars, left_out = chars + result.chars, left_out + result.reasoning_left_out
            for reason, count in result.dropped.items():
                stats.dropped[reason] += count
            for reason, source, lineno, detail in result.bad:
                corpus.report.bad(reason, source, lineno, detail)
            for source, count in result.parsed.items():
                corpus.report.counts(source).documents += count
            _route(result, writers, seen, stats, config.val_fraction, 2 if config.kind == "dpo" else 1)
            bar.update(len(result.lengths) + sum(result.dropped.values()) + len(result.bad))
            bar.set_postfix_str(
                f"{chars / 1e6 / max(time.perf_counter() - started, 1e-9):.1f} M chars/s", refresh=False
            )
        bar.close()
        if config.kind != "pretrain":
            _check_record_shapes(corpus, config.kind)
        corpus.check()
        if writers["train"].n_tokens == 0:
            raise DatasetError(
                f"no document left to pack after cleaning (dropped: {dict(stats.dropped) or 'none'}; "
                f"bad records: {corpus.report.total_bad}): check --source/--field and the cleaning limits"
            )
        seconds = time.perf_counter() - started
        base_meta = _meta(config, tokenizer, dtype, corpus, stats, seconds, chars)
        if with_mask:
            base_meta["reasoning_left_out"] = left_out
        metas = {name: writer.commit({**base_meta, "split": name}) for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    train_meta = metas["train"]
    logger.info(
        "packed %s docs, %s tokens into %s (%s) in %.1f s, %.1f M characters/s%s",
        f"{train_meta['n_docs']:,}",
        f"{train_meta['n_tokens']:,}",
        train_paths.bin,
        dtype.name,
        seconds,
        chars / 1e6 / max(seconds, 1e-9),
        f"; validation: {metas['val']['n_docs']:,} docs, {metas['val']['n_tokens']:,} tokens" if "val" in metas else "",
    )
    if left_out:
        logger.warning("%s", reasoning_left_out_message(left_out))
    return train_meta


def reasoning_left_out_message(count: int) -> str:
    """What to say of ``count`` replies whose ``reasoning_content`` was packed without it (ChatML has no place for
    it)."""
    return (
        f"{count:,} replies' reasoning_content was left out (ChatML trains on the content only): to train on the "
        "reasoning, give the raw data to `python -m llama.sft --template think`"
    )


def _check_record_shapes(corpus: Corpus, kind: str) -> None:
    """Refuse SFT data whose records are mostly not conversations, or DPO data that is mostly not pairs, saying what
    to do about it (the generic check would say "raise --max-bad", which only hides the problem)."""
    from engine.conversations import ACCEPTED_DPO, ACCEPTED_SFT

    advice = {
        "not_a_pair": f"DPO needs a prompt with a chosen and a rejected reply ({ACCEPTED_DPO}); conversations "
        "without a rejected reply are SFT data: fine-tune on them with `python -m llama.sft`",
        "preference_pair": "DPO preference pairs are for preference training: pass --chosen-only to train on each "
        "prompt and its chosen reply, or pack them with `python -m engine.prepare --kind dpo`",
        "unknown_format": "name the fields that hold the question and the answer with --fields "
        f"question=KEY,answer=KEY, or give conversations ({ACCEPTED_SFT})",
    }
    report = corpus.report
    top = report.top_bad()
    too_many = report.total_bad > corpus.options.max_bad * report.total_records
    if top is None or top[0] not in advice or not (too_many or report.total_bad == report.total_records):
        return
    reason, count, example = top
    where, _, detail = example.partition(f": {reason}: ")
    what = "DPO preference pairs" if kind == "dpo" else "SFT conversations"
    raise DatasetError(
        f"{count:,} of {report.total_records:,} records are not {what}, e.g. {where}: "
        f"{detail.split(';', 1)[0].split(': ', 1)[0]}; {advice[reason]}"
    )


def _route(
    result: EncodedBatch,
    writers: dict[str, _SplitWriter],
    seen: set[bytes] | None,
    stats: CleanStats,
    val_fraction: float,
    group: int,
) -> None:
    """Append the documents of ``result`` (``group`` consecutive ones form a DPO pair) to their splits,
    dropping exact duplicates; one write per split and batch."""
    n = int(result.lengths.size)
    if not result.digests or (seen is None and "val" not in writers):
        stats.kept += n // group
        writers["train"].append(result.tokens, result.lengths, result.mask, int(result.doc_chars.sum()))
        return
    split = np.zeros(n, dtype=np.int8)  # 0 train, 1 val, -1 dropped
    for first in range(0, n, group):
        digest = result.digests[first]
        if seen is not None:
            if digest in seen:
                stats.dropped["duplicate"] += 1
                split[first : first + group] = -1
                continue
            seen.add(digest)
        if "val" in writers and is_val(digest, val_fraction):
            split[first : first + group] = 1
        stats.kept += 1
    per_token = np.repeat(split, result.lengths)
    for code, name in ((0, "train"), (1, "val")):
        docs = split == code
        if name in writers and docs.any():
            tokens_in = per_token == code
            writers[name].append(
                result.tokens[tokens_in],
                result.lengths[docs],
                None if result.mask is None else result.mask[tokens_in],
                int(result.doc_chars[docs].sum()),
            )


def _meta(
    config: PackConfig,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    corpus: Corpus,
    stats: CleanStats,
    seconds: float,
    chars: int,
) -> dict[str, Any]:
    report = corpus.report.as_dict()
    dropped = Counter({f"clean:{k}": v for k, v in stats.dropped.items()})
    for reason, count in report.get("bad", {}).items():
        dropped[f"bad:{reason}"] += count
    return {
        "format": FORMAT,
        "kind": config.kind,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "sha256": tokenizer.sha256},
        "sources": report,
        "clean": {"config": config.clean.__dict__, **stats.as_dict()},
        "dropped": dict(dropped),
        "val_fraction": config.val_fraction,
        "split_seed": config.split_seed,
        "chars_read": chars,  # all splits, before cleaning
        "seconds": round(seconds, 3),
        "engine_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
