"""Benchmark fixtures: the real corpora beside the checkout, the tokenizers, and the results recorder.

Run from the repository root: ``pytest bench/ --benchmark-only``. The benchmarks read
``../shared/data`` and skip with a reason when it is absent (a fresh clone has no ``../shared``).
Every figure the benchmarks measure is collected by :class:`Recorder`; at the end of the session
it writes ``bench/.results/pack.json``, ``bench/.results/loader.json``, ``bench/.results/kernels.json``,
``bench/.results/train.json``, ``bench/.results/generate.json`` and ``bench/.results/finetune.json`` (only the
kinds that ran) and prints the
ratio tables. ``python bench/report.py`` turns those files into ``RESULTS.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the helper modules beside this file (pytest's rootdir-less import mode adds it too)
    sys.path.insert(0, str(BENCH))

from benchlib import CHATGLM_MODEL, PYTHON, REPO, RESULTS_DIR, SHARED_DATA, TANG, Recorder, read_tang  # noqa: E402
from finetune_report import finetune_tables, summarize_finetune  # noqa: E402
from generate_report import generate_tables, summarize_generate  # noqa: E402
from kernel_report import kernel_tables, summarize_kernels  # noqa: E402
from report import loader_tables, pack_tables  # noqa: E402
from train_report import summarize_train, train_tables  # noqa: E402

logger = logging.getLogger(__name__)

_RECORDER: Recorder | None = None


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = Recorder()
        _RECORDER.rows.setdefault("kernels", [])  # bench/test_kernels.py records here
        _RECORDER.rows.setdefault("train", [])  # bench/test_train_step.py records here
        _RECORDER.rows.setdefault("generate", [])  # bench/test_generate_speed.py records here
        _RECORDER.rows.setdefault("finetune", [])  # bench/test_lora_step.py and bench/test_dpo_step.py record here
    return _RECORDER


def _summaries() -> dict[str, dict[str, Any]]:
    """The recorder's summaries plus the kernel, training-step, generation and fine-tuning benchmarks' (which the
    Recorder does not summarize)."""
    summaries = _RECORDER.summaries()
    env = {**_RECORDER.started, "load_average_end": list(os.getloadavg())}
    kernel_rows = _RECORDER.rows.get("kernels")
    if kernel_rows:
        summaries["kernels"] = {"environment": env, "runs": kernel_rows, **summarize_kernels(kernel_rows)}
    train_rows = _RECORDER.rows.get("train")
    if train_rows:
        summaries["train"] = {"environment": env, "runs": train_rows, **summarize_train(train_rows)}
    generate_rows = _RECORDER.rows.get("generate")
    if generate_rows:
        summaries["generate"] = {"environment": env, "runs": generate_rows, **summarize_generate(generate_rows)}
    finetune_rows = _RECORDER.rows.get("finetune")
    if finetune_rows:
        summaries["finetune"] = {"environment": env, "runs": finetune_rows, **summarize_finetune(finetune_rows)}
    return summaries


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _RECORDER is None:
        return
    summaries = _summaries()
    if not summaries:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    for kind, summary in summaries.items():
        path = RESULTS_DIR / f"{kind}.json"
        path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _RECORDER is None:
        return
    summaries = _summaries()
    if not summaries:
        return
    terminalreporter.section("zhllm benchmark ratios")
    if "pack" in summaries:
        terminalreporter.write_line(pack_tables(summaries["pack"]))
    if "loader" in summaries:
        terminalreporter.write_line(loader_tables(summaries["loader"]))
    if "kernels" in summaries:
        terminalreporter.write_line(kernel_tables(summaries["kernels"]))
    if "train" in summaries:
        terminalreporter.write_line(train_tables(summaries["train"]))
    if "generate" in summaries:
        terminalreporter.write_line(generate_tables(summaries["generate"]))
    if "finetune" in summaries:
        terminalreporter.write_line(finetune_tables(summaries["finetune"]))
    terminalreporter.write_line(f"saved to {RESULTS_DIR}/; render with: python bench/report.py > bench/RESULTS.md")


# ---------------------------------------------------------------- data and tokenizers


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (a fresh clone has no ../shared): benchmarks need it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tang_dir(shared_data: Path) -> Path:
    if not any(TANG.glob("*.json")):
        pytest.skip(f"{TANG} holds no poet.tang.*.json files")
    return TANG


@pytest.fixture(scope="session")
def tang_texts(tang_dir: Path) -> list[str]:
    return read_tang(tang_dir)


@pytest.fixture(scope="session")
def tang_text_bytes(tang_texts: list[str]) -> int:
    """UTF-8 bytes of the Tang documents read once: the throughput denominator, for every method alike."""
    return sum(len(t.encode("utf-8")) for t in tang_texts)


@pytest.fixture(scope="session")
def tang_copies(tang_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[Path]]:
    """``k`` distinct folders each holding the Tang files: the corpus read ×k.

    Distinct folders, not the same one k times: ``engine.sources.resolve_sources`` drops a path it has
    already seen, so ``--source DIR --source DIR`` reads DIR once. Hard links (copies where linking
    fails) keep the bytes identical and in the page cache.
    """
    root = tmp_path_factory.mktemp("tang_copies")
    made: list[Path] = []

    def copies(k: int) -> list[Path]:
        while len(made) < k:
            folder = root / f"tang{len(made)}"
            folder.mkdir()
            for src in sorted(tang_dir.glob("*.json")):
                try:
                    os.link(src, folder / src.name)
                except OSError:
                    shutil.copyfile(src, folder / src.name)
            made.append(folder)
        return made[:k]

    return copies


@pytest.fixture(scope="session")
def chatglm_model(shared_data: Path) -> Path:
    if not CHATGLM_MODEL.is_file():
        pytest.skip(f"{CHATGLM_MODEL} is absent")
    return CHATGLM_MODEL


@pytest.fixture(scope="session")
def engine_tokenizer_dir(tang_texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16k tokenizer trained by the engine on the Tang text, once per session."""
    try:
        from engine.tokenizer import train_tokenizer
    except ImportError as e:
        pytest.skip(f"engine.tokenizer.train_tokenizer is not importable yet ({e})")
    out = tmp_path_factory.mktemp("engine_tokenizer") / "zh16k"  # train_tokenizer refuses an existing folder
    started = time.perf_counter()
    tokenizer = train_tokenizer(tang_texts, out, vocab_size=16000)
    logger.info("trained the engine tokenizer in %.1f s", time.perf_counter() - started)
    folder = Path(getattr(tokenizer, "path", out))
    folder = folder if folder.is_dir() else folder.parent
    return folder


@pytest.fixture(scope="session")
def tokenizers(request: pytest.FixtureRequest) -> Callable[[str], tuple[Path, Path]]:
    """``name`` → (what ``engine.prepare --tokenizer`` gets, the SentencePiece ``.model`` the scripts load)."""

    def get(name: str) -> tuple[Path, Path]:
        if name == "chatglm":
            model = request.getfixturevalue("chatglm_model")
            return model, model
        if name == "engine16k":
            folder = request.getfixturevalue("engine_tokenizer_dir")
            model = folder / "tokenizer.model"
            if not model.is_file():
                pytest.skip(f"the engine tokenizer in {folder} has no tokenizer.model for the SentencePiece scripts")
            return folder, model
        raise KeyError(name)

    return get


@pytest.fixture(scope="session")
def finetune_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The fine-tuning benchmarks' model (``finetune_setup``): a tokenizer trained on the DPO pairs, a random
    checkpoint of the device's size and its Hugging Face export, made once per session."""
    import torch
    from finetune_setup import DPO_PAIRS, device_size, prepare_model

    if not DPO_PAIRS.is_file():
        pytest.skip(f"{DPO_PAIRS} is absent")
    return prepare_model(tmp_path_factory.mktemp("finetune"), device_size(torch.cuda.is_available()))


@pytest.fixture(scope="session")
def engine_prepare() -> None:
    """Skip (not fail) while the packer cannot be imported, e.g. a module it needs is still being written."""
    try:
        import engine.prepare  # noqa: F401
    except ImportError as e:
        pytest.skip(f"engine.prepare is not importable ({e})")


@pytest.fixture(scope="session")
def warm_imports() -> None:
    """Load the interpreters' libraries into the page cache once, so no first measured run pays for it."""
    for code in ("import numpy, sentencepiece, json", "import engine.prepare"):
        subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True)
