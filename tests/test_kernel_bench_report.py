"""The kernel benchmark report (``bench/kernel_report.py``) on a small synthetic results set: ratios, targets, markdown.

No GPU and no benchmark run: the rows are written by hand the way ``bench/test_kernels.py`` records
them. Rendering goes to a temporary folder; ``bench/RESULTS.md`` is never written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import kernel_report  # noqa: E402
import kernel_shapes  # noqa: E402

GPU = {"device": "Test GPU 80GB", "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0", "liger": None}
ENV = {
    "date": "2025-01-01 00:00:00 UTC",
    "commit": "abc1234",
    "uncommitted": [],
    "cpu": "test cpu",
    "cores": 16,
    "memory_gb": 128.0,
    "python": "3.11.0",
    "numpy": "2.0",
    "sentencepiece": "0.2",
    "command": "pytest bench/test_kernels.py",
    "load_average": [1.0, 1.0, 1.0],
    "load_average_end": [1.0, 1.0, 1.0],
}


def row(
    op: str,
    shape: str,
    impl: str,
    ms: float,
    dtype: str = "bf16",
    pass_: str = "fwd",
    dims: dict | None = None,
    probe: bool = False,
    largest_mb: float = 10.0,
    gb_per_s: float | None = None,
    tflops: float | None = None,
    share: float | None = None,
    peak_mb: float = 1.0,
    host_ms: float | None = None,
) -> dict:
    return {
        "op": op,
        "impl": impl,
        "pass": pass_,
        "dtype": dtype,
        "shape": shape,
        "probe": probe,
        "dims": dims or {},
        "largest_tensor_mb": largest_mb,
        "ms": ms,
        "ms_min": ms,
        "ms_max": ms,
        "batches": 3,
        "gb_per_s": gb_per_s,
        "tflops": tflops,
        "share_of_peak": share,
        "peak_mb": peak_mb,
        **({"host_ms": host_ms, "host_bound": host_ms > ms} if host_ms is not None else {}),
        **GPU,
    }


ATTN = {"batch": 16, "seq": 1024, "heads": 14, "kv_heads": 2, "head_dim": 64, "causal": True}
ATTN_D96 = {**ATTN, "head_dim": 96, "seq": 512}
CE = {"tokens": 16384, "hidden": 768, "vocab": 35023}

ROWS = [
    {"op": "peak", "impl": "copy", "dtype": "-", "mb": 536.9, "ms": 0.35, "gb_per_s": 3000.0, **GPU},
    {"op": "peak", "impl": "matmul", "dtype": "bf16", "n": 8192, "ms": 1.4, "tflops": 780.0, **GPU},
    # RMSNorm at a model shape: ours 0.10 ms, compile 0.12 ms is the best other → 1.20×
    row("rms_norm", "model", "ours", 0.10, gb_per_s=1000.0, share=1000 / 3000),
    row("rms_norm", "model", "eager", 0.30, gb_per_s=333.0, share=0.111),
    row("rms_norm", "model", "compile", 0.12, gb_per_s=833.0, share=0.278),
    # RMSNorm probe (117 MB): bf16 at 85% of copy (met), fp16 at 70% (missed); compile beats ours in fp16
    row("rms_norm", "probe", "ours", 0.20, probe=True, largest_mb=117.0, gb_per_s=2550.0, share=0.85),
    row("rms_norm", "probe", "eager", 0.60, probe=True, largest_mb=117.0, gb_per_s=850.0, share=0.283),
    row("rms_norm", "probe", "ours", 0.25, dtype="fp16", probe=True, largest_mb=117.0, gb_per_s=2100.0, share=0.70),
    row("rms_norm", "probe", "compile", 0.22, dtype="fp16", probe=True, largest_mb=117.0, gb_per_s=2390.0, share=0.797),
    # attention fwd+bwd at head_dim 64, T 1024: ours 1.0 ms vs SDPA-flash 0.9 ms → 0.90× (missed)
    row("flash_attention", "seed000", "ours", 1.0, pass_="fwd+bwd", dims=ATTN, tflops=300.0, share=0.385),
    row("flash_attention", "seed000", "sdpa-flash", 0.9, pass_="fwd+bwd", dims=ATTN, tflops=333.0, share=0.427),
    row("flash_attention", "seed000", "eager", 5.0, pass_="fwd+bwd", dims=ATTN, tflops=60.0, share=0.077),
    # head_dim 96: no attention target applies
    row("flash_attention", "seed003", "ours", 0.5, pass_="fwd+bwd", dims=ATTN_D96, tflops=200.0, share=0.256),
    row("flash_attention", "seed003", "sdpa-flash", 0.4, pass_="fwd+bwd", dims=ATTN_D96, tflops=250.0, share=0.32),
    # cross-entropy at the target shape: ours 100 MB vs eager 2,000 MB (0.05×, met), 5 ms vs 6 ms (met)
    row(
        "fused_linear_cross_entropy",
        "seed003",
        "ours",
        5.0,
        pass_="fwd+bwd",
        dims=CE,
        tflops=400.0,
        share=0.51,
        peak_mb=100.0,
    ),
    row(
        "fused_linear_cross_entropy",
        "seed003",
        "eager",
        6.0,
        pass_="fwd+bwd",
        dims=CE,
        tflops=330.0,
        share=0.42,
        peak_mb=2000.0,
    ),
]


@pytest.fixture(scope="module")
def summary() -> dict:
    return kernel_report.summarize_kernels(ROWS)


def test_peaks_come_from_the_peak_rows(summary: dict) -> None:
    p = summary["peaks"]
    assert p["copy_gb_per_s"] == 3000.0 and p["matmul_tflops"] == {"bf16": 780.0}
    assert p["device"] == "Test GPU 80GB"
    assert all(r["op"] != "peak" for r in summary["figures"])


def test_figures_are_in_report_order(summary: dict) -> None:
    ops = [r["op"] for r in summary["figures"]]
    assert ops == sorted(ops, key=kernel_report.OP_ORDER.index)
    model = [r["impl"] for r in summary["figures"] if r["shape"] == "model"]
    assert model == ["ours", "eager", "compile"]


def test_ours_against_the_best_other(summary: dict) -> None:
    by = {(c["op"], c["shape"], c["dtype"], c["pass"]): c for c in summary["comparisons"]}
    c = by[("rms_norm", "model", "bf16", "fwd")]
    assert c["best_other"] == "compile" and c["speedup"] == pytest.approx(0.12 / 0.10)
    c = by[("rms_norm", "probe", "fp16", "fwd")]
    assert c["best_other"] == "compile" and c["speedup"] == pytest.approx(0.22 / 0.25)
    c = by[("flash_attention", "seed000", "bf16", "fwd+bwd")]
    assert c["best_other"] == "sdpa-flash" and c["speedup"] == pytest.approx(0.9)


def test_targets_met_and_missed(summary: dict) -> None:
    got = {(t["op"], t["shape"], t["dtype"], t["target"].split(" (")[0]): t["met"] for t in summary["targets"]}
    assert got[("rms_norm", "model", "bf16", "faster than eager, compile")] is True
    assert got[("rms_norm", "probe", "bf16", "≥ 80% of copy bandwidth")] is True
    assert got[("rms_norm", "probe", "fp16", "≥ 80% of copy bandwidth")] is False
    assert got[("flash_attention", "seed000", "bf16", "≥ 1.0× SDPA-flash speed")] is False
    assert got[("fused_linear_cross_entropy", "seed003", "bf16", "peak memory ≤ 0.1 × eager's")] is True
    assert got[("fused_linear_cross_entropy", "seed003", "bf16", "no slower than eager")] is True
    # probes are not model shapes (no speed target); head_dim 96 has no attention target
    assert ("rms_norm", "probe", "bf16", "faster than eager") not in got
    assert not any(k[0] == "flash_attention" and k[1] == "seed003" for k in got)


def test_a_missing_implementation_leaves_the_target_unchecked() -> None:
    rows = [row("flash_attention", "t1024", "ours", 1.0, pass_="fwd+bwd", dims=ATTN, tflops=1.0, share=0.1)]
    (target,) = kernel_report.summarize_kernels(rows)["targets"]
    assert target["met"] is None and target["measured"] == "–"


def test_markdown_tables(summary: dict) -> None:
    text = kernel_report.kernel_tables({"runs": ROWS})
    assert text == kernel_report.kernel_tables(summary)  # from the raw runs or from a summary: the same tables
    assert "#### RMSNorm (`zhkernels.rms_norm`)" in text and "#### Kernel targets" in text
    assert "| shape | dtype | pass | ours | eager | compile | ours ÷ best other (speed) | target |" in text
    assert "liger |" not in text.split("#### Flash")[0]  # no liger rows: no liger column
    assert "| model | bf16 | fwd | 0.100 ms · 1,000 GB/s · 33% | 0.300 ms · 333 GB/s · 11% |" in text
    assert "1.20× (vs compile)" in text
    assert "1.000 ms · 300.0 TFLOP/s · 38%" in text
    assert "≥ 1.0× SDPA-flash speed: 0.90× **missed**" in text
    assert "0.050× (100 vs 2000 MB) met" in text
    assert "copy bandwidth 3,000 GB/s" in text and "bf16 780 TFLOP/s" in text
    assert "Liger-Kernel not installed" in text
    assert kernel_shapes.FORMULAS["rms_norm"] in text
    assert "| rms_norm | ≥ 80% of copy bandwidth (tensors ≥ 64 MB) | 1 | **1** | 0 |" in text  # the per-target tally


def test_report_renders_a_kernels_json(tmp_path: Path) -> None:
    import report

    results = tmp_path / ".results"
    results.mkdir()
    (results / "kernels.json").write_text(json.dumps({"environment": ENV, "runs": ROWS}), encoding="utf-8")
    real_results_md = BENCH / "RESULTS.md"
    before = real_results_md.read_bytes() if real_results_md.is_file() else None
    text = report.render(results)
    assert "## Kernels" in text and "#### Flash attention" in text and "commit: `abc1234`" in text
    assert (real_results_md.read_bytes() if real_results_md.is_file() else None) == before


def test_shapes_follow_the_presets_and_the_probes_are_big() -> None:
    for op, shapes in kernel_shapes.SHAPES.items():
        for s in shapes:
            d = s.dims
            tokens = d.get("tokens") or d["batch"] * d["seq"]
            if s.probe:
                assert op in kernel_shapes.MEMORY_BOUND
                assert kernel_shapes.largest_tensor_mb(op, d, "bf16") >= kernel_report.TARGET_BANDWIDTH_MIN_MB, s.label
            else:
                assert 8192 <= tokens <= 16384, s.label
    ids = [f"{s.op}-{s.slug}" for shapes in kernel_shapes.SHAPES.values() for s in shapes]
    assert len(ids) == len(set(ids)) and not any(" " in i for i in ids)
    ce = {(s.dims["tokens"], s.dims["vocab"]) for s in kernel_shapes.SHAPES["fused_linear_cross_entropy"]}
    assert (16384, 35023) in ce  # the cross-entropy target shape is measured
    attn = [s.dims for s in kernel_shapes.SHAPES["flash_attention"] if s.dims["head_dim"] == 64]
    assert {d["seq"] for d in attn} >= {512, 1024, 2048}


def test_byte_and_flop_counts() -> None:
    rms = {"tokens": 8192, "hidden": 512}
    assert kernel_shapes.bytes_moved("rms_norm", rms, "bf16", "fwd") == 2 * 8192 * 512 * 2 + 512 * 2
    assert kernel_shapes.bytes_moved("rms_norm", rms, "bf16", "fwd+bwd") == 5 * 8192 * 512 * 2 + 3 * 512 * 2
    assert kernel_shapes.bytes_moved("swiglu", {"tokens": 4, "ffn": 10}, "fp16", "fwd+bwd") == 8 * 4 * 10 * 2
    rope = {"batch": 2, "seq": 8, "heads": 4, "kv_heads": 2, "head_dim": 16}
    assert kernel_shapes.bytes_moved("apply_rope", rope, "bf16", "fwd") == 2 * 2 * 8 * 6 * 16 * 2 + 2 * 8 * 16 * 4
    assert kernel_shapes.flops("flash_attention", ATTN, "fwd") == 4 * 16 * 14 * 1024**2 * 64 / 2
    assert kernel_shapes.flops("flash_attention", ATTN, "fwd+bwd") == 3.5 * kernel_shapes.flops(
        "flash_attention", ATTN, "fwd"
    )
    assert kernel_shapes.flops("fused_linear_cross_entropy", CE, "fwd+bwd") == 3 * 2 * 16384 * 768 * 35023
    assert kernel_shapes.bytes_moved("flash_attention", ATTN, "bf16", "fwd") is None
    assert kernel_shapes.flops("swiglu", {"tokens": 1, "ffn": 1}, "fwd") is None


def test_cells_report_host_time_and_flag_host_bound_calls():
    fast = row("swiglu", "model", "ours", 0.020, gb_per_s=900.0, share=0.3, host_ms=0.150)
    slow = row("swiglu", "model", "eager", 0.300, gb_per_s=60.0, share=0.02, host_ms=0.050)
    assert kernel_report._cell(fast) == "0.020 ms · 900 GB/s · 30% · host 0.150 ms (**host-bound**)"
    assert kernel_report._cell(slow) == "0.300 ms · 60 GB/s · 2% · host 0.050 ms"
    assert "host-bound" in kernel_report.METHOD
