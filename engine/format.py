"""The packed dataset format (engine v1): ``NAME.bin``, ``NAME.idx.npy``, ``NAME.mask.bin``, ``NAME.meta.json``.

``NAME.bin`` holds flat little-endian token ids (``uint16`` when the vocabulary has at most 65,536
ids, else ``uint32``), every document ending with the EOS id, so a bare
``np.memmap(path, dtype=np.uint16)`` reads it like nanoGPT/llama2.c/baby-llama2-chinese do.
``NAME.idx.npy`` holds ``int64`` document start offsets (``n_docs + 1`` entries, the last is
``n_tokens``). ``NAME.mask.bin`` (SFT/DPO only) holds one ``uint8`` per token, 1 where the loss
counts. ``NAME.meta.json`` is written last: its presence means the dataset is complete.

Writers go through :class:`AtomicOutput` (temporary names, renamed at the end, meta last) and
readers through :func:`open_packed`, which checks every size against the meta and refuses a
mismatch with a one-line reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.publish import remove_stale_temporaries, temporary_sibling, write_text_atomic
from engine.tokenizer.spec import tokenizer_mismatch

FORMAT = "zhllm-engine-v1"
KINDS = ("pretrain", "sft", "dpo")
UINT16_LIMIT = 65536


class DatasetError(ValueError):
    """A packed dataset is missing, torn or does not match what the caller expects (one-line message)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab ≤ 65,536), else ``uint32``: never a silent overflow."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= UINT16_LIMIT else np.dtype("<u4")


@dataclass(frozen=True)
class DatasetPaths:
    """The four file names of packed dataset ``prefix`` (``data/corpus`` → ``data/corpus.bin``, …)."""

    prefix: Path

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> "DatasetPaths":
        """Accept ``data/corpus``, ``data/corpus.bin``, ``data/corpus.meta.json`` or a DatasetPaths alike."""
        if isinstance(path, DatasetPaths):
            return path
        text = str(path)
        for suffix in (".meta.json", ".idx.npy", ".mask.bin", ".bin"):
            if text.endswith(suffix):
                text = text[: -len(suffix)]
                break
        return cls(Path(text))

    def _with(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix)

    @property
    def bin(self) -> Path:
        return self._with(".bin")

    @property
    def idx(self) -> Path:
        return self._with(".idx.npy")

    @property
    def mask(self) -> Path:
        return self._with(".mask.bin")

    @property
    def meta(self) -> Path:
        return self._with(".meta.json")

    def all(self) -> list[Path]:
        return [self.bin, self.idx, self.mask, self.meta]

    def exists(self) -> bool:
        return any(p.exists() for p in self.all())

    def val(self) -> "DatasetPaths":
        """The validation split written beside a training split: ``corpus`` → ``corpus.val``."""
        return DatasetPaths(self.prefix.with_name(self.prefix.name + ".val"))


tmp_name = temporary_sibling  # the temporary name a file is written under before its atomic rename


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


class AtomicOutput:
    """Write a packed dataset under temporary names; publish it whole or not at all.

    ``with AtomicOutput(paths, overwrite=False) as out:`` then write to ``out.tmp(paths.bin)`` etc.
    and call ``out.commit(meta)`` last. Leaving the block without ``commit`` (an exception, a
    KeyboardInterrupt) deletes the temporaries, so no dataset appears under the final name.
    """

    def __init__(self, paths: DatasetPaths, overwrite: bool = False) -> None:
        self.paths = paths
        self.overwrite = overwrite
        self._tmps: dict[Path, Path] = {}
        self.committed = False

    def __enter__(self) -> "AtomicOutput":
        existing = [p for p in self.paths.all() if p.exists()]
        if existing and not self.overwrite:
            raise DatasetError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another --out")
        # A killed writer (SIGKILL, power loss) left its hidden temporaries here: free that space first.
        remove_stale_temporaries(self.paths.prefix.parent, files=True)
        self.paths.prefix.parent.mkdir(parents=True, exist_ok=True)
        return self

    def tmp(self, final: Path) -> Path:
        """Temporary path to write ``final`` to; renamed over ``final`` by :meth:`commit`."""
        path = tmp_name(final)
        self._tmps[final] = path
        return path

    def commit(self, meta: dict[str, Any]) -> None:
        """Rename every temporary into place, remove stale files of an old dataset, write the meta last."""
        # Remove the old meta first so a crash between renames never leaves an old meta over new data.
        if self.paths.meta.exists():
            self.paths.meta.unlink()
        for final, tmp in self._tmps.items():
            os.replace(tmp, final)
        for stale in (self.paths.bin, self.paths.idx, self.paths.mask):
            if stale not in self._tmps and stale.exists():
                stale.unlink()
        write_json_atomic(self.paths.meta, meta)
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            for tmp in self._tmps.values():
                tmp.unlink(missing_ok=True)
            tmp_name(self.paths.meta).unlink(missing_ok=True)


@dataclass
class PackedFiles:
    """A packed dataset opened for reading: memory-mapped tokens (and mask), offsets, meta."""

    paths: DatasetPaths
    meta: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "pretrain"))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


REPACK = "re-pack it with `python -m engine.prepare`"
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_ID_KEYS = ("bos_id", "eos_id", "pad_id")
_OPTIONAL = {  # keys readers use when present: (type, what the error says is expected)
    "tokenizer": (dict, 'an object {"path", "sha256"}'),
    "dropped": (dict, "an object of counts by reason"),
    "n_chars": (int, "a whole number"),
}


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _asked_dtype(dtype: Any) -> np.dtype | None:
    """The token dtype a caller named (``"uint16"``, ``"<u4"``, ``np.uint16``), None when it is not one of ours."""
    try:
        asked = np.dtype(dtype)
    except TypeError:
        return None
    return asked if asked in TOKEN_DTYPES.values() else None


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a parsed meta (missing key, wrong type, dtype and vocab_size that disagree), or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    if meta.get("format") != FORMAT:
        return f"has format {meta.get('format')!r}, this engine reads {FORMAT!r}"
    for key in ("dtype", "n_tokens", "n_docs", "vocab_size"):
        if key not in meta:
            return f"has no key {key!r}"
    if meta["dtype"] not in TOKEN_DTYPES:
        return f"key 'dtype' is {meta['dtype']!r}, expected 'uint16' or 'uint32'"
    for key, least in (("n_tokens", 0), ("n_docs", 0), ("vocab_size", 1)):
        if not _whole(meta[key]) or meta[key] < least:
            return f"key {key!r} is {meta[key]!r}, expected a whole number >= {least}"
    limit = np.iinfo(TOKEN_DTYPES[meta["dtype"]]).max + 1
    if meta["vocab_size"] > limit:
        return f"key 'vocab_size' is {meta['vocab_size']:,}, more ids than {meta['dtype']} holds ({limit:,})"
    if meta.get("kind", "pretrain") not in KINDS:
        return f"key 'kind' is {meta['kind']!r}, expected one of {', '.join(KINDS)}"
    for key in _ID_KEYS:
        value = meta.get(key)
        if value is not None and not (_whole(value) and 0 <= value < meta["vocab_size"]):
            return f"key {key!r} is {value!r}, expected an id below vocab_size {meta['vocab_size']:,} (or null)"
    for key, (kind, what) in _OPTIONAL.items():
        if key in meta and not (isinstance(meta[key], kind) and not isinstance(meta[key], bool)):
            return f"key {key!r} is {meta[key]!r}, expected {what}"
    return None


def read_meta(paths: DatasetPaths) -> dict[str, Any]:
    """The meta of ``paths``, refused in one line naming the file and the key when it is unreadable or inconsistent."""
    try:
        with open(paths.meta, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{paths.meta} is not valid JSON ({e}): re-run engine.prepare") from None
    problem = _meta_problem(meta)
    if problem:
        raise DatasetError(f"{paths.meta} {problem}: {REPACK}, or fix that key")
    return meta


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _load_offsets(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path} cannot be read as offsets ({e}): {REPACK}") from None


def _check_offsets(path: Path, offsets: np.ndarray, n_tokens: int) -> None:
    """``offsets`` start at 0, rise strictly and end at ``n_tokens`` (one document per gap)."""
    if offsets.ndim != 1 or offsets.shape[0] < 1 or offsets.dtype.kind not in "iu":
        raise DatasetError(f"{path} holds {offsets.shape} {offsets.dtype}, not a list of int64 offsets: {REPACK}")
    if offsets[0] != 0 or offsets[-1] != n_tokens or (offsets.shape[0] > 1 and np.any(np.diff(offsets) <= 0)):
        raise DatasetError(f"{path} offsets are not increasing from 0 to n_tokens ({n_tokens:,}): {REPACK}")


@dataclass(frozen=True)
class BadIds:
    """Token ids at or above the vocabulary size: how many, and the first one (its offset and document)."""

    count: int
    offset: int
    token_id: int
    document: int


def find_bad_ids(files: PackedFiles, chunk: int = 1 << 24) -> BadIds | None:
    """Ids ``>= files.vocab_size`` in ``files.tokens``: a vectorised max per chunk, a closer look only where one is."""
    vocab = files.vocab_size
    if vocab > np.iinfo(files.tokens.dtype).max:
        return None  # every id the dtype can hold is in the vocabulary
    count, first = 0, None
    for start in range(0, files.n_tokens, chunk):
        block = np.asarray(files.tokens[start : start + chunk])
        if int(block.max()) < vocab:
            continue
        bad = np.flatnonzero(block >= vocab)
        count += int(bad.size)
        first = start + int(bad[0]) if first is None else first
    if first is None:
        return None
    document = int(np.searchsorted(files.offsets, first, side="right")) - 1
    return BadIds(count, first, int(files.tokens[first]), document)


def describe_bad_ids(files: PackedFiles, bad: BadIds) -> str:
    return (
        f"{files.paths.bin} holds {bad.count:,} token id(s) >= the vocabulary size {files.vocab_size:,}, the first "
        f"at token {bad.offset:,} (document {bad.document:,}): id {bad.token_id:,}"
    )


_CHECKED_IDS: set[tuple] = set()  # token files already scanned clean by this process: (path, size, mtime, inode, vocab)


def check_token_ids(files: PackedFiles) -> None:
    """Refuse, in one line naming the first bad offset and document, a token file with an id the model cannot embed
    (on a GPU that is a device-side assert hours into a run). Each file is scanned once per process."""
    stat = files.paths.bin.stat()
    key = (str(files.paths.bin.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, files.vocab_size)
    if key in _CHECKED_IDS:
        return
    bad = find_bad_ids(files)
    if bad is not None:
        fix = (
            "pass the --vocab-size of the tokenizer that wrote it"
            if files.meta.get("bare")
            else f"the file is corrupt or its meta's vocab_size is wrong: {REPACK}"
        )
        raise DatasetError(f"{describe_bad_ids(files, bad)}; {fix}")
    _CHECKED_IDS.add(key)


def open_packed(
    path: str | os.PathLike[str],
    *,
    tokenizer_sha256: str | None = None,
    dtype: str | None = None,
    vocab_size: int | None = None,
    check_ids: bool = True,
) -> PackedFiles:
    """Open and check a packed dataset; raise :class:`DatasetError` with a one-line reason if it is torn.

    ``tokenizer_sha256``: refuse a dataset packed with another tokenizer (see
    ``engine.tokenizer.Tokenizer.sha256``). A bare ``.bin`` with no meta (someone else's) is accepted
    only with explicit ``dtype`` and ``vocab_size``; it is then one document unless an ``.idx.npy``
    sits beside it. ``check_ids``: refuse ids ``>= vocab_size`` (:func:`check_token_ids`); callers that only
    read the meta, or report bad ids themselves, pass False.
    """
    paths = DatasetPaths.of(path)
    if not paths.bin.exists():
        raise DatasetError(f"{paths.bin} not found: pack a corpus first with `python -m engine.prepare`")
    if paths.meta.exists():
        files = _open_with_meta(paths, tokenizer_sha256, dtype, vocab_size)
    else:
        files = _open_bare(paths, dtype, vocab_size)
    if check_ids:
        check_token_ids(files)
    return files


def _check_asked(paths: DatasetPaths, meta: dict[str, Any], dtype: str | None, vocab_size: int | None) -> None:
    """The dtype and vocabulary the caller asked for are the ones the meta records."""
    if dtype is not None and _asked_dtype(dtype) != TOKEN_DTYPES[meta["dtype"]]:
        raise DatasetError(f"{paths.meta} says dtype {meta['dtype']}, but {dtype} was asked for")
    if vocab_size is not None and int(vocab_size) != int(meta["vocab_size"]):
        raise DatasetError(
            f"{paths.prefix} was packed for a vocabulary of {meta['vocab_size']} ids, not {vocab_size}: "
            "re-pack it with the model's tokenizer"
        )


def _open_with_meta(
    paths: DatasetPaths, tokenizer_sha256: str | None, dtype: str | None, vocab_size: int | None
) -> PackedFiles:
    meta = read_meta(paths)
    _check_asked(paths, meta, dtype, vocab_size)
    if tokenizer_sha256 is not None:
        packed_with = meta.get("tokenizer") or {}
        refusal = tokenizer_mismatch(
            {"path": packed_with.get("path"), "sha256": packed_with.get("sha256") or "none"},
            {"path": "the one given", "sha256": tokenizer_sha256},
            owner=str(paths.prefix),
            other="the tokenizer",
            verb="packed",
            fix="re-pack with this tokenizer or pass the one it was packed with",
        )
        if refusal:
            raise DatasetError(refusal)

    token_type = TOKEN_DTYPES[meta["dtype"]]
    n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
    expected = n_tokens * token_type.itemsize
    actual = paths.bin.stat().st_size
    if actual != expected:
        raise DatasetError(
            f"{paths.bin} has {actual:,} bytes but its meta says {n_tokens:,} {token_type.name} tokens "
            f"({expected:,} bytes): the file is truncated or from another run; re-run engine.prepare"
        )
    if not paths.idx.exists():
        raise DatasetError(f"{paths.idx} is missing: re-run engine.prepare")
    offsets = _load_offsets(paths.idx)
    if offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.shape[0] != n_docs + 1:
        raise DatasetError(
            f"{paths.idx} should hold {n_docs + 1:,} int64 offsets, found {offsets.shape} {offsets.dtype}: "
            "re-run engine.prepare"
        )
    _check_offsets(paths.idx, offsets, n_tokens)
    return PackedFiles(paths, meta, _memmap(paths.bin, token_type, n_tokens), offsets, _open_mask(paths, meta))


def _open_mask(paths: DatasetPaths, meta: dict[str, Any]) -> np.ndarray | None:
    """The loss mask of an SFT/DPO dataset (one byte per token), None for pretraining data."""
    if meta.get("kind", "pretrain") not in ("sft", "dpo"):
        return None
    n_tokens = int(meta["n_tokens"])
    if not paths.mask.exists():
        raise DatasetError(f"{paths.mask} is missing for a {meta['kind']} dataset: re-run engine.prepare")
    if paths.mask.stat().st_size != n_tokens:
        raise DatasetError(
            f"{paths.mask} has {paths.mask.stat().st_size:,} bytes, expected {n_tokens:,} (one per token): "
            "re-run engine.prepare"
        )
    return _memmap(paths.mask, np.dtype(np.uint8), n_tokens)


def _open_bare(paths: DatasetPaths, dtype: str | None, vocab_size: int | None) -> PackedFiles:
    if dtype is None or vocab_size is None:
        raise DatasetError(
            f"{paths.bin} has no {paths.meta.name}: pass --dtype (uint16/uint32) and --vocab-size to read a bare .bin"
        )
    token_type = _asked_dtype(dtype)
    if token_type is None:
        raise DatasetError(f"--dtype must be uint16 or uint32, not {dtype}")
    if not _whole(vocab_size) or vocab_size < 1:
        raise DatasetError(f"--vocab-size must be a whole number >= 1 to read the bare {paths.bin}, got {vocab_size!r}")
    size = paths.bin.stat().st_size
    if size % token_type.itemsize:
        raise DatasetError(f"{paths.bin} has {size} bytes, not a whole number of {token_type.name} tokens")
    n_tokens = size // token_type.itemsize
    if paths.idx.exists():
        offsets = _load_offsets(paths.idx)
        _check_offsets(paths.idx, offsets, n_tokens)
        offsets = offsets.astype(np.int64)
    else:
        offsets = np.array([0, n_tokens], dtype=np.int64)
    meta = {
        "format": None,
        "kind": "pretrain",
        "dtype": token_type.name,
        "n_tokens": n_tokens,
        "n_docs": int(offsets.shape[0] - 1),
        "vocab_size": int(vocab_size),
        "bare": True,
    }
    return PackedFiles(paths, meta, _memmap(paths.bin, token_type, n_tokens), offsets, None)
