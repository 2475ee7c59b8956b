"""Publishing a file or a folder whole: checkpoints, exported models, tokenizer folders.

What is published is built under a temporary sibling name (``.NAME.tmp-PID``), fsynced, and renamed into
place; replacing an existing folder moves it aside first (``.NAME.old-PID``) and deletes it after. A process
killed at any moment so leaves the previous version or nothing under ``NAME``, never half of one, and
:func:`remove_stale_temporaries` (run before every publish, and on a checkpoint folder when a run starts)
deletes what a dead process left, or puts back a folder a crash had moved aside mid-swap (``engine.pack`` runs
it on its output folder for the hidden ``.NAME.bin.tmp-PID`` files of a killed pack).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("engine.publish")

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def temporary_sibling(final: Path, kind: str = "tmp") -> Path:
    """Where this process builds ``final`` (``kind="tmp"``) or moves the old one aside (``"old"``)."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}")


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` (UTF-8) all at once."""
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    fsync(tmp)
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (memory stays flat whatever its size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _in_use(pid: int, path: Path) -> bool:
    """Whether the process that named temporary ``path`` may still be writing it: a live one, or this one for a
    file (another file of the same dataset, e.g. the other split); this process's folders are its own leftovers."""
    return path.is_file() if pid == os.getpid() else pid_alive(pid)


def _size(path: Path) -> int:
    """Bytes a file, or every file under a folder, takes."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_stale_temporaries(
    folder: Path, only: str | None = None, any_pid: bool = False, files: bool = False
) -> tuple[int, int]:
    """Clean ``folder`` of what dead processes left while publishing (``only``: for that name alone): delete
    ``.NAME.tmp-PID`` folders, and put back a ``.NAME.old-PID`` whose ``NAME`` is missing (a crash between the
    two renames of a replace). ``any_pid``: also what live processes left (the caller is the only writer).
    ``files``: plain files too (the ``.NAME.bin.tmp-PID`` of a killed pack). Returns (paths removed, bytes freed)."""
    if not folder.is_dir():
        return 0, 0
    kinds = (Path.is_dir, Path.is_file) if files else (Path.is_dir,)
    found = [(m, p) for p in folder.iterdir() if (m := _TEMPORARY.match(p.name)) and any(k(p) for k in kinds)]
    removed, freed = 0, 0
    for match, path in sorted(found, key=lambda item: item[0]["kind"] != "old"):  # restore before deleting
        pid, final = int(match["pid"]), folder / match["name"]
        if (only is not None and match["name"] != only) or (not any_pid and _in_use(pid, path)):
            continue
        if match["kind"] == "old" and not final.exists():
            log.warning("restoring %s from %s, left by an interrupted replace", final, path)
            os.replace(path, final)
            continue
        log.info("removing %s, left by an interrupted write", path)
        freed += _size(path)
        removed += 1
        if path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    if removed:
        log.warning(
            "removed %d leftover temporaries (%s bytes freed) in %s: writes never finished",
            removed,
            f"{freed:,}",
            folder,
        )
    return removed, freed


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fsync(path)


@contextmanager
def publish_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` to fill; a clean exit renames it to ``final`` (an existing
    ``final`` is replaced: callers refuse one first where that is not wanted), an exception or interrupt
    deletes it."""
    remove_stale_temporaries(final.parent, only=final.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # swap, then drop the old copy: a crash in between is repaired by the next run
            old = temporary_sibling(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
