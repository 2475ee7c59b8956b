"""LoRA step benchmark: one SFT step of our model fully fine-tuned, with our LoRA, and with PEFT's LoRA on the same
weights (our checkpoint exported by ``llama.formats.hf.export_hf``), the same batch and the same AdamW.

    pytest bench/test_lora_step.py --benchmark-only                # CPU: fp32; CUDA: bf16 autocast, measured memory

A step = zero the gradients, forward (bf16 autocast on CUDA, fp32 on CPU), backward, AdamW (fused on CUDA); no
clipping, no data loading (one fixed batch of random ids, every position counted). LoRA is r = 16, α = 32,
dropout 0.05 on q, k, v, o, gate, up and down in both: ours is ``llama.lora.apply_lora`` (frozen base weights
stored in bf16 on CUDA, as ``llama.training`` does under ``--lora``; adapters fp32); PEFT's is
``peft.get_peft_model(AutoModelForCausalLM.from_pretrained(export), peft.LoraConfig(...))`` with the model as loaded
(fp32) under the same autocast. Timing as ``bench/test_train_step.py``: ``benchmark.pedantic`` batches of
back-to-back steps (CUDA events on a GPU, the wall clock on CPU), medians per step. Memory: see
``finetune_setup``; on CPU each row has the CPU step's tracked peak (measured) and the GPU path's count on meta
tensors (bf16, counted), on CUDA also ``max_memory_allocated`` (measured). Rows go to ``bench/.results/finetune.json``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

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
    load_hf,
    load_ours,
    precision_name,
    time_steps,
    timing,
    tracked_peak,
)

logger = logging.getLogger(__name__)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IMPLS = ("ours-full", "ours-lora", "peft-lora")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32.0, 0.05
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_SLACK = 1.5  # a fresh model's loss is ln(vocab) give or take this much


def require_peft() -> None:
    import importlib.util

    for name in ("transformers", "peft"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: the PEFT row is left out (pip install -e '.[bench]')")


def ours_lora_config() -> Any:
    from llama.lora import LoraConfig

    return LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, targets=("all",))


def peft_lora_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=HF_TARGETS, lora_dropout=LORA_DROPOUT, task_type="CAUSAL_LM"
    )


def half_dtype(device: torch.device) -> torch.dtype | None:
    """What ``llama.training`` stores a LoRA run's frozen base in: the autocast dtype (bf16 on CUDA), else as is."""
    return torch.bfloat16 if device.type == "cuda" else None


def build(impl: str, setup: FinetuneModel, device: torch.device) -> torch.nn.Module:
    """The model of ``impl`` with the checkpoint's weights, in training mode."""
    if impl == "peft-lora":
        import peft

        model = peft.get_peft_model(load_hf(setup.export_dir, device), peft_lora_config())
    else:
        model = load_ours(setup.checkpoint, device)
        if impl == "ours-lora":
            from llama.lora import apply_lora

            apply_lora(model, ours_lora_config(), half_dtype(device))
    return model.train()


def loss_fn(impl: str, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], Any]:
    """One forward's loss: ours takes shifted labels, Hugging Face shifts ``labels=input_ids`` itself."""
    if impl == "peft-lora":
        return lambda: model(input_ids=inputs, labels=inputs).loss
    return lambda: model(inputs, labels=labels).loss


def make_step(model: torch.nn.Module, loss: Callable[[], Any], device: torch.device) -> Callable[[], torch.Tensor]:
    optimizer = adamw(model, device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device):
            value = loss()
        value.backward()
        optimizer.step()
        return value.detach()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def batch(setup: FinetuneModel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``sft_batch`` rows of ``sft_seq + 1`` random ids: inputs and their next tokens."""
    size = setup.size
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, size.config().vocab_size, (size.sft_batch, size.sft_seq + 1), generator=generator)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def counted_gpu_mb(impl: str, setup: FinetuneModel, precision: str = "bf16") -> dict[str, Any]:
    """The GPU path's peak for this step on meta tensors (a count): ours on its Triton kernels, PEFT on transformers
    with SDPA counted as flash attention."""
    size, config = setup.size, setup.size.config()
    ids = torch.zeros(size.sft_batch, size.sft_seq, dtype=torch.long, device="meta")
    with torch.device("meta"):
        if impl == "peft-lora":
            import peft
            import transformers

            hf_config = transformers.LlamaConfig(**config.to_hf_config(), use_cache=False, attn_implementation="sdpa")
            model = peft.get_peft_model(transformers.LlamaForCausalLM(hf_config), peft_lora_config())
        else:
            from llama.model import Llama, ModelOptions

            model = Llama(config, ModelOptions(kernels="triton"))
            if impl == "ours-lora":
                from llama.lora import apply_lora

                apply_lora(model, ours_lora_config(), torch.bfloat16 if precision == "bf16" else None)
    model.train()
    count = count_gpu_step(model, loss_fn(impl, model, ids, ids), precision)
    return {"counted_gpu_mb": count["total"] / MIB, "counted_precision": precision, "counted_by_kind": count}


def sanity_loss(step: Callable[[], torch.Tensor], vocab: int) -> float:
    loss = float(step())
    assert math.isfinite(loss) and abs(loss - math.log(vocab)) < LOSS_SLACK, (
        f"first loss {loss}, ln V {math.log(vocab)}"
    )
    return loss


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_step(benchmark: Any, recorder: Recorder, finetune_model: FinetuneModel, impl: str) -> None:
    if impl == "peft-lora":
        require_peft()
    setup, size = finetune_model, finetune_model.size
    benchmark.group = f"LoRA step {size.name} {size.sft_batch}x{size.sft_seq} {precision_name(DEVICE)}"
    if ON_GPU:
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = build(impl, setup, DEVICE)
    inputs, labels = batch(setup, DEVICE)
    step = make_step(model, loss_fn(impl, model, inputs, labels), DEVICE)
    first_loss = sanity_loss(step, size.config().vocab_size)
    times = time_steps(benchmark, step, ON_GPU, rounds(5))
    if benchmark.disabled or not times:
        return
    memory = cuda_peak_mb(step) if ON_GPU else {}
    tracked = tracked_peak(step, [model], step.optimizer, DEVICE.type)
    row = {
        "case": "lora-step",
        "impl": impl,
        "size": size.name,
        "dim": size.dim,
        "n_layers": size.n_layers,
        "vocab": size.config().vocab_size,
        "batch": size.sft_batch,
        "seq": size.sft_seq,
        "precision": precision_name(DEVICE),
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": HF_TARGETS},
        **parameter_counts(model),
        **timing(times),
        "tokens_per_s": size.sft_batch * size.sft_seq / (timing(times)["ms"] / 1e3),
        "first_loss": first_loss,
        **memory,
        "tracked_mb": tracked["total"] / MIB,
        "tracked_device": DEVICE.type,
        "tracked_by_kind": tracked,
        **counted_gpu_mb(impl, setup),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **versions(ON_GPU),
        "peft": _version("peft"),
    }
    recorder.add("finetune", row)
    benchmark.extra_info.update({"ms_per_step": round(row["ms"], 2), "trainable": row["trainable"]})


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
