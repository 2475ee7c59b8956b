"""Turn the saved benchmark results (``bench/.results/*.json``) into markdown tables.

    python bench/report.py                      # print RESULTS.md to stdout
    python bench/report.py --out bench/RESULTS.md

Every number printed comes from a run recorded by ``pytest bench/ --benchmark-only``; this module
only computes medians and ratios from them. The benchmark session imports the same functions to
print its closing table, so the terminal and RESULTS.md never disagree.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / ".results"

# Targets (docs/data README): compared and reported, never asserted.
TARGET_SCALE = 4
TARGET_VS_BASELINE = 1.5  # ours ≥ 1.5× the baseline's whole-process throughput at ×4
TARGET_VS_CEILING = 0.75  # ours ≥ 75% of the tokenizer's in-memory ceiling at ×4
TARGET_RSS_MB = 300.0  # ours' peak tree RSS at every scale
TARGET_FLAT = 1.2  # "flat": peak RSS at the largest scale ≤ 1.2× the smallest
TARGET_LOADER_TOKENS_PER_S = 50e6

PACK_METHOD = (
    "Each round is a fresh process. *ours*: `python -m engine.prepare` on every core (`--no-dedup`), timed whole; "
    "*baseline*: `bench/baseline_seed004.py` (seed 004's per-document encode into one Python list), timed whole; "
    "*ceiling*: `bench/ceiling_sentencepiece.py`, only its in-memory `encode(texts, num_threads=cores)` call "
    "(reading is not timed). MB/s = UTF-8 MB of document text (title + paragraphs, the same for every method) "
    "/ median seconds. Peak RSS = the largest sum of RSS over the process tree (main + workers, polled every "
    "20 ms; pages shared after fork count once per process), max over rounds. Scale ×k = the corpus read from k "
    "distinct folders of hard links. *tokens written* differs between ours and the others by what the engine "
    "does differently (its SentencePiece loader turns off the dummy prefix; its cleaner normalizes whitespace)."
)

METHOD_ORDER = {"baseline": 0, "ours": 1, "ceiling": 2}


# ---------------------------------------------------------------- summaries


def pack_figures(run: dict[str, Any]) -> dict[str, Any]:
    """Median seconds, MB/s and the worst peak RSS of one (method, scale, tokenizer) benchmark."""
    seconds = statistics.median(run["seconds"])
    return {
        "method": run["method"],
        "tokenizer": run["tokenizer"],
        "scale": run["scale"],
        "text_mb": run["text_bytes"] / 1e6,
        "seconds": seconds,
        "seconds_min": min(run["seconds"]),
        "seconds_max": max(run["seconds"]),
        "mb_per_s": run["text_bytes"] / 1e6 / seconds,
        "peak_rss_mb": max(run["peak_rss_mb"]),
        "rounds": len(run["seconds"]),
        "tokens": run.get("tokens"),
        "processes": run.get("processes"),
    }


def summarize_pack(runs: list[dict[str, Any]]) -> dict[str, Any]:
    figures = sorted(
        (pack_figures(r) for r in runs), key=lambda f: (f["tokenizer"], f["scale"], METHOD_ORDER.get(f["method"], 9))
    )
    by_key = {(f["tokenizer"], f["scale"], f["method"]): f for f in figures}
    ratios = []
    for tokenizer, scale in sorted({(f["tokenizer"], f["scale"]) for f in figures}):
        ours, base, ceil = (by_key.get((tokenizer, scale, m)) for m in ("ours", "baseline", "ceiling"))
        ratios.append(
            {
                "tokenizer": tokenizer,
                "scale": scale,
                "ours_vs_baseline": ours["mb_per_s"] / base["mb_per_s"] if ours and base else None,
                "ours_vs_ceiling": ours["mb_per_s"] / ceil["mb_per_s"] if ours and ceil else None,
                "baseline_vs_ceiling": base["mb_per_s"] / ceil["mb_per_s"] if base and ceil else None,
                "ours_rss_vs_baseline": ours["peak_rss_mb"] / base["peak_rss_mb"] if ours and base else None,
            }
        )
    return {"figures": figures, "ratios": ratios, "targets": pack_targets(figures, ratios)}


def pack_targets(figures: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per target and tokenizer: what was asked, what was measured, met or not."""
    out = []
    for tokenizer in sorted({f["tokenizer"] for f in figures}):
        at = next((r for r in ratios if r["tokenizer"] == tokenizer and r["scale"] == TARGET_SCALE), None)
        if at and at["ours_vs_baseline"] is not None:
            out.append(
                {
                    "tokenizer": tokenizer,
                    "target": f"×{TARGET_SCALE}: ≥ {TARGET_VS_BASELINE}× the baseline's MB/s",
                    "measured": f"{at['ours_vs_baseline']:.2f}×",
                    "met": at["ours_vs_baseline"] >= TARGET_VS_BASELINE,
                }
            )
        if at and at["ours_vs_ceiling"] is not None:
            out.append(
                {
                    "tokenizer": tokenizer,
                    "target": f"×{TARGET_SCALE}: ≥ {TARGET_VS_CEILING:.0%} of the ceiling",
                    "measured": f"{at['ours_vs_ceiling']:.0%}",
                    "met": at["ours_vs_ceiling"] >= TARGET_VS_CEILING,
                }
            )
        ours = sorted(
            (f for f in figures if f["tokenizer"] == tokenizer and f["method"] == "ours"), key=lambda f: f["scale"]
        )
        if ours:
            worst = max(f["peak_rss_mb"] for f in ours)
            out.append(
                {
                    "tokenizer": tokenizer,
                    "target": f"peak RSS < {TARGET_RSS_MB:.0f} MB at every scale",
                    "measured": f"max {worst:.0f} MB",
                    "met": worst < TARGET_RSS_MB,
                }
            )
        if len(ours) > 1:
            growth = ours[-1]["peak_rss_mb"] / ours[0]["peak_rss_mb"]
            out.append(
                {
                    "tokenizer": tokenizer,
                    "target": f"peak RSS flat ×{ours[0]['scale']}→×{ours[-1]['scale']} (≤ {TARGET_FLAT}×)",
                    "measured": f"{ours[0]['peak_rss_mb']:.0f} → {ours[-1]['peak_rss_mb']:.0f} MB ({growth:.2f}×)",
                    "met": growth <= TARGET_FLAT,
                }
            )
    return out


def loader_figures(run: dict[str, Any]) -> dict[str, Any]:
    seconds = run["median_seconds"]
    tokens = run["batch_size"] * run["seq_len"]
    return {
        "method": run["method"],
        "batch_size": run["batch_size"],
        "seq_len": run["seq_len"],
        "median_us": seconds * 1e6,
        "tokens_per_s": tokens / seconds,
        "rounds": run.get("rounds"),
    }


def summarize_loader(runs: list[dict[str, Any]]) -> dict[str, Any]:
    figures = sorted(
        (loader_figures(r) for r in runs),
        key=lambda f: (f["seq_len"], f["batch_size"], METHOD_ORDER.get(f["method"], 9)),
    )
    by_key = {(f["batch_size"], f["seq_len"], f["method"]): f for f in figures}
    ratios, targets = [], []
    for batch, seq in sorted({(f["batch_size"], f["seq_len"]) for f in figures}, key=lambda k: (k[1], k[0])):
        ours, base = by_key.get((batch, seq, "ours")), by_key.get((batch, seq, "baseline"))
        ratios.append(
            {
                "batch_size": batch,
                "seq_len": seq,
                "ours_vs_baseline": ours["tokens_per_s"] / base["tokens_per_s"] if ours and base else None,
            }
        )
        if ours:
            targets.append(
                {
                    "target": f"{batch}×{seq}: ≥ {TARGET_LOADER_TOKENS_PER_S / 1e6:.0f} M tokens/s",
                    "measured": f"{ours['tokens_per_s'] / 1e6:.0f} M tokens/s",
                    "met": ours["tokens_per_s"] >= TARGET_LOADER_TOKENS_PER_S,
                }
            )
    return {"figures": figures, "ratios": ratios, "targets": targets}


# ---------------------------------------------------------------- markdown


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` (and ``suffix``), or an en dash when there is none: every report's cells."""
    return "–" if value is None else format(value, spec) + suffix


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: every report's tables."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _targets_table(targets: list[dict[str, Any]], with_tokenizer: bool) -> str:
    if not targets:
        return "(no target could be checked: our method did not run)"
    header = (["tokenizer"] if with_tokenizer else []) + ["target", "measured", "met"]
    rows = [
        ([t["tokenizer"]] if with_tokenizer else []) + [t["target"], t["measured"], "yes" if t["met"] else "**no**"]
        for t in targets
    ]
    return markdown_table(header, rows)


def pack_tables(summary: dict[str, Any]) -> str:
    summary = summarize_pack(summary["runs"]) if "runs" in summary else summary
    ratio = {(r["tokenizer"], r["scale"]): r for r in summary["ratios"]}
    rows = []
    for f in summary["figures"]:
        r = ratio[(f["tokenizer"], f["scale"])]
        vs_base = r["ours_vs_baseline"] if f["method"] == "ours" else (1.0 if f["method"] == "baseline" else None)
        share = {"ours": r["ours_vs_ceiling"], "baseline": r["baseline_vs_ceiling"], "ceiling": 1.0}.get(f["method"])
        rows.append(
            [
                f["method"],
                f["tokenizer"],
                f"×{f['scale']}",
                f"{f['text_mb']:.1f}",
                f"{f['seconds']:.2f}" + (" (encode only)" if f["method"] == "ceiling" else ""),
                f"{f['seconds_min']:.2f}–{f['seconds_max']:.2f}",
                f"{f['mb_per_s']:.1f}",
                f"{f['peak_rss_mb']:.0f}",
                f"{f['tokens']:,}" if f["tokens"] else "–",
                fmt(vs_base, ".2f"),
                fmt(None if share is None else share * 100, ".0f") + ("%" if share is not None else ""),
                str(f["rounds"]),
            ]
        )
    header = [
        "method",
        "tokenizer",
        "scale",
        "text MB",
        "seconds (median)",
        "min–max",
        "MB/s (median)",
        "peak RSS MB (tree, max)",
        "tokens written",
        "× baseline",
        "share of ceiling",
        "rounds",
    ]
    return "\n\n".join(
        [
            "### Tokenize + pack throughput (Tang corpus)",
            PACK_METHOD,
            markdown_table(header, rows),
            "### Targets",
            _targets_table(summary["targets"], with_tokenizer=True),
        ]
    )


def loader_tables(summary: dict[str, Any]) -> str:
    summary = summarize_loader(summary["runs"]) if "runs" in summary else summary
    ratio = {(r["batch_size"], r["seq_len"]): r["ours_vs_baseline"] for r in summary["ratios"]}
    rows = [
        [
            f["method"],
            f"{f['batch_size']} × {f['seq_len']}",
            f"{f['median_us']:.0f}",
            f"{f['tokens_per_s'] / 1e6:.1f}",
            fmt(ratio[(f["batch_size"], f["seq_len"])] if f["method"] == "ours" else 1.0, ".1f"),
        ]
        for f in summary["figures"]
    ]
    header = ["method", "batch × seq", "µs per batch (median)", "M tokens/s", "× baseline"]
    return "\n\n".join(
        [
            "### Loader throughput (random windows, input tokens served)",
            markdown_table(header, rows),
            _targets_table(summary["targets"], with_tokenizer=False),
        ]
    )


def profile_tables(profile: dict[str, Any]) -> str:
    header = ["stage", "seconds", "share"]
    total = profile["total_seconds"]
    rows = [[s["stage"], f"{s['seconds']:.2f}", f"{s['seconds'] / total:.0%}"] for s in profile["stages"]]
    functions = [[f["function"], f"{f['cumulative']:.2f}", f"{f['own']:.2f}", str(f["calls"])] for f in profile["top"]]
    cpu = ""
    if "main_cpu_seconds" in profile:
        cpu = (
            f"Wall {total:.2f} s under cProfile; CPU: main process {profile['main_cpu_seconds']:.2f} s, "
            f"worker processes {profile['children_cpu_seconds']:.2f} s. Stages are cProfile own time of the main "
            f"process."
        )
    return "\n\n".join(
        [
            f"### Where the packer's time goes ({profile['what']})",
            cpu,
            markdown_table(header, rows),
            markdown_table(["function", "cumulative s", "own s", "calls"], functions),
        ]
    )


def stage_tables(stages: dict[str, Any], cpu: dict[str, Any]) -> str:
    rows = [[s["stage"], f"{s['seconds']:.3f}"] for s in stages["stages"]]
    workers = ", ".join(f"{c:.2f}" for c in cpu["worker_cpu_seconds"])
    return "\n\n".join(
        [
            f"### Stage timings, single process, no profiler ({stages['documents']:,} documents in "
            f"{stages['batches']} batches; "
            "fastest of 3 runs of each stage)",
            markdown_table(["stage", "seconds"], rows),
            f"Batches pickled to the workers: {stages['pickled_out_mb']:.1f} MB; results pickled back: "
            f"{stages['pickled_back_mb']:.1f} MB, of which token arrays {stages['result_token_mb']:.1f} MB as "
            f"{stages['result_token_dtype']} (the file stores {stages['final_dtype']}).",
            f"### CPU per process ({cpu['what']})",
            f"Wall {cpu['wall_seconds']:.2f} s; main process {cpu['main_cpu_seconds']:.2f} CPU s; workers {workers} "
            f"CPU s "
            f"({cpu['note']}).",
        ]
    )


def environment_lines(env: dict[str, Any]) -> str:
    uncommitted = [f for f in env.get("uncommitted", []) if not f.startswith("bench/")]
    dirty = f" plus uncommitted engine/llama/zhkernels files: {', '.join(uncommitted)}" if uncommitted else ""
    if env.get("tracked_changes") and not uncommitted:
        dirty = " (with uncommitted changes)"
    return "\n".join(
        [
            f"- machine: {env['cores']} cores, {env['cpu']}, {env['memory_gb']} GiB RAM; shared with other jobs "
            f"(load average {env['load_average'][0]:.1f} at start, "
            f"{env.get('load_average_end', [float('nan')])[0]:.1f} at end)",
            f"- date: {env['date']}",
            f"- commit: `{env['commit']}`{dirty}",
            f"- Python {env['python']}, numpy {env['numpy']}, sentencepiece {env['sentencepiece']}",
            f"- command: `{env['command']}`",
        ]
    )


# ---------------------------------------------------------------- merging a session's rows into a kind's file


def row_label(row: dict[str, Any]) -> str:
    """What produced a row: its test id (``bench/conftest.py`` stamps it), or, for a row written before rows carried
    one, its ``case``."""
    return row.get("test") or f"case {row.get('case')} (no test id recorded)"


def run_of(row: dict[str, Any], earlier: list[dict[str, Any]] | None) -> int:
    """Which run measured ``row``: 0 for the run that wrote the file, i for its ``earlier`` entry i − 1."""
    label = row_label(row)
    return next((i + 1 for i, entry in enumerate(earlier or []) if label in entry.get("tests", [])), 0)


def merge_runs(previous: dict[str, Any] | None, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list]:
    """One kind's rows for its results file: this session's ``rows`` plus the previous file's rows that no test of
    this session re-measured, and where those kept rows came from.

    A previous row is replaced when a row of this session has the same ``test`` id (a row without one, written
    before rows carried it, when a row of this session has the same ``case``); every other previous row is kept, so
    running one bench file leaves the rows of the kind's other files in place. A test that ran but recorded nothing
    (skipped, failed) replaces nothing. A previous file without ``environment`` and ``runs`` (another format) is
    ignored. Returns ``(runs, earlier)``: ``earlier`` lists ``{"environment": …, "tests": [labels]}`` for the kept
    rows, one entry per session they were measured in (carried over from the previous file's own ``earlier``).
    """
    if not previous or not isinstance(previous.get("runs"), list) or not isinstance(previous.get("environment"), dict):
        return list(rows), []
    tests = {r["test"] for r in rows if r.get("test")}
    cases = {r.get("case") for r in rows}

    def replaced(old: dict[str, Any]) -> bool:
        return old["test"] in tests if old.get("test") else old.get("case") in cases

    kept = [r for r in previous["runs"] if not replaced(r)]
    labels = list(dict.fromkeys(row_label(r) for r in kept))
    earlier, placed = [], set()
    for entry in previous.get("earlier") or []:
        mine = [t for t in entry.get("tests", []) if t in labels and t not in placed]
        if mine:
            earlier.append({"environment": entry["environment"], "tests": mine})
            placed.update(mine)
    own = [t for t in labels if t not in placed]
    if own:
        earlier.insert(0, {"environment": previous["environment"], "tests": own})
    return kept + list(rows), earlier


def earlier_lines(earlier: list[dict[str, Any]]) -> str:
    """Header lines naming the rows kept from earlier sessions, with their date, commit and command."""
    lines = []
    for entry in earlier:
        env = entry["environment"]
        dirty = [f for f in env.get("uncommitted", []) if not f.startswith("bench/")]
        tests = ", ".join(f"`{t}`" for t in entry["tests"])
        lines.append(
            f"- kept from an earlier run (not re-measured by the run above): {tests} — measured "
            f"{env.get('date', '?')}, commit `{env.get('commit', '?')}`"
            f"{' (with uncommitted engine/llama/zhkernels changes)' if dirty else ''}, "
            f"{env.get('cores', '?')} cores, "
            f"command `{env.get('command', '?')}`"
        )
    return "\n".join(lines)


def _tables_from(module: str, function: str) -> Any:
    """``module.function``, a report module beside this file, imported only when its kind of results is rendered."""

    def tables(summary: dict[str, Any]) -> str:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        return getattr(importlib.import_module(module), function)(summary)

    return tables


_kernel_tables = _tables_from("kernel_report", "kernel_tables")
_train_tables = _tables_from("train_report", "train_tables")
_generate_tables = _tables_from("generate_report", "generate_tables")
_finetune_tables = _tables_from("finetune_report", "finetune_tables")
_serve_tables = _tables_from("serve_report", "serve_tables")
_quant_tables = _tables_from("quant_report", "quant_tables")


def render(results_dir: Path) -> str:
    notes = results_dir.parent / "NOTES.md"
    source = f"`{results_dir.name}/*.json`" + (" and `NOTES.md` (the last section)" if notes.is_file() else "")
    parts = [
        "# Benchmark results",
        "",
        f"Generated by `python bench/report.py --out bench/RESULTS.md` from {source}; do not edit by hand.",
        "",
    ]
    found = False
    kinds = (
        ("pack", "Tokenize + pack", pack_tables),
        ("loader", "Loader", loader_tables),
        ("kernels", "Kernels", _kernel_tables),
        ("train", "Training step", _train_tables),
        ("generate", "Generation", _generate_tables),
        ("finetune", "Fine-tuning steps", _finetune_tables),
        ("serve", "Serving (OpenAI-compatible server under load)", _serve_tables),
        ("quant", "Weight-only quantisation", _quant_tables),
    )
    for kind, title, tables in kinds:
        path = results_dir / f"{kind}.json"
        if not path.is_file():
            continue
        found = True
        data = json.loads(path.read_text(encoding="utf-8"))
        if "environment" not in data or "runs" not in data:
            parts += [
                f"## {title}",
                "",
                f"(`{path.name}` is in an older format, without its environment: rerun its bench to record it again)",
                "",
            ]
            continue
        header = environment_lines(data["environment"])
        if data.get("earlier"):
            header += "\n" + earlier_lines(data["earlier"])
        parts += [f"## {title}", "", header, "", tables(data), ""]
    profile = results_dir / "profile.json"
    if profile.is_file():
        found = True
        data = json.loads(profile.read_text(encoding="utf-8"))
        parts += [
            "## Profile",
            "",
            f"- command: `{data['command']}`",
            f"- date: {data['date']}, commit `{data['environment']['commit']}`",
            "",
        ]
        if "stage_timings" in data:
            parts += [stage_tables(data["stage_timings"], data["process_cpu"]) + "\n"]
        parts += [profile_tables(p) + "\n" for p in data["profiles"]]
    if notes.is_file():
        parts += [notes.read_text(encoding="utf-8").rstrip(), ""]
    if not found:
        raise SystemExit(f"no results in {results_dir}: run `pytest bench/ --benchmark-only` first")
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description="Render bench/.results/*.json as markdown (RESULTS.md).")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="folder of pack/loader/kernels/train/generate/finetune/serve/quant/profile.json",
    )
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    args = parser.parse_args()
    text = render(args.results)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
