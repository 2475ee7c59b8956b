"""GRPO (group relative policy optimisation) as an objective of the one loop: the policy-gradient loss over rollouts.

A rollout (:mod:`llama.training.rollouts`, the run's batch source) samples G completions for each prompt and scores
each with the reward functions (:mod:`llama.rewards`). A completion's advantage is its reward against its group's::

    A = (r − mean_group(r)) / (std_group(r) + eps)        (``scale_rewards=False``: r − mean_group(r), Dr. GRPO)

and every completion token t contributes, with ρ = π(t) / π_old(t) its probability ratio to the policy that sampled
it (at the sampling temperature)::

    −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3,    k3 = exp(ref − logp) − (ref − logp) − 1

(k3: Schulman's unbiased, positive estimator of KL(π‖π_ref); β = 0 by default, no reference model). ``token``
normalisation (DAPO) divides the sum over every completion token of the step by their count, so long completions
weigh by their length; ``sequence`` (the original GRPO) averages each completion's tokens first, then the
completions. The source puts the normalisation into each batch as per-token ``weights`` (summing to the step's
``grad_accum`` over its micro-batches, which the loop divides by), so either is exact however the step is split.

With one update per rollout (``iterations`` 1) π_old is the policy itself (ρ = 1, detached), as in TRL; with
μ > 1 updates the source keeps the sampling policy's log-probs and the clip bounds how far the policy moves.
:func:`policy_loss` is the plain definition, per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .dpo import TokenLogps
from .objectives import IGNORE_INDEX, Metrics, uses_triton

LOSS_TYPES = ("token", "sequence")
#: Per-rollout figures a batch carries (one column each, the same on every row); the objective logs them.
ROLLOUT_STATS = ("reward_std", "zero_std_groups", "truncated", "gen_s", "gen_tokens_per_s")


@dataclass(frozen=True)
class GRPOSettings:
    """What a GRPO step optimises: group size G, the clip range [1 − ε, 1 + ε_high], the KL weight β, the
    normalisation, reward scaling, updates per rollout μ and the sampling temperature the log-probs use."""

    group_size: int = 8
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    loss_type: str = "token"
    scale_rewards: bool = True
    iterations: int = 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"--group-size must be at least 2 (completions are compared), got {self.group_size}")
        if not 0 < self.epsilon < 1 or not self.epsilon_high > 0:
            raise ValueError(f"--epsilon must be in (0, 1), --epsilon-high > 0: {self.epsilon}, {self.epsilon_high}")
        if not (self.beta >= 0 and self.beta < float("inf")):
            raise ValueError(f"--beta must be a finite number >= 0 (0: no reference model), got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.iterations < 1:
            raise ValueError(f"--iterations must be at least 1 (updates per rollout), got {self.iterations}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """``(r − group mean) / (group std + eps)`` (``scale=False``: without the division) of ``rewards`` [N], whose
    consecutive runs of ``group_size`` are one prompt's completions; the std is the unbiased one, as in TRL."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def loss_weights(completion_mask: torch.Tensor, loss_type: str, accum: int) -> torch.Tensor:
    """Per-token weights of a whole rollout [N, L] (0 outside completions) whose sum is ``accum``: each completion
    token ``accum / all completion tokens`` (``token``), or ``accum / (N · its completion's tokens)``
    (``sequence``)."""
    mask = completion_mask.float()
    if loss_type == "token":
        return mask * accum / mask.sum().clamp(min=1)
    per_row = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask * accum / (per_row * mask.shape[0])


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    settings: GRPOSettings,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token ``[B, L]``: the clipped surrogate loss plus β·k3, whether the clip was active, and k3 (None without
    a reference). ``advantages`` [B] is broadcast over each row's tokens."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - settings.epsilon, 1 + settings.epsilon_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    clip_active = ((ratio < 1 - settings.epsilon) & (adv < 0)) | ((ratio > 1 + settings.epsilon_high) & (adv > 0))
    k3 = None
    if ref_logps is not None:
        delta = ref_logps - logps
        k3 = torch.exp(delta) - delta - 1
        loss = loss + settings.beta * k3
    return loss, clip_active, k3


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Every position's log-prob of its label at ``temperature`` (0 off the completions), fp32 ``[B, L]``, from one
    forward whose head never builds ``[tokens, vocab]`` logits."""
    head = TokenLogps(batch["labels"], fused=uses_triton(model, batch["input_ids"]), temperature=temperature)
    return model(batch["input_ids"], head=head).head


class GRPO:
    """The GRPO objective over rollout batches (see the module docstring). Stateless; ``reward_names`` name the
    columns of a batch's ``rewards``; ``validator(model, batches) -> metrics`` is what validation reports
    (:class:`llama.training.rollouts.GreedyReward`: the greedy replies' rewards)."""

    name = "grpo"
    perplexity = False  # a policy-gradient loss: its exp means nothing

    def __init__(
        self,
        settings: GRPOSettings,
        reward_names: Sequence[str],
        validator: Callable[[nn.Module, list[dict[str, torch.Tensor]]], Metrics] | None = None,
    ) -> None:
        self.settings, self.reward_names, self.validator = settings, tuple(reward_names), validator

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        logps = completion_logps(model, batch, self.settings.temperature)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        per_token, clip_active, k3 = policy_loss(logps, old, batch["advantages"], self.settings, batch.get("ref_logps"))
        weights, mask = batch["weights"], (batch["labels"] != IGNORE_INDEX).float()
        n = mask.sum().clamp(min=1)
        metrics = {"clip_ratio": (clip_active.float() * mask).sum() / n, **self._rollout_metrics(batch)}
        if k3 is not None:
            metrics["kl"] = (k3.detach() * mask).sum() / n
        return (per_token * weights).sum(), metrics

    def _rollout_metrics(self, batch: dict[str, torch.Tensor]) -> Metrics:
        """What the batch carries about its rollout: the reward and each function's mean and std, completion
        length, the rollout figures (:data:`ROLLOUT_STATS`)."""
        rewards, totals = batch["rewards"].float(), batch["reward_total"].float()
        metrics = {"reward": totals.mean(), "completion_len": batch["completion_len"].float().mean()}
        stats = batch["stats"].float().mean(dim=0)
        metrics.update({name: stats[i] for i, name in enumerate(ROLLOUT_STATS)})
        for i, name in enumerate(self.reward_names):
            metrics[f"reward/{name}"] = rewards[:, i].mean()
            metrics[f"reward_std/{name}"] = batch["reward_fn_std"].float()[:, i].mean()
        return metrics

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["lengths"].sum())  # a CPU tensor when the loop counts: no device sync

    def validate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Metrics:
        if self.validator is None:
            raise ValueError("GRPO validation needs prompts to answer: give --val-prompts")
        return self.validator(model, batches)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
