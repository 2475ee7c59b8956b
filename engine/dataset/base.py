"""What the three datasets share: resumable sharded sampling, batch iteration and tensor hand-off.

This is the engine's only contact with torch: numpy arrays become (pinned, when CUDA is there)
CPU tensors, ready for ``.to(device, non_blocking=True)``.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .sampling import EpochOrder, RandomStarts, check_state

IGNORE_INDEX = -100  # the label that ``torch.nn.functional.cross_entropy`` skips by default
NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}


def default_pin_memory() -> bool:
    """Pin batches only where there is an accelerator to copy them to (pinning needs one)."""
    return torch.cuda.is_available()


def to_tensor(array: np.ndarray, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A contiguous CPU tensor of ``dtype`` holding ``array``, written straight into pinned memory when ``pin``."""
    if pin:
        tensor = torch.empty(array.shape, dtype=dtype, pin_memory=True)
        tensor.numpy()[...] = array  # one casting copy, no pageable intermediate
        return tensor
    return torch.from_numpy(np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype]))


class BatchStream(torch.utils.data.IterableDataset):
    """An endless ``IterableDataset`` of ready batches: use ``DataLoader(stream, batch_size=None)``.

    The dataset already shards by rank and batches; do not add DataLoader workers (each would
    replay the same stream).
    """

    def __init__(self, dataset: "ShardedBatches", batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.dataset.batches(self.batch_size)


class ShardedBatches:
    """Base of the datasets: an order over samples (``EpochOrder`` or ``RandomStarts``) plus state handling.

    Subclasses set ``self._order``, ``self._config`` (what a saved state must match) and implement
    :meth:`_batch_from` (sample indices → tensors).
    """

    _order: EpochOrder | RandomStarts
    _config: dict[str, Any]
    pin_memory: bool

    def _batch_from(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The next ``batch_size`` samples of this rank as a dict of CPU tensors."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return self._batch_from(self._order.take(batch_size))

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless iterator of :meth:`next_batch` (epochs continue forever)."""
        while True:
            yield self.next_batch(batch_size)

    def iterable(self, batch_size: int) -> BatchStream:
        """A torch ``IterableDataset`` view of :meth:`batches` for code that wants a ``DataLoader``."""
        return BatchStream(self, batch_size)

    @property
    def epoch(self) -> int:
        """Epochs completed by this rank (always 0 in random-window mode)."""
        return getattr(self._order, "epoch", 0)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's stream stands; plain ints, safe for ``torch.save`` and JSON."""
        return {"config": dict(self._config), "order": self._order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was saved; refuse a state from other data or settings."""
        check_state(state, self._config, type(self).__name__)
        self._order.load_state_dict(state["order"])
