"""Where does ``engine.prepare`` spend its time? Stage timings, per-process CPU, and cProfile views.

On the Tang corpus with ``--no-dedup``:

- stage timings: each stage of the pipeline run alone over the whole corpus in this process, with no
  profiler (cProfile inflates pure-Python stages several times over);
- CPU per process: ``engine.prepare`` on every core as a subprocess, its main process's and its
  workers' CPU seconds read with psutil (who is the bottleneck on two cores);
- ``--workers 1``: the whole pipeline in one process, so every stage (reading JSON, building the
  document, cleaning, encoding, copying tokens, fingerprinting, routing, writing) shows up;
- ``--workers 0`` (every core): only the main process is profiled; on a 2-core machine whatever it
  does (reading, pickling batches out and results back, routing, writing) competes with the two
  encoding workers for the same cores.

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

from benchlib import RESULTS_DIR, TANG, environment  # noqa: E402
from report import profile_tables, stage_tables  # noqa: E402

# (stage, needles on "file:function") in priority order; a Python function's own time goes to the first match.
# Built-ins (file "~") carry no location: their time is split among their callers and follows them.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("encode (SentencePiece)", ("sentencepiece/__init__.py:Encode", "sentencepiece/__init__.py:_EncodeAsIds",
                                "sentencepiece/__init__.py:EncodeAsIds", "engine/tokenizer/core.py:encode_batch")),
    ("tokenizer load + sha256", ("engine/tokenizer", "sentencepiece", "google/protobuf")),
    ("read: JSON parsing", ("/json/",)),
    ("read: engine.sources (files, records, template)", ("engine/sources", "codecs", "gzip", "bz2", "lzma")),
    ("clean (engine.clean)", ("engine/clean", "/re/", "sre_")),
    ("fingerprint (blake2b)", ("pack_workers.py:fingerprint", "hashlib")),
    ("ids → numpy arrays (engine.pack_workers)", ("engine/pack_workers",)),
    ("process pool: pickling, queues, threads", ("multiprocessing", "pickle", "threading", "queue", "selectors")),
    ("route + write (engine.pack, numpy)", ("engine/pack.py", "engine/format", "numpy")),
    ("progress bar (tqdm)", ("tqdm",)),
]
OTHER = "other (start-up, imports, argument parsing, logging)"


def stage_of(key: tuple[str, int, str]) -> str:
    filename, _, function = key
    where = f"{filename}:{function}"
    for stage, needles in STAGES:
        if any(n in where for n in needles):
            return stage
    return OTHER


def stage_seconds(table: dict[Any, Any]) -> dict[str, float]:
    """Own time per stage; a built-in's own time is shared among its callers by what each call cost."""
    stages: dict[str, float] = {}
    for key, (_, _, own, _, callers) in table.items():
        if key[0] == "~" and callers:
            spent = sum(c[2] for c in callers.values()) or 1.0
            for caller, caller_stats in callers.items():
                stage = stage_of(caller)
                stages[stage] = stages.get(stage, 0.0) + own * caller_stats[2] / spent
        else:
            stage = stage_of(key)
            stages[stage] = stages.get(stage, 0.0) + own
    return stages


def summarize(stats: pstats.Stats, total: float, what: str, top: int = 15) -> dict[str, Any]:
    table = stats.stats  # type: ignore[attr-defined]  # {(file, line, func): (cc, nc, tt, ct, callers)}
    stages = stage_seconds(table)
    ranked = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "what": what,
        "total_seconds": total,
        "stages": [{"stage": s, "seconds": t} for s, t in sorted(stages.items(), key=lambda kv: -kv[1])],
        "top": [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "own": v[2], "cumulative": v[3], "calls": v[1]}
                for k, v in ranked],
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
    summary["main_cpu_seconds"] = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    summary["children_cpu_seconds"] = ((children_after.ru_utime + children_after.ru_stime)
                                       - (children_before.ru_utime + children_before.ru_stime))
    return summary


REPEAT = 3  # each stage runs this many times; the fastest counts (the machine is shared, noise only adds time)


def _timed(stages: list[dict[str, Any]], label: str, fn: Any, before: Any = None) -> Any:
    times, value = [], None
    for _ in range(REPEAT):
        if before is not None:
            before()
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    stages.append({"stage": label, "seconds": min(times), "all_seconds": times})
    return value


def stage_timings(folders: list[Path], tokenizer_path: str) -> dict[str, Any]:
    """Each stage alone over the whole corpus, single process, no profiler (engine internals, read-only use)."""
    import numpy as np

    from engine import clean as engine_clean
    from engine import pack as engine_pack
    from engine import pack_workers
    from engine.clean import CleanConfig, CleanStats, Cleaner
    from engine.format import DatasetPaths, token_dtype
    from engine.sources import Corpus, SourceOptions
    from engine.tokenizer import load_tokenizer

    stages: list[dict[str, Any]] = []
    corpus = Corpus([str(f) for f in folders], SourceOptions(template="{title}\n{paragraphs}"))
    records = _timed(stages, "read: engine.sources Corpus.documents() (JSON, template, per-record report)",
                     lambda: [(d.text, d.source, d.lineno) for d in corpus.documents()])

    def plain_read() -> list[str]:
        texts: list[str] = []
        for folder in folders:
            for path in sorted(folder.glob("*.json")):
                with open(path, encoding="utf-8") as f:
                    texts.extend(p["title"] + "\n" + "\n".join(p["paragraphs"]) for p in json.load(f))
        return texts

    _timed(stages, "  for reference: json.load + join, as the baseline reads", plain_read)
    config = CleanConfig(dedup=False)
    build = getattr(engine_clean, "_invisible_characters", None)
    if build is not None and hasattr(build, "cache_clear"):
        _timed(stages, "clean: build the invisible-character regex (once per process)", build, before=build.cache_clear)
    cleaner = Cleaner(config)
    texts = _timed(stages, "clean: Cleaner.clean", lambda: [t for t, _ in (cleaner.clean(r[0]) for r in records) if t])
    tokenizer = _timed(stages, "tokenizer: load_tokenizer (once per process)", lambda: load_tokenizer(tokenizer_path))
    _timed(stages, "tokenizer: sha256 of the vocabulary (main, once)", lambda: load_tokenizer(tokenizer_path).sha256)
    stages[-1]["seconds"] -= stages[-2]["seconds"]  # a fresh tokenizer each run (sha256 is cached): minus its load
    batches: list[list[Any]] = [[]]
    size = 0
    for record in records:  # the packer's batching: ~1 MiB of characters
        batches[-1].append(record)
        size += len(record[0])
        if size >= 1 << 20:
            batches.append([])
            size = 0
    cleaned = [[cleaner.clean(r[0])[0] for r in b] for b in batches]
    def encode_all() -> None:  # ids dropped per batch, as a worker does: keeping 17M int objects alive costs GC time
        for batch in cleaned:
            tokenizer.encode_batch(batch)

    _timed(stages, "encode: Tokenizer.encode_batch, 1 thread", encode_all)
    _timed(stages, "fingerprint: blake2b per document", lambda: [pack_workers.fingerprint(t, 0) for t in texts])
    pack_workers.init_worker(pack_workers.WorkerConfig(tokenizer_path, "pretrain", config, 0))
    results = _timed(stages, "worker total: pack_workers.encode_batch (clean+encode+ids→numpy+fingerprint)",
                     lambda: [pack_workers.encode_batch(b) for b in batches])
    _timed(stages, "IPC: pickle + unpickle the text batches (to workers)",
           lambda: [pickle.loads(pickle.dumps(b, pickle.HIGHEST_PROTOCOL)) for b in batches])
    _timed(stages, "IPC: pickle + unpickle the results (from workers)",
           lambda: [pickle.loads(pickle.dumps(r, pickle.HIGHEST_PROTOCOL)) for r in results])
    writer_cls, route = getattr(engine_pack, "_SplitWriter", None), getattr(engine_pack, "_route", None)
    if writer_cls is not None and route is not None:
        with tempfile.TemporaryDirectory() as tmp:
            def route_all() -> None:
                writer = writer_cls(DatasetPaths.of(f"{tmp}/r"), token_dtype(tokenizer.vocab_size), False, True)
                for result in results:
                    route(result, {"train": writer}, None, CleanStats(), 0.0, tokenizer.vocab_size, 1)
                writer.abort()
            _timed(stages, "main: route + write each document (pack._route)", route_all)
    ipc_mb = sum(len(pickle.dumps(b, pickle.HIGHEST_PROTOCOL)) for b in batches) / 1e6
    back_mb = sum(len(pickle.dumps(r, pickle.HIGHEST_PROTOCOL)) for r in results) / 1e6
    token_bytes = sum(r.tokens.nbytes for r in results) / 1e6
    return {"stages": stages, "documents": len(records), "batches": len(batches), "pickled_out_mb": ipc_mb,
            "pickled_back_mb": back_mb, "result_token_mb": token_bytes,
            "result_token_dtype": str(results[0].tokens.dtype) if results else None,
            "final_dtype": str(token_dtype(tokenizer.vocab_size))}


def process_cpu(argv: list[str]) -> dict[str, Any]:
    """Run ``engine.prepare`` as a subprocess; CPU seconds of its main process and of its workers (psutil)."""
    import subprocess

    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.prepare", *argv], cwd=BENCH.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    return {"wall_seconds": wall, "main_cpu_seconds": main_cpu, "worker_cpu_seconds": sorted(last.values()),
            "note": "CPU read every 20 ms until exit: the last ~20 ms of each process are not counted"}


def main() -> int:
    parser = argparse.ArgumentParser(description="Profile engine.prepare on the Tang corpus, grouped by stage.")
    parser.add_argument("--tokenizer", required=True, help="what engine.prepare --tokenizer gets")
    parser.add_argument("--scale", type=int, default=1, help="read the corpus this many times (distinct hard-linked copies)")
    parser.add_argument("--source", type=Path, default=TANG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i in range(args.scale):  # distinct folders: engine.sources reads a repeated path once
            folder = Path(tmp) / f"copy{i}"
            folder.mkdir()
            for src in sorted(args.source.glob("*.json")):
                os.link(src, folder / src.name)
            folders.append(folder)
        base = [a for f in folders for a in ("--source", str(f))]
        base += ["--template", "{title}\\n{paragraphs}", "--tokenizer", args.tokenizer,
                 "--no-dedup", "--no-progress", "--overwrite"]
        stages = stage_timings(folders, args.tokenizer)
        cpu = process_cpu(base + ["--out", f"{tmp}/cpu", "--workers", "0"])
        cpu["what"] = f"--workers 0 ({os.cpu_count()} workers), ×{args.scale}"
        profiles = [
            profile_prepare(base + ["--out", f"{tmp}/w1", "--workers", "1"],
                            f"--workers 1, whole pipeline in one process, ×{args.scale}"),
            profile_prepare(base + ["--out", f"{tmp}/w0", "--workers", "0"],
                            f"--workers 0 ({os.cpu_count()} workers), main thread of the main process only (the pool's "
                            f"pickling threads are invisible to cProfile: see the IPC stage timings), ×{args.scale}"),
        ]
    env = environment()
    result = {"command": "python bench/profile_pack.py " + " ".join(sys.argv[1:]), "date": env["date"],
              "environment": env, "scale": args.scale, "stage_timings": stages, "process_cpu": cpu,
              "profiles": profiles}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "profile.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(stage_tables(stages, cpu), end="\n\n")
    for profile in profiles:
        print(profile_tables(profile), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
