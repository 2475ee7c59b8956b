"""The one training loop: precision, accumulation, clipping, schedule, validation, checkpoints, resume, DDP/FSDP.

    result = train(LlamaConfig.from_preset("tiny", vocab_size=8000), TrainConfig(steps=200), "out/quickstart/corpus")

Every task (pretrain, SFT, …) hands its model config and data here (a ``dataset_factory`` builds its
datasets; ``--init`` starts from another run's weights); nothing else checkpoints or logs. The loop
reads top to bottom in :func:`train`: build, maybe resume, then per step set the
learning rate, run ``grad_accum`` micro-batches (DDP syncs gradients on the last only), unscale,
clip, step (skipped when the gradients are not finite), evaluate, log, save.

Resume is exact: a run killed at any moment and restarted in the same ``out_dir`` (it resumes on its
own) continues with bit-identical losses on CPU, because the checkpoint holds the model, the
optimizer, the grad scaler, the data sampler's position and every RNG. SIGINT/SIGTERM save a
checkpoint after the current step and stop with :class:`TrainingInterrupted` (exit code 130/143).

Under ``torchrun --nproc_per_node=N`` the same call runs data-parallel: each rank reads its own
shard; rank 0 logs and saves. Also runnable directly for quick runs and tests:
``python -m llama.train --train out/quickstart/corpus --steps 100 --model kernels=torch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from engine.dataset import PretrainDataset
from engine.format import DatasetPaths, PackedFiles, open_packed
from engine.tokenizer import tokenizer_mismatch

from . import checkpoint as ckpt
from . import objectives
from .hardware import (
    Runtime, cap_memory, device_peak_tflops, memory_report, mfu, peak_memory_gib, setup_runtime, shard_fsdp, teardown_runtime,
)
from .metrics import MetricsLogger, summary_line
from .model import FREE_ON_INIT, KERNEL_CHOICES, Llama, LlamaConfig, ModelOptions
from .objectives import Objective
from .precision import DTYPES, resolve_precision

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "sqrt")
PARALLEL = ("ddp", "fsdp")
DATA_MODES = ("random", "epoch")
#: ``--model`` items that are run options (:class:`ModelOptions`), and the TrainConfig field each one sets.
OPTION_FIELDS = {"kernels": "kernels", "checkpointing": "activation_checkpointing", "dropout": "dropout"}
AUTOCAST_DTYPES = {name: dtype for name, dtype in DTYPES.items() if name != "fp32"}


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """How to train; each field's ``metadata['help']`` is its one-line ``--help``."""

    steps: int | None = _opt(None, "optimizer steps to train (give this or --tokens)")
    tokens: int | None = _opt(None, "tokens to train on, rounded up to whole steps (instead of --steps)")
    batch_size: int = _opt(8, "sequences per micro-batch on each device")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    seq_len: int | None = _opt(None, "tokens per sequence (default: the model's max_seq_len)")
    data_mode: str = _opt("random", "'random' windows or 'epoch' (shuffled non-overlapping chunks)", choices=DATA_MODES)
    doc_masking: bool = _opt(False, "attend only within each packed document (position and document ids)")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr: float = _opt(3e-5, "learning rate at the end of the decay")
    warmup_steps: int = _opt(100, "steps of linear warmup from ~0 to --lr")
    schedule: str = _opt("cosine", "'cosine' decay, 'wsd' (warmup-stable-decay) or 'constant'", choices=SCHEDULES)
    decay_fraction: float = _opt(0.2, "wsd: share of the steps spent decaying at the end")
    decay_shape: str = _opt("linear", "wsd: decay 'linear' or '1-sqrt' shaped ('sqrt')", choices=DECAY_SHAPES)
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only, never norms)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping; the norm is logged)")
    precision: str = _opt("auto", "'fp32', 'fp16' (loss scaling), 'bf16', or 'auto' (bf16/fp16 on GPU, fp32 on CPU)",
                          choices=PRECISIONS)
    compile: bool = _opt(False, "torch.compile the model")
    kernels: str = _opt("auto", "'triton' (fused kernels), 'torch' (plain PyTorch) or 'auto' (Triton on CUDA)",
                        choices=KERNEL_CHOICES)
    activation_checkpointing: bool | None = _opt(None, "recompute activations in backward to save memory (default: "
                                                       "off; pretrain and sft: the profile's plan)")
    dropout: float = _opt(0.0, "dropout on the embeddings and each sub-layer's output (0 = none)")
    parallel: str = _opt("ddp", "multi-GPU under torchrun: 'ddp' (replicate) or 'fsdp' (shard, FSDP2)", choices=PARALLEL)
    device: str | None = _opt(None, "'cuda', 'cuda:1' or 'cpu' (default: the GPU when there is one)")
    max_memory_gb: float | None = _opt(None, "cap GPU memory to this many GiB (rehearse a smaller card)")
    eval_every: int = _opt(500, "validate every N steps and at the end (0 = never)")
    eval_batches: int = _opt(20, "fixed validation batches per evaluation")
    save_every: int = _opt(1000, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = _opt(3, "checkpoints kept in --out-dir (0 = all)")
    log_every: int = _opt(10, "log metrics every N steps")
    seed: int = _opt(1337, "seed of the model init, the data order and every RNG")
    out_dir: str = _opt("out/train", "where checkpoints, metrics.jsonl and plots go")
    resume: bool | str | None = _opt(None, "auto (default: resume if --out-dir holds a checkpoint), true, false, or a checkpoint path")
    init: str | None = _opt(None, "start from the weights of this checkpoint (a step_N folder or an --out-dir holding one); "
                                  "optimizer and schedule start fresh; ignored when resuming")
    peak_tflops: float | None = _opt(None, "the GPU's peak TFLOPS for MFU (default: looked up by name)")
    nan_patience: int = _opt(5, "stop after this many non-finite losses in a row (0 = never)")
    progress: bool = _opt(True, "show a progress bar")

    def validate(self) -> None:
        """Refuse contradictory or out-of-range settings with a one-line reason."""
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of --steps and --tokens")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name, choices in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES),
                              ("parallel", PARALLEL), ("data_mode", DATA_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        self.model_options()  # kernels and dropout in range
        if min(self.warmup_steps, self.eval_every, self.save_every, self.keep_last, self.nan_patience) < 0 or self.log_every < 1:
            raise ValueError("--warmup-steps, --eval-every, --save-every, --keep-last, --nan-patience must be >= 0, --log-every >= 1")

    def model_options(self) -> ModelOptions:
        """How the model runs in this run: kernels, activation checkpointing, dropout."""
        return ModelOptions(self.kernels, bool(self.activation_checkpointing), self.dropout)

    def total_steps(self, tokens_per_step: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.tokens / tokens_per_step))


class TrainingError(RuntimeError):
    """Training cannot go on (one-line message); CLIs print it as ``error: …``."""


class NonFiniteLossError(TrainingError):
    """The loss was NaN/inf for ``nan_patience`` steps in a row."""


class TrainingOOMError(TrainingError):
    """The GPU ran out of memory; the message says which setting would fit."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal (130, 143)."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum


@dataclass
class TrainResult:
    """What a run did. ``model`` is the trained (unwrapped) module, sharded under FSDP."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    train_loss: float | None
    val_loss: float | None
    mfu: float | None
    peak_memory_gib: float | None
    out_dir: Path
    checkpoint: Path | None
    resumed_from: Path | None
    first_batch_sha256: str | None  # this rank's first micro-batch: shows ranks read different shards
    initial_val_loss: float | None = None  # before the first step of a run started from --init (the fine-tune's baseline)
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> str:
        return summary_line(steps=self.steps, tokens=self.tokens, seconds=self.seconds, tokens_per_s=self.tokens_per_s,
                            train_loss=self.train_loss, val_loss=self.val_loss, mfu=self.mfu,
                            peak_memory_gib=self.peak_memory_gib)


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


class StopSignals:
    """SIGINT/SIGTERM become a request that the loop honours after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_resume(resume: bool | str | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``None``/``'auto'`` → ``out_dir``'s if any; True → required; a path → that one;
    False → none (and ``out_dir`` must hold no checkpoint)."""
    if resume is False or (isinstance(resume, str) and resume.lower() in ("false", "no", "never")):
        existing = ckpt.list_checkpoints(out_dir)
        if existing:
            raise ckpt.CheckpointError(
                f"{out_dir} holds checkpoints up to step {existing[-1][0]} and resume is off: choose another "
                "--out-dir, or delete them to start over (they are never overwritten silently)"
            )
        return None
    if isinstance(resume, str) and resume.lower() not in ("auto", "true", "yes"):
        found = ckpt.find_checkpoint(resume)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {resume}: give a step_N folder or an --out-dir holding one")
        return found
    found = ckpt.find_checkpoint(out_dir)
    if found is None and (resume is True or (isinstance(resume, str) and resume.lower() in ("true", "yes"))):
        raise ckpt.CheckpointError(f"resume was asked for, but {out_dir} holds no checkpoint")
    return found


def check_model_config(saved: dict[str, Any], current: LlamaConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint into a differently shaped model, naming the first field that differs."""
    try:
        theirs = LlamaConfig.from_saved(saved, str(checkpoint / ckpt.CONFIG_FILE))
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    for key, value, saved_value in current.differences(theirs)[:1]:
        raise ckpt.CheckpointError(
            f"{checkpoint} was saved for a model with {key}={saved_value!r}, this run has {key}={value!r}: "
            "resume with the same model settings, or use another --out-dir"
        )


def oom_advice(cfg: TrainConfig, device: torch.device, step: int, micro: int) -> str:
    """A one-line account of an out-of-memory error with the change most likely to fit."""
    where = f"out of GPU memory at step {step + 1}, micro-batch {micro + 1}/{cfg.grad_accum} ({memory_report(device)})"
    if cfg.batch_size > 1:
        fix = (f"halve --batch-size to {cfg.batch_size // 2} and double --grad-accum to {cfg.grad_accum * 2} "
               "(same tokens per step)")
    elif not cfg.activation_checkpointing:
        fix = "turn on activation checkpointing (--activation-checkpointing)"
    else:
        fix = "use a shorter --seq-len, a smaller model, or a bigger GPU"
    if not cfg.activation_checkpointing and cfg.batch_size > 1:
        fix += ", or turn on activation checkpointing"
    return f"{where}: {fix}"


class BatchSource(Protocol):
    """What the loop needs of a dataset (``engine.dataset``'s all qualify): batches, a resumable position, its files."""

    files: PackedFiles
    samples_per_epoch: int

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DatasetFactory(Protocol):
    """Builds the training stream (``validation=False``) or the validation set of one rank; each task passes its own."""

    def __call__(self, path: Path, seq_len: int, *, validation: bool, cfg: TrainConfig, rank: int, world_size: int,
                 tokenizer_sha256: str | None) -> BatchSource: ...


def pretrain_dataset(path: Path, seq_len: int, *, validation: bool, cfg: TrainConfig, rank: int, world_size: int,
                     tokenizer_sha256: str | None) -> PretrainDataset:
    """The default factory: ``--data-mode`` windows for training, seed-0 epoch chunks for validation."""
    return PretrainDataset(path, seq_len, mode="epoch" if validation else cfg.data_mode, seed=0 if validation else cfg.seed,
                           rank=rank, world_size=world_size, return_doc_ids=cfg.doc_masking,
                           tokenizer_sha256=tokenizer_sha256)


def load_val_batches(data: BatchSource, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The fixed validation batches of this rank: the first ``eval_batches`` of the validation set's order."""
    count = max(1, min(cfg.eval_batches, data.samples_per_epoch // cfg.batch_size))
    return [data.next_batch(cfg.batch_size) for _ in range(count)]


def resolve_init(init: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--init`` names and its config; a one-line error when there is none."""
    found = ckpt.find_checkpoint(init)
    if found is None:
        raise ckpt.CheckpointError(f"--init {init}: no checkpoint there (give a step_N folder or an --out-dir holding one)")
    return found, ckpt.read_config(found)


def check_init(init: Path, saved: dict[str, Any], model_config: LlamaConfig, data: PackedFiles) -> None:
    """Refuse an --init checkpoint of another architecture or tokenizer than this run's, naming both sides."""
    theirs = saved.get("tokenizer") or {}
    ours = data.meta.get("tokenizer") or {}
    refusal = tokenizer_mismatch(theirs, ours, owner=f"--init {init}", other=f"{data.paths.prefix}'s tokenizer",
                                 fix="re-pack the data with the checkpoint's tokenizer")
    if refusal:
        raise ckpt.CheckpointError(refusal)
    if not (theirs.get("sha256") and ours.get("sha256")):
        log.warning("cannot check that --init %s and %s share a tokenizer: one of them records none", init,
                    data.paths.prefix)
    try:
        theirs_config = LlamaConfig.from_saved(saved.get("model"), f"--init {init}")
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    for key, ours, theirs in model_config.differences(theirs_config, ignore=FREE_ON_INIT)[:1]:
        raise ckpt.CheckpointError(
            f"--init {init} holds a model with {key}={theirs!r}, this run builds {key}={ours!r}: "
            "build the same architecture (its config.json lists it), or start from another checkpoint"
        )
    changed = {key: getattr(model_config, key) for key in ("max_seq_len", "rope_scaling")
               if getattr(theirs_config, key) != getattr(model_config, key)}
    if changed:
        log.warning("--init %s: this run changes %s from the checkpoint's", init, changed)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                  grad_clip: float) -> torch.Tensor:
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


#: A model transform (LoRA adapters, weight-only quantisation, freezing): runs on the built model, after --init's
#: weights are loaded and before the optimizer is built (which skips frozen parameters); returns the model.
ModelTransform = Callable[[Llama], Llama]


@dataclass
class TrainState:
    """The counters a checkpoint holds beside the weights, optimizer, scaler, data position, objective and RNG."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # training time before this process started (resumed runs)


@dataclass
class Run:
    """Everything one training run holds, built once by :func:`setup`; the loop and :func:`save` read it."""

    cfg: TrainConfig
    model_config: LlamaConfig
    runtime: Runtime
    objective: Objective
    model: Llama  # the weights that are saved
    train_model: nn.Module  # what a training step calls: the model, compiled and/or data-parallel
    eval_model: nn.Module  # what validation calls (compiled, never DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    params: list[nn.Parameter]
    train_data: BatchSource
    val_batches: list[dict[str, torch.Tensor]]
    seq_len: int
    precision: str
    tokens_per_step: int
    total_steps: int
    sharded: bool  # FSDP
    record: dict[str, Any]  # what every checkpoint's config.json says about the run besides the step
    init_from: Path | None = None  # --init's checkpoint (a fresh run only)
    resumed_from: Path | None = None
    state: TrainState = field(default_factory=TrainState)
    started: float = field(default_factory=time.perf_counter)  # when this process's training began

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.perf_counter() - self.started


def save(run: Run, name: str, update_latest: bool = True) -> Path:
    """Checkpoint the run as it is now (every rank calls it; rank 0 writes): the inverse of :func:`restore`."""
    model_state, optimizer_state = ckpt.gather_training_state(run.model, run.optimizer, sharded=run.sharded)
    path = run.out_dir / name
    if run.runtime.is_main:
        state = {"step": run.state.step, "tokens": run.state.tokens, "elapsed_s": run.elapsed(),
                 "optimizer": optimizer_state, "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                 "data": run.train_data.state_dict(), "objective": run.objective.state_dict(), "rng": ckpt.rng_state()}
        config = {"model": dataclasses.asdict(run.model_config), "train": dataclasses.asdict(run.cfg), **run.record,
                  "step": run.state.step, "tokens": run.state.tokens, "world_size": run.runtime.world_size}
        ckpt.save_checkpoint(run.out_dir, name, model_state, state, config, keep_last=run.cfg.keep_last,
                             update_latest=update_latest, tied=ckpt.tied_parameters(run.model))
        log.info("saved checkpoint %s", path)
    if run.runtime.distributed:
        dist.barrier()
    return path


def restore(run: Run, path: Path) -> dict[str, Any]:
    """Load what :func:`save` wrote into the run (the RNG state is returned, to be set right before the loop)."""
    trainer_state = ckpt.load_trainer_state(path / ckpt.TRAINER_FILE)
    check_model_config(ckpt.read_config(path).get("model", {}), run.model_config, path)
    ckpt.restore_training_state(run.model, run.optimizer, path, trainer_state["optimizer"], sharded=run.sharded)
    if trainer_state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(trainer_state["scaler"])
    run.train_data.load_state_dict(trainer_state["data"])
    run.objective.load_state_dict(trainer_state.get("objective") or {})
    run.state = TrainState(int(trainer_state["step"]), int(trainer_state["tokens"]), float(trainer_state["elapsed_s"]))
    return trainer_state["rng"]


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
    return StepResult(loss=values[0], grad_norm=values[-1], metrics=dict(zip(names, values[1:-2])),
                      signalled=values[-2] > 0, scale=scale)


def train(model_config: LlamaConfig, cfg: TrainConfig, train_path: str | Path, val_path: str | Path | None = None,
          tokenizer_sha256: str | None = None, *, dataset_factory: DatasetFactory = pretrain_dataset,
          task: dict[str, Any] | None = None, objective: Objective | None = None,
          transforms: Sequence[ModelTransform] = ()) -> TrainResult:
    """Train a :class:`Llama` built from ``model_config`` on the packed data ``train_path``; see the module doc.

    ``val_path=None`` uses ``train_path``'s ``.val`` sibling when it exists. ``tokenizer_sha256``
    refuses data packed with another tokenizer. ``dataset_factory`` builds the datasets (default:
    pretraining windows; ``llama.sft`` passes conversation rows). ``objective`` is the loss and what
    validation reports (default :class:`llama.objectives.Pretrain`; see :mod:`llama.objectives`).
    ``transforms`` change the built model before the optimizer is made (see :data:`ModelTransform`).
    ``cfg.init`` starts from a checkpoint's weights, which must fit ``model_config`` and the data's
    tokenizer. ``task`` is saved in every checkpoint's ``config.json`` (e.g. the chat template an SFT
    run used). Raises :class:`TrainingError` subclasses, :class:`TrainingInterrupted`, and
    ``ValueError``/``OSError`` for bad input (all one-line).
    """
    cfg.validate()
    runtime = setup_runtime(cfg.device)
    try:
        run, rng = setup(model_config, cfg, Path(train_path), val_path, tokenizer_sha256, runtime, dataset_factory,
                         task, objective or objectives.Pretrain(), transforms)
        return _loop(run, rng)
    finally:
        teardown_runtime(runtime)


def _prepare(model_config: LlamaConfig, cfg: TrainConfig, runtime: Runtime) -> tuple[str, int]:
    """The run's precision and sequence length; device settings."""
    device = runtime.device
    precision = resolve_precision(cfg.precision, device)
    if precision == "fp16" and cfg.parallel == "fsdp" and runtime.distributed:
        raise ValueError("--parallel fsdp supports fp32 and bf16, not fp16 (its loss scaler is per rank): use bf16")
    seq_len = check_seq_len(cfg.seq_len or model_config.max_seq_len, model_config)
    cap_memory(cfg.max_memory_gb, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cfg.seed)
    return precision, seq_len


def check_seq_len(seq_len: int, config: LlamaConfig, whose: str = "the model's") -> int:
    """``seq_len`` when it fits ``config``'s context, else a one-line error naming what does."""
    if seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} is longer than {whose} context of {config.max_seq_len} tokens; "
                         f"use --seq-len {config.max_seq_len} or less (or --model max_seq_len={seq_len})")
    return seq_len


def _build_model(model_config: LlamaConfig, options: ModelOptions, runtime: Runtime, init_from: Path | None, init_config: dict[str, Any],
                 transforms: Sequence[ModelTransform], sharded: bool) -> Llama:
    """The model on its device: --init's weights, then the transforms, then FSDP's sharding."""
    model = Llama(model_config, options).to(runtime.device)
    if init_from is not None:  # weights only: optimizer, schedule and data start fresh
        ckpt.load_model_weights(init_from, model)
        if runtime.is_main:
            log.info("initialised from %s (step %s)", init_from, init_config.get("step"))
    for transform in transforms:
        model = transform(model)
    if sharded:  # before the optimizer is built: sharding replaces the parameters
        shard_fsdp(model, model.model.layers)
    return model


def setup(model_config: LlamaConfig, cfg: TrainConfig, train_path: Path, val_path: str | Path | None,
          tokenizer_sha256: str | None, runtime: Runtime, dataset_factory: DatasetFactory, task: dict[str, Any] | None,
          objective: Objective, transforms: Sequence[ModelTransform] = ()) -> tuple[Run, Any]:
    """Data, model, optimizer and scaler of a run, resumed when its ``out_dir`` holds a checkpoint; returns the run
    and the RNG state to set right before the loop (None for a fresh run)."""
    out_dir = Path(cfg.out_dir)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(out_dir)
    resume_from = resolve_resume(cfg.resume, out_dir)
    precision, seq_len = _prepare(model_config, cfg, runtime)

    # ---- data: this rank's part of the training stream, fixed validation batches
    dataset_args = dict(seq_len=seq_len, cfg=cfg, rank=runtime.rank, world_size=runtime.world_size,
                        tokenizer_sha256=tokenizer_sha256)
    train_data = dataset_factory(train_path, validation=False, **dataset_args)
    init_from, init_config = resolve_init(cfg.init) if cfg.init and resume_from is None else (None, {})
    if init_from is not None:  # before the vocabulary check: a tokenizer mismatch is the likelier story
        check_init(init_from, init_config, model_config, train_data.files)
    if train_data.files.vocab_size > model_config.vocab_size:
        raise ValueError(f"{train_path} holds ids up to {train_data.files.vocab_size - 1}, more than the model's "
                         f"vocab_size {model_config.vocab_size}: build the model with the tokenizer's vocabulary")
    if val_path is None and DatasetPaths.of(train_path).val().bin.exists():
        val_path = DatasetPaths.of(train_path).val().prefix
    val_batches = (load_val_batches(dataset_factory(Path(val_path), validation=True, **dataset_args), cfg)
                   if val_path and cfg.eval_every else [])
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len * runtime.world_size

    # ---- model, optimizer, loss scaler
    sharded = cfg.parallel == "fsdp" and runtime.distributed
    model = _build_model(model_config, cfg.model_options(), runtime, init_from, init_config, transforms, sharded)
    device = runtime.device
    optimizer = torch.optim.AdamW(model.configure_optimizer_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda" or None)
    compiled = torch.compile(model) if cfg.compile else model
    train_model = compiled
    if runtime.distributed and not sharded:
        train_model = nn.parallel.DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    tokenizer_ref = {key: train_data.files.meta.get("tokenizer", {}).get(key) for key in ("path", "sha256")}
    record = {"tokenizer": tokenizer_ref, "data": {"train": str(train_path), "val": str(val_path) if val_path else None},
              "init": str(init_from) if init_from else None, "task": task, "objective": objective.name}
    run = Run(cfg=cfg, model_config=model_config, runtime=runtime, objective=objective, model=model,
              train_model=train_model, eval_model=compiled, optimizer=optimizer,
              scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
              autocast=torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32"),
              params=[p for group in optimizer.param_groups for p in group["params"]], train_data=train_data,
              val_batches=val_batches, seq_len=seq_len, precision=precision, tokens_per_step=tokens_per_step,
              total_steps=cfg.total_steps(tokens_per_step), sharded=sharded, record=record, init_from=init_from,
              resumed_from=resume_from)

    # ---- resume: weights, optimizer, scaler, data position, objective, counters (the RNG comes back last)
    rng = None
    if resume_from is not None:
        rng = restore(run, resume_from)
        if runtime.is_main:
            log.warning("RESUMING from %s: step %d, %s tokens seen; continuing to step %d", resume_from,
                        run.state.step, f"{run.state.tokens:,}", run.total_steps)
    return run, rng


def _log_record(run: Run, step: StepResult, lr: float, tokens_per_s: float, mfu_now: float | None,
                val: dict[str, float] | None) -> dict[str, Any]:
    """One metrics-log line: the step's figures, the objective's metrics and, after an evaluation, its metrics."""
    record = {"step": run.state.step, "tokens": run.state.tokens, "loss": step.loss, "lr": lr,
              "grad_norm": step.grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu_now, "scale": step.scale,
              "peak_memory_gib": peak_memory_gib(run.runtime.device), "time": run.elapsed(), **step.metrics}
    if val is not None:
        record.update({f"val_{name}": value for name, value in val.items()})
        if "loss" in val:
            record["val_ppl"] = math.exp(min(val["loss"], 50.0))
    return record


@dataclass
class _Progress:
    """What the loop carries from step to step besides :class:`TrainState`: for the log and the result."""

    start_tokens: int
    saved_at: Path | None
    last: StepResult | None = None
    val_loss: float | None = None
    mfu: float | None = None
    initial_val_loss: float | None = None
    first_batch_sha256: str | None = None
    bad_steps: int = 0
    window_tokens: int = 0  # since the last log line
    window_seconds: float = 0.0


def _loop(run: Run, rng: Any) -> TrainResult:
    """The step loop: learning rate, one :func:`train_step`, the finite-loss check, then evaluate / log / save."""
    cfg, state, is_main = run.cfg, run.state, run.runtime.is_main
    flops_per_token = run.model.flops_per_token(run.seq_len)
    peak = device_peak_tflops(run.runtime.device, cfg.peak_tflops)
    if is_main:
        _log_start(run, flops_per_token)
    metrics = MetricsLogger(run.out_dir, enabled=is_main, start_step=state.step, total_steps=run.total_steps,
                            progress=cfg.progress)
    if rng is not None:
        ckpt.set_rng_state(rng)
    p = _Progress(start_tokens=state.tokens, saved_at=run.resumed_from)
    run.started = time.perf_counter()
    p.initial_val_loss = _initial_validation(run)
    try:
        with StopSignals() as signals, logging_redirect_tqdm():
            while state.step < run.total_steps:
                step_started = time.perf_counter()
                lr = learning_rate(state.step, cfg, run.total_steps)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                batches = [run.train_data.next_batch(cfg.batch_size) for _ in range(cfg.grad_accum)]
                p.first_batch_sha256 = p.first_batch_sha256 or hashlib.sha256(
                    batches[0]["input_ids"].numpy().tobytes()).hexdigest()
                p.last = train_step(run, batches, signals.received or 0)
                step_tokens = sum(run.objective.tokens(b) for b in batches) * run.runtime.world_size
                state.step, state.tokens = state.step + 1, state.tokens + step_tokens
                stop_signal = signals.received or (signal.SIGTERM if p.last.signalled else 0)
                p.bad_steps = _check_finite(run, p.last, p.bad_steps)
                p.window_tokens += step_tokens
                p.window_seconds += time.perf_counter() - step_started

                val, done = None, state.step == run.total_steps
                if run.val_batches and (state.step % cfg.eval_every == 0 or done):
                    val = evaluate(run)
                    p.val_loss = val.get("loss", p.val_loss)
                if state.step % cfg.log_every == 0 or done or val is not None or stop_signal:
                    tokens_per_s = p.window_tokens / max(p.window_seconds, 1e-9)
                    p.mfu = mfu(flops_per_token, tokens_per_s / run.runtime.world_size, peak)
                    metrics.log(_log_record(run, p.last, lr, tokens_per_s, p.mfu, val))
                    p.window_tokens, p.window_seconds = 0, 0.0
                metrics.advance()
                if (cfg.save_every and state.step % cfg.save_every == 0) or done or stop_signal:
                    p.saved_at = save(run, ckpt.checkpoint_name(state.step))
                if stop_signal:
                    raise TrainingInterrupted(stop_signal, p.saved_at)
    finally:
        plot = metrics.close()
        if plot is not None:
            log.info("loss curve: %s", plot)
    return _result(run, p)


def _initial_validation(run: Run) -> float | None:
    """A run from --init first reports the starting weights' validation loss."""
    if run.init_from is None or not run.val_batches:
        return None
    loss = evaluate(run).get("loss")
    if run.runtime.is_main and loss is not None:
        log.info("validation loss before training: %.4f", loss)
    return loss


def _result(run: Run, p: _Progress) -> TrainResult:
    seconds, state = time.perf_counter() - run.started, run.state
    result = TrainResult(
        steps=state.step, tokens=state.tokens, seconds=state.elapsed_s + seconds,
        tokens_per_s=(state.tokens - p.start_tokens) / max(seconds, 1e-9),
        train_loss=p.last.loss if p.last else None, val_loss=p.val_loss, mfu=p.mfu,
        peak_memory_gib=peak_memory_gib(run.runtime.device), out_dir=run.out_dir, checkpoint=p.saved_at,
        resumed_from=run.resumed_from, first_batch_sha256=p.first_batch_sha256, initial_val_loss=p.initial_val_loss,
        model=run.model,
    )
    if run.runtime.is_main:
        log.info("%s", result.summary())
    return result


def _log_start(run: Run, flops_per_token: int) -> None:
    cfg = run.cfg
    log.info("model: %s parameters, %s FLOPs/token; %d steps of %s tokens (%d x %d x %d x %d ranks), %s, %s",
             f"{run.model.num_params():,}", f"{flops_per_token:,}", run.total_steps, f"{run.tokens_per_step:,}",
             cfg.batch_size, cfg.grad_accum, run.seq_len, run.runtime.world_size, run.precision, run.runtime.device)


def _check_finite(run: Run, step: StepResult, bad_steps: int) -> int:
    """Warn of a skipped update; count non-finite losses in a row and stop with a saved state at ``nan_patience``."""
    if not math.isfinite(step.grad_norm):
        log.log(logging.DEBUG if run.scaler.is_enabled() else logging.WARNING,
                "step %d: gradient norm is %s, update skipped", run.state.step, step.grad_norm)
    bad_steps = bad_steps + 1 if not math.isfinite(step.loss) else 0
    if run.cfg.nan_patience and bad_steps >= run.cfg.nan_patience:
        path = save(run, f"{ckpt.checkpoint_name(run.state.step)}-nonfinite", update_latest=False)
        raise NonFiniteLossError(
            f"loss was NaN/inf for {bad_steps} steps in a row, the last at step {run.state.step}; state saved in "
            f"{path} for inspection (resume continues from {ckpt.find_checkpoint(run.out_dir)}): lower --lr or use bf16")
    return bad_steps


# ---------------------------------------------------------------- command line (quick runs, tests, torchrun)


def _field_parser(hint: Any) -> tuple[type, bool]:
    """(element type, is_bool) of a TrainConfig annotation such as ``int | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0], bool in args


def parse_resume(text: str) -> bool | str | None:
    lowered = text.lower()
    return {"auto": None, "true": True, "yes": True, "false": False, "no": False}.get(lowered, text)


def add_train_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                        exclude: Sequence[str] = ()) -> None:
    """One ``--flag`` per :class:`TrainConfig` field, its help from the field's metadata; ``defaults`` override;
    ``exclude`` names fields a task fixes itself (they keep their default, or ``defaults``'s value)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            parser.set_defaults(**{f.name: (defaults or {}).get(f.name, f.default)})
            continue
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        kind, is_bool = _field_parser(hints[f.name])
        help_text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
        if f.name == "resume":
            parser.add_argument(flag, type=parse_resume, default=default, help=help_text)
        elif is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags give, run options among ``--model`` items (``kernels=torch``) applied."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, **option_overrides(getattr(args, "model", []))})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama.train", description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="packed training corpus (data/corpus or data/corpus.bin)")
    parser.add_argument("--val", help="packed validation corpus (default: the .val beside --train, if any)")
    parser.add_argument("--preset", default="tiny", help="model preset from llama.model.PRESETS (default: tiny)")
    parser.add_argument("--vocab-size", type=int, help="model vocabulary (default: the corpus meta's)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="override a LlamaConfig field, value as JSON (e.g. dim=64), or a run option "
                        "(kernels, checkpointing, dropout); repeatable")
    parser.add_argument("--tokenizer-sha256", help="refuse data packed with a tokenizer of another sha256")
    add_train_arguments(parser)
    return parser


def model_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--model KEY=VALUE`` items naming LlamaConfig fields, values read as JSON (a bare word stays a string)."""
    return {key: value for key, value in _parse_model_items(items).items() if key not in OPTION_FIELDS}


def option_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--model`` items naming run options (``kernels``, ``checkpointing``, ``dropout``), as TrainConfig values."""
    return {OPTION_FIELDS[key]: value for key, value in _parse_model_items(items).items() if key in OPTION_FIELDS}


def _parse_model_items(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)} - set(OPTION_FIELDS)
    if unknown:
        raise ValueError(f"--model: unknown field(s) {', '.join(sorted(unknown))}; see llama.model.LlamaConfig")
    return overrides


def model_config_from_args(args: argparse.Namespace) -> LlamaConfig:
    vocab_size = args.vocab_size or open_packed(args.train).vocab_size
    return LlamaConfig.from_preset(args.preset, **{"vocab_size": vocab_size, **model_overrides(args.model)})


def run_training(body: Callable[[], object]) -> int:
    """Run ``body`` (configure and train) with the task CLIs' exit codes: 0, 2 (one-line ``error:``), 128 + signal."""
    try:
        body()
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once, without a checkpoint of the current step", file=sys.stderr)
        return 130
    except (TrainingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_from_args(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, print the summary; exit code 0, 2 (error), or 128 + signal when stopped by one."""
    from engine.cli import setup_logging

    setup_logging()

    def body() -> None:
        args = build_parser().parse_args(argv)
        train(model_config_from_args(args), train_config_from_args(args), args.train, args.val, args.tokenizer_sha256)

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(run_from_args())
