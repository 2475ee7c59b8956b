"""Pretraining windows over a packed token file: random windows or shuffled non-overlapping chunks."""

from __future__ import annotations

import logging
import os

import numba
import numpy as np
import torch

from ..format import DatasetError, open_packed
from .base import ShardedBatches, default_pin_memory, to_tensor
from .sampling import EpochOrder, RandomStarts

log = logging.getLogger(__name__)

MODES = ("random", "epoch")


@numba.njit(cache=True)
def _document_positions(window: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    batch, length = window.shape
    positions = np.empty((batch, length), dtype=np.int64)
    doc_ids = np.empty((batch, length), dtype=np.int32)
    for b in range(batch):
        position, doc = 0, 0
        for t in range(length):
            if t > 0 and window[b, t - 1] == eos_id:  # the token after an EOS opens the next document
                position, doc = 0, doc + 1
            positions[b, t] = position
            doc_ids[b, t] = doc
            position += 1
    return positions, doc_ids


def document_positions(window: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token of ``window`` [B, T]: position inside its document (int64) and document number in the row (int32).

    A token right after an EOS starts a new document; the row's first (partial) document starts at 0.
    """
    return _document_positions(np.ascontiguousarray(window), int(eos_id))


class PretrainDataset(ShardedBatches):
    """Windows of ``seq_len + 1`` tokens from a packed (or bare) ``.bin``; ``x = w[:-1]``, ``y = w[1:]``.

    ``mode="random"``: each window starts at a uniformly random token (independent stream per rank).
    ``mode="epoch"``: the stream is cut into non-overlapping chunks of ``seq_len + 1`` tokens, served
    in a fresh permutation every epoch and split across ranks. The tail shorter than a chunk and the
    per-epoch leftover (fewer than ``world_size`` chunks) are counted and logged, see
    ``tail_tokens`` and ``leftover_chunks_per_epoch``.

    ``return_doc_ids=True`` adds ``position_ids`` (int64, restarting at 0 after each EOS) and
    ``doc_ids`` (int32, 0, 1, 2, … per row) so attention can stay inside documents. For a bare
    ``.bin`` without meta, pass ``eos_id``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        seq_len: int,
        *,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        return_doc_ids: bool = False,
        tokenizer_sha256: str | None = None,
        dtype: str | None = None,
        vocab_size: int | None = None,
        eos_id: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.files = open_packed(path, tokenizer_sha256=tokenizer_sha256, dtype=dtype, vocab_size=vocab_size)
        if self.files.kind != "pretrain":
            raise DatasetError(
                f"{self.files.paths.prefix} is a {self.files.kind} dataset: use "
                f"{'SFTDataset' if self.files.kind == 'sft' else 'DPODataset'} for it, or pack a pretrain corpus"
            )
        self.tokens = np.asarray(self.files.tokens)  # plain ndarray view of the memmap: faster fancy indexing
        self.n_tokens = self.files.n_tokens
        if seq_len + 1 > self.n_tokens:
            raise DatasetError(
                f"{self.files.paths.bin} has {self.n_tokens:,} tokens, fewer than seq_len+1={seq_len + 1}: "
                "use a shorter --seq-len or more data"
            )
        self.seq_len, self.mode, self.seed = seq_len, mode, seed
        self.rank, self.world_size = rank, world_size
        self.return_doc_ids = return_doc_ids
        self.eos_id = eos_id if eos_id is not None else self.files.meta.get("eos_id")
        if return_doc_ids and self.eos_id is None:
            raise DatasetError(
                f"{self.files.paths.bin} records no eos_id, so its documents cannot be found: train without "
                "--doc-masking, or pack the corpus with `python -m engine.prepare` (eos_id= from Python)"
            )
        self.pin_memory = default_pin_memory() if pin_memory is None else pin_memory
        self._window = np.arange(seq_len + 1, dtype=np.int64)

        chunk = seq_len + 1
        self.n_chunks = self.n_tokens // chunk
        self.tail_tokens = self.n_tokens - self.n_chunks * chunk
        self.samples_per_epoch = self.n_chunks // world_size
        if mode == "epoch":
            self._order = EpochOrder(self.n_chunks, seed=seed, rank=rank, world_size=world_size)
            self.leftover_chunks_per_epoch = self._order.leftover_per_epoch
            if self.tail_tokens or self.leftover_chunks_per_epoch:
                log.info(
                    "%s: %d tail tokens never served (shorter than a chunk of %d); %d chunk(s) per epoch left "
                    "out to keep %d ranks even (a different one each epoch)",
                    self.files.paths.prefix,
                    self.tail_tokens,
                    chunk,
                    self.leftover_chunks_per_epoch,
                    world_size,
                )
        else:
            self._order = RandomStarts(self.n_tokens - seq_len, seed=seed, rank=rank, world_size=world_size)
            self.leftover_chunks_per_epoch = 0
        self._config = {
            "kind": "pretrain",
            "mode": mode,
            "seq_len": seq_len,
            "seed": seed,
            "world_size": world_size,
            "n_tokens": self.n_tokens,
        }
        log.info(
            "%s: %s windows of %d tokens over %s tokens, rank %d/%d",
            self.files.paths.prefix,
            mode,
            seq_len,
            f"{self.n_tokens:,}",
            rank,
            world_size,
        )

    def _batch_from(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        starts = indices * (self.seq_len + 1) if self.mode == "epoch" else indices
        window = self.tokens[starts[:, None] + self._window]
        batch = {
            "input_ids": to_tensor(window[:, :-1], torch.int64, self.pin_memory),
            "labels": to_tensor(window[:, 1:], torch.int64, self.pin_memory),
        }
        if self.return_doc_ids:
            positions, doc_ids = document_positions(window[:, :-1], self.eos_id)
            batch["position_ids"] = to_tensor(positions, torch.int64, self.pin_memory)
            batch["doc_ids"] = to_tensor(doc_ids, torch.int32, self.pin_memory)
        return batch
