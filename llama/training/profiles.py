"""Hardware profiles: pick precision, micro-batch, activation checkpointing and accumulation so a run fits.

``plan(profile, model_config, seq_len)`` estimates the training memory of each candidate micro-batch
(``estimate_memory_gib``) and keeps the largest that fits the profile's card; without checkpointing
when that still leaves at least ``MIN_TOKENS_PER_MICRO_BATCH`` tokens per micro-batch (recomputing costs
about a third more compute), else with it. Accumulation then reaches the profile's tokens per step.

The estimate counts what this model keeps for backward with our fused kernels (fp32 weights, grads and
AdamW moments; fp32 residual stream; 16-bit activations; the chunked cross-entropy's buffers) plus a
fragmentation margin. It is an estimate: on the GPU the loop's own out-of-memory message says what
to change when it is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from zhkernels.cross_entropy import default_chunk_size, padded_vocab, stored_grad_dtype

from ..model import LlamaConfig
from ..precision import DTYPES, best_precision
from .runtime import GIB

#: Below this many tokens per micro-batch, activation checkpointing (bigger micro-batches) wins.
MIN_TOKENS_PER_MICRO_BATCH = 8192
MICRO_BATCHES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1)
FRAGMENTATION = 1.15  # the caching allocator's slack over what is live
CUDA_CONTEXT_GIB = 0.6  # the CUDA context and cuBLAS workspaces, outside PyTorch's allocator


class ProfileError(ValueError):
    """The profile cannot fit the run (one line, with what would)."""


@dataclass(frozen=True)
class Profile:
    name: str
    memory_gib: float | None  # the card's memory; None = no limit (CPU)
    precision: str  # fp32 | fp16 | bf16
    tokens_per_step: int  # target tokens per optimizer step (reached by accumulation)
    default_preset: str
    default_steps: int
    default_seq_len: int | None = None  # None = the model's context
    max_micro_batch: int = 128


PROFILES: dict[str, Profile] = {
    # A 6 GB RTX 3060: fp16 with loss scaling (the design card's choice), checkpointing when it must.
    "3060-6gb": Profile("3060-6gb", 6.0, "fp16", 65_536, "seed004-baby", 5000),
    "4090-24gb": Profile("4090-24gb", 24.0, "bf16", 131_072, "seed004-baby", 5000),
    # CPU: a small model and short rows so the quick start trains in minutes.
    "cpu": Profile("cpu", None, "fp32", 2048, "tiny", 300, default_seq_len=256, max_micro_batch=8),
}


def auto_profile() -> Profile:
    """The profile for this machine: ``cpu`` without CUDA, else one sized to the GPU's memory."""
    if not torch.cuda.is_available():
        return PROFILES["cpu"]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    memory = props.total_memory / GIB
    precision = best_precision(torch.device("cuda"))
    base = PROFILES["3060-6gb"] if memory <= 8 else PROFILES["4090-24gb"]
    return dataclasses.replace(
        base, name=f"auto ({props.name}, {memory:.0f} GiB)", memory_gib=memory, precision=precision
    )


def get_profile(name: str) -> Profile:
    if name == "auto":
        return auto_profile()
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; choose one of auto, {', '.join(PROFILES)}")
    return PROFILES[name]


def estimate_memory_gib(
    config: LlamaConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool
) -> float:
    """Estimated peak training memory (GiB) of one rank: weights, optimizer, activations, loss buffers."""
    n_params = sum(_param_counts(config))
    act = 4 if precision == "fp32" else 2
    tokens = micro_batch * seq_len
    dim, kv_dim, ffn = config.dim, config.kv_heads * config.head_dim, config.ffn_hidden_dim
    static = 16 * n_params + (0 if precision == "fp32" else act * n_params)  # + autocast's weight copies
    # Per token and layer, what backward needs: fp32 residual into each norm, the norms' outputs, q/k/v
    # after RoPE, the attention output, gate/up and their product (the flash kernel keeps no scores).
    per_layer = 8 * dim + act * (4 * dim + 2 * kv_dim + 3 * ffn) + 4 * config.n_heads
    if checkpointing:  # each block keeps only its inputs; one block's activations live during recompute
        activations = tokens * (config.n_layers * (4 * dim + act * dim) + per_layer)
    else:
        activations = tokens * config.n_layers * per_layer
    vocab = config.vocab_size
    chunk = min(tokens, default_chunk_size(tokens, vocab, dim))  # the fused cross-entropy's token chunk
    low = DTYPES.get(precision, torch.float32)
    grad = stored_grad_dtype(low).itemsize  # fp16: the fused CE keeps its gradients in fp32 until backward
    loss = tokens * (4 * dim + act * dim + grad * dim) + chunk * padded_vocab(vocab) * act + vocab * dim * (4 + act)
    return (static + activations + loss) * FRAGMENTATION / GIB


def _param_counts(config: LlamaConfig) -> tuple[int, int]:
    """(embedding + head, blocks): counted from the config, tied weights once."""
    dim, kv_dim, ffn = config.dim, config.kv_heads * config.head_dim, config.ffn_hidden_dim
    per_block = dim * (2 * dim + 2 * kv_dim) + 3 * dim * ffn + 2 * dim
    embeddings = config.vocab_size * dim * (1 if config.tie_embeddings else 2) + dim
    return embeddings, config.n_layers * per_block


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    precision: str
    estimated_gib: float | None
    planned: Plan | None = None  # the profile's own plan, when the command line changed some of it

    def describe(self, seq_len: int) -> str:
        """The values this plan uses, each one the command line changed followed by the profile's."""
        planned = self.planned or self

        def note(used: object, profile: object) -> str:
            return "" if used == profile else f" (overrides the profile's {profile})"

        on_off = {True: "on", False: "off"}
        memory = f", ~{self.estimated_gib:.1f} GiB estimated" if self.estimated_gib is not None else ""
        return (
            f"micro-batch {self.micro_batch}{note(self.micro_batch, planned.micro_batch)} x {seq_len} tokens, "
            f"accumulation {self.grad_accum}{note(self.grad_accum, planned.grad_accum)}, "
            f"{self.precision}{note(self.precision, planned.precision)}, activation checkpointing "
            f"{on_off[self.checkpointing]}{note(on_off[self.checkpointing], on_off[planned.checkpointing])}{memory}"
        )


def used_plan(planned: Plan, values: dict, config: LlamaConfig, profile: Profile) -> Plan:
    """The plan of the TrainConfig ``values`` a run will use (``planned`` when it kept the profile's), its memory
    estimated again for them."""
    micro, accum = values["batch_size"], values["grad_accum"]
    checkpointing, precision = bool(values["activation_checkpointing"]), values["precision"]
    if Plan(micro, accum, checkpointing, precision, planned.estimated_gib) == planned:
        return planned
    estimate = None
    if profile.memory_gib is not None:
        estimate = estimate_memory_gib(config, micro, values["seq_len"], precision, checkpointing)
    return Plan(micro, accum, checkpointing, precision, estimate, planned=planned)


def plan(profile: Profile, config: LlamaConfig, seq_len: int) -> Plan:
    """The largest micro-batch that fits the profile's card, checkpointing only when it pays; see the module doc."""
    candidates = [b for b in MICRO_BATCHES if b <= profile.max_micro_batch]
    if profile.memory_gib is None:
        micro = candidates[0]
        return Plan(
            micro, max(1, math.ceil(profile.tokens_per_step / (micro * seq_len))), False, profile.precision, None
        )
    budget = profile.memory_gib - CUDA_CONTEXT_GIB
    chosen: tuple[int, bool, float] | None = None
    for checkpointing in (False, True):
        for micro in candidates:
            need = estimate_memory_gib(config, micro, seq_len, profile.precision, checkpointing)
            if need <= budget:
                if chosen is None or micro > chosen[0]:
                    chosen = (micro, checkpointing, need)
                break
        if chosen is not None and chosen[0] * seq_len >= MIN_TOKENS_PER_MICRO_BATCH:
            break
    if chosen is None:
        smallest = estimate_memory_gib(config, 1, seq_len, profile.precision, True)
        raise ProfileError(
            f"profile {profile.name} cannot fit this model at --seq-len {seq_len}: even micro-batch 1 with activation "
            f"checkpointing needs ~{smallest:.1f} GiB of {budget:.1f} usable; try --seq-len {max(1, seq_len // 2)}, "
            "a smaller --preset (e.g. seed004-baby), or --profile 4090-24gb"
        )
    micro, checkpointing, need = chosen
    accum = max(1, math.ceil(profile.tokens_per_step / (micro * seq_len)))
    return Plan(micro, accum, checkpointing, profile.precision, need)
