"""SFT rows: whole conversations packed into rows of ``seq_len`` by first-fit decreasing, loss on assistant tokens."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from ..format import DatasetError, open_packed
from .base import ShardedBatches, default_pin_memory, to_tensor
from .binpack import pack_first_fit_decreasing
from .rows import fill_rows, scan_label_stats, segment_positions
from .sampling import EpochOrder

log = logging.getLogger(__name__)


def open_masked(
    dataset: Any,
    kind: str,
    path: str | os.PathLike[str],
    seq_len: int,
    seed: int,
    rank: int,
    world_size: int,
    pad_id: int | None,
    tokenizer_sha256: str | None,
    pin_memory: bool | None,
) -> None:
    """What SFT and DPO datasets share at construction: open and check the files, keep the settings."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    dataset.files = open_packed(path, tokenizer_sha256=tokenizer_sha256)
    where = dataset.files.paths.prefix
    if dataset.files.kind != kind or dataset.files.mask is None:
        raise DatasetError(f"{where} is a {dataset.files.kind} dataset, not {kind}: pack it with `--kind {kind}`")
    dataset.seq_len, dataset.seed, dataset.rank, dataset.world_size = seq_len, seed, rank, world_size
    dataset.pad_id = resolve_pad_id(dataset.files.meta, pad_id, where)
    dataset.pin_memory = default_pin_memory() if pin_memory is None else pin_memory


def resolve_pad_id(meta: dict, pad_id: int | None, where: object) -> int:
    """The explicit ``pad_id``, else the meta's ``pad_id``, else its ``eos_id`` (padding never reaches the loss)."""
    for candidate in (pad_id, meta.get("pad_id"), meta.get("eos_id")):
        if candidate is not None:
            return int(candidate)
    raise DatasetError(f"{where} has neither pad_id nor eos_id in its meta: pass pad_id=")


class SFTDataset(ShardedBatches):
    """Rows of ``seq_len`` tokens, each holding whole conversations placed by first-fit decreasing.

    A batch has ``input_ids``, ``labels`` (the next token where the mask counts, inside the same
    conversation, else -100), ``position_ids`` (restarting at 0 per conversation) and ``doc_ids``
    (int32: 0, 1, … per conversation in the row; the padding at the row's end gets the next id, so
    ids never decrease along a row and padding attends only to padding). Rows are shuffled per
    epoch from ``(seed, epoch)`` and split across ranks; the packing itself depends only on the data.

    Conversations longer than ``seq_len`` keep their first ``seq_len`` tokens: counted in
    ``n_truncated`` and ``n_label_tokens_truncated``. Conversations left with no loss token at all
    (nothing to learn) are dropped and counted in ``n_dropped_no_labels``. Both are logged once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int | None = None,
        tokenizer_sha256: str | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        open_masked(self, "sft", path, seq_len, seed, rank, world_size, pad_id, tokenizer_sha256, pin_memory)
        where = self.files.paths.prefix
        self.tokens, self.mask = np.asarray(self.files.tokens), np.asarray(self.files.mask)

        lengths = self.files.doc_lengths()
        stats = scan_label_stats(self.mask, self.files.offsets, seq_len)
        truncated = lengths > seq_len
        self.n_conversations = self.files.n_docs
        self.n_truncated = int(truncated.sum())
        self.n_label_tokens_truncated = int((stats.labels_total - stats.labels_kept)[truncated].sum())
        usable = stats.labels_kept > 0
        self.n_dropped_no_labels = int((~usable).sum())
        if self.n_truncated:
            log.warning(
                "%s: %d of %d conversations are longer than seq_len=%d and were cut to it, losing %d label tokens",
                where,
                self.n_truncated,
                self.n_conversations,
                seq_len,
                self.n_label_tokens_truncated,
            )
        if self.n_dropped_no_labels:
            log.warning(
                "%s: %d conversations dropped: no loss token left within seq_len=%d",
                where,
                self.n_dropped_no_labels,
                seq_len,
            )
        self._doc_index = np.flatnonzero(usable)  # packed item k is conversation _doc_index[k]
        if self._doc_index.size == 0:
            raise DatasetError(f"{where} has no conversation with a loss token within seq_len={seq_len}")

        self._item_length = np.minimum(lengths[self._doc_index], seq_len)
        self._row_offsets, self._row_items = pack_first_fit_decreasing(self._item_length, seq_len)
        self.n_rows = int(self._row_offsets.shape[0] - 1)
        self.packing_efficiency = float(self._item_length.sum() / (self.n_rows * seq_len))
        # Where each placed item starts inside its row and its number there, laid out like _row_items.
        row_of, self._slot_in_row = segment_positions(np.diff(self._row_offsets))
        placed_length = self._item_length[self._row_items]
        starts = np.cumsum(placed_length) - placed_length
        self._column = starts - starts[self._row_offsets[row_of]]

        self._order = EpochOrder(self.n_rows, seed=seed, rank=rank, world_size=world_size)
        self.samples_per_epoch = self._order.per_rank
        self._config = {
            "kind": "sft",
            "seq_len": seq_len,
            "seed": seed,
            "world_size": world_size,
            "n_tokens": self.files.n_tokens,
            "n_rows": self.n_rows,
        }
        log.info(
            "%s: %d conversations in %d rows of %d (%.1f%% tokens, %.1f%% padding); %d row(s) per epoch left "
            "out to keep %d ranks even",
            where,
            self._doc_index.size,
            self.n_rows,
            seq_len,
            100 * self.packing_efficiency,
            100 * (1 - self.packing_efficiency),
            self._order.leftover_per_epoch,
            world_size,
        )

    def _batch_from(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        counts = self._row_offsets[indices + 1] - self._row_offsets[indices]
        batch_row, k = segment_positions(counts)
        slot = self._row_offsets[indices][batch_row] + k  # index into the CSR arrays
        items = self._row_items[slot]
        rows = fill_rows(
            self.tokens,
            self.mask,
            self.files.offsets[self._doc_index[items]],
            self._item_length[items],
            batch_row,
            self._column[slot],
            self._slot_in_row[slot],
            (indices.shape[0], self.seq_len),
            self.pad_id,
        )
        pin = self.pin_memory
        return {
            "input_ids": to_tensor(rows.input_ids, torch.int64, pin),
            "labels": to_tensor(rows.labels, torch.int64, pin),
            "position_ids": to_tensor(rows.position_ids, torch.int64, pin),
            "doc_ids": to_tensor(rows.doc_ids, torch.int32, pin),
        }
