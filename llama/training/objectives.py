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

from typing import Any, Protocol, Sequence

import torch
from torch import nn

import zhkernels
from zhkernels import reference

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
    ``supervised`` logs their share of the batch's positions.

    ``tag_weight`` W (``--think-tag-weight``, MiniMind's 10 for small models that otherwise skip the format): a
    label whose target is one of ``tag_ids`` (``<think>``, ``</think>``…) counts W times in the mean, and
    ``tag_loss`` logs those targets' own mean loss (per micro-batch; 0 for one without any); W = 1 is the plain
    loss, computed as before. Validation reports the plain mean (comparable across weights) and, when ``tag_ids``
    are given, ``tag_loss`` over all its tag targets.
    """

    name = "sft"

    def __init__(self, tag_ids: Sequence[int] = (), tag_weight: float = 1.0) -> None:
        if not (tag_weight > 0 and tag_weight < float("inf")):
            raise ValueError(f"--think-tag-weight must be a finite number above 0, got {tag_weight}")
        if tag_weight != 1 and not tag_ids:
            raise ValueError("--think-tag-weight needs the tag token ids it weights")
        self.tag_ids, self.tag_weight = tuple(tag_ids), float(tag_weight)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        metrics = {"supervised": (batch["labels"] != IGNORE_INDEX).float().mean()}
        if self.tag_weight == 1:
            return lm_loss(model, batch), metrics
        sums = tag_loss_sums(model, batch, self.tag_ids)
        return sums.weighted_mean(self.tag_weight), {**metrics, "tag_loss": sums.tag_mean().detach()}

    def validate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Metrics:
        if not self.tag_ids:
            return super().validate(model, batches)
        parts = [tag_loss_sums(model, b, self.tag_ids) for b in batches]
        tags = sum(p.tags for p in parts) / torch.stack([p.n_tags for p in parts]).sum().clamp(min=1)
        return {"loss": torch.stack([p.mean() for p in parts]).mean(), "tag_loss": tags}


class LossSums:
    """Summed cross-entropy of a batch over all its labels (``all``) and over its tag labels (``tags``), with the
    counts of each: fp32 0-d tensors."""

    def __init__(self, total: torch.Tensor, tags: torch.Tensor, n_all: torch.Tensor, n_tags: torch.Tensor) -> None:
        self.all, self.tags, self.n_all, self.n_tags = total, tags, n_all, n_tags

    def mean(self) -> torch.Tensor:
        return self.all / self.n_all.clamp(min=1)

    def tag_mean(self) -> torch.Tensor:
        return self.tags / self.n_tags.clamp(min=1)

    def weighted_mean(self, weight: float) -> torch.Tensor:
        """The mean with each tag label counted ``weight`` times: (Σ + (W−1)·Σ_tags) / (n + (W−1)·n_tags)."""
        count = self.n_all + (weight - 1) * self.n_tags
        return (self.all + (weight - 1) * self.tags) / torch.where(count > 0, count, torch.ones_like(count))


def tag_loss_sums(model: nn.Module, batch: dict[str, torch.Tensor], tag_ids: Sequence[int]) -> LossSums:
    """:class:`LossSums` of one batch, from one forward: the head takes the model's hidden states and sums the
    cross-entropy over all labels and over the tag labels only (see :class:`_SummedCrossEntropy`)."""
    labels = batch["labels"]
    ids = torch.tensor(tag_ids, dtype=labels.dtype, device=labels.device)
    tag_labels = torch.where(torch.isin(labels, ids), labels, IGNORE_INDEX)
    head = _SummedCrossEntropy(labels, tag_labels, fused=uses_triton(model, batch["input_ids"]))
    total, tags = model(
        batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"), head=head
    ).head
    n_all, n_tags = ((t != IGNORE_INDEX).sum().float() for t in (labels, tag_labels))
    return LossSums(total, tags, n_all, n_tags)


class _SummedCrossEntropy:
    """The model's head: the summed cross-entropy of ``hidden @ weight.T`` over ``labels`` and over ``tag_labels``
    (fp32 0-d). ``fused`` (the model runs its kernels): the chunked kernel once per label tensor, never whole logits;
    else the plain-PyTorch definition, whose logits are built once for both sums."""

    def __init__(self, labels: torch.Tensor, tag_labels: torch.Tensor, fused: bool) -> None:
        self.labels, self.tag_labels, self.fused = labels, tag_labels, fused

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            total, tags = (
                zhkernels.fused_linear_cross_entropy(hidden, weight, t, IGNORE_INDEX, "sum")
                for t in (self.labels, self.tag_labels)
            )
            return total, tags
        per_token = reference.fused_linear_cross_entropy(hidden, weight, self.labels, IGNORE_INDEX, "none")
        return per_token.sum(), torch.where(self.tag_labels != IGNORE_INDEX, per_token, 0.0).sum()


def place_frozen(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen model an objective runs beside the trained one (DPO's reference, a distillation teacher) on
    ``device``, its weights in ``dtype`` (default: the autocast dtype active there, the run's fp16/bf16: half the
    memory of fp32 copies, the matmuls autocast would run anyway); moved and cast once."""
    if dtype is None and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    weight = next(model.parameters())
    if weight.device != device or (dtype is not None and weight.dtype != dtype):
        model.to(device=device, dtype=dtype or weight.dtype)
    return model


def uses_triton(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the Llama inside ``model`` (maybe DDP-wrapped or compiled) runs the Triton kernels on this input."""
    while not hasattr(model, "uses_triton"):
        model = getattr(model, "module", None) or model._orig_mod  # DDP's, then torch.compile's wrapper
    return model.uses_triton(input_ids)
