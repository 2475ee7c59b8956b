"""Where an op runs: Triton on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``), else the reference.

Also the small helpers every op file shares: the output allocator that tests can switch to NaN-filled
buffers (``POISON``), the Triton dtype of a tensor, and the power-of-two block size of a dimension.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

try:  # triton is Linux-only in setup.cfg: elsewhere every op falls back to its reference
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

#: Custom ops live under this namespace: ``torch.ops.zhllm.<op>``.
NAMESPACE = "zhllm"

#: When true, every output buffer an op allocates starts NaN-filled (tests set it to prove each element is written).
POISON = False


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when ``zhkernels`` is imported.
_INTERPRET_AT_IMPORT = _interpret_env()

if HAS_TRITON and _INTERPRET_AT_IMPORT:
    from . import _interpreter_compat

    _interpreter_compat.apply()


def interpret_mode_at_import() -> bool:
    """Whether the kernels were decorated for Triton's interpreter (``TRITON_INTERPRET=1`` before ``import
    zhkernels``)."""
    return _INTERPRET_AT_IMPORT


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET=1`` now and when kernels were
    imported."""
    return _INTERPRET_AT_IMPORT and _interpret_env()


#: Set by :func:`meta_as_gpu`: meta tensors take the Triton path, and this is the emulated autocast dtype.
_META_AS_GPU: list[torch.dtype | None] = []


@contextlib.contextmanager
def meta_as_gpu(autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Treat ``meta`` tensors as CUDA ones: they take the Triton path, and :func:`autocast_dtype` reports
    ``autocast_dtype`` for them. For counting a training step's GPU memory on a machine without one
    (``bench/count_memory.py``); nothing else should need it."""
    _META_AS_GPU.append(autocast_dtype)
    try:
        yield
    finally:
        _META_AS_GPU.pop()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts matmul inputs to on this device type now, or None when it is off."""
    if device_type == "meta" and _META_AS_GPU:
        return _META_AS_GPU[-1]
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors go to the Triton kernels: all on CUDA, or all on CPU under the interpreter
    (or all on ``meta`` inside :func:`meta_as_gpu`)."""
    if not HAS_TRITON:
        return False
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    if all(t.is_cuda for t in present):
        return True
    if _META_AS_GPU and all(t.device.type == "meta" for t in present):
        return True
    return interpret_mode() and all(t.device.type == "cpu" for t in present)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or NaN-filled (integer: -1-filled) when ``POISON`` is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype or t.dtype, t.device)


def empty_bthd(batch: int, heads: int, seq: int, dim: int, like: torch.Tensor, fake: bool = False) -> torch.Tensor:
    """A ``[B, H, T, D]`` tensor in ``like``'s dtype laid out as ``[B, T, H, D]`` in memory: the layout of the
    model's ``proj(x).view(B, T, H, D).transpose(1, 2)``, so views back to the projection cost nothing.
    ``fake``: from ``like.new_empty`` (inside fake/meta implementations, never poisoned)."""
    if fake:
        return like.new_empty((batch, seq, heads, dim)).transpose(1, 2)
    return empty((batch, seq, heads, dim), like.dtype, like.device).transpose(1, 2)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows, last dim]`` view with unit column stride (a copy only when the layout cannot be viewed that way)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def next_power_of_2(n: int) -> int:
    """Triton's ``tl.arange`` needs power-of-two extents: the block that covers ``n``."""
    return 1 << max(0, (int(n) - 1).bit_length())


#: Stand-ins where no CUDA device answers: meta tensors count memory for a consumer card (an RTX 3060: sm_86,
#: 28 SMs); the interpreter pretends to a few SMs so the work-splitting paths run in tests.
META_GPU = (86, 28)
INTERPRET_SMS = 4


def gpu_arch(device: torch.device) -> int:
    """Compute capability ×10 of a CUDA device (86 for an RTX 3060); ``META_GPU``'s elsewhere."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return META_GPU[0]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``META_GPU``'s on meta, ``INTERPRET_SMS`` under the interpreter."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return META_GPU[1] if device.type == "meta" else INTERPRET_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


SUPPORTED_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    """One-line error for dtypes the kernels do not take."""
    if t.dtype not in SUPPORTED_FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; the kernels take float32, float16 or bfloat16 (cast it first)")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len({str(d) for d in devices.values()}) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs are on different devices ({listing}); move them to one device")
