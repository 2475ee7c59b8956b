"""Sampling from a :class:`~llama.model.Llama` (temperature and top-k), enough to see what a model learned.

A one-prompt shortcut to :func:`llama.generation.generate.generate` (KV cache, top-p, beam search, streaming), which
the quick start uses.
"""

from __future__ import annotations

from ..model import Llama
from .generate import generate


def sample(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_k: int = 40,
    eos_id: int | None = None,
    min_new_tokens: int = 0,
    seed: int = 0,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` sampled tokens; returns the new ids, EOS left out.

    Stops at ``eos_id``, which cannot be drawn before ``min_new_tokens`` tokens (a barely trained model
    ends most texts at once). A prompt too long for the context keeps its last tokens.
    """
    if not prompt_ids:
        raise ValueError("sample: the prompt is empty; give at least one token")
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    result = generate(
        model,
        [list(prompt_ids)],
        max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        eos_ids=() if eos_id is None else (eos_id,),
        min_new_tokens=min_new_tokens,
        seed=seed,
    )
    new = result.sequences[0]
    return new[:-1] if result.finished[0] else new
