"""Direct Preference Optimization as an objective of the one loop: TRL's losses over packed preference pairs.

A batch (``engine.dataset.DPODataset``) packs whole pairs into rows with document masking: chosen and rejected
of many pairs share one forward, and ``seq_ids`` names the sequence (``2 * pair slot + side``) every counted
label belongs to. Each sequence's log-probability is the sum over its reply's tokens of
:func:`zhkernels.fused_linear_logprobs` (no ``[tokens, vocab]`` logits), taken inside the model's forward.

With ``x = (log π(chosen) − log π(rejected)) − (log π_ref(chosen) − log π_ref(rejected))`` and β, ε:

- ``sigmoid`` (DPO; ε > 0 is cDPO's label smoothing): ``−(1−ε)·log σ(βx) − ε·log σ(−βx)``
- ``robust`` (rDPO): ``(−(1−ε)·log σ(βx) + ε·log σ(−βx)) / (1 − 2ε)``
- ``ipo``: ``(x − 1/(2β))²`` with every log-prob averaged over its reply's tokens
- ``sigmoid_norm``: ``−log σ(β·(r_c/n_c − r_r/n_r))``, ``r`` a sequence's log-ratio to the reference, ``n`` its
  reply's tokens

and ``sft_weight`` α adds α times the chosen replies' mean token NLL (RPO). The implicit rewards are
``β·(log π − log π_ref)`` per sequence; accuracy is the share of pairs whose chosen reward is the higher (ties
count half, so a policy equal to its reference scores 0.5, and the sigmoid loss starts at ln 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import zhkernels
from zhkernels import reference

from .objectives import IGNORE_INDEX, Metrics, uses_triton

LOSS_TYPES = ("sigmoid", "robust", "ipo", "sigmoid_norm")
#: The metrics a DPO step and a validation report, besides the loss.
REPORTED = ("accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected")


@dataclass(frozen=True)
class DPOSettings:
    """β, the loss type, label smoothing ε (``sigmoid``/``robust``) and the weight of the chosen replies' NLL."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not (self.beta > 0 and self.beta < float("inf")):
            raise ValueError(f"--beta must be a finite number > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"--label-smoothing applies to the sigmoid and robust losses, not {self.loss_type}")
        if not (self.sft_weight >= 0 and self.sft_weight < float("inf")):
            raise ValueError(f"--sft-weight must be a finite number >= 0, got {self.sft_weight}")


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probs, reply tokens)``, both fp32 ``[pairs, 2]`` (chosen, rejected): each sequence's summed
    log-probability of its reply under ``model``, from one forward over the packed rows."""
    labels, seq_ids = batch["labels"], batch["seq_ids"]
    head = TokenLogps(labels, fused=uses_triton(model, batch["input_ids"]))
    token_logps = model(
        batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"], head=head
    ).head
    counted = seq_ids >= 0
    index = torch.where(counted, seq_ids, 0).flatten()  # uncounted positions add 0 to sequence 0: no host sync
    n_sequences = 2 * batch["pair_index"].shape[0]
    zeros = torch.zeros(n_sequences, dtype=torch.float32, device=token_logps.device)
    logps = zeros.index_add(0, index, torch.where(counted, token_logps, 0.0).flatten())
    counts = zeros.index_add(0, index, counted.flatten().float())
    return logps.view(-1, 2), counts.view(-1, 2)


class TokenLogps:
    """The model's head: every position's log-prob of its label (0 where the label is -100), ``[B, T]`` fp32, of
    the softmax at ``temperature``; ``fused``: the Triton kernel (the model runs its kernels), else its
    plain-PyTorch definition."""

    def __init__(self, labels: torch.Tensor, fused: bool, temperature: float = 1.0) -> None:
        self.labels, self.fused, self.temperature = labels, fused, temperature

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logprobs = zhkernels.fused_linear_logprobs if self.fused else reference.fused_linear_logprobs
        return logprobs(hidden, weight, self.labels, ignore_index=IGNORE_INDEX, temperature=self.temperature)


def preference_losses(
    policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, settings: DPOSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses [P], rewards [P, 2])`` of pairs whose sequences have log-probs ``policy`` and ``reference`` and
    reply lengths ``counts`` (all ``[P, 2]``, chosen first); see the module docstring for each loss."""
    beta, eps = settings.beta, settings.label_smoothing
    if settings.loss_type == "ipo":  # IPO compares mean token log-probs
        policy, reference = policy / counts.clamp(min=1), reference / counts.clamp(min=1)
    ratios = policy - reference
    if settings.loss_type == "sigmoid_norm":
        scores = ratios / counts.clamp(min=1)
        losses = -F.logsigmoid(beta * (scores[:, 0] - scores[:, 1]))
    else:
        x = ratios[:, 0] - ratios[:, 1]
        if settings.loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * x) - eps * F.logsigmoid(-beta * x)
        elif settings.loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * x) + eps * F.logsigmoid(-beta * x)) / (1 - 2 * eps)
        else:
            losses = (x - 1 / (2 * beta)) ** 2
    return losses, beta * ratios.detach()


class ReferenceLogps(Protocol):
    """Where a pair's reference log-probs come from: a cache computed before training, or a model run now."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], validation: bool) -> torch.Tensor: ...


class DPO:
    """The DPO objective: ``reference(model, batch, validation)`` gives the reference log-probs ``[P, 2]``
    (:mod:`llama.training.reference`: a cache computed before training, or a model run now)."""

    name = "dpo"
    perplexity = False  # the loss is a preference loss: its exp means nothing

    def __init__(self, settings: DPOSettings, reference: ReferenceLogps) -> None:
        self.settings, self.reference = settings, reference

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        return self._loss(model, batch, validation=False)

    def _loss(self, model: nn.Module, batch: dict[str, torch.Tensor], validation: bool) -> tuple[torch.Tensor, Metrics]:
        policy, counts = sequence_logps(model, batch)
        reference = self.reference(model, batch, validation).to(policy.device, torch.float32)
        losses, rewards = preference_losses(policy, reference, counts, self.settings)
        loss = losses.mean()
        if self.settings.sft_weight:
            loss = loss - self.settings.sft_weight * policy[:, 0].sum() / counts[:, 0].sum().clamp(min=1)
        return loss, pair_metrics(policy.detach(), rewards)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def validate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Metrics:
        results = [self._loss(model, batch, validation=True) for batch in batches]
        metrics = {"loss": torch.stack([loss.float() for loss, _ in results]).mean()}
        for key in REPORTED:
            metrics[key] = torch.stack([m[key] for _, m in results]).mean()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def pair_metrics(policy: torch.Tensor, rewards: torch.Tensor) -> Metrics:
    """Pairwise accuracy (ties count half), reward margin, mean rewards and log-probs of chosen and rejected."""
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {
        "accuracy": wins.mean(),
        "margin": (chosen - rejected).mean(),
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "logps_chosen": policy[:, 0].mean(),
        "logps_rejected": policy[:, 1].mean(),
    }
