"""Cleaning filters between the sources and the tokenizer; every dropped document is counted by reason.

:class:`Cleaner` is pure and picklable (it runs inside worker processes); :class:`Deduplicator` and
:class:`CleanStats` live in the main process. Every document always gets:

- ``\\r\\n``, lone ``\\r``, U+0085, U+2028 and U+2029 turned into ``\\n``;
- control and format characters removed (Unicode Cc and Cf, except ``\\n`` and ``\\t``), lone
  surrogates (Cs: JSON's ``"\\ud800"`` escapes; they cannot be encoded as UTF-8) and U+FFFD
  (it marks bytes already lost upstream; a model should never learn to write it);
- runs of spaces, tabs and other Unicode spaces (U+3000, U+00A0, …) inside a line collapsed to one
  ASCII space, and each line stripped at both ends (indentation is layout, not text);
- three or more newlines collapsed to two, so paragraph breaks and the line structure of poems stay;
- the whole document stripped.

On request: NFKC, full-width ASCII letters and digits to half-width (``Ａ１`` → ``A1``; Chinese
punctuation stays), and traditional to simplified Chinese (OpenCC ``t2s``).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Iterator

DROP_REASONS = ("empty", "too_short", "too_long", "duplicate")
NEWLINES = re.compile("\r\n?|[\u0085\u2028\u2029]")
MANY_NEWLINES = re.compile(r"\n{3,}")
# Ａ-Ｚ, ａ-ｚ and ０-９ sit 0xFEE0 above their ASCII forms; full-width punctuation is left alone.
FULLWIDTH_ALNUM = {
    code: code - 0xFEE0 for code in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))
}


class CleanConfigError(ValueError):
    """A cleaning option is out of range, or the library it needs is missing (one-line message)."""


@lru_cache(maxsize=1)
def _invisible_characters() -> re.Pattern[str]:
    """A character class of the Cc, Cf and Cs code points but \\n and \\t, built once per process."""
    ranges: list[list[int]] = []
    # Cc, Cf and Cs only occur in planes 0-1 and the tag block of plane 14: scanning those is 8x faster.
    for code in (*range(0x20000), *range(0xE0000, 0xE1000)):
        if unicodedata.category(chr(code)) in ("Cc", "Cf", "Cs") and code not in (0x0A, 0x09):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    parts = "".join(
        re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in ranges
    )
    return re.compile(f"[{parts}]+")


def warm_cleaner() -> None:
    """Build the per-process tables now (call before forking workers so they inherit them)."""
    _changed_characters()


@lru_cache(maxsize=1)
def _changed_characters() -> re.Pattern[str]:
    """Any character normalize() would remove or rewrite: whitespace but ' ' and '\\n', U+FFFD, invisibles."""
    return re.compile("[^\\S \\n]|\ufffd|" + _invisible_characters().pattern.rstrip("+"))


def is_clean(text: str) -> bool:
    """True when normalize() would return ``text`` unchanged (before the optional conversions): the common case."""
    if not text or text[0].isspace() or text[-1].isspace():
        return False
    if "  " in text or " \n" in text or "\n " in text or "\n\n\n" in text or "\ufffd" in text:
        return False
    # isprintable() is False for every Cc/Cf/Cs character and every whitespace but ' ': a fast C scan.
    if text.isprintable() or text.replace("\n", "").isprintable():
        return True
    return _changed_characters().search(text) is None  # private-use or unassigned characters: look closer


@dataclass
class CleanConfig:
    """Which filters run; see the module docstring for what always runs."""

    nfkc: bool = False  # Unicode NFKC on request (also folds full-width forms and ligatures)
    fullwidth_to_halfwidth: bool = False  # full-width ASCII letters and digits (Ａ１) -> half-width
    traditional_to_simplified: bool = False  # OpenCC t2s, from the PyPI package opencc-python-reimplemented
    min_chars: int = 1
    max_chars: int | None = None
    dedup: bool = True  # exact duplicates by hash of the cleaned text

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise CleanConfigError(f"--min-chars must be 0 or more, not {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
            raise CleanConfigError(f"--max-chars {self.max_chars} is below --min-chars {self.min_chars} (or 1)")


def _load_t2s() -> Any:
    try:
        from opencc import OpenCC
    except ImportError:
        raise CleanConfigError("--t2s needs the opencc module: pip install opencc-python-reimplemented") from None
    try:
        return OpenCC("t2s")
    except Exception:  # the C++ OpenCC binding names its configs "t2s.json"
        return OpenCC("t2s.json")


class Cleaner:
    """Normalizes one document at a time; returns the cleaned text or why it is dropped."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self._t2s = _load_t2s() if config.traditional_to_simplified else None

    def __getstate__(self) -> dict[str, Any]:
        # The converter is rebuilt in each worker rather than pickled with its dictionaries.
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])

    def normalize(self, text: str) -> str:
        """The cleaned text, before any length check."""
        config = self.config
        if config.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if config.fullwidth_to_halfwidth:
            text = text.translate(FULLWIDTH_ALNUM)
        if is_clean(text):
            return text if self._t2s is None else self._t2s.convert(text)  # the common case: nothing to change
        if "\r" in text or "\x85" in text or "\u2028" in text or "\u2029" in text:
            text = NEWLINES.sub("\n", text)
        if "\ufffd" in text:
            text = text.replace("\ufffd", "")
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if not line.isprintable():  # only such lines can hold control/format characters: skip the regex otherwise
                line = _invisible_characters().sub("", line)
            lines[i] = " ".join(line.split())  # collapses every run of Unicode whitespace and strips both ends
        text = "\n".join(lines)
        if "\n\n\n" in text:
            text = MANY_NEWLINES.sub("\n\n", text)
        text = text.strip()
        if self._t2s is not None:
            text = self._t2s.convert(text)
        return text

    def clean(self, text: str) -> tuple[str | None, str | None]:
        """``(cleaned text, None)``, or ``(None, reason)`` with reason "empty", "too_short" or "too_long"."""
        text = self.normalize(text)
        if not text:
            return None, "empty"
        if len(text) < self.config.min_chars:
            return None, "too_short"
        if self.config.max_chars is not None and len(text) > self.config.max_chars:
            return None, "too_long"
        return text, None


class Deduplicator:
    """Exact duplicates by a 16-byte BLAKE2b digest of the text (about 100 bytes of memory per document)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0

    def is_duplicate(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._seen:
            self.duplicates += 1
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class CleanStats:
    """Documents kept and dropped by reason; partial stats from workers merge into one."""

    kept: int = 0
    kept_chars: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def keep(self, text: str) -> None:
        self.kept += 1
        self.kept_chars += len(text)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "CleanStats") -> "CleanStats":
        """Add ``other``'s counts into these (and return self)."""
        self.kept += other.kept
        self.kept_chars += other.kept_chars
        self.dropped.update(other.dropped)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "kept_chars": self.kept_chars,
            "dropped": {reason: self.dropped[reason] for reason in sorted(self.dropped)},
            "total_dropped": self.total_dropped,
        }


def clean_texts(
    texts: Iterable[str], cleaner: Cleaner, stats: CleanStats, deduplicator: Deduplicator | None = None
) -> Iterator[str]:
    """Clean in this process: yield kept texts, count every drop (dedup when ``cleaner.config.dedup``)."""
    if deduplicator is None and cleaner.config.dedup:
        deduplicator = Deduplicator()
    for text in texts:
        cleaned, reason = cleaner.clean(text)
        if cleaned is None:
            stats.drop(reason or "empty")
        elif deduplicator is not None and cleaner.config.dedup and deduplicator.is_duplicate(cleaned):
            stats.drop("duplicate")
        else:
            stats.keep(cleaned)
            yield cleaned


def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cleaning")
    group.add_argument("--nfkc", action="store_true", help="apply Unicode NFKC normalization")
    group.add_argument(
        "--fullwidth-to-halfwidth",
        action="store_true",
        help="turn full-width ASCII letters and digits (Ａ１) into half-width (A1); Chinese punctuation stays",
    )
    group.add_argument(
        "--t2s",
        action="store_true",
        help="convert traditional to simplified Chinese with OpenCC t2s (pure Python: about 0.5 M characters/s per "
        "core)",
    )
    group.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this after cleaning")
    group.add_argument("--max-chars", type=int, default=None, help="drop documents longer than this after cleaning")
    group.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")


def clean_config_from_args(args: argparse.Namespace) -> CleanConfig:
    return CleanConfig(
        nfkc=args.nfkc,
        fullwidth_to_halfwidth=args.fullwidth_to_halfwidth,
        traditional_to_simplified=args.t2s,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        dedup=not args.no_dedup,
    )
