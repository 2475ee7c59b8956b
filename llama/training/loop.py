"""The one training loop: precision, accumulation, clipping, schedule, validation, checkpoints, resume, DDP/FSDP.

    result = train(LlamaConfig.from_preset("tiny", vocab_size=8000), TrainConfig(steps=200), "out/quickstart/corpus")

Every task (pretrain, SFT, …) hands its model config and data here (a ``dataset_factory`` builds its
datasets; ``--init`` starts from another run's weights); nothing else checkpoints or logs. The loop
reads top to bottom in :func:`train`: build, maybe resume, then per step set the
learning rate, run ``grad_accum`` micro-batches (DDP syncs gradients on the last only), unscale,
clip, step (skipped when the gradients are not finite), evaluate, log, save.

Resume is exact: a run killed at any moment and restarted in the same ``out_dir`` (it resumes on its
own) continues with bit-identical losses on CPU, because the checkpoint holds the model, the
optimizer, the grad scaler, the data sampler's position and every RNG; a resume that changes what a step
trains on (batch size, accumulation, sequence length, data, seed, ranks) is refused unless
``allow_config_change``. SIGINT/SIGTERM save a checkpoint after the current step and stop with
:class:`TrainingInterrupted` (exit code 130/143). One run at a time holds ``out_dir`` (its ``train.lock``).

Under ``torchrun --nproc_per_node=N`` the same call runs data-parallel: each rank reads its own
shard; rank 0 logs and saves. Also runnable directly for quick runs and tests:
``python -m llama.train --train out/quickstart/corpus --steps 100 --model kernels=torch``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from ..model import LlamaConfig
from . import checkpoint as ckpt
from . import objectives
from .config import TrainConfig
from .data import DatasetFactory, pretrain_dataset
from .errors import NonFiniteLossError, TrainingInterrupted
from .metrics import MetricsLogger, summary_line
from .objectives import Objective
from .resume import claim_out_dir
from .run import ModelTransform, Run, save, setup
from .runtime import device_peak_tflops, mfu, peak_memory_gib, setup_runtime, teardown_runtime
from .step import StepResult, evaluate, learning_rate, train_step

log = logging.getLogger(__name__)


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
    initial_val_loss: float | None = (
        None  # before the first step of a run started from --init (the fine-tune's baseline)
    )
    skipped_updates: int = 0  # steps whose update was skipped for NaN/inf gradients
    model: nn.Module | None = field(default=None, repr=False)
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation's, all of them
    perplexity: bool = True  # the loss is a next-token loss (its exp is a perplexity)

    def summary(self) -> str:
        return summary_line(
            steps=self.steps,
            tokens=self.tokens,
            seconds=self.seconds,
            tokens_per_s=self.tokens_per_s,
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            mfu=self.mfu,
            peak_memory_gib=self.peak_memory_gib,
            val_extra={k: v for k, v in self.val_metrics.items() if k != "loss"},
            perplexity=self.perplexity,
        )


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


def train(
    model_config: LlamaConfig,
    cfg: TrainConfig,
    train_path: str | Path,
    val_path: str | Path | None = None,
    tokenizer_sha256: str | None = None,
    *,
    dataset_factory: DatasetFactory = pretrain_dataset,
    task: dict[str, Any] | None = None,
    objective: Objective | None = None,
    transforms: Sequence[ModelTransform] = (),
) -> TrainResult:
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
        with claim_out_dir(Path(cfg.out_dir), enabled=runtime.is_main):  # one run per folder; rank 0 holds it
            run, rng = setup(
                model_config,
                cfg,
                Path(train_path),
                val_path,
                tokenizer_sha256,
                runtime,
                dataset_factory,
                task,
                objective or objectives.Pretrain(),
                transforms,
            )
            return _loop(run, rng)
    finally:
        teardown_runtime(runtime)


def _log_record(
    run: Run, step: StepResult, lr: float, timing: dict[str, float], mfu_now: float | None, val: dict[str, float] | None
) -> dict[str, Any]:
    """One metrics-log line: the step's figures, the objective's metrics and, after an evaluation, its metrics."""
    record = {
        "step": run.state.step,
        "tokens": run.state.tokens,
        "loss": step.loss,
        "lr": lr,
        "grad_norm": step.grad_norm,
        **timing,
        "mfu": mfu_now,
        "scale": step.scale,
        "peak_memory_gib": peak_memory_gib(run.runtime.device),
        "time": run.elapsed(),
        **step.metrics,
    }
    if val is not None:
        record.update({f"val_{name}": value for name, value in val.items()})
        if "loss" in val and getattr(run.objective, "perplexity", True):
            record["val_ppl"] = math.exp(min(val["loss"], 50.0))
    return record


@dataclass
class _Progress:
    """What the loop carries from step to step besides :class:`TrainState`: for the log and the result."""

    start_tokens: int
    start_step: int
    saved_at: Path | None
    last: StepResult | None = None
    val_loss: float | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    mfu: float | None = None
    initial_val_loss: float | None = None
    first_batch_sha256: str | None = None
    bad_steps: int = 0  # in a row: NaN/inf loss or a skipped update (see _is_bad)
    skipped_updates: int = 0  # in all, for the summary
    window_tokens: int = 0  # since the last log line
    window_seconds: float = 0.0
    window_data_seconds: float = 0.0  # of which spent getting the batches (GRPO: sampling the rollouts)

    def timing(self) -> dict[str, float]:
        """The log window's throughput: ``tokens_per_s`` over the whole steps, ``update_tokens_per_s`` over their
        forward/backward/update only, and ``data_share``, the share of the time spent getting batches."""
        seconds, data = max(self.window_seconds, 1e-9), self.window_data_seconds
        return {
            "tokens_per_s": self.window_tokens / seconds,
            "update_tokens_per_s": self.window_tokens / max(seconds - data, 1e-9),
            "data_share": data / seconds,
        }


def _loop(run: Run, rng: Any) -> TrainResult:
    """The step loop: learning rate, one :func:`train_step`, the finite-loss check, then evaluate / log / save."""
    cfg, state, is_main = run.cfg, run.state, run.runtime.is_main
    flops_per_token = run.model.flops_per_token(run.seq_len)
    peak = device_peak_tflops(run.runtime.device, cfg.peak_tflops)
    if is_main:
        _log_start(run, flops_per_token)
    metrics = MetricsLogger(
        run.out_dir, enabled=is_main, start_step=state.step, total_steps=run.total_steps, progress=cfg.progress
    )
    if rng is not None:
        ckpt.set_rng_state(rng)
    p = _Progress(start_tokens=state.tokens, start_step=state.step, saved_at=run.resumed_from)
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
                p.window_data_seconds += time.perf_counter() - step_started
                p.first_batch_sha256 = (
                    p.first_batch_sha256 or hashlib.sha256(batches[0]["input_ids"].numpy().tobytes()).hexdigest()
                )
                p.last = train_step(run, batches, signals.received or 0)
                step_tokens = sum(run.objective.tokens(b) for b in batches) * run.runtime.world_size
                state.step, state.tokens = state.step + 1, state.tokens + step_tokens
                stop_signal = signals.received or (signal.SIGTERM if p.last.signalled else 0)
                p.bad_steps = _check_finite(run, p.last, p.bad_steps)
                p.skipped_updates += not math.isfinite(p.last.grad_norm)
                p.window_tokens += step_tokens
                p.window_seconds += time.perf_counter() - step_started

                val, done = None, state.step == run.total_steps
                if run.val_batches and (state.step % cfg.eval_every == 0 or done):
                    val = evaluate(run)
                    p.val_loss, p.val_metrics = val.get("loss", p.val_loss), val
                if state.step % cfg.log_every == 0 or done or val is not None or stop_signal:
                    timing = p.timing()
                    p.mfu = mfu(flops_per_token, timing["tokens_per_s"] / run.runtime.world_size, peak)
                    metrics.log(_log_record(run, p.last, lr, timing, p.mfu, val))
                    p.window_tokens, p.window_seconds, p.window_data_seconds = 0, 0.0, 0.0
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
    val = evaluate(run)
    if run.runtime.is_main:
        others = ", ".join(f"{name} {value:.4f}" for name, value in val.items() if name != "loss")
        if val.get("loss") is not None:
            log.info("validation loss before training: %.4f%s", val["loss"], f", {others}" if others else "")
        else:  # an objective without a loss to validate (GRPO: the greedy replies' rewards)
            log.info("validation before training: %s", others)
    return val.get("loss")


def _result(run: Run, p: _Progress) -> TrainResult:
    seconds, state = time.perf_counter() - run.started, run.state
    result = TrainResult(
        steps=state.step,
        tokens=state.tokens,
        seconds=state.elapsed_s + seconds,
        tokens_per_s=(state.tokens - p.start_tokens) / max(seconds, 1e-9),
        train_loss=p.last.loss if p.last else None,
        val_loss=p.val_loss,
        mfu=p.mfu,
        peak_memory_gib=peak_memory_gib(run.runtime.device),
        out_dir=run.out_dir,
        checkpoint=p.saved_at,
        resumed_from=run.resumed_from,
        first_batch_sha256=p.first_batch_sha256,
        initial_val_loss=p.initial_val_loss,
        val_metrics=dict(p.val_metrics),
        perplexity=getattr(run.objective, "perplexity", True),
        skipped_updates=p.skipped_updates,
        model=run.model,
    )
    if run.runtime.is_main:
        log.info("%s", result.summary())
        if p.skipped_updates:
            scaler = " (fp16: the loss scaler skips a few while it finds its scale)" if run.scaler.is_enabled() else ""
            done = state.step - p.start_step
            log.warning(
                "%d of the %d updates of this session were skipped for NaN/inf gradients%s",
                p.skipped_updates,
                done,
                scaler,
            )
    return result


def _log_start(run: Run, flops_per_token: int) -> None:
    cfg = run.cfg
    log.info(
        "model: %s parameters, %s FLOPs/token; %d steps of %s tokens (%d x %d x %d x %d ranks), %s, %s",
        f"{run.model.num_params():,}",
        f"{flops_per_token:,}",
        run.total_steps,
        f"{run.tokens_per_step:,}",
        cfg.batch_size,
        cfg.grad_accum,
        run.seq_len,
        run.runtime.world_size,
        run.precision,
        run.runtime.device,
    )


#: fp16: a skipped update counts towards --nan-patience only once the loss scale is down to this; above it an
#: overflow is the GradScaler searching for its scale (it halves on every skip), not a diverging run.
SCALE_SEARCH_FLOOR = 1.0


def _is_bad(step: StepResult) -> bool:
    """A step that trained nothing: its loss is NaN/inf, or its gradients were and the update was skipped."""
    if not math.isfinite(step.loss):
        return True
    if math.isfinite(step.grad_norm):
        return False
    return step.scale is None or step.scale <= SCALE_SEARCH_FLOOR


def _resume_note(run: Run) -> str:
    latest = ckpt.find_checkpoint(run.out_dir)
    return f"resume continues from {latest}" if latest else "no earlier checkpoint to resume from"


def _divergence_advice(run: Run) -> str:
    cfg = run.cfg
    advice = [f"lower --lr (now {cfg.lr:g})"]
    if not cfg.grad_clip:
        advice.append("set --grad-clip 1.0 (now 0: no clipping)")
    if run.precision == "fp16":
        advice.append("use --precision bf16")
    return ", ".join(advice[:-1]) + (" or " if len(advice) > 1 else "") + advice[-1]


def _check_finite(run: Run, step: StepResult, bad_steps: int) -> int:
    """Warn of a skipped update; count steps that trained nothing (NaN/inf loss, or NaN/inf gradients whose update
    was skipped) in a row and stop with a saved state at ``nan_patience``."""
    if not math.isfinite(step.grad_norm):
        log.log(
            logging.DEBUG if run.scaler.is_enabled() else logging.WARNING,
            "step %d: gradient norm is %s, update skipped",
            run.state.step,
            step.grad_norm,
        )
    bad_steps = bad_steps + 1 if _is_bad(step) else 0
    if run.cfg.nan_patience and bad_steps >= run.cfg.nan_patience:
        path = save(run, f"{ckpt.checkpoint_name(run.state.step)}-nonfinite", update_latest=False)
        what = "loss was NaN/inf" if not math.isfinite(step.loss) else "gradients were NaN/inf (updates skipped)"
        raise NonFiniteLossError(
            f"{what} for {bad_steps} steps in a row, the last at step {run.state.step} (loss {step.loss:.4g}, "
            f"gradient norm {step.grad_norm:.4g}); the run is diverging: {_divergence_advice(run)}; state saved in "
            f"{path} for inspection ({_resume_note(run)})"
        )
    return bad_steps
