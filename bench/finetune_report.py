"""Turn the fine-tuning benchmark rows (``bench/.results/finetune.json``) into markdown: the LoRA step and the DPO step.

Rows come from ``bench/test_lora_step.py`` and ``bench/test_dpo_step.py``; this module only sorts them and takes
ratios, so the terminal summary and ``RESULTS.md`` (``bench/report.py``) print the same numbers.
"""

from __future__ import annotations

from typing import Any

LORA_ORDER = ["ours-full", "ours-lora", "peft-lora"]
DPO_ORDER = ["ours", "trl", "trl-precompute"]
NAMES = {
    "ours-full": "ours, full fine-tuning",
    "ours-lora": "ours, LoRA (`llama.lora.apply_lora`)",
    "peft-lora": "PEFT LoRA on the HF export",
    "ours": "ours (`llama.training.dpo.DPO`, cached reference, packed rows)",
    "trl": "TRL `DPOTrainer` (default: reference model in memory)",
    "trl-precompute": "TRL `DPOTrainer`, `precompute_ref_log_probs=True`",
}

MEMORY_METHOD = (
    "Memory columns: *GPU peak, counted* = the same step on meta tensors for the GPU code path (bf16 autocast "
    "emulated, our Triton ops' real host code with launches stubbed, Hugging Face's SDPA counted as its flash "
    "backend; `bench/finetune_setup.py`) — a count, not a measurement, allocator rounding and the CUDA context not "
    "included; *tracked peak* = the peak of live tensor storage during one real step on the device the row ran on "
    "(PyTorch's `MemTracker`: weights, gradients, optimizer state, activations, temporaries; on CPU our model runs "
    "`zhkernels.reference`, so it is the CPU path's figure, not a GPU one); *CUDA peak* = "
    "`torch.cuda.max_memory_allocated()` over one step (measured, GPU runs only). MiB."
)

LORA_METHOD = (
    "One SFT step on one fixed batch of random ids (every position counted): zero the gradients, forward (fp32 on "
    "CPU, bf16 autocast on CUDA), backward, AdamW (decay on matrices, fused on CUDA); no clipping, no data loading. "
    "The same weights in all three: a random checkpoint of ours, exported with `llama.formats.hf.export_hf(…, "
    'dtype="fp32")` for PEFT. LoRA r = 16, α = 32, dropout 0.05 on q, k, v, o, gate, up, down in both; ours keeps '
    "the frozen base in bf16 on CUDA (as `llama.training` does under `--lora`), PEFT keeps the model as loaded "
    "(fp32). ms/step = median of per-step times (`benchmark.pedantic` batches of back-to-back steps; wall clock on "
    "CPU, CUDA events on a GPU); tokens/s = batch × seq ÷ that median. *× ours full* = ours-full's ms ÷ the row's "
    "(above 1: faster than full fine-tuning); the ratios under the table set ours LoRA against PEFT (speed: PEFT's "
    "ms ÷ ours'; memory: ours ÷ PEFT's) and against ours full fine-tuning."
)

DPO_METHOD = (
    "One DPO step (sigmoid loss, β = 0.1) on the same preference pairs for every row: the pairs of "
    "`medicalgpt/dpo_zh_500.jsonl` whose two sides fit one row together, packed by `python -m engine.prepare "
    "--kind dpo`; the step's pairs are one batch of our packed rows (`DPODataset.next_batch`, first-fit decreasing, "
    "document masking), and TRL gets exactly those pairs as conversational records with "
    "`per_device_train_batch_size` = their number, tokenized by TRL through the exported tokenizer's chat template. "
    "*ours*: `DPO(DPOSettings(beta=0.1), CachedReference(table))` — the reference log-probs computed before timing "
    "(as `--ref precompute` does), one forward over the packed rows, then backward and AdamW. *trl*: "
    "`DPOTrainer.training_step` (policy forward and backward, TRL's fused LM head, its metrics) after "
    "`accelerator.prepare`, then its own optimizer's step; TRL's default keeps a second copy of the model as the "
    "reference and runs it every step; *trl-precompute* scores the reference once at construction. Both sides: "
    "fp32 on CPU / bf16 on CUDA, no gradient checkpointing (TRL's `DPOConfig` defaults to `gradient_checkpointing="
    "True` and `bf16=True`; both are set to match ours), no clipping, no data loading in the timed step. "
    "Tokens = non-pad tokens of the step's sequences (prompt + reply, chosen and rejected), each side counting its "
    "own: ours = the pairs' document lengths in the packed rows, TRL = its batch's `attention_mask.sum()` (TRL's "
    "conversational sequences end at the template's last newline; ours add the EOS, one token per sequence). "
    "Positions = the tensor positions the policy forward runs (ours rows × seq_len, TRL 2 × pairs × the longest "
    "sequence). tokens/s = tokens ÷ the median step time; the reference forward of *trl* is not counted as tokens. "
    "*ours × this* = ours' tokens/s ÷ the row's (above 1: ours is faster)."
)

TRL_NOT_COUNTED = (
    "TRL's GPU peak is not counted on meta tensors: its loss reads values back for its metrics (`.item()`, boolean "
    "indexing), which meta tensors cannot do. A CUDA run measures it (*CUDA peak*)."
)


# ---------------------------------------------------------------- summaries


def _sorted(rows: list[dict[str, Any]], case: str, order: list[str]) -> list[dict[str, Any]]:
    chosen = [r for r in rows if r.get("case") == case]
    return sorted(chosen, key=lambda r: order.index(r["impl"]) if r["impl"] in order else len(order))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _get(rows: list[dict[str, Any]], impl: str) -> dict[str, Any]:
    return next((r for r in rows if r["impl"] == impl), {})


def lora_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    full, ours, peft = (_get(rows, i) for i in LORA_ORDER)
    return {
        "lora_speed_vs_full": _ratio(full.get("ms"), ours.get("ms")),
        "ours_speed_vs_peft": _ratio(peft.get("ms"), ours.get("ms")),
        "ours_counted_memory_vs_peft": _ratio(ours.get("counted_gpu_mb"), peft.get("counted_gpu_mb")),
        "ours_cuda_memory_vs_peft": _ratio(ours.get("cuda_peak_mb"), peft.get("cuda_peak_mb")),
        "lora_counted_memory_vs_full": _ratio(ours.get("counted_gpu_mb"), full.get("counted_gpu_mb")),
    }


def dpo_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    ours = _get(rows, "ours")
    out: dict[str, float | None] = {}
    for impl in DPO_ORDER[1:]:
        other = _get(rows, impl)
        out[f"ours_tokens_per_s_vs_{impl}"] = _ratio(ours.get("tokens_per_s"), other.get("tokens_per_s"))
        out[f"ours_tracked_memory_vs_{impl}"] = _ratio(ours.get("tracked_mb"), other.get("tracked_mb"))
        out[f"ours_cuda_memory_vs_{impl}"] = _ratio(ours.get("cuda_peak_mb"), other.get("cuda_peak_mb"))
    return out


def summarize_finetune(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lora, dpo = _sorted(rows, "lora-step", LORA_ORDER), _sorted(rows, "dpo-step", DPO_ORDER)
    return {"lora": lora, "lora_ratios": lora_ratios(lora), "dpo": dpo, "dpo_ratios": dpo_ratios(dpo)}


# ---------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _device_line(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    where = r.get("device") or "?"
    if where == "cpu":
        where = f"CPU, {r.get('cores', '?')} cores ({r.get('threads', '?')} torch threads)"
    libs = ", ".join(f"{k} {r[k]}" for k in ("torch", "transformers", "peft", "trl") if r.get(k))
    return f"- device: {where}; precision {r.get('precision')}; {libs}"


def _memory_cells(r: dict[str, Any]) -> list[str]:
    tracked = _fmt(r.get("tracked_mb"), ",.1f") + (f" ({r['tracked_device']})" if r.get("tracked_mb") else "")
    return [_fmt(r.get("counted_gpu_mb"), ",.1f"), tracked, _fmt(r.get("cuda_peak_mb"), ",.1f")]


MEMORY_HEADER = ["GPU peak, counted (bf16, MiB)", "tracked peak (MiB)", "CUDA peak, measured (MiB)"]


def lora_table(rows: list[dict[str, Any]]) -> str:
    full = _get(rows, "ours-full")
    body = [
        [
            NAMES.get(r["impl"], r["impl"]),
            f"{r['trainable']:,}",
            f"{r['total']:,}",
            f"{r['ms']:.1f}",
            f"{r['ms_min']:.1f}–{r['ms_max']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            _fmt(_ratio(full.get("ms"), r["ms"]), ".2f", "×"),
            *_memory_cells(r),
        ]
        for r in rows
    ]
    header = ["implementation", "trainable params", "all params", "ms/step", "min–max", "tokens/s", "× ours full"]
    return _table(header + MEMORY_HEADER, body)


def dpo_table(rows: list[dict[str, Any]]) -> str:
    ours = _get(rows, "ours")
    body = [
        [
            NAMES.get(r["impl"], r["impl"]),
            str(r["pairs"]),
            f"{r['tokens']:,}",
            f"{r['positions']:,}",
            f"{r['ms']:.1f}",
            f"{r['ms_min']:.1f}–{r['ms_max']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            "1.00×" if r["impl"] == "ours" else _fmt(_ratio(ours.get("tokens_per_s"), r["tokens_per_s"]), ".2f", "×"),
            f"{r['first_loss']:.4f}",
            *_memory_cells(r),
        ]
        for r in rows
    ]
    header = ["implementation", "pairs/step", "tokens/step", "positions/step", "ms/step", "min–max", "tokens/s"]
    return _table(header + ["ours × this (tokens/s)", "first loss"] + MEMORY_HEADER, body)


def _lora_section(summary: dict[str, Any]) -> list[str]:
    rows = summary["lora"]
    r, q = rows[0], summary["lora_ratios"]
    lines = [
        f"#### LoRA step: {r['size']}, vocab {r['vocab']:,}, batch {r['batch']} × {r['seq']}",
        _device_line(rows),
        LORA_METHOD,
        MEMORY_METHOD,
        lora_table(rows),
    ]
    said = [
        f"ours LoRA runs at {q['ours_speed_vs_peft']:.2f}× PEFT's speed" if q["ours_speed_vs_peft"] else "",
        f"{q['lora_speed_vs_full']:.2f}× ours full fine-tuning's" if q["lora_speed_vs_full"] else "",
        f"its counted GPU peak is {q['ours_counted_memory_vs_peft']:.2f}× PEFT's"
        if q["ours_counted_memory_vs_peft"]
        else "",
        f"{q['lora_counted_memory_vs_full']:.2f}× full fine-tuning's" if q["lora_counted_memory_vs_full"] else "",
        f"measured on CUDA {q['ours_cuda_memory_vs_peft']:.2f}× PEFT's" if q["ours_cuda_memory_vs_peft"] else "",
    ]
    if any(said):
        lines.append("Ratios from this run: " + "; ".join(s for s in said if s) + ".")
    return lines


def _dpo_section(summary: dict[str, Any]) -> list[str]:
    rows = summary["dpo"]
    r = rows[0]
    lines = [
        f"#### DPO step: {r['size']}, vocab {r['vocab']:,}, {r['pairs']} pairs per step (ours: {r['rows']} rows × "
        f"{r['seq']})",
        _device_line(rows),
        DPO_METHOD,
        MEMORY_METHOD,
        dpo_table(rows),
    ]
    if any(r["impl"] != "ours" and r.get("counted_gpu_mb") is None for r in rows):
        lines.append(TRL_NOT_COUNTED)
    return lines


def finetune_tables(summary: dict[str, Any]) -> str:
    """Markdown for the fine-tuning section: the LoRA step table and the DPO step table, each with its method."""
    summary = summarize_finetune(summary["runs"]) if "runs" in summary else summary
    parts = ["### Fine-tuning steps: LoRA (ours vs PEFT) and DPO (ours vs TRL)"]
    if summary["lora"]:
        parts += _lora_section(summary)
    if summary["dpo"]:
        parts += _dpo_section(summary)
    if not summary["lora"] and not summary["dpo"]:
        parts.append("(no fine-tuning step was measured)")
    return "\n\n".join(parts)
