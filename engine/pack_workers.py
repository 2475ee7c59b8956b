"""What one packing worker process does to a batch of records: clean, encode, fingerprint.

Each worker loads the tokenizer once (:func:`init_worker`), then turns batches of raw records into
token arrays with :func:`encode_batch`. The main process only reads, deduplicates and writes, so the
expensive work (cleaning, tokenizing) runs on every core. Everything returned is small and cheap to
pickle: one concatenated token array per batch plus per-document lengths.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.chat_template import ChatFormatError
from engine.clean import CleanConfig, Cleaner
from engine.tokenizer import Tokenizer, load_tokenizer

# A record travelling to a worker: (text or fields, source, lineno).
RawRecord = tuple[Any, str, int]


@dataclass
class WorkerConfig:
    tokenizer_path: str
    kind: str  # "pretrain" | "sft" | "dpo"
    clean: CleanConfig
    split_seed: int
    system_prompt: str | None = None


@dataclass
class EncodedBatch:
    """One batch back from a worker, in input order.

    ``tokens`` concatenates every kept document (EOS included); ``lengths[i]`` is document i's token
    count, ``digests[i]`` its content fingerprint (dedup and split), ``mask`` the loss mask (SFT/DPO).
    DPO pairs arrive as two consecutive documents sharing one digest. ``dropped`` counts cleaning
    drops by reason; ``bad`` lists records that could not be parsed, as (reason, source, lineno, detail).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    digests: list[bytes]
    mask: np.ndarray | None
    chars: int  # characters read (before cleaning)
    doc_chars: np.ndarray  # characters of each kept document (after cleaning)
    dropped: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str, int, str]] = field(default_factory=list)


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
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, salt=seed.to_bytes(8, "little")).digest()


def encode_batch(records: list[RawRecord]) -> EncodedBatch:
    assert _config is not None, "init_worker was not called"
    if _config.kind == "pretrain":
        return _encode_pretrain(records)
    return _encode_chat(records)


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
    encoded = _tokenizer.encode_batch(texts) if texts else []
    eos = _tokenizer.eos_id
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for ids in encoded:
        n = len(ids)
        tokens[pos : pos + n] = ids
        tokens[pos + n] = eos
        pos += n + 1
    digests = [fingerprint(t, _config.split_seed) for t in texts]
    doc_chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return EncodedBatch(tokens, lengths, digests, None, chars, doc_chars, dropped)


def _encode_chat(records: list[RawRecord]) -> EncodedBatch:
    from engine.conversations import encode_conversation, encode_preference, parse_conversation, parse_preference

    assert _tokenizer is not None and _config is not None
    pieces: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    lengths: list[int] = []
    digests: list[bytes] = []
    doc_chars: list[int] = []
    bad: list[tuple[str, str, int, str]] = []
    chars = 0
    for fields, source, lineno in records:
        try:
            if _config.kind == "sft":
                messages = parse_conversation(fields, system=_config.system_prompt)
                docs = [encode_conversation(_tokenizer, messages)]
                key = repr([(m["role"], m["content"]) for m in messages])
            else:
                prompt, chosen, rejected = parse_preference(fields)
                docs = list(encode_preference(_tokenizer, prompt, chosen, rejected))
                key = repr(([(m["role"], m["content"]) for m in prompt], chosen, rejected))
        except ChatFormatError as e:
            bad.append(("bad_conversation", source, lineno, str(e)))
            continue
        chars += len(key)
        digest = fingerprint(key, _config.split_seed)
        for ids, mask in docs:
            pieces.append(np.asarray(ids, dtype=np.uint32))
            masks.append(np.asarray(mask, dtype=np.uint8))
            lengths.append(len(ids))
            digests.append(digest)
            doc_chars.append(len(key) // len(docs))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    return EncodedBatch(tokens, np.asarray(lengths, dtype=np.int64), digests, mask, chars,
                        np.asarray(doc_chars, dtype=np.int64), {}, bad)
