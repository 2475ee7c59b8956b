"""Turn the training-step benchmark rows (``bench/.results/train.json``) into markdown: speed table, 6 GiB rehearsal,
targets.

Rows come from ``bench/test_train_step.py`` (``case``: ``peak``, ``step``, ``rehearsal`` or ``cpu-step``);
this module only sorts them, takes ratios and checks the targets, so the terminal summary and
``RESULTS.md`` (``bench/report.py``) print the same numbers. Torch-free. Targets are compared and
reported, never asserted.
"""

from __future__ import annotations

from typing import Any

from report import fmt, markdown_table

IMPL_ORDER = ["triton", "torch", "hf"]
IMPL_NAMES = {
    "triton": "ours (Triton kernels)",
    "torch": "ours (torch ops: SDPA, plain CE)",
    "hf": "transformers LlamaForCausalLM + SDPA",
}
PRESET_ORDER = ["seed000-160m", "seed003-92m", "minimind-26m", "seed002-120m", "seed004-baby", "tiny"]
PRECISION_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}
GIB = 2**30
MIB = 2**20

# Targets (the model/training issue): compared and reported, never asserted.
TARGET_VS_HF = 1.5  # ours-triton tokens/s ≥ 1.5× transformers + SDPA at the same config, precision and batch
TARGET_MFU = 0.45  # MFU of ours-triton ...
TARGET_MFU_CASE = {"preset": "seed000-160m", "seq": 1024, "precision": "bf16", "checkpointing": False}  # ... here
TARGET_REHEARSAL_BATCH = 32  # seed003-92m, ours-triton, fp16, checkpointing, seq 512: micro-batch ≥ 32 under the cap
TARGET_REHEARSAL_CASE = {
    "preset": "seed003-92m",
    "seq": 512,
    "impl": "triton",
    "precision": "fp16",
    "checkpointing": True,
}

METHOD = (
    "A step = `optimizer.zero_grad(set_to_none=True)`, forward with labels under `torch.autocast`, "
    "`GradScaler.scale(loss).backward()` (the scaler is enabled for fp16 only), AdamW step (`fused=True`), scaler "
    "update; no gradient clipping, no data loading (one fixed batch of random token ids), float32 weights. "
    '*ours (Triton)* = `llama.model.Llama` with `kernels="triton"` (fused RMSNorm+residual, RoPE, flash attention, '
    "SwiGLU, and a linear cross-entropy that never builds the `[B, T, V]` logits); *ours (torch)* = the same model "
    "with "
    '`kernels="torch"` (`zhkernels.reference` ops, `F.scaled_dot_product_attention`, logits then `F.cross_entropy` in '
    "float32); *HF* = `transformers.LlamaForCausalLM(LlamaConfig(**config.to_hf_config()), "
    'attn_implementation="sdpa")` '
    "called with `labels=input_ids` (it shifts internally and materialises the logits), checkpointing through its own "
    "`activation_checkpointing_enable` (`gradient_checkpointing_enable` before transformers 5.2x), non-reentrant like "
    "ours. Same initial weights' distribution, same AdamW groups (decay on matrices only). "
    "ms/step = median of per-step CUDA-event times (steps issued back to back, one synchronisation per batch of steps) "
    "after warm-up steps; tokens/s = batch × seq ÷ that median. MFU = `Llama.flops_per_token(seq)` (PaLM's 6·N + "
    "12·L·d·T, the same for all three) × tokens/s ÷ peak: once ÷ the dense matmul peak measured in this run "
    "(8192³, the precision's dtype), once ÷ the `llama.training.runtime.PEAK_TFLOPS` datasheet figure. Peak memory = "
    "`torch.cuda.max_memory_allocated()` over one steady step (weights, gradients, AdamW state and activations), GiB; "
    "resident = allocated before that step. ×HF and ×torch = ours-Triton's tokens/s ÷ theirs (above 1: ours is faster)."
)

REHEARSAL_METHOD = (
    "Each candidate micro-batch runs in a fresh process (`python bench/rehearse_6gb.py --preset … --batch …`) that "
    "first calls `torch.cuda.set_per_process_memory_fraction(cap ÷ total)` (`llama.training.runtime.cap_memory`), "
    "then trains "
    "1 untimed + 3 timed steps in fp16 with a GradScaler; candidates go up until the first failure. The cap limits "
    "what PyTorch's allocator may reserve; the CUDA context (~0.3–0.5 GiB, outside the allocator) is not counted, so "
    "a real 6 GB card has a little less room than this rehearsal. Peak = `max_memory_allocated`, reserved = "
    "`max_memory_reserved`, in that process."
)


# ---------------------------------------------------------------- summaries


def _preset_key(preset: str) -> int:
    return PRESET_ORDER.index(preset) if preset in PRESET_ORDER else len(PRESET_ORDER)


def _impl_key(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _group_key(r: dict[str, Any]) -> tuple:
    return (r["preset"], r["batch"], r["seq"], r["precision"], bool(r["checkpointing"]))


def _sort_key(r: dict[str, Any]) -> tuple:
    return (
        _preset_key(r["preset"]),
        r["seq"],
        r["batch"],
        PRECISION_ORDER.get(r["precision"], 9),
        bool(r["checkpointing"]),
        _impl_key(r["impl"]),
    )


def peaks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The matmul peaks measured in the run and the datasheet figure (rows with ``case == "peak"``)."""
    out: dict[str, Any] = {"matmul_tflops": {}, "matmul_n": None, "table_tflops": None}
    for r in rows:
        if r.get("case") != "peak":
            continue
        out["matmul_tflops"][r["dtype"]] = r["tflops"]
        out["matmul_n"] = r.get("n")
        if r.get("table_tflops") is not None:
            out["table_tflops"] = r["table_tflops"]
        for k in ("device", "torch", "cuda", "triton", "transformers"):
            out.setdefault(k, r.get(k))
    return out


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "tokens_per_s") -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (preset, batch, seq, precision, checkpointing): ours-Triton's tokens/s over HF's and over ours-torch's."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), {})[r["impl"]] = r
    out = []
    for (preset, batch, seq, precision, ckpt), impls in groups.items():
        triton = impls.get("triton")
        out.append(
            {
                "preset": preset,
                "batch": batch,
                "seq": seq,
                "precision": precision,
                "checkpointing": ckpt,
                "vs_hf": _ratio(triton, impls.get("hf")),
                "vs_torch": _ratio(triton, impls.get("torch")),
                "torch_vs_hf": _ratio(impls.get("torch"), impls.get("hf")),
                "memory_vs_hf": _ratio(triton, impls.get("hf"), "peak_mb"),
            }
        )
    return out


def _check(case: str, target: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"case": case, "target": target, "measured": measured, "met": met}


def _case_label(r: dict[str, Any]) -> str:
    ckpt = ", checkpointing" if r.get("checkpointing") else ""
    return f"{r['preset']} {r['batch']}×{r['seq']} {r['precision']}{ckpt}"


def targets(
    figures: list[dict[str, Any]], comparisons: list[dict[str, Any]], rehearsals: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every target that the rows allow to check, with what was measured and whether it is met."""
    out = []
    for c in comparisons:
        if c["vs_hf"] is not None:
            out.append(
                _check(
                    _case_label(c),
                    f"tokens/s ≥ {TARGET_VS_HF}× HF + SDPA",
                    f"{c['vs_hf']:.2f}×",
                    c["vs_hf"] >= TARGET_VS_HF,
                )
            )
    for r in figures:
        if r["impl"] == "triton" and all(r.get(k) == v for k, v in TARGET_MFU_CASE.items()):
            share = r.get("mfu_table") if r.get("mfu_table") is not None else r.get("mfu_measured")
            basis = "datasheet peak" if r.get("mfu_table") is not None else "measured matmul peak (no datasheet figure)"
            measured = "–" if share is None else f"{share:.1%} of the {basis}"
            if r.get("mfu_table") is not None and r.get("mfu_measured") is not None:
                measured += f" ({r['mfu_measured']:.1%} of the measured matmul peak)"
            out.append(
                _check(
                    _case_label(r), f"MFU ≥ {TARGET_MFU:.0%}", measured, None if share is None else share >= TARGET_MFU
                )
            )
    for r in rehearsals:
        if all(r.get(k) == v for k, v in TARGET_REHEARSAL_CASE.items()):
            largest = r.get("largest_batch")
            grid_top = max(r.get("candidates") or [0])
            measured = "nothing fit" if largest is None else f"{largest} × {r['seq']}"
            if largest is not None and largest == grid_top and r.get("stopped_by") is None:
                measured += " (every candidate fit)"
            out.append(
                _check(
                    f"{r['preset']} seq {r['seq']} fp16, checkpointing, {r['cap_gib']:g} GiB cap",
                    f"micro-batch ≥ {TARGET_REHEARSAL_BATCH} × {r['seq']}",
                    measured,
                    largest is not None and largest >= TARGET_REHEARSAL_BATCH,
                )
            )
    return out


def summarize_train(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peaks, GPU step figures in report order, ratios, rehearsals, CPU figures and every target check."""
    figures = sorted((r for r in rows if r.get("case") == "step"), key=_sort_key)
    comparisons = compare(figures)
    rehearsals = sorted(
        (r for r in rows if r.get("case") == "rehearsal"), key=lambda r: (_impl_key(r["impl"]), not r["checkpointing"])
    )
    cpu = sorted((r for r in rows if r.get("case") == "cpu-step"), key=_sort_key)
    return {
        "peaks": peaks(rows),
        "figures": figures,
        "comparisons": comparisons,
        "rehearsals": rehearsals,
        "cpu": cpu,
        "cpu_comparisons": compare(cpu),
        "targets": targets(figures, comparisons, rehearsals),
    }


# ---------------------------------------------------------------- markdown


def _mark(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def _peak_lines(p: dict[str, Any]) -> str:
    matmul = ", ".join(f"{d} {v:.0f} TFLOP/s" for d, v in sorted(p["matmul_tflops"].items())) or "not measured"
    table = "not in the table" if p.get("table_tflops") is None else f"{p['table_tflops']:.0f} TFLOP/s"
    n = p.get("matmul_n") or 8192
    return "\n".join(
        [
            f"- GPU: {p.get('device') or 'unknown'}; torch {p.get('torch') or '?'} (CUDA {p.get('cuda') or '?'}), "
            f"triton {p.get('triton') or '?'}, transformers {p.get('transformers') or 'not installed (no HF rows)'}",
            f"- peaks: dense matmul measured in this run {matmul} ({n}×{n}×{n}); datasheet "
            f"(`llama.training.runtime`) {table}",
        ]
    )


def _vocab(r: dict[str, Any]) -> str:
    return f"{r['vocab']:,}" + ("*" if r.get("vocab_assumed") else "")


def step_table(figures: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    ratio = {(c["preset"], c["batch"], c["seq"], c["precision"], c["checkpointing"]): c for c in comparisons}
    rows = []
    for r in figures:
        c = ratio[_group_key(r)]
        ours = r["impl"] == "triton"
        rows.append(
            [
                r["preset"],
                _vocab(r),
                f"{r['batch']} × {r['seq']}",
                r["precision"],
                "on" if r["checkpointing"] else "off",
                IMPL_NAMES.get(r["impl"], r["impl"]),
                f"{r['ms']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                fmt(None if r.get("mfu_measured") is None else r["mfu_measured"] * 100, ".1f", "%"),
                fmt(None if r.get("mfu_table") is None else r["mfu_table"] * 100, ".1f", "%"),
                fmt(None if r.get("peak_mb") is None else r["peak_mb"] * MIB / GIB, ".2f"),
                fmt(None if r.get("resident_mb") is None else r["resident_mb"] * MIB / GIB, ".2f"),
                fmt(c["vs_hf"] if ours else None, ".2f", "×"),
                fmt(c["vs_torch"] if ours else None, ".2f", "×"),
            ]
        )
    header = [
        "preset",
        "vocab",
        "batch × seq",
        "precision",
        "checkpointing",
        "implementation",
        "ms/step",
        "tokens/s",
        "MFU (measured peak)",
        "MFU (datasheet)",
        "peak GiB",
        "resident GiB",
        "× HF",
        "× torch",
    ]
    return markdown_table(header, rows)


def _attempt(t: dict[str, Any]) -> str:
    if t.get("ok"):
        return f"{t['batch']} ok"
    return f"{t['batch']} OOM" if t.get("oom") else f"{t['batch']} error ({t.get('error', '?')})"


def rehearsal_table(rehearsals: list[dict[str, Any]]) -> str:
    rows = []
    for r in rehearsals:
        best = r.get("largest") or {}
        rows.append(
            [
                IMPL_NAMES.get(r["impl"], r["impl"]),
                "on" if r["checkpointing"] else "off",
                "none" if r.get("largest_batch") is None else f"{r['largest_batch']} × {r['seq']}",
                fmt(None if best.get("peak_mb") is None else best["peak_mb"] * MIB / GIB, ".2f"),
                fmt(None if best.get("reserved_mb") is None else best["reserved_mb"] * MIB / GIB, ".2f"),
                fmt(best.get("tokens_per_s"), ",.0f"),
                ", ".join(_attempt(t) for t in r.get("tried", [])),
            ]
        )
    header = [
        "implementation",
        "checkpointing",
        "largest micro-batch",
        "peak GiB",
        "reserved GiB",
        "tokens/s (at the largest)",
        "tried (micro-batch: outcome)",
    ]
    return markdown_table(header, rows)


def cpu_table(cpu: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    ratio = {(c["preset"], c["batch"], c["seq"], c["precision"], c["checkpointing"]): c for c in comparisons}
    rows = [
        [
            f"{r['preset']} (dim {r.get('dim', '?')}, {r.get('n_layers', '?')} layers)",
            _vocab(r),
            f"{r['batch']} × {r['seq']}",
            r["precision"],
            IMPL_NAMES.get(r["impl"], r["impl"]),
            f"{r['ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            fmt(ratio[_group_key(r)]["torch_vs_hf"] if r["impl"] == "torch" else None, ".2f", "×"),
        ]
        for r in cpu
    ]
    header = [
        "config",
        "vocab",
        "batch × seq",
        "precision",
        "implementation",
        "ms/step",
        "tokens/s",
        "ours (torch) × HF",
    ]
    return markdown_table(header, rows)


def cpu_label(cpu: list[dict[str, Any]]) -> str:
    cores = next((r.get("cores") for r in cpu if r.get("cores")), "?")
    threads = next((r.get("threads") for r in cpu if r.get("threads")), "?")
    return f"CPU, {cores} cores ({threads} torch threads): not a claim about GPU speed"


def target_lines(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return "(no target could be checked: the GPU cases did not run)"
    return markdown_table(
        ["case", "target", "measured", "met"],
        [[t["case"], t["target"], t["measured"], _mark(t["met"])] for t in checks],
    )


def train_tables(summary: dict[str, Any]) -> str:
    """Markdown for the training-step section: GPU and peaks, the step table, the rehearsal, CPU figures, targets."""
    summary = summarize_train(summary["runs"]) if "runs" in summary else summary
    parts = ["### Training step: our Llama (Triton / torch ops) vs transformers LlamaForCausalLM + SDPA"]
    if summary["figures"] or summary["rehearsals"]:
        parts += [_peak_lines(summary["peaks"]), METHOD]
    if summary["figures"]:
        parts.append(step_table(summary["figures"], summary["comparisons"]))
        if any(r.get("vocab_assumed") for r in summary["figures"]):
            parts.append("\\* the preset takes its tokenizer's vocabulary; 16,000 assumed here.")
        skipped = sorted({(r["preset"], r.get("skipped_steps")) for r in summary["figures"] if r.get("skipped_steps")})
        if skipped:
            parts.append(
                "fp16 steps skipped by the loss scaler (inf/NaN gradients; a skipped step does no AdamW update): "
                + ", ".join(f"{p}: {n}" for p, n in skipped)
                + "."
            )
    else:
        parts.append("(no GPU step was measured: the GPU cases need CUDA)")
    if summary["rehearsals"]:
        first = summary["rehearsals"][0]
        parts += [
            f"#### Largest micro-batch under a {first['cap_gib']:g} GiB cap ({first['preset']}, seq {first['seq']}, "
            f"{first['precision']})",
            REHEARSAL_METHOD,
            rehearsal_table(summary["rehearsals"]),
        ]
    if summary["cpu"]:
        parts += [
            f"#### {cpu_label(summary['cpu'])}",
            "The same step on the CPU, torch paths only (the Triton kernels need a GPU; wall-clock "
            "`time.perf_counter` per step).",
            cpu_table(summary["cpu"], summary["cpu_comparisons"]),
        ]
    parts += ["#### Training-step targets", target_lines(summary["targets"])]
    return "\n\n".join(parts)
