"""The reply templates of SFT data (``--template``): ChatML replies as given, or seed 001's reasoning format.

``think`` renders every assistant turn as ``<think>\n{reasoning}\n</think>\n\n{answer}``, taking the
reasoning from a leading ``<think>…</think>`` in the data and giving replies without one an empty block;
a model trained so answers directly when the generation prompt ends with that empty block
(:func:`assistant_prefix` with ``thinking=False``). ``drop_think`` deletes the data's reasoning instead.
:class:`TemplatedCorpus` applies a template to a corpus on its way into the packer (SFT now; DPO and
distillation data later).
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

from engine.chat_template import ChatFormatError
from engine.conversations import parse_conversation
from engine.sources import Corpus, Record, SourceReport

TEMPLATES = ("chatml", "think")
EMPTY_THINK = "<think>\n\n</think>\n\n"  # the reply prefix that switches a `think`-trained model's reasoning off
LEADING_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)


def format_reply(content: str, template: str, drop_think: bool = False) -> str:
    """An assistant turn's text under ``template``: as given (``chatml``) or ``<think>…</think>`` + answer (``think``).

    Only a ``<think>…</think>`` block at the start of the reply counts as reasoning; ``drop_think``
    removes it (``think`` then keeps the empty block).
    """
    if template not in TEMPLATES:
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    match = LEADING_THINK.match(content)
    reasoning, answer = (match.group(1).strip(), content[match.end() :]) if match else ("", content)
    if drop_think:
        reasoning = ""
    if template == "chatml":
        return answer if drop_think else content
    return f"<think>\n{reasoning}\n</think>\n\n{answer}" if reasoning else EMPTY_THINK + answer


def assistant_prefix(template: str | None, thinking: bool = True) -> str:
    """What follows ``<|im_start|>assistant\\n`` in a generation prompt: the empty think block turns reasoning off."""
    return EMPTY_THINK if template == "think" and not thinking else ""


class TemplatedCorpus:
    """A :class:`~engine.sources.Corpus` whose conversations are rewritten by :func:`format_reply` before packing.

    It stands in for the Corpus in ``engine.pack.pack_corpus``. Its ``files`` are given as strings
    so the packer never lets workers read the files themselves, around the rewrite.
    """

    def __init__(
        self,
        corpus: Corpus,
        template: str,
        drop_think: bool,
        names: Mapping[str, str] | None = None,
        chosen_only: bool = False,
    ) -> None:
        self._corpus, self.template, self.drop_think = corpus, template, drop_think
        self.names, self.chosen_only = names, chosen_only  # read records as parse_conversation does
        self.specs, self.options = corpus.specs, corpus.options
        self.files = [str(item) for item in corpus.files]

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
            for message in messages:
                if message["role"] == "assistant":
                    message["content"] = format_reply(message["content"], self.template, self.drop_think)
            record.fields = {"messages": messages}
            yield record

    def check(self) -> None:
        self._corpus.check()
