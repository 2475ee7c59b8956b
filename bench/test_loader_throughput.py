"""Loader throughput: ``PretrainDataset.next_batch`` against the usual per-sample memmap ``Dataset``.

The baseline is the loader most from-scratch recipes write: a ``Dataset`` whose ``__getitem__``
slices one window out of an ``np.memmap``, copies it to ``int64`` and returns ``(x, y)`` tensors,
and a collate step that ``torch.stack``s the samples (what ``DataLoader``'s default collate does,
without the ``DataLoader`` around it: a generous baseline). Both draw random window starts and
serve ``batch × seq_len`` input tokens per batch; throughput is input tokens per second.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from benchlib import PYTHON, REPO, Recorder, rounds

SHAPES = [(32, 512), (16, 1024)]
CASES = [(b, t, m) for b, t in SHAPES for m in ("baseline", "ours")]


class MemmapWindows(torch.utils.data.Dataset):
    """The typical recipe: one window per ``__getitem__`` from a ``uint16`` memmap, as int64 tensors."""

    def __init__(self, bin_path: Path, seq_len: int) -> None:
        self.data = np.memmap(bin_path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.data) - self.seq_len

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = np.array(self.data[start : start + self.seq_len + 1], dtype=np.int64)
        return torch.from_numpy(window[:-1]), torch.from_numpy(window[1:])


class RecipeLoader:
    """Random starts, per-sample ``__getitem__``, ``torch.stack`` collate."""

    def __init__(self, dataset: MemmapWindows, seed: int = 0) -> None:
        self.dataset = dataset
        self.rng = np.random.default_rng(seed)

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        starts = self.rng.integers(0, len(self.dataset), size=batch_size)
        samples = [self.dataset[int(s)] for s in starts]
        return {"input_ids": torch.stack([x for x, _ in samples]), "labels": torch.stack([y for _, y in samples])}


@pytest.fixture(scope="session")
def packed_tang(
    tang_dir: Path, chatglm_model: Path, engine_prepare: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The Tang corpus packed once with the ChatGLM tokenizer (uint16)."""
    out = tmp_path_factory.mktemp("packed") / "tang"
    cmd = [
        PYTHON,
        "-m",
        "engine.prepare",
        "--source",
        str(tang_dir),
        "--template",
        "{title}\\n{paragraphs}",
        "--tokenizer",
        str(chatglm_model),
        "--out",
        str(out),
        "--no-dedup",
        "--no-progress",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"packing the Tang corpus failed:\n{done.stderr[-3000:]}")
    return out


def make_loader(method: str, prefix: Path, seq_len: int) -> Any:
    if method == "ours":
        try:
            from engine.dataset import PretrainDataset
        except ImportError as e:
            pytest.skip(f"engine.dataset is not importable yet ({e})")
        return PretrainDataset(prefix, seq_len, mode="random", pin_memory=False)
    return RecipeLoader(MemmapWindows(prefix.with_name(prefix.name + ".bin"), seq_len))


@pytest.mark.parametrize(("batch_size", "seq_len", "method"), CASES, ids=[f"{b}x{t}-{m}" for b, t, m in CASES])
def test_loader_throughput(
    benchmark: Any, recorder: Recorder, packed_tang: Path, batch_size: int, seq_len: int, method: str
) -> None:
    loader = make_loader(method, packed_tang, seq_len)
    batch = loader.next_batch(batch_size)  # also the shape/dtype check both must pass
    assert batch["input_ids"].shape == (batch_size, seq_len) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].shape == (batch_size, seq_len) and batch["labels"].dtype == torch.int64

    benchmark.group = f"loader {batch_size}x{seq_len}"
    benchmark.pedantic(loader.next_batch, args=(batch_size,), rounds=200 * rounds(), iterations=10, warmup_rounds=20)
    if benchmark.disabled:  # --benchmark-disable: a smoke run, nothing measured
        return
    median = benchmark.stats.stats.median
    tokens_per_s = batch_size * seq_len / median
    recorder.add(
        "loader",
        {
            "method": method,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "median_seconds": median,
            "min_seconds": benchmark.stats.stats.min,
            "rounds": benchmark.stats.stats.rounds * 10,
        },
    )
    benchmark.extra_info["tokens_per_s"] = round(tokens_per_s)
