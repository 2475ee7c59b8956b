"""The weight-only quantisation benchmark report (``bench/quant_report.py``) on a synthetic results set.

No model and no benchmark run: the rows are written by hand the way ``bench/test_quant.py`` records them.
Rendering goes to a temporary folder; ``bench/RESULTS.md`` is never written.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import quant_report  # noqa: E402
import report  # noqa: E402

ENV = {
    "date": "2025-01-01 00:00:00 UTC",
    "commit": "abc1234",
    "uncommitted": [],
    "cpu": "test cpu",
    "cores": 2,
    "memory_gb": 8.0,
    "python": "3.11.0",
    "numpy": "2.0",
    "sentencepiece": "0.2",
    "command": "pytest bench/test_quant.py --benchmark-only",
    "load_average": [1.0, 1.0, 1.0],
    "load_average_end": [1.0, 1.0, 1.0],
}


def row(scheme: str, perplexity: float, megabytes: float, tokens_per_s: float) -> dict[str, Any]:
    """A row as ``test_quant`` records it."""
    return {
        "scheme": scheme,
        "perplexity": perplexity,
        "loss": math.log(perplexity),
        "eval_tokens": 51_200,
        "eval_windows": 200,
        "eval_seq_len": 256,
        "bytes": int(megabytes * 1e6),
        "decode_tokens_per_s": tokens_per_s,
        "decode_tokens_per_s_min": tokens_per_s - 5,
        "decode_tokens_per_s_max": tokens_per_s + 5,
        "rounds": 5,
        "prompt_len": 32,
        "new_tokens": 64,
        "preset": "tiny",
        "dim": 128,
        "n_layers": 2,
        "vocab": 6400,
        "steps": 200,
        "threads": 2,
        "device": "cpu",
        "torch": "2.13.0+cpu",
        "cuda": None,
        "triton": "3.9.0",
        "transformers": "5.25.0",
        "test": f"bench/test_quant.py::test_quantised_model[{scheme}]",
    }


# out of order on purpose: the summary sorts by scheme, fp32 first
ROWS = [
    row("int4-g64", 1100.0, 5.0, 40.0),
    row("int8", 1001.0, 6.0, 100.0),
    row("fp32", 1000.0, 8.0, 80.0),
    row("int4-g64-asym", 1050.0, 5.2, 60.0),
]


def test_summary_orders_schemes_and_takes_ratios_to_fp32() -> None:
    summary = quant_report.summarize_quant(ROWS)
    assert [r["scheme"] for r in summary["figures"]] == ["fp32", "int8", "int4-g64", "int4-g64-asym"]
    by = {r["scheme"]: r for r in summary["figures"]}
    assert by["fp32"]["ppl_ratio"] == 1.0 and by["fp32"]["loss_delta"] == 0.0
    assert by["int8"]["ppl_ratio"] == pytest.approx(1.001)
    assert by["int8"]["bytes_ratio"] == pytest.approx(0.75)
    assert by["int8"]["decode_ratio"] == pytest.approx(1.25)
    assert by["int4-g64"]["ppl_ratio"] == pytest.approx(1.1)
    assert by["int4-g64"]["loss_delta"] == pytest.approx(math.log(1.1))
    assert by["int4-g64"]["bytes_ratio"] == pytest.approx(0.625)
    assert by["int4-g64"]["decode_ratio"] == pytest.approx(0.5)
    assert summary["baseline"]["scheme"] == "fp32"


def test_markdown_table_and_notes() -> None:
    text = quant_report.quant_tables({"runs": ROWS})
    assert "- device: CPU (2 torch threads); torch 2.13.0+cpu, triton 3.9.0" in text
    assert "`tiny` preset (dim 128, 2 layers, vocab 6,400), trained 200 steps" in text
    assert "51,200 tokens of `corpus.val` (200 windows of 256)" in text
    assert "`pytest bench/test_quant.py --benchmark-only`" in text  # the method says which command measured
    # how trained the model is: fp32's perplexity against a uniform guess over the vocabulary
    assert "Perplexity ratios are only meaningful for a trained model" in text
    assert (
        "fp32 perplexity is **1,000.0** after 200 training steps, against 6,400 for a uniform guess over its "
        "6,400 ids (15.6% of it)." in text
    )
    header = next(line for line in text.splitlines() if line.startswith("| scheme |"))
    assert header == (
        "| scheme | perplexity | perplexity × fp32 | Δ loss (nats/token) | model MB | bytes × fp32 | "
        "decode tokens/s (median) | min–max | decode × fp32 |"
    )
    assert "| fp32 (baseline) | 1,000.00 | 1.0000× | +0.0000 | 8.00 | 1.000× | 80.0 | 75.0–85.0 | 1.00× |" in text
    assert "| int8 | 1,001.00 | 1.0010× | +0.0010 | 6.00 | 0.750× | 100.0 | 95.0–105.0 | 1.25× |" in text
    assert "| int4-g64 | 1,100.00 | 1.1000× | +0.0953 | 5.00 | 0.625× | 40.0 | 35.0–45.0 | 0.50× |" in text
    assert "| int4-g64-asym | 1,050.00 | 1.0500× | +0.0488 | 5.20 | 0.650× | 60.0 | 55.0–65.0 | 0.75× |" in text
    lines = text.splitlines()
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(f"| {s} "))
        for s in ("fp32", "int8", "int4-g64", "int4-g64-asym")
    ]
    assert order == sorted(order)
    assert quant_report.quant_tables(quant_report.summarize_quant(ROWS)) == text  # raw rows and summary alike


def test_without_fp32_there_are_no_ratios_and_the_note_says_why() -> None:
    text = quant_report.quant_tables({"runs": [r for r in ROWS if r["scheme"] != "fp32"]})
    assert "| int8 | 1,001.00 | – | – | 6.00 | – | 100.0 | 95.0–105.0 | – |" in text
    assert "No fp32 row was recorded" in text and "fp32 perplexity is" not in text


def test_report_renders_the_quant_kind(tmp_path: Path) -> None:
    results = tmp_path / ".results"
    results.mkdir()
    (results / "quant.json").write_text(json.dumps({"environment": ENV, "runs": ROWS}), encoding="utf-8")
    text = report.render(results)
    assert "## Weight-only quantisation" in text and "### Weight-only quantisation (`--quant`) vs fp32" in text
    assert "- command: `pytest bench/test_quant.py --benchmark-only`" in text
    assert "| int8 | 1,001.00 | 1.0010× |" in text
    assert not (tmp_path / "RESULTS.md").exists()


def test_report_names_a_file_in_the_old_format(tmp_path: Path) -> None:
    """The bench once wrote ``quant.json`` as ``{"device", "rows": {scheme: row}}``: named, not rendered."""
    results = tmp_path / ".results"
    results.mkdir()
    (results / "quant.json").write_text(json.dumps({"device": "cpu", "rows": {"fp32": ROWS[2]}}), encoding="utf-8")
    assert "`quant.json` is in an older format" in report.render(results)


def test_ratios_to_an_fp32_row_of_another_run_are_marked(tmp_path: Path) -> None:
    """Rerunning one scheme keeps the others' rows (``report.merge_runs``): its ratios to fp32 then cross runs."""
    old_env = {**ENV, "date": "2024-12-31 00:00:00 UTC", "commit": "old0001"}
    rerun = row("int8", 1001.0, 6.0, 900.0)
    runs, earlier = report.merge_runs({"environment": old_env, "runs": ROWS}, [rerun])
    assert [r["scheme"] for r in runs] == ["int4-g64", "fp32", "int4-g64-asym", "int8"]
    by = {r["scheme"]: r for r in quant_report.summarize_quant(runs, earlier)["figures"]}
    assert by["int8"]["other_run_than_fp32"] is True and by["int8"]["decode_ratio"] == pytest.approx(11.25)
    assert by["int4-g64"]["other_run_than_fp32"] is False and by["fp32"]["other_run_than_fp32"] is False
    results = tmp_path / ".results"
    results.mkdir()
    data = {"environment": ENV, "earlier": earlier, "runs": runs}
    (results / "quant.json").write_text(json.dumps(data), encoding="utf-8")
    text = report.render(results)
    assert "| int8† | 1,001.00 | 1.0010×† | +0.0010† | 6.00 | 0.750×† | 900.0 | 895.0–905.0 | 11.25×† |" in text
    assert "| int4-g64 | 1,100.00 | 1.1000× |" in text  # same run as fp32: unmarked
    assert "† measured in another run than fp32's row" in text
    assert "- kept from an earlier run (not re-measured by the run above): `bench/test_quant.py::" in text
