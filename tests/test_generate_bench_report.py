"""The generation benchmark report (``bench/generate_report.py``) on a synthetic results set, and the bench's token
checks.

No GPU and no benchmark run: the rows are written by hand the way ``bench/test_generate_speed.py`` records
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

import generate_report  # noqa: E402

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
    "command": "pytest bench/test_generate_speed.py",
    "load_average": [1.0, 1.0, 1.0],
    "load_average_end": [1.0, 1.0, 1.0],
}
VOCAB = {"seed003-92m": 35_023, "minimind-26m": 6_400, "seed000-160m": 10_000, "tiny": 8_000}


def row(
    preset: str,
    impl: str,
    prefill_ms: float,
    decode_ms_per_step: float,
    batch: int = 1,
    precision: str = "bf16",
    prompt_len: int = 256,
    new_tokens: int = 128,
    matches: dict[str, int] | None = None,
    case: str = "generate",
) -> dict[str, Any]:
    """A row as ``generation_row`` writes it, from the two medians that everything else derives from."""
    decode_ms = decode_ms_per_step * (new_tokens - 1)
    ours = impl in ("triton", "torch")
    out = {
        "case": case,
        "preset": preset,
        "impl": impl,
        "precision": precision,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "vocab": VOCAB[preset],
        "dim": 768,
        "n_layers": 6,
        "params": 92_000_000,
        "prefill_ms": prefill_ms,
        "prefill_ms_min": prefill_ms,
        "prefill_ms_max": prefill_ms,
        "prefill_tokens_per_s": batch * prompt_len / (prefill_ms / 1e3),
        "forward_ms": None if impl == "hf-static" else prefill_ms / 2,
        "forward_tokens_per_s": None if impl == "hf-static" else batch * prompt_len / (prefill_ms / 2e3),
        "full_ms": prefill_ms + decode_ms,
        "full_ms_min": prefill_ms + decode_ms,
        "full_ms_max": prefill_ms + decode_ms,
        "decode_ms": decode_ms,
        "decode_ms_per_step": decode_ms_per_step,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (decode_ms / 1e3),
        "own_prefill_tokens_per_s": 123_456.0 if ours else None,
        "own_decode_tokens_per_s": 789.0 if ours else None,
        "distinct_tokens": 3,
        "prefill_calls": 15,
        "full_calls": 3,
        "matches": matches or {},
        **GPU,
    }
    return out


ROWS = [
    # seed003 bf16 batch 8: ours-triton prefill 2× HF, decode 4 ms vs HF 10 ms per step (2.5×); torch 1.25× / 2×
    row("seed003-92m", "hf", 20.0, 10.0, batch=8, matches={"triton": 128, "torch": 90, "hf-static": 128}),
    row("seed003-92m", "torch", 16.0, 5.0, batch=8, matches={"hf": 90}),
    row("seed003-92m", "triton", 10.0, 4.0, batch=8, matches={}),  # its match with HF was written into HF's row
    row("seed003-92m", "hf-static", 25.0, 2.0, batch=8),
    # seed003 bf16 batch 1 (sorts before batch 8), HF only: no ratios
    row("seed003-92m", "hf", 5.0, 8.0),
    # minimind fp16 ... fp16 sorts after bf16 of the same preset; minimind after seed003
    row("minimind-26m", "triton", 4.0, 3.0, precision="fp16", matches={"hf": 17}),
    row("minimind-26m", "hf", 6.0, 6.0, precision="fp16"),
    row("seed003-92m", "triton", 9.0, 4.0, batch=8, precision="fp16"),
    # CPU figures
    row(
        "tiny",
        "torch",
        2.0,
        1.0,
        prompt_len=64,
        new_tokens=32,
        precision="fp32",
        case="cpu-generate",
        matches={"hf": 32},
    )
    | {"cores": 2, "threads": 2, "device": "cpu"},
    row(
        "tiny",
        "hf",
        3.0,
        1.5,
        prompt_len=64,
        new_tokens=32,
        precision="fp32",
        case="cpu-generate",
        matches={"torch": 32},
    )
    | {"cores": 2, "threads": 2, "device": "cpu"},
]


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return generate_report.summarize_generate(ROWS)


def _group(
    summary: dict[str, Any], preset: str, precision: str, batch: int, key: str = "comparisons"
) -> dict[str, Any]:
    found = [c for c in summary[key] if (c["preset"], c["precision"], c["batch"]) == (preset, precision, batch)]
    assert len(found) == 1, (preset, precision, batch, summary[key])
    return found[0]


def test_gpu_and_cpu_rows_are_separated_and_ordered(summary: dict[str, Any]) -> None:
    order = [(r["preset"], r["precision"], r["batch"], r["impl"]) for r in summary["figures"]]
    assert order == [
        ("seed003-92m", "bf16", 1, "hf"),
        ("seed003-92m", "bf16", 8, "triton"),
        ("seed003-92m", "bf16", 8, "torch"),
        ("seed003-92m", "bf16", 8, "hf"),
        ("seed003-92m", "bf16", 8, "hf-static"),
        ("seed003-92m", "fp16", 8, "triton"),
        ("minimind-26m", "fp16", 1, "triton"),
        ("minimind-26m", "fp16", 1, "hf"),
    ]
    assert [r["impl"] for r in summary["cpu"]] == ["torch", "hf"]
    assert summary["device"]["device"] == GPU["device"] and summary["device"]["transformers"] == "4.57.0"


def test_ratios_are_ours_over_hf(summary: dict[str, Any]) -> None:
    c = _group(summary, "seed003-92m", "bf16", 8)
    assert c["triton_prefill_vs_hf"] == pytest.approx(2.0)
    assert c["triton_decode_vs_hf"] == pytest.approx(2.5)
    assert c["torch_prefill_vs_hf"] == pytest.approx(1.25)
    assert c["torch_decode_vs_hf"] == pytest.approx(2.0)
    assert c["triton_prefill_vs_hf_static"] == pytest.approx(2.5)
    assert c["triton_decode_vs_hf_static"] == pytest.approx(0.5)  # the static cache decodes faster here
    assert c["triton_forward_vs_hf"] == pytest.approx(2.0)
    assert c["triton_forward_vs_hf_static"] is None  # no forward-only figure for the static cache
    alone = _group(summary, "seed003-92m", "bf16", 1)
    assert alone["triton_prefill_vs_hf"] is None and alone["torch_decode_vs_hf"] is None
    assert _group(summary, "seed003-92m", "fp16", 8)["triton_decode_vs_hf"] is None  # no HF row at fp16
    cpu = _group(summary, "tiny", "fp32", 1, "cpu_comparisons")
    assert cpu["torch_prefill_vs_hf"] == pytest.approx(1.5) and cpu["torch_decode_vs_hf"] == pytest.approx(1.5)


def test_matches_are_read_from_either_row(summary: dict[str, Any]) -> None:
    c = _group(summary, "seed003-92m", "bf16", 8)
    assert c["matches_hf"] == {"triton": 128, "torch": 90, "hf-static": 128}  # triton's is only in HF's row
    assert _group(summary, "minimind-26m", "fp16", 1)["matches_hf"] == {"triton": 17}
    assert _group(summary, "seed003-92m", "fp16", 8)["matches_hf"] == {"triton": None}


def test_markdown_tables(summary: dict[str, Any]) -> None:
    text = generate_report.generate_tables(summary)
    assert "Test GPU 80GB HBM3" in text and "transformers 4.57.0" in text
    lines = text.splitlines()
    triton = next(
        line for line in lines if line.startswith("| seed003-92m | 35,023 | bf16 | 8 | 256 + 128 | ours (Triton")
    )
    # prefill 10 ms → 2048 / 0.01 = 204,800 tok/s; decode 4 ms/step → 8 / 0.004 = 2,000 tok/s; 2.00× and 2.50× HF
    assert "| 10.00 | 204,800 | 409,600 | 4.00 | 2,000 | 123,456 / 789 | 2.00× | 2.50× | 128 of 128 |" in triton
    hf = next(
        line
        for line in lines
        if line.startswith("| seed003-92m | 35,023 | bf16 | 8 | 256 + 128 | transformers + SDPA, Dyn")
    )
    assert hf.endswith("| – | – | – | (reference) |")
    static = next(
        line for line in lines if "static cache" in line and line.startswith("| seed003-92m | 35,023 | bf16 | 8")
    )
    assert "| 25.00 | 81,920 | – |" in static and static.endswith("| 128 of 128 |")
    assert "| seed003-92m | bf16 | 8 | 2.00× | 2.50× | 2.50× | 0.50× | 1.25× | 2.00× |" in text
    assert "| minimind-26m | fp16 | 1 | 1.50× | 2.00× | – | – | – | – |" in text
    assert "CPU, 2 cores (2 torch threads): not a claim about GPU speed" in text
    assert "| tiny | 8,000 | fp32 | 1 | 64 + 32 | ours (torch ops, SDPA) |" in text and "32 of 32" in text
    assert generate_report.generate_tables({"runs": ROWS}) == text  # raw rows and the summary render the same


def test_markdown_without_gpu_rows() -> None:
    cpu_only = [r for r in ROWS if r["case"] == "cpu-generate"]
    text = generate_report.generate_tables({"runs": cpu_only})
    assert "no GPU generation was measured" in text and "not a claim about GPU speed" in text
    assert "Test GPU" not in text and "Same weights" in text  # the method is still stated once


def test_report_renders_the_generate_kind(tmp_path: Path) -> None:
    import report

    results = tmp_path / ".results"
    results.mkdir()
    (results / "generate.json").write_text(json.dumps({"environment": ENV, "runs": ROWS}), encoding="utf-8")
    text = report.render(results)
    assert "## Generation" in text and "### Generation: our `generate`" in text
    assert "- command: `pytest bench/test_generate_speed.py`" in text
    assert not (tmp_path / "RESULTS.md").exists()


# ---------------------------------------------------------------- the bench's token checks


def test_common_prefix_and_new_token_count() -> None:
    speed = pytest.importorskip("test_generate_speed")  # bench/test_generate_speed.py (imports torch and llama)
    assert speed.common_prefix([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 5, 6]]) == 2
    assert speed.common_prefix([[1, 2]], [[1, 2]]) == 2 and speed.common_prefix([[7]], [[8]]) == 0
    spec = speed.GenSpec("tiny", "torch", "fp32", 2, 4, 3, vocab=50)
    speed.check_new_tokens([[1, 2, 3], [4, 5, 6]], spec, 3)
    with pytest.raises(AssertionError, match="exactly 3"):
        speed.check_new_tokens([[1, 2, 3], [4, 5]], spec, 3)


def test_note_tokens_asserts_fp32_equality_and_records_bf16_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    speed = pytest.importorskip("test_generate_speed")
    monkeypatch.setattr(speed, "_TOKENS", {})
    bf16 = speed.GenSpec("tiny", "hf", "bf16", 1, 5, 4, vocab=51)
    theirs: dict[str, Any] = {}
    speed.note_tokens(bf16, [[1, 2, 3, 4]], theirs)
    ours: dict[str, Any] = {}
    assert speed.note_tokens(speed.replace(bf16, impl="triton"), [[1, 2, 9, 9]], ours) == {"hf": 2}
    assert ours["matches"] == {"hf": 2} and theirs["matches"] == {"triton": 2}  # both rows learn it
    fp32 = speed.GenSpec("tiny", "hf", "fp32", 1, 5, 4, vocab=52)
    speed._TOKENS[fp32.group] = {"hf": ([[1, 2, 3, 4]], None)}  # as if HF's case ran (else ours' tokens are computed)
    speed.note_tokens(speed.replace(fp32, impl="torch"), [[1, 2, 3, 4]], None)
    with pytest.raises(AssertionError, match="part after 3 of 4"):
        speed.note_tokens(speed.replace(fp32, impl="triton"), [[1, 2, 3, 5]], None)
