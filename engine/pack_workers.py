"""What one packing worker process does: read (optionally), clean, encode, fingerprint.

Each worker loads the tokenizer once (:func:`init_worker`). A task is either a batch of records the
main process read (one big file), or one whole small file that the worker reads itself (a folder of
many files, such as chinese-poetry): then reading runs on every core too, and the main process only
deduplicates and writes. Everything returned is compact and cheap to pickle: one token array in the
file's dtype per task plus per-document lengths.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.chat_template import ChatFormatError
from engine.clean import CleanConfig, Cleaner
from engine.format import DatasetError
from engine.sources import Corpus, SourceOptions, SourceReport
from engine.tokenizer import Tokenizer, load_tokenizer

# A record travelling to a worker: (text or fields, source, lineno).
RawRecord = tuple[Any, str, int]


@dataclass
class WorkerConfig:
    tokenizer_path: str
    kind: str  # "pretrain" | "sft" | "dpo"
    clean: CleanConfig
    split_seed: int
    dtype: str  # the .bin dtype: tokens are cast in the worker, halving what travels back for uint16
    need_digests: bool  # content hashes are only needed for dedup or a validation split
    source_options: SourceOptions = field(default_factory=SourceOptions)
    system_prompt: str | None = None
    field_names: dict[str, str] = field(default_factory=dict)  # chat: --fields NAME=KEY (conversations.rename_fields)
    chosen_only: bool = False  # SFT: a DPO pair is read as its prompt and chosen reply


@dataclass
class EncodedBatch:
    """One task's result, in input order.

    ``tokens`` concatenates every kept document (EOS included); ``lengths[i]`` is document i's token
    count, ``digests[i]`` its content fingerprint (dedup and split; empty when not needed),
    ``mask`` the loss mask (SFT/DPO). DPO pairs arrive as two consecutive documents. ``dropped``
    counts cleaning drops by reason; ``bad`` lists records that could not be parsed, as (reason,
    source, lineno, detail); ``report`` is the worker's reading report when it read a file itself.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    digests: list[bytes]
    mask: np.ndarray | None
    chars: int  # characters read (before cleaning)
    doc_chars: np.ndarray  # characters of each kept document (after cleaning)
    dropped: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str, int, str]] = field(default_factory=list)
    report: SourceReport | None = None
    parsed: dict[str, int] = field(default_factory=dict)  # SFT/DPO: records that became documents, per source
    reasoning_left_out: int = 0  # SFT/DPO: replies whose reasoning_content ChatML encoding left out


_config: WorkerConfig | None = None
_tokenizer: Tokenizer | None = None
_cleaner: Cleaner | None = None


def init_worker(config: WorkerConfig) -> None:
    """Load the tokenizer and cleaner once per process."""
    global _config, _tokenizer, _cleaner
    _config = config
    _tokenizer = load_tokenizer(config.tokenizer_path)
    _cleaner = Cleaner(config.clean)


def fingerprint(text: str, seed: int) -> bytes:
    """16-byte content hash: equal texts collide on purpose (dedup) and land in the same split."""
    return hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=16, salt=seed.to_bytes(8, "little")
    ).digest()


def encode_batch(records: list[RawRecord]) -> EncodedBatch:
    """Encode records the main process read."""
    assert _config is not None, "init_worker was not called"
    return _encode_pretrain(records) if _config.kind == "pretrain" else _encode_chat(records)


def encode_file(path: str) -> EncodedBatch:
    """Read one whole (small) file here, then encode it; its reading report travels back to be merged."""
    assert _config is not None, "init_worker was not called"
    corpus = Corpus([path], _config.source_options)
    corpus.report = SourceReport(quiet=True)
    if _config.kind == "pretrain":
        records = [(d.text, d.source, d.lineno) for d in corpus.documents()]
    else:
        records = [(r.fields, r.source, r.lineno) for r in corpus.records()]
    result = encode_batch(records)
    result.report = corpus.report
    return result


def _to_array(docs: list[list[int]], eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists (each followed by ``eos`` when given) into one array in the file dtype."""
    assert _config is not None and _tokenizer is not None
    flat: list[int] = []
    for ids in docs:
        flat += ids
        if eos is not None:
            flat.append(eos)
    tokens = np.array(flat, dtype=np.int64)
    if tokens.size and (int(tokens.max()) >= _tokenizer.vocab_size or int(tokens.min()) < 0):
        raise DatasetError(f"the tokenizer produced an id outside 0..{_tokenizer.vocab_size - 1}: its files disagree")
    extra = 0 if eos is None else 1
    lengths = np.fromiter((len(ids) + extra for ids in docs), dtype=np.int64, count=len(docs))
    return tokens.astype(_config.dtype), lengths


def _encode_pretrain(records: list[RawRecord]) -> EncodedBatch:
    assert _tokenizer is not None and _cleaner is not None and _config is not None
    texts: list[str] = []
    dropped: dict[str, int] = {}
    chars = 0
    for text, _source, _lineno in records:
        chars += len(text)
        cleaned, reason = _cleaner.clean(text)
        if cleaned is None:
            dropped[reason or "dropped"] = dropped.get(reason or "dropped", 0) + 1
        else:
            texts.append(cleaned)
    tokens, lengths = _to_array(_tokenizer.encode_batch(texts) if texts else [], _tokenizer.eos_id)
    digests = [fingerprint(t, _config.split_seed) for t in texts] if _config.need_digests else []
    doc_chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return EncodedBatch(tokens, lengths, digests, None, chars, doc_chars, dropped)


def _encode_chat(records: list[RawRecord]) -> EncodedBatch:
    from engine.conversations import (
        count_reasoning,
        encode_conversation,
        encode_preference,
        parse_conversation,
        parse_preference,
    )

    assert _tokenizer is not None and _config is not None
    docs: list[list[int]] = []
    masks: list[np.ndarray] = []
    digests: list[bytes] = []
    doc_chars: list[int] = []
    bad: list[tuple[str, str, int, str]] = []
    parsed: dict[str, int] = {}
    chars = left_out = 0
    for fields, source, lineno in records:
        try:
            if _config.kind == "sft":
                messages = parse_conversation(
                    fields, system=_config.system_prompt, names=_config.field_names, chosen_only=_config.chosen_only
                )
                encoded = [encode_conversation(_tokenizer, messages)]
                key = repr([(m["role"], m["content"]) for m in messages])
                left_out += count_reasoning(messages)
            else:
                prompt, chosen, rejected = parse_preference(fields, names=_config.field_names)
                encoded = list(encode_preference(_tokenizer, prompt, chosen, rejected))
                key = repr(([(m["role"], m["content"]) for m in prompt], chosen, rejected))
                left_out += count_reasoning(prompt)
        except ChatFormatError as e:
            bad.append((getattr(e, "reason", "bad_conversation"), source, lineno, str(e)))
            continue
        chars += len(key)
        parsed[source] = parsed.get(source, 0) + 1
        digest = fingerprint(key, _config.split_seed)
        for ids, mask in encoded:
            docs.append(np.asarray(ids).tolist())
            masks.append(np.asarray(mask, dtype=np.uint8))
            digests.append(digest)
            doc_chars.append(len(key) // len(encoded))
    tokens, lengths = _to_array(docs, None)  # encode_conversation already ends each document with EOS
    mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    doc_sizes = np.asarray(doc_chars, dtype=np.int64)
    return EncodedBatch(
        tokens, lengths, digests, mask, chars, doc_sizes, {}, bad, parsed=parsed, reasoning_left_out=left_out
    )


def small_files(items: list[Path | str], max_bytes: int) -> list[str] | None:
    """The corpus as a list of files for workers to read themselves, or None when that does not pay off."""
    if len(items) < 2 or not all(isinstance(p, Path) for p in items):
        return None
    if any(Path(p).stat().st_size > max_bytes for p in items):
        return None  # a big file is read by the main process in batches, keeping memory flat
    return [str(p) for p in items]
