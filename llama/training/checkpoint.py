"""Training checkpoints: written atomically, the last few kept, read back without running anyone's code.

A checkpoint is a folder ``OUT/step_000100/`` holding

- ``model.safetensors``: the weights (a tied matrix stored once, under its first name, as Hugging Face does);
- ``trainer.pt``: optimizer, grad scaler, data sampler and RNG states, step and tokens seen, stored as
  tensors and plain containers only and read with ``torch.load(weights_only=True)``, so a checkpoint
  from someone else cannot execute code;
- ``config.json``: the model and training configs, the tokenizer reference, step and tokens (readable).

It is written under a temporary name and renamed into place, then ``OUT/latest`` (a one-line text
file naming the folder) is replaced, then folders beyond the last ``keep_last`` are deleted. A crash
at any moment leaves the previous checkpoint intact; a torn folder (a file missing, empty or cut short, from a
full disk or a copy) is skipped, with a warning, for the newest complete one. A failed write (a full disk) is
one :class:`CheckpointWriteError` naming the folder and the free space, and leaves nothing behind.
``model.safetensors`` is byte-identical between identical runs (its header is written in a fixed order).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from engine import publish

log = logging.getLogger(__name__)

FORMAT = "zhllm-checkpoint-v1"
LATEST = "latest"
MODEL_FILE, TRAINER_FILE, CONFIG_FILE = "model.safetensors", "trainer.pt", "config.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
LEGACY_TEMP_PREFIXES = (".tmp-", ".old-")  # the temporary names of saves made before engine.publish


class CheckpointError(ValueError):
    """A checkpoint is missing, torn, unsafe or does not fit the model (one-line message)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, no permission); the message names where and what to do."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def step_folders(out_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step_N`` folder of ``out_dir``, complete or torn, as ``(N, path)``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why the folder ``path`` is not a complete checkpoint (a file missing, empty or cut short), or None. Cheap:
    reads the safetensors header, the zip directory at the end of ``trainer.pt`` and ``config.json``."""
    for name in (MODEL_FILE, TRAINER_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size == 0:
            return f"{name} is empty"
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error type
        return f"{MODEL_FILE} is cut short or corrupt: {_first_line(e)}"
    if not zipfile.is_zipfile(path / TRAINER_FILE):
        return f"{TRAINER_FILE} is cut short or corrupt: its zip directory is missing"
    try:
        json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{CONFIG_FILE} is cut short or corrupt: {_first_line(e)}"
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``step_N`` folders of ``out_dir`` as ``(N, path)``, oldest first (torn ones left out)."""
    return [(step, path) for step, path in step_folders(out_dir) if checkpoint_problem(path) is None]


def find_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``path`` names: itself if it is one, else the one its ``latest`` file names, else its newest
    complete one (torn ones are skipped with a warning that names them)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    candidates = [folder for _, folder in reversed(step_folders(path))]
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text(encoding="utf-8").strip()
        candidates = [target, *(c for c in candidates if c != target)]
    skipped = []
    for candidate in candidates:
        problem = "it is missing" if not candidate.is_dir() else checkpoint_problem(candidate)
        if problem is None:
            if skipped:
                log.warning(
                    "skipping torn checkpoint(s) %s; using %s, the newest complete one (to choose another: "
                    "--resume %s)",
                    "; ".join(skipped),
                    candidate,
                    path / "step_N",
                )
            return candidate
        skipped.append(f"{candidate} ({problem})")
    return None


def torn_error(checkpoint: Path, problem: str) -> CheckpointError:
    """The one-line refusal of a torn checkpoint, naming the newest complete one beside it to resume instead."""
    others = [path for _, path in list_checkpoints(checkpoint.parent) if path != checkpoint]
    if others:
        advice = f"resume from the newest complete one with --resume {others[-1]}, or delete {checkpoint}"
    else:
        advice = (
            f"no complete checkpoint remains in {checkpoint.parent}: delete the torn step folders to start over, or "
            "train into another --out-dir"
        )
    return CheckpointError(f"checkpoint {checkpoint} is torn ({problem}): {advice}")


def remove_temporaries(out_dir: Path) -> None:
    """Clean up after a killed save (the run is the folder's only writer): delete half-written step folders and
    put back one a re-save had moved aside (:func:`engine.publish.remove_stale_temporaries`), including the
    ``.tmp-step_*-PID`` / ``.old-step_*-PID`` names of saves before that module."""
    if not out_dir.is_dir():
        return
    for path in sorted(out_dir.iterdir(), key=lambda p: not p.name.startswith(".old-")):  # restore before deleting
        if not (path.name.startswith(LEGACY_TEMP_PREFIXES) and path.is_dir()):
            continue
        final = out_dir / path.name.split("-", 1)[1].rsplit("-", 1)[0]  # .old-step_000010-1234 → step_000010
        if path.name.startswith(".old-") and not final.exists():
            log.warning("restoring %s from %s, left by a save killed mid-swap", final, path)
            os.replace(path, final)
        else:
            log.info("removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)
    publish.remove_stale_temporaries(out_dir, any_pid=True)


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``alias → first name`` for every parameter the model reaches under two names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def unique_tensors(
    state: dict[str, torch.Tensor], tied: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names whose tensor shares storage with an earlier name, or that ``tied`` names as an alias (the
    gathered copies of FSDP share no storage); return ``(kept, alias → kept name)``."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        twin = seen.get(key) if tensor.numel() else None
        if twin is None and tied and tied.get(name) in kept:
            twin = tied[name]
        if twin is not None:
            aliases[name] = twin
            continue
        seen[key] = name
        kept[name] = tensor.detach().contiguous()
    return kept, aliases


def save_checkpoint(
    out_dir: Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    *,
    keep_last: int = 0,
    update_latest: bool = True,
    tied: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``out_dir/name`` atomically; point ``latest`` at it and prune to ``keep_last`` (0 keeps all).

    ``trainer_state`` must hold only tensors, numbers, strings, None, lists, tuples and dicts (what
    ``weights_only`` loading accepts); ``config`` must be JSON-serialisable; ``tied`` is
    :func:`tied_parameters` of the model, for states whose tied tensors are separate copies. A failed write
    raises :class:`CheckpointWriteError` and leaves the earlier checkpoints as they were.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tensors, aliases = unique_tensors(model_state, tied)
    try:
        with publish.publish_directory(final) as tmp:  # re-saving a step (a resumed run passing it again) replaces it
            write_model_file(tmp / MODEL_FILE, tensors, aliases)
            torch.save(trainer_state, tmp / TRAINER_FILE)
            (tmp / CONFIG_FILE).write_text(
                json.dumps({"format": FORMAT, **config}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        if update_latest:
            publish.write_text_atomic(out_dir / LATEST, name + "\n")
    except (OSError, RuntimeError, SafetensorError) as e:  # torch's zip writer and safetensors raise their own
        if isinstance(e, RuntimeError) and "PytorchStreamWriter" not in str(e):
            raise
        publish.temporary_sibling(out_dir / LATEST).unlink(missing_ok=True)
        raise write_error(final, e, _nbytes(tensors) + _nbytes(trainer_state), keep_last) from None
    if keep_last > 0:
        prune_checkpoints(out_dir, keep_last)
    return final


def write_model_file(path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """``model.safetensors``, the same bytes for the same tensors: safetensors writes its metadata map in a
    random order, so the header is rewritten (same length) with the metadata keys sorted."""
    save_file(
        {k: v.cpu() for k, v in tensors.items()},
        str(path),
        metadata={"aliases": json.dumps(aliases, sort_keys=True), "format": "pt"},
    )
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:  # always, as it is the same content; the padding is spaces, as safetensors pads
            f.seek(8)
            f.write(text.ljust(size, b" "))


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


#: How a full disk reads in safetensors' (Rust's ``os error 28``, ``StorageFull``) and torch's zip writer's errors.
DISK_FULL = re.compile(
    r"os error (28|122)\b|code: (28|122)\b|StorageFull|QuotaExceeded|No space left|quota exceeded|file write failed",
    re.IGNORECASE,
)


def _human(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def write_error(final: Path, error: BaseException, needed: int, keep_last: int) -> CheckpointWriteError:
    """The one-line report of a failed checkpoint write: where, why, the space free and needed, what to do."""
    free = shutil.disk_usage(final.parent).free
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or bool(DISK_FULL.search(str(error)))
    reason = "no space left on the disk" if full else _first_line(error)
    if not full:
        advice = "check that it is writable"
    elif keep_last == 1:
        advice = "free space there (--keep-last is 1 already)"
    else:
        now = f"{keep_last}" if keep_last else "0: all kept"
        advice = f"free space there, or keep fewer checkpoints with --keep-last {max(1, keep_last - 1)} (now {now})"
    resume = find_checkpoint(final.parent)
    kept = f"earlier checkpoints are intact (the run resumes from {resume})" if resume else "no earlier checkpoint"
    return CheckpointWriteError(
        f"cannot write checkpoint {final}: {reason} ({_human(free)} free on its disk, a checkpoint takes about "
        f"{_human(needed)}); {advice}; {kept}"
    )


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``step_N`` folders, never the one ``latest`` names."""
    protected = find_checkpoint(out_dir)
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        if path != protected:
            shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read ``trainer.pt`` with ``weights_only=True``; a pickled object of any other kind is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, zipfile.BadZipFile) as e:  # torch reports a torn zip as RuntimeError
        raise torn_error(path.parent, f"{path.name} is unreadable: {_first_line(e)}") from None
    except pickle.UnpicklingError as e:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it would load the global {culprit.group(1)}" if culprit else str(e).splitlines()[0]
        raise CheckpointError(
            f"refusing to load {path}: it holds a pickled object that is not a tensor or plain container "
            f"({reason}); checkpoints can carry code, so only tensors, numbers, strings, lists and dicts are read"
        ) from None


def read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        config = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise torn_error(checkpoint, f"{CONFIG_FILE} is unreadable: {_first_line(e)}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint} has format {config.get('format')!r}, this code reads {FORMAT!r}")
    return config


def read_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of ``model.safetensors`` on CPU, tied names filled in from the name they were stored under."""
    path = checkpoint / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for torn files
        raise torn_error(checkpoint, f"{MODEL_FILE} is unreadable: {_first_line(e)}") from None
    for alias, kept in aliases.items():
        state[alias] = state[kept]
    return state


def load_model_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model``; refuse one saved from a differently shaped model."""
    state = read_model_state(checkpoint)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint / MODEL_FILE} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "resume with the model config it was saved with"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise CheckpointError(
            f"{checkpoint / MODEL_FILE} does not fit this model ({first}): resume with the model config it was "
            f"saved with"
        ) from None


def gather_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool) -> tuple[dict, dict]:
    """Full model and optimizer state dicts; ``sharded`` (FSDP2) gathers them to CPU on rank 0 (every rank must
    call)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def restore_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint: Path,
    optimizer_state: dict[str, Any],
    *,
    sharded: bool,
) -> None:
    """Load ``checkpoint``'s weights and ``optimizer_state``; ``sharded`` (FSDP2): each rank keeps its shard."""
    if not sharded:
        load_model_weights(checkpoint, model)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, read_model_state(checkpoint), options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and current-CUDA-device RNG states as tensors and plain values."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA part only where CUDA is in use)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
