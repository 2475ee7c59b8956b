"""The compact Llama: a config dataclass, the model, and the few numbers a training loop asks of it.

Read top to bottom: ``LlamaConfig`` and its presets, then ``RMSNorm`` → ``Attention`` → ``MLP`` →
``Block`` → ``LlamaBackbone`` → ``Llama``. Parameter names are exactly those of Hugging Face's
``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``, …), so ``state_dict()`` loads into
``transformers`` with no renaming (``LlamaConfig.to_hf_config()`` gives its config).

``LlamaConfig`` is the architecture only (what is saved beside the weights); how the model runs is
``ModelOptions``: activation checkpointing, dropout, and where each op runs, ``options.kernels``:
``"triton"`` calls our fused :mod:`zhkernels` (RMSNorm with the
residual add folded in, RoPE, flash attention with GQA and document masking, SwiGLU, and a linear
cross-entropy that never builds the ``[B, T, V]`` logits); ``"torch"`` calls :mod:`zhkernels.reference`,
PyTorch's ``scaled_dot_product_attention`` and ``F.cross_entropy``; ``"auto"`` picks Triton for CUDA
inputs when Triton is installed, decided at every forward call from the input's device.

Generation passes a :class:`~llama.generation.kv_cache.KVCache`: each forward appends its tokens' keys and values and
attends over everything cached (``llama/generation/generate.py`` drives it). Unpadded rows attend through the same op
as training (flash attention on the Triton path); left-padded batches take PyTorch's attention with an
explicit mask, since the flash kernel's only mask besides causal is ``doc_ids``, which needs ``Tq == Tk``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import zhkernels
from zhkernels import _dispatch, reference

from .generation.kv_cache import KVCache
from .rope_scaling import from_hf_rope_scaling, normalize_rope_scaling, rope_tables, to_hf_rope_scaling

KERNEL_CHOICES = ("triton", "torch", "auto")
IGNORE_INDEX = -100
_HAS_TRITON = _dispatch.HAS_TRITON  # triton imported, not merely installed
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class ModelOptions:
    """How a :class:`Llama` runs, as opposed to what it computes (:class:`LlamaConfig`): free to change between
    a save and a resume, never saved with the weights."""

    kernels: str = "auto"  # "triton" | "torch" | "auto" (Triton on CUDA input)
    checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint) to save memory
    dropout: float = 0.0  # on the embeddings and on each sub-layer's output (not on attention probabilities)

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


#: Fields that shape no weight: a run started from another's weights (``--init``) may change them (context
#: extension, a new init scale for weights it does not load).
FREE_ON_INIT = ("max_seq_len", "rope_scaling", "init_std")

#: Fields older checkpoints saved in the model config; they are :class:`ModelOptions` now and are dropped on load.
LEGACY_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(ModelOptions))


@dataclass
class LlamaConfig:
    """The architecture of a :class:`Llama`. ``None`` for ``n_kv_heads`` / ``ffn_dim`` means "derive it"."""

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    vocab_size: int | None = None  # required: the tokenizer's vocabulary size
    ffn_dim: int | None = None  # None = MiniMind's rule, see ffn_hidden_dim
    multiple_of: int = 64  # rounding of the automatic ffn_dim
    norm_eps: float = 1e-5
    max_seq_len: int = 512  # rows of the RoPE table: the longest input the model accepts
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # context extension for inference, see llama/rope_scaling.py
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.vocab_size is None or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int (the tokenizer's size), got {self.vocab_size!r}")
        if min(self.dim, self.n_layers, self.n_heads, self.max_seq_len, self.multiple_of) < 1:
            raise ValueError("dim, n_layers, n_heads, max_seq_len and multiple_of must all be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} (dim / n_heads) must be even for RoPE")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be positive or None (automatic), got {self.ffn_dim}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when it is None."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """``ffn_dim``, or MiniMind's rule: ``int(8 * dim / 3)`` rounded up to ``multiple_of`` (64).

        That is llama2.c's rule too (``int(2 * 4 * dim / 3)``), which rounds to 256 by default; with
        64, dim 512 gives 1408.
        """
        if self.ffn_dim is not None:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A preset from :data:`PRESETS`, with fields replaced by ``overrides`` (``vocab_size`` where it is None)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        if fields.get("vocab_size") is None:
            raise ValueError(f"preset {name!r} takes the tokenizer's vocabulary: pass vocab_size=len(tokenizer)")
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.LlamaConfig`` describing the same network.

        ``max_position_embeddings`` is ``max_seq_len``, except for ``dynamic`` scaling, where Hugging Face
        reads it as the trained length (``original_max_seq_len``). For ``yarn``, transformers 4.4x–4.5x derive
        the factor as ``max_position_embeddings / original_max_position_embeddings``: keep
        ``max_seq_len == factor * original_max_seq_len`` for those versions to agree.
        """
        scaling = self.rope_scaling
        dynamic = scaling is not None and scaling["type"] == "dynamic"
        max_positions = scaling["original_max_seq_len"] if dynamic else self.max_seq_len
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": to_hf_rope_scaling(scaling),
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
        }

    def differences(self, other: "LlamaConfig", ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
        """``(field, ours, theirs)`` for every field that differs from ``other``'s, derived values resolved
        (``n_kv_heads``, ``ffn_dim``; ``multiple_of`` only feeds the latter), except the fields in ``ignore``."""

        def resolved(config: LlamaConfig) -> dict[str, Any]:
            fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignore and k != "multiple_of"}
            return {**fields, "n_kv_heads": config.kv_heads, "ffn_dim": config.ffn_hidden_dim}

        ours, theirs = resolved(self), resolved(other)
        return [(key, value, theirs[key]) for key, value in ours.items() if theirs[key] != value]

    @classmethod
    def from_saved(cls, saved: Any, where: str, **overrides: Any) -> "LlamaConfig":
        """From the ``model`` dict a checkpoint's config.json holds; fields this code does not know are dropped
        with a warning, ``overrides`` replace fields; a one-line ``ValueError`` naming ``where`` otherwise."""
        if not isinstance(saved, dict) or not saved.get("vocab_size"):
            raise ValueError(f"{where} holds no model config: it was not written by llama.training")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - known - set(LEGACY_OPTION_FIELDS))
        if unknown:
            logging.getLogger(__name__).warning(
                "%s: ignoring model fields this code does not know: %s", where, ", ".join(unknown)
            )
        try:
            return cls(**{**{k: v for k, v in saved.items() if k in known}, **overrides})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} describes a model this code cannot build: {e}") from None

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "LlamaConfig":
        """From a ``transformers.LlamaConfig`` (or its dict), transformers 4.x or 5.x; ``overrides`` replace fields."""
        if isinstance(hf_config, dict):
            get = hf_config.get
        else:

            def get(key: str, default: Any = None) -> Any:
                return getattr(hf_config, key, default)

        dim, n_heads = get("hidden_size"), get("num_attention_heads")
        if (get("head_dim") or dim // n_heads) != dim // n_heads:
            raise ValueError(f"head_dim {get('head_dim')} must be hidden_size / num_attention_heads for this Llama")
        if get("attention_bias") or get("mlp_bias") or get("hidden_act", "silu") != "silu":
            raise ValueError("this Llama has no biases and a SiLU MLP; the transformers config asks for others")
        rope = get("rope_parameters") or get("rope_scaling") or {}  # v5 keeps theta inside; v4 beside
        theta = rope.get("rope_theta") or get("rope_theta") or 10000.0
        max_positions = get("max_position_embeddings")
        scaling = from_hf_rope_scaling(rope, max_positions)
        if scaling and scaling["type"] == "dynamic":
            max_positions = int(scaling["original_max_seq_len"] * scaling["factor"])
        fields = dict(
            dim=dim,
            n_layers=get("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads") or n_heads,
            vocab_size=get("vocab_size"),
            ffn_dim=get("intermediate_size"),
            norm_eps=get("rms_norm_eps"),
            max_seq_len=max_positions,
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            init_std=get("initializer_range", 0.02),
        )
        return cls(**{**fields, **overrides})


#: The seeds' own configurations (DESIGN.md, "Model"); ``vocab_size: None`` = the tokenizer's, given at build time.
PRESETS: dict[str, dict[str, Any]] = {
    "seed000-160m": dict(
        dim=896, n_layers=12, n_heads=14, n_kv_heads=2, ffn_dim=2560, vocab_size=10_000, max_seq_len=1024
    ),
    "seed002-120m": dict(dim=512, n_layers=12, n_heads=8, n_kv_heads=8, ffn_dim=2048, vocab_size=None, max_seq_len=512),
    "seed003-92m": dict(dim=768, n_layers=6, n_heads=8, n_kv_heads=8, ffn_dim=1668, vocab_size=35_023, max_seq_len=512),
    # baby-llama2-chinese is llama2.c's model: tied embeddings, ffn rounded to multiple_of=32 (→ 1376)
    "seed004-baby": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=8,
        ffn_dim=None,
        multiple_of=32,
        vocab_size=None,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    # MiniMind2-small: tied embeddings, theta 1e6, ffn 1408
    "minimind-26m": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=None,
        vocab_size=6_400,
        max_seq_len=512,
        rope_theta=1e6,
        tie_embeddings=True,
    ),
    # for CPU runs and tests
    "tiny": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=None, vocab_size=None, max_seq_len=256),
}


@dataclass
class LlamaOutput:
    """``loss`` when labels were given; ``logits [B, T, V]`` unless the fused cross-entropy made them unnecessary;
    ``head`` what a ``head`` callable returned instead of both."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    head: Any = None


def _sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch's attention, causal (aligned to the end when a cache makes Tq < Tk), or under ``mask [B, 1, Tq, Tk]``
    (True = attend): packed rows come with ``docs``, the causal-and-same-document mask of :func:`_sdpa_docs`."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and not _SDPA_HAS_GQA:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    extra = {"enable_gqa": True} if gqa and _SDPA_HAS_GQA else {}
    q_len, k_len = q.shape[2], k.shape[2]
    mask = docs if mask is None else mask
    if mask is None and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    if mask is None and q_len > 1:  # SDPA's is_causal aligns to the start, a cache needs the end
        mask = reference.attention_mask(q_len, k_len, True, None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)


def _sdpa_docs(doc_ids: torch.Tensor) -> torch.Tensor:
    """The causal-and-same-document mask ``[B, 1, T, T]``, built once per forward for every layer."""
    return reference.attention_mask(doc_ids.shape[1], doc_ids.shape[1], True, doc_ids, doc_ids.device)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
    return zhkernels.flash_attention(q, k, v, causal=True, doc_bounds=docs)


@dataclass(frozen=True)
class Ops:
    """The four ops a block needs, from one implementation; ``fused_loss`` says how the loss is computed.

    ``prepare_docs(doc_ids)`` turns a packed batch's document ids, once per forward, into what every layer's
    ``attention(q, k, v, docs)`` reads: the flash kernels' ``[start, end)`` bounds, or SDPA's mask."""

    rms_norm: Callable[..., Any]
    apply_rope: Callable[..., Any]
    attention: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    fused_loss: bool
    prepare_docs: Callable[[torch.Tensor], torch.Tensor]


TRITON_OPS = Ops(
    zhkernels.rms_norm,
    zhkernels.apply_rope,
    _flash_attention,
    zhkernels.swiglu,
    fused_loss=True,
    prepare_docs=reference.doc_bounds,
)
TORCH_OPS = Ops(
    reference.rms_norm,
    reference.apply_rope,
    _sdpa_attention,
    reference.swiglu,
    fused_loss=False,
    prepare_docs=_sdpa_docs,
)


@dataclass
class Context:
    """What every layer of one forward shares: the RoPE tables, the positions, the packed rows' documents
    (``ops.prepare_docs(doc_ids)``, computed once), the ops, and when decoding the KV cache and its mask."""

    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None
    docs: torch.Tensor | None
    ops: Ops
    cache: KVCache | None = None
    cache_mask: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """RMSNorm whose call also adds the residual: ``(norm(x + residual), x + residual)``; residual None → x alone."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
        # Under autocast a sub-layer returns bf16 while the stream stays float32 (as HF's `residual + out`); the
        # norm adds them in float32 and writes its output in the autocast dtype, the one the next matmuls read.
        out_dtype = _dispatch.autocast_dtype(x.device.type)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, out_dtype=out_dtype), x
        return ops.rms_norm(x, self.weight, self.eps, residual, out_dtype=out_dtype)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and grouped-query K/V (``n_kv_heads`` ≤ ``n_heads``), causal."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which slice of a KV cache is this layer's
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ctx.ops.apply_rope(q, k, ctx.cos, ctx.sin, ctx.position_ids)
        if ctx.cache is not None:  # attend over the cached tokens and these
            k, v = ctx.cache.update(self.layer_idx, k, v)
        if ctx.cache_mask is not None:
            out = _sdpa_attention(q, k, v, None, ctx.cache_mask)
        else:
            out = ctx.ops.attention(q, k, v, ctx.docs)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.gate_proj = nn.Linear(config.dim, hidden, bias=False)
        self.up_proj = nn.Linear(config.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """One pre-norm layer. It takes and returns ``(hidden, residual)``: the stream is ``hidden + residual``,
    and the add is left to the next norm, which fuses it (``residual=None`` before the first layer)."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.input_layernorm(hidden, residual, ctx.ops)
        hidden = F.dropout(self.self_attn(normed, ctx), self.dropout, self.training)
        normed, residual = self.post_attention_layernorm(hidden, residual, ctx.ops)
        return F.dropout(self.mlp(normed, ctx.ops), self.dropout, self.training), residual


class RotaryTables(nn.Module):
    """The RoPE cos/sin tables ``[max_seq_len, head_dim]``: float32 non-persistent buffers (never in a state dict)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.rebuild()

    def rebuild(self, device: torch.device | None = None) -> None:
        """(Re)compute the tables, e.g. after ``to_empty()`` or a cast that would have rounded them."""
        c = self.config
        self.cos, self.sin = rope_tables(
            c.max_seq_len, c.head_dim, c.rope_theta, c.rope_scaling, device=device or self.cos.device
        )

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "RotaryTables":
        super()._apply(fn, *args, **kwargs)
        if self.cos.dtype != torch.float32:  # model.half()/.to(bf16): keep float32 tables, rebuilt, not rounded
            self.rebuild(self.cos.device)
        return self

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for an input of ``seq_len`` tokens (dynamic NTK rescales once it passes the trained length)."""
        s = self.config.rope_scaling
        if s is not None and s["type"] == "dynamic" and seq_len > s["original_max_seq_len"]:
            c = self.config
            return rope_tables(seq_len, c.head_dim, c.rope_theta, s, seq_len=seq_len, device=self.cos.device)
        return self.cos, self.sin


class LlamaBackbone(nn.Module):
    """Embedding, the blocks and the final norm: token ids → final hidden states ``[B, T, dim]``."""

    def __init__(self, config: LlamaConfig, options: ModelOptions) -> None:
        super().__init__()
        self.config = config
        self.options = options
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i, options.dropout) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary = RotaryTables(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        ops: Ops,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        past = 0 if cache is None else cache.length
        seq_len = input_ids.shape[1]
        cos, sin = self.rotary(past + seq_len)
        cache_mask = None
        if cache is not None:
            cache_mask = cache.attention_mask(seq_len)
            if position_ids is None:  # the new tokens continue the cached ones
                position_ids = torch.arange(past, past + seq_len, device=input_ids.device)[None]
        hidden = F.dropout(self.embed_tokens(input_ids), self.options.dropout, self.training)
        residual = None
        docs = ops.prepare_docs(doc_ids) if doc_ids is not None else None
        ctx = Context(cos, sin, position_ids, docs, ops, cache, cache_mask)
        for layer in self.layers:
            if self.options.checkpointing and self.training and cache is None:
                hidden, residual = checkpoint(layer, hidden, residual, ctx, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, ctx)
        if cache is not None:
            cache.advance(seq_len)
        return self.norm(hidden, residual, ops)[0]


class Llama(nn.Module):
    """Llama for causal LM: ``Llama(config, options)(input_ids, labels=None, position_ids=None, doc_ids=None,
    cache=None)``; ``options`` (:class:`ModelOptions`: kernels, activation checkpointing, dropout) default to
    Triton on CUDA, no checkpointing, no dropout."""

    def __init__(self, config: LlamaConfig, options: ModelOptions | None = None) -> None:
        super().__init__()
        self.config = config
        self.options = options or ModelOptions()
        self.model = LlamaBackbone(config, self.options)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Weights ~ N(0, init_std), the residual outputs (o_proj, down_proj) ~ N(0, init_std / sqrt(2 * n_layers))
        as in GPT-2 / nanoGPT (each block adds two outputs to the stream), norms = 1; RoPE tables rebuilt."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.config.n_layers) if scaled else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.model.rotary.rebuild()

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` goes through :mod:`kernels` (``"auto"``: CUDA input and Triton installed)."""
        if self.options.kernels == "auto":
            return _HAS_TRITON and x.is_cuda
        return self.options.kernels == "triton"

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> LlamaOutput:
        """``input_ids [B, T]``; ``labels [B, T]`` already shifted (``labels[t]`` is the target after token t,
        -100 ignored); ``position_ids [B, T]`` (default 0..T-1) and ``doc_ids [B, T]`` for packed rows, where
        each token attends only inside its document. The loss is the mean over counted tokens (0 if none).

        ``cache``: attend over its tokens too and append these (positions default to continuing them).
        ``logits_to_keep`` > 0 computes the logits of the last that many tokens only (generation needs one).

        ``head(hidden [B, T, dim], lm_head_weight [V, dim])`` replaces the output layer and the loss: its result
        is returned as ``head``. A loss over ``hidden @ W.T`` computed in chunks (never whole logits) goes
        here, inside ``forward``, so DDP's gradient hooks, FSDP's gathered weights and ``torch.compile`` see it."""
        ops = TRITON_OPS if self.uses_triton(input_ids) else TORCH_OPS
        hidden = self.hidden_states(input_ids, position_ids, doc_ids, cache)
        if head is not None:
            return LlamaOutput(head=head(hidden, self.lm_head.weight))
        if labels is None:
            return LlamaOutput(logits=self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))
        if ops.fused_loss:  # the [B, T, V] logits are never built
            return LlamaOutput(loss=zhkernels.fused_linear_cross_entropy(hidden, self.lm_head.weight, labels))
        logits = self.lm_head(hidden)
        flat = labels.reshape(-1)
        # summed, then divided by the counted tokens: a batch with none gives 0 (as the fused op does), not NaN
        logits32 = logits.float().view(-1, logits.shape[-1])
        loss = F.cross_entropy(logits32, flat, ignore_index=IGNORE_INDEX, reduction="sum")
        return LlamaOutput(loss=loss / (flat != IGNORE_INDEX).sum().clamp(min=1), logits=logits)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final (normed) hidden states ``[B, T, dim]``, what ``lm_head`` (weight ``[vocab, dim]``) maps to
        logits: for losses over ``hidden @ W.T`` that are computed in chunks instead of from whole logits."""
        total = input_ids.shape[1] + (0 if cache is None else cache.length)
        if total > self.config.max_seq_len:
            raise ValueError(
                f"{total} tokens > max_seq_len {self.config.max_seq_len}; cut the input or "
                "raise max_seq_len (with rope_scaling past the trained length)"
            )
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids (packed documents) and a KV cache do not go together; generate one row each")
        ops = TRITON_OPS if self.uses_triton(input_ids) else TORCH_OPS
        return self.model(input_ids, position_ids, doc_ids, ops, cache)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied matrix once. ``exclude_embeddings`` drops the input embedding table; when it is
        tied to lm_head the shared matrix stays counted, as lm_head (a matmul, like nanoGPT counts it)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, PaLM (Chowdhery et al. 2022, appendix B): ``6 * N + 12 * n_layers * dim * T``.

        ``N`` counts every matmul weight (q/k/v/o, gate/up/down, and lm_head) but not the embedding lookup
        or the norms; ``T`` is the attention context (default ``max_seq_len``); the attention term counts
        the full ``T × T`` scores, as PaLM does, though causal masking skips about half of them.
        """
        seq_len = self.config.max_seq_len if seq_len is None else seq_len
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * self.config.n_layers * self.config.dim * seq_len

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on the matrices (dim ≥ 2: projections, embeddings, lm_head), none on norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def extra_repr(self) -> str:
        fields = dataclasses.asdict(self.config)
        return ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
