"""Turn the fine-tuning benchmark rows (``bench/.results/finetune.json``) into markdown: the LoRA step, the DPO step
and the GRPO step (generation, update, a short run end to end).

Rows come from ``bench/test_lora_step.py``, ``bench/test_dpo_step.py`` and ``bench/test_grpo_step.py``; this module
only sorts them and takes ratios, so the terminal summary and ``RESULTS.md`` (``bench/report.py``) print the same
numbers.
"""

from __future__ import annotations

from typing import Any

from report import fmt, markdown_table

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
GRPO_ORDER = ["ours", "trl"]
GRPO_CASES = ["grpo-generate", "grpo-update", "grpo-train"]
GRPO_NAMES = {
    ("grpo-generate", "ours"): "generation: ours (`Replies`: batched KV-cache `generate` + reward)",
    ("grpo-generate", "trl"): "generation: TRL (`GRPOTrainer._generate_single_turn`: `model.generate`)",
    ("grpo-update", "ours"): "update: ours (`GRPO.loss`, backward, AdamW)",
    ("grpo-update", "trl"): "update: TRL (`GRPOTrainer.compute_loss`, backward, its AdamW)",
    ("grpo-train", "ours"): "ours: `python -m llama.grpo`",
    ("grpo-train", "trl"): "TRL: `GRPOTrainer.train()`",
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

GRPO_METHOD = (
    "One GRPO step split in two, then a short run end to end, on the same prompts (the first single-turn prompts of "
    "`medicalgpt/dpo_zh_500.jsonl` whose chat rendering fits 64 tokens; ours and TRL's tokenization checked equal), "
    "the same reward (`length:N:N:N` of `llama.rewards`, N = max new tokens, one function on both sides) and the same "
    'objective: β = 0, ε = 0.2, token-level normalisation (ours `--loss-type token`, TRL `loss_type="dapo"`), '
    "advantages standardised per group, one update per rollout. *Generation*: P × G completions sampled at "
    "temperature 1 (no top-p/top-k), stopping at `</s>` or `<|im_end|>`; ours is `Replies.__call__` (what "
    "`RolloutSource` calls: the batched KV-cache `generate`, decoding and the reward) under the run's autocast, TRL's "
    "is `GRPOTrainer._generate_single_turn` (its non-vLLM path: left-padding, `model.generate` with the trainer's "
    "`generation_config`, masking after EOS; a private method, as TRL's public API generates only inside "
    "`training_step`), without decoding and scoring (microseconds here). tokens = completion tokens sampled per call "
    "(stop token included), averaged over the calls; positions = P × G × max new tokens. *Update*: one optimizer step "
    "on one rollout that each side sampled with its own code before timing (ours `RolloutSource.next_batch`, TRL "
    "`_prepare_inputs`): zero the gradients, the loss's forward, backward, AdamW, no clipping; TRL's forward also "
    "computes every completion token's entropy for its metrics. The first loss is checked on each side against "
    "−Σ A·(completion tokens) ÷ all completion tokens (ρ = 1). tokens = non-pad tokens forwarded (prompt + "
    "completion); positions = the tensor positions the forward runs. ms = median per call (`benchmark.pedantic` "
    "batches; wall clock on CPU, CUDA events on a GPU); tokens/s = tokens ÷ that median; *ours × this* = ours' "
    "tokens/s ÷ the row's (above 1: ours is faster). fp32 on CPU, bf16 on CUDA (TRL's `bf16` and "
    "`gradient_checkpointing` defaults set to match ours)."
)

GRPO_TRAIN_METHOD = (
    "End to end: the same steps (one rollout of P × G and one update each) in a fresh process per side: ours "
    "`python -m llama.grpo` (`--batch-size P·G --grad-accum 1`, no validation; it writes its final checkpoint, a loss "
    "plot and TensorBoard events), TRL `GRPOTrainer(...).train()` with `max_steps` (saves nothing); both clip the "
    "gradient norm at 1. *loop s* = the training loop's own seconds (ours: `time` of the last metrics line; TRL: "
    "`train_runtime`), *process s* = the whole process (imports, model loading, saving); peak RSS = the process "
    "tree's, sampled by `bench/peak_rss.py` (MB, imports included); *ours × this* = the row's loop seconds ÷ ours' "
    "(above 1: ours is faster)."
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


def _grpo_sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GRPO rows by stage (generation, update, end to end), ours before TRL within each."""
    return [r for case in GRPO_CASES for r in _sorted(rows, case, GRPO_ORDER)]


def grpo_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Ours ÷ TRL for each GRPO stage: speed (tokens/s; end to end, TRL's seconds ÷ ours) and memory."""

    def pair(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
        chosen = [r for r in rows if r.get("case") == case]
        return _get(chosen, "ours"), _get(chosen, "trl")

    out: dict[str, float | None] = {}
    for case, stage in (("grpo-generate", "generate"), ("grpo-update", "update")):
        ours, trl = pair(case)
        out[f"{stage}_tokens_per_s"] = _ratio(ours.get("tokens_per_s"), trl.get("tokens_per_s"))
        out[f"{stage}_tracked_memory"] = _ratio(ours.get("tracked_mb"), trl.get("tracked_mb"))
        out[f"{stage}_cuda_memory"] = _ratio(ours.get("cuda_peak_mb"), trl.get("cuda_peak_mb"))
    ours, trl = pair("grpo-train")
    out["train_loop_speed"] = _ratio(trl.get("loop_s"), ours.get("loop_s"))
    out["train_process_speed"] = _ratio(trl.get("wall_s"), ours.get("wall_s"))
    out["train_peak_rss"] = _ratio(ours.get("peak_rss_mb"), trl.get("peak_rss_mb"))
    out["train_cuda_memory"] = _ratio(ours.get("cuda_peak_mb"), trl.get("cuda_peak_mb"))
    return out


def summarize_finetune(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lora, dpo = _sorted(rows, "lora-step", LORA_ORDER), _sorted(rows, "dpo-step", DPO_ORDER)
    grpo = _grpo_sorted(rows)
    return {
        "lora": lora,
        "lora_ratios": lora_ratios(lora),
        "dpo": dpo,
        "dpo_ratios": dpo_ratios(dpo),
        "grpo": grpo,
        "grpo_ratios": grpo_ratios(grpo),
    }


# ---------------------------------------------------------------- markdown


def _device_line(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    where = r.get("device") or "?"
    if where == "cpu":
        where = f"CPU, {r.get('cores', '?')} cores ({r.get('threads', '?')} torch threads)"
    libs = ", ".join(f"{k} {r[k]}" for k in ("torch", "transformers", "peft", "trl") if r.get(k))
    return f"- device: {where}; precision {r.get('precision')}; {libs}"


def _memory_cells(r: dict[str, Any]) -> list[str]:
    tracked = fmt(r.get("tracked_mb"), ",.1f") + (f" ({r['tracked_device']})" if r.get("tracked_mb") else "")
    return [fmt(r.get("counted_gpu_mb"), ",.1f"), tracked, fmt(r.get("cuda_peak_mb"), ",.1f")]


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
            fmt(_ratio(full.get("ms"), r["ms"]), ".2f", "×"),
            *_memory_cells(r),
        ]
        for r in rows
    ]
    header = ["implementation", "trainable params", "all params", "ms/step", "min–max", "tokens/s", "× ours full"]
    return markdown_table(header + MEMORY_HEADER, body)


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
            "1.00×" if r["impl"] == "ours" else fmt(_ratio(ours.get("tokens_per_s"), r["tokens_per_s"]), ".2f", "×"),
            f"{r['first_loss']:.4f}",
            *_memory_cells(r),
        ]
        for r in rows
    ]
    header = ["implementation", "pairs/step", "tokens/step", "positions/step", "ms/step", "min–max", "tokens/s"]
    return markdown_table(header + ["ours × this (tokens/s)", "first loss"] + MEMORY_HEADER, body)


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


def grpo_step_table(rows: list[dict[str, Any]]) -> str:
    """Generation and update rows: one line per stage and side."""
    steps = [r for r in rows if r["case"] in ("grpo-generate", "grpo-update")]
    body = []
    for r in steps:
        ours = _get([x for x in steps if x["case"] == r["case"]], "ours")
        ratio = "1.00×" if r["impl"] == "ours" else fmt(_ratio(ours.get("tokens_per_s"), r["tokens_per_s"]), ".2f", "×")
        body.append(
            [
                GRPO_NAMES.get((r["case"], r["impl"]), f"{r['case']} {r['impl']}"),
                str(r["rows"]),
                f"{r['tokens']:,.0f}",
                f"{r['positions']:,}",
                f"{r['ms']:.1f}",
                f"{r['ms_min']:.1f}–{r['ms_max']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                ratio,
                fmt(r.get("first_loss"), ".2e"),
                fmt(r.get("tracked_mb"), ",.1f") + (f" ({r['tracked_device']})" if r.get("tracked_mb") else ""),
                fmt(r.get("cuda_peak_mb"), ",.1f"),
            ]
        )
    header = ["stage and implementation", "sequences", "tokens/call", "positions/call", "ms/call", "min–max"]
    header += ["tokens/s", "ours × this (tokens/s)", "first loss", "tracked peak (MiB)", "CUDA peak, measured (MiB)"]
    return markdown_table(header, body)


def grpo_train_table(rows: list[dict[str, Any]]) -> str:
    """End-to-end rows: the loop's and the process's seconds, peak memory."""
    runs = [r for r in rows if r["case"] == "grpo-train"]
    ours = _get(runs, "ours")
    body = [
        [
            GRPO_NAMES.get((r["case"], r["impl"]), r["impl"]),
            str(r["steps"]),
            f"{r['loop_s']:.2f}",
            f"{r['s_per_step']:.2f}",
            f"{r['wall_s']:.1f}",
            "1.00×" if r["impl"] == "ours" else fmt(_ratio(r["loop_s"], ours.get("loop_s")), ".2f", "×"),
            f"{r['peak_rss_mb']:,.0f}",
            fmt(r.get("cuda_peak_mb"), ",.1f"),
        ]
        for r in runs
    ]
    header = ["implementation", "steps", "loop s", "s/step", "process s", "ours × this (loop speed)"]
    return markdown_table(header + ["peak RSS (MB)", "CUDA peak, measured (MiB)"], body)


def _grpo_section(summary: dict[str, Any]) -> list[str]:
    rows, q = summary["grpo"], summary.get("grpo_ratios") or grpo_ratios(summary["grpo"])
    r = rows[0]
    lines = [
        f"#### GRPO step: {r['size']}, vocab {r['vocab']:,}, {r['prompts']} prompts × {r['group']} completions of up "
        f"to {r['max_new_tokens']} tokens",
        _device_line(rows),
    ]
    if any(x["case"] != "grpo-train" for x in rows):
        lines += [GRPO_METHOD, grpo_step_table(rows)]
    if any(x["case"] == "grpo-train" for x in rows):
        lines += [GRPO_TRAIN_METHOD, grpo_train_table(rows)]
    said = [
        f"generation tokens/s {q['generate_tokens_per_s']:.2f}×" if q.get("generate_tokens_per_s") else "",
        f"update tokens/s {q['update_tokens_per_s']:.2f}×" if q.get("update_tokens_per_s") else "",
        f"update tracked peak {q['update_tracked_memory']:.2f}×" if q.get("update_tracked_memory") else "",
        f"generation tracked peak {q['generate_tracked_memory']:.2f}×" if q.get("generate_tracked_memory") else "",
        f"update CUDA peak {q['update_cuda_memory']:.2f}×" if q.get("update_cuda_memory") else "",
        f"generation CUDA peak {q['generate_cuda_memory']:.2f}×" if q.get("generate_cuda_memory") else "",
        f"end-to-end loop speed {q['train_loop_speed']:.2f}×" if q.get("train_loop_speed") else "",
        f"process speed {q['train_process_speed']:.2f}×" if q.get("train_process_speed") else "",
        f"peak RSS {q['train_peak_rss']:.2f}×" if q.get("train_peak_rss") else "",
        f"end-to-end CUDA peak {q['train_cuda_memory']:.2f}×" if q.get("train_cuda_memory") else "",
    ]
    if any(said):
        lines.append(
            "Ratios from this run, ours ÷ TRL (speeds above 1: ours faster; memory below 1: ours smaller): "
            + "; ".join(s for s in said if s)
            + "."
        )
    return lines


def finetune_tables(summary: dict[str, Any]) -> str:
    """Markdown for the fine-tuning section: the LoRA step, the DPO step and (when measured) the GRPO step tables,
    each with its method."""
    summary = summarize_finetune(summary["runs"]) if "runs" in summary else summary
    grpo = summary.get("grpo") or []
    title = "### Fine-tuning steps: LoRA (ours vs PEFT) and DPO (ours vs TRL)"
    parts = [title + (", GRPO (ours vs TRL)" if grpo else "")]
    if summary["lora"]:
        parts += _lora_section(summary)
    if summary["dpo"]:
        parts += _dpo_section(summary)
    if grpo:
        parts += _grpo_section(summary)
    if not summary["lora"] and not summary["dpo"] and not grpo:
        parts.append("(no fine-tuning step was measured)")
    return "\n\n".join(parts)
