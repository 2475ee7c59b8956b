"""Benchmark fixtures: the real corpora beside the checkout, the tokenizers, and the results recorder.

Run from the repository root: ``pytest bench/ --benchmark-only``. The benchmarks read
``../shared/data`` and skip with a reason when it is absent (a fresh clone has no ``../shared``).
Every figure the benchmarks measure is collected by :class:`Recorder`, each row stamped with the id of the test
that recorded it (``"test"``); at the end of the session it writes ``bench/.results/KIND.json`` for each kind that
recorded rows (pack, loader, kernels, train, generate, finetune, serve, quant) and prints the ratio tables.
``python bench/report.py`` turns those files into ``RESULTS.md``.

A kind's file is merged, not replaced (``report.merge_runs``): this session's rows replace the previous file's rows
of the same tests, and the rows of tests that did not record anything this session (another bench file of the same
kind, a subset chosen with ``-k``, a GPU case skipped on CPU) are kept, with their own date, commit and command
listed under ``earlier`` in the file and in the report's header. Delete the file to start a kind afresh.
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
from quant_report import quant_tables, summarize_quant  # noqa: E402
from report import loader_tables, merge_runs, pack_tables, summarize_loader, summarize_pack  # noqa: E402
from serve_report import serve_tables, summarize_serve  # noqa: E402
from train_report import summarize_train, train_tables  # noqa: E402

logger = logging.getLogger(__name__)

_RECORDER: Recorder | None = None
_SUMMARIES: dict[str, dict[str, Any]] | None = None

# kind → (summarize the rows, render the summary as markdown), in the order the terminal prints them
KINDS: dict[str, tuple[Callable[[list[dict[str, Any]]], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "pack": (summarize_pack, pack_tables),  # bench/test_pack_throughput.py
    "loader": (summarize_loader, loader_tables),  # bench/test_loader_throughput.py
    "kernels": (summarize_kernels, kernel_tables),  # bench/test_kernels.py, bench/test_distill_step.py
    "train": (summarize_train, train_tables),  # bench/test_train_step.py
    "generate": (summarize_generate, generate_tables),  # bench/test_generate_speed.py
    "finetune": (summarize_finetune, finetune_tables),  # bench/test_lora_step.py, test_dpo_step.py, test_grpo_step.py
    "serve": (summarize_serve, serve_tables),  # bench/test_serve_load.py
    "quant": (summarize_quant, quant_tables),  # bench/test_quant.py
}
TAKES_EARLIER = {"serve", "quant"}  # their summaries flag ratios between rows of different runs


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = Recorder()
        for kind in KINDS:
            _RECORDER.rows.setdefault(kind, [])
    return _RECORDER


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Stamp every row recorded while ``item`` ran (setup, call, teardown) with its test id: what the merge of a
    kind's file matches on."""
    before = {kind: len(rows) for kind, rows in _RECORDER.rows.items()} if _RECORDER is not None else {}
    try:
        return (yield)
    finally:
        if _RECORDER is not None:
            for kind, rows in _RECORDER.rows.items():
                for row in rows[before.get(kind, 0) :]:
                    row.setdefault("test", item.nodeid)


def _previous(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("%s is unreadable (%s): it is replaced by this session's rows only", path, e)
        return None


def _summaries() -> dict[str, dict[str, Any]]:
    """Per kind that recorded rows this session: the environment, the rows merged with the kind's previous file
    (``report.merge_runs``) and their summary. Computed once (the file is written, then the terminal prints it)."""
    global _SUMMARIES
    if _SUMMARIES is not None:
        return _SUMMARIES
    env = {**_RECORDER.started, "load_average_end": list(os.getloadavg())}
    summaries: dict[str, dict[str, Any]] = {}
    for kind, rows in _RECORDER.rows.items():
        if not rows:
            continue
        runs, earlier = merge_runs(_previous(RESULTS_DIR / f"{kind}.json"), rows)
        summarize = KINDS[kind][0] if kind in KINDS else (lambda runs: {})
        summaries[kind] = {
            "environment": env,
            **({"earlier": earlier} if earlier else {}),
            "runs": runs,
            **(summarize(runs, earlier) if kind in TAKES_EARLIER else summarize(runs)),
        }
    _SUMMARIES = summaries
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
    for kind, summary in summaries.items():
        if kind in KINDS:
            terminalreporter.write_line(KINDS[kind][1](summary) + "\n")
        for entry in summary.get("earlier", []):
            terminalreporter.write_line(
                f"{kind}.json keeps the rows of {len(entry['tests'])} test(s) from the run of "
                f"{entry['environment'].get('date', '?')}: {', '.join(entry['tests'])}"
            )
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
