"""Turn the kernel benchmark rows (``bench/.results/kernels.json``) into markdown: one table per op, then the targets.

Rows come from ``bench/test_kernels.py``; this module only sorts them, takes ratios and checks the
targets, so the terminal summary and ``RESULTS.md`` (``bench/report.py``) print the same numbers.
Targets are compared and reported, never asserted.
"""

from __future__ import annotations

from typing import Any

from kernel_shapes import FORMULAS, IMPLS, MEMORY_BOUND, PASSES
from report import markdown_table

OP_TITLES = {
    "rms_norm": "RMSNorm (`zhkernels.rms_norm`)",
    "apply_rope": "RoPE (`zhkernels.apply_rope`, q and k)",
    "swiglu": "SwiGLU (`zhkernels.swiglu`)",
    "flash_attention": "Flash attention (`zhkernels.flash_attention`, causal)",
    "fused_linear_cross_entropy": "Fused linear + cross-entropy (`zhkernels.fused_linear_cross_entropy`)",
    "fused_linear_logprobs": "Fused linear + log-probs (`zhkernels.fused_linear_logprobs`)",
}
OP_ORDER = list(IMPLS)
IMPL_ORDER = ["ours", "eager", "compile", "liger", "sdpa-flash", "sdpa"]
DTYPE_ORDER = {"bf16": 0, "fp16": 1}

# Targets (the kernels issue): compared and reported, never asserted.
TARGET_BANDWIDTH_SHARE = 0.80  # memory-bound ops: ≥ 80% of the measured copy bandwidth ...
TARGET_BANDWIDTH_MIN_MB = 64.0  # ... when their largest tensor is ≥ 64 MB
TARGET_ATTENTION_VS_SDPA = 1.0  # flash attention fwd+bwd ≥ 1.0× SDPA-flash's speed ...
TARGET_ATTENTION_HEAD_DIM = 64  # ... at head_dim 64, causal, 512 ≤ T ≤ 2048
TARGET_ATTENTION_SEQ = (512, 2048)
TARGET_CE_MEMORY_FRACTION = 0.1  # fused CE: ≤ 1/10 of eager's peak memory and no slower than eager ...
TARGET_CE_VOCAB, TARGET_CE_TOKENS = 35023, 16384  # ... at vocab 35,023 and 16k tokens
CHUNKED_OPS = ("fused_linear_cross_entropy", "fused_linear_logprobs")  # the same two targets for fused log-probs

COUNT_METHOD = (
    "Counted, not measured: one call's GPU peak above its inputs, counted on meta tensors (`test_memory_count`): "
    "PyTorch's `MemTracker` follows every storage the call allocates; our op runs its real host code on its Triton "
    "path with the kernel launches stubbed (as `bench/count_memory.py` counts a training step), eager runs its aten "
    "ops. *eager* = `torch.log_softmax(hidden @ W.T, -1).gather(-1, targets)` in the input dtype. Allocator rounding "
    "and cuBLAS workspaces are not counted; on a GPU the same calls are also measured (`max_memory_allocated`, the "
    "op's memory table). The distillation rows (`bench/test_distill_step.py`) compare `zhkernels.fused_distill_loss` "
    "with eager `zhkernels.reference.distill_loss`, which builds both models' full logits. MB."
)

METHOD = (
    "Each cell: median GPU milliseconds per call (batches of up to 20 calls queued behind a GPU sleep and run back "
    "to back between CUDA events, so Python's launch cost is not in it; the L2 cache is flushed by a 256 MB write "
    "before every call and those writes, timed alone the same way, are subtracted), then the achieved throughput "
    "and its share of the peak "
    "measured in the same run (memory-bound ops: GB/s from the compulsory bytes below ÷ the device-to-device "
    "copy bandwidth; attention and cross-entropy: TFLOP/s ÷ the dense matmul peak of that dtype). "
    "*fwd* runs on inputs that need no gradient; *fwd+bwd* is forward plus backward with a fixed output "
    "gradient, input gradients reset to None before each call. *ours* = the `zhkernels` Triton op; *eager* = "
    "`zhkernels.reference` (cross-entropy: `F.cross_entropy((h @ W.T).float(), t)`); *compile* = "
    "`torch.compile(eager, fullgraph=True, dynamic=False)`; *liger* = Liger-Kernel's op; *sdpa-flash* = "
    "`F.scaled_dot_product_attention` under `sdpa_kernel(SDPBackend.FLASH_ATTENTION)`; *sdpa* = its default "
    "backend choice (GQA through `enable_gqa=True`). *ours ÷ best other* = the fastest other implementation's "
    "time ÷ ours (above 1: ours is faster). RoPE and attention inputs are `[B, H, T, D]` views of `[B, T, H, D]` "
    "buffers, "
    "the layout a Llama block's projections produce; Liger's RoPE gets its `[1, T, D]` cos/sin in the activation "
    "dtype, "
    "as Hugging Face passes them (ours and eager: the float32 table). Peak memory = `max_memory_allocated` during "
    "one call minus what was "
    "allocated before it (the inputs), in MB. *host* = the host's median time to issue one call (Python, autograd and "
    "the launches); **host-bound** marks a call whose host time exceeds its GPU time, where a loop of such calls "
    "would run at the host's pace unless captured in a CUDA graph."
)


# ---------------------------------------------------------------- summaries


def _order(rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Shapes keep the order in which they were measured (the order of ``kernel_shapes.SHAPES``)."""
    order: dict[tuple[str, str], int] = {}
    for r in rows:
        order.setdefault((r["op"], r["shape"]), len(order))
    return order


def _key(order: dict[tuple[str, str], int], r: dict[str, Any]) -> tuple:
    return (
        OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else 99,
        order[(r["op"], r["shape"])],
        DTYPE_ORDER.get(r["dtype"], 9),
        PASSES.index(r["pass"]) if r["pass"] in PASSES else 9,
        IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else 99,
    )


def peaks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The copy bandwidth and matmul peaks measured in the run (rows with ``op == "peak"``)."""
    out: dict[str, Any] = {"copy_gb_per_s": None, "copy_mb": None, "matmul_tflops": {}, "matmul_n": None}
    for r in rows:
        if r.get("op") != "peak":
            continue
        if r["impl"] == "copy":
            out["copy_gb_per_s"], out["copy_mb"] = r["gb_per_s"], r.get("mb")
        elif r["impl"] == "matmul":
            out["matmul_tflops"][r["dtype"]] = r["tflops"]
            out["matmul_n"] = r.get("n")
        for k in ("device", "torch", "triton", "liger", "cuda"):
            out.setdefault(k, r.get(k))
    return out


def _groups(figures: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, dict[str, Any]]]:
    """(op, shape, dtype, pass) → impl → row."""
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = {}
    for r in figures:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["pass"]), {})[r["impl"]] = r
    return groups


def compare(impls: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours against the fastest other implementation of the same (op, shape, dtype, pass)."""
    ours = impls.get("ours")
    others = [r for name, r in impls.items() if name != "ours" and r.get("ms")]
    best = min(others, key=lambda r: r["ms"]) if others else None
    return {
        "ours_ms": ours["ms"] if ours else None,
        "best_other": best["impl"] if best else None,
        "best_other_ms": best["ms"] if best else None,
        "speedup": best["ms"] / ours["ms"] if ours and best and ours.get("ms") else None,
    }


def _check(target: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": met}


def _ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None, key: str) -> float | None:
    if not numerator or not denominator or not denominator.get(key) or numerator.get(key) is None:
        return None
    return numerator[key] / denominator[key]


def targets_for(op: str, pass_: str, impls: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets that apply to one (op, shape, dtype, pass), each with what was measured and whether it is met."""
    ours = impls.get("ours")
    first = next(iter(impls.values()))
    dims = first.get("dims", {})
    out = []
    if op in MEMORY_BOUND:
        if first.get("largest_tensor_mb", 0) >= TARGET_BANDWIDTH_MIN_MB:
            share = ours.get("share_of_peak") if ours else None
            target = f"≥ {TARGET_BANDWIDTH_SHARE:.0%} of copy bandwidth (tensors ≥ {TARGET_BANDWIDTH_MIN_MB:.0f} MB)"
            out.append(
                _check(
                    target,
                    "–" if share is None else f"{share:.0%}",
                    None if share is None else share >= TARGET_BANDWIDTH_SHARE,
                )
            )
        if not first.get("probe"):  # model shapes: ours against every other implementation that ran
            rivals = {k: r for k, r in impls.items() if k in ("ours", "eager", "compile", "liger")}
            c = compare(rivals)
            names = ", ".join(k for k in ("eager", "compile", "liger") if k in rivals) or "the others"
            measured = "–" if c["speedup"] is None else f"{c['speedup']:.2f}× {c['best_other']}"
            out.append(_check(f"faster than {names}", measured, None if c["speedup"] is None else c["speedup"] >= 1.0))
    elif op == "flash_attention":
        lo, hi = TARGET_ATTENTION_SEQ
        if (
            pass_ == "fwd+bwd"
            and dims.get("head_dim") == TARGET_ATTENTION_HEAD_DIM
            and dims.get("causal", True)
            and lo <= dims.get("seq", 0) <= hi
        ):
            ratio = _ratio(impls.get("sdpa-flash"), ours, "ms")  # speed ratio: SDPA's time over ours
            measured = "–" if ratio is None else f"{ratio:.2f}×"
            out.append(
                _check(
                    f"≥ {TARGET_ATTENTION_VS_SDPA:.1f}× SDPA-flash speed",
                    measured,
                    None if ratio is None else ratio >= TARGET_ATTENTION_VS_SDPA,
                )
            )
    elif op in CHUNKED_OPS:
        if dims.get("vocab") == TARGET_CE_VOCAB and dims.get("tokens", 0) >= TARGET_CE_TOKENS:
            eager = impls.get("eager")
            frac = _ratio(ours, eager, "peak_mb")
            measured = "–" if frac is None else f"{frac:.3f}× ({ours['peak_mb']:.0f} vs {eager['peak_mb']:.0f} MB)"
            out.append(
                _check(
                    f"peak memory ≤ {TARGET_CE_MEMORY_FRACTION:g} × eager's",
                    measured,
                    None if frac is None else frac <= TARGET_CE_MEMORY_FRACTION,
                )
            )
            ratio = _ratio(eager, ours, "ms")
            out.append(
                _check(
                    "no slower than eager",
                    "–" if ratio is None else f"{ratio:.2f}× eager's speed",
                    None if ratio is None else ratio >= 1.0,
                )
            )
    return out


def count_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counted rows (``kind == "count"``) paired per (op, shape, dtype, pass): ours, eager, and the memory target."""
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "count":
            groups.setdefault((r["op"], r["shape"], r["dtype"], r["pass"]), {})[r["impl"]] = r
    out = []
    for (op, shape, dtype, pass_), impls in groups.items():
        ours, eager = impls.get("ours"), impls.get("eager")
        frac = _ratio(ours, eager, "counted_peak_mb")
        out.append(
            {
                "op": op,
                "shape": shape,
                "dtype": dtype,
                "pass": pass_,
                "ours_mb": ours["counted_peak_mb"] if ours else None,
                "eager_mb": eager["counted_peak_mb"] if eager else None,
                "fraction": frac,
                "target": f"peak memory ≤ {TARGET_CE_MEMORY_FRACTION:g} × eager's (counted)",
                "met": None if frac is None else frac <= TARGET_CE_MEMORY_FRACTION,
            }
        )
    return out


def summarize_kernels(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peaks, the measurements in report order, ours-vs-best-other per row group, every target check, and the
    meta-tensor memory counts (apart: counts are not measurements)."""
    counts = count_groups(rows)
    measured = [r for r in rows if r.get("op") != "peak" and r.get("kind") != "count"]
    order = _order(measured)
    figures = sorted(measured, key=lambda r: _key(order, r))
    comparisons, targets = [], []
    for (op, shape, dtype, pass_), impls in _groups(figures).items():
        head = {"op": op, "shape": shape, "dtype": dtype, "pass": pass_}
        comparisons.append({**head, **compare(impls)})
        targets += [{**head, **t} for t in targets_for(op, pass_, impls)]
    return {"peaks": peaks(rows), "figures": figures, "comparisons": comparisons, "targets": targets, "counts": counts}


# ---------------------------------------------------------------- markdown


def _cell(r: dict[str, Any] | None) -> str:
    """``ms · throughput · share of peak`` of one measurement."""
    if r is None:
        return "–"
    parts = [f"{r['ms']:.3f} ms"]
    if r.get("gb_per_s") is not None:
        parts.append(f"{r['gb_per_s']:,.0f} GB/s")
    elif r.get("tflops") is not None:
        parts.append(f"{r['tflops']:.1f} TFLOP/s")
    if r.get("share_of_peak") is not None:
        parts.append(f"{r['share_of_peak']:.0%}")
    if r.get("host_ms") is not None:
        parts.append(f"host {r['host_ms']:.3f} ms" + (" (**host-bound**)" if r.get("host_bound") else ""))
    return " · ".join(parts)


def _mark(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def _peak_lines(p: dict[str, Any]) -> str:
    matmul = ", ".join(f"{d} {v:.0f} TFLOP/s" for d, v in sorted(p["matmul_tflops"].items())) or "not measured"
    copy = "not measured" if p["copy_gb_per_s"] is None else f"{p['copy_gb_per_s']:,.0f} GB/s"
    copy_size = f" on {p['copy_mb']:.0f} MB" if p.get("copy_mb") else ""
    n = p.get("matmul_n") or 8192
    return "\n".join(
        [
            f"- GPU: {p.get('device') or 'unknown'}; torch {p.get('torch') or '?'} (CUDA {p.get('cuda') or '?'}), "
            f"triton {p.get('triton') or '?'}, Liger-Kernel {p.get('liger') or 'not installed (no liger column)'}",
            f"- peaks measured in this run: copy bandwidth {copy} (`dst.copy_(src)`{copy_size}, 2 × bytes / time); "
            f"dense matmul {matmul} ({n}×{n}×{n})",
        ]
    )


def op_tables(op: str, summary: dict[str, Any]) -> str:
    figures = [r for r in summary["figures"] if r["op"] == op]
    groups = _groups(figures)
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in figures)]
    comparisons = {(c["shape"], c["dtype"], c["pass"]): c for c in summary["comparisons"] if c["op"] == op}
    checks: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for t in summary["targets"]:
        if t["op"] == op:
            checks.setdefault((t["shape"], t["dtype"], t["pass"]), []).append(t)
    speed_rows, memory_rows = [], []
    for (_, shape, dtype, pass_), by_impl in groups.items():
        c = comparisons[(shape, dtype, pass_)]
        ratio = "–" if c["speedup"] is None else f"{c['speedup']:.2f}× (vs {c['best_other']})"
        target = "; ".join(
            f"{t['target']}: {t['measured']} {_mark(t['met'])}" for t in checks.get((shape, dtype, pass_), [])
        )
        speed_rows.append([shape, dtype, pass_] + [_cell(by_impl.get(i)) for i in impls] + [ratio, target or "–"])
        memory_rows.append(
            [shape, dtype, pass_]
            + ["–" if by_impl.get(i, {}).get("peak_mb") is None else f"{by_impl[i]['peak_mb']:,.1f}" for i in impls]
        )
    return "\n\n".join(
        [
            f"#### {OP_TITLES.get(op, op)}",
            FORMULAS.get(op, "")
            + (
                "; throughput share = GB/s ÷ copy bandwidth"
                if op in MEMORY_BOUND
                else "; throughput share = TFLOP/s ÷ matmul peak of the dtype"
            )
            + ".",
            markdown_table(["shape", "dtype", "pass"] + impls + ["ours ÷ best other (speed)", "target"], speed_rows),
            "Peak memory above the inputs (MB):",
            markdown_table(["shape", "dtype", "pass"] + impls, memory_rows),
        ]
    )


def target_counts(targets: list[dict[str, Any]]) -> list[list[str]]:
    """One line per (op, target): in how many of the rows it applies to it is met, missed, or could not be checked."""
    counts: dict[tuple[str, str], list[int]] = {}
    for t in targets:
        tally = counts.setdefault((t["op"], t["target"]), [0, 0, 0])
        tally[0 if t["met"] else 2 if t["met"] is None else 1] += 1
    return [
        [op, target, str(met), f"**{missed}**" if missed else "0", str(unknown)]
        for (op, target), (met, missed, unknown) in counts.items()
    ]


def count_tables(counts: list[dict[str, Any]]) -> str:
    """The meta-tensor counts: ours and eager per (op, shape, dtype, pass), their ratio and the memory target."""
    rows = [
        [
            c["op"],
            c["shape"],
            c["dtype"],
            c["pass"],
            "–" if c["eager_mb"] is None else f"{c['eager_mb']:,.1f}",
            "–" if c["ours_mb"] is None else f"{c['ours_mb']:,.1f}",
            "–" if c["fraction"] is None else f"{c['fraction']:.4f}×",
            f"{c['target']}: {_mark(c['met'])}",
        ]
        for c in counts
    ]
    header = ["op", "shape", "dtype", "pass", "eager (MB, counted)", "ours (MB, counted)", "ours ÷ eager", "target"]
    return "\n\n".join(
        ["#### GPU peak memory counted on meta tensors (no GPU needed)", COUNT_METHOD, markdown_table(header, rows)]
    )


def kernel_tables(summary: dict[str, Any]) -> str:
    """Markdown for the kernels section: the GPU and its peaks, one table pair per op, every target, then the counts."""
    summary = summarize_kernels(summary["runs"]) if "runs" in summary else summary
    counts = summary.get("counts") or []
    if not summary["figures"] and counts:  # a machine without a GPU: only the counts ran
        title = "### Fused kernels: GPU memory counted on a machine without a GPU (timings need CUDA)"
        return "\n\n".join([title, count_tables(counts)])
    ops = sorted({r["op"] for r in summary["figures"]}, key=lambda o: OP_ORDER.index(o) if o in OP_ORDER else 99)
    parts = ["### Fused kernels vs eager, torch.compile, Liger-Kernel and SDPA", _peak_lines(summary["peaks"]), METHOD]
    parts += [op_tables(op, summary) for op in ops]
    parts.append("#### Kernel targets")
    if summary["targets"]:
        parts.append(
            markdown_table(["op", "target", "met", "missed", "not measured"], target_counts(summary["targets"]))
        )
        rows = [
            [t["op"], t["shape"], t["dtype"], t["pass"], t["target"], t["measured"], _mark(t["met"])]
            for t in summary["targets"]
        ]
        parts.append(markdown_table(["op", "shape", "dtype", "pass", "target", "measured", "met"], rows))
    else:
        parts.append("(no target could be checked: none of the target shapes ran)")
    if counts:
        parts.append(count_tables(counts))
    return "\n\n".join(parts)
