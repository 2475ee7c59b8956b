"""Where a run starts: its output folder (held by one run at a time), its own latest checkpoint (resume, refused
when a setting that exact resume depends on changed) or another run's weights (``--init``), and the checks that the
checkpoint fits this run's model and tokenizer."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine import publish
from engine.format import PackedFiles
from engine.tokenizer import tokenizer_mismatch

from ..model import FREE_ON_INIT, LlamaConfig
from . import checkpoint as ckpt
from .config import flag
from .errors import OutDirInUse

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


@contextmanager
def claim_out_dir(out_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``out_dir`` while the run lasts (``enabled``: rank 0 only): create it, take its lock (refused while
    another live run holds it; a dead run's lock is taken over), release the lock on any exit, and remove the
    folders this created again when the run left nothing in them (a refused run leaves no new folder)."""
    if not enabled:
        yield
        return
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        lock = _acquire_lock(out_dir / LOCK_FILE)
        yield
    finally:
        if lock is not None and _lock_holder(lock) == _me():
            lock.unlink(missing_ok=True)
        for folder in created:  # innermost first; rmdir refuses a folder that holds anything
            try:
                folder.rmdir()
            except OSError:
                break


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """The pid and host a lock file names (None when it is unreadable or half written)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return {"pid": holder.get("pid"), "host": holder.get("host")} if isinstance(holder, dict) else None


def _acquire_lock(lock: Path) -> Path:
    """Create ``lock`` exclusively, holding this process's pid and host; take over one left by a dead process on
    this host (with a warning); refuse one held by a live (or another host's) run in one line."""
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if attempt == 0 and _is_stale(holder):
                log.warning(
                    "taking over %s: the run that held it (pid %s on %s) is gone", lock, holder["pid"], holder["host"]
                )
                if _lock_holder(lock) == holder:  # still that one: not just taken over by another new run
                    lock.unlink(missing_ok=True)
                continue
            raise OutDirInUse(_in_use_message(lock, holder)) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.write(json.dumps({**_me(), "started": started}) + "\n")
        return lock
    raise OutDirInUse(_in_use_message(lock, _lock_holder(lock)))


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """A lock whose process is dead: only knowable for this host's processes."""
    if holder is None or holder["host"] != socket.gethostname() or not isinstance(holder["pid"], int):
        return False
    return holder["pid"] != os.getpid() and not publish.pid_alive(holder["pid"])


def _in_use_message(lock: Path, holder: dict[str, Any] | None) -> str:
    who = f"the run with pid {holder['pid']} on {holder['host']}" if holder else "another run (its lock is unreadable)"
    return (
        f"{lock.parent} is in use by {who}: two runs in one --out-dir would mix their checkpoints and metrics; wait "
        f"for it to finish, or use another --out-dir (if no run is using it, delete {lock})"
    )


def resolve_resume(resume: bool | str | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``None``/``'auto'`` → ``out_dir``'s if any; True → required; a path → that one;
    False → none (and ``out_dir`` must hold no checkpoint). A torn checkpoint falls back to the newest complete one;
    torn ones only are refused."""
    if resume is False or (isinstance(resume, str) and resume.lower() in ("false", "no", "never")):
        existing = ckpt.step_folders(out_dir)
        if existing:
            raise ckpt.CheckpointError(
                f"{out_dir} holds checkpoints up to step {existing[-1][0]} and resume is off: choose another "
                "--out-dir, or delete them to start over (they are never overwritten silently)"
            )
        return None
    if isinstance(resume, str) and resume.lower() not in ("auto", "true", "yes"):
        found = ckpt.find_checkpoint(resume)
        if found is None:
            _refuse_only_torn(Path(resume))
            raise ckpt.CheckpointError(f"no checkpoint in {resume}: give a step_N folder or an --out-dir holding one")
        problem = ckpt.checkpoint_problem(found)
        if problem:
            raise ckpt.torn_error(found, problem)
        return found
    found = ckpt.find_checkpoint(out_dir)
    if found is None:
        _refuse_only_torn(out_dir)
    if found is None and (resume is True or (isinstance(resume, str) and resume.lower() in ("true", "yes"))):
        raise ckpt.CheckpointError(f"resume was asked for, but {out_dir} holds no checkpoint")
    return found


def _refuse_only_torn(out_dir: Path) -> None:
    """Refuse to start over in a folder whose checkpoints are all torn (their steps would be overwritten)."""
    torn = ckpt.step_folders(out_dir)
    if torn:
        problem = ckpt.checkpoint_problem(torn[-1][1]) or "incomplete"
        raise ckpt.torn_error(torn[-1][1], problem)


#: TrainConfig fields that decide which tokens each step trains on, and how many: a change breaks exact resume.
EXACT_RESUME = ("batch_size", "grad_accum", "seq_len", "data_mode", "doc_masking", "seed")
#: What else a change of breaks exact resume (besides the fields above, by flag).
EXACT_RESUME_OTHER = ("ranks", "training data", "tokenizer", "objective")
#: Settings a task records in config.json's ``task`` (None: not set), compared on resume like TrainConfig fields, by
#: flag: a loss weight is like --lr (a change is logged and recorded); those in EXACT_RESUME_TASK rewrite the data.
TASK_SETTINGS = (
    *("think_tag_weight", "no_think_share", "beta", "loss_type", "label_smoothing", "sft_weight"),  # SFT, DPO
    *("alpha", "temperature", "divergence", "jsd_beta"),  # distillation (and GRPO's sampling temperature)
    *("group_size", "max_new_tokens", "top_p", "top_k", "epsilon", "epsilon_high", "iterations", "rewards"),  # GRPO
)
EXACT_RESUME_TASK = ("no_think_share", "group_size", "max_new_tokens", "iterations")
#: TrainConfig fields about running, not training: a resumed run changes them without a word (--steps extends it).
RUN_ONLY = (
    "steps",
    "tokens",
    "out_dir",
    "resume",
    "init",
    "allow_config_change",
    "progress",
    "log_every",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_last",
    "device",
    "max_memory_gb",
    "peak_tflops",
    "nan_patience",
    "compile",
    "activation_checkpointing",
)


def resume_settings(config: dict[str, Any]) -> dict[str, Any]:
    """How a checkpoint's ``config.json`` (or this run's, same layout) trains: the TrainConfig fields by flag (the
    effective sequence length), the ranks, the data, the tokenizer, the objective and the task's settings."""
    train = dict(config.get("train") or {})
    train["seq_len"] = train.get("seq_len") or (config.get("model") or {}).get("max_seq_len")
    settings = {flag(key): value for key, value in train.items() if key not in RUN_ONLY}
    settings["ranks"] = config.get("world_size")
    settings["training data"] = (config.get("data") or {}).get("train_size")
    settings["tokenizer"] = (config.get("tokenizer") or {}).get("sha256")
    settings["objective"] = config.get("objective")
    task = config.get("task") or {}
    settings.update({flag(key): task[key] for key in TASK_SETTINGS if task.get(key) is not None})
    return settings


def check_resume_settings(
    saved: dict[str, Any], current: dict[str, Any], checkpoint: Path, allow: bool
) -> tuple[dict[str, list], list[str]]:
    """The settings this run changes from ``checkpoint``'s (``{name: [old, new]}``) and those of them that break
    exact resume; refuse those, in one line naming each, unless ``allow`` (``--allow-config-change``)."""
    old, new = resume_settings(saved), resume_settings(current)
    changed = {key: [old[key], new[key]] for key in old if old[key] is not None and key in new and old[key] != new[key]}
    exact = {*EXACT_RESUME_OTHER, *map(flag, (*EXACT_RESUME, *EXACT_RESUME_TASK))}
    breaking = [key for key in changed if key in exact]
    if breaking and not allow:
        listed = ", ".join(f"{key} {changed[key][0]} -> {changed[key][1]}" for key in breaking)
        raise ckpt.CheckpointError(
            f"resuming {checkpoint} with other settings would not continue it exactly: {listed}; give the settings it "
            "was saved with, pass --allow-config-change to resume anyway (the change is recorded in its config.json), "
            "or use another --out-dir"
        )
    return changed, breaking


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


def resolve_init(init: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--init`` names and its config; a one-line error when there is none."""
    found = ckpt.find_checkpoint(init)
    if found is None:
        raise ckpt.CheckpointError(
            f"--init {init}: no checkpoint there (give a step_N folder or an --out-dir holding one)"
        )
    return found, ckpt.read_config(found)


def check_init(init: Path, saved: dict[str, Any], model_config: LlamaConfig, data: PackedFiles) -> None:
    """Refuse an --init checkpoint of another architecture or tokenizer than this run's, naming both sides."""
    theirs = saved.get("tokenizer") or {}
    ours = data.meta.get("tokenizer") or {}
    refusal = tokenizer_mismatch(
        theirs,
        ours,
        owner=f"--init {init}",
        other=f"{data.paths.prefix}'s tokenizer",
        fix="re-pack the data with the checkpoint's tokenizer",
    )
    if refusal:
        raise ckpt.CheckpointError(refusal)
    if not (theirs.get("sha256") and ours.get("sha256")):
        log.warning(
            "cannot check that --init %s and %s share a tokenizer: one of them records none", init, data.paths.prefix
        )
    try:
        theirs_config = LlamaConfig.from_saved(saved.get("model"), f"--init {init}")
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    for key, ours, theirs in model_config.differences(theirs_config, ignore=FREE_ON_INIT)[:1]:
        raise ckpt.CheckpointError(
            f"--init {init} holds a model with {key}={theirs!r}, this run builds {key}={ours!r}: "
            "build the same architecture (its config.json lists it), or start from another checkpoint"
        )
    changed = {
        key: getattr(model_config, key)
        for key in ("max_seq_len", "rope_scaling")
        if getattr(theirs_config, key) != getattr(model_config, key)
    }
    if changed:
        log.warning("--init %s: this run changes %s from the checkpoint's", init, changed)
