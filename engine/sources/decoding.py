"""Open raw files (compressed or not), choose each file's text encoding, and decode it line by line.

Files are read as bytes and decoded one line at a time (plain text in bounded pieces, however long its
lines), so an invalid byte spoils only the record it sits in (the reader counts that record as
"undecodable") and memory stays flat however big the file. Splitting bytes on ``\\n`` is safe for UTF-8,
GB18030, Big5, Shift_JIS and EUC-JP alike: none uses byte 0x0A inside a multibyte character. A file that
is not UTF-8 is read in the legacy codec whose reading looks like real CJK text, and refused when that
is unclear. UTF-16/32 files are refused with a hint to convert them.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import gzip
import logging
import lzma
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from .base import SourceError

logger = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 20  # the leading sample the encoding is chosen from
COMPRESSORS: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Legacy encodings tried when a file is not UTF-8, by family; a family's best codec stands for it (cp950 holds €,
# big5hkscs Cantonese characters). GB18030 is a superset of GBK and GB2312.
CODEC_FAMILIES = (("gb18030",), ("big5hkscs", "cp950"), ("cp932",), ("euc_jp",))
FALLBACK_CODECS = tuple(codec for family in CODEC_FAMILIES for codec in family)
KANA_CODECS = frozenset({"cp932", "euc_jp"})  # kana count as common text only when read as Japanese
MIN_PLAUSIBLE = 0.5  # the best reading must have at least this score (share of common characters, less bad ones)
MIN_MARGIN = 0.1  # ... and beat the next family by this plus 1/sqrt(characters scored): short samples need more
READ_CHUNK_BYTES = 1 << 20  # plain text is read at most this much at a time, however long its lines
SCORED_CHARS = 1 << 18  # score at most this many decoded characters of the sample


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


def read_sample(path: Path, size: int | None = None) -> tuple[bytes, bool]:
    """The first ``size`` (default ``SAMPLE_BYTES``) bytes, decompressed, and whether they are the whole file."""
    size = size or SAMPLE_BYTES
    with open_binary(path) as f:
        sample = f.read(size)
        at_eof = len(sample) < size or not f.read(1)
    return sample, at_eof


@dataclass(frozen=True)
class TextEncoding:
    """The codec a file is decoded with, and why it was chosen (for the log and the dataset meta)."""

    name: str  # a Python codec name, normalized: "utf-8", "gb18030", …
    reason: str  # "requested", "utf-8", "utf-8 with BOM", "big5hkscs: not valid UTF-8; reads as …"

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
    """Requested codec, else UTF-8 (BOM or not), else the legacy CJK codec the text plausibly reads as."""
    if sample.startswith(WIDE_BOMS) and not sample.startswith(codecs.BOM_UTF8):
        raise SourceError("the file is UTF-16/32 (it starts with such a BOM): convert it with `iconv -t UTF-8`")
    if requested:
        return TextEncoding(_codec_name(requested), "requested")
    if sample.startswith(codecs.BOM_UTF8):
        return TextEncoding("utf-8", "utf-8 with BOM")
    if _decodes(sample, "utf-8", at_eof):
        return TextEncoding("utf-8", "utf-8")
    # Count lines, so a few invalid bytes in a UTF-8 file do not make the whole file a legacy encoding.
    lines = sample.split(b"\n")
    if not at_eof:
        lines = lines[:-1]  # the last line may be cut by the sample end
    non_ascii = [line for line in lines if not line.isascii()]
    utf8_lines = sum(_decodes(line, "utf-8", True) for line in non_ascii)
    legacy_lines = max(sum(_decodes(line, codec, True) for line in non_ascii) for codec in FALLBACK_CODECS)
    if legacy_lines <= 2 * utf8_lines:
        return TextEncoding("utf-8", "utf-8 (some lines are not valid)")
    return choose_legacy_encoding(sample, at_eof)


@functools.cache
def _common_cjk() -> frozenset[str]:
    """The characters of ordinary CJK text: GB2312 level 1, Big5 level 1, JIS level 1 kanji, and CJK punctuation.

    Text in the wrong legacy codec still decodes, but into rare characters, kana, symbols and private use.
    """
    chars: set[str] = set()
    for codec, leads, trails in (
        ("gb2312", range(0xB0, 0xD8), range(0xA1, 0xFF)),
        ("big5", range(0xA4, 0xC7), [*range(0x40, 0x7F), *range(0xA1, 0xFF)]),
        ("euc_jp", range(0xB0, 0xD0), range(0xA1, 0xFF)),
    ):
        for lead in leads:
            for trail in trails:
                try:
                    chars.add(bytes((lead, trail)).decode(codec))
                except UnicodeDecodeError:
                    pass
    chars = {c for c in chars if unicodedata.name(c, "").startswith("CJK UNIFIED")}  # not kana, not symbols
    punctuation = [*range(0x2010, 0x2027), *range(0x3000, 0x3012), *range(0xFF01, 0xFF5F)]
    return frozenset(chars | {chr(c) for c in punctuation})


def plausibility(text: str, kana: bool = False) -> tuple[float, int]:
    """``(score, n)``: of the ``n`` non-ASCII characters, the share that is common CJK text (kana too when
    ``kana``) less the share that no real text holds (U+FFFD, private use, unassigned, control characters)."""
    common, n, score = _common_cjk(), 0, 0
    for char, count in Counter(text).items():
        if char.isascii():
            continue
        n += count
        if char in common or (kana and "\u3040" <= char <= "\u30ff"):
            score += count
        elif char == "\ufffd" or unicodedata.category(char) in ("Co", "Cn", "Cc", "Cs"):
            score -= count
    return (score / n if n else 0.0), n


def _family_reading(sample: bytes, at_eof: bool, family: tuple[str, ...]) -> tuple[float, int, str]:
    """The best ``(score, n, codec)`` among one family's codecs."""
    readings = []
    for codec in family:
        text = codecs.getincrementaldecoder(codec)("replace").decode(sample, final=at_eof)[:SCORED_CHARS]
        readings.append((*plausibility(text, kana=codec in KANA_CODECS), codec))
    return max(readings, key=lambda r: r[0])


def choose_legacy_encoding(sample: bytes, at_eof: bool) -> TextEncoding:
    """The legacy codec whose reading of ``sample`` looks most like real text, when it clearly does."""
    readings = sorted((_family_reading(sample, at_eof, f) for f in CODEC_FAMILIES), key=lambda r: -r[0])
    best, n, codec = readings[0]
    margin = MIN_MARGIN + 1 / math.sqrt(max(n, 1))
    close = [r for r in readings if best - r[0] < margin]
    shown = close if len(close) > 1 else readings[:2]
    scores = ", ".join(f"{name} {max(score, 0):.0%}" for score, _, name in shown) + " common characters"
    if best < MIN_PLAUSIBLE:
        raise SourceError(
            f"not UTF-8, and it reads as no plausible text in {', '.join(FALLBACK_CODECS)} (best: {scores}): "
            "pass --encoding NAME with the file's real encoding"
        )
    if len(close) > 1:
        names = [name for _, _, name in close]
        raise SourceError(
            f"cannot tell its encoding: it reads as {' or '.join(names)} ({scores}, from {n} characters): "
            f"pass {' or '.join(f'--encoding {name}' for name in names)}"
        )
    return TextEncoding(codec, f"{codec}: not valid UTF-8; reads as {scores}")


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


def _decode_piece(decoder: codecs.IncrementalDecoder, raw: bytes, final: bool, codec: str) -> tuple[str, str | None]:
    """Decode one piece of a long line; on invalid bytes, the text with U+FFFD and why (the decoder goes on)."""
    pending = decoder.getstate()[0]
    try:
        return decoder.decode(raw, final), None
    except UnicodeDecodeError as e:
        error = f"bytes {e.object[e.start : e.end].hex(' ')} in the line are not valid {codec} (try --encoding)"
        replacer = codecs.getincrementaldecoder(codec)("replace")
        text = replacer.decode(pending + raw, final)
        decoder.setstate(replacer.getstate())
        return text, error


def decoded_pieces(
    path: Path, encoding: TextEncoding, chunk_bytes: int | None = None
) -> Iterator[tuple[int, str, str | None, bool]]:
    """Yield ``(lineno, text, error or None, ends_line)``: each line whole, or in pieces when it is longer than
    ``chunk_bytes`` (default ``READ_CHUNK_BYTES``), so memory stays bounded. Pieces are cut between characters,
    never inside one, and a line's ending (``\\r\\n`` too) always comes in its last piece."""
    codec, lineno, decoder, carry, first = encoding.name, 1, None, "", True
    chunk_bytes = chunk_bytes or READ_CHUNK_BYTES
    try:
        with open_binary(path) as f:
            while raw := f.readline(chunk_bytes):
                if first and encoding.strips_bom and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                first = False
                ends = raw.endswith(b"\n") or len(raw) < chunk_bytes  # a short read without \n is the end
                if decoder is None and ends:  # the usual case: the whole line in one read
                    yield lineno, *decode_line(raw, codec), True
                    lineno += 1
                    continue
                decoder = decoder or codecs.getincrementaldecoder(codec)("strict")
                text, error = _decode_piece(decoder, raw, ends, codec)
                text, carry = carry + text, ""
                if not ends and text.endswith("\r"):
                    text, carry = text[:-1], "\r"  # keep \r\n together
                if text or ends:
                    yield lineno, text, error, ends
                if ends:
                    lineno, decoder = lineno + 1, None
            if decoder is not None:  # the file ended inside a long line
                text, error = _decode_piece(decoder, b"", True, codec)
                yield lineno, carry + text, error, True
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
