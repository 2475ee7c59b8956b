"""What distillation trains on: SFT conversation rows or a pretraining corpus's chunks, and, from a teacher cache,
the teacher's top-K of every counted token carried in the batch.

The cache (:mod:`llama.training.teacher_cache`) is keyed by a token's **offset in the packed ``.bin``**, so any row
can look up its tokens however rows are packed and shuffled. The engine's datasets do not say where a row's tokens
come from, so the two datasets here add ``token_offsets`` (int64 ``[B, T]``, -1 on padding) to their batches:

- SFT rows (:class:`SFTRowOffsets`): each conversation sits whole in one row (first-fit decreasing) with document
  masking, so what the teacher sees at a token depends on its conversation alone, not on its row;
- pretraining chunks (:class:`PretrainChunks`): the corpus cut into fixed non-overlapping chunks of
  ``seq_len + 1`` tokens (the loop's ``epoch`` mode), shuffled per epoch, so a token's context (its chunk, inside
  its document) is the same in every epoch and in the precompute pass. Random windows would give a token another
  context each time; distillation over a corpus always reads chunks.

:class:`WithTeacherTopK` swaps a batch's offsets for the cached rows of its counted tokens (labels != -100), in
row-major order: ``teacher_topk_ids`` (int32) and ``teacher_topk_logprobs`` (fp16), ``[counted tokens, K]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.dataset import PretrainDataset, SFTDataset
from engine.dataset.rows import segment_positions
from engine.format import DatasetPaths, PackedFiles

from .config import TrainConfig
from .distill import TOPK_IDS, TOPK_LOGPROBS
from .objectives import IGNORE_INDEX

if TYPE_CHECKING:
    from .teacher_cache import TopKCache

OFFSETS = "token_offsets"
DATA_KINDS = ("sft", "pretrain")


class _WithOffsets:
    """Mixin for an engine dataset: its batches also carry ``token_offsets``; :meth:`batch_at` reads given rows."""

    def token_offsets(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _batch_from(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = super()._batch_from(indices)  # type: ignore[misc]
        batch[OFFSETS] = torch.from_numpy(self.token_offsets(indices))
        return batch

    def batch_at(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of these rows (0 .. ``n_samples`` − 1), outside the sampling order (the precompute pass)."""
        return self._batch_from(np.asarray(indices, dtype=np.int64))


class SFTRowOffsets(_WithOffsets, SFTDataset):
    """:class:`engine.dataset.SFTDataset` whose batches say where each token sits in the ``.bin``."""

    @property
    def n_samples(self) -> int:
        return self.n_rows

    def token_offsets(self, indices: np.ndarray) -> np.ndarray:
        """``[B, seq_len]`` int64: each token's offset in the ``.bin``, -1 on padding (the rows ``_batch_from`` fills:
        item k of a row starts at its column, holding ``tokens[source : source + length]``)."""
        counts = self._row_offsets[indices + 1] - self._row_offsets[indices]
        batch_row, k = segment_positions(counts)
        slot = self._row_offsets[indices][batch_row] + k
        items = self._row_items[slot]
        sources, lengths = self.files.offsets[self._doc_index[items]], self._item_length[items]
        owner, within = segment_positions(lengths)
        offsets = np.full((indices.shape[0], self.seq_len), -1, dtype=np.int64)
        offsets[batch_row[owner], self._column[slot][owner] + within] = sources[owner] + within
        return offsets


class PretrainChunks(_WithOffsets, PretrainDataset):
    """:class:`engine.dataset.PretrainDataset` in ``epoch`` mode whose batches say where each token sits."""

    @property
    def n_samples(self) -> int:
        return self.n_chunks

    def token_offsets(self, indices: np.ndarray) -> np.ndarray:
        return indices[:, None] * (self.seq_len + 1) + np.arange(self.seq_len, dtype=np.int64)


def open_rows(
    path: str | os.PathLike[str], kind: str, seq_len: int, offsets: bool = False, **options: Any
) -> SFTDataset | PretrainDataset:
    """The dataset of ``kind`` over ``path``: SFT rows, or a corpus's chunks with document masking; ``offsets``: the
    variant whose batches carry ``token_offsets``."""
    if kind == "sft":
        return (SFTRowOffsets if offsets else SFTDataset)(path, seq_len, **options)
    chunks = PretrainChunks if offsets else PretrainDataset
    return chunks(path, seq_len, mode="epoch", return_doc_ids=True, **options)


def n_samples(dataset: SFTDataset | PretrainDataset) -> int:
    """Rows (SFT) or chunks (a corpus) in one pass over all ranks: what ``--epochs`` counts."""
    return dataset.n_rows if isinstance(dataset, SFTDataset) else dataset.n_chunks


class WithTeacherTopK:
    """A dataset of :class:`_WithOffsets` whose batches carry, instead of ``token_offsets``, the cached teacher top-K
    of their counted tokens (see the module doc). Its position, state and files are the dataset's."""

    def __init__(self, dataset: SFTRowOffsets | PretrainChunks, cache: "TopKCache") -> None:
        self.dataset, self.cache = dataset, cache

    @property
    def files(self) -> PackedFiles:
        return self.dataset.files

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.samples_per_epoch

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        return attach_topk(self.dataset.next_batch(batch_size), self.cache)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


def counted_offsets(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The ``.bin`` offsets of the batch's counted tokens (labels != -100), row-major, as the losses order them."""
    counted = batch["labels"] != IGNORE_INDEX
    return batch[OFFSETS][counted].numpy()


def attach_topk(batch: dict[str, torch.Tensor], cache: "TopKCache") -> dict[str, torch.Tensor]:
    """``batch`` with its offsets replaced by the cache's rows of its counted tokens."""
    positions = counted_offsets(batch)
    del batch[OFFSETS]
    ids, logprobs = cache.rows(positions)
    batch[TOPK_IDS] = torch.from_numpy(ids.astype(np.int32))
    batch[TOPK_LOGPROBS] = torch.from_numpy(np.ascontiguousarray(logprobs))
    return batch


def cache_for(path: str | os.PathLike[str], caches: dict[Path, "TopKCache"]) -> "TopKCache":
    """The teacher cache computed for the packed data at ``path`` (one-line error if none was)."""
    prefix = DatasetPaths.of(path).prefix.resolve()
    if prefix not in caches:
        raise ValueError(
            f"no teacher cache was computed for {path}: give the validation set as --val so it is precomputed "
            "with the training data, or drop --teacher-top-k"
        )
    return caches[prefix]


def distill_dataset(
    path: Path,
    seq_len: int,
    *,
    validation: bool,
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    tokenizer_sha256: str | None,
    kind: str,
    caches: dict[Path, "TopKCache"] | None = None,
) -> SFTDataset | PretrainDataset | WithTeacherTopK:
    """The loop's dataset factory for distillation (bind ``kind`` and ``caches`` with ``functools.partial``): SFT rows
    or corpus chunks, shuffled per epoch (validation: seed 0); with ``caches``, carrying the teacher's top-K."""
    options = {
        "seed": 0 if validation else cfg.seed,
        "rank": rank,
        "world_size": world_size,
        "tokenizer_sha256": tokenizer_sha256,
    }
    if caches is None:
        return open_rows(path, kind, seq_len, **options)
    cache = cache_for(path, caches)
    return WithTeacherTopK(open_rows(path, kind, seq_len, offsets=True, **options), cache)
