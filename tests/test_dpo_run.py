"""python -m llama.dpo end to end on CPU: a tiny SFT model trained with DPO on the real MedicalGPT pairs raises its
pairwise accuracy on them from 0.5 to > 0.9, starting at ln 2; the reference is scored once and cached, an online
reference gives the same losses, LoRA's reference is the base with its adapters off, resume is exact after
SIGKILL, and the wrong data or reference is refused in one line."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import assert_one_line_error
from safetensors.torch import load_file
from training_runs import REPO, assert_resumed_identically, start_run, torchrun_two_ranks, wait_until_stalled

from llama import dpo, sft
from llama.training.checkpoint import MODEL_FILE, find_checkpoint
from llama.training.metrics import read_metrics
from tests.test_chat import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU

PAIRS = "medicalgpt/dpo_zh_500.jsonl"
CPU = ["--profile", "cpu", "--kernels", "torch", "--no-progress"]


@pytest.fixture(scope="module")
def sft_model(shared_data, small_tokenizer, tmp_path_factory) -> Path:
    """A tiny model fine-tuned 30 steps on 200 real medical conversations (its newest checkpoint)."""
    root = tmp_path_factory.mktemp("dpo-sft")
    base = find_checkpoint(save_tiny_checkpoint(root / "base", small_tokenizer, max_seq_len=512))
    data = root / "medical.jsonl"
    with open(shared_data / "medicalgpt" / "medical_sft_1K_format.jsonl", encoding="utf-8") as f:
        data.write_text("".join(line for _, line in zip(range(200), f)), encoding="utf-8")
    args = ["--data", str(data), "--init", str(base), "--out-dir", str(root / "sft"), "--steps", "30"]
    args += ["--batch-size", "4", "--seq-len", "512", "--lr", "3e-3", "--val-fraction", "0", "--eval-every", "0"]
    assert sft.main([*args, "--pack-workers", "1", *CPU]) == 0
    return find_checkpoint(root / "sft")


@pytest.fixture(scope="module")
def pairs(shared_data, small_tokenizer, tmp_path_factory) -> Path:
    """The 500 real pairs packed with engine.prepare --kind dpo (5% held out as .val)."""
    out = tmp_path_factory.mktemp("dpo-pairs") / "pairs"
    command = [sys.executable, "-m", "engine.prepare", "--kind", "dpo", "--source", str(shared_data / PAIRS)]
    command += ["--tokenizer", str(small_tokenizer.path), "--out", str(out), "--val-fraction", "0.05"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def dpo_args(data: Path, init: Path, out: Path, steps: int, *extra: str) -> list[str]:
    args = ["--data", str(data), "--init", str(init), "--out-dir", str(out), "--steps", str(steps)]
    return [*args, "--batch-size", "4", "--seq-len", "512", "--lr", "1e-4", "--log-every", "1", *CPU, *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.slow
def test_dpo_raises_pairwise_accuracy_on_the_training_pairs_past_0_9(sft_model, pairs, tmp_path, caplog):
    out = tmp_path / "dpo"
    extra = ["--val", str(pairs), "--eval-batches", "1000", "--eval-every", "300"]  # validate on every training pair
    with caplog.at_level("INFO"):
        assert dpo.main([*dpo_args(pairs, sft_model, out, 300, *extra), "--lr", "5e-4"]) == 0
    start = next(line for line in caplog.text.splitlines() if "validation loss before training" in line)
    assert "validation loss before training: 0.6931" in start, start  # ln 2: the policy is its reference
    assert abs(float(re.search(r"accuracy ([0-9.]+)", start).group(1)) - 0.5) < 0.1, start  # ties broken by noise
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert final["val_accuracy"] > 0.9 and final["val_margin"] > 0, final
    assert "val_ppl" not in final, "a preference loss has no perplexity"
    for key in ("accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen"):
        assert key in final
    cached = list(pairs.parent.glob("pairs.ref-*.npy"))
    assert len(cached) == 1, "the reference was scored once, for the training set (also the --val here)"


def test_an_online_reference_gives_the_losses_of_the_cached_one(sft_model, pairs, tmp_path):
    for mode in ("precompute", "online"):
        assert dpo.main(dpo_args(pairs, sft_model, tmp_path / mode, 3, "--eval-every", "0", "--ref", mode)) == 0
    cached, online = losses(tmp_path / "precompute"), losses(tmp_path / "online")
    assert cached[0] == pytest.approx(math.log(2), abs=1e-5)
    assert online == pytest.approx(cached, abs=1e-4)


def test_lora_dpo_with_the_adapters_off_as_its_reference(sft_model, pairs, tmp_path):
    args = dpo_args(pairs, sft_model, tmp_path / "lora", 3, "--eval-every", "0", "--ref", "online")
    assert dpo.main([*args, "--lora", "r=4,alpha=8", "--lr", "5e-4"]) == 0
    assert losses(tmp_path / "lora")[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is its base
    weights = load_file(str(find_checkpoint(tmp_path / "lora") / MODEL_FILE))
    assert all(".lora_" in name for name in weights)


def test_a_dpo_run_killed_mid_run_resumes_bitwise_identically(sft_model, pairs, tmp_path):
    script = tmp_path / "run_dpo.py"
    script.write_text("from llama.dpo import main\nraise SystemExit(main())\n", encoding="utf-8")
    steps, extra = 6, ("--save-every", "2", "--eval-every", "3", "--model", "dropout=0.1")
    reference = start_run(
        dpo_args(pairs, sft_model, tmp_path / "reference", steps, *extra), tmp_path / "ref.log", script=str(script)
    )
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]  # the reference cache first
    victim_args = dpo_args(pairs, sft_model, tmp_path / "victim", steps, *extra)
    victim = start_run(victim_args, tmp_path / "victim.log", stall_at=3, script=str(script))
    assert wait_until_stalled(tmp_path / "victim.log", victim) == 3
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    resumed = start_run(victim_args, tmp_path / "resumed.log", script=str(script))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert "RESUMING from" in (tmp_path / "resumed.log").read_text()
    assert_resumed_identically(
        tmp_path / "reference", tmp_path / "victim", steps, ("loss", "grad_norm", "accuracy", "margin")
    )


def test_dpo_on_two_ddp_ranks_scores_the_reference_once_and_trains(sft_model, pairs, tmp_path):
    """torchrun, two CPU ranks: rank 0 scores the reference (the other waits for its file), rows are split, the
    replicas stay identical (one checkpoint), and the metrics are the ranks' mean."""
    script = tmp_path / "run_dpo.py"
    script.write_text("from llama.dpo import main\nraise SystemExit(main())\n", encoding="utf-8")
    out = tmp_path / "ddp"
    torchrun_two_ranks(script, *dpo_args(pairs, sft_model, out, 3, "--eval-every", "3", "--seq-len", "256"))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert 0 <= records[-1]["val_accuracy"] <= 1 and records[-1]["tokens"] == 3 * 2 * 4 * 256
    assert len(list(pairs.parent.glob("pairs.ref-*.npy"))) >= 1


def test_sft_data_is_refused_naming_what_dpo_needs(sft_model, shared_data, small_tokenizer, tmp_path, capsys):
    conversations = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    conversations.write_text(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n", encoding="utf-8")
    code = dpo.main(dpo_args(conversations, sft_model, tmp_path / "out", 2))
    assert_one_line_error(code, capsys.readouterr().err, "are not DPO preference pairs", "python -m llama.sft")
    assert not (tmp_path / "out").exists()


def test_a_reference_of_another_tokenizer_is_refused(sft_model, pairs, tmp_path, capsys):
    other = find_checkpoint(save_tiny_checkpoint(tmp_path / "other", _FakeTokenizer(), sha256="cd" * 32))
    code = dpo.main(dpo_args(pairs, sft_model, tmp_path / "out", 2, "--ref-ckpt", str(other)))
    assert_one_line_error(code, capsys.readouterr().err, f"the reference {other}", "another vocabulary")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--beta", "0"], "--beta must be a finite number > 0"),
        (["--loss-type", "ipo", "--label-smoothing", "0.1"], "applies to the sigmoid and robust losses"),
        (["--ref-batch-size", "0"], "--ref-batch-size must be"),
        (["--epochs", "0"], "--epochs must be"),
    ],
)
def test_bad_settings_are_one_line_before_anything_is_written(sft_model, pairs, tmp_path, capsys, flags, needle):
    code = dpo.main(dpo_args(pairs, sft_model, tmp_path / "out", 2, *flags))
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


class _FakeTokenizer:
    """Enough of a tokenizer for save_tiny_checkpoint: a vocabulary size and a path."""

    vocab_size = 3000
    path = Path("elsewhere/tokenizer.model")
    sha256 = "cd" * 32
