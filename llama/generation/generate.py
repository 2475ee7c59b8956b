"""Generate with a KV cache: greedy, sampling, beam search; repetition penalty, n-gram ban, think-token budget.

``generate(model, prompts, max_new_tokens, ...)`` takes token ids, ``generate_text(model, tokenizer, texts, ...)``
takes strings and stops at EOS or ``<|im_end|>``. One prefill forward writes every prompt's keys and values
into a preallocated :class:`~llama.generation.kv_cache.KVCache`; each decode step then feeds one token per row.
Prompts of different lengths are padded on the left so that they end together; their rows attend through
PyTorch's attention with a padding mask, while unpadded batches (one prompt, or equal lengths) go through
the model's own attention op, flash attention on the Triton path (prefill and decode alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from engine.chat_template import IM_END

from ..model import Llama
from .beam_search import beam_search
from .constraints import THINK_CLOSE, THINK_OPEN, SequenceRules, ThinkBudget
from .kv_cache import KVCache
from .sampling import (
    GenerationResult,
    SamplingOptions,
    Stopwatch,
    fit_prompts,
    hold_back,
    left_pad,
    next_tokens,
    per_second,
    prompt_positions,
    tokens_seen,
)

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer


#: ``stream(batch_index, token)``: called for every generated token, in order, as it is chosen.
StreamCallback = Callable[[int, int], None]


@torch.no_grad()
def generate(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    max_think_tokens: int | None = None,
    think_ids: tuple[int, int] | None = None,
    do_sample: bool = False,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
    pad_id: int = 0,
    stream: StreamCallback | None = None,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Continue each prompt by up to ``max_new_tokens`` tokens; a row stops at any of ``eos_ids``, which cannot
    be chosen before ``min_new_tokens`` tokens (a barely trained model ends most texts at once).

    ``do_sample=False`` is greedy (``temperature``/``top_k``/``top_p`` then do nothing, as in Hugging Face);
    ``num_beams`` > 1 is beam search (deterministic, length-normalised by ``length_penalty``, done when
    ``num_beams`` hypotheses have finished; see :mod:`llama.generation.beam_search`). ``pad_id`` fills the left padding
    and finished rows; any id works, it is never attended to. A prompt longer than ``max_seq_len -
    max_new_tokens`` is cut from the left, with one warning. ``seed`` makes sampling reproducible.
    ``vocab_limit`` forbids ids at or above it (a model whose vocabulary is padded past its tokenizer's).

    ``no_repeat_ngram_size=N`` bans any token that would complete an N-gram the row already holds, prompt included
    (Hugging Face's rule). ``max_think_tokens=K`` forces ``</think>`` once K tokens were generated inside an open
    ``<think>`` block (the prompt may end inside one); ``think_ids`` are the ids of ``(<think>, </think>)``
    (:func:`think_token_ids`). See :mod:`llama.generation.constraints`.
    """
    options = SamplingOptions(
        do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, max_think_tokens
    )
    if num_beams < 1:
        raise ValueError(f"generate: num_beams must be ≥ 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("generate: beam search here is deterministic; use do_sample=False with num_beams > 1")
    if max_think_tokens is not None and think_ids is None:
        raise ValueError("generate: max_think_tokens needs think_ids=(<think> id, </think> id); see think_token_ids")
    budget = None if max_think_tokens is None else ThinkBudget(*think_ids, max_think_tokens)
    prompts = fit_prompts(prompts, max_new_tokens, model.config.max_seq_len)
    was_training, base = model.training, model
    model.eval()
    if vocab_limit and vocab_limit < model.config.vocab_size:
        model = _VocabLimited(model, vocab_limit)
    try:
        if num_beams > 1:
            return beam_search(
                model,
                prompts,
                max_new_tokens,
                num_beams,
                length_penalty=length_penalty,
                repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                think=budget,
                eos_ids=eos_ids,
                min_new_tokens=min_new_tokens,
                pad_id=pad_id,
                stream=stream,
            )
        stopping = _Stopping(tuple(eos_ids), min_new_tokens, pad_id)
        return _sample(model, prompts, max_new_tokens, options, budget, stopping, stream, seed)
    finally:
        base.train(was_training)


class _VocabLimited:
    """The model seen through a vocabulary cap: logits of ids ≥ ``limit`` are -inf, so they are never chosen."""

    def __init__(self, model: Llama, limit: int) -> None:
        self.model, self.limit, self.config = model, limit, model.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        out.logits[..., self.limit :] = float("-inf")
        return out

    def parameters(self) -> Any:
        return self.model.parameters()


@dataclass(frozen=True)
class _Stopping:
    """What ends a row (``eos_ids``, not before ``min_new_tokens``) and what finished rows are fed."""

    eos_ids: tuple[int, ...]
    min_new_tokens: int
    pad_id: int


def _sample(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    options: SamplingOptions,
    think: ThinkBudget | None,
    stopping: _Stopping,
    stream: StreamCallback | None,
    seed: int,
) -> GenerationResult:
    """Greedy or sampled decoding of every row at once; finished rows ride along on ``pad_id`` until all stop."""
    device = next(model.parameters()).device
    pad_id = stopping.pad_id
    ids, mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = ids.shape
    lengths = mask.sum(dim=1)
    cache = KVCache.for_model(model, batch, prompt_len + max_new_tokens)
    if not all(len(p) == prompt_len for p in prompts):
        cache.mask_padding(mask)
    penalize = options.repetition_penalty != 1.0
    seen = tokens_seen(ids, mask, model.config.vocab_size) if penalize else None
    rules = SequenceRules(ids, mask, max_new_tokens, options.no_repeat_ngram_size, think)
    generator = torch.Generator(device=device).manual_seed(seed) if options.do_sample else None
    stop = set(stopping.eos_ids)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    finished = [False] * batch
    finished_mask = torch.zeros(batch, dtype=torch.bool, device=device)
    sequences: list[list[int]] = [[] for _ in range(batch)]
    clock = Stopwatch(device)
    prefill_s, decode_tokens = 0.0, 0

    logits = model(ids, position_ids=prompt_positions(mask), cache=cache, logits_to_keep=1).logits[:, -1]
    # Invariant: `logits` predict step `step` for every row; finished rows are fed pad_id and their output ignored.
    for step in range(max_new_tokens):
        logits = logits.float() if step >= stopping.min_new_tokens else hold_back(logits.float(), stop_ids)
        logits = rules.apply(logits) if rules.active else logits
        token = next_tokens(logits, seen, options, generator).masked_fill(finished_mask, pad_id)
        chosen = token.tolist()
        if step == 0:
            prefill_s = clock.lap()
        for row, tok in enumerate(chosen):
            if finished[row]:
                continue
            sequences[row].append(tok)
            decode_tokens += 1 if step else 0
            finished[row] = tok in stop
            if stream is not None:
                stream(row, tok)
        if step + 1 == max_new_tokens or all(finished):
            break
        finished_mask |= torch.isin(token, stop_ids)
        if seen is not None:
            seen[rows, token] = True
        rules.append(token)
        positions = (lengths + step)[:, None]
        logits = model(token[:, None], position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]
    decode_s = clock.lap()
    return GenerationResult(
        sequences, finished, per_second(int(lengths.sum()), prefill_s), per_second(decode_tokens, decode_s)
    )


def stop_token_ids(tokenizer: "Tokenizer") -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's EOS and, when it has one, the chat template's ``<|im_end|>``."""
    im_end = tokenizer.token_to_id(IM_END)
    return (tokenizer.eos_id,) if im_end is None or im_end == tokenizer.eos_id else (tokenizer.eos_id, im_end)


def think_token_ids(tokenizer: "Tokenizer") -> tuple[int, int] | None:
    """The ids of ``(<think>, </think>)`` in ``tokenizer``, or None when it lacks either (no reasoning markers)."""
    open_id, close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
    return None if open_id is None or close_id is None else (open_id, close_id)


def require_think_ids(tokenizer: "Tokenizer", max_think_tokens: int | None) -> tuple[int, int] | None:
    """:func:`think_token_ids` when a think budget is asked for (a one-line ValueError when the tokenizer has none),
    else None."""
    if max_think_tokens is None:
        return None
    ids = think_token_ids(tokenizer)
    if ids is None:
        raise ValueError(
            f"--max-think-tokens needs {THINK_OPEN} and {THINK_CLOSE} tokens, and tokenizer "
            f"{getattr(tokenizer, 'path', '')} lacks them: drop --max-think-tokens"
        )
    return ids


def generate_text(
    model: Llama, tokenizer: "Tokenizer", prompts: list[str], max_new_tokens: int = 128, **options: Any
) -> GenerationResult:
    """:func:`generate` on texts: encodes them, stops at EOS or ``<|im_end|>``, fills ``texts`` with the replies.

    ``options`` are :func:`generate`'s keywords (``eos_ids``, ``pad_id`` and ``think_ids`` default to the
    tokenizer's).
    """
    eos_ids = tuple(options.pop("eos_ids", stop_token_ids(tokenizer)))
    pad_id = options.pop("pad_id", tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id)
    options.setdefault("vocab_limit", getattr(tokenizer, "vocab_size", None))  # ids past it could not be decoded
    if options.get("think_ids") is None:
        options["think_ids"] = require_think_ids(tokenizer, options.get("max_think_tokens"))
    ids = [tokenizer.encode(text) for text in prompts]
    result = generate(model, ids, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, **options)
    result.texts = [tokenizer.decode(seq[:-1] if done else seq) for seq, done in zip(result.sequences, result.finished)]
    return result
