"""One training run's state, built once by :func:`setup` (data, model, transforms, optimizer, scaler, resume),
and the symmetric :func:`save` / :func:`restore` over it."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.format import DatasetPaths, PackedFiles

from ..model import Llama, LlamaConfig, ModelOptions
from ..precision import DTYPES, resolve_precision
from . import adapters
from . import checkpoint as ckpt
from .config import TrainConfig, check_seq_len
from .data import BatchSource, DatasetFactory, load_val_batches
from .objectives import Objective
from .resume import check_init, check_model_config, check_resume_settings, resolve_init, resolve_resume
from .runtime import Runtime, cap_memory, shard_fsdp

log = logging.getLogger(__name__)


AUTOCAST_DTYPES = {name: dtype for name, dtype in DTYPES.items() if name != "fp32"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    lora: adapters.LoraRun | None = None  # a LoRA run: checkpoints hold the adapters only
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
    tied = ckpt.tied_parameters(run.model)
    if run.lora is not None:  # the base is named in config.json, not copied
        model_state, tied = adapters.saved_state(run.model, model_state), {}
    path = run.out_dir / name
    if run.runtime.is_main:
        state = {
            "step": run.state.step,
            "tokens": run.state.tokens,
            "elapsed_s": run.elapsed(),
            "optimizer": optimizer_state,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "data": run.train_data.state_dict(),
            "objective": run.objective.state_dict(),
            "rng": ckpt.rng_state(),
        }
        ckpt.save_checkpoint(
            run.out_dir,
            name,
            model_state,
            state,
            config_record(run),
            keep_last=run.cfg.keep_last,
            update_latest=update_latest,
            tied=tied,
        )
        log.info("saved checkpoint %s", path)
    if run.runtime.distributed:
        dist.barrier()
    return path


def config_record(run: Run) -> dict[str, Any]:
    """What a checkpoint's ``config.json`` says of the run (JSON values): model, training settings, data, step."""
    return {
        "model": dataclasses.asdict(run.model_config),
        "train": dataclasses.asdict(run.cfg),
        **run.record,
        "step": run.state.step,
        "tokens": run.state.tokens,
        "world_size": run.runtime.world_size,
    }


def restore(run: Run, path: Path) -> dict[str, Any]:
    """Load what :func:`save` wrote into the run (the RNG state is returned, to be set right before the loop); a
    change of settings that breaks exact resume is refused unless allowed, and recorded."""
    saved = ckpt.read_config(path)
    check_model_config(saved.get("model", {}), run.model_config, path)
    _record_changes(run, saved, path)
    trainer_state = ckpt.load_trainer_state(path / ckpt.TRAINER_FILE)
    if run.lora is not None:  # the base weights are already in (setup loaded them); the adapters come from here
        adapters.load_adapters(path, run.model)
        run.optimizer.load_state_dict(trainer_state["optimizer"])
    else:
        ckpt.restore_training_state(run.model, run.optimizer, path, trainer_state["optimizer"], sharded=run.sharded)
    if trainer_state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(trainer_state["scaler"])
    run.train_data.load_state_dict(trainer_state["data"])
    run.objective.load_state_dict(trainer_state.get("objective") or {})
    run.state = TrainState(int(trainer_state["step"]), int(trainer_state["tokens"]), float(trainer_state["elapsed_s"]))
    return trainer_state["rng"]


def _record_changes(run: Run, saved: dict[str, Any], path: Path) -> None:
    """Check this run's settings against the checkpoint's; log what changed and add it to the run's history."""
    current = json.loads(json.dumps(config_record(run)))  # JSON values, as the saved side has
    changed, breaking = check_resume_settings(saved, current, path, run.cfg.allow_config_change)
    history = list(saved.get("config_changes") or [])
    if changed:
        listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        if run.runtime.is_main:
            exactness = "; resume is no longer exact (--allow-config-change)" if breaking else ""
            log.warning("resuming %s with changed settings: %s%s", path, listed, exactness)
        history.append({"step": saved.get("step"), "changed": changed, "breaks_exact_resume": breaking})
    if history:
        run.record["config_changes"] = history


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


def _build_model(
    model_config: LlamaConfig,
    options: ModelOptions,
    runtime: Runtime,
    init_from: Path | None,
    init_config: dict[str, Any],
    transforms: Sequence[ModelTransform],
    sharded: bool,
) -> Llama:
    """The model on its device: --init's weights, then the transforms, then FSDP's sharding."""
    model = Llama(model_config, options).to(runtime.device)
    if init_from is not None:  # weights only (a LoRA run's merged): optimizer, schedule and data start fresh
        model = adapters.load_weights(init_from, init_config, model)
        if runtime.is_main:
            step = f" (step {init_config['step']})" if "step" in init_config else ""
            log.info("initialised from %s%s", init_from, step)
    for transform in transforms:
        model = transform(model)
    if sharded:  # before the optimizer is built: sharding replaces the parameters
        shard_fsdp(model, model.model.layers)
    return model


def setup(
    model_config: LlamaConfig,
    cfg: TrainConfig,
    train_path: Path,
    val_path: str | Path | None,
    tokenizer_sha256: str | None,
    runtime: Runtime,
    dataset_factory: DatasetFactory,
    task: dict[str, Any] | None,
    objective: Objective,
    transforms: Sequence[ModelTransform] = (),
) -> tuple[Run, Any]:
    """Data, model, optimizer and scaler of a run, resumed when its ``out_dir`` holds a checkpoint; returns the run
    and the RNG state to set right before the loop (None for a fresh run)."""
    out_dir = Path(cfg.out_dir)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(out_dir)
    resume_from = resolve_resume(cfg.resume, out_dir)
    precision, seq_len = _prepare(model_config, cfg, runtime)
    open_data = partial(
        dataset_factory,
        tokenizer_sha256=tokenizer_sha256,
        seq_len=seq_len,
        cfg=cfg,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    train_data = open_data(train_path, validation=False)
    init_from, init_config = resolve_init(cfg.init) if cfg.init and resume_from is None else (None, {})
    _check_fits(model_config, train_data.files, train_path, init_from, init_config)
    val_path, val_batches = _validation(open_data, train_path, val_path, cfg)
    sharded = cfg.parallel == "fsdp" and runtime.distributed
    lora = _plan_lora(cfg, init_from, resume_from, sharded)
    if lora is not None:  # the adapters go on first, then the task's own transforms
        transforms = (adapters.lora_transform(lora, AUTOCAST_DTYPES.get(precision), runtime.is_main), *transforms)
    weights_from, weights_config = init_from, init_config
    if lora is not None and resume_from is not None:  # a resumed LoRA run rebuilds its base first
        weights_from, weights_config = lora.base, ckpt.read_config(lora.base)
    options = cfg.model_options()
    model = _build_model(model_config, options, runtime, weights_from, weights_config, transforms, sharded)
    optimizer = _optimizer(model, cfg, runtime.device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len * runtime.world_size
    tokenizer_ref = {key: train_data.files.meta.get("tokenizer", {}).get(key) for key in ("path", "sha256")}
    files = train_data.files
    data_ref = {
        "train": str(train_path),
        "val": str(val_path) if val_path else None,
        "train_size": f"{files.n_docs:,} documents, {files.n_tokens:,} tokens",
    }
    record = {"tokenizer": tokenizer_ref, "data": data_ref, "init": str(init_from) if init_from else None}
    if lora is not None:
        record["lora"] = lora.record
    run = Run(
        cfg=cfg,
        model_config=model_config,
        runtime=runtime,
        objective=objective,
        model=model,
        **_callables(model, cfg, runtime, sharded),
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=precision == "fp16"),
        autocast=torch.autocast(runtime.device.type, AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32"),
        params=[p for group in optimizer.param_groups for p in group["params"]],
        train_data=train_data,
        val_batches=val_batches,
        seq_len=seq_len,
        precision=precision,
        tokens_per_step=tokens_per_step,
        total_steps=cfg.total_steps(tokens_per_step),
        sharded=sharded,
        record={**record, "task": task, "objective": objective.name},
        init_from=init_from,
        resumed_from=resume_from,
        lora=lora,
    )
    if hasattr(train_data, "bind"):  # a source that samples from the model being trained (GRPO's rollouts)
        train_data.bind(run)
    return run, _resume(run, resume_from)


def _plan_lora(cfg: TrainConfig, init_from: Path | None, resume_from: Path | None, sharded: bool) -> Any:
    """The run's :class:`~llama.training.adapters.LoraRun` (None without --lora); a resumed LoRA run given --init
    must name the same base."""
    resumed = ckpt.read_config(resume_from) if resume_from is not None else None
    lora = adapters.plan_lora(cfg.lora, init_from, resumed, resume_from, sharded)
    if lora is not None and resume_from is not None and cfg.init:
        adapters.check_init_is_base(resolve_init(cfg.init)[0], lora, resume_from)
    return lora


def _validation(
    open_data: Callable[..., Any], train_path: Path, val_path: str | Path | None, cfg: TrainConfig
) -> tuple[str | Path | None, list]:
    """The validation set (``--val``, else the ``.val`` beside the training data) and its fixed batches."""
    if val_path is None and DatasetPaths.of(train_path).val().bin.exists():
        val_path = DatasetPaths.of(train_path).val().prefix
    if not (val_path and cfg.eval_every):
        return val_path, []
    return val_path, load_val_batches(open_data(Path(val_path), validation=True), cfg)


def _check_fits(
    model_config: LlamaConfig, files: PackedFiles, train_path: Path, init_from: Path | None, init_config: dict
) -> None:
    """--init's checkpoint fits this run (first: a tokenizer mismatch is the likelier story), the data the model."""
    if init_from is not None:
        check_init(init_from, init_config, model_config, files)
    if files.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"{train_path} holds ids up to {files.vocab_size - 1}, more than the model's "
            f"vocab_size {model_config.vocab_size}: build the model with the tokenizer's vocabulary"
        )


def _optimizer(model: Llama, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused on CUDA), weight decay on matrices only."""
    groups = model.configure_optimizer_groups(cfg.weight_decay)
    betas, fused = (cfg.beta1, cfg.beta2), device.type == "cuda" or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)


def _callables(model: Llama, cfg: TrainConfig, runtime: Runtime, sharded: bool) -> dict[str, nn.Module]:
    """What a training step calls (compiled and/or DDP-wrapped) and what validation calls (never DDP-wrapped)."""
    compiled = torch.compile(model) if cfg.compile else model
    train_model = compiled
    if runtime.distributed and not sharded:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(compiled, device_ids=device_ids)
    return {"train_model": train_model, "eval_model": compiled}


def _resume(run: Run, resume_from: Path | None) -> Any:
    """Weights, optimizer, scaler, data position, objective and counters from ``resume_from``; its RNG state, to
    set right before the loop (None for a fresh run)."""
    if resume_from is None:
        return None
    rng = restore(run, resume_from)
    if run.runtime.is_main and run.state.step >= run.total_steps:
        limit = f"--steps above {run.state.step}" if run.cfg.steps is not None else f"--tokens (now {run.cfg.tokens:,})"
        log.warning(
            "%s is at step %d and this run stops at step %d: the run is already complete, nothing to train; to train "
            "further, raise %s",
            resume_from,
            run.state.step,
            run.total_steps,
            limit,
        )
    elif run.runtime.is_main:
        log.warning(
            "RESUMING from %s: step %d, %s tokens seen; continuing to step %d",
            resume_from,
            run.state.step,
            f"{run.state.tokens:,}",
            run.total_steps,
        )
    return rng
