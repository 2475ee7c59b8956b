"""Run a command in a fresh process and measure its wall time and the peak memory of its whole process tree.

A thread polls the child and all its descendants (pool workers included) every ``interval``
seconds with psutil and keeps the largest sum of their resident set sizes. Summing RSS counts
pages shared after ``fork`` once per process, so it is an upper bound on what the tree really
holds; that is the figure we compare, on purpose (a generous one for the baseline, which is a
single process).

Usable as a script too::

    python bench/peak_rss.py -- python -m engine.prepare --source ... --out /tmp/x
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import psutil

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.02


@dataclass
class ProcessRun:
    """What one measured process did: exit code, wall seconds, peak tree RSS, its output."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    peak_processes: int  # processes alive when the peak was seen
    samples: int
    stdout: str
    stderr: str

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 1e6

    def check(self, what: str) -> "ProcessRun":
        """Raise with the tail of stderr when the process failed."""
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{what} exited with {self.returncode}:\n{tail}")
        return self


def tree_rss(root: psutil.Process, procs: list[psutil.Process] | None = None) -> tuple[int, int]:
    """Sum of RSS over ``root`` and its descendants (``procs``, or listed now), and how many were read."""
    if procs is None:
        procs = _tree(root)
    total, count = 0, 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            count += 1
        except psutil.Error:  # exited between listing and reading
            continue
    return total, count


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class _PeakSampler(threading.Thread):
    """Reads the tree's RSS every ``interval``; lists the tree (a scan of /proc, the costly part) every few reads."""

    RELIST_EVERY = 5

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        procs: list[psutil.Process] = []
        while not self._stop_event.is_set():
            if self.samples % self.RELIST_EVERY == 0:
                procs = _tree(self.root)
            rss, count = tree_rss(self.root, procs)
            self.samples += 1
            if rss > self.peak:
                self.peak, self.peak_processes = rss, count
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_measured(
    cmd: Sequence[str], *, interval: float = POLL_SECONDS, cwd: str | None = None, env: dict[str, str] | None = None
) -> ProcessRun:
    """Start ``cmd``, sample its process tree until it exits, and return the figures."""
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    sampler = _PeakSampler(proc.pid, interval)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    sampler.stop()
    # A zombie child's RSS is gone; the last live sample already holds the peak.
    return ProcessRun(proc.returncode, seconds, sampler.peak, sampler.peak_processes, sampler.samples, stdout, stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("usage: python bench/peak_rss.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    run = run_measured(args)
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    report = {k: v for k, v in asdict(run).items() if k not in ("stdout", "stderr")}
    report["peak_rss_mb"] = round(run.peak_rss_mb, 1)
    print(json.dumps(report))
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
