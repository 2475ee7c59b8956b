"""DPO pairs packed into rows: document ``2i`` is prompt + chosen reply, ``2i + 1`` prompt + rejected reply.

A pair (chosen immediately followed by its rejected side) is the item that first-fit decreasing packs
into rows of ``seq_len``, so both sides of a pair always share a row and one forward pass scores them.
Every side is its own document in the row: positions restart at 0 and ``doc_ids`` change at every
side, so no token attends across sides or pairs, and the only padding is the end of each row.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
import torch

from ..format import DatasetError
from .base import IGNORE_INDEX, ShardedBatches, to_tensor
from .binpack import pack_first_fit_decreasing, pack_next_fit
from .rows import fill_rows, scan_label_stats, segment_positions
from .sampling import EpochOrder
from .sft import open_masked

log = logging.getLogger(__name__)

CHOSEN, REJECTED = 0, 1


def pair_keep_lengths(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Tokens each side keeps (``[n_pairs, 2]``) so that every pair fits one row of ``seq_len``.

    A pair longer than ``seq_len`` loses the ends of its sides: the shorter side (chosen on a tie) keeps
    ``min(its length, seq_len // 2)`` tokens and the longer side the rest, ``seq_len`` minus that.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = lengths.copy()
    over = np.flatnonzero(lengths.sum(axis=1) > seq_len)
    short_side = (lengths[over, REJECTED] < lengths[over, CHOSEN]).astype(np.int64)
    keep_short = np.minimum(lengths[over, short_side], seq_len // 2)
    keep[over, short_side] = keep_short
    keep[over, 1 - short_side] = seq_len - keep_short
    return keep


class DPODataset(ShardedBatches):
    """Preference pairs packed into rows of ``seq_len`` by first-fit decreasing, chosen and rejected side by side.

    A batch of ``B`` rows holding ``P`` pairs (``P`` varies from batch to batch) has, all of shape [B, T]
    with ``T = seq_len``: ``input_ids`` and ``labels`` (int64; the next token where the mask counts,
    inside the same side, else -100: the SFT rule), ``position_ids`` (int64, restarting at 0 per side),
    ``doc_ids`` (int32: 0, 1, … per side in the row, the row's padding gets the next id) and ``seq_ids``
    (int64: ``2 * k + side`` wherever the label is not -100, else -1; ``k`` numbers the batch's pairs
    0..P-1 row by row in placement order, side 0 is chosen and 1 rejected). ``pair_index`` [P] (int64)
    gives each slot ``k`` the pair's number in the file (0..``stored_pair_count`` - 1). So
    ``torch.zeros(2 * P).index_add_(0, seq_ids[m], token_logps[m])`` with ``m = seq_ids >= 0`` sums every
    side's log-probabilities, and ``.view(P, 2)`` splits chosen from rejected.

    Pairs longer than ``seq_len`` are cut as :func:`pair_keep_lengths` says: counted in ``n_truncated``,
    lost targets in ``n_label_tokens_truncated``. Pairs where a side keeps no reply token are dropped
    and counted in ``n_dropped_no_labels``. Rows (not pairs) are shuffled per epoch from
    ``(seed, epoch)`` and split across ranks; the packing depends only on the data and ``seq_len``.
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
        open_masked(self, "dpo", path, seq_len, seed, rank, world_size, pad_id, tokenizer_sha256, pin_memory)
        where = self.files.paths.prefix
        n_docs = self.files.n_docs
        n_pairs = self.files.meta.get("n_pairs", n_docs // 2)
        if n_docs % 2 or n_pairs != n_docs // 2:
            raise DatasetError(
                f"{where} has {n_docs} documents and n_pairs={n_pairs}: a DPO dataset holds 2 documents per pair; "
                "re-run the DPO packer"
            )
        self.stored_pair_count = int(n_pairs)
        self.tokens, self.mask = np.asarray(self.files.tokens), np.asarray(self.files.mask)
        self._select_pairs()
        self._pack()
        self._order = EpochOrder(self.n_rows, seed=seed, rank=rank, world_size=world_size)
        self.samples_per_epoch = self._order.per_rank
        self._config = {
            "kind": "dpo",
            "seq_len": seq_len,
            "seed": seed,
            "world_size": world_size,
            "n_tokens": self.files.n_tokens,
            "n_pairs": self.n_pairs,
            "n_rows": self.n_rows,
        }
        log.info(
            "%s: %d pairs in %d rows of %d (%.1f%% tokens, %.1f%% padding); %d row(s) per epoch left "
            "out to keep %d ranks even",
            where,
            self.n_pairs,
            self.n_rows,
            seq_len,
            100 * self.packing_efficiency,
            100 * (1 - self.packing_efficiency),
            self._order.leftover_per_epoch,
            world_size,
        )

    def _select_pairs(self) -> None:
        """Cut long pairs, drop those left without a reply token on a side, count and log both."""
        n_pairs, seq_len = self.stored_pair_count, self.seq_len
        lengths = self.files.doc_lengths().reshape(n_pairs, 2)
        keep = pair_keep_lengths(lengths, seq_len)
        stats = scan_label_stats(self.mask, self.files.offsets, keep.reshape(-1))
        self.n_truncated = int((keep < lengths).any(axis=1).sum())
        self.n_label_tokens_truncated = int((stats.labels_total - stats.labels_kept).sum())
        usable = (stats.labels_kept.reshape(n_pairs, 2) > 0).all(axis=1)
        self.n_dropped_no_labels = int((~usable).sum())
        first_label = stats.first_label.reshape(n_pairs, 2)
        self.n_prompt_mismatch = int((first_label[:, CHOSEN] != first_label[:, REJECTED]).sum())
        self._log_losses()
        self._pair_index = np.flatnonzero(usable)  # usable pair k is stored pair _pair_index[k]
        if self._pair_index.size == 0:
            raise DatasetError(
                f"{self.files.paths.prefix} has no pair with reply tokens on both sides within seq_len={seq_len}"
            )
        self.n_pairs = int(self._pair_index.size)
        self._keep = keep[self._pair_index]  # [n_pairs, 2]: tokens each side of a usable pair keeps

    def _log_losses(self) -> None:
        where, seq_len = self.files.paths.prefix, self.seq_len
        if self.n_truncated:
            log.warning(
                "%s: %d of %d pairs are longer than seq_len=%d together and were cut to fit one row "
                "(the ends of their sides), losing %d label tokens",
                where,
                self.n_truncated,
                self.stored_pair_count,
                seq_len,
                self.n_label_tokens_truncated,
            )
        if self.n_dropped_no_labels:
            log.warning(
                "%s: %d pairs dropped: a side keeps no reply token within seq_len=%d",
                where,
                self.n_dropped_no_labels,
                seq_len,
            )
        if self.n_prompt_mismatch:
            log.warning(
                "%s: %d pairs whose chosen and rejected replies start at different offsets (prompts differ)",
                where,
                self.n_prompt_mismatch,
            )

    def _pack(self) -> None:
        """First-fit decreasing over whole pairs; rows in CSR form (``_row_offsets``, ``_row_items``)."""
        pair_length = self._keep.sum(axis=1)
        self._row_offsets, self._row_items = pack_first_fit_decreasing(pair_length, self.seq_len)
        self.n_rows = int(self._row_offsets.shape[0] - 1)
        self.packing_efficiency = float(pair_length.sum() / (self.n_rows * self.seq_len))

    def _batch_from(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        counts = self._row_offsets[indices + 1] - self._row_offsets[indices]
        batch_row, k = segment_positions(counts)
        items = self._row_items[self._row_offsets[indices][batch_row] + k]
        return self._assemble(items, batch_row, indices.shape[0])

    def pairs_in_order(self, batch_rows: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every usable pair exactly once, in stored order, as batches of the same keys and layout as training.

        Ignores shuffling and ranks (for a one-pass reference-model precompute). The pairs are laid in
        stored order into rows by next fit (a new row whenever the next pair does not fit the last one)
        and handed out ``batch_rows`` rows at a time (the last batch may have fewer), so slots ``k``
        follow stored order: ``pair_index`` increases along each batch and across batches.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        row_of = pack_next_fit(self._keep.sum(axis=1), self.seq_len)  # non-decreasing
        n_rows = int(row_of[-1]) + 1
        for first in range(0, n_rows, batch_rows):
            rows = min(batch_rows, n_rows - first)
            start, end = np.searchsorted(row_of, [first, first + rows])
            yield self._assemble(np.arange(start, end, dtype=np.int64), row_of[start:end] - first, rows)

    def _assemble(self, items: np.ndarray, batch_row: np.ndarray, n_rows: int) -> dict[str, torch.Tensor]:
        """A batch of ``n_rows`` rows: usable pair ``items[k]`` is slot ``k`` and lies in row ``batch_row[k]``.

        ``batch_row`` is non-decreasing and names every row; each row's pairs lie end to end from column 0.
        """
        keep = self._keep[items]
        pair_length = keep.sum(axis=1)
        counts = np.bincount(batch_row, minlength=n_rows)
        first_slot = np.cumsum(counts) - counts  # slot k of each row's first pair
        _, slot_in_row = segment_positions(counts)
        starts = np.cumsum(pair_length) - pair_length
        column = starts - starts[first_slot][batch_row]
        stored = self._pair_index[items]
        rows = fill_rows(
            self.tokens,
            self.mask,
            self.files.offsets[np.stack([2 * stored, 2 * stored + 1], axis=1)].reshape(-1),
            keep.reshape(-1),
            np.repeat(batch_row, 2),
            np.stack([column, column + keep[:, CHOSEN]], axis=1).reshape(-1),
            np.stack([2 * slot_in_row, 2 * slot_in_row + 1], axis=1).reshape(-1),
            (n_rows, self.seq_len),
            self.pad_id,
        )
        # Side d of a row is its document d, so its sequence is the row's first slot twice over plus d.
        seq_ids = np.where(rows.labels != IGNORE_INDEX, 2 * first_slot[:, None] + rows.doc_ids, -1)
        pin = self.pin_memory
        return {
            "input_ids": to_tensor(rows.input_ids, torch.int64, pin),
            "labels": to_tensor(rows.labels, torch.int64, pin),
            "position_ids": to_tensor(rows.position_ids, torch.int64, pin),
            "doc_ids": to_tensor(rows.doc_ids, torch.int32, pin),
            "seq_ids": to_tensor(seq_ids, torch.int64, pin),
            "pair_index": to_tensor(stored, torch.int64, pin),
        }
