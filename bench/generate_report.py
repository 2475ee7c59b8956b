"""Turn the generation benchmark rows (``bench/.results/generate.json``) into markdown: figures, ratios, CPU figures.

Rows come from ``bench/test_generate_speed.py`` (``case``: ``generate`` on a GPU, ``cpu-generate`` on CPU);
this module only sorts them and takes ratios, so the terminal summary and ``RESULTS.md``
(``bench/report.py``) print the same numbers. Torch-free. There is no generation target to check:
the ratios are reported as measured.
"""

from __future__ import annotations

from typing import Any

from report import fmt, markdown_table

IMPL_ORDER = ["triton", "torch", "hf", "hf-static"]
IMPL_NAMES = {
    "triton": "ours (Triton kernels)",
    "torch": "ours (torch ops, SDPA)",
    "hf": "transformers + SDPA, DynamicCache",
    "hf-static": "transformers + SDPA, static cache",
}
OURS = ("triton", "torch")
PRESET_ORDER = ["seed003-92m", "minimind-26m", "seed000-160m", "tiny"]
PRECISION_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}

METHOD = (
    "Same weights (our `Llama` from a fixed seed; `transformers.LlamaForCausalLM(LlamaConfig(**config.to_hf_config()), "
    'attn_implementation="sdpa")` loads its `state_dict`, as `llama.export` writes it; both cast to the precision, '
    "RoPE tables float32), same device, same random prompt ids (no padding), greedy, exactly the same number of new "
    "tokens: *ours* = `llama.generation.generate.generate(model, prompts, n)` with no stop ids; *HF* = "
    "`model.generate(ids, "
    "attention_mask, generation_config=GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n))` with "
    'no EOS id in the model\'s generation config, its default DynamicCache, or `cache_implementation="static"` '
    "(which transformers compiles with `torch.compile` on CUDA by default; the warm-up pays for it). Every row "
    "returned exactly n tokens (asserted). Both are timed the same way, whole public calls (CUDA events after a "
    "synchronisation): *prefill* = the call with `max_new_tokens=1` (setup, the prompt forward that fills the cache, "
    "the first token); *decode* = the call with n tokens − the prefill call (medians), i.e. the n − 1 one-token "
    "steps. Prefill tokens/s = batch × prompt ÷ prefill time; decode tokens/s = batch × (n − 1) ÷ decode time. "
    "*Forward-only prefill* = one bare model forward over the prompts with a fresh cache and the last position's "
    "logits, without either generate's setup (not for the static cache). *generate's own* = the throughputs ours "
    "reports in `GenerationResult` (its internal clock). × HF = ours' tokens/s ÷ HF's (DynamicCache) at the same "
    "preset, precision and batch (above 1: ours is faster). *Greedy = HF for* = leading new tokens equal to HF's "
    "(DynamicCache) in every row; bf16/fp16 may part where two logits are within rounding, fp32 must not. A fresh "
    'random model soon repeats a few tokens, so this says "same weights, same algorithm", no more.'
)


# ---------------------------------------------------------------- summaries


def _index(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def _group_key(r: dict[str, Any]) -> tuple:
    return (r["preset"], r["precision"], r["batch"], r["prompt_len"], r["new_tokens"])


def _sort_key(r: dict[str, Any]) -> tuple:
    return (
        _index(PRESET_ORDER, r["preset"]),
        PRECISION_ORDER.get(r["precision"], 9),
        r["prompt_len"],
        r["batch"],
        _index(IMPL_ORDER, r["impl"]),
    )


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def match(rows: dict[str, dict[str, Any]], impl: str, other: str) -> int | None:
    """Leading new tokens ``impl`` and ``other`` share (fewest over rows), from whichever row recorded it."""
    for a, b in ((impl, other), (other, impl)):
        found = (rows.get(a) or {}).get("matches", {}).get(b)
        if found is not None:
            return found
    return None


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (preset, precision, batch, lengths): each of ours' prefill and decode tokens/s over HF's, and token
    matches."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), {})[r["impl"]] = r
    out = []
    for (preset, precision, batch, prompt_len, new_tokens), impls in groups.items():
        entry: dict[str, Any] = {
            "preset": preset,
            "precision": precision,
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
        }
        for ours in OURS:
            for theirs, suffix in (("hf", "hf"), ("hf-static", "hf_static")):
                for phase in ("prefill", "decode", "forward"):
                    entry[f"{ours}_{phase}_vs_{suffix}"] = _ratio(
                        impls.get(ours), impls.get(theirs), f"{phase}_tokens_per_s"
                    )
        entry["matches_hf"] = {impl: match(impls, impl, "hf") for impl in impls if impl != "hf"}
        out.append(entry)
    return out


def device_info(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        for k in ("device", "torch", "cuda", "triton", "transformers"):
            if out.get(k) is None:
                out[k] = r.get(k)
    return out


def summarize_generate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GPU figures in report order, their ratios, CPU figures and theirs, and the GPU's library versions."""
    figures = sorted((r for r in rows if r.get("case") == "generate"), key=_sort_key)
    cpu = sorted((r for r in rows if r.get("case") == "cpu-generate"), key=_sort_key)
    return {
        "device": device_info(figures),
        "figures": figures,
        "comparisons": compare(figures),
        "cpu": cpu,
        "cpu_comparisons": compare(cpu),
    }


# ---------------------------------------------------------------- markdown


def _match_cell(r: dict[str, Any], comparison: dict[str, Any]) -> str:
    if r["impl"] == "hf":
        return "(reference)"
    found = comparison["matches_hf"].get(r["impl"])
    return "–" if found is None else f"{found} of {r['new_tokens']}"


def figure_table(figures: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    """One row per measured case: prefill, forward-only prefill, decode, generate's own figures, × HF, greedy match."""
    by_group = {(c["preset"], c["precision"], c["batch"], c["prompt_len"], c["new_tokens"]): c for c in comparisons}
    rows = []
    for r in figures:
        c = by_group[_group_key(r)]
        ours = r["impl"] in OURS
        own = (
            "–"
            if r.get("own_decode_tokens_per_s") is None
            else (f"{r['own_prefill_tokens_per_s']:,.0f} / {r['own_decode_tokens_per_s']:,.0f}")
        )
        rows.append(
            [
                r["preset"],
                f"{r['vocab']:,}",
                r["precision"],
                str(r["batch"]),
                f"{r['prompt_len']} + {r['new_tokens']}",
                IMPL_NAMES.get(r["impl"], r["impl"]),
                f"{r['prefill_ms']:.2f}",
                f"{r['prefill_tokens_per_s']:,.0f}",
                fmt(r.get("forward_tokens_per_s"), ",.0f"),
                f"{r['decode_ms_per_step']:.2f}",
                fmt(r.get("decode_tokens_per_s"), ",.0f"),
                own,
                fmt(c[f"{r['impl']}_prefill_vs_hf"] if ours else None, ".2f", "×"),
                fmt(c[f"{r['impl']}_decode_vs_hf"] if ours else None, ".2f", "×"),
                _match_cell(r, c),
            ]
        )
    header = [
        "preset",
        "vocab",
        "precision",
        "batch",
        "prompt + new",
        "implementation",
        "prefill ms",
        "prefill tok/s",
        "forward-only prefill tok/s",
        "decode ms/step",
        "decode tok/s",
        "generate's own prefill / decode tok/s",
        "prefill × HF",
        "decode × HF",
        "greedy = HF for",
    ]
    return markdown_table(header, rows)


def ratio_table(comparisons: list[dict[str, Any]]) -> str:
    """Ours ÷ HF per group: prefill and decode, against the DynamicCache and the static cache."""
    ordered = sorted(
        comparisons,
        key=lambda c: (
            _index(PRESET_ORDER, c["preset"]),
            PRECISION_ORDER.get(c["precision"], 9),
            c["prompt_len"],
            c["batch"],
        ),
    )
    rows = [
        [
            c["preset"],
            c["precision"],
            str(c["batch"]),
            fmt(c["triton_prefill_vs_hf"], ".2f", "×"),
            fmt(c["triton_decode_vs_hf"], ".2f", "×"),
            fmt(c["triton_prefill_vs_hf_static"], ".2f", "×"),
            fmt(c["triton_decode_vs_hf_static"], ".2f", "×"),
            fmt(c["torch_prefill_vs_hf"], ".2f", "×"),
            fmt(c["torch_decode_vs_hf"], ".2f", "×"),
        ]
        for c in ordered
    ]
    header = [
        "preset",
        "precision",
        "batch",
        "Triton ÷ HF prefill",
        "Triton ÷ HF decode",
        "Triton ÷ HF-static prefill",
        "Triton ÷ HF-static decode",
        "torch ÷ HF prefill",
        "torch ÷ HF decode",
    ]
    return markdown_table(header, rows)


def cpu_label(cpu: list[dict[str, Any]]) -> str:
    cores = next((r.get("cores") for r in cpu if r.get("cores")), "?")
    threads = next((r.get("threads") for r in cpu if r.get("threads")), "?")
    return f"CPU, {cores} cores ({threads} torch threads): not a claim about GPU speed"


def _device_line(d: dict[str, Any]) -> str:
    return (
        f"- GPU: {d.get('device') or 'unknown'}; torch {d.get('torch') or '?'} (CUDA {d.get('cuda') or '?'}), "
        f"triton {d.get('triton') or '?'}, transformers {d.get('transformers') or 'not installed (no HF rows)'}"
    )


def generate_tables(summary: dict[str, Any]) -> str:
    """Markdown for the generation section: GPU and method, the figure table, the ratio table, the CPU figures."""
    summary = summarize_generate(summary["runs"]) if "runs" in summary else summary
    parts = ["### Generation: our `generate` (Triton / torch ops) vs transformers `generate` + SDPA"]
    if summary["figures"]:
        parts += [
            _device_line(summary["device"]),
            METHOD,
            figure_table(summary["figures"], summary["comparisons"]),
            "#### Ours ÷ transformers (tokens/s; above 1: ours is faster)",
            ratio_table(summary["comparisons"]),
        ]
    else:
        parts.append("(no GPU generation was measured: the GPU cases need CUDA)")
    if summary["cpu"]:
        parts += [
            f"#### {cpu_label(summary['cpu'])}",
            "The same measurement on the CPU, torch paths only (the Triton kernels need a GPU; wall-clock "
            "`time.perf_counter` per call)." + ("" if summary["figures"] else " " + METHOD),
            figure_table(summary["cpu"], summary["cpu_comparisons"]),
        ]
    return "\n\n".join(parts)
