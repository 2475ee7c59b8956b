"""Plain sampling from a :class:`~llama.model.Llama` (temperature and top-k), enough to see what a model learned.

The full generator (KV cache, top-p, beam search, streaming) is ``llama.generate``; this one recomputes
the whole prefix for every new token, which is fine for the quick start's small model and short texts.
"""

from __future__ import annotations

import torch

from .model import Llama


@torch.no_grad()
def sample(
    model: Llama, prompt_ids: list[int], max_new_tokens: int = 48, temperature: float = 0.8, top_k: int = 40,
    eos_id: int | None = None, min_new_tokens: int = 0, seed: int = 0,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` sampled tokens; returns the new ids.

    Stops at ``eos_id``, which cannot be drawn before ``min_new_tokens`` tokens (a barely trained model
    ends most texts at once).
    """
    if not prompt_ids:
        raise ValueError("sample: the prompt is empty; give at least one token")
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    context = model.config.max_seq_len
    ids = torch.tensor([prompt_ids[-context:]], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:]).logits[0, -1].float() / temperature
        if eos_id is not None and len(new) < min_new_tokens:
            logits[eos_id] = float("-inf")
        if top_k and top_k < logits.numel():
            threshold = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        if token == eos_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    model.train(was_training)
    return new
