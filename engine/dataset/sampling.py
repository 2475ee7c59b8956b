"""Deterministic, resumable, rank-sharded orders over samples: shuffled epochs and random window starts.

Both samplers keep their whole position in a couple of integers, so a checkpoint stores a tiny
``state_dict`` and a fresh sampler built with the same arguments continues exactly where the old
one stopped. Ranks advance in lockstep (every rank takes the same number of samples per step), so
a state saved on one rank resumes every rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_shard(rank: int, world_size: int) -> None:
    """Refuse a rank outside ``[0, world_size)`` with a one-line reason."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def check_state(state: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """Refuse a state saved by a differently configured dataset, naming the first field that differs."""
    saved = state.get("config", {})
    for key, value in expected.items():
        if saved.get(key) != value:
            raise ValueError(
                f"{what} state was saved with {key}={saved.get(key)!r}, this dataset has {key}={value!r}: "
                "resume with the same data and settings, or start without the saved state"
            )


class EpochOrder:
    """Every item once per epoch, in a permutation drawn from ``(seed, epoch)``, split across ranks.

    Rank ``r`` of ``world_size`` serves ``perm[r::world_size]`` of the first
    ``n_items - n_items % world_size`` permuted items, so ranks never overlap and all serve the same
    count; the ``n_items % world_size`` leftover items change every epoch (the permutation does), so
    none is skipped for good. Epochs continue forever.
    """

    def __init__(self, n_items: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        check_shard(rank, world_size)
        if n_items < world_size:
            raise ValueError(f"{n_items} samples cannot be shared by {world_size} ranks: use more data or fewer ranks")
        self.n_items, self.seed, self.rank, self.world_size = int(n_items), int(seed), rank, world_size
        self.per_rank = self.n_items // world_size
        self.leftover_per_epoch = self.n_items % world_size
        self.epoch = 0
        self.position = 0  # items of this rank's share already served in the current epoch
        self._share: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole permutation of epoch ``epoch`` (all ranks' items plus the leftover)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def share(self, epoch: int) -> np.ndarray:
        """This rank's items of epoch ``epoch``, in serving order."""
        usable = self.per_rank * self.world_size
        return self.permutation(epoch)[:usable][self.rank :: self.world_size]

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` item indices (``int64``), crossing into following epochs as needed."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            if self._share is None:
                self._share = self.share(self.epoch)
            step = min(count - filled, self.per_rank - self.position)
            out[filled : filled + step] = self._share[self.position : self.position + step]
            filled += step
            self.position += step
            if self.position == self.per_rank:
                self.epoch, self.position, self._share = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.per_rank:
            raise ValueError(f"saved position {position} of epoch {epoch} is outside 0..{self.per_rank - 1}")
        self.epoch, self.position, self._share = epoch, position, None


class RandomStarts:
    """Uniform random integers in ``[0, n_starts)``; batch ``k`` of rank ``r`` is drawn from ``(seed, r, k)``.

    Seeding each batch from its own counter makes the stream a pure function of the batch number,
    so resuming needs only that number, and ranks get independent streams.
    """

    def __init__(self, n_starts: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        check_shard(rank, world_size)
        if n_starts < 1:
            raise ValueError("there is no valid start to draw from")
        self.n_starts, self.seed, self.rank = int(n_starts), int(seed), rank
        self.batches = 0

    def take(self, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, self.batches])
        self.batches += 1
        return rng.integers(0, self.n_starts, size=count, dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"saved batch count {batches} is negative")
        self.batches = batches
