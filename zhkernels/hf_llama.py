"""``patch_hf_llama(model)``: swap our fused ops into a Hugging Face ``LlamaForCausalLM``, in place.

Like Liger-Kernel's ``apply_liger_kernel_to_llama``, but per instance: only the model you pass is
changed (its modules' ``forward`` methods are replaced), never the ``transformers`` classes or module
globals, so an unpatched model in the same process keeps its behaviour. What gets swapped:

- every ``LlamaRMSNorm`` → :func:`zhkernels.rms_norm`
- every ``LlamaMLP`` with a SiLU activation → :func:`zhkernels.swiglu` between its projections
- every ``LlamaAttention`` → :func:`zhkernels.apply_rope` + :func:`zhkernels.flash_attention` (GQA without
  repeating K/V). Calls that carry an explicit mask (padding, a static cache) or need dropout or
  attention weights go to the model's own attention, which handles any mask.
- ``LlamaForCausalLM.forward`` with ``labels`` → :func:`zhkernels.fused_linear_cross_entropy` on the
  final hidden states, so the ``[tokens, vocab]`` logits are never built (``logits`` is then None);
  without labels the original forward runs and returns logits.

The loss follows ``transformers``' causal-LM loss: labels shifted left by one, ``-100`` ignored, mean
over counted tokens, or a sum divided by ``num_items_in_batch`` when the Trainer passes it.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cross_entropy import fused_linear_cross_entropy
from .flash_attention import flash_attention
from .rms_norm import rms_norm as fused_rms_norm
from .rope import apply_rope
from .swiglu import swiglu as fused_swiglu

logger = logging.getLogger(__name__)

_SILU = ("silu", "swish")


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return fused_rms_norm(hidden_states, self.weight, eps)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(
    self: nn.Module, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
    *args: Any, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Hugging Face LlamaAttention's computation with our RoPE and flash attention (mask-free calls only)."""
    dropout = self.attention_dropout if self.training else 0.0
    if attention_mask is not None or dropout > 0 or kwargs.get("output_attentions") or position_embeddings is None:
        return self._zhllm_original_forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    cache = args[0] if args else kwargs.get("past_key_values", kwargs.get("past_key_value"))
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rope(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})
    doc_ids = None
    position_ids = kwargs.get("position_ids")
    if self._zhllm_doc_mask and position_ids is not None and k.shape[-2] == q.shape[-2]:
        # Packed rows: a new document starts wherever the position restarts at 0 (flash-attention-2's convention).
        doc_ids = torch.cumsum((position_ids == 0).to(torch.int32), dim=-1).expand(q.shape[0], -1)
    out = flash_attention(q, k, v, causal=True, doc_ids=doc_ids, scale=self.scaling)
    out = out.transpose(1, 2).reshape(*input_shape, -1)
    return self.o_proj(out), None


def _causal_lm_forward(self: nn.Module, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """LlamaForCausalLM.forward; with labels, the loss comes from the fused linear cross-entropy and logits is None."""
    if labels is None:
        return self._zhllm_original_forward(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(*args, **kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if num_items_in_batch is None:
        loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, shift_labels, reduction="mean")
    else:
        loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, shift_labels, reduction="sum")
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
    return CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
    )


def _swap_forward(module: nn.Module, new_forward: Any) -> None:
    if not hasattr(module, "_zhllm_original_forward"):
        module._zhllm_original_forward = module.forward
    module.forward = types.MethodType(new_forward, module)


def patch_hf_llama(
    model: nn.Module, *, rms_norm: bool = True, rope_and_attention: bool = True, swiglu: bool = True,
    cross_entropy: bool = True, doc_mask_from_position_ids: bool = False,
) -> nn.Module:
    """Swap our fused ops into a ``transformers`` Llama (``LlamaForCausalLM`` or ``LlamaModel``) in place; returns it.

    ``doc_mask_from_position_ids=True`` treats positions restarting at 0 as document starts in packed
    rows (as flash-attention-2 does in ``transformers``); the default matches the SDPA model, which ignores them.
    Patching twice is harmless.
    """
    counts = {"rms_norm": 0, "mlp": 0, "attention": 0, "cross_entropy": 0}
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name.endswith("RMSNorm") and hasattr(module, "weight"):
            _swap_forward(module, _rms_norm_forward)
            counts["rms_norm"] += 1
        elif swiglu and name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            act = getattr(getattr(module, "config", None), "hidden_act", "silu")
            if act in _SILU:
                _swap_forward(module, _mlp_forward)
                counts["mlp"] += 1
            else:
                logger.warning("%s uses activation %r, not SiLU: its MLP is left as it is", name, act)
        elif rope_and_attention and name.endswith("Attention") and all(
            hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        ):
            _swap_forward(module, _attention_forward)
            module._zhllm_doc_mask = doc_mask_from_position_ids
            counts["attention"] += 1
    if cross_entropy and hasattr(model, "lm_head") and hasattr(model, "model"):
        if getattr(model.lm_head, "bias", None) is not None:
            logger.warning("lm_head has a bias: the fused linear cross-entropy is not applied")
        else:
            _swap_forward(model, _causal_lm_forward)
            counts["cross_entropy"] = 1
    if not any(counts.values()):
        raise ValueError(f"patch_hf_llama found no Llama modules in {type(model).__name__}; pass a transformers Llama model")
    logger.info("patched %s: %s", type(model).__name__, ", ".join(f"{k} ×{v}" for k, v in counts.items()))
    model._zhllm_patched = counts
    return model
