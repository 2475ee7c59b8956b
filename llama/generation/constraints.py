"""Logits rules that read the sequence so far: the n-gram ban and the think-token budget.

``no_repeat_ngram_size=N`` is Hugging Face's ``NoRepeatNGramLogitsProcessor``: a token that would complete an
N-gram already present in the row (prompt included, padding left out) gets -inf. ``max_think_tokens=K``: while a
row is inside an open ``<think>`` block (the prompt may end inside one), once K tokens were generated in it the
next token is forced to be ``</think>``; a row that closes its block itself is untouched. The ``<think>`` token
does not count; every later one does, up to ``</think>``. A ``<think>`` after the block closed opens a new block
with a fresh budget (one inside an open block changes nothing).

Both keep their state on the device, so a step adds no host sync. Cost per step: the ban compares the last N - 1
tokens with every window of the row (``B × T × N`` element compares on a ``[B, T]`` history, plus a ``[B, V]``
mask), small beside the step's forward; the budget is a few ``[B]`` element-wise ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # the markers of a reasoning block (engine.reply_template's format)


@dataclass(frozen=True)
class ThinkBudget:
    """The ids of ``<think>`` and ``</think>`` and the most tokens a think block may hold before it is closed."""

    open_id: int
    close_id: int
    max_tokens: int


class SequenceRules:
    """Per-row state of the rules that look back: the token history (for the n-gram ban) and the think budget.

    Built from the left-padded prompts; :meth:`apply` changes a step's logits ``[B, V]``, :meth:`append` records the
    tokens chosen, :meth:`reorder` follows beam search's choice of rows.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        no_repeat_ngram_size: int = 0,
        think: ThinkBudget | None = None,
    ) -> None:
        batch, prompt_len = ids.shape
        self.ngram = no_repeat_ngram_size
        self.think = think
        self.history: torch.Tensor | None = None
        if self.ngram > 0:
            self.history = torch.zeros(batch, prompt_len + max_new_tokens, dtype=torch.long, device=ids.device)
            self.history[:, :prompt_len] = ids
            self.first = (~mask).sum(dim=1)  # each row's first real position (left padding before it)
        self.length = prompt_len
        if think is not None:
            self.inside = prompt_ends_inside(ids, mask, think.open_id, think.close_id)
            self.spent = torch.zeros(batch, dtype=torch.long, device=ids.device)

    @property
    def active(self) -> bool:
        return self.history is not None or self.think is not None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [B, V]`` with repeated n-grams banned, then ``</think>`` forced where a block spent its budget."""
        if self.history is not None:
            logits = logits.masked_fill(self._banned(logits.shape[-1]), float("-inf"))
        if self.think is not None:
            force = self.inside & (self.spent >= self.think.max_tokens)
            only_close = torch.full_like(logits[:1], float("-inf"))
            only_close[0, self.think.close_id] = 0.0
            logits = torch.where(force[:, None], only_close, logits)
        return logits

    def _banned(self, vocab: int) -> torch.Tensor:
        """``[B, V]`` bool: the tokens that would complete an n-gram the row already holds (HF's rule)."""
        history = self.history[:, : self.length]
        n = self.ngram
        if self.length < n:
            return torch.zeros(history.shape[0], vocab, dtype=torch.bool, device=history.device)
        prefix = history[:, self.length - n + 1 :]  # the last n - 1 tokens: what the next token would complete
        windows = history.unfold(1, n, 1)  # [B, W, n], a view
        matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1)
        starts = torch.arange(windows.shape[1], device=history.device)
        matches &= starts[None] >= self.first[:, None]  # windows over left padding hold no real n-gram
        banned = torch.zeros(history.shape[0], vocab + 1, dtype=torch.bool, device=history.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)  # spare column
        return banned[:, :vocab]

    def append(self, tokens: torch.Tensor) -> None:
        """Record the step's tokens ``[B]`` (finished rows too: their history no longer matters)."""
        if self.history is not None:
            self.history[:, self.length] = tokens
        self.length += 1
        if self.think is not None:
            opened, closed = tokens == self.think.open_id, tokens == self.think.close_id
            fresh = opened & ~self.inside  # a <think> inside a block does not renew its budget
            self.spent = torch.where(fresh, 0, self.spent + (self.inside & ~closed).long())
            self.inside = (self.inside | opened) & ~closed

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search's surviving beams), in that order."""
        if self.history is not None:
            self.history, self.first = self.history[index], self.first[index]
        if self.think is not None:
            self.inside, self.spent = self.inside[index], self.spent[index]


def prompt_ends_inside(ids: torch.Tensor, mask: torch.Tensor, open_id: int, close_id: int) -> torch.Tensor:
    """``[B]`` bool: whether each prompt's last think marker (padding left out) is an opening ``<think>``."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_open = torch.where(mask & (ids == open_id), positions, -1).amax(dim=1)
    last_close = torch.where(mask & (ids == close_id), positions, -1).amax(dim=1)
    return last_open > last_close
