"""Fault suite, training settings and the loop's safety checks: out-of-range numbers, a device this machine lacks,
a diverging run, and the profile line naming the values actually used (issue 13). One test per case."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import assert_one_line_error, assert_unchanged, snapshot
from safetensors.torch import load_file
from training_runs import EOS, VOCAB, write_corpus

from engine.format import FORMAT, AtomicOutput, DatasetPaths, token_dtype
from llama import pretrain, sft
from llama.training import objectives
from llama.training.checkpoint import find_checkpoint
from llama.training.cli import run_from_args

TINY = ["--profile", "cpu", "--kernels", "torch", "--model", "dim=64", "--no-progress", "--log-every", "1"]
SHAPE = ["--seq-len", "32", "--eval-every", "0"]
SMALL = [*TINY, "--batch-size", "2", *SHAPE]
TRAIN = ["--model", "dim=64", "--model", "kernels=torch", "--no-progress", "--batch-size", "2", *SHAPE]  # llama.train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("faults-train") / "corpus", 120, seed=3)


def write_sft(prefix: Path, n_docs: int = 40) -> Path:
    """A packed SFT dataset of synthetic conversations (prompt ids, then reply ids counted by the mask)."""
    rng = np.random.default_rng(7)
    docs, masks = [], []
    for _ in range(n_docs):
        prompt, reply = int(rng.integers(3, 10)), int(rng.integers(3, 10))
        docs.append(np.append(rng.integers(3, VOCAB, size=prompt + reply), EOS))
        masks.append(np.array([0] * prompt + [1] * (reply + 1), dtype=np.uint8))
    paths, dtype = DatasetPaths.of(prefix), token_dtype(VOCAB)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    with AtomicOutput(paths) as out:
        np.concatenate(docs).astype(dtype).tofile(out.tmp(paths.bin))
        np.concatenate(masks).tofile(out.tmp(paths.mask))
        with open(out.tmp(paths.idx), "wb") as f:
            np.save(f, offsets)
        meta = {"format": FORMAT, "kind": "sft", "dtype": dtype.name, "n_tokens": int(offsets[-1]), "n_docs": n_docs}
        tokenizer = {"path": "tok/tokenizer.json", "sha256": "ab" * 32}  # the one write_corpus names
        out.commit({**meta, "vocab_size": VOCAB, "bos_id": 1, "eos_id": EOS, "pad_id": 0, "tokenizer": tokenizer})
    return paths.prefix


@pytest.fixture(scope="module")
def sft_setup(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(a one-step pretrained checkpoint folder, packed SFT data with its tokenizer)."""
    folder = tmp_path_factory.mktemp("faults-sft")
    assert pretrain.main(["--bin", str(corpus), "--steps", "1", "--out-dir", str(folder / "pre"), *SMALL]) == 0
    return folder / "pre", write_sft(folder / "chat")


def pretrain_run(corpus: Path, out: Path, *args: str) -> list[str]:
    return ["--bin", str(corpus), "--out-dir", str(out), *SMALL, *args]


def sft_run(sft_setup: tuple[Path, Path], out: Path, *args: str) -> list[str]:
    init, data = sft_setup
    return ["--data", str(data), "--init", str(init), "--out-dir", str(out), *SMALL, *args]


# (flags, the flag the error names): zero is a value (refused where it is out of range), never "not given"
BAD_NUMBERS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--tokens", "0"], "--tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--seq-len", "0"], "--seq-len"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--min-lr", "-0.00001"], "--min-lr"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--decay-fraction", "1.5"], "--decay-fraction"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--beta2", "1"], "--beta2"),
    (["--eps", "0"], "--eps"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--save-every", "-2"], "--save-every"),
    (["--log-every", "0"], "--log-every"),
    (["--nan-patience", "-1"], "--nan-patience"),
    (["--max-memory-gb", "0"], "--max-memory-gb"),
    (["--peak-tflops", "-3"], "--peak-tflops"),
    (["--seed", "-1"], "--seed"),
    (["--model", "dropout=1.5"], "--dropout"),
]


def _steps(flags: list[str]) -> list[str]:
    return flags if flags[0] in ("--steps", "--tokens") else ["--steps", "2", *flags]


@pytest.mark.parametrize("flags,named", BAD_NUMBERS, ids=[" ".join(f) for f, _ in BAD_NUMBERS])
def test_out_of_range_numbers_are_refused_naming_the_flag_before_anything_is_written(
    flags, named, corpus, sft_setup, tmp_path, capsys
):
    before = snapshot(corpus.parent, sft_setup[0].parent)
    for main, argv in (
        (pretrain.main, pretrain_run(corpus, tmp_path / "pre", *_steps(flags))),
        (sft.main, sft_run(sft_setup, tmp_path / "sft", *_steps(flags))),
    ):
        code = main(argv)
        assert_one_line_error(code, capsys.readouterr().err, named, "must be")
    code = run_from_args(["--train", str(corpus), "--out-dir", str(tmp_path / "train"), *TRAIN, *_steps(flags)])
    assert_one_line_error(code, capsys.readouterr().err, named)
    assert not any(tmp_path.iterdir())  # no out dir, nothing written
    assert_unchanged(before, corpus.parent, sft_setup[0].parent)


@pytest.mark.parametrize(
    "device,needles",
    [
        ("cuda", ("--device cuda", "no CUDA GPU is visible", "--device cpu")),
        ("cuda:3", ("--device cuda:3", "no CUDA GPU is visible", "--device cpu")),
        ("gpu0", ("--device 'gpu0' is not a device", "cpu, cuda or cuda:N")),
    ],
)
def test_a_device_this_machine_lacks_is_one_line(device, needles, corpus, sft_setup, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for main, argv in (
        (pretrain.main, pretrain_run(corpus, tmp_path / "pre", "--steps", "2", "--device", device)),
        (sft.main, sft_run(sft_setup, tmp_path / "sft", "--steps", "2", "--device", device)),
    ):
        assert_one_line_error(main(argv), capsys.readouterr().err, *needles)
    assert not any(tmp_path.iterdir())


def test_a_gpu_index_beyond_the_count_is_one_line(corpus, sft_setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU seen: cuda:3 does not exist
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for main, argv in (
        (pretrain.main, pretrain_run(corpus, tmp_path / "pre", "--steps", "2", "--device", "cuda:3")),
        (sft.main, sft_run(sft_setup, tmp_path / "sft", "--steps", "2", "--device", "cuda:3")),
    ):
        assert_one_line_error(main(argv), capsys.readouterr().err, "--device cuda:3", "1 GPU(s)", "cuda:0")
    assert not any(tmp_path.iterdir())


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradients backward: a run past the point of diverging."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def infinite_gradients_from(monkeypatch, first_step: int) -> None:
    """From training step ``first_step`` on (1-based, grad_accum 1), every gradient is NaN/inf, the loss finite."""
    real, calls = objectives.lm_loss, []

    def forward_loss(model, batch):
        loss = real(model, batch)
        if not torch.is_grad_enabled():  # validation
            return loss
        calls.append(1)
        return _InfiniteGradient.apply(loss) if len(calls) >= first_step else loss

    monkeypatch.setattr(objectives, "lm_loss", forward_loss)


def test_skipped_updates_in_a_row_stop_the_run_like_nan_losses(corpus, tmp_path, capsys, monkeypatch, caplog):
    infinite_gradients_from(monkeypatch, 3)
    out = tmp_path / "run"
    argv = pretrain_run(corpus, out, "--steps", "30", "--save-every", "1", "--keep-last", "0", "--grad-clip", "0")
    code = pretrain.main([*argv, "--nan-patience", "4"])
    assert_one_line_error(
        code, capsys.readouterr().err, "4 steps in a row, the last at step 6", "lower --lr", "--grad-clip"
    )
    assert (out / "step_000006-nonfinite" / "model.safetensors").is_file()  # for inspection
    latest = find_checkpoint(out)  # the steps that trained nothing saved the weights of the last that did
    assert latest == out / "step_000005"
    trained, kept = (load_file(str(out / name / "model.safetensors")) for name in ("step_000002", latest.name))
    assert all(torch.equal(trained[k], kept[k]) for k in trained)


def test_the_issue_diverging_run_stops_instead_of_saving_huge_weights(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = pretrain.main(pretrain_run(corpus, out, "--steps", "60", "--lr", "1e4", "--grad-clip", "0"))
    assert_one_line_error(code, capsys.readouterr().err, "in a row", "lower --lr (now 10000)", "set --grad-clip")
    assert find_checkpoint(out) is None  # nothing diverged was saved as a checkpoint to resume or use


def test_fp16_scale_search_is_not_divergence_but_a_floor_scale_is(corpus, tmp_path, capsys, monkeypatch):
    infinite_gradients_from(monkeypatch, 1)
    argv = pretrain_run(corpus, tmp_path / "run", "--steps", "40", "--precision", "fp16", "--nan-patience", "2")
    code = pretrain.main(argv)
    # the scale halves from 2**16 on every skip; steps count once it is down to 1 (step 17)
    assert_one_line_error(code, capsys.readouterr().err, "2 steps in a row, the last at step 18", "bf16")


def test_one_skipped_update_is_counted_in_the_summary(corpus, tmp_path, capsys, monkeypatch, caplog):
    real, calls = objectives.lm_loss, []

    def forward_loss(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return _InfiniteGradient.apply(loss) if len(calls) == 2 else loss

    monkeypatch.setattr(objectives, "lm_loss", forward_loss)
    assert pretrain.main(pretrain_run(corpus, tmp_path / "run", "--steps", "3")) == 0
    assert "1 of the 3 updates of this session were skipped" in caplog.text


def test_the_profile_line_names_the_values_used_and_what_overrode_the_plan(corpus, sft_setup, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    argv = pretrain_run(corpus, tmp_path / "pre", "--steps", "1", "--grad-accum", "3")
    assert pretrain.main(argv) == 0, capsys.readouterr().err
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("profile cpu"))
    assert "micro-batch 2 (overrides the profile's 8) x 32 tokens" in line
    assert "accumulation 3 (overrides the profile's 8)" in line and "fp32," in line and "fp32 (" not in line
    caplog.clear()
    assert sft.main(sft_run(sft_setup, tmp_path / "sft", "--steps", "1", "--grad-accum", "3")) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("profile cpu"))
    assert "micro-batch 2 x accumulation 3" in line and "micro-batch 2 (overrides the profile's 8)" in line
    caplog.clear()
    plain = ["--bin", str(corpus), "--out-dir", str(tmp_path / "plain"), "--steps", "1", *TINY, *SHAPE]
    assert pretrain.main(plain) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("profile cpu"))
    assert "micro-batch 8 x 32 tokens, accumulation 8" in line and "overrides" not in line
