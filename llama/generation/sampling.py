"""What every decoding strategy shares: prompt fitting and left padding, the logits rules, the result, the clock.

The logits rules follow Hugging Face's ``generate`` in meaning and order (repetition penalty, then temperature,
top-k, top-p), so that the same options give the same tokens here and there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What :func:`llama.generation.generate.generate` returns, one entry per prompt.

    ``sequences`` are the new ids only, the stop token included when one ended the row (as Hugging Face
    returns it); ``finished`` says whether a stop token ended it (False: it ran out of ``max_new_tokens``).
    Throughputs count real prompt tokens for prefill and generated tokens (every beam's) for decode; decode
    is 0.0 when no decode step ran. ``scores``: beam search's length-normalised log-probabilities.
    ``texts``: the decoded sequences, stop token left out (:func:`llama.generation.generate.generate_text` only).
    """

    sequences: list[list[int]]
    finished: list[bool]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    scores: list[float] | None = None
    texts: list[str] | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is picked from logits: argmax (``do_sample=False``) or a draw after the warpers."""

    do_sample: bool = False
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = off
    top_p: float = 1.0  # sampling only; 1.0 = off
    repetition_penalty: float = 1.0  # greedy, sampling and beams; 1.0 = off
    no_repeat_ngram_size: int = 0  # greedy, sampling and beams; 0 = off
    max_think_tokens: int | None = None  # greedy, sampling and beams; None = no budget

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 (greedy is do_sample=False), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"generate: top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"generate: repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"generate: no_repeat_ngram_size must be ≥ 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.max_think_tokens is not None and self.max_think_tokens < 1:
            raise ValueError(f"generate: max_think_tokens must be ≥ 1 (None = no budget), got {self.max_think_tokens}")

    def keywords(self) -> dict[str, Any]:
        """These options as :func:`llama.generation.generate.generate`'s keyword arguments."""
        return asdict(self)


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """Prompts cut from the left so that prompt + ``max_new_tokens`` fits ``max_seq_len``; one warning if any was."""
    if not prompts:
        raise ValueError("generate: no prompts; give at least one list of token ids")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    room = max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(
            f"generate: max_new_tokens {max_new_tokens} leaves no room for a prompt in max_seq_len "
            f"{max_seq_len}; ask for at most {max_seq_len - 1}"
        )
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"generate: prompt {empty[0]} is empty; give at least one token (e.g. BOS)")
    fitted = [list(p[-room:]) for p in prompts]
    dropped = sum(len(p) - len(f) for p, f in zip(prompts, fitted))
    if dropped:
        cut = sum(len(p) > room for p in prompts)
        logger.warning(
            "generate: %d prompt(s) longer than max_seq_len %d - max_new_tokens %d = %d tokens: dropped "
            "%d tokens from their start",
            cut,
            max_seq_len,
            max_new_tokens,
            room,
            dropped,
        )
    return fitted


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])``: prompts right-aligned so that they end together; mask False at padding."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt) :] = True
    return ids.to(device), mask.to(device)


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded prompts: each row counts from 0 at its first real token (pads get 0)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def tokens_seen(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` bool: which ids each row's prompt holds (padding left out), for the repetition penalty."""
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.masked_fill(~mask, vocab_size), True)  # padding lands in the extra column, dropped
    return seen[:, :vocab_size]


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty as Hugging Face applies it: a seen token's logit is divided by ``penalty`` when
    positive and multiplied by it when negative (so ``penalty`` > 1 always makes it less likely)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside each row's ``k`` largest set to -inf (ties with the k-th kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens whose probabilities sum to at least ``p`` (the top one always)."""
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p  # the unlikely tail whose whole mass stays within 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def hold_back(logits: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Logits with the stop tokens made impossible (before ``min_new_tokens``, as HF's MinNewTokens processor)."""
    return logits.index_fill(-1, stop_ids, float("-inf")) if stop_ids.numel() else logits


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor | None, options: SamplingOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row ``[B]`` from float32 logits ``[B, V]``."""
    if seen is not None and options.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, seen, options.repetition_penalty)
    if not options.do_sample:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / options.temperature, options.top_k), options.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


class Stopwatch:
    """Wall time between laps, with the device's queued work finished first (CUDA runs asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or the start)."""
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def per_second(count: int, seconds: float) -> float:
    """``count / seconds``, 0.0 for no work (and never a division by zero on a coarse clock)."""
    return count / max(seconds, 1e-9) if count else 0.0
