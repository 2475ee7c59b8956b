"""Text from users and files before it reaches a tokenizer: bytes that are not UTF-8 found, counted and refused.

Python hands invalid UTF-8 (a GBK file, a terminal in another encoding, a stray byte in ``argv``) to the program as
lone surrogates (``surrogateescape``); a tokenizer then fails deep inside with an unreadable error. These helpers
find them first, so each command says in one line which message, line or file holds them, and what to do.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

log = logging.getLogger("llama.generation.prompts")

EXAMPLES_PER_REASON = 3  # lines logged per kind of bad line; the rest are only counted


def invalid_bytes(text: str) -> int:
    """How many characters of ``text`` cannot be written as UTF-8 (surrogates: undecodable bytes, or ``"\\ud800"``)."""
    return sum(1 for ch in text if "\ud800" <= ch <= "\udfff")


def require_utf8(text: str, what: str) -> str:
    """``text``, or a one-line ValueError naming ``what`` when it holds bytes that are not UTF-8."""
    bad = invalid_bytes(text)
    if bad:
        raise ValueError(
            f"{what} holds {bad} byte(s) that are not valid UTF-8 text: type it again, or re-save the input as UTF-8"
        )
    return text


def tolerant(stream: TextIO) -> TextIO:
    """``stream`` reading undecodable bytes as surrogates instead of raising mid-stream (a text stream it cannot
    reconfigure is returned as it is)."""
    if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        stream.reconfigure(errors="surrogateescape")
    return stream


@dataclass
class PromptFile:
    """The prompts of a file, each with its line number, the record each came from (a ``.jsonl`` line's object, with
    fields such as GRPO's ``answer``; ``{"prompt": text}`` otherwise), and the lines skipped, counted by reason."""

    path: str
    prompts: list[tuple[int, str]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str, lineno: int, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= EXAMPLES_PER_REASON:
            log.warning("%s:%d: skipped (%s): %s", self.path, lineno, reason, detail)

    def check(self, kept: int, max_bad: float) -> None:
        """Refuse the file in one line when more than ``max_bad`` of its lines were skipped (``kept`` were used)."""
        total_bad = sum(self.skipped.values())
        if total_bad > max_bad * (total_bad + kept):
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            raise ValueError(
                f"{self.path}: {total_bad} of {total_bad + kept} lines are malformed ({reasons}), more than --max-bad "
                f"{max_bad:.0%}: fix the file or raise --max-bad"
            )

    def describe_skipped(self) -> str:
        """``"3 line(s) skipped (not_utf8: 2, not_json: 1)"``, or ``""`` when none was."""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{total} line(s) skipped ({reasons})" if total else ""


def _prompt_of(line: str, jsonl: bool) -> tuple[str, dict]:
    """The prompt a line holds and its record: the line itself, or a JSON line's ``"prompt"`` (or ``"text"``)
    string and its object."""
    if not jsonl:
        return line, {"prompt": line}
    record = json.loads(line)
    if isinstance(record, str):
        return record, {"prompt": record}
    text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError('expected a JSON string or an object with a "prompt" text')
    return text, record


def read_prompts(path: str | os.PathLike[str]) -> PromptFile:
    """One prompt per non-blank line (a ``.jsonl`` file: a JSON string or ``{"prompt": …}`` per line).

    Lines that are not UTF-8, not the JSON expected, or empty prompts are skipped and counted by reason (the first
    few logged with their line number). A missing file or one with no prompt is a one-line ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file; give a text file with one prompt per line (or a .jsonl)")
    jsonl = path.suffix.lower() == ".jsonl"
    found = PromptFile(str(path))
    with open(path, encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            if invalid_bytes(line):
                found.skip("not_utf8", lineno, f"{invalid_bytes(line)} byte(s) that are not valid UTF-8")
                continue
            try:
                prompt, record = _prompt_of(line, jsonl)
            except ValueError as e:  # json.JSONDecodeError is one
                found.skip("not_json", lineno, str(e))
                continue
            if not prompt.strip():
                found.skip("empty", lineno, "no prompt text")
                continue
            if invalid_bytes(prompt):  # JSON can spell a lone "\ud800"
                found.skip("not_utf8", lineno, "a surrogate escape that is not a character")
                continue
            found.prompts.append((lineno, prompt))
            found.records.append(record)
    if not found.prompts:
        skipped = found.describe_skipped()
        raise ValueError(
            f"--prompts {path} holds no prompt{f' ({skipped})' if skipped else ''}: give one prompt per line"
            + (' (a .jsonl: a JSON string or {"prompt": …} per line)' if jsonl else "")
        )
    return found
