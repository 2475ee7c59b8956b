"""Open raw files (compressed or not), choose each file's text encoding, and decode it line by line.

Files are read as bytes and decoded one line at a time, so an invalid byte spoils only the record it
sits in (the reader counts that record as "undecodable") and memory stays flat however big the file.
Splitting bytes on ``\\n`` is safe for UTF-8 and GB18030 alike: neither uses byte 0x0A inside a
multibyte character. UTF-16/32 files are refused with a hint to convert them.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from .base import SourceError

logger = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 20  # the leading sample the encoding is chosen from
COMPRESSORS: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
FALLBACK_ENCODING = "gb18030"  # the usual non-UTF-8 encoding of Chinese corpora (a superset of GBK and GB2312)


def compression_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSORS else None


def format_suffix(path: Path) -> str:
    """The extension that names the format, after any compression suffix: ``a.jsonl.gz`` → ``.jsonl``."""
    if compression_of(path):
        path = path.with_suffix("")
    return path.suffix.lower()


def open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing ``.gz``/``.bz2``/``.xz`` transparently."""
    compression = compression_of(path)
    return COMPRESSORS[compression](path, "rb") if compression else open(path, "rb")


def read_sample(path: Path, size: int = SAMPLE_BYTES) -> tuple[bytes, bool]:
    """The first ``size`` bytes (decompressed) and whether they are the whole file."""
    with open_binary(path) as f:
        sample = f.read(size)
        at_eof = len(sample) < size or not f.read(1)
    return sample, at_eof


@dataclass(frozen=True)
class TextEncoding:
    """The codec a file is decoded with, and why it was chosen (for the log and the dataset meta)."""

    name: str  # a Python codec name, normalized: "utf-8", "gb18030", …
    reason: str  # "requested", "utf-8", "utf-8 with BOM", "gb18030: not valid UTF-8"

    @property
    def strips_bom(self) -> bool:
        return self.name == "utf-8"


def _codec_name(name: str) -> str:
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise SourceError(f"unknown --encoding {name!r}: use a Python codec name such as utf-8 or gb18030") from None
    if codec.startswith(("utf-16", "utf-32")):
        raise SourceError(f"--encoding {name} is not supported: convert the file with `iconv -f {name} -t UTF-8`")
    return "utf-8" if codec == "utf-8-sig" else codec


def _decodes(data: bytes, codec: str, final: bool) -> bool:
    """Strict decode; with ``final=False`` a multibyte character cut at the end of a sample is not an error."""
    try:
        codecs.getincrementaldecoder(codec)("strict").decode(data, final=final)
    except UnicodeDecodeError:
        return False
    return True


def choose_encoding(sample: bytes, at_eof: bool, requested: str | None = None) -> TextEncoding:
    """Requested codec, else UTF-8 (BOM or not), else GB18030 when most non-ASCII lines decode only as that."""
    if sample.startswith(WIDE_BOMS) and not sample.startswith(codecs.BOM_UTF8):
        raise SourceError("the file is UTF-16/32 (it starts with such a BOM): convert it with `iconv -t UTF-8`")
    if requested:
        return TextEncoding(_codec_name(requested), "requested")
    if sample.startswith(codecs.BOM_UTF8):
        return TextEncoding("utf-8", "utf-8 with BOM")
    if _decodes(sample, "utf-8", at_eof):
        return TextEncoding("utf-8", "utf-8")
    # Score line by line, so a few invalid bytes in a UTF-8 file do not make the whole file GB18030.
    lines = sample.split(b"\n")
    if not at_eof:
        lines = lines[:-1]  # the last line may be cut by the sample end
    non_ascii = [line for line in lines if not line.isascii()]
    utf8_lines = sum(_decodes(line, "utf-8", True) for line in non_ascii)
    fallback_lines = sum(_decodes(line, FALLBACK_ENCODING, True) for line in non_ascii)
    if fallback_lines > 2 * utf8_lines:
        return TextEncoding(FALLBACK_ENCODING, f"{FALLBACK_ENCODING}: not valid UTF-8")
    return TextEncoding("utf-8", "utf-8 (some lines are not valid)")


def detect_encoding(path: Path, requested: str | None = None) -> TextEncoding:
    """Choose the encoding of ``path`` from its first MiB; log one line when it is not plain UTF-8."""
    sample, at_eof = read_sample(path)
    try:
        encoding = choose_encoding(sample, at_eof, requested)
    except SourceError as e:
        raise SourceError(f"{path}: {e}") from None
    if encoding.name != "utf-8" and encoding.reason != "requested":
        logger.info("%s: reading as %s (pass --encoding to override)", path, encoding.reason)
    return encoding


def decode_line(raw: bytes, codec: str) -> tuple[str, str | None]:
    """``(text, None)``, or ``(text with U+FFFD replacements, why it failed)`` when the bytes are invalid."""
    try:
        return raw.decode(codec), None
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.end].hex(" ")
        error = f"bytes {bad} at byte {e.start} of the line are not valid {codec} (try --encoding)"
        return raw.decode(codec, "replace"), error


def decoded_lines(path: Path, encoding: TextEncoding) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(lineno, line with its line ending, error or None)`` for every line of ``path``.

    On an error the text still comes (with U+FFFD in place of the bad bytes) so that line-structured
    formats such as CSV keep their shape; readers must count that record bad, never keep the text.
    """
    codec = encoding.name
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and encoding.strips_bom and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                text, error = decode_line(raw, codec)
                yield lineno, text, error
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise SourceError(f"{path}: cannot read it ({e}): the file is truncated or corrupt, fetch it again") from None


def read_whole_text(path: Path, encoding: TextEncoding) -> tuple[str | None, int, str | None]:
    """The whole file decoded: ``(text, 1, None)`` or ``(None, line of the first bad byte, error)``."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise SourceError(f"{path}: cannot read it ({e}): the file is truncated or corrupt, fetch it again") from None
    if encoding.strips_bom and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode(encoding.name), 1, None
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        return None, lineno, f"bytes {raw[e.start : e.end].hex(' ')} are not valid {encoding.name} (try --encoding)"
