"""llama.training: schedules, precision, accumulation, robustness, exact resume after SIGKILL, SIGTERM, DDP on gloo.

Every run is the real loop on the real ``llama.model.Llama`` (tiny preset shrunk to dim 64, the
``kernels="torch"`` path, CPU, one thread) over a small packed corpus whose documents count upward,
so the model has something to learn in a few steps.
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_runs import EOS, VOCAB, start_run, torchrun_two_ranks, wait_until_stalled, write_corpus

from llama.model import LlamaConfig, ModelOptions
from llama.training import objectives
from llama.training.checkpoint import LATEST, find_checkpoint, list_checkpoints
from llama.training.cli import run_from_args
from llama.training.config import TrainConfig
from llama.training.errors import NonFiniteLossError, TrainingOOMError
from llama.training.loop import train
from llama.training.metrics import read_metrics, summary_line
from llama.training.runtime import device_peak_tflops, lookup_peak_tflops, mfu
from llama.training.step import learning_rate

MODEL_ARGS = ["--model", "dim=64", "--model", "kernels=torch"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """``corpus`` plus its ``corpus.val`` sibling (found automatically by train())."""
    folder = tmp_path_factory.mktemp("data")
    write_corpus(folder / "corpus.val", 40, seed=2)
    return write_corpus(folder / "corpus", 300, seed=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def tiny_model() -> LlamaConfig:
    return LlamaConfig.from_preset("tiny", vocab_size=VOCAB, dim=64)


def tiny_config(out_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        steps=6,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_every=0,
        save_every=0,
        log_every=1,
        out_dir=str(out_dir),
        progress=False,
        kernels="torch",
    )
    return TrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------- pieces


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [learning_rate(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.55, abs=0.02) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_schedule_is_flat_then_decays_over_the_last_fraction(shape):
    cfg = TrainConfig(
        steps=100, lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2, decay_shape=shape
    )
    lrs = [learning_rate(s, cfg, 100) for s in range(100)]
    assert lrs[:5] == pytest.approx([(s + 1) / 6 for s in range(5)])
    assert lrs[5:80] == [1.0] * 75
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))
    assert lrs[-1] == 0.0
    halfway = lrs[89]  # 10 of the 20 decay steps done
    assert halfway == pytest.approx(0.5 if shape == "linear" else 1 - math.sqrt(0.5))


def test_config_validation_is_one_line():
    for bad in (dict(steps=5, tokens=100), dict(), dict(steps=5, precision="fp8"), dict(steps=5, min_lr=1.0)):
        with pytest.raises(ValueError) as info:
            TrainConfig(**bad).validate()
        assert "\n" not in str(info.value)
    assert TrainConfig(tokens=1000).total_steps(128) == 8


def test_peak_tflops_table_matches_device_names():
    assert lookup_peak_tflops("NVIDIA GeForce RTX 3060") == 25.5
    assert lookup_peak_tflops("NVIDIA GeForce RTX 3060 Ti") == 32.4
    assert lookup_peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert lookup_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert lookup_peak_tflops("NVIDIA L4") == 121.0 and lookup_peak_tflops("NVIDIA L40S") == 362.0
    assert lookup_peak_tflops("NVIDIA H200") == 989.4
    assert lookup_peak_tflops("Some Future GPU") is None
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), 2.0) == 2.0
    assert mfu(1e9, 1000.0, 2.0) == pytest.approx(0.5) and mfu(1e9, 1000.0, None) is None
    line = summary_line(
        steps=10,
        tokens=2_000_000,
        seconds=75,
        tokens_per_s=1234.5,
        train_loss=2.0,
        val_loss=2.5,
        mfu=None,
        peak_memory_gib=None,
    )
    assert "10 steps" in line and "2.00M tokens" in line and "1m15s" in line and "MFU n/a" in line


# ---------------------------------------------------------------- the loop, in process


def test_training_learns_logs_validates_and_keeps_last_checkpoints(corpus, tmp_path):
    cfg = tiny_config(tmp_path, steps=12, eval_every=4, save_every=3, keep_last=2, eval_batches=3)
    result = train(tiny_model(), cfg, corpus)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["tokens"] == result.tokens == 12 * 4 * 32
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # the counting pattern is learnable
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    assert all(r["grad_norm"] > 0 and r["mfu"] is None and r["scale"] is None for r in records)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 12]
    assert (tmp_path / LATEST).read_text().strip() == "step_000012" and result.checkpoint == tmp_path / "step_000012"
    config = json.loads((tmp_path / "step_000012" / "config.json").read_text())
    assert (
        config["model"]["dim"] == 64 and config["train"]["steps"] == 12 and config["tokenizer"]["sha256"] == "ab" * 32
    )
    assert result.val_loss == records[-1]["val_loss"] and result.train_loss == records[-1]["loss"]


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    # epoch mode hands out the same samples whether a step takes 4 at once or 2 + 2
    big = train(tiny_model(), tiny_config(tmp_path / "big", steps=3, data_mode="epoch"), corpus)
    small = train(
        tiny_model(), tiny_config(tmp_path / "small", steps=3, data_mode="epoch", batch_size=2, grad_accum=2), corpus
    )
    assert small.tokens == big.tokens
    losses = [
        [r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (tmp_path / "big", tmp_path / "small")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bf16_autocast_runs_on_cpu(corpus, tmp_path):
    fp32 = train(tiny_model(), tiny_config(tmp_path / "fp32", steps=2), corpus)
    bf16 = train(tiny_model(), tiny_config(tmp_path / "bf16", steps=2, precision="bf16"), corpus)
    first = [read_metrics(run / "metrics.jsonl")[0]["loss"] for run in (tmp_path / "fp32", tmp_path / "bf16")]
    assert first[0] != first[1] and first[1] == pytest.approx(first[0], abs=0.05)  # same init, bf16 rounding
    assert math.isfinite(bf16.train_loss) and math.isfinite(fp32.train_loss)


def test_document_masking_feeds_positions_and_document_ids(corpus, tmp_path, monkeypatch):
    seen = []
    real = objectives.lm_loss
    monkeypatch.setattr(objectives, "lm_loss", lambda model, batch: (seen.append(batch), real(model, batch))[1])
    result = train(tiny_model(), tiny_config(tmp_path, steps=2, doc_masking=True), corpus)
    assert math.isfinite(result.train_loss)
    batch = seen[0]
    assert batch["position_ids"].shape == batch["doc_ids"].shape == (4, 32)
    restarts = batch["input_ids"][:, :-1] == EOS  # the token after an EOS starts a document at position 0
    assert (batch["position_ids"][:, 1:][restarts] == 0).all() and batch["doc_ids"].max() > 0


def poison_step(monkeypatch, bad_steps: set[int], value: float = math.inf) -> None:
    """Make the training loss (and so every gradient) non-finite on the given steps (1-based, grad_accum 1)."""
    real, calls = objectives.lm_loss, []

    def forward_loss(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * value if len(calls) in bad_steps else loss

    monkeypatch.setattr(objectives, "lm_loss", forward_loss)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_non_finite_gradients_skip_the_update(corpus, tmp_path, monkeypatch, precision):
    poison_step(monkeypatch, {2})
    train(tiny_model(), tiny_config(tmp_path, steps=3, save_every=1, keep_last=0, precision=precision), corpus)
    weights = [load_file(str(tmp_path / f"step_{s:06d}" / "model.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 3 trained again
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert not math.isfinite(records[1]["grad_norm"])
    if precision == "fp16":
        assert records[0]["scale"] == records[1]["scale"] == 65536.0
        assert records[2]["scale"] == 32768.0  # halved after the skipped step


def test_nan_patience_saves_and_stops_naming_the_step(corpus, tmp_path, monkeypatch):
    poison_step(monkeypatch, set(range(4, 100)), value=math.nan)
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row, the last at step 6") as info:
        train(tiny_model(), tiny_config(tmp_path, steps=20, save_every=2, nan_patience=3), corpus)
    assert "\n" not in str(info.value)
    assert (tmp_path / "step_000006-nonfinite" / "model.safetensors").is_file()
    assert find_checkpoint(tmp_path) == tmp_path / "step_000004"  # `latest` still names the last regular save


def test_out_of_memory_says_what_would_fit(corpus, tmp_path, monkeypatch):
    def forward_loss(model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(objectives, "lm_loss", forward_loss)
    with pytest.raises(TrainingOOMError, match=r"halve --batch-size to 2 and double --grad-accum to 2") as info:
        train(tiny_model(), tiny_config(tmp_path), corpus)
    assert "step 1, micro-batch 1/1" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TrainingOOMError, match=r"activation checkpointing"):
        train(tiny_model(), tiny_config(tmp_path, batch_size=1), corpus)


def test_resume_refuses_a_differently_shaped_model(corpus, tmp_path):
    train(tiny_model(), tiny_config(tmp_path, steps=2), corpus)
    bigger = LlamaConfig.from_preset("tiny", vocab_size=VOCAB, dim=128)
    with pytest.raises(ValueError, match=r"dim=64, this run has dim=128"):
        train(bigger, tiny_config(tmp_path, steps=4), corpus)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(tiny_model(), tiny_config(tmp_path / "empty", resume=True), corpus)


def test_resume_false_never_overwrites_existing_checkpoints(corpus, tmp_path):
    train(tiny_model(), tiny_config(tmp_path, steps=2), corpus)
    with pytest.raises(ValueError, match="holds checkpoints up to step 2 and resume is off") as info:
        train(tiny_model(), tiny_config(tmp_path, steps=4, resume=False), corpus)
    assert "\n" not in str(info.value)
    resumed = train(tiny_model(), tiny_config(tmp_path, steps=4, resume=str(tmp_path / "step_000002")), corpus)
    assert resumed.resumed_from == tmp_path / "step_000002" and resumed.steps == 4


def test_loss_curve_and_tensorboard_when_installed(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    train(tiny_model(), tiny_config(tmp_path, steps=4, eval_every=2), corpus)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())


def test_cli_errors_are_one_line(corpus, tmp_path, capsys):
    code = run_from_args(["--train", str(corpus), "--steps", "2", "--tokens", "10", "--out-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: give exactly one of --steps and --tokens"


# ---------------------------------------------------------------- the loop, in subprocesses


def run_args(corpus: Path, out_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--train",
        str(corpus),
        *MODEL_ARGS,
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--no-progress",
        "--out-dir",
        str(out_dir),
        *extra,
    ]


def test_sigkill_at_a_random_step_then_resume_gives_bitwise_identical_losses(corpus, tmp_path):
    steps, kill_after = 16, random.Random(20240).randint(3, 9)  # the run stalls after that step and is killed there
    extra = ("--save-every", "2", "--keep-last", "2", "--model", "dropout=0.1")  # dropout: the torch RNG matters too
    reference = start_run(run_args(corpus, tmp_path / "reference", steps, *extra), tmp_path / "reference.log")
    victim = start_run(
        run_args(corpus, tmp_path / "victim", steps, *extra), tmp_path / "victim.log", stall_at=kill_after
    )
    assert wait_until_stalled(tmp_path / "victim.log", victim) == kill_after
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    before_kill = read_metrics(tmp_path / "victim" / "metrics.jsonl")
    resumed_from = find_checkpoint(tmp_path / "victim")  # what `latest` names (a newer folder may exist unnamed)
    resumed_at = int(resumed_from.name.split("_")[1])
    assert resumed_at == kill_after // 2 * 2, "the newest of the every-2-steps checkpoints before the kill"
    assert [r["step"] for r in before_kill] == list(range(1, kill_after + 1))

    resumed = start_run(run_args(corpus, tmp_path / "victim", steps, *extra), tmp_path / "resumed.log")  # no --resume
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    assert f"RESUMING from {resumed_from}: step {resumed_at}," in (tmp_path / "resumed.log").read_text()

    expected = {r["step"]: r for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    after = read_metrics(tmp_path / "victim" / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(1, steps + 1))  # records past the checkpoint were replaced
    for record in before_kill + after:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    final = [
        load_file(str(run / f"step_{steps:06d}" / "model.safetensors"))
        for run in (tmp_path / "reference", tmp_path / "victim")
    ]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_143(corpus, tmp_path):
    log = tmp_path / "run.log"
    run = start_run(run_args(corpus, tmp_path, 200, "--save-every", "0"), log, stall_at=3)
    wait_until_stalled(log, run)
    run.send_signal(signal.SIGTERM)  # arrives before step 4 runs; the run finishes step 4, saves and stops
    log.with_suffix(".go").touch()
    assert run.wait(timeout=120) == 143, log.read_text()[-2000:]
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 4
    assert (tmp_path / LATEST).read_text().strip() == "step_000004"
    assert "interrupted: stopped by SIGTERM" in (tmp_path / "run.log").read_text()


DISTRIBUTED_WORKER = """
import os, sys, torch
torch.set_num_threads(1)
from llama.model import LlamaConfig
from llama.training import TrainConfig, train
out_dir, corpus, dump, parallel = sys.argv[1:5]
model = LlamaConfig.from_preset("tiny", vocab_size=128, dim=64, tie_embeddings=True)
cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=2,
                  eval_batches=2, save_every=2, log_every=1, out_dir=out_dir, progress=False, parallel=parallel)
result = train(model, cfg, corpus)
state = result.model.state_dict() if parallel == "ddp" else {}  # FSDP holds shards; its checkpoint is compared instead
torch.save({"state": state, "first_batch": result.first_batch_sha256, "tokens": result.tokens},
           os.path.join(dump, f"rank{os.environ['RANK']}.pt"))
"""


def torchrun_two_cpu_ranks(tmp_path: Path, corpus: Path, parallel: str) -> tuple[Path, list[dict]]:
    """Train 4 steps on 2 gloo ranks under torchrun; returns the out_dir and what each rank reported."""
    worker, dump, out_dir = tmp_path / "worker.py", tmp_path / "dump", tmp_path / "out"
    worker.write_text(DISTRIBUTED_WORKER)
    dump.mkdir()
    torchrun_two_ranks(worker, out_dir, corpus, dump, parallel, timeout=240)
    return out_dir, [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    return torchrun_two_cpu_ranks(tmp_path_factory.mktemp("ddp"), corpus, "ddp")


def test_ddp_on_two_cpu_processes_shards_data_and_keeps_replicas_identical(ddp_run):
    out_dir, ranks = ddp_run
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # each rank read its own shard
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == 4 * 2 * 2 * 32 * 2
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys() and all(torch.equal(state0[k], state1[k]) for k in state0)
    records = read_metrics(out_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone writes
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert [step for step, _ in list_checkpoints(out_dir)] == [2, 4]
    saved = load_file(str(out_dir / "step_000004" / "model.safetensors"))
    assert "lm_head.weight" not in saved  # tied to the embedding, stored once
    assert all(torch.equal(saved[k], state0[k]) for k in saved)


def test_fsdp_on_two_cpu_processes_trains_like_ddp(ddp_run, corpus, tmp_path):
    ddp_dir, _ = ddp_run
    fsdp_dir, ranks = torchrun_two_cpu_ranks(tmp_path, corpus, "fsdp")
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    ddp_records, fsdp_records = read_metrics(ddp_dir / "metrics.jsonl"), read_metrics(fsdp_dir / "metrics.jsonl")
    assert [r["step"] for r in fsdp_records] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fsdp_records] == pytest.approx([r[key] for r in ddp_records], rel=1e-5)
    ddp_weights, fsdp_weights = (load_file(str(d / "step_000004" / "model.safetensors")) for d in (ddp_dir, fsdp_dir))
    assert ddp_weights.keys() == fsdp_weights.keys()  # the gathered full state, tied matrix once
    for name in ddp_weights:
        torch.testing.assert_close(fsdp_weights[name], ddp_weights[name], rtol=1e-5, atol=1e-6)


def test_a_seq_len_beyond_the_context_names_what_fits(corpus, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^--seq-len 512 is longer than the model's context of 256 tokens; "
        r"use --seq-len 256 or less \(or --model max_seq_len=512\)$",
    ):
        train(tiny_model(), tiny_config(tmp_path, seq_len=512), corpus)


def test_model_items_split_into_architecture_and_run_options():
    """``--model kernels=torch`` keeps working: run options go to TrainConfig, the rest to LlamaConfig."""
    from llama.training.cli import build_parser, model_config_from_args, train_config_from_args

    args = build_parser().parse_args(
        [
            "--train",
            "x",
            "--vocab-size",
            "64",
            "--model",
            "dim=32",
            "--model",
            "kernels=torch",
            "--model",
            "dropout=0.1",
            "--model",
            "checkpointing=true",
        ]
    )
    config, cfg = model_config_from_args(args), train_config_from_args(args)
    assert config.dim == 32 and not hasattr(config, "kernels")
    assert cfg.model_options() == ModelOptions(kernels="torch", checkpointing=True, dropout=0.1)
    with pytest.raises(ValueError, match="unknown field"):
        model_config_from_args(build_parser().parse_args(["--train", "x", "--vocab-size", "64", "--model", "dims=3"]))
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(steps=1, dropout=1.5).validate()
