"""Where does ``engine.prepare`` spend its time? Stage timings, per-process CPU, and cProfile views.

On the Tang corpus with ``--no-dedup`` (a folder of small JSON files: on every core, each worker
reads whole files itself, then cleans, encodes and casts the tokens; the main process only lists the
files, merges the workers' reading reports and writes):

- stage timings: each step of that pipeline run alone over the whole corpus in this process, with
  no profiler (cProfile inflates pure-Python stages several times over), through the packer's own
  functions (``engine.pack._tasks``, ``_run_task``, ``_route``, ``_SplitWriter``; ``engine.pack_workers``);
- CPU per process: ``engine.prepare`` on every core as a subprocess, its main process's and its
  workers' CPU seconds read with psutil (who is the bottleneck on two cores);
- ``--workers 1``: the whole pipeline in one process (the main process reads, in batches), so every
  stage (reading JSON, building the document, cleaning, encoding, ids → numpy, routing, writing) shows up;
- ``--workers 0`` (every core): only the main process is profiled: listing files, merging reports,
  routing and writing (the pool's result thread, which unpickles, is invisible to cProfile).

    python bench/profile_pack.py --tokenizer ../shared/data/tokenizers/chatglm-sp/tokenizer.model [--scale 1]

Writes ``bench/.results/profile.json`` (rendered by ``bench/report.py``) and prints the tables.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pickle
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from benchlib import RESULTS_DIR, TANG, environment, read_tang  # noqa: E402
from report import profile_tables, stage_tables  # noqa: E402

# (stage, needles on "file:function") in priority order; a Python function's own time goes to the first match.
# Built-ins (file "~") and numpy's Python wrappers have no stage of their own: their time follows their callers.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    (
        "encode (SentencePiece)",
        (
            "sentencepiece/__init__.py:Encode",
            "sentencepiece/__init__.py:_EncodeAsIds",
            "sentencepiece/__init__.py:EncodeAsIds",
            "engine/tokenizer/core.py:encode_batch",
        ),
    ),
    ("tokenizer load + sha256", ("engine/tokenizer", "sentencepiece", "google/protobuf")),
    ("read: JSON parsing", ("/json/",)),
    ("read: engine.sources (files, records, template, reports)", ("engine/sources", "codecs", "gzip", "bz2", "lzma")),
    ("clean (engine.clean)", ("engine/clean", "/re/", "sre_")),
    ("fingerprint (blake2b)", ("pack_workers.py:fingerprint", "hashlib")),
    ("ids → numpy (pack_workers._to_array)", ("pack_workers.py:_to_array",)),
    ("worker loop (pack_workers: per-record loop, results)", ("engine/pack_workers",)),
    ("process pool: pickling, queues, threads", ("multiprocessing", "pickle", "threading", "queue", "selectors")),
    ("route + write (engine.pack, engine.format)", ("engine/pack.py", "engine/format")),
    ("progress bar (tqdm)", ("tqdm",)),
]
OTHER = "other (start-up, imports, argument parsing, logging)"
IDLE = "idle: waiting on a lock (for the workers' results)"


def stage_of(key: tuple[str, int, str]) -> str:
    filename, _, function = key
    where = f"{filename}:{function}"
    for stage, needles in STAGES:
        if any(n in where for n in needles):
            return stage
    return OTHER


def stage_shares(key: tuple[str, int, str], table: dict[Any, Any], path: tuple = ()) -> dict[str, float]:
    """Which stages a function's own time belongs to: its own stage, or for a built-in or a numpy
    wrapper its callers' stages, shared by what each caller's calls cost."""
    if key[0] == "~" and "acquire' of '_thread.lock" in key[2]:
        return {IDLE: 1.0}
    callers = table[key][4] if key in table else {}
    if not (key[0] == "~" or "/numpy/" in key[0]) or not callers or key in path:
        return {stage_of(key): 1.0}
    spent = sum(edge[3] for edge in callers.values())
    shares: dict[str, float] = {}
    for caller, edge in callers.items():
        weight = edge[3] / spent if spent else 1 / len(callers)
        for stage, share in stage_shares(caller, table, (*path, key)).items():
            shares[stage] = shares.get(stage, 0.0) + share * weight
    return shares


def summarize(stats: pstats.Stats, total: float, what: str, top: int = 15) -> dict[str, Any]:
    table = stats.stats  # type: ignore[attr-defined]  # {(file, line, func): (cc, nc, tt, ct, callers)}
    stages: dict[str, float] = {}
    for key, (_, _, own, _, _) in table.items():
        for stage, share in stage_shares(key, table).items():
            stages[stage] = stages.get(stage, 0.0) + own * share
    ranked = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "what": what,
        "total_seconds": total,
        "stages": [{"stage": s, "seconds": t} for s, t in sorted(stages.items(), key=lambda kv: -kv[1])],
        "top": [
            {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "own": v[2], "cumulative": v[3], "calls": v[1]}
            for k, v in ranked
        ],
    }


def profile_prepare(argv: list[str], what: str) -> dict[str, Any]:
    from engine.prepare import main as prepare_main

    profiler = cProfile.Profile()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    profiler.enable()
    code = prepare_main(argv)
    profiler.disable()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"engine.prepare exited with {code}")
    summary = summarize(pstats.Stats(profiler), wall, what)
    summary["main_cpu_seconds"] = (cpu_after.ru_utime + cpu_after.ru_stime) - (
        cpu_before.ru_utime + cpu_before.ru_stime
    )
    summary["children_cpu_seconds"] = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    return summary


REPEAT = 3  # each stage runs this many times; the fastest counts (the machine is shared, noise only adds time)


def _add(stages: list[dict[str, Any]], label: str, times: list[float]) -> None:
    stages.append({"stage": label, "seconds": min(times) if times else 0.0, "all_seconds": times})


def _timed(stages: list[dict[str, Any]], label: str, fn: Any, before: Any = None) -> Any:
    times, value = [], None
    for _ in range(REPEAT):
        if before is not None:
            before()
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    _add(stages, label, times)
    return value


def stage_timings(folders: list[Path], tokenizer_path: str) -> dict[str, Any]:
    """Each step alone over the whole corpus, single process, no profiler (engine internals, read-only use)."""
    from engine import clean as engine_clean
    from engine import pack as engine_pack
    from engine import pack_workers
    from engine.clean import CleanConfig, Cleaner, CleanStats, is_clean, warm_cleaner
    from engine.format import DatasetPaths, token_dtype
    from engine.sources import Corpus, SourceOptions, SourceReport
    from engine.tokenizer import load_tokenizer

    stages: list[dict[str, Any]] = []
    corpus = Corpus([str(f) for f in folders], SourceOptions(template="{title}\n{paragraphs}"))
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    clean_config = CleanConfig(dedup=False)
    config = pack_workers.WorkerConfig(
        tokenizer_path,
        "pretrain",
        clean_config,
        0,
        dtype.name,
        need_digests=clean_config.dedup,
        source_options=corpus.options,
    )
    workers = os.cpu_count() or 1
    tasks = _timed(
        stages,
        f"main: pack._tasks for {workers} workers (lists the files, or reads and batches records)",
        lambda: list(engine_pack._tasks(corpus, "pretrain", engine_pack.PackConfig.batch_chars, workers)),
    )

    def read(task: tuple[str, Any]) -> list[Any]:  # what a worker's encode_file reads; a records task was read above
        what, payload = task
        if what == "records":
            return payload
        part = Corpus([payload], corpus.options)
        part.report = SourceReport(quiet=True)
        return [(d.text, d.source, d.lineno) for d in part.documents()]

    records = _timed(
        stages,
        "read: engine.sources Corpus([file]).documents() (JSON, template, per-file report)",
        lambda: [read(t) for t in tasks],
    )
    _timed(stages, "  for reference: json.load + join, as the baseline reads", lambda: [read_tang(f) for f in folders])

    def rebuild_tables() -> None:
        engine_clean._changed_characters.cache_clear()
        engine_clean._invisible_characters.cache_clear()

    _timed(
        stages,
        "clean: warm_cleaner() tables (once, in the main process before the fork)",
        warm_cleaner,
        before=rebuild_tables,
    )
    cleaner = Cleaner(clean_config)
    documents = sum(len(batch) for batch in records)
    fast = sum(is_clean(r[0]) for batch in records for r in batch) / max(documents, 1)
    texts = _timed(
        stages,
        f"clean: Cleaner.clean ({fast:.0%} of documents take the is_clean fast path)",
        lambda: [[c for c, _ in (cleaner.clean(r[0]) for r in batch) if c is not None] for batch in records],
    )
    _timed(stages, "tokenizer: load_tokenizer (once per worker)", lambda: load_tokenizer(tokenizer_path))
    _timed(stages, "tokenizer: sha256 of the vocabulary (main, once)", lambda: load_tokenizer(tokenizer_path).sha256)
    stages[-1]["seconds"] -= stages[-2]["seconds"]  # a fresh tokenizer each run (sha256 is cached): minus its load

    pack_workers.init_worker(config)  # _to_array and _run_task use the worker's config and tokenizer

    def encode_then_convert() -> tuple[float, float]:  # per task, as a worker does: ids dropped once converted
        encode = convert = 0.0
        for batch in texts:
            started = time.perf_counter()
            ids = tokenizer.encode_batch(batch)
            encoded = time.perf_counter()
            pack_workers._to_array(ids, tokenizer.eos_id)
            encode, convert = encode + encoded - started, convert + time.perf_counter() - encoded
        return encode, convert

    runs = [encode_then_convert() for _ in range(REPEAT)]
    _add(stages, "encode: Tokenizer.encode_batch per task, 1 thread", [r[0] for r in runs])
    _add(
        stages, f"ids → numpy: pack_workers._to_array (list → int64, range check, → {dtype.name})", [r[1] for r in runs]
    )
    if config.need_digests:
        _timed(
            stages,
            "fingerprint: blake2b per document",
            lambda: [pack_workers.fingerprint(t, 0) for batch in texts for t in batch],
        )
    else:
        _add(stages, "fingerprint: skipped (need_digests is False: no dedup, no validation split)", [])
    results = _timed(
        stages,
        "worker total: pack._run_task per task (encode_file: read+clean+encode+ids→numpy)",
        lambda: [engine_pack._run_task(t) for t in tasks],
    )
    _timed(
        stages,
        "IPC: pickle + unpickle the tasks (to workers)",
        lambda: [pickle.loads(pickle.dumps(t, pickle.HIGHEST_PROTOCOL)) for t in tasks],
    )
    _timed(
        stages,
        "IPC: pickle + unpickle the results (from workers)",
        lambda: [pickle.loads(pickle.dumps(r, pickle.HIGHEST_PROTOCOL)) for r in results],
    )

    def route_all() -> None:  # the main loop of pack_corpus, minus the pool and the progress bar
        with tempfile.TemporaryDirectory() as tmp:
            writer = engine_pack._SplitWriter(DatasetPaths.of(f"{tmp}/r"), dtype, False, True)
            report, stats = SourceReport(), CleanStats()
            for result in results:
                if result.report is not None:
                    report.merge(result.report)
                engine_pack._route(result, {"train": writer}, None, stats, 0.0, 1)
            writer.abort()

    _timed(stages, "main: merge reports + pack._route (one _SplitWriter.append per task)", route_all)
    return {
        "stages": stages,
        "documents": documents,
        "batches": len(tasks),
        "task_kinds": sorted({what for what, _ in tasks}),
        "pickled_out_mb": sum(len(pickle.dumps(t, pickle.HIGHEST_PROTOCOL)) for t in tasks) / 1e6,
        "pickled_back_mb": sum(len(pickle.dumps(r, pickle.HIGHEST_PROTOCOL)) for r in results) / 1e6,
        "result_token_mb": sum(r.tokens.nbytes for r in results) / 1e6,
        "result_token_dtype": str(results[0].tokens.dtype) if results else None,
        "final_dtype": dtype.name,
    }


def process_cpu(argv: list[str]) -> dict[str, Any]:
    """Run ``engine.prepare`` as a subprocess; CPU seconds of its main process and of its workers (psutil)."""
    import subprocess

    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.prepare", *argv],
        cwd=BENCH.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = psutil.Process(proc.pid)
    last: dict[int, float] = {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                times = p.cpu_times()
                last[p.pid] = times.user + times.system
            except psutil.Error:
                continue
        time.sleep(0.02)
    wall = time.perf_counter() - started
    if proc.wait() != 0:
        raise SystemExit(f"engine.prepare failed: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    main_cpu = last.pop(proc.pid, 0.0)
    return {
        "wall_seconds": wall,
        "main_cpu_seconds": main_cpu,
        "worker_cpu_seconds": sorted(last.values()),
        "note": "CPU read every 20 ms until exit: the last ~20 ms of each process are not counted",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Profile engine.prepare on the Tang corpus, grouped by stage.")
    parser.add_argument("--tokenizer", required=True, help="what engine.prepare --tokenizer gets")
    parser.add_argument(
        "--scale", type=int, default=1, help="read the corpus this many times (distinct hard-linked copies)"
    )
    parser.add_argument("--source", type=Path, default=TANG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = os.cpu_count()

    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i in range(args.scale):  # distinct folders: engine.sources reads a repeated path once
            folder = Path(tmp) / f"copy{i}"
            folder.mkdir()
            for src in sorted(args.source.glob("*.json")):
                os.link(src, folder / src.name)
            folders.append(folder)
        base = [a for f in folders for a in ("--source", str(f))]
        base += [
            "--template",
            "{title}\\n{paragraphs}",
            "--tokenizer",
            args.tokenizer,
            "--no-dedup",
            "--no-progress",
            "--overwrite",
        ]
        stages = stage_timings(folders, args.tokenizer)
        cpu = process_cpu(base + ["--out", f"{tmp}/cpu", "--workers", "0"])
        cpu["what"] = f"--workers 0 ({cores} workers, each reading whole files), ×{args.scale}"
        profiles = [
            profile_prepare(
                base + ["--out", f"{tmp}/w1", "--workers", "1"],
                f"--workers 1, whole pipeline in one process (the main process reads), ×{args.scale}",
            ),
            profile_prepare(
                base + ["--out", f"{tmp}/w0", "--workers", "0"],
                f"--workers 0 ({cores} workers read, clean and encode), main thread of the main process "
                f"only (the pool's result thread, which unpickles, is invisible to cProfile), ×{args.scale}",
            ),
        ]
    env = environment()
    result = {
        "command": "python bench/profile_pack.py " + " ".join(sys.argv[1:]),
        "date": env["date"],
        "environment": env,
        "scale": args.scale,
        "stage_timings": stages,
        "process_cpu": cpu,
        "profiles": profiles,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "profile.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(stage_tables(stages, cpu), end="\n\n")
    for profile in profiles:
        print(profile_tables(profile), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
