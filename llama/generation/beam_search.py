"""Beam search with a KV cache, the way Hugging Face's ``generate(num_beams=N, early_stopping=True)`` does it.

Each step extends every live beam by every token and keeps, per prompt, the ``max(2, 1 + n_stop) * N`` best
candidates by summed log-probability. Those among the first N that end on a stop token (or reach
``max_new_tokens``) become finished hypotheses scored ``sum_logprob / new_tokens ** length_penalty``;
the N best candidates that did not stop live on. A prompt is done once N hypotheses have finished; the
best-scored one is returned. Width 1 is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import Llama
from .constraints import SequenceRules, ThinkBudget
from .kv_cache import KVCache
from .sampling import (
    GenerationResult,
    Stopwatch,
    hold_back,
    left_pad,
    penalize_repeats,
    per_second,
    prompt_positions,
    tokens_seen,
)

NO_BEAM = -1.0e9  # the score of a beam that must not be extended (HF's value)


@dataclass
class Hypotheses:
    """One prompt's best finished hypotheses, at most ``num_beams``, best first, as ``(score, tokens)``."""

    num_beams: int
    best: list[tuple[float, list[int]]] = field(default_factory=list)

    def add(self, score: float, tokens: list[int]) -> None:
        self.best.append((score, tokens))
        self.best.sort(key=lambda hyp: hyp[0], reverse=True)
        del self.best[self.num_beams :]

    @property
    def full(self) -> bool:
        return len(self.best) == self.num_beams


@torch.no_grad()
def beam_search(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_beams: int,
    *,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    think: ThinkBudget | None = None,
    eos_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
    pad_id: int = 0,
    stream: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Beam search over prompts that already fit the context (see :func:`llama.generation.generate.generate`).

    The prompts are prefilled once and their cache rows repeated for the beams. ``stream`` receives each
    prompt's chosen tokens at the end (a beam's tokens are not final before then). ``no_repeat_ngram_size`` and
    ``think`` are applied to each beam's log-probabilities (:mod:`llama.generation.constraints`), as Hugging Face
    applies its processors in beam search.
    """
    device = next(model.parameters()).device
    batch = len(prompts)
    stop = set(eos_ids)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    n_candidates = max(2, 1 + len(stop)) * num_beams
    clock = Stopwatch(device)
    cache, logits, mask, seen = _prefill(model, prompts, max_new_tokens, num_beams, pad_id, repetition_penalty)
    rules = _beam_rules(prompts, mask, max_new_tokens, num_beams, pad_id, no_repeat_ngram_size, think)
    lengths = mask.sum(dim=1).repeat_interleave(num_beams)
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = NO_BEAM  # the beams start identical: extend only the first
    beam_tokens: list[list[int]] = [[] for _ in range(batch * num_beams)]
    hypotheses = [Hypotheses(num_beams) for _ in range(batch)]
    prefill_s, decode_steps = 0.0, 0

    # Invariant: `logits` [batch * num_beams, V] predict the token after `beam_tokens`, whose summed
    # log-probabilities are `beam_scores`; the cache rows are the beams', in the same order.
    for step in range(max_new_tokens):
        log_probs = _log_probs(logits, seen, repetition_penalty, stop_ids if step < min_new_tokens else None)
        log_probs = rules.apply(log_probs) if rules.active else log_probs
        candidates = _candidates(log_probs, beam_scores, n_candidates)
        last = step + 1 == max_new_tokens
        keep_rows, keep_tokens, keep_scores = _select(
            candidates, num_beams, stop, last, (step + 1) ** length_penalty, hypotheses, beam_tokens
        )
        if step == 0:
            prefill_s = clock.lap()
        if last or all(h.full for h in hypotheses):
            break
        beam_tokens = [beam_tokens[source] + [token] for source, token in zip(keep_rows, keep_tokens)]
        index = torch.tensor(keep_rows, device=device)
        token_ids = torch.tensor(keep_tokens, device=device)
        cache.reorder(index)
        lengths = lengths[index]
        if seen is not None:
            seen = seen[index]
            seen[torch.arange(len(keep_rows), device=device), token_ids] = True
        if rules.active:
            rules.reorder(index)
            rules.append(token_ids)
        beam_scores = torch.tensor(keep_scores, device=device).view(batch, num_beams)
        logits = model(
            token_ids[:, None], position_ids=(lengths + step)[:, None], cache=cache, logits_to_keep=1
        ).logits[:, -1]
        decode_steps += 1
    decode_s = clock.lap()
    prefill_rate, decode_rate = (
        per_second(int(mask.sum()), prefill_s),
        per_second(decode_steps * len(beam_tokens), decode_s),
    )
    return _result(hypotheses, stop, stream, prefill_rate, decode_rate)


def _log_probs(
    logits: torch.Tensor, seen: torch.Tensor | None, repetition_penalty: float, held_back: torch.Tensor | None
) -> torch.Tensor:
    """Log-probabilities of the next token, repeats penalised (on log-probabilities, as Hugging Face's beam search
    applies its processors) and the ``held_back`` ids (stop tokens before ``min_new_tokens``) excluded."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if seen is not None:
        log_probs = penalize_repeats(log_probs, seen, repetition_penalty)
    if held_back is not None:
        log_probs = hold_back(log_probs, held_back)
    return log_probs


def _candidates(log_probs: torch.Tensor, beam_scores: torch.Tensor, n: int) -> tuple[list, list, list]:
    """The ``n`` best continuations of each prompt over all its beams: (scores, source beams, tokens), as lists."""
    batch, num_beams = beam_scores.shape
    vocab = log_probs.shape[-1]
    totals = (log_probs.view(batch, num_beams, vocab) + beam_scores[..., None]).view(batch, -1)
    top_scores, top_index = totals.topk(n, dim=1)
    return top_scores.tolist(), (top_index // vocab).tolist(), (top_index % vocab).tolist()


def _result(
    hypotheses: list[Hypotheses],
    stop: set[int],
    stream: Callable[[int, int], None] | None,
    prefill_tokens_per_s: float,
    decode_tokens_per_s: float,
) -> GenerationResult:
    """Each prompt's best hypothesis, streamed now that it is final."""
    sequences = [h.best[0][1] for h in hypotheses]
    if stream is not None:
        for b, seq in enumerate(sequences):
            for token in seq:
                stream(b, token)
    return GenerationResult(
        sequences=sequences,
        finished=[bool(seq) and seq[-1] in stop for seq in sequences],
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_tokens_per_s=decode_tokens_per_s,
        scores=[h.best[0][0] for h in hypotheses],
    )


def _prefill(
    model: Llama, prompts: list[list[int]], max_new_tokens: int, num_beams: int, pad_id: int, repetition_penalty: float
) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prefill the left-padded prompts once, then give each prompt ``num_beams`` rows (row ``b * num_beams + k``
    is beam k of prompt b): the cache, the next-token logits per row, the padding mask (per prompt) and, with a
    repetition penalty, the tokens each row has seen."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = ids.shape
    cache = KVCache.for_model(model, batch, prompt_len + max_new_tokens)
    if not all(len(p) == prompt_len for p in prompts):
        cache.mask_padding(mask)
    seen = tokens_seen(ids, mask, model.config.vocab_size) if repetition_penalty != 1.0 else None
    logits = model(ids, position_ids=prompt_positions(mask), cache=cache, logits_to_keep=1).logits[:, -1]
    rows = torch.arange(batch, device=device).repeat_interleave(num_beams)
    cache.reorder(rows)
    return cache, logits[rows], mask, None if seen is None else seen[rows]


def _beam_rules(
    prompts: list[list[int]],
    mask: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    pad_id: int,
    no_repeat_ngram_size: int,
    think: ThinkBudget | None,
) -> SequenceRules:
    """The look-back rules' state for every beam (row ``b * num_beams + k``), from the prompts as prefilled."""
    ids, _ = left_pad(prompts, pad_id, mask.device)
    rows = torch.arange(len(prompts), device=mask.device).repeat_interleave(num_beams)
    return SequenceRules(ids[rows], mask[rows], max_new_tokens, no_repeat_ngram_size, think)


def _select(
    candidates: tuple[list[list[float]], list[list[int]], list[list[int]]],
    num_beams: int,
    stop: set[int],
    last: bool,
    length_norm: float,
    hypotheses: list[Hypotheses],
    beam_tokens: list[list[int]],
) -> tuple[list[int], list[int], list[float]]:
    """One step's choice per prompt from its ``(scores, source beams, tokens)`` candidates, best first: a stop token
    (or any token on the last step) ends a hypothesis (if among the top ``num_beams``), the first ``num_beams``
    others continue. Returns the continuing beams' source rows, tokens and scores."""
    scores, sources, tokens = candidates
    keep_rows: list[int] = []
    keep_tokens: list[int] = []
    keep_scores: list[float] = []
    for b, hyp in enumerate(hypotheses):
        kept = 0
        for rank in range(len(scores[b])):
            source, token = b * num_beams + sources[b][rank], tokens[b][rank]
            if token in stop or last:
                if rank < num_beams and not hyp.full:
                    hyp.add(scores[b][rank] / length_norm, beam_tokens[source] + [token])
            elif kept < num_beams:
                keep_rows.append(source)
                keep_tokens.append(token)
                keep_scores.append(scores[b][rank])
                kept += 1
    return keep_rows, keep_tokens, keep_scores
