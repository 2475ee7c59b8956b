"""The one training loop and what plugs into it.

    from llama.training import TrainConfig, train
    result = train(LlamaConfig.from_preset("tiny", vocab_size=8000), TrainConfig(steps=200), "out/quickstart/corpus")

A task brings an :class:`~llama.training.objectives.Objective` (its loss, token count, validation and state)
and, where it changes the model, transforms (``model -> model``, run before the optimizer is built); the
loop (:mod:`.loop`) does precision, accumulation, clipping, schedule, validation, checkpoints, exact
resume and DDP/FSDP for all of them. Modules: ``config`` (TrainConfig), ``run`` (setup, save/restore),
``step`` (one optimizer step), ``loop``, ``resume`` (resume and ``--init`` policy), ``data``, ``objectives``,
``checkpoint`` (the files), ``runtime`` (devices, DDP), ``profiles`` (fitting a card), ``metrics``, ``cli``.
"""

from .config import TrainConfig
from .errors import NonFiniteLossError, TrainingError, TrainingInterrupted, TrainingOOMError
from .loop import TrainResult, train
from .objectives import SFT, NextToken, Objective, Pretrain
from .run import ModelTransform

__all__ = [
    "SFT",
    "ModelTransform",
    "NextToken",
    "NonFiniteLossError",
    "Objective",
    "Pretrain",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingOOMError",
    "train",
]
