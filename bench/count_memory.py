"""Count a training step's GPU memory on a machine without a GPU: our kernels' real allocations on ``meta`` tensors.

    python bench/count_memory.py                                   # every preset x profile at the planner's choice
    python bench/count_memory.py --preset seed003-92m --batch 32 --seq 512 --precision fp16
    python bench/count_memory.py --markdown                        # the table bench/RESULTS.md quotes

What is counted is one optimizer step as ``llama.training`` runs it with one micro-batch per forward:
the model built on ``meta`` (fp32 weights), AdamW's two fp32 moments per parameter already allocated
(a step after the first), then ``min(accumulation, 2)`` micro-batches of forward under autocast and a
loss-scaled backward (the second one runs with the first one's gradients live, which is the peak of
any longer accumulation), gradient clipping and ``zero_grad``. PyTorch's ``MemTracker`` follows every
storage the step creates and frees and reports the peak of what is live at once.

How each part is made faithful without a GPU:

* **Our kernels' real host code runs.** Under :func:`zhkernels._dispatch.meta_as_gpu` meta tensors
  take the Triton path, and a dispatch mode runs each ``zhllm::`` op's own Python body instead of its
  fake, with the Triton launches stubbed out: every buffer the op allocates (the cross-entropy's chunk
  logits and fp32 gradient accumulators, flash attention's ``delta``, RMSNorm's partial sums) is
  allocated and freed exactly as on the GPU. Only what the kernels *write* is missing, which memory
  does not depend on.
* **Autocast is emulated**: autocast does nothing on ``meta``, so ``F.linear`` casts its float32
  inputs to the autocast dtype (the copy autograd then keeps, as autocast's does), and the fused
  cross-entropy reads the same dtype through ``_dispatch.autocast_dtype``.
* **Not counted**, so added by hand: the CUDA context, cuBLAS workspaces and the caching allocator's
  rounding and fragmentation (``CUDA_CONTEXT_GIB`` below, and the planner's margins). The fused AdamW
  step allocates nothing, so its in-place update is not run.

The result is a count on fake tensors, not a measurement: ``bench/gpu_check.sh`` measures the same
step with ``torch.cuda.max_memory_allocated`` when a GPU is lent, and ``tests/test_count_memory.py``
asserts that every profile's planned micro-batch fits its card by this count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):  # as a script bench/ is on sys.path, the root is not; imported, the reverse
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from rehearse_6gb import ASSUMED_VOCAB  # noqa: E402  (presets whose vocabulary is the tokenizer's)

from llama.model import PRESETS, Llama, LlamaConfig, ModelOptions  # noqa: E402
from llama.training.profiles import CUDA_CONTEXT_GIB as PLANNER_CONTEXT_GIB  # noqa: E402
from llama.training.profiles import PROFILES, estimate_memory_gib, plan  # noqa: E402
from llama.training.runtime import GIB  # noqa: E402
from zhkernels import _dispatch  # noqa: E402

logger = logging.getLogger(__name__)

#: A consumer card's CUDA context plus cuBLAS workspaces, outside PyTorch's allocator (0.3-0.5 GiB; the high end).
CUDA_CONTEXT_GIB = 0.5
LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
LOSS_SCALE = 65536.0  # GradScaler's initial scale: a multiply, as scaler.scale(loss) does
CARD_PROFILES = ("3060-6gb", "4090-24gb")


@dataclass(frozen=True)
class Count:
    """Peak bytes live at once during the step, and what each kind of storage held at that moment."""

    preset: str
    micro_batch: int
    seq_len: int
    precision: str
    checkpointing: bool
    accumulation: int
    peak_bytes: int
    by_kind: dict[str, int]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def with_context_gib(self) -> float:
        """The count plus the CUDA context: what ``nvidia-smi`` would show at least."""
        return self.peak_gib + CUDA_CONTEXT_GIB


def preset_config(preset: str, **overrides: Any) -> LlamaConfig:
    """The preset; presets without a vocabulary get ``ASSUMED_VOCAB``."""
    fields = dict(PRESETS[preset])
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = ASSUMED_VOCAB
    fields.update(overrides)
    return LlamaConfig(**fields)


class _RealOpBodies(TorchDispatchMode):
    """Run each ``zhllm::`` custom op's own implementation on meta tensors instead of its fake."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith(_dispatch.NAMESPACE + "::"):
            from torch._library.custom_ops import OPDEFS

            return OPDEFS[name]._init_fn(*args, **kwargs)  # its inner aten ops reach the modes below (the tracker)
        return func(*args, **kwargs)


class _EmulatedAutocast:
    """``F.linear`` under autocast: float32 meta inputs cast to ``dtype`` first, parameters' casts cached during a
    forward as autocast's weight cache does (so under checkpointing every fp16 weight copy lives until the forward
    ends). A patch of ``F.linear`` itself, not a function mode: checkpointing recomputes blocks on autograd's
    thread, where a thread-local mode is not active; recomputes cast afresh (autocast's cache then lasts one block)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.linear = dtype, F.linear
        self.cache: dict[int, torch.Tensor] | None = None

    def __enter__(self) -> "_EmulatedAutocast":
        F.linear = self._linear
        return self

    def __exit__(self, *exc: Any) -> None:
        F.linear = self.linear

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """One forward pass: the region whose weight casts autocast caches."""
        self.cache = {}
        try:
            yield
        finally:
            self.cache = None

    def _cast(self, value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and value.device.type == "meta" and value.dtype == torch.float32):
            return value
        if self.cache is None or not (value.is_leaf and value.requires_grad):
            return value.to(self.dtype)
        if id(value) not in self.cache:
            self.cache[id(value)] = value.to(self.dtype)
        return self.cache[id(value)]

    def _linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self._cast(input), self._cast(weight), self._cast(bias))


@contextlib.contextmanager
def _no_kernel_launches() -> Iterator[None]:
    """Every ``@triton.jit`` kernel in zhkernels becomes a launch that does nothing (meta tensors have no memory)."""
    import zhkernels

    class _Stub:
        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kwargs: None

    patched: list[tuple[Any, str, Any]] = []
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith(zhkernels.__name__ + "."):
            continue
        for attr, value in list(vars(module).items()):
            if type(value).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
                patched.append((module, attr, value))
                setattr(module, attr, _Stub())
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def count_step(
    config: LlamaConfig,
    micro_batch: int,
    seq_len: int,
    precision: str,
    accumulation: int = 2,
    packed: bool = True,
    preset: str = "",
    device: str = "meta",
    checkpointing: bool = False,
) -> Count:
    """Count one optimizer step's peak GPU memory on our Triton path (see the module doc). ``packed``: rows carry
    ``doc_ids``; ``checkpointing``: activation checkpointing.

    ``device="cpu"`` runs the same step for real on CPU tensors (Triton's interpreter, real autocast), which is
    how the tests check the meta count against real allocations at small shapes."""
    from torch.distributed._tools.mem_tracker import MemTracker

    if precision not in LOW_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(LOW_DTYPES)}, got {precision!r}")
    if device not in ("meta", "cpu"):
        raise ValueError(f"device must be meta or cpu, got {device!r}")
    if device == "cpu" and not _dispatch.interpret_mode():
        raise RuntimeError("a CPU count runs our kernels in Triton's interpreter: set TRITON_INTERPRET=1 first")
    low = LOW_DTYPES[precision]
    meta = torch.device(device)
    with torch.device(meta):
        model = Llama(config, ModelOptions(kernels="triton", checkpointing=checkpointing))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    for p in params:  # the fused AdamW's state after its first step
        optimizer.state[p] = {
            "step": torch.zeros((), device=meta),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=meta)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packed:
        batch["doc_ids"] = torch.zeros(micro_batch, seq_len, dtype=torch.int32, device=meta)
    scale = LOSS_SCALE if precision == "fp16" else 1.0
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    if device == "cpu":  # real autocast and kernels; PyTorch's tracker sees our ops' outputs, not their insides
        emulation, bodies = contextlib.nullcontext(), contextlib.nullcontext()
        autocast = torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None)
        forward = contextlib.nullcontext
    else:
        emulation, bodies = _no_kernel_launches(), _RealOpBodies()
        autocast = _EmulatedAutocast(low) if low is not None else contextlib.nullcontext()
        forward = autocast.forward if low is not None else contextlib.nullcontext
    with emulation, _dispatch.meta_as_gpu(low), tracker, bodies, autocast:
        for _ in range(max(1, min(accumulation, 2))):
            tracker.reset_mod_stats()  # per-module statistics only; the device peak is kept across micro-batches
            with forward():
                loss = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch.get("doc_ids")).loss
            (loss / accumulation * scale).backward()
            del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")[meta]
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in peak.items() if k != "Total"}
    return Count(preset, micro_batch, seq_len, precision, checkpointing, accumulation, int(peak["Total"]), by_kind)


def count_planned(preset: str, profile_name: str) -> tuple[Count, float]:
    """The planner's choice for ``preset`` on ``profile_name`` at the model's context: (count, its estimate GiB)."""
    profile = PROFILES[profile_name]
    config = preset_config(preset)
    seq_len = profile.default_seq_len or config.max_seq_len
    chosen = plan(profile, config, seq_len)
    count = count_step(
        config,
        chosen.micro_batch,
        seq_len,
        chosen.precision,
        chosen.grad_accum,
        preset=preset,
        checkpointing=chosen.checkpointing,
    )
    return count, float(chosen.estimated_gib)


def _row(profile: str, count: Count, estimate: float, card: float | None) -> dict[str, Any]:
    return {
        "profile": profile,
        "preset": count.preset,
        "micro_batch": count.micro_batch,
        "seq_len": count.seq_len,
        "precision": count.precision,
        "checkpointing": count.checkpointing,
        "counted_gib": round(count.peak_gib, 3),
        "with_context_gib": round(count.with_context_gib, 3),
        "planner_estimate_gib": round(estimate + PLANNER_CONTEXT_GIB, 3),
        "card_gib": card,
        "by_kind_gib": {k: round(v / GIB, 3) for k, v in count.by_kind.items()},
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table for bench/RESULTS.md."""
    lines = [
        "| profile | preset | micro-batch x seq | precision | ckpt | counted | + context | planner estimate | card |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['preset']} | {r['micro_batch']} x {r['seq_len']} | {r['precision']} | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['counted_gib']:.2f} GiB | "
            f"{r['with_context_gib']:.2f} GiB | {r['planner_estimate_gib']:.2f} GiB | "
            f"{'-' if r['card_gib'] is None else format(r['card_gib'], '.0f') + ' GiB'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Count a training step's peak GPU memory on meta tensors (no GPU needed): our kernels' real "
        "allocations, autocast emulated. Without --preset: every preset on every card profile, at the "
        "micro-batch the planner picks."
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="one preset (then give --batch and --seq)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (rows) for --preset")
    parser.add_argument("--seq", type=int, help="tokens per row for --preset (default: the preset's context)")
    parser.add_argument("--precision", choices=sorted(LOW_DTYPES), default="fp16", help="for --preset")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing, for --preset")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step, for --preset")
    parser.add_argument("--markdown", action="store_true", help="print the table bench/RESULTS.md quotes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    if args.preset:
        config = preset_config(args.preset)
        seq = args.seq or config.max_seq_len
        count = count_step(
            config,
            args.batch,
            seq,
            args.precision,
            args.accumulation,
            preset=args.preset,
            checkpointing=args.checkpointing,
        )
        estimate = estimate_memory_gib(config, args.batch, seq, args.precision, args.checkpointing)
        rows.append(_row("-", count, estimate, None))
    else:
        for profile in CARD_PROFILES:
            for preset in (p for p in PRESETS if p != "tiny"):
                count, estimate = count_planned(preset, profile)
                rows.append(_row(profile, count, estimate, PROFILES[profile].memory_gib))
                logger.info("%s %s: %.2f GiB counted", profile, preset, count.peak_gib)
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
