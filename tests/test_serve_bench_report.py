"""The server load-test report (``bench/serve_report.py``) on a synthetic results set, and the merge of a session's
rows into a kind's results file (``bench/report.py``'s ``merge_runs``, ``bench/conftest.py``'s session end).

No server and no benchmark run: the rows are written by hand the way ``bench/test_serve_load.py`` records them.
Rendering and writing go to temporary folders; ``bench/RESULTS.md`` and ``bench/.results`` are never written.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import serve_report  # noqa: E402

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
    "command": "pytest bench/test_serve_load.py --benchmark-only",
    "load_average": [1.0, 1.0, 1.0],
    "load_average_end": [1.0, 1.0, 1.0],
}
MODEL = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512}


def row(setting: str, wall_s: float, p50: float, p99: float, batches: int, largest: int) -> dict[str, Any]:
    """A row as ``test_serve_load`` records it: 32 clients × 3 requests, 16 tokens each answer."""
    flags = {
        "batched": "--batch-window-ms 15 --max-batch-size 32",
        "one-at-a-time": "--batch-window-ms 0 --max-batch-size 1",
    }
    return {
        "setting": setting,
        "flags": flags[setting],
        "clients": 32,
        "requests": 96,
        "max_tokens": 16,
        "model": MODEL,
        "wall_s": wall_s,
        "failures": 0,
        "completion_tokens": 1536,
        "requests_per_s": 96 / wall_s,
        "completion_tokens_per_s": 1536 / wall_s,
        "p50_latency_s": p50,
        "p99_latency_s": p99,
        "batches": batches,
        "mean_requests_per_batch": 96 / batches,
        "largest_batch_requests": largest,
        "cpu_threads": 2,
        "device": "cpu",
        "torch": "2.13.0+cpu",
        "cuda": None,
        "triton": "3.9.0",
        "transformers": "5.25.0",
        "test": f"bench/test_serve_load.py::test_serve_load[{setting}]",
    }


# the baseline first: the summary puts batched first whatever order the rows come in
ROWS = [row("one-at-a-time", 4.0, 1.25, 2.0, 96, 1), row("batched", 2.5, 0.8, 1.1, 6, 32)]


def test_summary_orders_settings_and_takes_batched_over_baseline() -> None:
    summary = serve_report.summarize_serve(ROWS)
    assert [r["setting"] for r in summary["figures"]] == ["batched", "one-at-a-time"]
    q = summary["ratios"]
    assert q["requests_per_s"] == pytest.approx(1.6)  # 38.4 / 24.0
    assert q["completion_tokens_per_s"] == pytest.approx(1.6)  # 614.4 / 384.0
    assert q["p50_latency"] == pytest.approx(0.64)  # 0.8 / 1.25
    assert q["p99_latency"] == pytest.approx(0.55)  # 1.1 / 2.0


def test_ratios_are_absent_without_the_baseline() -> None:
    q = serve_report.summarize_serve(ROWS[1:])["ratios"]
    assert q == {"requests_per_s": None, "completion_tokens_per_s": None, "p50_latency": None, "p99_latency": None}
    text = serve_report.serve_tables({"runs": ROWS[1:]})
    assert "| requests/s | – |" in text


def test_markdown_tables() -> None:
    text = serve_report.serve_tables({"runs": ROWS})
    assert "- device: CPU (2 cores visible to the server and the clients alike); torch 2.13.0+cpu, triton 3.9.0" in text
    assert "dim 128, 4 layers, 4 heads (2 KV), context 512" in text
    assert "32 concurrent clients × 3 requests = 96 requests, max_tokens 16" in text
    assert "`pytest bench/test_serve_load.py --benchmark-only`" in text  # the method says which command measured
    header = next(line for line in text.splitlines() if line.startswith("| setting |"))
    for unit in ("wall s", "requests/s", "completion tokens/s", "p50 latency ms", "p99 latency ms", "failures"):
        assert f"| {unit} |" in header
    # 96 / 2.5 s = 38.40 req/s, 1536 / 2.5 = 614.4 tok/s, 800 / 1100 ms, 6 batches of 16.00, 1.60× the baseline
    assert (
        "| batched | `--batch-window-ms 15 --max-batch-size 32` | 32 × 3 | 2.50 | 38.40 | 614.4 | 800 | 1,100 | 6 | "
        "16.00 | 32 | 0 | 1.60× |" in text
    )
    assert (
        "| one-at-a-time (baseline) | `--batch-window-ms 0 --max-batch-size 1` | 32 × 3 | 4.00 | 24.00 | 384.0 | "
        "1,250 | 2,000 | 96 | 1.00 | 1 | 0 | 1.00× |" in text
    )
    assert "| requests/s | 1.60× | above 1: batching serves more requests |" in text
    assert "| completion tokens/s | 1.60× |" in text
    assert "| p50 latency | 0.64× | below 1: batching answers sooner |" in text
    assert "| p99 latency | 0.55× |" in text
    assert text.index("| batched |") < text.index("| one-at-a-time (baseline) |")
    assert serve_report.serve_tables(serve_report.summarize_serve(ROWS)) == text  # raw rows and summary alike


def test_report_renders_the_serve_kind(tmp_path: Path) -> None:
    results = tmp_path / ".results"
    results.mkdir()
    (results / "serve.json").write_text(json.dumps({"environment": ENV, "runs": ROWS}), encoding="utf-8")
    text = report.render(results)
    assert "## Serving (OpenAI-compatible server under load)" in text
    assert "- command: `pytest bench/test_serve_load.py --benchmark-only`" in text
    assert "- commit: `abc1234`" in text and "| batched |" in text
    assert not (tmp_path / "RESULTS.md").exists()


def test_report_names_a_file_in_the_old_format(tmp_path: Path) -> None:
    """The bench once wrote ``serve.json`` without its environment: the report says so instead of failing."""
    results = tmp_path / ".results"
    results.mkdir()
    (results / "serve.json").write_text(json.dumps({"runs": ROWS, "ratios": {}}), encoding="utf-8")
    text = report.render(results)
    assert "`serve.json` is in an older format" in text and "| batched |" not in text


# ---------------------------------------------------------------- merging a session's rows into a kind's file

LORA = {"case": "lora-step", "impl": "ours-lora", "ms": 10.0, "test": "bench/test_lora_step.py::test_lora[ours-lora]"}
DPO = {"case": "dpo-step", "impl": "ours", "ms": 20.0, "test": "bench/test_dpo_step.py::test_dpo[ours]"}
GRPO_OLD = {"case": "grpo-update", "impl": "ours", "ms": 30.0, "test": "bench/test_grpo_step.py::test_update[ours]"}
GRPO_NEW = {**GRPO_OLD, "ms": 25.0}
OLD_ENV = {**ENV, "date": "2024-12-31 00:00:00 UTC", "commit": "old0001", "command": "pytest bench/"}


def test_merge_keeps_the_rows_of_tests_that_did_not_run() -> None:
    previous = {"environment": OLD_ENV, "runs": [LORA, DPO, GRPO_OLD]}
    runs, earlier = report.merge_runs(previous, [GRPO_NEW])
    assert runs == [LORA, DPO, GRPO_NEW]  # the GRPO row replaced, LoRA and DPO kept
    assert earlier == [{"environment": OLD_ENV, "tests": [LORA["test"], DPO["test"]]}]


def test_merge_replaces_every_row_of_a_test_that_recorded_again() -> None:
    two = [{**LORA, "impl": "ours-full"}, LORA]
    runs, earlier = report.merge_runs({"environment": OLD_ENV, "runs": [*two, DPO]}, [{**LORA, "ms": 5.0}])
    assert runs == [DPO, {**LORA, "ms": 5.0}] and earlier == [{"environment": OLD_ENV, "tests": [DPO["test"]]}]
    runs, earlier = report.merge_runs({"environment": OLD_ENV, "runs": [LORA]}, [LORA, DPO])
    assert runs == [LORA, DPO] and earlier == []  # nothing kept: no earlier environment


def test_merge_matches_rows_without_a_test_id_by_case() -> None:
    """Rows written before rows carried their test id: the same ``case`` is the same measurement."""
    legacy = [{k: v for k, v in r.items() if k != "test"} for r in (LORA, DPO, GRPO_OLD)]
    runs, earlier = report.merge_runs({"environment": OLD_ENV, "runs": legacy}, [GRPO_NEW])
    assert runs == [legacy[0], legacy[1], GRPO_NEW]
    assert earlier[0]["tests"] == ["case lora-step (no test id recorded)", "case dpo-step (no test id recorded)"]


def test_merge_carries_older_environments_of_rows_kept_twice() -> None:
    older = {**OLD_ENV, "date": "2024-06-01 00:00:00 UTC", "commit": "older01"}
    previous = {
        "environment": OLD_ENV,
        "earlier": [{"environment": older, "tests": [LORA["test"], "bench/test_gone.py::test_x"]}],
        "runs": [LORA, DPO, GRPO_OLD],
    }
    runs, earlier = report.merge_runs(previous, [GRPO_NEW])
    assert runs == [LORA, DPO, GRPO_NEW]
    # DPO was measured by the previous session, LoRA by the one before it; a test with no row left is dropped
    assert earlier == [
        {"environment": OLD_ENV, "tests": [DPO["test"]]},
        {"environment": older, "tests": [LORA["test"]]},
    ]


@pytest.mark.parametrize("previous", [None, {}, {"runs": [LORA]}, {"device": "cpu", "rows": {"fp32": {}}}])
def test_merge_ignores_a_missing_or_old_format_file(previous: Any) -> None:
    assert report.merge_runs(previous, [GRPO_NEW]) == ([GRPO_NEW], [])


def test_report_lists_rows_kept_from_an_earlier_run(tmp_path: Path) -> None:
    results = tmp_path / ".results"
    results.mkdir()
    runs, earlier = report.merge_runs({"environment": OLD_ENV, "runs": ROWS[:1]}, ROWS[1:])
    data = {"environment": ENV, "earlier": earlier, "runs": runs}
    (results / "serve.json").write_text(json.dumps(data), encoding="utf-8")
    text = report.render(results)
    assert (
        "- kept from an earlier run (not re-measured by the run above): "
        "`bench/test_serve_load.py::test_serve_load[one-at-a-time]` — measured 2024-12-31 00:00:00 UTC, commit "
        "`old0001`, 2 cores, command `pytest bench/`" in text
    )
    assert "| batched |" in text and "| one-at-a-time (baseline) |" in text
    assert "**The two settings were measured in different runs**" in text  # the ratios cross runs: said so
    assert serve_report.summarize_serve(runs, earlier)["mixed_runs"] is True
    assert serve_report.summarize_serve(runs)["mixed_runs"] is False  # without ``earlier`` every row is this run's
    assert "measured in different runs" not in serve_report.serve_tables({"runs": ROWS})


def _bench_conftest() -> Any:
    """``bench/conftest.py`` imported under another name (``tests/conftest.py`` holds the name ``conftest``)."""
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_session_end_stamps_test_ids_and_merges_into_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running only the GRPO bench leaves the LoRA and DPO rows of ``finetune.json`` in place."""
    pytest.importorskip("numpy")
    pytest.importorskip("sentencepiece")
    bench = _bench_conftest()
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    (tmp_path / "finetune.json").write_text(
        json.dumps({"environment": OLD_ENV, "runs": [LORA, DPO, GRPO_OLD]}), encoding="utf-8"
    )
    recorder = bench._RECORDER = bench.Recorder()  # what the ``recorder`` fixture makes (not callable directly)
    for kind in bench.KINDS:
        recorder.rows.setdefault(kind, [])
    # a test runs: what it records while it runs is stamped with its id
    item = SimpleNamespace(nodeid=GRPO_OLD["test"])
    protocol = bench.pytest_runtest_protocol(item, None)
    next(protocol)
    recorder.add("finetune", {k: v for k, v in GRPO_NEW.items() if k != "test"})
    with pytest.raises(StopIteration):
        protocol.send(None)
    assert recorder.rows["finetune"][0]["test"] == GRPO_OLD["test"]
    bench.pytest_sessionfinish(None, 0)
    written = json.loads((tmp_path / "finetune.json").read_text(encoding="utf-8"))
    assert [(r["case"], r["ms"]) for r in written["runs"]] == [
        ("lora-step", 10.0),
        ("dpo-step", 20.0),
        ("grpo-update", 25.0),
    ]
    assert written["earlier"] == [{"environment": OLD_ENV, "tests": [LORA["test"], DPO["test"]]}]
    assert [r["impl"] for r in written["lora"]] == ["ours-lora"] and written["grpo"][0]["ms"] == 25.0  # summarised
    assert written["environment"]["commit"] == recorder.started["commit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune.json"]  # no other kind recorded, none written
