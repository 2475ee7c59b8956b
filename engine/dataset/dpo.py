"""DPO pairs: document ``2i`` is prompt + chosen response, ``2i + 1`` prompt + rejected response."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..format import DatasetError
from .base import ShardedBatches, to_tensor
from .rows import fill_rows, scan_label_stats
from .sampling import EpochOrder
from .sft import open_masked

log = logging.getLogger(__name__)


class DPODataset(ShardedBatches):
    """Preference pairs, right-padded to the longest sequence of the batch (chosen and rejected alike).

    A batch has ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``
    (int64 [B, T], T ≤ ``seq_len``; labels follow the SFT rule, -100 except the response tokens) and
    ``prompt_length`` (int64 [B]: tokens before the first response token, shared by both sides).
    Sequences longer than ``seq_len`` lose their end (the response tail): pairs counted in
    ``n_truncated``, lost targets in ``n_label_tokens_truncated``. Pairs where a side keeps no
    response token are dropped and counted in ``n_dropped_no_labels``. Pairs are shuffled per epoch
    from ``(seed, epoch)`` and split across ranks.
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
        self.n_pairs = n_pairs
        self.tokens, self.mask = np.asarray(self.files.tokens), np.asarray(self.files.mask)

        lengths = self.files.doc_lengths().reshape(n_pairs, 2)
        stats = scan_label_stats(self.mask, self.files.offsets, seq_len)
        first_label = stats.first_label.reshape(n_pairs, 2)
        truncated = (lengths > seq_len).any(axis=1)
        self.n_truncated = int(truncated.sum())
        self.n_label_tokens_truncated = int((stats.labels_total - stats.labels_kept).sum())
        usable = (stats.labels_kept.reshape(n_pairs, 2) > 0).all(axis=1)
        self.n_dropped_no_labels = int((~usable).sum())
        self.n_prompt_mismatch = int((first_label[:, 0] != first_label[:, 1]).sum())
        if self.n_truncated:
            log.warning(
                "%s: %d of %d pairs have a side longer than seq_len=%d, cut at its response end (%d label tokens lost)",
                where,
                self.n_truncated,
                n_pairs,
                seq_len,
                self.n_label_tokens_truncated,
            )
        if self.n_dropped_no_labels:
            log.warning(
                "%s: %d pairs dropped: a side keeps no response token within seq_len=%d",
                where,
                self.n_dropped_no_labels,
                seq_len,
            )
        if self.n_prompt_mismatch:
            log.warning(
                "%s: %d pairs whose chosen and rejected responses start at different offsets; "
                "prompt_length is the shorter",
                where,
                self.n_prompt_mismatch,
            )
        self._pair_index = np.flatnonzero(usable)  # served pair k is stored pair _pair_index[k]
        if self._pair_index.size == 0:
            raise DatasetError(f"{where} has no pair with response tokens on both sides within seq_len={seq_len}")
        self._kept_length = np.minimum(lengths, seq_len)
        self._prompt_length = np.minimum(first_label.min(axis=1), seq_len)

        self._order = EpochOrder(self._pair_index.size, seed=seed, rank=rank, world_size=world_size)
        self.samples_per_epoch = self._order.per_rank
        self._config = {
            "kind": "dpo",
            "seq_len": seq_len,
            "seed": seed,
            "world_size": world_size,
            "n_tokens": self.files.n_tokens,
            "n_pairs": int(self._pair_index.size),
        }
        log.info(
            "%s: %d pairs, seq_len %d, rank %d/%d; %d pair(s) per epoch left out to keep ranks even",
            where,
            self._pair_index.size,
            seq_len,
            rank,
            world_size,
            self._order.leftover_per_epoch,
        )

    def _batch_from(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        pairs = self._pair_index[indices]
        batch = pairs.shape[0]
        docs = np.concatenate([2 * pairs, 2 * pairs + 1])  # chosen rows first, then rejected rows
        lengths = np.concatenate([self._kept_length[pairs, 0], self._kept_length[pairs, 1]])
        width = int(lengths.max())
        zeros = np.zeros(2 * batch, dtype=np.int64)
        rows = fill_rows(
            self.tokens,
            self.mask,
            self.files.offsets[docs],
            lengths,
            np.arange(2 * batch),
            zeros,
            zeros,
            (2 * batch, width),
            self.pad_id,
        )
        input_ids, labels = rows.input_ids, rows.labels
        pin = self.pin_memory
        return {
            "chosen_input_ids": to_tensor(input_ids[:batch], torch.int64, pin),
            "chosen_labels": to_tensor(labels[:batch], torch.int64, pin),
            "rejected_input_ids": to_tensor(input_ids[batch:], torch.int64, pin),
            "rejected_labels": to_tensor(labels[batch:], torch.int64, pin),
            "prompt_length": to_tensor(self._prompt_length[pairs], torch.int64, pin),
        }
