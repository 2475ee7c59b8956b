"""A reply's token ids → its text, piece by piece as they are generated, the way a streamed answer must show it.

Three stages per row, each fed what the one before let through:

1. :class:`~llama.chat.IncrementalDecoder`: whole characters only (a Chinese character split over byte-fallback
   pieces is held back until its last byte arrives);
2. :class:`StopMatcher`: the request's ``stop`` strings; text that might be the start of one is held back, and the
   stop string itself is never shown (OpenAI's rule);
3. :class:`ReasoningSplitter` (reasoning models only): a ``<think>…</think>`` block opening the reply becomes
   ``reasoning_content``, the rest ``content``.

Concatenating the pieces gives exactly what decoding the whole reply at once and cutting it gives, so a streamed
answer equals the non-streamed one.
"""

from __future__ import annotations

from typing import Sequence

from engine.tokenizer import Tokenizer

from ..chat import IncrementalDecoder

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of one of ``markers`` (0: none)."""
    longest = min(len(text), max((len(m) for m in markers), default=1) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class StopMatcher:
    """Text up to (not including) the first stop string; ``stopped`` once one appeared."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            shown, self.held, self.stopped = self.held[: min(found)], "", True
            return shown
        keep = _held_suffix(self.held, self.stops)
        shown, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return shown

    def flush(self) -> str:
        """What was held back because it began like a stop string that never came."""
        shown, self.held = self.held, ""
        return "" if self.stopped else shown


class ReasoningSplitter:
    """Streamed reply text → ``(reasoning, content)`` pieces: a ``<think>…</think>`` block opening the reply is the
    reasoning (its surrounding blank lines trimmed, as ``--template think`` writes them), all else is content.

    Markers split across pieces are recognised; only a block that opens the reply counts (``llama.chat``'s rule).
    """

    def __init__(self) -> None:
        self.state = "start"  # start → inside → after → answer; or start → answer when there is no block
        self.pending = ""
        self.found = False  # the reply opened with a think block
        self.started = False  # reasoning text (past its leading blank lines) has begun

    def feed(self, text: str) -> tuple[str, str]:
        if self.state == "answer":
            return "", text
        self.pending += text
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.found, self.pending = "inside", True, head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head):  # whitespace, or a prefix of the marker: wait for more
                return "", ""
            else:
                self.state, shown, self.pending = "answer", self.pending, ""
                return "", shown
        reasoning = ""
        if self.state == "inside":
            if not self.started:
                self.pending = self.pending.lstrip()
            end = self.pending.find(THINK_CLOSE)
            if end < 0:  # hold back trailing blanks and what could start a split closing marker
                body = self.pending[: len(self.pending) - _held_suffix(self.pending, [THINK_CLOSE])]
                reasoning = body.rstrip()
                self.pending = self.pending[len(reasoning) :]
                self.started = self.started or bool(reasoning)
                return reasoning, ""
            reasoning = self.pending[:end].rstrip()
            self.state, self.pending = "after", self.pending[end + len(THINK_CLOSE) :]
        shown = self.pending.lstrip()  # state "after": the blank lines between the block and the answer
        self.pending = ""
        if shown:
            self.state = "answer"
        return reasoning, shown

    def finish(self) -> tuple[str, str]:
        """What is still held at the end: a lone ``<thi`` that never became a marker, or an unclosed block's tail."""
        held, self.pending = self.pending, ""
        if self.state == "start":
            return "", held
        if self.state == "inside":
            return (held if self.started else held.lstrip()).rstrip(), ""
        return "", ""


class ReplyText:
    """One reply's pipeline (decoder → stop strings → reasoning split); :meth:`push` each generated id that is not a
    stop token, then :meth:`finish` once."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], split_reasoning: bool) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = StopMatcher(stops)
        self.splitter = ReasoningSplitter() if split_reasoning else None

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the reply is over."""
        return self.stop.stopped

    @property
    def has_reasoning(self) -> bool:
        return self.splitter is not None and self.splitter.found

    def _split(self, text: str) -> tuple[str, str]:
        if self.splitter is None or not text:
            return "", text
        return self.splitter.feed(text)

    def push(self, token_id: int) -> tuple[str, str]:
        """``(reasoning, content)`` the new id completes (either may be "")."""
        return self._split(self.stop.feed(self.decoder.push(token_id)))

    def finish(self) -> tuple[str, str]:
        """The ``(reasoning, content)`` still held back."""
        text = self.stop.feed(self.decoder.flush())
        text += self.stop.flush()
        reasoning, content = self._split(text)
        if self.splitter is not None:
            more_reasoning, more_content = self.splitter.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return reasoning, content
