"""What a task brings to the one training loop (:mod:`llama.training`): its loss, and what validation reports.

An objective is any object with these members (:class:`Objective` spells them out):

- ``name``: the task's name, saved in every checkpoint (``config.json``'s ``objective``);
- ``loss(model, batch) -> (loss, metrics)``: the mean loss of one micro-batch (a 0-d tensor to backpropagate)
  and named 0-d metric tensors; the loop averages both over micro-batches and ranks and reads them back once
  per step, with the loss, so a metric never adds a GPU→CPU sync;
- ``tokens(batch) -> int``: how many tokens the batch counts, from shapes only (no sync): the loop's ``tokens``
  counter and tokens/s add it up (times the ranks; ``--tokens`` budgets still count ``batch x seq_len``);
- ``validate(model, batches) -> metrics``: what evaluation reports, named 0-d tensors averaged over ranks by the
  loop (called in eval mode, under ``torch.no_grad`` and the run's autocast); ``"loss"`` becomes ``val_loss``
  and ``val_ppl`` in the metrics log;
- ``state_dict()`` / ``load_state_dict(state)``: its own state, saved with every checkpoint and restored on
  resume (``{}`` when it has none);
- optionally ``perplexity = False`` when its loss is not a next-token loss (no ``val_ppl`` is derived from it).

The model can hand its final hidden states and ``lm_head`` weight to a ``head`` instead of computing logits
(``model(ids, head=fn).head``, inside the forward, so DDP, FSDP and ``torch.compile`` see it): a loss over
``hidden @ W.T`` is then chunked the way :func:`zhkernels.fused_linear_cross_entropy` is, never building
``[tokens, vocab]`` logits. Objectives receive the model as the loop runs it (possibly wrapped), so they call
it rather than its submodules.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

Metrics = dict[str, torch.Tensor]
IGNORE_INDEX = -100


class Objective(Protocol):
    name: str

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int: ...

    def validate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Metrics: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's mean next-token loss on one batch (labels already shifted by the dataset, -100 ignored)."""
    return model(
        batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids")
    ).loss


class NextToken:
    """Next-token cross-entropy on ``labels``; validation reports the mean loss. Stateless."""

    name = "next-token"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        return lm_loss(model, batch), {}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def validate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Metrics:
        return {"loss": torch.stack([lm_loss(model, b).float() for b in batches]).mean()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Pretrain(NextToken):
    """Pretraining: every position of the packed windows is a target."""

    name = "pretrain"


class SFT(NextToken):
    """Supervised fine-tuning: the loss counts the assistant tokens only (the dataset sets the rest to -100);
    ``supervised`` logs their share of the batch's positions."""

    name = "sft"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        labels = batch["labels"]
        return lm_loss(model, batch), {"supervised": (labels != IGNORE_INDEX).float().mean()}
