"""The reply templates of SFT data (``--template``): ChatML replies as given, or seed 001's reasoning format.

``think`` renders every assistant turn as ``<think>\n{reasoning}\n</think>\n\n{answer}``, taking the
reasoning from the message's ``reasoning_content`` (OpenAI style) or a leading ``<think>…</think>`` in its content
(a reply with both is refused when parsed, see :mod:`engine.conversations`) and giving replies without one an empty
block; a model trained so answers directly when the generation prompt ends with that empty block
(:func:`assistant_prefix` with ``thinking=False``). ``drop_think`` deletes the data's reasoning instead, and
``no_think_share`` empties the think block of that share of the conversations only (chosen by
:func:`no_think_chosen`), so one model learns both to reason and to answer at once when told to.
:class:`TemplatedCorpus` applies a template to a corpus on its way into the packer (SFT now; DPO and
distillation data later).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterator, Mapping, Sequence

from engine.chat_template import ChatFormatError
from engine.conversations import LEADING_THINK, REASONING, Message, parse_conversation
from engine.sources import Corpus, Record, SourceReport

logger = logging.getLogger("engine.reply_template")

TEMPLATES = ("chatml", "think")
EMPTY_THINK = "<think>\n\n</think>\n\n"  # the reply prefix that switches a `think`-trained model's reasoning off
#: The format tags a reasoning SFT may weight (``llama.sft --think-tag-weight``), each when it is one token.
THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reply(content: str, template: str, drop_think: bool = False, reasoning: str | None = None) -> str:
    """An assistant turn's text under ``template``: as given (``chatml``) or ``<think>…</think>`` + answer (``think``).

    The reasoning is ``reasoning`` (a message's ``reasoning_content``) when given, else a ``<think>…</think>`` block
    at the start of the reply; ``drop_think`` removes it (``think`` then keeps the empty block). ``chatml`` never
    writes ``reasoning`` (the packer counts what it leaves out).
    """
    if template not in TEMPLATES:
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    match = None if reasoning else LEADING_THINK.match(content)
    answer = content[match.end() :] if match else content
    reasoning = (match.group(1) if match else reasoning or "").strip()
    if drop_think:
        reasoning = ""
    if template == "chatml":
        return answer if drop_think else content
    return f"<think>\n{reasoning}\n</think>\n\n{answer}" if reasoning else EMPTY_THINK + answer


def think_tag_ids(tokenizer: Any) -> dict[str, int]:
    """The :data:`THINK_TAGS` that ``tokenizer`` encodes as one token each, with their ids."""
    found = {}
    for tag in THINK_TAGS:
        token_id = tokenizer.token_to_id(tag)
        if token_id is not None and list(tokenizer.encode(tag)) == [token_id]:
            found[tag] = token_id
    return found


def assistant_prefix(template: str | None, thinking: bool = True) -> str:
    """What follows ``<|im_start|>assistant\\n`` in a generation prompt: the empty think block turns reasoning off."""
    return EMPTY_THINK if template == "think" and not thinking else ""


def no_think_chosen(messages: Sequence[Mapping[str, str]], share: float) -> bool:
    """Whether a conversation is one of the ``share`` trained with an empty think block: its text hashed (blake2b:
    the same conversations in every run, on every machine, on resume) falls in the lowest ``share`` of the range,
    so a larger share keeps every conversation a smaller one chose."""
    if share <= 0:
        return False
    text = json.dumps([[m.get("role"), m.get("content"), m.get(REASONING)] for m in messages], ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"no-think").digest()
    return int.from_bytes(digest, "little") < share * 2**64


def has_reasoning(message: Mapping[str, str]) -> bool:
    """Whether an assistant message holds reasoning: a ``reasoning_content``, or a non-empty leading think block."""
    match = LEADING_THINK.match(message.get("content") or "")
    return bool(message.get(REASONING)) or bool(match and match.group(1).strip())


class TemplatedCorpus:
    """A :class:`~engine.sources.Corpus` whose conversations are rewritten by :func:`format_reply` before packing.

    It stands in for the Corpus in ``engine.pack.pack_corpus``. Its ``files`` are given as strings
    so the packer never lets workers read the files themselves, around the rewrite. ``no_think_share`` (``think``
    only): the share of conversations whose replies get an empty think block (:func:`no_think_chosen`). It counts
    what it did (:meth:`log_summary`).
    """

    def __init__(
        self,
        corpus: Corpus,
        template: str,
        drop_think: bool,
        names: Mapping[str, str] | None = None,
        chosen_only: bool = False,
        no_think_share: float = 0.0,
    ) -> None:
        if no_think_share and template != "think":
            raise ValueError("--no-think-share empties think blocks: use it with --template think")
        if no_think_share and drop_think:
            raise ValueError("--drop-think empties every think block already: give it or --no-think-share, not both")
        self._corpus, self.template, self.drop_think = corpus, template, drop_think
        self.names, self.chosen_only = names, chosen_only  # read records as parse_conversation does
        self.no_think_share = no_think_share
        self.specs, self.options = corpus.specs, corpus.options
        self.files = [str(item) for item in corpus.files]
        self.conversations = 0  # parsed and rewritten
        self.emptied = 0  # of them, given an empty think block by no_think_share
        self.reasoning_left_out = 0  # replies whose reasoning the rewrite deleted (drop_think or no_think_share)

    @property
    def report(self) -> SourceReport:
        return self._corpus.report

    def records(self, columns: Sequence[str] | None = None) -> Iterator[Record]:
        for record in self._corpus.records(columns):
            try:
                messages = parse_conversation(record.fields, names=self.names, chosen_only=self.chosen_only)
            except ChatFormatError:
                yield record  # unchanged: the packer counts it as bad, with its file and line
                continue
            record.fields = {"messages": self.rewrite(messages)}
            yield record

    def rewrite(self, messages: list[Message]) -> list[Message]:
        """``messages`` with every assistant turn under the template, counted."""
        chosen = no_think_chosen(messages, self.no_think_share)
        empty = self.drop_think or chosen
        self.conversations += 1
        self.emptied += chosen
        rewritten = []
        for message in messages:
            if message["role"] != "assistant" or (self.template == "chatml" and not empty):
                rewritten.append(message)  # as given: the packer counts a reasoning_content ChatML leaves out
                continue
            self.reasoning_left_out += empty and has_reasoning(message)
            reply = format_reply(message["content"], self.template, empty, message.get(REASONING))
            rewritten.append({"role": "assistant", "content": reply})
        return rewritten

    def log_summary(self) -> None:
        """One line on what the rewrite emptied (none when it emptied nothing)."""
        if self.no_think_share:
            logger.info(
                "--no-think-share %g: %s of %s conversations (%.1f%%) are trained with an empty think block "
                "(%s replies' reasoning left out of them)",
                self.no_think_share,
                f"{self.emptied:,}",
                f"{self.conversations:,}",
                100 * self.emptied / max(self.conversations, 1),
                f"{self.reasoning_left_out:,}",
            )
        elif self.drop_think and self.reasoning_left_out:
            logger.info("--drop-think: deleted the reasoning of %s replies", f"{self.reasoning_left_out:,}")

    def check(self) -> None:
        self._corpus.check()
