"""The machine the loop runs on: device and process group, GPU peak TFLOPS for MFU, memory caps and readings.

Peak figures are dense (no sparsity) tensor-core TFLOPS for bf16/fp16 inputs **with fp32
accumulation**, the mode mixed-precision training uses. GeForce cards run fp32 accumulation at
half their fp16-accumulate rate, so an RTX 3060 counts 25.5 here, not the 51 on its box. Datacenter
figures are NVIDIA's datasheet numbers; GeForce ones are the GA102/AD102 whitepaper numbers, or
``SMs x 512 FLOP/clock x boost clock`` where the whitepaper lists no figure.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GIB = 2**30

PEAK_TFLOPS: dict[str, float] = {
    # Hopper / Blackwell datacenter
    "B200": 2250.0,
    "B100": 1750.0,
    "GH200": 989.4,
    "H200 NVL": 835.0,
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # "H100 80GB HBM3" is SXM
    "H800 PCIe": 756.0,
    "H800": 989.4,
    "H20": 148.0,
    # Ampere / Ada datacenter and workstation (fp32 accumulation at full rate)
    "A100": 312.0,
    "A800": 312.0,
    "A30": 165.0,
    "A40": 149.7,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 6000 Ada": 364.2,
    "RTX A6000": 154.8,
    "RTX A5000": 111.1,
    "RTX A4000": 76.7,
    # Volta / Turing (fp16 only, no bf16)
    "V100": 125.0,
    "T4": 65.0,
    "RTX 2080 Ti": 53.8,
    # GeForce Ampere, Ada, Blackwell: fp16/bf16 with fp32 accumulation (half the fp16-accumulate rate)
    "RTX 3050": 18.2,
    "RTX 3060": 25.5,
    "RTX 3060 Ti": 32.4,
    "RTX 3070": 40.6,
    "RTX 3070 Ti": 43.5,
    "RTX 3080": 59.5,
    "RTX 3080 Ti": 68.2,
    "RTX 3090": 71.2,
    "RTX 3090 Ti": 80.0,
    "RTX 4060": 30.2,
    "RTX 4060 Ti": 44.1,
    "RTX 4070": 58.3,
    "RTX 4070 SUPER": 71.0,
    "RTX 4070 Ti": 80.2,
    "RTX 4070 Ti SUPER": 88.2,
    "RTX 4080": 97.5,
    "RTX 4080 SUPER": 104.4,
    "RTX 4090 D": 147.1,
    "RTX 4090": 165.2,
    "RTX 5080": 112.7,
    "RTX 5090": 209.5,
}


def lookup_peak_tflops(device_name: str) -> float | None:
    """The table's peak for ``device_name`` (longest key found as a whole word, case-insensitive), else None."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, flags=re.IGNORECASE):
            return PEAK_TFLOPS[key]
    return None


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOPS of one ``device``: ``override`` when given, the table's figure on a known GPU, else None."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak_tflops(name)
    if peak is None:
        log.warning(
            "%s is not in llama.training.runtime.PEAK_TFLOPS: MFU shows n/a (pass --peak-tflops to set it)", name
        )
    return peak


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak; None without a peak."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_s_per_device / (peak_tflops * 1e12)


def cap_memory(max_memory_gb: float | None, device: torch.device) -> None:
    """Limit this process to ``max_memory_gb`` of ``device`` (rehearse a small card on a big one)."""
    if max_memory_gb is None:
        return
    if device.type != "cuda":
        log.warning("--max-memory-gb applies to CUDA devices only; ignored on %s", device)
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, max_memory_gb * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("memory capped at %.1f GiB of %.1f GiB (fraction %.3f)", max_memory_gb, total / GIB, fraction)


def peak_memory_gib(device: torch.device) -> float | None:
    """Most memory allocated on ``device`` since the start (GiB), None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def memory_report(device: torch.device) -> str:
    """``'peak 3.1 GiB of 5.8 GiB'`` on CUDA, for error messages; empty elsewhere."""
    if device.type != "cuda":
        return ""
    total = torch.cuda.get_device_properties(device).total_memory
    return f"peak {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB of {total / GIB:.1f} GiB"


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank among ``world_size`` processes and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False  # joined here, so left here

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates into the metrics and writes checkpoints."""
        return self.rank == 0


def parse_device(text: str, local_rank: int = 0) -> torch.device:
    """``--device`` as a device this machine has (bare ``cuda`` is ``cuda:LOCAL_RANK``), else a one-line error."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {text}: training runs on cpu or cuda (cuda:N) devices only")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {text}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
            "use --device cpu or install a CUDA build of PyTorch"
        )
    index, count = local_rank if device.index is None else device.index, torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"--device {text}: cuda:{index} does not exist, PyTorch sees {count} GPU(s) (cuda:0 to cuda:{count - 1}); "
            "pick one of those or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def choose_device(device: str | None = None) -> torch.device:
    """The device this process trains on: ``--device`` (checked), else ``cuda:LOCAL_RANK`` when CUDA is there, else
    the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        return parse_device(device, local_rank)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup_runtime(device: str | None = None) -> Runtime:
    """Read torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; join the process group when there are several ranks.

    The backend is NCCL on CUDA and Gloo on CPU. ``device=None`` picks ``cuda:LOCAL_RANK`` when CUDA
    is there, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = choose_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        log.info("rank %d of %d joined the %s process group on %s", rank, world_size, backend, chosen)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=chosen, owns_process_group=owns)


def shard_fsdp(model: torch.nn.Module, blocks: Iterable[torch.nn.Module]) -> None:
    """FSDP2 in place: each block its own unit, the rest (embeddings, final norm, head) the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process group if :func:`setup_runtime` joined it (a caller's own group stays)."""
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
