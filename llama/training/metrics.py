"""What a run reports: ``metrics.jsonl``, a tqdm bar, TensorBoard (when installed), a loss-curve PNG
(when matplotlib is installed) and one summary line.

``metrics.jsonl`` holds one JSON object per logged step: ``step``, ``tokens``, ``loss``, ``lr``,
``grad_norm``, ``tokens_per_s`` (all ranks, whole steps), ``update_tokens_per_s`` (forward, backward and update
only), ``data_share`` (the share of the time spent getting batches: GRPO's sampling), ``mfu`` (null without a known
peak), ``scale`` (fp16 only), ``peak_memory_gib`` (CUDA only), the objective's metrics (DPO's ``accuracy``, GRPO's
``reward``…), ``val_*`` when measured at that step, and ``time`` (training seconds, across resumes). TensorBoard
gets them all (the objective's under ``task/``).
Losses are written with full float precision (``repr``), so two runs compare exactly; a non-finite
value is written as ``NaN``/``Infinity`` (Python's ``json`` reads them back).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TB_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "peak_memory_gib": "perf/peak_memory_gib",
    "scale": "amp/scale",
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "update_tokens_per_s": "perf/update_tokens_per_s",
    "data_share": "perf/data_share",
}
UNPLOTTED = ("step", "tokens", "time")  # the x axes


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLogger:
    """Writes the run's metrics; every method is a no-op on ranks other than 0 (``enabled=False``).

    On resume from step ``start_step``, records past it (written after the checkpoint by the run that
    died) are dropped from ``metrics.jsonl`` and TensorBoard, so the history reads as one run.
    """

    def __init__(
        self, out_dir: Path, *, enabled: bool, start_step: int, total_steps: int, progress: bool = True
    ) -> None:
        self.enabled, self.out_dir = enabled, out_dir
        self.path = out_dir / METRICS_FILE
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            log.info("tensorboard is not installed: metrics go to %s only (pip install tensorboard)", self.path)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress)

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's record (flushed at once, so a killed run loses nothing logged) and show it."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                tag = TB_SCALARS.get(key) or (None if key in UNPLOTTED else f"task/{key}")
                if tag is not None and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(tag, value, global_step=record["step"])
        shown = {
            "loss": f"{record['loss']:.4f}",
            "lr": f"{record['lr']:.2e}",
            "tok/s": f"{record['tokens_per_s']:,.0f}",
        }
        if record.get("mfu") is not None:
            shown["mfu"] = f"{100 * record['mfu']:.1f}%"
        if record.get("peak_memory_gib") is not None:
            shown["mem"] = f"{record['peak_memory_gib']:.1f}G"
        if record.get("reward") is not None:
            shown["reward"] = f"{record['reward']:.3f}"
        if record.get("val_loss") is not None:
            shown["val"] = f"{record['val_loss']:.4f}"
        self._bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._bar.update(steps)

    def close(self) -> Path | None:
        """Close the files and draw the loss curve; returns the PNG's path when one was drawn."""
        if not self.enabled:
            return None
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        return plot_losses(self.path, self.out_dir / PLOT_FILE)


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Train (and validation) loss against tokens seen, as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss curve drawn (pip install matplotlib)")
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], label="train", linewidth=1)
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", markersize=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_count(n: float) -> str:
    """``1234567`` → ``'1.23M'``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def summary_line(
    *,
    steps: int,
    tokens: int,
    seconds: float,
    tokens_per_s: float,
    train_loss: float | None,
    val_loss: float | None,
    mfu: float | None,
    peak_memory_gib: float | None,
    val_extra: dict[str, float] | None = None,
    perplexity: bool = True,
) -> str:
    """One line that says what the run did: steps, tokens, time, speed, final losses (and the objective's other
    validation metrics, ``val_extra``), MFU, peak memory; ``perplexity``: the loss is a next-token loss."""
    parts = [
        f"{steps:,} steps, {format_count(tokens)} tokens in {format_duration(seconds)}",
        f"{tokens_per_s:,.0f} tokens/s",
    ]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.4f}")
    if val_loss is not None:
        ppl = f" (ppl {math.exp(min(val_loss, 50)):.2f})" if perplexity else ""
        parts.append(f"val loss {val_loss:.4f}{ppl}")
    parts.extend(f"val {name} {value:.4f}" for name, value in (val_extra or {}).items())
    parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
    parts.append(f"peak memory {peak_memory_gib:.2f} GiB" if peak_memory_gib is not None else "peak memory n/a")
    return "trained " + ", ".join(parts)
