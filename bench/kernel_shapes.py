"""The shapes the kernel benchmarks run, and the bytes or flops each op must move or compute at a shape.

Model shapes are one training micro-step of the model presets (8k–16k tokens: batch × context of
``seed000-160m``, ``seed003-92m`` and ``minimind-26m``; hidden 512/768/896; 8 or 14 query heads with
2 or 8 KV heads; head_dim 64 and 96; vocabularies 6,400/35,023/65,536). *Probe* shapes are not from
a preset: their largest tensor is ≥ 64 MB, where a memory-bound kernel should reach ≥ 80% of the
copy bandwidth. Torch-free on purpose: ``bench/report.py`` imports it through ``kernel_report``.

Byte counts are each op's compulsory traffic (every input read once, every output written once),
not what a particular implementation moves: an implementation that spills or re-reads moves more
and shows a lower GB/s. ``s`` is the element size of the activation dtype (2 for bf16/fp16); the
RoPE cos/sin tables are float32 (4 bytes) and counted per position once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MB = 1e6  # decimal megabytes throughout (GB/s = 1e9 bytes per second), like the copy-bandwidth peak

DTYPES = ("bf16", "fp16")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PASSES = ("fwd", "fwd+bwd")

#: The implementations compared per op (``sdpa-flash``/``sdpa`` only for attention; ``liger`` where Liger has the op).
IMPLS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("ours", "eager", "compile", "liger"),
    "apply_rope": ("ours", "eager", "compile", "liger"),
    "swiglu": ("ours", "eager", "compile", "liger"),
    "flash_attention": ("ours", "eager", "compile", "sdpa-flash", "sdpa"),
    "fused_linear_cross_entropy": ("ours", "eager", "compile", "liger"),
    "fused_linear_logprobs": ("ours", "eager", "compile"),
}

#: Memory-bound ops are judged in GB/s against the copy bandwidth; the others in TFLOP/s against the matmul peak.
MEMORY_BOUND = ("rms_norm", "apply_rope", "swiglu")

#: How each op's figure is counted, quoted under its table in the report.
FORMULAS: dict[str, str] = {
    "rms_norm": "bytes: fwd 2·N·H·s + H·s (x read, out written, weight read); bwd 3·N·H·s + 2·H·s (x and dout read, "
    "dx written, weight read, dweight written; the per-row rstd is not counted)",
    "apply_rope": "bytes: fwd 2·B·T·(Hq+Hk)·D·s + 2·T·D·4 (q, k read and written; cos/sin rows read); bwd the same",
    "swiglu": "bytes: fwd 3·N·F·s (gate, up read, out written); bwd 5·N·F·s (dout, gate, up read; dgate, dup written)",
    "flash_attention": "flops: fwd 4·B·Hq·T²·D, halved when causal; bwd 2.5× fwd (fwd+bwd = 3.5× fwd)",
    "fused_linear_cross_entropy": "flops: fwd 2·N·H·V (the logits matmul); fwd+bwd 3× fwd (dhidden and dweight "
    "matmuls)",
    "fused_linear_logprobs": "flops: fwd 2·N·H·V (the logits matmul); fwd+bwd 3× fwd (dhidden and dweight matmuls; "
    "ours recomputes the logits in backward, a fourth matmul not counted)",
}


@dataclass(frozen=True)
class KernelShape:
    """One benchmarked shape of one op: a readable label, its dimensions, and whether it is a bandwidth probe."""

    op: str
    label: str
    dims: dict[str, Any] = field(hash=False)
    probe: bool = False

    @property
    def slug(self) -> str:
        """The part of the pytest id naming this shape (no spaces)."""
        return self.label.split(" (")[0].replace(" ", "-").replace("/", "_")


def _rms(label: str, tokens: int, hidden: int, probe: bool = False) -> KernelShape:
    return KernelShape("rms_norm", label, {"tokens": tokens, "hidden": hidden}, probe)


def _rope(
    label: str, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, probe: bool = False
) -> KernelShape:
    return KernelShape(
        "apply_rope",
        label,
        {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim},
        probe,
    )


def _swiglu(label: str, tokens: int, ffn: int, probe: bool = False) -> KernelShape:
    return KernelShape("swiglu", label, {"tokens": tokens, "ffn": ffn}, probe)


def _attn(label: str, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> KernelShape:
    return KernelShape(
        "flash_attention",
        label,
        {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "causal": True},
    )


def _ce(label: str, tokens: int, hidden: int, vocab: int) -> KernelShape:
    return KernelShape("fused_linear_cross_entropy", label, {"tokens": tokens, "hidden": hidden, "vocab": vocab})


def _logprobs(label: str, tokens: int, hidden: int, vocab: int) -> KernelShape:
    return KernelShape("fused_linear_logprobs", label, {"tokens": tokens, "hidden": hidden, "vocab": vocab})


#: What the GPU run measures: 332 cases with the dtypes, passes and implementations (meant to take under ~8 minutes on
#: an H100).
SHAPES: dict[str, list[KernelShape]] = {
    "rms_norm": [
        _rms("minimind 16x512 h512", 8192, 512),
        _rms("seed003 32x512 h768", 16384, 768),
        _rms("seed000 16x1024 h896", 16384, 896),
        _rms("probe 64k-tok h896 (117 MB)", 65536, 896, probe=True),
    ],
    "apply_rope": [
        _rope("minimind 16x512 8/2h d64", 16, 512, 8, 2, 64),
        _rope("seed003 32x512 8/8h d96", 32, 512, 8, 8, 96),
        _rope("seed000 16x1024 14/2h d64", 16, 1024, 14, 2, 64),
        _rope("probe 64x1024 8/8h d64 (67 MB each)", 64, 1024, 8, 8, 64, probe=True),
    ],
    "swiglu": [
        _swiglu("minimind 8k-tok ffn1408", 8192, 1408),
        _swiglu("seed003 16k-tok ffn1668", 16384, 1668),
        _swiglu("seed000 16k-tok ffn2560 (84 MB)", 16384, 2560),
        _swiglu("probe 32k-tok ffn2048 (134 MB)", 32768, 2048, probe=True),
    ],
    "flash_attention": [
        _attn("minimind 16x512 8/2h d64", 16, 512, 8, 2, 64),
        _attn("seed003 32x512 8/8h d96", 32, 512, 8, 8, 96),
        _attn("seed000 16x1024 14/2h d64", 16, 1024, 14, 2, 64),
        _attn("8x2048 8/8h d64", 8, 2048, 8, 8, 64),
    ],
    "fused_linear_cross_entropy": [
        _ce("minimind 8k-tok h512 v6400", 8192, 512, 6400),
        _ce("seed003 16k-tok h768 v35023", 16384, 768, 35023),
        _ce("16k-tok h896 v65536", 16384, 896, 65536),
    ],
    "fused_linear_logprobs": [_logprobs("16k-tok h896 v35023", 16384, 896, 35023)],
}

#: ``ZHLLM_BENCH_CPU_SMOKE=1``: one tiny, odd-sized shape per op, run once on CPU (Triton interpreter) to prove the
#: code paths.
SMOKE_SHAPES: dict[str, list[KernelShape]] = {
    "rms_norm": [_rms("smoke 6-tok h40", 6, 40)],
    "apply_rope": [_rope("smoke 2x6 4/2h d16", 2, 6, 4, 2, 16)],
    "swiglu": [_swiglu("smoke 6-tok ffn40", 6, 40)],
    "flash_attention": [_attn("smoke 1x20 2/1h d16", 1, 20, 2, 1, 16)],
    "fused_linear_cross_entropy": [_ce("smoke 10-tok h16 v40", 10, 16, 40)],
    "fused_linear_logprobs": [_logprobs("smoke 10-tok h16 v40", 10, 16, 40)],
}


# ---------------------------------------------------------------- what each op moves or computes


def bytes_moved(op: str, dims: dict[str, Any], dtype: str, pass_: str) -> int | None:
    """Compulsory bytes read + written by a memory-bound op (``None`` for the compute-bound ones); see
    :data:`FORMULAS`."""
    s = DTYPE_BYTES[dtype]
    if op == "rms_norm":
        n, h = dims["tokens"], dims["hidden"]
        fwd, bwd = 2 * n * h * s + h * s, 3 * n * h * s + 2 * h * s
    elif op == "apply_rope":
        elems = dims["batch"] * dims["seq"] * (dims["heads"] + dims["kv_heads"]) * dims["head_dim"]
        fwd = bwd = 2 * elems * s + 2 * dims["seq"] * dims["head_dim"] * 4
    elif op == "swiglu":
        n, f = dims["tokens"], dims["ffn"]
        fwd, bwd = 3 * n * f * s, 5 * n * f * s
    else:
        return None
    return fwd if pass_ == "fwd" else fwd + bwd


def flops(op: str, dims: dict[str, Any], pass_: str) -> float | None:
    """Floating-point operations of a compute-bound op (``None`` for the memory-bound ones); see :data:`FORMULAS`."""
    if op == "flash_attention":
        fwd = 4.0 * dims["batch"] * dims["heads"] * dims["seq"] ** 2 * dims["head_dim"]
        if dims.get("causal", True):
            fwd /= 2
        return fwd if pass_ == "fwd" else fwd * 3.5
    if op in ("fused_linear_cross_entropy", "fused_linear_logprobs"):
        fwd = 2.0 * dims["tokens"] * dims["hidden"] * dims["vocab"]
        return fwd if pass_ == "fwd" else fwd * 3
    return None


def largest_tensor_mb(op: str, dims: dict[str, Any], dtype: str) -> float:
    """Size of the op's largest activation tensor, in MB: the "≥ 64 MB" bandwidth target applies by this."""
    s = DTYPE_BYTES[dtype]
    if op == "rms_norm":
        n = dims["tokens"] * dims["hidden"]
    elif op == "apply_rope":
        n = dims["batch"] * dims["seq"] * dims["heads"] * dims["head_dim"]
    elif op == "swiglu":
        n = dims["tokens"] * dims["ffn"]
    elif op == "flash_attention":
        n = dims["batch"] * dims["seq"] * dims["heads"] * dims["head_dim"]
    else:
        n = max(dims["tokens"] * dims["hidden"], dims["vocab"] * dims["hidden"])
    return n * s / MB
