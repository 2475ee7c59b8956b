"""Precision names, their torch dtypes, and the one rule for choosing: bf16 on a GPU that has it, fp16 on an older
GPU, fp32 on the CPU (training, inference, export and the profiles all ask here)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def best_precision(device: torch.device) -> str:
    """What ``auto`` means on ``device``."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → :func:`best_precision`; refuse bf16 on a GPU without it, in one line that says what to use."""
    if precision == "auto":
        return best_precision(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16: use --precision fp16")
    return precision
