"""The teacher's top-K log-probs of every counted token, computed once and kept on disk beside the data, so a
teacher too big to sit beside the student runs alone, once, before training (``--teacher-top-k K``).

A cache of the packed dataset ``NAME`` is three files beside it, named by a key over everything its numbers
depend on (the data's sha256, the teacher's weights sha256, K, T, the sequence length and the precision), so a
different teacher, K, T or data makes a new cache and the same ones reuse it (a second run, a resumed one):

- ``NAME.topk-KEY.ids.bin``: ``[n_tokens, K]`` token ids, ``uint16`` when the vocabulary has ≤ 65,536 ids, else
  ``uint32`` (as ``NAME.bin``);
- ``NAME.topk-KEY.logprobs.bin``: ``[n_tokens, K]`` ``float16``, the log-softmax of the teacher's logits / T at
  those ids, largest first;
- ``NAME.topk-KEY.json``, written last: the format, every key field, the teacher's path and sha256, the data's
  sha256 and kind, K, T, the dtypes and the shape.

Row ``i`` belongs to the token at offset ``i`` of ``NAME.bin`` (the distribution of the token after it, as the
teacher saw it in its row or chunk, see :mod:`llama.training.distill_data`); rows of tokens that are never counted
(prompts, padding, a chunk's last token) are left zero. Disk: ``n_tokens × K × (2 or 4 + 2)`` bytes, checked
against the free space first. The files are written under temporary names, renamed, and the meta written last:
a killed pass leaves no cache that a later run trusts; a cache whose files do not match its meta is refused,
naming the file to delete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.format import DatasetPaths, token_dtype, write_json_atomic
from engine.publish import file_sha256, fsync, remove_stale_temporaries, temporary_sibling

from .distill import chunk_tokens
from .distill_data import OFFSETS, counted_offsets, open_rows
from .objectives import IGNORE_INDEX

log = logging.getLogger(__name__)

CACHE_FORMAT = "zhllm-teacher-topk-v1"
LOGPROB_DTYPE = np.dtype(np.float16)
FP16_MIN = float(np.finfo(np.float16).min)  # log-probs below it (never, in practice) are stored as it, not -inf


@dataclass(frozen=True)
class CacheSpec:
    """What a cache's numbers depend on (its key) and what it holds."""

    data_sha256: str
    data_kind: str
    teacher_sha256: str
    top_k: int
    temperature: float
    seq_len: int
    precision: str
    n_tokens: int
    vocab_size: int

    @property
    def key(self) -> str:
        fields = [self.data_sha256, self.teacher_sha256, self.top_k, self.temperature, self.seq_len, self.precision]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]

    @property
    def ids_dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_tokens, self.top_k)

    @property
    def n_bytes(self) -> int:
        return self.n_tokens * self.top_k * (self.ids_dtype.itemsize + LOGPROB_DTYPE.itemsize)


@dataclass(frozen=True)
class CachePaths:
    """The three files of one cache of the dataset ``prefix``."""

    ids: Path
    logprobs: Path
    meta: Path

    @classmethod
    def of(cls, prefix: Path, key: str) -> "CachePaths":
        bin_path = DatasetPaths.of(prefix).bin
        stem = f"{bin_path.stem}.topk-{key}"
        return cls(*(bin_path.with_name(f"{stem}{suffix}") for suffix in (".ids.bin", ".logprobs.bin", ".json")))

    @property
    def pattern(self) -> str:
        """How to name all three for deletion, in an error message."""
        return str(self.meta.with_suffix(".*"))


class TopKCache:
    """A complete cache opened for reading: ``[n_tokens, K]`` memmaps of ids and fp16 log-probs."""

    def __init__(self, paths: CachePaths, spec: CacheSpec) -> None:
        self.paths, self.spec = paths, spec
        self.ids = np.memmap(paths.ids, dtype=spec.ids_dtype, mode="r", shape=spec.shape)
        self.logprobs = np.memmap(paths.logprobs, dtype=LOGPROB_DTYPE, mode="r", shape=spec.shape)

    def rows(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and log-probs ``[len(offsets), K]`` of the tokens at these ``.bin`` offsets."""
        if offsets.size and (offsets.min() < 0 or offsets.max() >= self.spec.n_tokens):
            raise ValueError(f"{self.paths.meta} has no row for a counted token of this batch: delete the cache")
        return self.ids[offsets], self.logprobs[offsets]


# ---------------------------------------------------------------- identity and room


def data_sha256(prefix: Path) -> str:
    """One sha256 over a packed dataset's token, offset and (when present) mask files."""
    paths, digest = DatasetPaths.of(prefix), hashlib.sha256()
    for path in (paths.bin, paths.idx, paths.mask):
        if path.exists():
            digest.update(f"{path.name}:{file_sha256(path)};".encode())
    return digest.hexdigest()


def check_room(spec: CacheSpec, paths: CachePaths) -> None:
    """Log the cache's size; refuse in one line when its folder has not that much free."""
    gib, folder = spec.n_bytes / 2**30, paths.meta.parent
    log.info(
        "teacher cache: %s tokens x K %d x %d bytes = %.2f GiB in %s",
        f"{spec.n_tokens:,}",
        spec.top_k,
        spec.ids_dtype.itemsize + LOGPROB_DTYPE.itemsize,
        gib,
        folder,
    )
    free = shutil.disk_usage(folder).free
    if free < spec.n_bytes:
        raise ValueError(
            f"the teacher cache of {spec.n_tokens:,} tokens x K {spec.top_k} needs {gib:.2f} GiB in {folder}, which "
            f"has {free / 2**30:.2f} GiB free: free some space, lower --teacher-top-k, or drop it to run the teacher "
            "during training"
        )


# ---------------------------------------------------------------- reading


def expected_meta(spec: CacheSpec, teacher_path: str, data: Path) -> dict[str, Any]:
    """The meta a cache of ``spec`` has (the fields after ``format`` must all match for it to be used)."""
    return {
        "format": CACHE_FORMAT,
        **asdict(spec),
        "key": spec.key,
        "ids_dtype": spec.ids_dtype.name,
        "logprobs_dtype": LOGPROB_DTYPE.name,
        "shape": list(spec.shape),
        "teacher": teacher_path,
        "data": str(data),
    }


#: Meta fields that describe where things were, not what the numbers are: not compared.
_WHERE = ("teacher", "data")


def open_cache(paths: CachePaths, spec: CacheSpec) -> TopKCache | None:
    """The cache at ``paths``, or None when there is none or its meta is of other settings (it is computed again);
    a cache whose meta is unreadable or whose files do not fit it is refused in one line naming what to delete."""
    if not paths.meta.is_file():
        return None
    try:
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{paths.meta} is unreadable ({e}): delete {paths.pattern} to compute the cache again"
        ) from None
    wanted = expected_meta(spec, "", Path())
    differ = [k for k in wanted if k not in _WHERE and (not isinstance(meta, dict) or meta.get(k) != wanted[k])]
    if differ:
        log.warning("%s is of other settings (%s): computing the teacher cache again", paths.meta, ", ".join(differ))
        return None
    for path, itemsize in ((paths.ids, spec.ids_dtype.itemsize), (paths.logprobs, LOGPROB_DTYPE.itemsize)):
        size, expected = (path.stat().st_size if path.exists() else None), spec.n_tokens * spec.top_k * itemsize
        if size != expected:
            found = "missing" if size is None else f"{size:,} bytes"
            raise ValueError(
                f"{path} is {found}, its meta {paths.meta.name} says {expected:,}: the teacher cache is damaged; "
                f"delete {paths.pattern} to compute it again"
            )
    return TopKCache(paths, spec)


def other_caches(prefix: Path, key: str) -> list[str]:
    """The caches of other settings beside the data, each as ``KEY (K …, T …, teacher …)``, for the log."""
    found = []
    for meta_path in sorted(DatasetPaths.of(prefix).bin.parent.glob(f"{DatasetPaths.of(prefix).bin.stem}.topk-*.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("key") != key:
            teacher = str(meta.get("teacher_sha256", ""))[:12]
            found.append(f"{meta_path.name} (K {meta.get('top_k')}, T {meta.get('temperature')}, teacher {teacher})")
    return found


# ---------------------------------------------------------------- the precompute pass


def topk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K largest of ``log_softmax(hidden @ weight.T / T)`` per row and their ids, in float32, chunk by chunk (never
    whole logits for all rows); values clamped to the fp16 range they are stored in."""
    values, ids = [], []
    step = chunk_tokens(weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], step):
            logits = hidden[start : start + step].float() @ weight.float().T
            top = torch.log_softmax(logits / temperature, -1).topk(k, dim=-1)
            values.append(top.values.clamp(min=FP16_MIN))
            ids.append(top.indices)
    if not values:
        return torch.zeros(0, k, device=hidden.device), torch.zeros(0, k, dtype=torch.int64, device=hidden.device)
    return torch.cat(values), torch.cat(ids)


@torch.no_grad()
def teacher_pass(
    model: nn.Module,
    dataset: Any,
    write: Callable[[np.ndarray, torch.Tensor, torch.Tensor], None],
    spec: CacheSpec,
    batch_size: int,
    autocast: Any = None,
    progress: bool = True,
) -> int:
    """Every row (chunk) of ``dataset`` through the teacher, ``batch_size`` at a time, its counted tokens' top-K
    handed to ``write(offsets, log-probs, ids)``; returns how many tokens were written."""
    device, written = next(model.parameters()).device, 0
    with tqdm(total=dataset.n_samples, desc="teacher top-k", unit="row", disable=not progress) as bar:
        for start in range(0, dataset.n_samples, batch_size):
            batch = dataset.batch_at(np.arange(start, min(start + batch_size, dataset.n_samples)))
            offsets = counted_offsets(batch)
            counted = (batch["labels"] != IGNORE_INDEX).to(device)
            batch = {key: value.to(device) for key, value in batch.items() if key != OFFSETS}
            with autocast or nullcontext():
                hidden = model.hidden_states(batch["input_ids"], batch.get("position_ids"), batch.get("doc_ids"))
            values, ids = topk_logprobs(hidden[counted], model.lm_head.weight, spec.top_k, spec.temperature)
            write(offsets, values, ids)
            written += offsets.size
            bar.update(int(batch["input_ids"].shape[0]))
    return written


def build_cache(
    model: nn.Module,
    prefix: Path,
    spec: CacheSpec,
    meta: dict[str, Any],
    batch_size: int,
    autocast: Any = None,
    progress: bool = True,
) -> None:
    """Compute the cache of ``prefix`` with ``model`` and publish it: temporaries, renamed, the meta last."""
    paths = CachePaths.of(prefix, spec.key)
    for path in (paths.ids, paths.logprobs, paths.meta):  # what a killed pass of this cache left
        remove_stale_temporaries(path.parent, only=path.name, files=True)
    tmp_ids, tmp_logprobs = temporary_sibling(paths.ids), temporary_sibling(paths.logprobs)
    try:
        dataset = open_rows(prefix, spec.data_kind, spec.seq_len, offsets=True, pin_memory=False)
        written = _fill(model, dataset, spec, (tmp_ids, tmp_logprobs), batch_size, autocast, progress)
        paths.meta.unlink(missing_ok=True)  # never an old meta over new files, even for a moment
        os.replace(tmp_ids, paths.ids)
        os.replace(tmp_logprobs, paths.logprobs)
        write_json_atomic(paths.meta, {**meta, "counted_tokens": written})
    finally:
        tmp_ids.unlink(missing_ok=True)
        tmp_logprobs.unlink(missing_ok=True)


def _fill(
    model: nn.Module,
    dataset: Any,
    spec: CacheSpec,
    files: tuple[Path, Path],
    batch_size: int,
    autocast: Any,
    progress: bool,
) -> int:
    """The teacher pass into the two (temporary) files, flushed to disk; how many tokens were written."""
    ids = np.memmap(files[0], dtype=spec.ids_dtype, mode="w+", shape=spec.shape)
    logprobs = np.memmap(files[1], dtype=LOGPROB_DTYPE, mode="w+", shape=spec.shape)

    def write(offsets: np.ndarray, values: torch.Tensor, top_ids: torch.Tensor) -> None:
        ids[offsets] = top_ids.cpu().numpy().astype(spec.ids_dtype)
        logprobs[offsets] = values.cpu().numpy().astype(LOGPROB_DTYPE)

    written = teacher_pass(model, dataset, write, spec, batch_size, autocast, progress)
    for array, path in ((ids, files[0]), (logprobs, files[1])):
        array.flush()
        fsync(path)
    return written


# ---------------------------------------------------------------- what a run calls


@dataclass(frozen=True)
class CacheSettings:
    """What the run asks of its teacher caches (the data's identity is added per set)."""

    teacher_path: str
    teacher_sha256: str
    top_k: int
    temperature: float
    seq_len: int
    precision: str
    batch_size: int
    progress: bool = True


def spec_of(prefix: Path, kind: str, settings: CacheSettings, vocab_size: int) -> CacheSpec:
    files = DatasetPaths.of(prefix)
    n_tokens = int(json.loads(files.meta.read_text(encoding="utf-8"))["n_tokens"])
    return CacheSpec(
        data_sha256(prefix),
        kind,
        settings.teacher_sha256,
        settings.top_k,
        settings.temperature,
        settings.seq_len,
        settings.precision,
        n_tokens,
        vocab_size,
    )


def teacher_caches(
    sets: list[Path],
    kind: str,
    settings: CacheSettings,
    vocab_size: int,
    load_teacher: Callable[[], tuple[nn.Module, Any]],
) -> dict[Path, TopKCache]:
    """Each set's cache, opened, or computed first (on rank 0, the teacher alone on the device, loaded by
    ``load_teacher() -> (model, autocast)`` only when a set needs it, and freed after); keyed by resolved prefix."""
    specs = [spec_of(prefix, kind, settings, vocab_size) for prefix in sets]
    paths = [CachePaths.of(prefix, spec.key) for prefix, spec in zip(sets, specs)]
    missing = [i for i, (path, spec) in enumerate(zip(paths, specs)) if open_cache(path, spec) is None]
    if missing and int(os.environ.get("RANK", "0")) == 0:
        model, autocast = load_teacher()
        for i in missing:
            _build_one(model, autocast, sets[i], specs[i], settings)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the student gets the whole device
    for path in paths:  # ranks other than 0 wait for rank 0's files
        while not path.meta.is_file():
            time.sleep(1)
    return {prefix.resolve(): _opened(path, spec) for prefix, path, spec in zip(sets, paths, specs)}


def _build_one(model: nn.Module, autocast: Any, prefix: Path, spec: CacheSpec, settings: CacheSettings) -> None:
    paths = CachePaths.of(prefix, spec.key)
    others = other_caches(prefix, spec.key)
    if others:
        log.info("teacher caches of other settings beside %s, not used: %s", prefix, "; ".join(others))
    check_room(spec, paths)
    log.info(
        "computing the teacher's top-%d log-probs (T %g) of %s with %s (once; cached as %s)",
        spec.top_k,
        spec.temperature,
        prefix,
        settings.teacher_path,
        paths.meta.name,
    )
    meta = expected_meta(spec, settings.teacher_path, prefix)
    build_cache(model, prefix, spec, meta, settings.batch_size, autocast, settings.progress)


def _opened(paths: CachePaths, spec: CacheSpec) -> TopKCache:
    cache = open_cache(paths, spec)
    if cache is None:  # only if another process replaced it meanwhile
        raise ValueError(f"{paths.meta} changed while this run started: run again")
    log.info("teacher top-%d log-probs from %s", spec.top_k, paths.meta.name)
    return cache
