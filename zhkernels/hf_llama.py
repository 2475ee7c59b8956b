"""``patch_hf_llama(model)``: swap our fused ops into a Hugging Face ``LlamaForCausalLM``, in place.

Like Liger-Kernel's ``apply_liger_kernel_to_llama``, but per instance: only the model you pass is
changed, never the ``transformers`` classes or module globals, so an unpatched model in the same
process keeps its behaviour. What gets swapped:

- every ``LlamaRMSNorm`` → :func:`zhkernels.rms_norm` (its ``forward``, on that instance)
- every ``LlamaMLP`` with a SiLU activation → :func:`zhkernels.swiglu` between its projections
- attention → :func:`zhkernels.flash_attention` (GQA without repeating K/V), through transformers' public
  extension point: the function is registered with ``AttentionInterface`` as ``"zhllm"`` and the model
  is switched to it with ``set_attn_implementation`` on a config of its own. The KV cache, position ids,
  RoPE and the masks stay transformers' own, so cache and keyword changes between releases do not
  reach us. A call whose mask is plain causal (transformers then passes none) or is causal within
  packed documents runs our kernel; any other mask (padding, a static cache), dropout or a request for
  attention weights goes to transformers' SDPA attention.
- ``LlamaForCausalLM.forward`` with ``labels`` → :func:`zhkernels.fused_linear_cross_entropy` on the
  final hidden states, so the ``[tokens, vocab]`` logits are never built (``logits`` is then None);
  without labels the original forward runs and returns logits.

What this costs: transformers applies RoPE itself (``apply_rotary_pos_emb``, a few elementwise
PyTorch ops on q and k) before the attention function is called, so our fused RoPE is not used here.
RoPE is memory-bound and touches q and k once; the attention, norms, MLP and loss are where the
fused kernels save time and memory, and keeping transformers' cache handling is what makes the patch
survive its releases. (Our own ``llama.model`` keeps the fused RoPE.)

The loss follows ``transformers``' causal-LM loss: labels shifted left by one, ``-100`` ignored, mean
over counted tokens, or a sum divided by ``num_items_in_batch`` when the Trainer passes it.
"""

from __future__ import annotations

import copy
import inspect
import logging
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cross_entropy import fused_linear_cross_entropy
from .flash_attention import flash_attention
from .rms_norm import rms_norm as fused_rms_norm
from .swiglu import swiglu as fused_swiglu

logger = logging.getLogger(__name__)

#: The name our attention is registered under in transformers' ``AttentionInterface``.
ATTN_IMPLEMENTATION = "zhllm"

_SILU = ("silu", "swish")


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs:  # a signature we do not know: the module's own computation
        return self._zhllm_original_forward(hidden_states, *args, **kwargs)
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return fused_rms_norm(hidden_states, self.weight, eps)


def _mlp_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs:
        return self._zhllm_original_forward(x, *args, **kwargs)
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def _packed_document_ids(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """transformers' packed-sequence rule: a document starts wherever the position does not follow the last by +1."""
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1).to(torch.int32)


_last_mask_verdict: tuple[Any, Any, torch.Tensor | None] | None = None


def _doc_ids_if_packed_causal(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor, position_ids: Any) -> Any:
    """Document ids when ``mask`` is exactly causal-within-packed-documents (read from ``position_ids``), else None.

    transformers builds one mask per forward and passes the same tensor to every layer, so the verdict
    is kept for that tensor and the comparison runs once per forward, not once per layer.
    """
    global _last_mask_verdict
    batch, q_len, k_len = query.shape[0], query.shape[-2], key.shape[-2]
    if not isinstance(position_ids, torch.Tensor) or q_len != k_len or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    if mask.shape[1] != 1 or mask.shape[-2:] != (q_len, k_len) or position_ids.shape[-1] != q_len:
        return None
    if _last_mask_verdict is not None and _last_mask_verdict[0]() is mask and _last_mask_verdict[1]() is position_ids:
        return _last_mask_verdict[2]
    docs = _packed_document_ids(position_ids, batch)
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
    expected = causal & (docs[:, :, None] == docs[:, None, :])
    verdict = docs if torch.equal(mask[:, 0].expand(batch, -1, -1), expected) else None
    _last_mask_verdict = (weakref.ref(mask), weakref.ref(position_ids), verdict)
    return verdict


def zhllm_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: q ``[B, H, Tq, D]`` (RoPE applied), k/v ``[B, Hkv, Tk, D]`` → ``[B, Tq, H,
    D]``.

    Causal attention over the whole cache (Tq == Tk, or one decoding query) runs :func:`flash_attention`;
    everything else runs transformers' ``sdpa_attention_forward`` with the same arguments.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    # Without a mask transformers means SDPA's is_causal, which aligns to the *start* when Tq < Tk (a static
    # cache's unfilled tail stays masked) and attends to every key for one query. Our kernel aligns to the
    # end, the same thing only when Tq == Tk or Tq == 1; other shapes keep SDPA.
    if (
        dropout == 0.0
        and getattr(module, "is_causal", True)
        and not kwargs.get("output_attentions")
        and (q_len == k_len or q_len == 1)
    ):
        doc_ids = None
        if attention_mask is not None:
            doc_ids = _doc_ids_if_packed_causal(attention_mask, query, key, kwargs.get("position_ids"))
        if attention_mask is None or doc_ids is not None:
            out = flash_attention(query, key, value, causal=True, doc_ids=doc_ids, scale=scaling)
            return out.transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _register_attention() -> None:
    """Register ``"zhllm"`` with transformers (idempotent); its masks are built as for SDPA (None when plain causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, zhllm_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _own_config(model: nn.Module) -> None:
    """Give ``model`` a config of its own, so switching its attention does not switch a model that shares the config."""
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own


def _use_our_attention(model: nn.Module) -> None:
    _register_attention()
    _own_config(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"transformers refused attn_implementation={ATTN_IMPLEMENTATION!r} for {type(model).__name__}; "
            "pass rope_and_attention=False to patch the other ops only"
        )


def _signature_arguments(forward: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``forward``'s arguments by name, whichever were given by position (``**kwargs`` folded in)."""
    signature = inspect.signature(forward)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _causal_lm_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """LlamaForCausalLM.forward; with labels, the loss comes from the fused linear cross-entropy and logits is None."""
    original = self._zhllm_original_forward
    arguments = _signature_arguments(original, args, kwargs)
    labels = arguments.pop("labels", None)
    if labels is None:
        return original(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    arguments.pop("logits_to_keep", None)
    arguments.pop("return_dict", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    outputs = self.model(**arguments)
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
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def _swap_forward(module: nn.Module, new_forward: Any) -> None:
    if not hasattr(module, "_zhllm_original_forward"):
        module._zhllm_original_forward = module.forward
    module.forward = types.MethodType(new_forward, module)


def _is_llama_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and all(
        hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    )


def patch_hf_llama(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    rope_and_attention: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = True,
    doc_mask_from_position_ids: bool | None = None,
) -> nn.Module:
    """Swap our fused ops into a ``transformers`` Llama (``LlamaForCausalLM`` or ``LlamaModel``) in place; returns it.

    Packed rows (position ids restarting, no attention mask, ``use_cache=False``) are masked per document
    exactly as transformers masks them for SDPA, and run our kernel with document ids; ``doc_mask_from_position_ids``
    is accepted for older callers
    and changes nothing. Patching twice is harmless.
    """
    if doc_mask_from_position_ids is not None:
        logger.warning(
            "patch_hf_llama: doc_mask_from_position_ids is no longer needed and is ignored: packed rows "
            "are masked per document as transformers' own attention masks them"
        )
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
        elif rope_and_attention and _is_llama_attention(module):
            counts["attention"] += 1
    if counts["attention"]:
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"{type(model).__name__} is not a transformers PreTrainedModel: pass the LlamaForCausalLM "
                "or LlamaModel itself, or rope_and_attention=False"
            )
        _use_our_attention(model)
    if cross_entropy and hasattr(model, "lm_head") and hasattr(model, "model"):
        if getattr(model.lm_head, "bias", None) is not None:
            logger.warning("lm_head has a bias: the fused linear cross-entropy is not applied")
        else:
            _swap_forward(model, _causal_lm_forward)
            counts["cross_entropy"] = 1
    if not any(counts.values()):
        raise ValueError(
            f"patch_hf_llama found no Llama modules in {type(model).__name__}; pass a transformers Llama model"
        )
    logger.info("patched %s: %s", type(model).__name__, ", ".join(f"{k} ×{v}" for k, v in counts.items()))
    model._zhllm_patched = counts
    return model
