"""Fault suite, checkpoints and the output folder: torn checkpoints, a full disk, two runs in one folder, settings
changed on resume, a run already complete, reproducible checkpoint bytes, refused runs leaving no folder (issue 13).
One test per case."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import assert_one_line_error, assert_unchanged, snapshot
from safetensors import SafetensorError
from training_runs import start_run, wait_until_stalled, write_corpus

from llama.training import checkpoint
from llama.training.checkpoint import LATEST, MODEL_FILE, TRAINER_FILE, find_checkpoint, read_config
from llama.training.cli import run_from_args
from llama.training.metrics import read_metrics
from llama.training.resume import LOCK_FILE

TRAIN = ["--model", "dim=64", "--model", "kernels=torch", "--no-progress", "--batch-size", "2", "--seq-len", "32"]
TRAIN += ["--eval-every", "0", "--log-every", "1", "--warmup-steps", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("faults-ckpt") / "corpus", 120, seed=5)


def train_args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--train", str(corpus), "--out-dir", str(out), "--steps", str(steps), *TRAIN, *extra]


def trained(corpus: Path, out: Path, steps: int, capsys, *extra: str) -> Path:
    """``out`` after a run of ``steps`` steps (checkpoints as ``extra`` says); fails with its stderr."""
    assert run_from_args(train_args(corpus, out, steps, *extra)) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty_files_no_latest(folder: Path) -> None:
    for name in (MODEL_FILE, TRAINER_FILE, "config.json"):
        (folder / name).write_bytes(b"")
    (folder.parent / LATEST).unlink()


TEARS = {
    "truncated trainer.pt": lambda folder: cut_in_half(folder / TRAINER_FILE),
    "truncated model.safetensors": lambda folder: cut_in_half(folder / MODEL_FILE),
    "zero-byte files, no latest": empty_files_no_latest,
}


@pytest.mark.parametrize("tear", TEARS.values(), ids=TEARS.keys())
def test_a_torn_checkpoint_falls_back_to_the_newest_complete_one(tear, corpus, tmp_path, capsys, caplog):
    out = trained(corpus, tmp_path / "run", 4, capsys, "--save-every", "2", "--keep-last", "0")
    tear(out / "step_000004")
    caplog.set_level(logging.INFO)
    assert run_from_args(train_args(corpus, out, 6, "--save-every", "2", "--keep-last", "0")) == 0
    warning = next(r.getMessage() for r in caplog.records if "torn checkpoint" in r.getMessage())
    assert str(out / "step_000004") in warning and f"--resume {out / 'step_N'}" in warning
    assert f"RESUMING from {out / 'step_000002'}: step 2" in caplog.text
    assert find_checkpoint(out) == out / "step_000006"
    assert checkpoint.checkpoint_problem(out / "step_000004") is None  # the torn step was trained and saved again


def test_only_torn_checkpoints_are_refused_in_one_line(corpus, tmp_path, capsys):
    out = trained(corpus, tmp_path / "run", 2, capsys)
    cut_in_half(out / "step_000002" / TRAINER_FILE)
    before = snapshot(out)
    code = run_from_args(train_args(corpus, out, 4))
    assert_one_line_error(code, capsys.readouterr().err, "step_000002 is torn", "no complete checkpoint remains")
    code = run_from_args(train_args(corpus, out, 4, "--resume", str(out / "step_000002")))
    assert_one_line_error(code, capsys.readouterr().err, "trainer.pt is cut short", "delete the torn step folders")
    assert_unchanged(before, out)
    # an explicit --resume of a torn step names the complete one to resume from instead
    good = trained(corpus, tmp_path / "good", 4, capsys, "--save-every", "2", "--keep-last", "0")
    cut_in_half(good / "step_000004" / MODEL_FILE)
    code = run_from_args(train_args(corpus, good, 6, "--resume", str(good / "step_000004")))
    assert_one_line_error(code, capsys.readouterr().err, "step_000004 is torn", f"--resume {good / 'step_000002'}")


def disk_full_in_safetensors(*args, **kwargs):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')


def disk_full_in_torch_save(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as torch.save reports it: without the path


@pytest.mark.parametrize("fail", [disk_full_in_safetensors, disk_full_in_torch_save], ids=["safetensors", "torch"])
def test_a_full_disk_at_a_save_says_where_and_what_to_do_and_leaves_nothing(
    fail, corpus, tmp_path, capsys, monkeypatch
):
    out = trained(corpus, tmp_path / "run", 2, capsys)
    before = snapshot(out / "step_000002", out / LATEST)
    if fail is disk_full_in_safetensors:
        monkeypatch.setattr(checkpoint, "save_file", fail)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", fail)
    code = run_from_args(train_args(corpus, out, 4))
    assert_one_line_error(
        code,
        capsys.readouterr().err,
        f"cannot write checkpoint {out / 'step_000004'}: no space left on the disk",
        "free on its disk, a checkpoint takes about",
        "--keep-last 2 (now 3)",
        f"resumes from {out / 'step_000002'}",
    )
    assert_unchanged(before, out / "step_000002", out / LATEST)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name == LOCK_FILE]  # no temporaries
    fresh = tmp_path / "fresh"  # the first save of a run
    code = run_from_args(train_args(corpus, fresh, 2))
    assert_one_line_error(code, capsys.readouterr().err, f"{fresh / 'step_000002'}: no space", "no earlier checkpoint")
    assert not [p.name for p in fresh.iterdir() if p.name.startswith(".") or p.name.startswith("step_")]


def test_a_second_run_in_a_used_out_dir_is_refused_and_the_first_goes_on(corpus, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = start_run(train_args(corpus, out, 3), log, stall_at=1)
    wait_until_stalled(log, first)
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    before = snapshot(out)
    code = run_from_args(train_args(corpus, out, 3))
    assert_one_line_error(
        code, capsys.readouterr().err, f"{out} is in use by the run with pid {first.pid}", "another --out-dir"
    )
    assert_unchanged(before, out)  # the refused run touched nothing, not even the lock
    log.with_suffix(".go").write_text("")
    assert first.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert not (out / LOCK_FILE).exists()  # released on exit


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(corpus, tmp_path, capsys, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert run_from_args(train_args(corpus, out, 1)) == 0, capsys.readouterr().err
    assert f"the run that held it (pid {pid} on {socket.gethostname()}) is gone" in caplog.text
    assert not (out / LOCK_FILE).exists()
    # a live process's lock (this test's own pid: another run in this process) is refused, and left alone
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    code = run_from_args(train_args(corpus, out, 2))
    assert_one_line_error(code, capsys.readouterr().err, f"pid {os.getpid()}", f"delete {out / LOCK_FILE}")
    assert (out / LOCK_FILE).exists()


def test_a_resume_that_changes_what_a_step_trains_on_is_refused_unless_allowed(corpus, tmp_path, capsys, caplog):
    out = trained(corpus, tmp_path / "run", 2, capsys)
    before = snapshot(out)
    code = run_from_args(train_args(corpus, out, 4, "--batch-size", "4", "--grad-accum", "2", "--seed", "7"))
    assert_one_line_error(
        code,
        capsys.readouterr().err,
        "--batch-size 2 -> 4",
        "--grad-accum 1 -> 2",
        "--seed 1337 -> 7",
        "--allow-config-change",
    )
    other = write_corpus(tmp_path / "other", 150, seed=6)  # other data: its size differs
    code = run_from_args(["--train", str(other), *train_args(corpus, out, 4)[2:]])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "training data 120 documents, ", " tokens -> 150 documents, ")
    assert_unchanged(before, out)
    caplog.set_level(logging.INFO)
    argv = train_args(corpus, out, 4, "--batch-size", "4", "--lr", "1e-3", "--allow-config-change")
    assert run_from_args(argv) == 0, capsys.readouterr().err
    assert "--batch-size 2 -> 4, --lr 0.0003 -> 0.001" in caplog.text and "no longer exact" in caplog.text
    history = read_config(out / "step_000004")["config_changes"]
    assert history == [
        {
            "step": 2,
            "changed": {"--batch-size": [2, 4], "--lr": [0.0003, 0.001]},
            "breaks_exact_resume": ["--batch-size"],
        }
    ]
    # further --steps, and a learning rate alone, resume without a refusal (the lr change logged and recorded)
    caplog.clear()
    assert run_from_args(train_args(corpus, out, 5, "--batch-size", "4", "--lr", "1e-3")) == 0
    assert "changed settings" not in caplog.text and "RESUMING" in caplog.text
    assert read_config(out / "step_000005")["config_changes"] == history  # the history is carried on
    assert run_from_args(train_args(corpus, out, 6, "--batch-size", "4", "--lr", "2e-3")) == 0
    assert "--lr 0.001 -> 0.002" in caplog.text and "no longer exact" not in caplog.text.split("--lr 0.001")[1]
    assert len(read_config(out / "step_000006")["config_changes"]) == 2


def test_resuming_a_run_already_past_its_steps_says_it_is_complete(corpus, tmp_path, capsys, caplog):
    out = trained(corpus, tmp_path / "run", 3, capsys)
    before = snapshot(out / "step_000003", out / LATEST)
    caplog.set_level(logging.INFO)
    for steps in (3, 2):
        assert run_from_args(train_args(corpus, out, steps)) == 0, capsys.readouterr().err
        assert f"is at step 3 and this run stops at step {steps}: the run is already complete" in caplog.text
        assert "raise --steps" in caplog.text and "continuing to step" not in caplog.text
        caplog.clear()
    assert_unchanged(before, out / "step_000003", out / LATEST)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_identical_runs_write_byte_identical_weights(corpus, tmp_path, capsys):
    first, second = (trained(corpus, tmp_path / name, 2, capsys) for name in ("a", "b"))
    assert (first / "step_000002" / MODEL_FILE).read_bytes() == (second / "step_000002" / MODEL_FILE).read_bytes()
    # safetensors orders its metadata map at random, within a process too: many saves, one set of bytes
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    for index in range(12):
        checkpoint.write_model_file(tmp_path / f"{index}.safetensors", tensors, {"c": "a"})
    assert len({(tmp_path / f"{index}.safetensors").read_bytes() for index in range(12)}) == 1
    state = checkpoint.read_model_state(first / "step_000002")  # still read back by safetensors
    assert state and all(torch.isfinite(v).all() for v in state.values())


def test_a_refused_run_leaves_no_new_folder(corpus, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code = run_from_args(train_args(corpus, out, 2, "--vocab-size", "50"))
    assert_one_line_error(code, capsys.readouterr().err, "holds ids up to 127", "vocab_size 50")
    assert not any(tmp_path.iterdir())
