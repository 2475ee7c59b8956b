"""Tokenize + pack throughput and peak memory: our packer against seed 004's method and SentencePiece's ceiling.

Each method runs as a fresh process per round, in the same session, on the Tang corpus read ×1,
×4 and ×8, with two tokenizers (ChatGLM's SentencePiece model and a 16k one trained by the engine):

- ``ours``: ``python -m engine.prepare`` on every core, timed whole (start-up, reading, cleaning,
  encoding, packing, writing);
- ``baseline``: ``bench/baseline_seed004.py`` (per-document encode into one Python list), timed whole;
- ``ceiling``: ``bench/ceiling_sentencepiece.py``, only its in-memory ``encode(list, num_threads)``
  call is timed (it reports that time itself).

Throughput is UTF-8 text megabytes (the documents as built from title and paragraphs) per second;
peak RSS is summed over the process tree. Ratios are printed and saved at the end of the session.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from benchlib import BENCH, PYTHON, REPO, Recorder, rounds
from peak_rss import ProcessRun, run_measured

SCALES = (1, 4, 8)
TOKENIZERS = ("chatglm", "engine16k")
METHODS = ("baseline", "ours", "ceiling")  # run next to each other for each scale: same machine load
CASES = [(tok, scale, method) for tok in TOKENIZERS for scale in SCALES for method in METHODS]


def command(method: str, folders: list[Path], engine_tokenizer: Path, sp_model: Path, out: Path) -> list[str]:
    if method == "ours":
        sources = [arg for folder in folders for arg in ("--source", str(folder))]
        return [
            PYTHON,
            "-m",
            "engine.prepare",
            *sources,
            "--template",
            "{title}\\n{paragraphs}",
            "--tokenizer",
            str(engine_tokenizer),
            "--out",
            str(out / "ours"),
            "--no-dedup",
            "--no-progress",
            "--overwrite",
        ]
    if method == "baseline":
        return [
            PYTHON,
            str(BENCH / "baseline_seed004.py"),
            "--tokenizer",
            str(sp_model),
            "--out",
            str(out / "baseline.bin"),
            *map(str, folders),
        ]
    if method == "ceiling":
        return [PYTHON, str(BENCH / "ceiling_sentencepiece.py"), "--tokenizer", str(sp_model), *map(str, folders)]
    raise ValueError(method)


def output_counts(method: str, run: ProcessRun, out: Path) -> dict[str, Any]:
    """Documents and tokens the method produced (to check the methods did the same work)."""
    if method == "ours":
        meta = json.loads((out / "ours.meta.json").read_text(encoding="utf-8"))
        return {"docs": meta["n_docs"], "tokens": meta["n_tokens"], "dropped": meta.get("dropped", {})}
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return {"docs": report["docs"], "tokens": report["tokens"], "script_seconds": report["seconds"]}


@pytest.mark.parametrize(("tokenizer", "scale", "method"), CASES, ids=[f"{t}-x{s}-{m}" for t, s, m in CASES])
def test_pack_throughput(
    benchmark: Any,
    recorder: Recorder,
    tokenizers: Any,
    tang_copies: Any,
    tang_text_bytes: int,
    warm_imports: None,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tokenizer: str,
    scale: int,
    method: str,
) -> None:
    if method == "ours":
        request.getfixturevalue("engine_prepare")
    engine_tokenizer, sp_model = tokenizers(tokenizer)
    folders = tang_copies(scale)
    cmd = command(method, folders, engine_tokenizer, sp_model, tmp_path)
    runs: list[ProcessRun] = []

    def once() -> None:
        runs.append(run_measured(cmd, cwd=str(REPO)).check(" ".join(cmd[:4])))

    n_rounds = rounds()
    benchmark.group = f"pack {tokenizer} x{scale}"
    benchmark.pedantic(once, rounds=n_rounds, iterations=1, warmup_rounds=0)
    if benchmark.disabled:  # --benchmark-disable: a smoke run; keep the saved results of a real one
        return

    text_bytes = tang_text_bytes * scale
    counts = output_counts(method, runs[-1], tmp_path)
    if method == "ceiling":  # only the encode call counts, as the script timed it
        seconds = [json.loads(r.stdout.strip().splitlines()[-1])["seconds"] for r in runs]
        reported = json.loads(runs[-1].stdout.strip().splitlines()[-1])
        assert reported["text_bytes"] == text_bytes, "the ceiling script built different documents"
    else:
        seconds = [r.seconds for r in runs]
    row = {
        "method": method,
        "tokenizer": tokenizer,
        "scale": scale,
        "text_bytes": text_bytes,
        "seconds": seconds,
        "peak_rss_mb": [r.peak_rss_mb for r in runs],
        "processes": max(r.peak_processes for r in runs),
        "rss_samples": [r.samples for r in runs],
        "process_seconds": [r.seconds for r in runs],
        **counts,
    }
    recorder.add("pack", row)
    benchmark.extra_info.update(
        {
            "mb_per_s": round(text_bytes / 1e6 / statistics.median(seconds), 2),
            "peak_rss_mb": round(max(row["peak_rss_mb"]), 1),
            "text_mb": round(text_bytes / 1e6, 2),
            "tokens": counts["tokens"],
            "docs": counts["docs"],
        }
    )
