"""Raw conversations packed once into a cache beside them, and reused while nothing changed.

``data/x.jsonl`` → ``data/.x.jsonl.zhllm-cache/<tokenizer sha256[:12]>/sft.*`` (hidden, so a later scan of
``data/`` never reads it as raw data). The cache is reused while every source file keeps its size and
modification time and the tokenizer and options are the same; otherwise it is packed again, logging why.
torchrun ranks wait on a lock while the first one packs. Delete the folder to drop the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

from engine import __version__ as engine_version
from engine.format import DatasetPaths, write_json_atomic
from engine.pack import PackConfig, pack_corpus
from engine.reply_template import TemplatedCorpus
from engine.sources import Corpus
from engine.tokenizer import Tokenizer

logger = logging.getLogger("engine.pack_cache")

CACHE_SUFFIX = ".zhllm-cache"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (torchrun ranks wait while the first one packs); none where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: a single process is the usual case there
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pack_cached(
    source: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    template: str = "chatml",
    drop_think: bool = False,
    system: str | None = None,
    val_fraction: float = 0.02,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Pack raw conversations into ``cache_dir`` (default: ``.SOURCE.zhllm-cache`` beside it) once; return the prefix.

    The cache is reused while every source file keeps its size and modification time, and the
    tokenizer and the options are the same; otherwise it is packed again, logging why.
    """
    source = Path(source)
    corpus = Corpus([str(source)])
    fingerprint = {
        "sources": [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in corpus.files],
        "tokenizer_sha256": tokenizer.sha256,
        "template": template,
        "drop_think": drop_think,
        "system": system,
        "val_fraction": val_fraction,
        "engine_version": engine_version,
    }
    folder = Path(cache_dir) if cache_dir else cache_folder(source)
    folder = folder / tokenizer.sha256[:12]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the packing cache {folder} ({e.strerror}): pass --cache-dir") from None
    prefix, stamp = folder / "sft", folder / "sft.source.json"
    with _locked(folder / ".lock"):
        try:
            previous = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None
        except (OSError, json.JSONDecodeError):
            previous = {}  # unreadable: pack again
        if previous == fingerprint and DatasetPaths.of(prefix).meta.is_file():
            logger.info("using %s, packed before from %s (unchanged)", prefix, source)
            return prefix
        changed = (
            "no cache yet"
            if previous is None
            else "changed: " + ", ".join(key for key in fingerprint if previous.get(key) != fingerprint[key])
        )
        logger.info("packing %s into %s (%s)", source, prefix, changed)
        for path in (stamp, *DatasetPaths.of(prefix).all(), *DatasetPaths.of(prefix).val().all()):
            path.unlink(missing_ok=True)  # a stale .val must never outlive its training split
        reader = corpus if template == "chatml" and not drop_think else TemplatedCorpus(corpus, template, drop_think)
        config = PackConfig(
            out=str(prefix),
            kind="sft",
            val_fraction=val_fraction,
            workers=workers,
            system_prompt=system,
            progress=progress,
        )
        pack_corpus(reader, tokenizer, config)  # type: ignore[arg-type]  # TemplatedCorpus duck-types Corpus
        corpus.report.log_summary()
        val = DatasetPaths.of(prefix).val()
        if val.meta.is_file() and json.loads(val.meta.read_text(encoding="utf-8")).get("n_docs") == 0:
            logger.warning(
                "no conversation fell into the validation split (--val-fraction %s): training without one", val_fraction
            )
            for path in val.all():
                path.unlink(missing_ok=True)
        write_json_atomic(stamp, fingerprint)
    return prefix


def cache_folder(source: str | os.PathLike[str]) -> Path:
    """The default cache of raw data ``source``: hidden, beside it (``data/x.jsonl`` →
    ``data/.x.jsonl.zhllm-cache``)."""
    source = Path(source).resolve()
    return source.with_name(f".{source.name}{CACHE_SUFFIX}")
