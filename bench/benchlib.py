"""What the benchmarks share: paths of the real data, the Tang documents, the environment, the results recorder."""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED_DATA = REPO.parent / "shared" / "data"
TANG = SHARED_DATA / "poetry" / "tang"
CHATGLM_MODEL = SHARED_DATA / "tokenizers" / "chatglm-sp" / "tokenizer.model"
RESULTS_DIR = BENCH / ".results"
PYTHON = sys.executable

if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from report import summarize_loader, summarize_pack  # noqa: E402


def rounds(default: int = 3) -> int:
    """Rounds per benchmark; ``ZHLLM_BENCH_ROUNDS`` overrides (1 for a quick look)."""
    return max(1, int(os.environ.get("ZHLLM_BENCH_ROUNDS", default)))


def poem_text(poem: dict[str, Any]) -> str:
    """A Tang poem as one document, exactly as ``--template "{title}\\n{paragraphs}"`` builds it."""
    return poem["title"] + "\n" + "\n".join(poem["paragraphs"])


def read_tang(folder: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted(folder.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            texts.extend(poem_text(p) for p in json.load(f))
    return texts


# ---------------------------------------------------------------- environment


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Where and when the figures were taken, for the report header."""
    import numpy
    import sentencepiece

    changed = _git("status", "--porcelain", "--", "engine", "llama", "zhkernels", "bench")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # no .git travels to a lent GPU machine: bench/gpu_check.sh is given the commit in ZHLLM_COMMIT
        "commit": _git("rev-parse", "--short", "HEAD")
        if (REPO / ".git").exists()
        else os.environ.get("ZHLLM_COMMIT", "unknown"),
        # files of the measured code that differ from the commit (modified or not yet committed)
        "uncommitted": []
        if changed == "unknown"
        else [line.split(maxsplit=1)[-1] for line in changed.splitlines() if line.strip()],
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "sentencepiece": sentencepiece.__version__,
        "command": "pytest " + shlex.join(sys.argv[1:])
        if Path(sys.argv[0]).name in ("pytest", "py.test", "__main__.py")
        else shlex.join(sys.argv),
        "load_average": list(os.getloadavg()),
    }


# ---------------------------------------------------------------- results


class Recorder:
    """Collects one row per benchmark; summarized, saved and printed at the end of the session."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {"pack": [], "loader": []}
        self.started = environment()

    def add(self, kind: str, row: dict[str, Any]) -> None:
        self.rows[kind].append(row)

    def summaries(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        env = {**self.started, "load_average_end": list(os.getloadavg())}
        if self.rows["pack"]:
            out["pack"] = {"environment": env, "runs": self.rows["pack"], **summarize_pack(self.rows["pack"])}
        if self.rows["loader"]:
            out["loader"] = {"environment": env, "runs": self.rows["loader"], **summarize_loader(self.rows["loader"])}
        return out


@functools.lru_cache(maxsize=2)
def versions(on_gpu: bool) -> dict[str, Any]:
    """The device and the library versions, stamped on every GPU benchmark row."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def get(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": get("triton"),
        "transformers": get("transformers"),
    }


def require_transformers() -> None:
    """Skip the Hugging Face rows of a benchmark when transformers is not installed."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: the HF rows are left out (pip install transformers)")
