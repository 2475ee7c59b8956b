"""DPO step benchmark: ours (packed pairs, cached reference, one forward) vs TRL's ``DPOTrainer`` on the same model
(our checkpoint exported by ``llama.formats.hf.export_hf``), the same preference pairs, β = 0.1, the same pairs per
step.

    pytest bench/test_dpo_step.py --benchmark-only                 # CPU: fp32; CUDA: bf16, measured memory
    pip install -e '.[bench]'                                      # TRL (the TRL rows skip without it)

What is timed and how tokens are counted is written out in ``finetune_report.DPO_METHOD`` (quoted under the table in
``RESULTS.md``). Full fine-tuning on both sides (TRL's default reference is a second model in memory; ours never
holds one). The pairs are those of ``../shared/data/medicalgpt/dpo_zh_500.jsonl`` that fit one row of ``dpo_seq``
tokens (``finetune_setup.fitting_pairs``), so neither side cuts a pair. Rows go to ``bench/.results/finetune.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from benchlib import Recorder, rounds, versions
from finetune_setup import (
    MIB,
    FinetuneModel,
    adamw,
    autocast_for,
    count_gpu_step,
    cuda_peak_mb,
    fitting_pairs,
    load_ours,
    precision_name,
    time_steps,
    timing,
    to_meta,
    tracked_peak,
    trl_record,
)

logger = logging.getLogger(__name__)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IMPLS = ("ours", "trl", "trl-precompute")
BETA = 0.1
LN2_TOLERANCE = 1e-3 if not ON_GPU else 2e-2  # policy = reference at the start: the loss is ln 2


@dataclass
class Pairs:
    """The packed pairs, our one batch of them, and the source records of the pairs it holds (in slot order)."""

    prefix: Path
    batch: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    tokens: int  # non-pad tokens of the batch: both sides of every pair
    stored_pairs: int


@pytest.fixture(scope="module")
def dpo_pairs(finetune_model: FinetuneModel) -> Pairs:
    from engine.dataset import DPODataset

    size = finetune_model.size
    folder = finetune_model.folder / "dpo"
    folder.mkdir(exist_ok=True)
    prefix, kept = fitting_pairs(finetune_model.tokenizer_dir, size.dpo_seq, folder)
    dataset = DPODataset(prefix, seq_len=size.dpo_seq, seed=0)
    batch = dataset.next_batch(size.dpo_rows)
    index = batch["pair_index"].numpy()
    tokens = int(dataset.files.doc_lengths().reshape(-1, 2)[index].sum())
    return Pairs(prefix, batch, [kept[i] for i in index], tokens, dataset.stored_pair_count)


def require_trl() -> None:
    for name in ("trl", "datasets", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: the TRL rows are left out (pip install -e '.[bench]')")


# ---------------------------------------------------------------- ours


def ours_objective(model: torch.nn.Module, pairs: Pairs, batch: dict[str, torch.Tensor]) -> Any:
    """``DPO`` with a ``CachedReference`` whose table holds the batch's pairs, scored now by the starting model (the
    same numbers ``llama.training.reference.reference_pass`` caches before training)."""
    from llama.training.dpo import DPO, DPOSettings, sequence_logps
    from llama.training.reference import CachedReference

    model.eval()
    with torch.no_grad(), autocast_for(DEVICE):
        logps, _ = sequence_logps(model, batch)
    model.train()
    table = np.full((pairs.stored_pairs, 2), np.nan, dtype=np.float64)
    table[batch["pair_index"].cpu().numpy()] = logps.double().cpu().numpy()
    return DPO(DPOSettings(beta=BETA), CachedReference(table))


def ours_step(setup: FinetuneModel, pairs: Pairs) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    model = load_ours(setup.checkpoint, DEVICE)
    batch = {k: v.to(DEVICE) for k, v in pairs.batch.items()}
    objective = ours_objective(model, pairs, batch)
    optimizer = adamw(model, DEVICE)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(DEVICE):
            loss, _ = objective.loss(model, batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    size = setup.size
    facts = {"tokens": pairs.tokens, "positions": size.dpo_rows * size.dpo_seq, "reference": "cached (precomputed)"}
    facts["memory"] = lambda: tracked_peak(step, [model], optimizer, DEVICE.type)
    facts["count"] = lambda: count_ours(setup, pairs)
    return step, facts


def count_ours(setup: FinetuneModel, pairs: Pairs) -> dict[str, int]:
    """Our DPO step's GPU peak on meta tensors: Triton path, fused log-probs, AdamW over every weight."""
    from llama.model import Llama, ModelOptions
    from llama.training.dpo import DPO, DPOSettings

    with torch.device("meta"):
        model = Llama(setup.size.config(), ModelOptions(kernels="triton"))
    model.train()
    batch = to_meta(pairs.batch)
    table = torch.zeros(pairs.stored_pairs, 2, device="meta")
    objective = DPO(DPOSettings(beta=BETA), lambda m, b, v: table[b["pair_index"]])
    return count_gpu_step(model, lambda: objective.loss(model, batch)[0], "bf16")


# ---------------------------------------------------------------- TRL


def trl_trainer(setup: FinetuneModel, pairs: Pairs, precompute: bool) -> Any:
    """``DPOTrainer`` on the exported model and exactly the batch's pairs, one step's worth."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(setup.folder / f"trl-{precompute}"),
        per_device_train_batch_size=len(pairs.records),
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
        bf16=ON_GPU,
        fp16=False,
        learning_rate=1e-4,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not ON_GPU,
        seed=0,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(setup.export_dir, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.export_dir)
    dataset = datasets.Dataset.from_list([trl_record(r) for r in pairs.records])
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def trl_step(setup: FinetuneModel, pairs: Pairs, precompute: bool) -> tuple[Callable[[], torch.Tensor], dict]:
    trainer = trl_trainer(setup, pairs, precompute)
    inputs = next(iter(trainer.get_train_dataloader()))
    model, optimizer = trainer.accelerator.prepare(trainer.model, trainer.create_optimizer())
    trainer.current_gradient_accumulation_steps = 1  # what ``train`` sets before its first step

    def step() -> torch.Tensor:
        loss = trainer.training_step(model, inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    modules = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    reference = "model in memory, run every step" if trainer.ref_model is not None else "precomputed at construction"
    facts = {
        "tokens": int(inputs["attention_mask"].sum()),
        "positions": int(inputs["input_ids"].numel()),
        "reference": reference,
        "memory": lambda: tracked_peak(step, modules, optimizer, DEVICE.type),
    }
    return step, facts


# ---------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("impl", IMPLS)
def test_dpo_step(
    benchmark: Any, recorder: Recorder, finetune_model: FinetuneModel, dpo_pairs: Pairs, impl: str
) -> None:
    if impl != "ours":
        require_trl()
    setup, size, pairs = finetune_model, finetune_model.size, dpo_pairs
    n_pairs = len(pairs.records)
    benchmark.group = f"DPO step {size.name} {n_pairs} pairs {precision_name(DEVICE)}"
    if ON_GPU:
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    step, facts = ours_step(setup, pairs) if impl == "ours" else trl_step(setup, pairs, impl == "trl-precompute")
    first_loss = float(step())
    assert abs(first_loss - math.log(2)) < LN2_TOLERANCE, f"{impl}: first loss {first_loss}, expected ln 2"
    times = time_steps(benchmark, step, ON_GPU, rounds(5))
    if benchmark.disabled or not times:
        return
    memory = cuda_peak_mb(step) if ON_GPU else {}
    tracked = facts["memory"]()
    count = facts["count"]() if "count" in facts else None
    row = {
        "case": "dpo-step",
        "impl": impl,
        "size": size.name,
        "dim": size.dim,
        "n_layers": size.n_layers,
        "vocab": size.config().vocab_size,
        "rows": size.dpo_rows,
        "seq": size.dpo_seq,
        "pairs": n_pairs,
        "beta": BETA,
        "precision": precision_name(DEVICE),
        "reference": facts["reference"],
        "tokens": facts["tokens"],
        "positions": facts["positions"],
        **timing(times),
        "first_loss": first_loss,
        **memory,
        "tracked_mb": tracked["total"] / MIB,
        "tracked_device": DEVICE.type,
        "tracked_by_kind": tracked,
        **({"counted_gpu_mb": count["total"] / MIB, "counted_by_kind": count} if count else {}),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **versions(ON_GPU),
        "trl": _version("trl"),
    }
    row["tokens_per_s"] = row["tokens"] / (row["ms"] / 1e3)
    recorder.add("finetune", row)
    benchmark.extra_info.update({"ms_per_step": round(row["ms"], 1), "tokens_per_s": round(row["tokens_per_s"])})
    logger.info("%s: %s", impl, json.dumps({k: row[k] for k in ("ms", "tokens", "tokens_per_s", "tracked_mb")}))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
