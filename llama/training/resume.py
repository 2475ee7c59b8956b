"""Where a run starts: its own latest checkpoint (resume) or another run's weights (``--init``), and the checks
that the checkpoint fits this run's model and tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.format import PackedFiles
from engine.tokenizer import tokenizer_mismatch

from ..model import FREE_ON_INIT, LlamaConfig
from . import checkpoint as ckpt

log = logging.getLogger(__name__)


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
