"""Distillation loss benchmark: one forward + backward of the knowledge-distillation loss, fused
(``zhkernels.fused_distill_loss``: chunked logits, one Triton kernel per row) against eager
(``zhkernels.reference.distill_loss``: both models' full fp32 logits) and the chunked PyTorch loss training runs today
(``llama.training.distill.chunked_distill_loss``, ``torch.utils.checkpoint`` per chunk).

    pytest bench/test_distill_step.py --benchmark-only             # any machine: GPU memory counted; CPU or CUDA timing

Memory (``test_distill_memory_count``): the GPU peak of one call plus its backward above its inputs, counted on meta
tensors as ``bench/test_kernels.py::test_memory_count`` counts the fused log-probs (our op's real host code on its
Triton path with the kernel launches stubbed, eager's aten ops as they allocate; ``bench/count_memory.py``'s
machinery) at the real sizes: a 512-wide student (MiniMind / seed004) and a 768-wide teacher (seed003), both
tokenizer presets' vocabularies (6,400 and 35,023), 4,096 and 8,192 tokens, bf16, every token counted, forward KL.
Rows go to ``bench/.results/kernels.json`` as counts (``kind: count``, rendered by ``kernel_report.count_tables``);
that file holds one session's kernel rows, so run this with ``bench/test_kernels.py`` when regenerating it. The
chunked PyTorch loss is not counted: it selects the counted tokens with ``nonzero()``, which meta tensors cannot do.

Timing (``test_distill_step``): fp32 on CPU at a small shape, bf16 on CUDA at the 35,023 shape; a step = forward of
the three outputs and ``loss.backward()`` into the student's hidden states and lm_head (the teacher is frozen).
``benchmark.pedantic`` batches of back-to-back steps (wall clock on CPU, CUDA events on a GPU), medians per step as
``bench/finetune_setup.time_steps`` takes them; ``extra_info`` holds ms/step and the ratio to eager's. On CPU our op
runs its reference (the Triton kernels need CUDA, or Triton's interpreter, which times nothing), so the CPU rows
compare eager with the chunked PyTorch loss; the fused kernel's speed needs a GPU. Timings are not recorded for
``report.py`` (the kernel report's tables take GPU figures only); the memory counts are.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from benchlib import Recorder, rounds
from finetune_setup import MIB, time_steps, timing

logger = logging.getLogger(__name__)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IGNORE = -100
ALPHA, TEMPERATURE, KIND = 0.5, 2.0, "forward"


@dataclass(frozen=True)
class Shape:
    tokens: int
    student_hidden: int
    teacher_hidden: int
    vocab: int

    @property
    def label(self) -> str:
        return f"N={self.tokens} Hs={self.student_hidden} Ht={self.teacher_hidden} V={self.vocab}"

    def dims(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "hidden": self.student_hidden,
            "teacher_hidden": self.teacher_hidden,
            "vocab": self.vocab,
        }


#: Student 512 wide (minimind-26m, seed004-baby), teacher 768 (seed003-92m); the presets' two vocabularies.
COUNT_SHAPES = [Shape(tokens, 512, 768, vocab) for vocab in (6400, 35023) for tokens in (4096, 8192)]
COUNT_IMPLS = ("ours", "eager")
TIME_SHAPE = Shape(8192, 512, 768, 35023) if ON_GPU else Shape(512, 64, 96, 6400)
TIME_IMPLS = ("eager", "chunked-torch", "ours")
_EAGER_MS: dict[str, float] = {}  # group → eager's median ms/step, for the other rows' ratio


def _loss_fn(impl: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if impl == "ours":
        import zhkernels

        return lambda *args: zhkernels.fused_distill_loss(
            *args, alpha=ALPHA, temperature=TEMPERATURE, kind=KIND, ignore_index=IGNORE
        )
    if impl == "eager":
        from zhkernels import reference

        return lambda *args: reference.distill_loss(
            *args, alpha=ALPHA, temperature=TEMPERATURE, kind=KIND, ignore_index=IGNORE
        )
    try:  # llama/ is the trainer's, not this benchmark's: skip the row while it cannot be imported
        from llama.training.distill import DistillSettings, chunked_distill_loss
    except ImportError as e:
        pytest.skip(f"llama.training.distill is not importable ({e})")

    settings = DistillSettings(alpha=ALPHA, temperature=TEMPERATURE, divergence=KIND)
    return lambda *args: chunked_distill_loss(*args, settings)


def _inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Student hidden states and lm_head (requiring gradients), the frozen teacher's, and labels (all counted)."""
    generator = torch.Generator().manual_seed(0)

    def make(*size: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*size, device=device, dtype=dtype, requires_grad=grad)
        t = (torch.randn(*size, generator=generator) * scale).to(device, dtype)
        return t.requires_grad_(grad)

    n, hs, ht, v = shape.tokens, shape.student_hidden, shape.teacher_hidden, shape.vocab
    s_hidden, s_weight = make(n, hs, grad=True), make(v, hs, scale=hs**-0.5, grad=True)
    t_hidden, t_weight = make(n, ht), make(v, ht, scale=2 * ht**-0.5)
    if device.type == "meta":
        labels = torch.zeros(n, dtype=torch.long, device=device)
    else:
        labels = torch.randint(0, v, (n,), generator=generator).to(device)
    return s_hidden, s_weight, t_hidden, t_weight, labels


# ---------------------------------------------------------------- GPU memory counted on meta tensors (any machine)


def counted_peak_mb(shape: Shape, impl: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """One forward + backward's GPU peak above its inputs, counted on meta tensors (as ``bench/test_kernels.py``'s
    ``counted_peak_mb``): our op's real host code on its Triton path with launches stubbed, eager's aten ops. MiB."""
    from count_memory import _no_kernel_launches, _RealOpBodies
    from torch.distributed._tools.mem_tracker import MemTracker

    from zhkernels import _dispatch

    meta = torch.device("meta")
    inputs = _inputs(shape, meta, dtype)
    fn = _loss_fn(impl)
    tracker = MemTracker()
    tracker.track_external(*inputs)  # known before the call, so views of them (weight.T) are not new storage
    with _no_kernel_launches(), _dispatch.meta_as_gpu(None), tracker, _RealOpBodies():
        loss, ce, div = fn(*inputs)
        loss.backward()
        del loss, ce, div
    before = sum(t.untyped_storage().nbytes() for t in inputs)  # what max_memory_allocated's baseline holds
    return (tracker.get_tracker_snapshot("peak")[meta]["Total"] - before) / MIB


COUNT_CASES = [(shape, impl) for shape in COUNT_SHAPES for impl in COUNT_IMPLS]


@pytest.mark.parametrize(("shape", "impl"), COUNT_CASES, ids=[f"count-{s.label}-{i}" for s, i in COUNT_CASES])
def test_distill_memory_count(benchmark: Any, recorder: Recorder, shape: Shape, impl: str) -> None:
    """The GPU peak of one distillation loss forward + backward counted on meta tensors: a count, recorded as one."""
    benchmark.group = f"memory count (meta tensors) fused_distill_loss {shape.label} bf16 fwd+bwd"
    counted: list[float] = []
    benchmark.pedantic(lambda: counted.append(counted_peak_mb(shape, impl)), rounds=1, iterations=1)
    if benchmark.disabled:
        return
    row = {
        "op": "fused_distill_loss",
        "kind": "count",
        "impl": impl,
        "pass": "fwd+bwd",
        "dtype": "bf16",
        "shape": shape.label,
        "dims": shape.dims(),
        "distill": {"alpha": ALPHA, "temperature": TEMPERATURE, "kind": KIND},
        "counted_peak_mb": counted[0],
        "counted_on": f"meta tensors ({platform.machine()}, torch {torch.__version__})",
    }
    recorder.add("kernels", row)
    benchmark.extra_info["counted_peak_mb"] = round(counted[0], 1)
    logger.info("%s %s: %.1f MiB counted", shape.label, impl, counted[0])


def test_fused_is_a_small_fraction_of_eager(benchmark: Any) -> None:
    """At the largest shape the fused loss needs well under a tenth of eager's peak (the kernel report's target)."""
    shape = COUNT_SHAPES[-1]
    benchmark.group = f"memory count (meta tensors) fused_distill_loss {shape.label} bf16 fwd+bwd"
    ratio: list[float] = []
    benchmark.pedantic(
        lambda: ratio.append(counted_peak_mb(shape, "ours") / counted_peak_mb(shape, "eager")), rounds=1, iterations=1
    )
    if benchmark.disabled:
        return
    benchmark.extra_info["ours_over_eager"] = round(ratio[0], 4)
    assert ratio[0] < 0.1, f"fused peak is {ratio[0]:.3f} x eager's"


# ---------------------------------------------------------------- timing (CPU: fp32, small; CUDA: bf16, real size)


@pytest.mark.parametrize("impl", TIME_IMPLS)
def test_distill_step(benchmark: Any, impl: str) -> None:
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    shape = TIME_SHAPE
    group = f"distill loss fwd+bwd {shape.label} {'bf16' if ON_GPU else 'fp32'} {DEVICE.type}"
    benchmark.group = group
    inputs = _inputs(shape, DEVICE, dtype)
    fn = _loss_fn(impl)
    s_hidden, s_weight = inputs[0], inputs[1]

    def step() -> torch.Tensor:
        s_hidden.grad = s_weight.grad = None
        loss, _, _ = fn(*inputs)
        loss.backward()
        return loss.detach()

    first = step()
    from zhkernels import reference

    with torch.no_grad():
        want = reference.distill_loss(*inputs, alpha=ALPHA, temperature=TEMPERATURE, kind=KIND)[0]
    tolerance = 2e-2 if ON_GPU else 1e-4
    assert torch.isfinite(first) and abs(float(first) - float(want)) <= tolerance * max(1.0, abs(float(want)))
    times = time_steps(benchmark, step, ON_GPU, rounds(5))
    if benchmark.disabled or not times:
        return
    ms = timing(times)["ms"]
    if impl == "eager":
        _EAGER_MS[group] = ms
    path = "triton" if impl == "ours" and ON_GPU else ("reference (CPU)" if impl == "ours" else impl)
    benchmark.extra_info.update({"ms_per_step": round(ms, 3), "path": path})
    if group in _EAGER_MS:
        benchmark.extra_info["eager_ms_over_this"] = round(_EAGER_MS[group] / ms, 3)
    logger.info("%s (%s): %.3f ms/step", impl, path, ms)
