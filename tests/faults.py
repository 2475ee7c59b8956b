"""What the fault suite (``tests/test_faults_*.py``, one test per hostile input or fault) shares: the outcome
every case must have, a one-line ``error: …`` (exit code 2) that says what to do, no traceback, and the files
the command was given left exactly as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one ``error: `` line and it is the last line of stderr (log lines may
    come before it), containing every needle; returns that line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit code {code}, stderr:\n{stderr}"
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final 'error: ' line, got:\n{stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file under ``roots`` (files or folders), by path: what ``assert_unchanged`` compares."""
    files: dict[str, tuple[int, str]] = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            files[str(path)] = (len(data), hashlib.sha256(data).hexdigest())
    return files


def assert_unchanged(before: dict[str, tuple[int, str]], *roots: Path) -> None:
    """Nothing under ``roots`` was added, removed or rewritten since ``before = snapshot(*roots)``."""
    after = snapshot(*roots)
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}"
