"""The training-step benchmark report (``bench/train_report.py``) on a synthetic results set, and the rehearsal's
search.

No GPU and no benchmark run: the rows are written by hand the way ``bench/test_train_step.py`` records
them. Rendering goes to a temporary folder; ``bench/RESULTS.md`` is never written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import rehearse_6gb  # noqa: E402
import train_report  # noqa: E402

GPU = {"device": "Test GPU 80GB HBM3", "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0", "transformers": "4.57.0"}
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
    "command": "pytest bench/test_train_step.py",
    "load_average": [1.0, 1.0, 1.0],
    "load_average_end": [1.0, 1.0, 1.0],
}
FLOPS_160M = 813_453_312  # Llama.flops_per_token(1024) of seed000-160m
TABLE, MEASURED = 989.4, 700.0


def step(
    preset: str,
    impl: str,
    tokens_per_s: float,
    batch: int = 16,
    seq: int = 1024,
    precision: str = "bf16",
    checkpointing: bool = False,
    vocab: int = 10_000,
    assumed: bool = False,
    peak_mb: float = 4096.0,
    flops: int = FLOPS_160M,
    case: str = "step",
) -> dict[str, Any]:
    tflops = flops * tokens_per_s / 1e12
    ms = batch * seq / tokens_per_s * 1e3
    row = {
        "case": case,
        "preset": preset,
        "impl": impl,
        "batch": batch,
        "seq": seq,
        "precision": precision,
        "checkpointing": checkpointing,
        "vocab": vocab,
        "vocab_assumed": assumed,
        "dim": 896,
        "n_layers": 12,
        "params": 122_537_856,
        "flops_per_token": flops,
        "tokens_per_step": batch * seq,
        "ms": ms,
        "ms_min": ms,
        "ms_max": ms,
        "steps": 40,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "first_loss": 9.3,
        "skipped_steps": 0,
        "resident_mb": 1500.0,
        "peak_mb": peak_mb,
        **GPU,
    }
    if case == "step":
        row.update(mfu_measured=tflops / MEASURED, mfu_table=tflops / TABLE)
    return row


def attempt(batch: int, ok: bool = True, oom: bool = False, peak_mb: float = 3000.0) -> dict[str, Any]:
    out = {"batch": batch, "ok": ok, "oom": oom, "peak_mb": peak_mb, "reserved_mb": peak_mb + 200, "total_mb": 81_559.0}
    if ok:
        out.update(ms=100.0, tokens_per_s=batch * 512 / 0.1, steps=4)
    return out


def rehearsal(impl: str, checkpointing: bool, tried: list[dict[str, Any]]) -> dict[str, Any]:
    found = rehearse_6gb.search(rehearse_6gb.SEARCH_BATCHES, lambda b: tried[[t["batch"] for t in tried].index(b)])
    return {
        "case": "rehearsal",
        "preset": "seed003-92m",
        "seq": 512,
        "impl": impl,
        "precision": "fp16",
        "checkpointing": checkpointing,
        "cap_gib": 6.0,
        **found,
        **GPU,
    }


ROWS = [
    {"case": "peak", "dtype": "bf16", "n": 8192, "ms": 1.57, "tflops": MEASURED, "table_tflops": TABLE, **GPU},
    {"case": "peak", "dtype": "fp16", "n": 8192, "ms": 1.50, "tflops": 730.0, "table_tflops": TABLE, **GPU},
    # seed000-160m bf16: ours 400k vs HF 200k (2.00×, met) vs torch 250k (1.60×); MFU 32.9% of the datasheet (missed)
    step("seed000-160m", "hf", 200_000.0, peak_mb=9000.0),
    step("seed000-160m", "triton", 400_000.0, peak_mb=3000.0),
    step("seed000-160m", "torch", 250_000.0, peak_mb=8000.0),
    # seed002-120m (vocabulary assumed): 500k vs 400k = 1.25× (missed)
    step("seed002-120m", "triton", 500_000.0, batch=32, seq=512, vocab=16_000, assumed=True),
    step("seed002-120m", "hf", 400_000.0, batch=32, seq=512, vocab=16_000, assumed=True),
    # seed003 fp16 with checkpointing: ours alone (HF skipped) → no ratio, no target
    step("seed003-92m", "triton", 300_000.0, batch=32, seq=512, precision="fp16", checkpointing=True, vocab=35_023),
    rehearsal("triton", True, [attempt(b) for b in rehearse_6gb.SEARCH_BATCHES]),
    rehearsal("hf", True, [attempt(4), attempt(8), attempt(16, ok=False, oom=True, peak_mb=6100.0)]),
    rehearsal("triton", False, [attempt(4), attempt(8), attempt(16), attempt(32, ok=False, oom=True)]),
    step("tiny", "torch", 220.0, batch=4, seq=128, precision="fp32", vocab=8_000, case="cpu-step")
    | {"cores": 2, "threads": 2},
    step("tiny", "hf", 200.0, batch=4, seq=128, precision="fp32", vocab=8_000, case="cpu-step")
    | {"cores": 2, "threads": 2},
]


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return train_report.summarize_train(ROWS)


def _target(summary: dict[str, Any], case_part: str, target_part: str) -> dict[str, Any]:
    found = [t for t in summary["targets"] if case_part in t["case"] and target_part in t["target"]]
    assert len(found) == 1, (case_part, target_part, summary["targets"])
    return found[0]


def test_peaks_and_figures_are_separated(summary: dict[str, Any]) -> None:
    assert summary["peaks"]["matmul_tflops"] == {"bf16": MEASURED, "fp16": 730.0}
    assert summary["peaks"]["table_tflops"] == TABLE and summary["peaks"]["device"] == GPU["device"]
    assert all(r["case"] == "step" for r in summary["figures"]) and len(summary["figures"]) == 6
    assert [r["impl"] for r in summary["cpu"]] == ["torch", "hf"]


def test_figures_are_in_report_order(summary: dict[str, Any]) -> None:
    order = [(r["preset"], r["impl"]) for r in summary["figures"]]
    assert order[:3] == [("seed000-160m", "triton"), ("seed000-160m", "torch"), ("seed000-160m", "hf")]
    assert order[3][0] == "seed003-92m" and order[4:] == [("seed002-120m", "triton"), ("seed002-120m", "hf")]


def test_ratios_are_ours_over_theirs(summary: dict[str, Any]) -> None:
    by_preset = {c["preset"]: c for c in summary["comparisons"]}
    assert by_preset["seed000-160m"]["vs_hf"] == pytest.approx(2.0)
    assert by_preset["seed000-160m"]["vs_torch"] == pytest.approx(1.6)
    assert by_preset["seed000-160m"]["memory_vs_hf"] == pytest.approx(3000 / 9000)
    assert by_preset["seed002-120m"]["vs_torch"] is None  # no torch row
    assert by_preset["seed003-92m"]["vs_hf"] is None
    assert summary["cpu_comparisons"][0]["torch_vs_hf"] == pytest.approx(1.1)


def test_speed_target_per_config(summary: dict[str, Any]) -> None:
    met = _target(summary, "seed000-160m 16×1024 bf16", "HF")
    assert met["met"] is True and met["measured"] == "2.00×"
    missed = _target(summary, "seed002-120m", "HF")
    assert missed["met"] is False and missed["measured"] == "1.25×"
    assert not [t for t in summary["targets"] if "seed003-92m 32×512" in t["case"]]  # no HF row: nothing to check


def test_mfu_target_uses_the_datasheet_peak(summary: dict[str, Any]) -> None:
    t = _target(summary, "seed000-160m", "MFU")
    assert t["met"] is False
    assert t["measured"].startswith(f"{FLOPS_160M * 400_000 / 1e12 / TABLE:.1%} of the datasheet peak")
    assert f"{FLOPS_160M * 400_000 / 1e12 / MEASURED:.1%} of the measured" in t["measured"]


def test_mfu_target_falls_back_to_the_measured_peak() -> None:
    row = step("seed000-160m", "triton", 600_000.0)
    row["mfu_table"] = None  # a GPU missing from llama.training.runtime.PEAK_TFLOPS
    t = train_report.summarize_train([row])["targets"]
    assert len(t) == 1 and "measured matmul peak (no datasheet figure)" in t[0]["measured"]
    assert t[0]["met"] is (FLOPS_160M * 600_000 / 1e12 / MEASURED >= train_report.TARGET_MFU)


def test_rehearsal_target_only_for_triton_with_checkpointing(summary: dict[str, Any]) -> None:
    t = _target(summary, "6 GiB cap", "micro-batch")
    assert t["met"] is True and t["measured"] == "64 × 512 (every candidate fit)"
    assert [(r["impl"], r["checkpointing"]) for r in summary["rehearsals"]] == [
        ("triton", True),
        ("triton", False),
        ("hf", True),
    ]
    hf = summary["rehearsals"][2]
    assert hf["largest_batch"] == 8 and hf["stopped_by"] == "oom"


def test_rehearsal_target_missed_when_too_small() -> None:
    row = rehearsal("triton", True, [attempt(4), attempt(8), attempt(16), attempt(32, ok=False, oom=True)])
    t = train_report.summarize_train([row])["targets"]
    assert len(t) == 1 and t[0]["met"] is False and t[0]["measured"] == "16 × 512"


def test_markdown_tables(summary: dict[str, Any]) -> None:
    text = train_report.train_tables(summary)
    assert "Test GPU 80GB HBM3" in text and "bf16 700 TFLOP/s" in text and "989 TFLOP/s" in text
    assert "| seed000-160m | 10,000 | 16 × 1024 | bf16 | off | ours (Triton kernels) |" in text
    assert "| 2.00× | 1.60× |" in text  # the ratio columns on ours' row only
    assert "| 16,000* |" in text and "16,000 assumed" in text
    assert "4 ok, 8 ok, 16 OOM" in text and "every candidate fit" in text
    assert "CPU, 2 cores (2 torch threads): not a claim about GPU speed" in text
    assert "**missed**" in text and "| met |" in text
    assert train_report.train_tables({"runs": ROWS}) == text  # raw rows and the summary render the same


def test_markdown_without_gpu_rows() -> None:
    cpu_only = [r for r in ROWS if r["case"] == "cpu-step"]
    text = train_report.train_tables({"runs": cpu_only})
    assert "no GPU step was measured" in text and "no target could be checked" in text
    assert "not a claim about GPU speed" in text and "Test GPU" not in text


def test_report_renders_the_train_kind(tmp_path: Path) -> None:
    import report

    results = tmp_path / ".results"
    results.mkdir()
    (results / "train.json").write_text(json.dumps({"environment": ENV, "runs": ROWS}), encoding="utf-8")
    text = report.render(results)
    assert "## Training step" in text and "### Training step: our Llama" in text
    assert "- command: `pytest bench/test_train_step.py`" in text
    assert not (tmp_path / "RESULTS.md").exists()


# ---------------------------------------------------------------- the rehearsal's search and step spec


def _fake(fits_up_to: int, error_at: int | None = None) -> Any:
    calls: list[int] = []

    def try_batch(batch: int) -> dict[str, Any]:
        calls.append(batch)
        if batch == error_at:
            return {"batch": batch, "ok": False, "oom": False, "error": "RuntimeError: boom"}
        return attempt(batch) if batch <= fits_up_to else attempt(batch, ok=False, oom=True)

    return try_batch, calls


def test_search_stops_at_the_first_oom() -> None:
    try_batch, calls = _fake(fits_up_to=16)
    found = rehearse_6gb.search((64, 4, 32, 8, 16, 48), try_batch)
    assert calls == [4, 8, 16, 32] and found["largest_batch"] == 16 and found["stopped_by"] == "oom"
    assert found["largest"]["batch"] == 16 and found["candidates"] == [4, 8, 16, 32, 48, 64]


def test_search_reports_errors_and_full_fits() -> None:
    try_batch, calls = _fake(fits_up_to=100, error_at=8)
    found = rehearse_6gb.search(rehearse_6gb.SEARCH_BATCHES, try_batch)
    assert calls == [4, 8] and found["largest_batch"] == 4 and found["stopped_by"] == "error"
    try_batch, calls = _fake(fits_up_to=100)
    found = rehearse_6gb.search(rehearse_6gb.SEARCH_BATCHES, try_batch)
    assert calls == list(rehearse_6gb.SEARCH_BATCHES) and found["largest_batch"] == 64 and found["stopped_by"] is None
    try_batch, _ = _fake(fits_up_to=2)
    assert rehearse_6gb.search((4, 8), try_batch)["largest_batch"] is None


def test_step_spec_configs() -> None:
    spec = rehearse_6gb.StepSpec("seed002-120m", "hf", 32, 512)
    config = rehearse_6gb.model_config(spec)
    assert config.vocab_size == rehearse_6gb.ASSUMED_VOCAB and rehearse_6gb.model_options(spec).kernels == "torch"
    assert rehearse_6gb.vocab_assumed(spec)
    own_spec = rehearse_6gb.StepSpec("seed003-92m", "triton", 4, 512, "fp16", True)
    own, options = rehearse_6gb.model_config(own_spec), rehearse_6gb.model_options(own_spec)
    assert own.vocab_size == 35_023 and options.kernels == "triton" and options.checkpointing
    assert not rehearse_6gb.vocab_assumed(rehearse_6gb.StepSpec("seed003-92m", "triton", 4, 512))
    numbers = rehearse_6gb.model_numbers(
        rehearse_6gb.model_config(rehearse_6gb.StepSpec("seed000-160m", "triton", 16, 1024)), 1024
    )
    assert numbers["flops_per_token"] == FLOPS_160M
    with pytest.raises(ValueError, match="impl must be one of"):
        rehearse_6gb.StepSpec("seed003-92m", "jax", 4, 512)
