"""One optimizer step: the learning rate, the micro-batches through the objective, clip and step, validation."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .data import to_device
from .errors import TrainingOOMError
from .run import Run
from .runtime import memory_report


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of update number ``step`` (0-based): linear warmup, then the schedule down to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))  # reaches 1 on the last update
    remaining = 1.0 - (math.sqrt(progress) if cfg.decay_shape == "sqrt" else progress)
    return cfg.min_lr + remaining * (cfg.lr - cfg.min_lr)


def oom_advice(cfg: TrainConfig, device: torch.device, step: int, micro: int) -> str:
    """A one-line account of an out-of-memory error with the change most likely to fit."""
    where = f"out of GPU memory at step {step + 1}, micro-batch {micro + 1}/{cfg.grad_accum} ({memory_report(device)})"
    if cfg.batch_size > 1:
        fix = (
            f"halve --batch-size to {cfg.batch_size // 2} and double --grad-accum to {cfg.grad_accum * 2} "
            "(same tokens per step)"
        )
    elif not cfg.activation_checkpointing:
        fix = "turn on activation checkpointing (--activation-checkpointing)"
    else:
        fix = "use a shorter --seq-len, a smaller model, or a bigger GPU"
    if not cfg.activation_checkpointing and cfg.batch_size > 1:
        fix += ", or turn on activation checkpointing"
    return f"{where}: {fix}"


def clip_and_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter], grad_clip: float
) -> torch.Tensor:
    """Unscale, clip to ``grad_clip`` (0 = measure only), step unless a gradient is inf/NaN, clear; returns the norm."""
    scaler.unscale_(optimizer)  # a no-op when the scaler is disabled
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the update when the gradients hold inf/NaN, and update() halves the scale
        scaler.update()
    elif torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """The objective's validation metrics over the fixed batches, averaged over ranks."""
    run.eval_model.eval()
    with run.autocast:
        metrics = run.objective.validate(run.eval_model, [to_device(b, run.runtime.device) for b in run.val_batches])
    run.eval_model.train()
    names = sorted(metrics)
    values = torch.stack([metrics[n].detach().float().reshape(()) for n in names]) if names else torch.zeros(0)
    if run.runtime.distributed:
        dist.all_reduce(values)
        values /= run.runtime.world_size
    return dict(zip(names, values.tolist()))


@dataclass
class StepResult:
    """What one optimizer step read back (in one GPU→CPU copy) and what the log needs of it."""

    loss: float
    grad_norm: float
    metrics: dict[str, float]
    signalled: bool  # some rank received SIGINT/SIGTERM
    scale: float | None  # fp16's loss scale before the step


def train_step(run: Run, batches: list[dict[str, torch.Tensor]], signal_received: int) -> StepResult:
    """``grad_accum`` micro-batches (gradients synced on the last only), then unscale, clip and step; the mean loss,
    the objective's metrics, the norm and the stop flag come back in a single read-back."""
    device, accum, names = run.runtime.device, len(batches), None
    sums: torch.Tensor | None = None
    for micro, batch in enumerate(batches):
        last = micro == accum - 1
        if run.sharded:
            run.train_model.set_requires_gradient_sync(last)
        # DDP all-reduces gradients in backward: only on the last micro-batch
        sync = run.train_model.no_sync() if run.runtime.distributed and not run.sharded and not last else nullcontext()
        try:
            with sync:
                with run.autocast:
                    loss, metrics = run.objective.loss(run.train_model, to_device(batch, device))
                    loss = loss / accum
                run.scaler.scale(loss).backward()
        except torch.cuda.OutOfMemoryError:
            raise TrainingOOMError(oom_advice(run.cfg, device, run.state.step, micro)) from None
        names = sorted(metrics) if names is None else names
        values = torch.stack([loss.detach().float(), *(metrics[n].detach().float().reshape(()) / accum for n in names)])
        sums = values if sums is None else sums + values
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    grad_norm = clip_and_step(run.optimizer, run.scaler, run.params, run.cfg.grad_clip)
    reduced = torch.cat([sums, torch.tensor([float(signal_received)], device=device)])
    if run.runtime.distributed:
        dist.all_reduce(reduced)
        reduced[:-1] /= run.runtime.world_size
    values = torch.cat([reduced, grad_norm.detach().float().reshape(1)]).tolist()
    return StepResult(
        loss=values[0],
        grad_norm=values[-1],
        metrics=dict(zip(names, values[1:-2])),
        signalled=values[-2] > 0,
        scale=scale,
    )
