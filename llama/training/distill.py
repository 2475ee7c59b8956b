"""Knowledge distillation as an objective of the one loop: a student learns a teacher's next-token distributions.

With the student's and the teacher's logits s and t (float32) over the counted tokens (SFT: the assistant
tokens), temperature T and weight α::

    loss = (1 − α)·CE(s, labels) + α·T²·D(t, s; T)

D is ``forward`` KL(teacher‖student) (default), ``reverse`` KL(student‖teacher) or ``jsd``, the generalised
Jensen-Shannon divergence β·KL(t‖m) + (1−β)·KL(s‖m), m = β·t + (1−β)·s (TRL's GKD convention); its plain-PyTorch
spec is :func:`zhkernels.reference.distill_loss`. Teacher and student share the tokenizer and nothing else.

Neither way holds ``[tokens, vocab]`` logits for all tokens. When the student runs its Triton kernels (CUDA) the
loss is :func:`zhkernels.fused_distill_loss`: chunks of tokens whose two logit blocks one Triton kernel per row
reduces, and whose student-logit gradient it writes in place in the backward pass (no host sync). Otherwise
:func:`chunked_distill_loss`: the counted tokens go through in chunks, each chunk's logits of both models made,
reduced and dropped, and recomputed in the backward pass (``torch.utils.checkpoint``). The teacher runs without
gradients, in the run's precision (the loop's autocast), and its hidden states alone leave its forward.

From a teacher cache (``--teacher-top-k K``, :mod:`llama.training.teacher_cache`) the teacher is not run: each counted
token brings the teacher's K largest log-probs at temperature T and their ids, and D is the forward KL over those K
ids (:func:`topk_forward_kl`, the usual way to distil from sparse teacher logits)::

    p̂_k = exp(ℓ_k) / Σ_j exp(ℓ_j)                (the teacher's top-K probabilities, renormalised to sum to 1)
    D   = Σ_k p̂_k · (log p̂_k − log q(id_k))      (q = softmax(s / T) over the student's whole vocabulary)

With K = the vocabulary this is the forward KL exactly; with a smaller K it ignores the teacher's tail and the
student's mass outside the K ids (q is not renormalised, so pushing mass onto the K ids lowers D).
:func:`chunked_topk_distill_loss` computes it in chunks, like :func:`chunked_distill_loss`. Reverse KL and JSD need
the teacher's whole distribution and are refused with a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import zhkernels
from zhkernels.reference import DIVERGENCES, token_divergence

from .objectives import IGNORE_INDEX, Metrics, place_frozen, uses_triton

#: Rows of fp32 logits one chunk may hold per model (64 MiB at most for either at vocabularies ≥ 16,384).
CHUNK_LOGITS = 2**24
MAX_CHUNK_TOKENS = 4096
#: The batch keys of a teacher cache's rows: ``[counted tokens, K]`` ids (int32) and log-probs (fp16).
TOPK_IDS, TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"
TOPK_DIVERGENCE_REFUSAL = (
    "--divergence {} needs the teacher's whole distribution, which --teacher-top-k keeps only the top K of: use "
    "--divergence forward with --teacher-top-k, or drop --teacher-top-k to run the teacher during training"
)


@dataclass(frozen=True)
class DistillSettings:
    """α (the divergence's share of the loss), the temperature T, the divergence and JSD's β."""

    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward"
    jsd_beta: float = 0.5

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1] (the divergence's share of the loss), got {self.alpha}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise ValueError(
                f"--jsd-beta must be in (0, 1) (0 and 1 are --divergence forward/reverse), got {self.jsd_beta}"
            )

    @property
    def metric(self) -> str:
        """What the divergence is reported as: ``kl`` (forward, reverse) or ``jsd``."""
        return "jsd" if self.divergence == "jsd" else "kl"


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: as many as keep one model's fp32 chunk logits within :data:`CHUNK_LOGITS` values."""
    return max(1, min(MAX_CHUNK_TOKENS, CHUNK_LOGITS // max(1, vocab_size)))


def _chunk_sums(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kind: str,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and T²-scaled divergence of one chunk of counted tokens, logits in float32 (autocast off)."""
    with torch.autocast(s_hidden.device.type, enabled=False):
        s_logits = s_hidden.float() @ s_weight.float().T
        t_logits = t_hidden.float() @ t_weight.float().T
        ce = torch.logsumexp(s_logits, -1) - s_logits.gather(1, labels[:, None]).squeeze(1)
        div = token_divergence(s_logits / temperature, t_logits / temperature, kind, beta)
        return ce.sum(), div.sum() * temperature**2


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    settings: DistillSettings,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`zhkernels.reference.distill_loss` in chunks of counted tokens, ``(loss, ce, divergence)`` fp32 0-d;
    each chunk is checkpointed, so backward recomputes its logits instead of keeping them. The teacher's inputs
    carry no gradient."""
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # the counted tokens (one host sync per micro-batch)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
    targets, t_weight = flat.index_select(0, rows), teacher_weight.detach()
    step = chunk_size or chunk_tokens(student_weight.shape[0])
    ce = div = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for start in range(0, rows.numel(), step):
        part = slice(start, start + step)
        args = (s_hidden[part], student_weight, t_hidden[part], t_weight, targets[part])
        extra = (settings.temperature, settings.divergence, settings.jsd_beta)
        ce_sum, div_sum = checkpoint(_chunk_sums, *args, *extra, use_reentrant=False)
        ce, div = ce + ce_sum, div + div_sum
    n = max(1, rows.numel())
    ce, div = ce / n, div / n
    return (1 - settings.alpha) * ce + settings.alpha * div, ce, div


def topk_forward_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-token forward KL from the teacher's top-K (the spec): ``student_logits [N, V]`` (the student's, before
    the temperature), ``teacher_ids [N, K]`` and ``teacher_logprobs [N, K]`` (the teacher's log-softmax at
    temperature T at those ids) → ``[N]`` float32 ``Σ_k p̂_k (log p̂_k − log q_{id_k})``, p̂ the K probabilities
    renormalised, q the student's softmax at temperature T over the whole vocabulary (see the module doc)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, -1).gather(1, teacher_ids.long())
    log_p = torch.log_softmax(teacher_logprobs.float(), -1)  # ℓ − logsumexp(ℓ): renormalised over the K ids
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def topk_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distillation from the teacher's top-K, plain PyTorch (whole logits): ``(loss, ce, kl)`` fp32 0-d, ``loss =
    (1−α)·ce + α·T²·kl``, means over the counted tokens (labels != -100). ``teacher_ids``/``teacher_logprobs`` are
    ``[counted tokens, K]``, one row per counted token in row-major order of ``labels``."""
    flat = labels.reshape(-1)
    counted = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    s_logits = student_hidden.reshape(-1, student_hidden.shape[-1]).float()[counted] @ student_weight.float().T
    ce = torch.logsumexp(s_logits, -1) - s_logits.gather(1, flat[counted][:, None]).squeeze(1)
    kl = topk_forward_kl(s_logits, teacher_ids, teacher_logprobs, temperature) * temperature**2
    n = max(1, counted.numel())
    ce, kl = ce.sum() / n, kl.sum() / n
    return (1 - alpha) * ce + alpha * kl, ce, kl


def _topk_chunk_sums(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and T²-scaled top-K forward KL of one chunk of counted tokens, logits in float32 (autocast off)."""
    with torch.autocast(s_hidden.device.type, enabled=False):
        s_logits = s_hidden.float() @ s_weight.float().T
        ce = torch.logsumexp(s_logits, -1) - s_logits.gather(1, labels[:, None]).squeeze(1)
        kl = topk_forward_kl(s_logits, teacher_ids, teacher_logprobs, temperature)
        return ce.sum(), kl.sum() * temperature**2


def chunked_topk_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    settings: DistillSettings,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_distill_loss` in checkpointed chunks of counted tokens (never whole logits), ``(loss, ce, kl)``."""
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # the counted tokens (one host sync per micro-batch)
    if teacher_ids.shape[0] != rows.numel():
        raise ValueError(
            f"the batch carries the teacher's top-K of {teacher_ids.shape[0]} tokens but counts {rows.numel()}: the "
            "teacher cache does not belong to this data; delete it to compute it again"
        )
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    targets = flat.index_select(0, rows)
    step = chunk_size or chunk_tokens(student_weight.shape[0])
    ce = kl = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for start in range(0, rows.numel(), step):
        part = slice(start, start + step)
        args = (s_hidden[part], student_weight, teacher_ids[part], teacher_logprobs[part], targets[part])
        ce_sum, kl_sum = checkpoint(_topk_chunk_sums, *args, settings.temperature, use_reentrant=False)
        ce, kl = ce + ce_sum, kl + kl_sum
    n = max(1, rows.numel())
    ce, kl = ce / n, kl / n
    return (1 - settings.alpha) * ce + settings.alpha * kl, ce, kl


class Teacher:
    """The teacher: a frozen model in eval mode, moved to the batch's device (in the run's precision) on first use,
    whose final hidden states and ``lm_head`` weight the loss reads (without gradients)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.requires_grad_(False).eval()

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        place_frozen(self.model, batch["input_ids"].device)  # the run's precision (the loop's autocast)
        with torch.no_grad():
            hidden = self.model.hidden_states(
                batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids")
            )
        return hidden, self.model.lm_head.weight


class _DistillHead:
    """The student's head: the distillation loss of its hidden states and ``lm_head`` weight against the teacher's,
    ``(loss, ce, divergence)``; ``fused`` (the model runs its kernels): :func:`zhkernels.fused_distill_loss` (no host
    sync, one Triton kernel per row), else :func:`chunked_distill_loss`."""

    def __init__(
        self, teacher: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, settings: DistillSettings, fused: bool
    ) -> None:
        self.teacher, self.labels, self.settings, self.fused = teacher, labels, settings, fused

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t_hidden, t_weight = self.teacher
        if not self.fused:
            return chunked_distill_loss(hidden, weight, t_hidden, t_weight, self.labels, self.settings)
        s = self.settings
        return zhkernels.fused_distill_loss(
            hidden,
            weight,
            t_hidden,
            t_weight,
            self.labels,
            alpha=s.alpha,
            temperature=s.temperature,
            kind=s.divergence,
            beta=s.jsd_beta,
            ignore_index=IGNORE_INDEX,
        )


class _TopKHead:
    """The student's head against a teacher cache: the chunked top-K distillation loss of its hidden states and
    ``lm_head`` weight, the teacher's top-K of the batch's counted tokens taken from the batch."""

    def __init__(self, batch: dict[str, torch.Tensor], settings: DistillSettings) -> None:
        self.batch, self.settings = batch, settings

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, logprobs = self.batch[TOPK_IDS], self.batch[TOPK_LOGPROBS]
        return chunked_topk_distill_loss(hidden, weight, ids, logprobs, self.batch["labels"], self.settings)


class Distill:
    """The distillation objective (the loss counts the labels that are not -100: SFT's assistant tokens, every token
    of a pretraining corpus). With ``teacher=None`` the teacher's top-K comes in the batches (a teacher cache, see
    :mod:`llama.training.teacher_cache`) and only forward KL is possible. Stateless."""

    name = "distill"

    def __init__(self, settings: DistillSettings, teacher: Teacher | None) -> None:
        if teacher is None and settings.divergence != "forward":
            raise ValueError(TOPK_DIVERGENCE_REFUSAL.format(settings.divergence))
        self.settings, self.teacher = settings, teacher
        self.perplexity = settings.alpha == 0  # α = 0 is the plain next-token loss: its exp is a perplexity

    def terms(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, ce, divergence)`` of one batch: the teacher's forward (or its cached top-K), then the student's
        with the loss head."""
        if self.teacher is None:
            head: _DistillHead | _TopKHead = _TopKHead(batch, self.settings)
        else:
            fused = uses_triton(model, batch["input_ids"])
            head = _DistillHead(self.teacher(batch), batch["labels"], self.settings, fused)
        return model(
            batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"), head=head
        ).head

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        loss, ce, div = self.terms(model, batch)
        return loss, {"ce": ce.detach(), self.settings.metric: div.detach()}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def validate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Metrics:
        results = [self.terms(model, batch) for batch in batches]
        names = ("loss", "ce", self.settings.metric)
        return {name: torch.stack([r[i].float() for r in results]).mean() for i, name in enumerate(names)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
