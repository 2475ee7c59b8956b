"""What the loop needs of a dataset, the default (pretraining) factory, and the fixed validation batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from engine.dataset import PretrainDataset
from engine.format import PackedFiles

from .config import TrainConfig


class BatchSource(Protocol):
    """What the loop needs of a dataset (``engine.dataset``'s all qualify): batches, a resumable position, its files.

    A source that samples from the model being trained (GRPO's :class:`~llama.training.rollouts.RolloutSource`)
    also has ``bind(run)``, which setup calls once the run's model exists."""

    files: PackedFiles
    samples_per_epoch: int

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DatasetFactory(Protocol):
    """Builds the training stream (``validation=False``) or the validation set of one rank; each task passes its own."""

    def __call__(
        self,
        path: Path,
        seq_len: int,
        *,
        validation: bool,
        cfg: TrainConfig,
        rank: int,
        world_size: int,
        tokenizer_sha256: str | None,
    ) -> BatchSource: ...


def pretrain_dataset(
    path: Path,
    seq_len: int,
    *,
    validation: bool,
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    tokenizer_sha256: str | None,
    dtype: str | None = None,
    vocab_size: int | None = None,
) -> PretrainDataset:
    """The default factory: ``--data-mode`` windows for training, seed-0 epoch chunks for validation.

    ``dtype``/``vocab_size``: how to read a bare ``.bin`` with no meta (bind them with ``functools.partial``)."""
    return PretrainDataset(
        path,
        seq_len,
        mode="epoch" if validation else cfg.data_mode,
        seed=0 if validation else cfg.seed,
        rank=rank,
        world_size=world_size,
        return_doc_ids=cfg.doc_masking,
        tokenizer_sha256=tokenizer_sha256,
        dtype=dtype,
        vocab_size=vocab_size,
    )


def load_val_batches(data: BatchSource, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The fixed validation batches of this rank: the first ``eval_batches`` of the validation set's order."""
    count = max(1, min(cfg.eval_batches, data.samples_per_epoch // cfg.batch_size))
    return [data.next_batch(cfg.batch_size) for _ in range(count)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
