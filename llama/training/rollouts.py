"""GRPO's batch source: rollouts sampled from the policy being trained, scored, and cut into micro-batches.

Each optimizer step reads ``batch_size × grad_accum`` sequences, P prompts × G completions (G = ``group_size``).
At the step's first micro-batch the source takes the next P prompts of its shuffled order, samples G completions of
each with the KV-cache generation (:func:`llama.generation.generate.generate`: batched, temperature / top-p /
top-k, stopping at EOS or ``<|im_end|>``) from the policy in eval mode under the run's autocast, decodes and scores
them (:mod:`llama.rewards`), computes the group advantages and loss weights (:mod:`llama.training.grpo`) and,
when asked, the log-probs of the sampling policy (μ > 1 updates per rollout) and of the reference (β > 0) without
gradients. The step's micro-batches are then slices of it, right-padded: ``input_ids`` (prompt + completion),
``labels`` (the completion's next tokens, -100 elsewhere), ``weights``, ``advantages`` and the rollout's figures.

Exact resume: the prompt order is a seeded permutation per epoch, and rollout number k samples with the seed
``(seed, rank, k)``; the counters are the source's ``state_dict`` (saved in every checkpoint), and a rollout still
due for more updates (μ > 1) is saved whole. So a resumed run samples what the uninterrupted one would have.
Ranks (torchrun) take every world_size-th prompt.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..lora import adapters_disabled
from .grpo import ROLLOUT_STATS, GRPOSettings, completion_logps, group_advantages, loss_weights
from .objectives import IGNORE_INDEX, place_frozen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt: where it came from, its text as given (the rewards see it), its rendered tokens, its record."""

    line: int
    text: str
    ids: list[int]
    example: Mapping[str, Any]


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: at most ``max_new_tokens``, the softmax at ``temperature``, top-p / top-k."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class PromptFiles:
    """What the loop records of a run's data (the shape of :class:`engine.format.PackedFiles` it reads): the
    prompts file, the tokenizer it was encoded with, prompt and token counts."""

    prefix: Path
    meta: dict[str, Any]
    n_docs: int
    n_tokens: int
    vocab_size: int
    kind: str = "prompts"

    @property
    def paths(self) -> Any:
        return self  # check_init names ``files.paths.prefix``


#: ``scorer(prompt, completion_text, example) -> (total, {name: value})``: :func:`llama.rewards.score` bound to the
#: run's rewards.
Scorer = Callable[[str, str, Mapping[str, Any]], tuple[float, dict[str, float]]]


@dataclass
class Policy:
    """What the source needs of the run (:meth:`RolloutSource.bind`): the model it samples (unwrapped), its
    precision and the micro-batches per step."""

    model: nn.Module
    autocast: Any
    grad_accum: int


class RolloutSource:
    """The batch source of a GRPO run (see the module docstring); ``bind`` must be called before ``next_batch``."""

    def __init__(
        self,
        prompts: Sequence[Prompt],
        files: PromptFiles,
        settings: GRPOSettings,
        replies: "Replies",
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        kl: bool = False,
        reference: nn.Module | None = None,
    ) -> None:
        self.prompts = list(prompts)[rank::world_size]
        if not self.prompts:
            raise ValueError(f"{files.prefix}: rank {rank} of {world_size} has no prompt; give more prompts than ranks")
        self.files, self.settings, self.replies = files, settings, replies
        self.seed, self.rank = seed, rank
        self.kl, self.reference = kl, reference  # β > 0: the reference model, None = the policy's adapters off
        if reference is not None:
            reference.requires_grad_(False).eval()
        self.samples_per_epoch = len(self.prompts) * settings.group_size
        self.policy: Policy | None = None
        self.epoch, self.position, self.rollouts = 0, 0, 0  # the prompt order's place, rollouts sampled
        self.rollout: dict[str, torch.Tensor] | None = None
        self.cursor, self.passes = 0, 0  # rows of the current pass read, passes over the rollout done

    def bind(self, run: Any) -> None:
        """Sample from ``run``'s model (:class:`llama.training.run.Run`), in its precision; setup calls it."""
        if run.sharded:
            raise ValueError("GRPO samples from the whole model on each rank: use --parallel ddp, not fsdp")
        self.policy = Policy(run.model, run.autocast, run.cfg.grad_accum)

    # ------------------------------------------------------------ batches

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The next ``batch_size`` rows of the current rollout; a new rollout when the last one is used up."""
        if self.policy is None:
            raise RuntimeError("RolloutSource.bind(policy) must be called before next_batch")
        size = batch_size * self.policy.grad_accum
        if size % self.settings.group_size:
            raise ValueError(
                f"a step of {batch_size} x {self.policy.grad_accum} sequences is not whole groups of "
                f"--group-size {self.settings.group_size}: make --batch-size x --grad-accum a multiple of it"
            )
        if self.rollout is None:
            self.rollout = self._sample(size // self.settings.group_size, batch_size)
            self.cursor, self.passes = 0, 0
        rows = slice(self.cursor, self.cursor + batch_size)
        batch = _micro_batch(self.rollout, rows, reused=self.passes > 0)
        self.cursor += batch_size
        if self.cursor >= self.rollout["input_ids"].shape[0]:
            self.cursor, self.passes = 0, self.passes + 1
            if self.passes >= self.settings.iterations:
                self.rollout = None
        return batch

    def _next_prompts(self, count: int) -> list[Prompt]:
        """The next ``count`` prompts of the seeded order, reshuffled every epoch."""
        chosen: list[Prompt] = []
        while len(chosen) < count:
            order = np.random.default_rng([self.seed, self.rank, self.epoch]).permutation(len(self.prompts))
            take = order[self.position : self.position + count - len(chosen)]
            chosen += [self.prompts[i] for i in take]
            self.position += len(take)
            if self.position >= len(self.prompts):
                self.epoch, self.position = self.epoch + 1, 0
        return chosen

    @torch.no_grad()
    def _sample(self, n_prompts: int, batch_size: int) -> dict[str, torch.Tensor]:
        """One rollout: sample, score, advantages, weights and the log-probs asked for (see the module docstring)."""
        policy, group = self.policy, self.settings.group_size
        prompts = self._next_prompts(n_prompts)
        seed = _rollout_seed(self.seed, self.rank, self.rollouts)
        with policy.autocast or nullcontext():
            replies = self.replies(policy.model, prompts, group, seed=seed)
        self.rollouts += 1
        rollout = _pack(prompts, replies.completions, self.replies.pad_id)
        rollout["reward_total"], rollout["rewards"] = replies.totals, replies.values
        rollout["advantages"] = group_advantages(replies.totals, group, self.settings.scale_rewards)
        rollout["weights"] = loss_weights(rollout["labels"] != IGNORE_INDEX, self.settings.loss_type, policy.grad_accum)
        rollout["stats"] = _rollout_stats(replies, group)
        rollout["reward_fn_std"] = replies.values.std(dim=0, unbiased=False).expand_as(replies.values).clone()
        self._add_logps(rollout, batch_size)
        return rollout

    def _add_logps(self, rollout: dict[str, torch.Tensor], batch_size: int) -> None:
        """The sampling policy's log-probs (μ > 1) and the reference's (β > 0), in micro-batches, no gradients."""
        policy, device = self.policy, _device(self.policy.model)
        wanted = {"old_logps": self.settings.iterations > 1, "ref_logps": self.kl}
        for key in [k for k, on in wanted.items() if on]:
            model, adapters_off = policy.model, key == "ref_logps" and self.reference is None
            parts = []
            with policy.autocast or nullcontext():
                if key == "ref_logps" and self.reference is not None:
                    model = place_frozen(self.reference, device)  # the run's precision, moved once
                for start in range(0, rollout["input_ids"].shape[0], batch_size):
                    rows = {k: rollout[k][start : start + batch_size].to(device) for k in ("input_ids", "labels")}
                    parts.append(_logps(model, rows, self.settings.temperature, adapters_off))
            rollout[key] = torch.cat(parts).cpu()

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "position": self.position, "rollouts": self.rollouts}
        if self.rollout is not None:  # μ > 1 and updates left, or saved mid-step (an interrupted run)
            state.update(rollout=self.rollout, cursor=self.cursor, passes=self.passes)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.rollouts = int(state["epoch"]), int(state["position"]), int(state["rollouts"])
        self.rollout = state.get("rollout")
        self.cursor, self.passes = int(state.get("cursor", 0)), int(state.get("passes", 0))


def _rollout_seed(seed: int, rank: int, index: int) -> int:
    """The sampling seed of rollout ``index`` on ``rank``: a function of the counters a checkpoint holds."""
    return int(np.random.default_rng([seed, rank, index, 0x6770]).integers(2**62))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pack(prompts: list[Prompt], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """The rollout's sequences right-padded [N, L]: ids, labels on the completion tokens, lengths."""
    group = len(completions) // len(prompts)
    rows = [prompts[i // group].ids + c for i, c in enumerate(completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, completion) in enumerate(zip(rows, completions)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        start = len(row) - len(completion)  # labels[t] = ids[t + 1] for the completion's tokens
        if completion:
            labels[i, start - 1 : len(row) - 1] = torch.tensor(completion, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    completion_len = torch.tensor([len(c) for c in completions], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "lengths": lengths, "completion_len": completion_len}


def _rollout_stats(replies: "Scored", group: int) -> torch.Tensor:
    """The rollout's figures (:data:`ROLLOUT_STATS`), one row repeated per sequence [N, S]."""
    totals = replies.totals
    groups = totals.view(-1, group)
    figures = {
        "reward_std": float(totals.std(unbiased=False)),
        "zero_std_groups": float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
        "truncated": 1.0 - sum(replies.finished) / len(replies.finished),
        "gen_s": replies.seconds,
        "gen_tokens_per_s": sum(len(c) for c in replies.completions) / max(replies.seconds, 1e-9),
    }
    row = torch.tensor([figures[name] for name in ROLLOUT_STATS], dtype=torch.float32)
    return row.expand(totals.shape[0], -1).clone()


def _micro_batch(rollout: dict[str, torch.Tensor], rows: slice, reused: bool) -> dict[str, torch.Tensor]:
    """Rows of the rollout, cut to their longest sequence; a reused rollout reports no generation time."""
    batch = {key: value[rows] for key, value in rollout.items()}
    width = int(batch["lengths"].max())
    for key in ("input_ids", "labels", "weights", "old_logps", "ref_logps"):
        if key in batch:
            batch[key] = batch[key][:, :width].contiguous()
    if reused:
        batch["stats"] = batch["stats"].clone()
        for name in ("gen_s", "gen_tokens_per_s"):
            batch["stats"][:, ROLLOUT_STATS.index(name)] = 0.0
    return batch


def _logps(model: nn.Module, rows: dict[str, torch.Tensor], temperature: float, adapters_off: bool) -> torch.Tensor:
    """Log-probs of ``rows``' labels under ``model`` in eval mode (under LoRA ``adapters_off``: its base)."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model) if adapters_off else nullcontext():
            return completion_logps(model, rows, temperature).float()
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- sampling and scoring, shared with validation


@dataclass
class Scored:
    """Completions of a batch of prompts (new ids, the stop token included when one ended them), whether a stop
    token did, each one's weighted reward [N] and each function's value [N, F], and the sampling's seconds."""

    completions: list[list[int]]
    finished: list[bool]
    totals: torch.Tensor
    values: torch.Tensor
    seconds: float


@dataclass
class Replies:
    """Samples completions with the KV-cache generation and scores them: ``scorer`` (:func:`llama.rewards.score`
    bound to the run's rewards, named ``reward_names``) reads each decoded completion without its stop token."""

    sampling: Sampling
    scorer: Scorer
    reward_names: tuple[str, ...]
    decode: Callable[[list[int]], str]
    stop_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, prompts: Sequence[Prompt], copies: int, seed: int = 0, greedy: bool = False
    ) -> Scored:
        """``copies`` completions of each prompt, in prompt order (sampled with ``seed``; ``greedy``: argmax)."""
        from ..generation.generate import generate  # generation imports the model; keep this module light

        started = time.perf_counter()
        result = generate(
            model,
            [p.ids for p in prompts for _ in range(copies)],
            self.sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k,
            eos_ids=self.stop_ids,
            pad_id=self.pad_id,
            seed=seed,
            vocab_limit=self.vocab_size,
        )
        seconds = time.perf_counter() - started
        totals, values = [], []
        for i, (ids, done) in enumerate(zip(result.sequences, result.finished)):
            prompt = prompts[i // copies]
            total, by_name = self.scorer(prompt.text, self.decode(ids[:-1] if done else ids), prompt.example)
            totals.append(total)
            values.append([by_name[name] for name in self.reward_names])
        return Scored(
            result.sequences,
            result.finished,
            torch.tensor(totals, dtype=torch.float32),
            torch.tensor(values, dtype=torch.float32).reshape(len(totals), len(self.reward_names)),
            seconds,
        )


class PromptIndices:
    """The validation "dataset": batches of prompt indices (``prompt_index``), in order; what
    :class:`GreedyReward` answers at every evaluation."""

    def __init__(self, prompts: Sequence[Prompt], files: PromptFiles) -> None:
        self.prompts, self.files, self.position = list(prompts), files, 0
        self.samples_per_epoch = len(self.prompts)

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        indices = [(self.position + i) % len(self.prompts) for i in range(batch_size)]
        self.position = (self.position + batch_size) % len(self.prompts)
        return {"prompt_index": torch.tensor(indices, dtype=torch.long)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GreedyReward:
    """Validation: the greedy reply to each validation prompt, scored; its mean reward, each function's mean and
    the completions' mean length (0-d tensors)."""

    def __init__(self, prompts: Sequence[Prompt], replies: Replies) -> None:
        self.prompts, self.replies = list(prompts), replies

    def __call__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        indices = sorted({int(i) for b in batches for i in b["prompt_index"].tolist()})
        scored = self.replies(_unwrap(model), [self.prompts[i] for i in indices], 1, greedy=True)
        metrics = {"reward": scored.totals.mean()}
        metrics.update(
            {f"reward/{name}": scored.values[:, i].mean() for i, name in enumerate(self.replies.reward_names)}
        )
        metrics["completion_len"] = torch.tensor([len(c) for c in scored.completions], dtype=torch.float32).mean()
        return metrics


def _unwrap(model: nn.Module) -> nn.Module:
    """The Llama inside torch.compile's wrapper (generation calls it with a KV cache)."""
    return getattr(model, "_orig_mod", model)
