"""Kernel benchmarks: each fused op in ``zhkernels`` against eager PyTorch, ``torch.compile``, Liger-Kernel and SDPA.

    pytest bench/test_kernels.py --benchmark-only                       # GPU: every op × shape × dtype × impl × pass
    pytest bench/test_kernels.py --benchmark-only -k "bf16 and not compile"   # a quicker look
    ZHLLM_BENCH_CPU_SMOKE=1 pytest bench/test_kernels.py --benchmark-disable  # CPU: each body once, tiny shapes
    pytest bench/test_kernels.py --benchmark-only -k count              # CPU or GPU: the meta-tensor memory counts

Shapes, byte and flop counts are in ``kernel_shapes.py``. Every case times batches of up to 20 calls
run back to back on the GPU, each after a 256 MB write that flushes the L2 cache: the GPU first sleeps
(``torch.cuda._sleep``) while the host queues the whole batch, so the CUDA events around it measure GPU
work alone, not Python's 0.1–0.2 ms per call; the flushes' own time is measured the same way and
subtracted. The host's time to issue one call is recorded beside it (``host_ms``; ``host_bound`` when
it exceeds the GPU time, i.e. when a real loop of such calls would wait on Python).
pytest-benchmark's own columns are whole batches while the recorded figures are per call. The copy-bandwidth and
matmul peaks that the shares are taken of are measured at the start of the same session. Figures
go to ``bench/.results/kernels.json`` (``conftest.py``) and ``python bench/report.py`` renders them.

Without CUDA every timed case skips; the memory counts (``test_memory_count``: ``fused_linear_logprobs`` and its
eager form at the target shape, their GPU peak counted on meta tensors as ``bench/count_memory.py`` counts a step)
run anywhere and are recorded as counts, never as measurements. ``ZHLLM_BENCH_CPU_SMOKE=1`` instead runs each
timed case once on CPU at a tiny shape (our ops through the Triton interpreter, ``torch.compile`` with the ``aot_eager``
backend), checks the forward against ``zhkernels.reference``, and records nothing: it proves the
benchmark code paths, not any speed.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from benchlib import Recorder, rounds
from kernel_shapes import (
    DTYPES,
    IMPLS,
    MB,
    MEMORY_BOUND,
    PASSES,
    SHAPES,
    SMOKE_SHAPES,
    KernelShape,
    bytes_moved,
    flops,
    largest_tensor_mb,
)

logger = logging.getLogger(__name__)

SMOKE = os.environ.get("ZHLLM_BENCH_CPU_SMOKE", "0") not in ("", "0")
if SMOKE:  # before ``kernels`` is imported (lazily, below): triton.jit reads it when the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
ON_GPU = torch.cuda.is_available() and not SMOKE
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NO_GPU = (
    "needs a CUDA GPU; the kernels are proven on CPU by tests/ through the Triton interpreter "
    "(ZHLLM_BENCH_CPU_SMOKE=1 runs each benchmark body once on tiny CPU shapes)"
)
gpu_only = pytest.mark.skipif(not ON_GPU and not SMOKE, reason=NO_GPU)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-6
FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2 (H100: 50 MB)
BATCH_MS = 10.0  # each timed batch holds enough calls to last about this long
WARMUP_BATCHES = 2
SANITY_TOL = 3e-2  # forward vs the float32 reference: max |diff| / max |ref| (bf16/fp16 rounding is ~4e-3)

# zhkernels.<name> → the module that defines it, for ops written but not yet exported from zhkernels/__init__.py
OP_MODULES = {
    "rms_norm": "rms_norm",
    "apply_rope": "rope",
    "swiglu": "swiglu",
    "flash_attention": "flash_attention",
    "fused_linear_cross_entropy": "cross_entropy",
    "fused_linear_logprobs": "logprobs",
}

CASES = [
    (shape, dtype, pass_, impl)
    for op, shapes in (SMOKE_SHAPES if SMOKE else SHAPES).items()
    for shape in shapes
    for dtype in DTYPES
    for pass_ in PASSES
    for impl in IMPLS[op]
]


def case_id(case: tuple[KernelShape, str, str, str]) -> str:
    shape, dtype, pass_, impl = case
    return f"{shape.op}-{shape.slug}-{dtype}-{pass_}-{impl}"


# ---------------------------------------------------------------- the implementations


def _kernels() -> Any:
    try:
        import zhkernels
    except Exception as e:  # a half-written op module breaks the package import: skip, do not error every case
        pytest.skip(f"zhkernels is not importable ({type(e).__name__}: {e})")
    return zhkernels


def ours(name: str) -> Callable[..., Any]:
    """``zhkernels.<name>``, or a skip that says the op is not there yet."""
    fn = getattr(_kernels(), name, None)
    if not callable(fn):  # written but not exported yet: take it from its module
        try:
            fn = getattr(importlib.import_module(f"zhkernels.{OP_MODULES[name]}"), name, None)
        except Exception:
            fn = None
    if not callable(fn):
        pytest.skip(f"zhkernels.{name} not available yet")
    return fn


def liger(name: str) -> Any:
    """An object from Liger-Kernel (``"module:attr"``), or a skip: the liger column is left out when it is absent."""
    if SMOKE:
        pytest.skip("Liger-Kernel runs on CUDA only")
    module, attr = name.split(":")
    try:
        return getattr(importlib.import_module(f"liger_kernel.{module}"), attr)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"Liger-Kernel is not installed or lacks {name} ({e}); the liger column is left out")


_COMPILED: dict[str, Callable[..., Any]] = {}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)`` once per function; every shape/dtype/grad mode gets its own static graph."""
    if fn.__name__ not in _COMPILED:
        import torch._dynamo

        for limit in ("recompile_limit", "cache_size_limit"):  # default 8 would silently fall back to eager
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
        _COMPILED[fn.__name__] = torch.compile(
            fn, fullgraph=True, dynamic=False, backend="aot_eager" if SMOKE else "inductor"
        )
    return _COMPILED[fn.__name__]


def eager_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What training code writes without a fused loss: the full logits, upcast, then cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What DPO code writes without a fused head: the full logits, log-softmax, the targets' entries."""
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _sdpa_gqa_supported() -> bool:
    return torch.torch_version.TorchVersion(torch.__version__) >= "2.5"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA; GQA through ``enable_gqa`` where torch has it, else K/V repeated (what a model would do)."""
    if q.shape[1] != k.shape[1]:
        if _sdpa_gqa_supported():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpa(q, k, v)


@dataclass
class Case:
    """One op's inputs on the device, the output gradients for fwd+bwd, and the implementation to time."""

    call: Callable[[], Any]  # one forward call; a tensor or a tuple matching ``grads``
    reference: Callable[[], Any]  # the float32 spec on the same inputs (forward), for the sanity check
    leaves: list[torch.Tensor]  # inputs that receive gradients in fwd+bwd
    grads: list[torch.Tensor] | None  # fixed output gradients (None: a scalar loss)


def _randn(*shape: int, dtype: torch.dtype, grad: bool, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_(grad)


def _heads_layout(batch: int, seq: int, heads: int, dim: int, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    """``[B, H, T, D]`` viewed from a ``[B, T, H, D]`` buffer: the layout a Llama block's q/k/v projection produces."""
    t = torch.randn(batch, seq, heads, dim, device=DEVICE).to(dtype).transpose(1, 2)
    return t.requires_grad_(grad)


def make_case(shape: KernelShape, dtype_name: str, impl: str, needs_grad: bool) -> Case:
    op, d, dtype = shape.op, shape.dims, TORCH_DTYPES[dtype_name]
    reference = _kernels().reference

    if op == "rms_norm":
        x = _randn(d["tokens"], d["hidden"], dtype=dtype, grad=needs_grad)
        w = (1.0 + 0.1 * torch.randn(d["hidden"], device=DEVICE)).to(dtype).requires_grad_(needs_grad)
        fn = {
            "ours": lambda: ours("rms_norm"),
            "eager": lambda: reference.rms_norm,
            "compile": lambda: compiled(reference.rms_norm),
            "liger": lambda: liger("ops.rms_norm:LigerRMSNormFunction").apply,
        }[impl]()
        return Case(
            lambda: fn(x, w, EPS), lambda: reference.rms_norm(x.float(), w.float(), EPS), [x, w], [torch.randn_like(x)]
        )
    if op == "apply_rope":
        q = _heads_layout(d["batch"], d["seq"], d["heads"], d["head_dim"], dtype, needs_grad)
        k = _heads_layout(d["batch"], d["seq"], d["kv_heads"], d["head_dim"], dtype, needs_grad)
        cos, sin = reference.rope_cos_sin(d["seq"], d["head_dim"], device=DEVICE)
        ref = lambda: reference.apply_rope(q.float(), k.float(), cos, sin)  # noqa: E731
        grads = [torch.randn_like(q), torch.randn_like(k)]
        if impl == "liger":  # Liger takes [1, T, D] tables in the activation dtype, as Hugging Face passes them
            fn = liger("ops.rope:LigerRopeFunction").apply
            cos_l, sin_l = cos[None].to(dtype), sin[None].to(dtype)
            return Case(lambda: tuple(fn(q, k, cos_l, sin_l)[:2]), ref, [q, k], grads)
        fn = {
            "ours": lambda: ours("apply_rope"),
            "eager": lambda: reference.apply_rope,
            "compile": lambda: compiled(reference.apply_rope),
        }[impl]()
        return Case(lambda: fn(q, k, cos, sin), ref, [q, k], grads)
    if op == "swiglu":
        gate = _randn(d["tokens"], d["ffn"], dtype=dtype, grad=needs_grad)
        up = _randn(d["tokens"], d["ffn"], dtype=dtype, grad=needs_grad)
        fn = {
            "ours": lambda: ours("swiglu"),
            "eager": lambda: reference.swiglu,
            "compile": lambda: compiled(reference.swiglu),
            "liger": lambda: liger("ops.swiglu:LigerSiLUMulFunction").apply,
        }[impl]()
        return Case(
            lambda: fn(gate, up),
            lambda: reference.swiglu(gate.float(), up.float()),
            [gate, up],
            [torch.randn_like(gate)],
        )
    if op == "flash_attention":
        b, t, hd = d["batch"], d["seq"], d["head_dim"]
        q = _heads_layout(b, t, d["heads"], hd, dtype, needs_grad)
        k = _heads_layout(b, t, d["kv_heads"], hd, dtype, needs_grad)
        v = _heads_layout(b, t, d["kv_heads"], hd, dtype, needs_grad)
        if impl == "sdpa-flash" and not ON_GPU:
            pytest.skip("the SDPA flash backend needs CUDA")
        if impl in ("ours", "eager", "compile"):
            attend = {
                "ours": lambda: ours("flash_attention"),
                "eager": lambda: reference.flash_attention,
                "compile": lambda: compiled(reference.flash_attention),
            }[impl]()
            fn = lambda q, k, v: attend(q, k, v, causal=True)  # noqa: E731
        else:
            fn = {"sdpa-flash": sdpa_flash, "sdpa": sdpa}[impl]
        return Case(
            lambda: fn(q, k, v),
            lambda: reference.flash_attention(q.float(), k.float(), v.float(), causal=True),
            [q, k, v],
            [_heads_layout(b, t, d["heads"], hd, dtype, False)],
        )
    if op == "fused_linear_cross_entropy":
        n, h, vocab = d["tokens"], d["hidden"], d["vocab"]
        hidden = _randn(n, h, dtype=dtype, grad=needs_grad)
        weight = _randn(vocab, h, dtype=dtype, grad=needs_grad, scale=h**-0.5)
        targets = torch.randint(0, vocab, (n,), device=DEVICE)
        if impl == "liger":
            loss = liger("transformers:LigerFusedLinearCrossEntropyLoss")(ignore_index=-100)
            fn = lambda h_, w_, t_: _first(loss(w_, h_, t_))  # noqa: E731  (Liger takes the weight first)
        else:
            fn = {
                "ours": lambda: ours("fused_linear_cross_entropy"),
                "eager": lambda: eager_cross_entropy,
                "compile": lambda: compiled(eager_cross_entropy),
            }[impl]()
        return Case(
            lambda: fn(hidden, weight, targets),
            lambda: reference.fused_linear_cross_entropy(hidden.float(), weight.float(), targets),
            [hidden, weight],
            None,
        )
    if op == "fused_linear_logprobs":
        return _logprobs_case(d, dtype, impl, needs_grad, reference)
    raise KeyError(op)


def _logprobs_case(d: dict[str, Any], dtype: torch.dtype, impl: str, needs_grad: bool, reference: Any) -> Case:
    """Per-token log-probs ``[N]`` with a fixed output gradient in the output's dtype (fp32 for ours, the input
    dtype for eager); every target is a real id (eager's gather knows no ignore_index)."""
    n, h, vocab = d["tokens"], d["hidden"], d["vocab"]
    hidden = _randn(n, h, dtype=dtype, grad=needs_grad)
    weight = _randn(vocab, h, dtype=dtype, grad=needs_grad, scale=h**-0.5)
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    fn = {
        "ours": lambda: ours("fused_linear_logprobs"),
        "eager": lambda: eager_logprobs,
        "compile": lambda: compiled(eager_logprobs),
    }[impl]()
    out_dtype = torch.float32 if impl == "ours" else dtype
    return Case(
        lambda: fn(hidden, weight, targets),
        lambda: reference.fused_linear_logprobs(hidden.float(), weight.float(), targets),
        [hidden, weight],
        [torch.randn(n, device=DEVICE).to(out_dtype)],
    )


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensors(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_step(case: Case, pass_: str) -> Callable[[], Any]:
    """What one timed call does: the forward, or forward + backward with the fixed output gradients."""
    if pass_ == "fwd":
        return case.call

    def forward_backward() -> Any:
        for t in case.leaves:
            t.grad = None
        outs = _tensors(case.call())
        torch.autograd.backward(outs if case.grads is None else outs[: len(case.grads)], case.grads)
        return outs

    return forward_backward


def sanity_check(case: Case, step: Callable[[], Any], pass_: str, impl: str) -> None:
    """One call before timing: the forward matches the float32 spec, or fwd+bwd leaves finite gradients."""
    with torch.no_grad():
        expected = _tensors(case.reference())  # first: Liger's RoPE rotates q and k in place
    try:
        got = _tensors(step())
    except Exception as e:
        if impl == "ours":
            raise
        pytest.skip(f"{impl} does not run here ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if pass_ == "fwd":
        for g, r in zip(got, expected):
            assert g.shape == r.shape, f"{impl}: output shape {tuple(g.shape)} != reference {tuple(r.shape)}"
            err = (g.detach().float() - r.float()).abs().max().item() / max(r.float().abs().max().item(), 1e-6)
            assert err <= SANITY_TOL, (
                f"{impl}: forward differs from zhkernels.reference by {err:.2e} (relative to its max)"
            )
    else:
        for t in case.leaves:
            assert t.grad is not None and torch.isfinite(t.grad).all(), f"{impl}: a gradient is missing or not finite"


# ---------------------------------------------------------------- measuring on the GPU


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = _event(), _event()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@functools.lru_cache(maxsize=1)
def device_info() -> dict[str, Any]:
    """The GPU and the library versions, stamped on every row."""
    import triton

    try:
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:
        liger_version = None
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "liger": liger_version,
    }


COPY_BYTES = 512 * 2**20
MATMUL_N = 8192


def copy_ms() -> float:
    """Median milliseconds of ``dst.copy_(src)`` over COPY_BYTES on the device."""
    src = torch.ones(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return _median_ms(lambda: dst.copy_(src), 20)


def matmul_ms(dtype: torch.dtype) -> float:
    """Median milliseconds of a dense MATMUL_N³ matmul in ``dtype``."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=DEVICE, dtype=dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    return _median_ms(lambda: a @ b, 10)


@pytest.fixture(scope="session")
def gpu_peaks(recorder: Recorder) -> dict[str, Any]:
    """Copy bandwidth (``dst.copy_(src)`` on 512 MiB: 2 × bytes / time) and the dense matmul peak (8192³), this run."""
    if not ON_GPU:
        return {}
    info = device_info()
    ms = copy_ms()
    out = {"copy_gb_per_s": 2 * COPY_BYTES / (ms / 1e3) / 1e9, "matmul_tflops": {}, **info}
    recorder.add(
        "kernels",
        {
            "op": "peak",
            "impl": "copy",
            "dtype": "-",
            "mb": COPY_BYTES / MB,
            "ms": ms,
            "gb_per_s": out["copy_gb_per_s"],
            **info,
        },
    )
    for name, dtype in TORCH_DTYPES.items():
        ms = matmul_ms(dtype)
        out["matmul_tflops"][name] = 2 * MATMUL_N**3 / (ms / 1e3) / 1e12
        recorder.add(
            "kernels",
            {
                "op": "peak",
                "impl": "matmul",
                "dtype": name,
                "n": MATMUL_N,
                "ms": ms,
                "tflops": out["matmul_tflops"][name],
                **info,
            },
        )
    torch.cuda.empty_cache()
    logger.info("peaks: copy %.0f GB/s, matmul %s TFLOP/s", out["copy_gb_per_s"], out["matmul_tflops"])
    return out


@pytest.fixture(scope="session")
def l2_flush() -> torch.Tensor | None:
    """Written before every timed call so no input is still in L2 from the previous one."""
    return torch.empty(FLUSH_BYTES, dtype=torch.int8, device=DEVICE) if ON_GPU else None


#: The GPU first sleeps at least this long (and 3× the host's enqueue time of the last batch), so that the
#: host has queued a whole batch before the GPU reaches it: the calls then run back to back and the events
#: measure GPU time alone, whatever Python and the launches cost (that is reported apart, as ``host_ms``).
SLEEP_MS = 20.0
MAX_INNER = 20  # calls per batch: each launches several kernels, and CUDA's launch queue holds about a thousand


@functools.lru_cache(maxsize=1)
def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep``, measured once."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm
    torch.cuda.synchronize()
    return cycles / _median_ms(lambda: torch.cuda._sleep(cycles), 3)


def queued_ms(fn: Callable[[], Any], inner: int, sleep_ms: float) -> tuple[float, float]:
    """(GPU ms, host ms) of ``inner`` back-to-back calls: the GPU sleeps ``sleep_ms`` while the host queues them."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(_sleep_cycles_per_ms() * sleep_ms))
    start, end = _event(), _event()
    began = time.perf_counter()
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    host_ms = (time.perf_counter() - began) * 1e3
    torch.cuda.synchronize()
    return start.elapsed_time(end), host_ms


def time_calls(benchmark: Any, step: Callable[[], Any], flush: torch.Tensor) -> tuple[list[float], list[float]]:
    """(GPU ms per call, host ms per call) of each measured batch from ``benchmark.pedantic``: ``inner`` calls,
    each after an L2 flush, queued behind a GPU sleep and run back to back; the flushes' own time, measured
    the same way, is subtracted."""
    step()
    estimate = _median_ms(step, 2)
    inner = max(2, min(MAX_INNER, math.ceil(BATCH_MS / max(estimate, 1e-3))))
    gpu: list[float] = []
    host: list[float] = []
    sleep = [SLEEP_MS]

    def flushed_step() -> None:
        flush.zero_()
        step()

    def batch() -> None:
        total, host_ms = queued_ms(flushed_step, inner, sleep[0])
        flushes, _ = queued_ms(flush.zero_, inner, sleep[0])
        if host_ms > sleep[0]:  # the GPU woke before the batch was queued: a gap is in `total`; sleep longer
            sleep[0] = 3 * host_ms
            total, host_ms = queued_ms(flushed_step, inner, sleep[0])
        gpu.append(max(total - flushes, 0.0) / inner)
        host.append(host_ms / inner)

    benchmark.pedantic(batch, rounds=rounds(5), iterations=1, warmup_rounds=WARMUP_BATCHES)
    return gpu[WARMUP_BATCHES:], host[WARMUP_BATCHES:]


def peak_memory_mb(step: Callable[[], Any], leaves: list[torch.Tensor]) -> float:
    """Most memory allocated during one call, above what was allocated before it (the inputs), in MB."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - before) / MB


# ---------------------------------------------------------------- the benchmark


@gpu_only
@pytest.mark.parametrize(("shape", "dtype", "pass_", "impl"), CASES, ids=[case_id(c) for c in CASES])
def test_kernel(
    benchmark: Any,
    recorder: Recorder,
    gpu_peaks: dict[str, Any],
    l2_flush: torch.Tensor | None,
    shape: KernelShape,
    dtype: str,
    pass_: str,
    impl: str,
) -> None:
    op = shape.op
    torch.manual_seed(0)
    case = make_case(shape, dtype, impl, needs_grad=pass_ != "fwd")
    step = make_step(case, pass_)
    benchmark.group = f"{op} {shape.label} {dtype} {pass_}"
    sanity_check(case, step, pass_, impl)

    if SMOKE:  # the body once through pytest-benchmark's machinery; nothing is claimed or recorded
        benchmark.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)
        return

    times, host_times = time_calls(benchmark, step, l2_flush)
    if benchmark.disabled or not times:  # --benchmark-disable: a smoke run, nothing measured
        return
    ms, host_ms = statistics.median(times), statistics.median(host_times)
    n_bytes, n_flops = bytes_moved(op, shape.dims, dtype, pass_), flops(op, shape.dims, pass_)
    gb_per_s = n_bytes / (ms / 1e3) / 1e9 if n_bytes is not None else None
    tflops = n_flops / (ms / 1e3) / 1e12 if n_flops is not None else None
    if op in MEMORY_BOUND:
        share = gb_per_s / gpu_peaks["copy_gb_per_s"]
    else:
        share = tflops / gpu_peaks["matmul_tflops"][dtype]
    peak_mb = peak_memory_mb(step, case.leaves)
    row = {
        "op": op,
        "impl": impl,
        "pass": pass_,
        "dtype": dtype,
        "shape": shape.label,
        "probe": shape.probe,
        "dims": dict(shape.dims),
        "largest_tensor_mb": largest_tensor_mb(op, shape.dims, dtype),
        "ms": ms,
        "ms_min": min(times),
        "ms_max": max(times),
        "batches": len(times),
        "host_ms": host_ms,
        "host_bound": host_ms > ms,
        "bytes": n_bytes,
        "gb_per_s": gb_per_s,
        "flops": n_flops,
        "tflops": tflops,
        "share_of_peak": share,
        "peak_mb": peak_mb,
        **device_info(),
    }
    recorder.add("kernels", row)
    benchmark.extra_info.update(
        {
            "ms_per_call": round(ms, 4),
            "host_ms_per_call": round(host_ms, 4),
            "share_of_peak": round(share, 3),
            "peak_mb": round(peak_mb, 1),
            **({"gb_per_s": round(gb_per_s)} if gb_per_s else {}),
            **({"tflops": round(tflops, 1)} if tflops else {}),
        }
    )


# ---------------------------------------------------------------- GPU memory counted on meta tensors (any machine)

#: (shape, dtype, pass, impl) whose GPU peak is counted: the fused log-probs and their eager form at the target shape
COUNT_CASES = [
    (shape, "bf16", pass_, impl)
    for shape in SHAPES["fused_linear_logprobs"]
    for pass_ in PASSES
    for impl in ("ours", "eager")
]


def counted_peak_mb(shape: KernelShape, dtype_name: str, pass_: str, impl: str) -> float:
    """One call's GPU peak above its inputs, counted on meta tensors: our op's real host code on its Triton path
    (launches stubbed, as ``bench/count_memory.py`` counts a step), eager's aten ops as they allocate. MB."""
    from count_memory import _no_kernel_launches, _RealOpBodies
    from torch.distributed._tools.mem_tracker import MemTracker

    from zhkernels import _dispatch

    d, dtype, grad = shape.dims, TORCH_DTYPES[dtype_name], pass_ != "fwd"
    meta = torch.device("meta")
    hidden = torch.empty(d["tokens"], d["hidden"], device=meta, dtype=dtype, requires_grad=grad)
    weight = torch.empty(d["vocab"], d["hidden"], device=meta, dtype=dtype, requires_grad=grad)
    targets = torch.zeros(d["tokens"], dtype=torch.long, device=meta)
    fn = ours("fused_linear_logprobs") if impl == "ours" else eager_logprobs
    output_grad = torch.empty(d["tokens"], device=meta, dtype=torch.float32 if impl == "ours" else dtype)
    inputs = (hidden, weight, targets, output_grad)
    tracker = MemTracker()
    tracker.track_external(*inputs)  # known before the call, so views of them (weight.T) are not new storage
    with _no_kernel_launches(), _dispatch.meta_as_gpu(None), tracker, _RealOpBodies():
        out = fn(hidden, weight, targets)
        if grad:
            out.backward(output_grad)
        del out
    before = sum(t.untyped_storage().nbytes() for t in inputs)  # what max_memory_allocated's baseline holds
    return (tracker.get_tracker_snapshot("peak")[meta]["Total"] - before) / MB


@pytest.mark.parametrize(
    ("shape", "dtype", "pass_", "impl"), COUNT_CASES, ids=[f"count-{case_id(c)}" for c in COUNT_CASES]
)
def test_memory_count(
    benchmark: Any, recorder: Recorder, shape: KernelShape, dtype: str, pass_: str, impl: str
) -> None:
    """The GPU peak of one call counted on meta tensors, on any machine: a count, recorded as one (``kind``)."""
    benchmark.group = f"memory count (meta tensors) {shape.op} {shape.label} {dtype} {pass_}"
    counted: list[float] = []
    benchmark.pedantic(lambda: counted.append(counted_peak_mb(shape, dtype, pass_, impl)), rounds=1, iterations=1)
    if SMOKE or benchmark.disabled:
        return
    import platform

    row = {
        "op": shape.op,
        "kind": "count",
        "impl": impl,
        "pass": pass_,
        "dtype": dtype,
        "shape": shape.label,
        "dims": dict(shape.dims),
        "counted_peak_mb": counted[0],
        "counted_on": f"meta tensors ({platform.machine()}, torch {torch.__version__})",
    }
    recorder.add("kernels", row)
    benchmark.extra_info["counted_peak_mb"] = round(counted[0], 1)
