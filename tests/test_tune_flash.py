"""bench/tune_flash.py on CPU: the smoke run times every candidate tile of both passes and writes JSON + markdown."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def test_smoke_run_times_every_candidate_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "tiles.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tune_flash.py"), "--smoke", "--docs", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    fa = importlib.import_module("zhkernels.flash_attention")  # the module (zhkernels.flash_attention is the function)
    arch = result["timings"][0]["arch"]
    for kind in ("forward", "backward"):
        tiles = {tuple(t) for t in fa.candidates(kind, 64, torch.bfloat16, arch)}
        for docs in (False, True):
            timed = {tuple(r["tile"]) for r in result["timings"] if r["pass"] == kind and r["docs"] == docs}
            assert timed == tiles, (kind, docs)
    assert len(result["summary"]) == 4  # forward and backward, with and without documents
    table = out.with_suffix(".md").read_text()
    assert "smoke" in table and table.count("\n| forward |") == 2 and table.count("\n| backward |") == 2


def test_without_a_gpu_it_says_so_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tune_flash.py"), "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: tune_flash needs a CUDA GPU (or --smoke to prove the script on CPU)"
    ]
    assert not (tmp_path / "x.json").exists()
