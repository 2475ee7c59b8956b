"""Training-step benchmarks: our Llama on the Triton kernels vs on torch ops vs ``transformers``' LlamaForCausalLM +
SDPA.

    pytest bench/test_train_step.py --benchmark-only                         # GPU: speed table + 6 GiB rehearsal
    pytest bench/test_train_step.py --benchmark-only -k "bf16 and not rehearse"
    pytest bench/test_train_step.py --benchmark-only -q                      # CPU: the small torch-path benchmark only
    ZHLLM_BENCH_CPU_SMOKE=1 pytest bench/test_train_step.py --benchmark-disable   # CPU: each GPU body once, tiny shapes

One step (``rehearse_6gb.Trainer.step``) = zero grads, forward under autocast, scaled backward, AdamW
(fused on CUDA), scaler update. On a GPU, per preset at ~16k tokens per micro-batch: bf16 with
checkpointing off for every preset, and seed003-92m also in fp16 + GradScaler with checkpointing off
and on (the RTX 3060 recipe). Each case is timed with CUDA events over batches of back-to-back steps
inside ``benchmark.pedantic``; the dense-matmul peak the MFU is taken of is measured in the same
session. The 6 GiB rehearsal runs every candidate micro-batch in its own process
(``bench/rehearse_6gb.py``). Figures go to ``bench/.results/train.json`` (``conftest.py``) and
``python bench/report.py`` renders them (``train_report.py``). Sized for under ~8 minutes of GPU time on
an H100 (21 step cases, 4 rehearsal searches of up to 6 processes each).

Without CUDA the GPU cases skip and one small CPU benchmark runs (ours with ``kernels="torch"`` vs
HF, the ``tiny`` shape in fp32), recorded as a CPU figure that says nothing about GPU speed.
``ZHLLM_BENCH_CPU_SMOKE=1`` runs each GPU body once on CPU at tiny shapes (our Triton path through
the interpreter) and records nothing: it proves the code paths, not any speed.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from typing import Any

import pytest
import torch

SMOKE = os.environ.get("ZHLLM_BENCH_CPU_SMOKE", "0") not in ("", "0")
if SMOKE:  # before ``kernels`` is imported (through llama.model): triton.jit reads it when the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
ON_GPU = torch.cuda.is_available() and not SMOKE
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NO_GPU = (
    "needs a CUDA GPU: training-step speed and memory are GPU figures (the CPU benchmark below runs instead; "
    "ZHLLM_BENCH_CPU_SMOKE=1 runs each GPU body once on tiny CPU shapes)"
)
HAS_GPU_REASON = "a GPU is present: the GPU cases are the measurement (this CPU case is for machines without one)"

from benchlib import Recorder, require_transformers, rounds, versions  # noqa: E402
from rehearse_6gb import (  # noqa: E402
    CAP_GIB,
    IMPLS,
    SEARCH_BATCHES,
    SMOKE_BATCH,
    SMOKE_SEQ,
    StepSpec,
    Trainer,
    model_numbers,
    search,
    subprocess_attempt,
    vocab_assumed,
)

logger = logging.getLogger(__name__)

gpu_only = pytest.mark.skipif(not ON_GPU and not SMOKE, reason=NO_GPU)

#: (preset, seq, micro-batch): ~16k tokens per micro-batch at each preset's own context length
PRESET_RUNS = [
    ("seed000-160m", 1024, 16),
    ("seed003-92m", 512, 32),
    ("minimind-26m", 512, 32),
    ("seed002-120m", 512, 32),
    ("seed004-baby", 256, 64),
]
STEP_CASES = [(preset, seq, batch, "bf16", False, impl) for preset, seq, batch in PRESET_RUNS for impl in IMPLS]
STEP_CASES += [("seed003-92m", 512, 32, "fp16", ckpt, impl) for ckpt in (False, True) for impl in IMPLS]
REHEARSAL = ("seed003-92m", 512, "fp16")  # preset, seq, precision
REHEARSAL_CASES = [("triton", True), ("triton", False), ("torch", True), ("hf", True)]
CPU_RUN = ("tiny", 128, 4, "fp32", 8_000)  # preset, seq, batch, precision, vocab
CPU_IMPLS = ("torch", "hf")

BATCH_MS = 300.0  # each timed batch of steps lasts about this long
MAX_INNER = 20
WARMUP_STEPS = 3  # untimed: Triton compiles, AdamW allocates its state, the allocator settles
MATMUL_N = 8192
LOSS_SLACK = 1.5  # a fresh model's loss is ln(vocab) give or take this much


def case_id(case: tuple) -> str:
    preset, seq, batch, precision, ckpt, impl = case
    return f"{preset}-{batch}x{seq}-{precision}-{'ckpt' if ckpt else 'nockpt'}-{impl}"


# ---------------------------------------------------------------- environment and peaks


def _events(fn: Any, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` back-to-back calls (CUDA events; one synchronisation at the end)."""
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


def _wall(fn: Any, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls by the wall clock (CPU)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def matmul_ms(dtype: torch.dtype) -> float:
    """Median milliseconds of a dense MATMUL_N³ matmul in ``dtype``."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=DEVICE, dtype=dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, device=DEVICE, dtype=dtype)
    _events(lambda: a @ b, 3)
    return statistics.median(_events(lambda: a @ b, 10))


@pytest.fixture(scope="session")
def train_peaks(recorder: Recorder) -> dict[str, Any]:
    """Dense matmul peak (8192³) per autocast dtype, measured now, and the ``llama.training.runtime`` datasheet
    figure."""
    if not ON_GPU:
        return {}
    from llama.training.runtime import device_peak_tflops

    table = device_peak_tflops(torch.device("cuda"))
    out: dict[str, Any] = {"matmul_tflops": {}, "table_tflops": table}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ms = matmul_ms(dtype)
        out["matmul_tflops"][name] = 2 * MATMUL_N**3 / (ms / 1e3) / 1e12
        recorder.add(
            "train",
            {
                "case": "peak",
                "dtype": name,
                "n": MATMUL_N,
                "ms": ms,
                "tflops": out["matmul_tflops"][name],
                "table_tflops": table,
                **versions(ON_GPU),
            },
        )
    torch.cuda.empty_cache()
    logger.info("matmul peaks %s TFLOP/s, datasheet %s", out["matmul_tflops"], table)
    return out


# ---------------------------------------------------------------- measuring


def sanity_step(trainer: Trainer) -> float:
    """One untimed step: the fresh model's loss is finite and near ln(vocab), or the comparison would be meaningless."""
    loss = float(trainer.step())
    expected = math.log(trainer.config.vocab_size)
    assert math.isfinite(loss), f"{trainer.spec.impl}: first loss is {loss}"
    assert abs(loss - expected) < LOSS_SLACK, (
        f"{trainer.spec.impl}: first loss {loss:.3f}, expected about ln(V) = {expected:.3f}"
    )
    return loss


def time_steps(benchmark: Any, trainer: Trainer, on_gpu: bool) -> list[float]:
    """Milliseconds of each measured step, from ``benchmark.pedantic`` batches of ``inner`` back-to-back steps."""
    timer = _events if on_gpu else _wall
    estimate = statistics.median(timer(trainer.step, 2))
    inner = max(1, min(MAX_INNER, math.ceil(BATCH_MS / max(estimate, 1e-3))))
    batches: list[list[float]] = []
    benchmark.pedantic(
        lambda: batches.append(timer(trainer.step, inner)), rounds=rounds(5), iterations=1, warmup_rounds=1
    )
    return [ms for b in batches[1:] for ms in b]  # pedantic's warm-up round is appended too: drop it


def step_memory(trainer: Trainer) -> tuple[float, float]:
    """(resident MiB before a step: weights, gradients, AdamW state, batch; peak MiB during it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    trainer.step()
    torch.cuda.synchronize()
    return resident / 2**20, torch.cuda.max_memory_allocated() / 2**20


def step_row(trainer: Trainer, times: list[float], first_loss: float) -> dict[str, Any]:
    """What every measured step case records: the spec, the model's size, the timing."""
    spec, config = trainer.spec, trainer.config
    ms = statistics.median(times)
    numbers = model_numbers(config, spec.seq)
    tokens_per_s = trainer.tokens_per_step / (ms / 1e3)
    return {
        "preset": spec.preset,
        "impl": spec.impl,
        "batch": spec.batch,
        "seq": spec.seq,
        "precision": spec.precision,
        "checkpointing": spec.checkpointing,
        "vocab": config.vocab_size,
        "vocab_assumed": vocab_assumed(spec),
        "dim": config.dim,
        "n_layers": config.n_layers,
        **numbers,
        "tokens_per_step": trainer.tokens_per_step,
        "ms": ms,
        "ms_min": min(times),
        "ms_max": max(times),
        "steps": len(times),
        "tokens_per_s": tokens_per_s,
        "tflops": numbers["flops_per_token"] * tokens_per_s / 1e12,
        "first_loss": first_loss,
        "skipped_steps": trainer.skipped_steps(),
        **versions(ON_GPU),
    }


# ---------------------------------------------------------------- the GPU speed table


@gpu_only
@pytest.mark.parametrize(
    ("preset", "seq", "batch", "precision", "checkpointing", "impl"), STEP_CASES, ids=[case_id(c) for c in STEP_CASES]
)
def test_train_step(
    benchmark: Any,
    recorder: Recorder,
    train_peaks: dict[str, Any],
    preset: str,
    seq: int,
    batch: int,
    precision: str,
    checkpointing: bool,
    impl: str,
) -> None:
    if impl == "hf":
        require_transformers()
    if SMOKE:
        seq, batch = SMOKE_SEQ, SMOKE_BATCH
    spec = StepSpec(preset, impl, batch, seq, precision, checkpointing, smoke=SMOKE)
    benchmark.group = f"train step {preset} {batch}x{seq} {precision}{' ckpt' if checkpointing else ''}"
    if ON_GPU:
        torch.set_float32_matmul_precision("high")  # as llama.training does on CUDA
    trainer = Trainer(spec, DEVICE)
    try:
        if impl == "triton":
            assert trainer.uses_triton(), (
                "kernels=triton did not reach the Triton kernels (TRITON_INTERPRET unset on CPU?)"
            )
        first_loss = sanity_step(trainer)
        if SMOKE:  # the body once through pytest-benchmark's machinery; nothing is claimed or recorded
            benchmark.pedantic(trainer.step, rounds=1, iterations=1, warmup_rounds=0)
            return
        for _ in range(WARMUP_STEPS - 1):
            trainer.step()
        times = time_steps(benchmark, trainer, on_gpu=True)
        if benchmark.disabled or not times:
            return
        resident_mb, peak_mb = step_memory(trainer)
        row = step_row(trainer, times, first_loss)
        matmul, table = train_peaks["matmul_tflops"].get(precision), train_peaks.get("table_tflops")
        row.update(
            case="step",
            resident_mb=resident_mb,
            peak_mb=peak_mb,
            mfu_measured=row["tflops"] / matmul if matmul else None,
            mfu_table=row["tflops"] / table if table else None,
        )
        recorder.add("train", row)
        benchmark.extra_info.update(
            {
                "ms_per_step": round(row["ms"], 2),
                "tokens_per_s": round(row["tokens_per_s"]),
                "peak_gib": round(peak_mb / 1024, 2),
                **({"mfu_table": round(row["mfu_table"], 3)} if row["mfu_table"] else {}),
            }
        )
    finally:
        trainer.close()


# ---------------------------------------------------------------- the 6 GiB rehearsal


@gpu_only
@pytest.mark.parametrize(
    ("impl", "checkpointing"),
    REHEARSAL_CASES,
    ids=[f"rehearse-{impl}-{'ckpt' if c else 'nockpt'}" for impl, c in REHEARSAL_CASES],
)
def test_rehearse_6gb(benchmark: Any, recorder: Recorder, impl: str, checkpointing: bool) -> None:
    """The largest micro-batch that trains 1 + 3 steps under the cap, each candidate in its own process."""
    if impl == "hf":
        require_transformers()
    preset, seq, precision = REHEARSAL
    candidates, steps = SEARCH_BATCHES, 3
    if SMOKE:  # two candidates, one timed step, no cap: the subprocess and search logic, not a memory figure
        seq, candidates, steps = SMOKE_SEQ, (1, SMOKE_BATCH), 1
    cap = None if SMOKE else CAP_GIB
    benchmark.group = f"rehearse {preset} {seq} {precision} cap {CAP_GIB:g} GiB"
    found: dict[str, Any] = {}

    def run() -> None:
        found.update(
            search(
                candidates,
                lambda b: subprocess_attempt(
                    StepSpec(preset, impl, b, seq, precision, checkpointing, smoke=SMOKE), cap, DEVICE.type, 1, steps
                ),
            )
        )

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    errors = [t["error"] for t in found["tried"] if not t["ok"] and not t.get("oom")]
    assert not errors, f"a candidate failed for another reason than memory: {errors[0]}"
    if SMOKE:
        assert found["largest_batch"] == SMOKE_BATCH, found
        return
    if benchmark.disabled:
        return
    recorder.add(
        "train",
        {
            "case": "rehearsal",
            "preset": preset,
            "seq": seq,
            "impl": impl,
            "precision": precision,
            "checkpointing": checkpointing,
            "cap_gib": CAP_GIB,
            **found,
            **versions(ON_GPU),
        },
    )
    best = found["largest"] or {}
    benchmark.extra_info.update(
        {
            "largest_batch": found["largest_batch"],
            **({"peak_gib": round(best["peak_mb"] / 1024, 2)} if best.get("peak_mb") else {}),
        }
    )


# ---------------------------------------------------------------- CPU: the torch paths at a small size


@pytest.mark.skipif(ON_GPU, reason=HAS_GPU_REASON)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_train_step(benchmark: Any, recorder: Recorder, impl: str) -> None:
    """CPU, few cores: ours (``kernels="torch"``) vs HF + SDPA at the ``tiny`` shape in fp32; not a GPU claim."""
    if impl == "hf":
        require_transformers()
    preset, seq, batch, precision, vocab = CPU_RUN
    spec = StepSpec(preset, impl, batch, seq, precision, False, vocab=vocab)
    benchmark.group = f"CPU train step {preset} {batch}x{seq} {precision}"
    trainer = Trainer(spec, torch.device("cpu"))
    try:
        first_loss = sanity_step(trainer)
        times = time_steps(benchmark, trainer, on_gpu=False)
        if benchmark.disabled or not times:
            return
        row = step_row(trainer, times, first_loss)
        row.update(case="cpu-step", device="cpu", cores=os.cpu_count(), threads=torch.get_num_threads())
        recorder.add("train", row)
        benchmark.extra_info.update({"ms_per_step": round(row["ms"], 2), "tokens_per_s": round(row["tokens_per_s"])})
    finally:
        trainer.close()
