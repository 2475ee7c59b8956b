"""One reader per file format; each streams Records and counts every record it reads or rejects.

A reader is ``read(path, source, options, report, columns) -> Iterator[Record]``: ``source`` is the
name records carry, ``columns`` the fields the caller needs (parquet and Arrow read only those).
Bad records are counted in ``report`` (with file:line and a reason) and not yielded.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .base import Piece, PieceBuffer, Record, SourceError, SourceOptions, SourceReport
from .decoding import (
    TextEncoding,
    compression_of,
    decoded_lines,
    decoded_pieces,
    detect_encoding,
    format_suffix,
    open_binary,
    read_sample,
    read_whole_text,
)

logger = logging.getLogger(__name__)

Reader = Callable[[Path, str, SourceOptions, SourceReport, "Sequence[str] | None"], Iterator[Record]]
PARQUET_BATCH_ROWS = 1024  # small batches keep memory flat even when rows hold long documents
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) would reject a long document


def _is_blank(line: str) -> bool:
    return not line or line.isspace()


def _json_type(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def read_jsonl(
    path: Path, source: str, options: SourceOptions, report: SourceReport, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    """One JSON object per line; blank lines are not records."""
    encoding = detect_encoding(path, options.encoding)
    report.set_encoding(source, encoding.name)
    first = True
    for lineno, line, error in decoded_lines(path, encoding):
        if _is_blank(line):
            continue
        if first and line.strip() == "{" and format_suffix(path) == ".json":
            raise SourceError(f"{source} holds one pretty-printed JSON object: give a JSON array or JSON lines")
        first = False
        report.add_record(source)
        if error:
            report.bad("undecodable", source, lineno, error)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad("bad_json", source, lineno, f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            report.bad("not_object", source, lineno, f"a JSON {_json_type(obj)}, expected an object")
            continue
        yield Record(obj, source, lineno, "jsonl")


def read_json(
    path: Path, source: str, options: SourceOptions, report: SourceReport, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    """A JSON array (loaded whole: use JSON lines for huge files), else JSON lines under a .json name."""
    head, _ = read_sample(path, 4096)
    if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        yield from read_jsonl(path, source, options, report, columns)
        return
    encoding = detect_encoding(path, options.encoding)
    report.set_encoding(source, encoding.name)
    text, lineno, error = read_whole_text(path, encoding)
    if text is None:
        report.add_record(source)
        report.bad("undecodable", source, lineno, f"{error}; the whole JSON array is lost")
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        report.add_record(source)
        report.bad("bad_json", source, e.lineno, f"{e.msg} at column {e.colno}; the whole JSON array is lost")
        return
    del text
    report.counts(source).records += len(items)
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            report.bad("not_object", source, index, f"array element {index} is a JSON {_json_type(item)}")
            continue
        yield Record(item, source, index, "json")


def read_csv(
    path: Path,
    source: str,
    options: SourceOptions,
    report: SourceReport,
    columns: Sequence[str] | None = None,
    delimiter: str = ",",
) -> Iterator[Record]:
    """Rows under a header row, as dicts; quoted fields may span lines; ragged rows are bad."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    encoding = detect_encoding(path, options.encoding)
    report.set_encoding(source, encoding.name)
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        for lineno, line, error in decoded_lines(path, encoding):
            if error:
                bad_lines[lineno] = error
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    header: list[str] | None = None
    last_line = 0
    while True:
        try:
            row = next(reader)
            error = None
        except StopIteration:
            break
        except csv.Error as e:
            row, error = None, str(e)
        start, last_line = last_line + 1, reader.line_num
        decode_errors = [bad_lines.pop(n) for n in range(start, last_line + 1) if n in bad_lines]
        if row == []:
            continue  # a blank line
        if header is None:
            if error or decode_errors or row is None:
                raise SourceError(f"{source}: cannot read the header row ({error or decode_errors[0]})")
            header = [name.strip() for name in row]
            continue
        report.add_record(source)
        if decode_errors:
            report.bad("undecodable", source, start, decode_errors[0])
        elif row is None:
            report.bad("bad_csv", source, start, str(error))
        elif len(row) != len(header):
            report.bad("bad_csv", source, start, f"{len(row)} fields where the header has {len(header)}")
        else:
            yield Record(dict(zip(header, row)), source, start, "csv")


def read_tsv(
    path: Path, source: str, options: SourceOptions, report: SourceReport, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    yield from read_csv(path, source, options, report, columns, delimiter="\t")


def read_parquet(
    path: Path, source: str, options: SourceOptions, report: SourceReport, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    """Rows streamed by record batches, reading only ``columns`` when the file has them."""
    import pyarrow
    import pyarrow.parquet as pq

    report.set_encoding(source, "parquet")
    # pyarrow opens a plain path natively; a compressed one it reads through Python's decompressor.
    with open_binary(path) if compression_of(path) else contextlib.nullcontext(str(path)) as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pyarrow.ArrowException, OSError) as e:
            raise SourceError(f"{source}: not a readable parquet file ({e}): fetch it again") from None
        names = parquet.schema_arrow.names
        wanted = [name for name in columns if name in names] if columns else None
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted or None)
        yield from _batch_records(batches, source, report, "parquet")


def read_arrow(
    path: Path, source: str, options: SourceOptions, report: SourceReport, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    """Arrow IPC files, as Hugging Face ``save_to_disk`` writes them (stream format, or the file format)."""
    import pyarrow

    report.set_encoding(source, "arrow")
    with open_binary(path) as f:
        try:
            batches: Iterator[Any] = iter(pyarrow.ipc.open_stream(f))
        except pyarrow.ArrowInvalid:
            f.seek(0)
            try:
                ipc_file = pyarrow.ipc.open_file(f)
            except pyarrow.ArrowInvalid as e:
                raise SourceError(f"{source}: not a readable Arrow IPC file ({e}): fetch it again") from None
            batches = (ipc_file.get_batch(i) for i in range(ipc_file.num_record_batches))
        if columns:
            batches = (_select(batch, columns) for batch in batches)
        yield from _batch_records(batches, source, report, "arrow")


def _select(batch: Any, columns: Sequence[str]) -> Any:
    wanted = [name for name in columns if name in batch.schema.names]
    return batch.select(wanted) if wanted else batch


def _batch_records(batches: Iterable[Any], source: str, report: SourceReport, kind: str) -> Iterator[Record]:
    row_number = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_number += 1
            report.add_record(source)
            yield Record(row, source, row_number, kind)


def read_text(
    path: Path, source: str, options: SourceOptions, report: SourceReport, columns: Sequence[str] | None = None
) -> Iterator[Record]:
    """Plain text: blocks separated by blank lines, the whole file, or each non-blank line.

    Read in bounded chunks; a document longer than ``options.max_document_chars`` comes as several records,
    cut after a sentence end or a space, and a piece holding undecodable bytes is the one bad record.
    """
    encoding = detect_encoding(path, options.encoding)
    report.set_encoding(source, encoding.name)
    buffer = PieceBuffer(options.max_document_chars)
    for text, lineno, error in _text_pieces(path, encoding, options.text_unit, buffer):
        report.add_record(source)
        if error:
            report.bad("undecodable", source, lineno, error)
        else:
            yield Record({"text": text}, source, lineno, "text")
    if buffer.split_documents:
        report.counts(source).split += buffer.split_documents
        logger.info(
            "%s: split %d over-long document(s) into pieces of at most %s characters",
            source,
            buffer.split_documents,
            f"{options.max_document_chars:,}",
        )


def _text_pieces(path: Path, encoding: TextEncoding, unit: str, buffer: PieceBuffer) -> Iterator[Piece]:
    """The documents of a text file (``unit``: "block", "file" or "line") as pieces out of ``buffer``."""
    continuing = False  # the previous piece of text did not end its line
    if unit == "file":
        buffer.add("", 1)  # an empty file is still one (empty) document
    for lineno, text, error, ends_line in decoded_pieces(path, encoding):
        starts_line, continuing = not continuing, not ends_line
        if unit == "file":
            yield from buffer.add(text, lineno, error and f"line {lineno}: {error}")
            continue
        if ends_line:
            text = text.rstrip("\r\n")
        if starts_line and ends_line and _is_blank(text):  # a blank line ends a block
            if unit == "block" and not buffer.empty:
                yield from _ended(buffer)
            continue
        if unit == "block":
            if starts_line and not buffer.empty:
                yield from buffer.add("\n", lineno)
            error = error and f"line {lineno}: {error}"
        yield from buffer.add(text, lineno, error)
        if unit == "line" and ends_line:
            yield from _ended(buffer)
    yield from _ended(buffer)


def _ended(buffer: PieceBuffer) -> Iterator[Piece]:
    piece = buffer.end()
    if piece is not None:
        yield piece


READERS: dict[str, Reader] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
    ".arrow": read_arrow,
    ".txt": read_text,
    ".md": read_text,
    "": read_text,
}


def reader_for(path: Path) -> Reader | None:
    """The reader for ``path`` by its extension (after a compression suffix), or None if unsupported."""
    return READERS.get(format_suffix(path))
