"""What the training-loop tests share: a small packed corpus that can be learned, and runs in subprocesses that
stall at a step until told to go on (markers on disk, so no test depends on how fast the machine is)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.format import FORMAT, AtomicOutput, DatasetPaths, token_dtype

REPO = Path(__file__).resolve().parents[1]
VOCAB, EOS = 128, 2
STARTED: list[subprocess.Popen] = []  # every run start_run made, for kill_leftovers


def write_corpus(prefix: Path, n_docs: int, seed: int) -> Path:
    """Documents of consecutive ids (``s, s+1, …`` wrapping inside 3..VOCAB-1), each ending with EOS."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, length = int(rng.integers(0, VOCAB - 3)), int(rng.integers(10, 60))
        docs.append(np.append((start + np.arange(length)) % (VOCAB - 3) + 3, EOS))
    return write_packed(
        prefix,
        docs,
        VOCAB,
        bos_id=1,
        eos_id=EOS,
        pad_id=0,
        tokenizer={"path": "tok/tokenizer.json", "sha256": "ab" * 32},
    )


def write_packed(
    prefix: Path, docs: list, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int, tokenizer: dict
) -> Path:
    """A pretrain dataset of these token-id documents, written the way ``engine.prepare`` writes one."""
    paths, dtype = DatasetPaths.of(prefix), token_dtype(vocab_size)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    with AtomicOutput(paths) as out:
        np.concatenate(docs).astype(dtype).tofile(out.tmp(paths.bin))
        with open(out.tmp(paths.idx), "wb") as f:
            np.save(f, offsets)
        out.commit(
            {
                "format": FORMAT,
                "kind": "pretrain",
                "dtype": dtype.name,
                "n_tokens": int(offsets[-1]),
                "n_docs": len(docs),
                "vocab_size": vocab_size,
                "bos_id": bos_id,
                "eos_id": eos_id,
                "pad_id": pad_id,
                "tokenizer": tokenizer,
            }
        )
    return paths.prefix


STALLING_RUN = """
import runpy, sys, time
from pathlib import Path
import llama.training.loop as loop
from llama.training.cli import run_from_args
stall_at, marker, go, script = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
real = loop.learning_rate

def learning_rate(step, cfg, total_steps):  # called once at the start of every step
    if step == stall_at:  # hold the run here, say so, and go on only when the test says so
        written = marker.with_name(marker.name + ".part")
        written.write_text(str(step))
        written.replace(marker)  # whole: a test reading it never sees an empty file
        while not go.exists():
            time.sleep(0.01)
    return real(step, cfg, total_steps)

loop.learning_rate = learning_rate  # the name the loop calls
if script == "-":  # the loop's own command line
    raise SystemExit(run_from_args(sys.argv[5:]))
sys.argv = [script, *sys.argv[5:]]  # a script of the test's own that calls train()
runpy.run_path(script, run_name="__main__")
"""


def torchrun_two_ranks(worker: Path, *args: str | Path, timeout: float = 300) -> None:
    """Runs the script ``worker`` on two CPU ranks (``torchrun --standalone``); fails with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), *args]
    done = subprocess.run(list(map(str, command)), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def start_run(args: list[str], log_path: Path, stall_at: int = -1, script: str = "-") -> subprocess.Popen:
    """A training subprocess (``python -m llama.train ARGS``, or ``script`` ARGS); with ``stall_at`` it writes
    ``log_path.stalled`` after that many steps and waits for ``log_path.go``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    marker, go = log_path.with_suffix(".stalled"), log_path.with_suffix(".go")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", STALLING_RUN, str(stall_at), str(marker), str(go), script, *args],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """Kill the runs a failed test left behind (a stalled one would otherwise wait for its go file forever)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def wait_until_stalled(log_path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> int:
    """Until the run started by ``start_run(..., stall_at=N)`` holds before step N + 1; returns N."""
    marker = log_path.with_suffix(".stalled")
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, (
            f"the run ended (code {proc.returncode}) before stalling: {log_path.read_text()[-2000:]}"
        )
        assert time.monotonic() < deadline, f"the run did not stall within {timeout:.0f} s"
        time.sleep(0.01)
    return int(marker.read_text())


def assert_resumed_identically(reference: Path, victim: Path, steps: int, keys: tuple[str, ...]) -> None:
    """A run killed and resumed (``victim``) logged every step 1..``steps`` once, each ``keys`` figure equal to the
    uninterrupted ``reference`` run's, and ended with the same weights, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from llama.training.checkpoint import MODEL_FILE, find_checkpoint
    from llama.training.metrics import read_metrics

    expected = {r["step"]: r for r in read_metrics(reference / "metrics.jsonl")}
    after = read_metrics(victim / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(1, steps + 1))
    for record in after:
        for key in keys:
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    final = [load_file(str(find_checkpoint(run) / MODEL_FILE)) for run in (reference, victim)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
