"""Datasets over packed token files, handing out torch tensors: pretrain windows, SFT rows, DPO pairs.

All three are deterministic from their seed, shard by ``rank``/``world_size``, and resume exactly
from ``state_dict()``. Batches are dicts of CPU tensors (pinned when CUDA is available).
"""

from .dpo import DPODataset
from .pretrain import PretrainDataset
from .sft import SFTDataset

__all__ = ["PretrainDataset", "SFTDataset", "DPODataset"]
