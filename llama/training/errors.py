"""Why training stopped: one-line errors the task CLIs print as ``error: …``, and the interruption by a signal."""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingError(RuntimeError):
    """Training cannot go on (one-line message); CLIs print it as ``error: …``."""


class NonFiniteLossError(TrainingError):
    """``nan_patience`` steps in a row trained nothing: their loss was NaN/inf, or their gradients were and the
    update was skipped (fp16's loss-scale search excepted)."""


class OutDirInUse(TrainingError):
    """Another live run holds the ``--out-dir`` lock."""


class TrainingOOMError(TrainingError):
    """The GPU ran out of memory; the message says which setting would fit."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal (130, 143)."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum
