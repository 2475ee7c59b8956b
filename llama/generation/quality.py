"""What a generated reply is judged by: the think format of a reasoning model, and loops.

**Well-formed** (a ``--template think`` checkpoint): the reply opens with a ``<think>`` block (leading whitespace
allowed), holds exactly one ``<think>`` and one ``</think>``, and has a non-empty answer after the block. Otherwise
its problem is one of ``no_think_block``, ``unclosed_think``, ``extra_think_marker``, ``empty_answer``. The
reasoning may be empty (the template gives replies without reasoning an empty block).

**Repetitive** (any model): small models loop, repeating one phrase until the token limit. A reply is repetitive
when its text *ends* in one unit of 1 to ``max_period`` characters (200) repeated back to back at least
``min_repeats`` times (3), the repeated stretch covering at least ``min_chars`` characters (32); trailing
whitespace and a trailing broken character (U+FFFD, a byte-fallback piece cut by the limit) are ignored, and the
last unit may be cut short. Ordinary text does not end in 32+ characters of one repeated unit; "哈哈哈哈" (4
characters) or a phrase said twice is not flagged; a loop the model escaped before the end, or one that changes
a little each turn (a counter), is not caught. Characters, not tokens: a loop in tokens is one in text, and the
rule reads the same on any tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .constraints import THINK_CLOSE, THINK_OPEN

FORMAT_PROBLEMS = ("no_think_block", "unclosed_think", "extra_think_marker", "empty_answer")


def think_format_problem(reply: str) -> str | None:
    """Why ``reply`` is not ``<think>…</think>`` + a non-empty answer (one of :data:`FORMAT_PROBLEMS`), or None."""
    if not reply.lstrip().startswith(THINK_OPEN):
        return "no_think_block"
    if THINK_CLOSE not in reply:
        return "unclosed_think"
    if reply.count(THINK_OPEN) > 1 or reply.count(THINK_CLOSE) > 1:
        return "extra_think_marker"
    if not reply.split(THINK_CLOSE, 1)[1].strip():
        return "empty_answer"
    return None


@dataclass(frozen=True)
class LoopRule:
    """When a reply's end counts as a loop (see the module docstring)."""

    min_repeats: int = 3
    min_chars: int = 32
    max_period: int = 200

    def __post_init__(self) -> None:
        if self.min_repeats < 2 or self.min_chars < 1 or self.max_period < 1:
            raise ValueError(f"LoopRule needs min_repeats ≥ 2, min_chars ≥ 1 and max_period ≥ 1, got {self}")


@dataclass(frozen=True)
class Loop:
    """The repeated end of a reply: its unit (the last ``period`` characters), and how far back it repeats."""

    unit: str
    period: int
    chars: int  # characters of the periodic stretch at the end

    @property
    def repeats(self) -> float:
        return self.chars / self.period


def periodic_suffix(text: str, period: int) -> int:
    """Length of the longest suffix of ``text`` in which every character equals the one ``period`` before it
    (at least ``period``: one unit), or 0 when ``text`` is shorter than one unit."""
    if len(text) < period:
        return 0
    run = period
    while run < len(text) and text[-run - 1] == text[-run - 1 + period]:
        run += 1
    return run


def find_loop(reply: str, rule: LoopRule = LoopRule()) -> Loop | None:
    """The loop ``reply`` ends in under ``rule`` (the shortest unit that qualifies), or None."""
    text = reply.rstrip().rstrip("\ufffd").rstrip()
    longest = min(rule.max_period, len(text) // rule.min_repeats)
    for period in range(1, longest + 1):
        run = periodic_suffix(text, period)
        if run >= max(rule.min_repeats * period, rule.min_chars):
            return Loop(text[-period:], period, run)
    return None


@dataclass
class ReplyScore:
    """One generated reply and its judgement; ``format_problem`` is None when well-formed or not checked."""

    line: int
    prompt: str
    reply: str
    finished: bool  # the model ended it (False: it ran into --max-new-tokens)
    new_tokens: int
    format_problem: str | None = None
    loop: Loop | None = None

    def record(self, format_checked: bool) -> dict[str, Any]:
        return {
            "line": self.line,
            "prompt": self.prompt,
            "reply": self.reply,
            "finished": self.finished,
            "new_tokens": self.new_tokens,
            "well_formed": (self.format_problem is None) if format_checked else None,
            "format_problem": self.format_problem,
            "repetitive": self.loop is not None,
            "loop": None if self.loop is None else {**vars(self.loop), "repeats": round(self.loop.repeats, 2)},
        }


def score_reply(score: ReplyScore, check_format: bool, rule: LoopRule = LoopRule()) -> ReplyScore:
    """``score`` with its format problem (when ``check_format``) and its loop filled in."""
    score.format_problem = think_format_problem(score.reply) if check_format else None
    score.loop = find_loop(score.reply, rule)
    return score


@dataclass
class ReplyQuality:
    """Format rate and repetition rate over the replies to a prompt file; the lines skipped, by reason.

    ``format_rate`` is None (n/a) when the format was not checked, ``format_note`` saying why.
    """

    file: str
    replies: list[ReplyScore]
    format_checked: bool
    format_note: str = ""
    bad: dict[str, int] = field(default_factory=dict)

    @property
    def well_formed(self) -> int:
        return sum(r.format_problem is None for r in self.replies) if self.format_checked else 0

    @property
    def repetitive(self) -> int:
        return sum(r.loop is not None for r in self.replies)

    @property
    def hit_limit(self) -> int:
        return sum(not r.finished for r in self.replies)

    @property
    def format_rate(self) -> float | None:
        return self.well_formed / len(self.replies) if self.format_checked and self.replies else None

    @property
    def repetition_rate(self) -> float:
        return self.repetitive / len(self.replies) if self.replies else 0.0

    def format_problems(self) -> dict[str, int]:
        problems: dict[str, int] = {}
        for r in self.replies:
            if self.format_checked and r.format_problem is not None:
                problems[r.format_problem] = problems.get(r.format_problem, 0) + 1
        return problems

    def line(self) -> str:
        n = len(self.replies)
        if self.format_rate is None:
            fmt = f"format n/a ({self.format_note})"
        else:
            problems = ", ".join(f"{k}: {v}" for k, v in sorted(self.format_problems().items()))
            fmt = f"format {self.format_rate:.1%} ({self.well_formed}/{n})" + (f" [{problems}]" if problems else "")
        bad = sum(self.bad.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.bad.items()))
        skipped = f"; {bad} bad line(s) skipped ({reasons})" if bad else ""
        return (
            f"generation: {fmt}, repetition {self.repetition_rate:.1%} ({self.repetitive}/{n}), "
            f"{self.hit_limit}/{n} hit --max-new-tokens, on {self.file}{skipped}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "generated": len(self.replies),
            "format_rate": self.format_rate,
            "well_formed": self.well_formed if self.format_checked else None,
            "format_problems": self.format_problems() if self.format_checked else None,
            "format_note": self.format_note or None,
            "repetition_rate": self.repetition_rate,
            "repetitive": self.repetitive,
            "hit_limit": self.hit_limit,
            "bad": dict(self.bad),
            "bad_total": sum(self.bad.values()),
            "replies": [r.record(self.format_checked) for r in self.replies],
        }
