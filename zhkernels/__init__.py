"""Fused Triton kernels for Llama training, importable into any model: ``import zhkernels``.

Every op has a functional entry point and an ``nn.Module``; CUDA tensors run the Triton kernels, CPU
tensors run the plain-PyTorch definition in :mod:`zhkernels.reference` (or the Triton kernels in Triton's
interpreter when ``TRITON_INTERPRET=1``). ``patch_hf_llama(model)`` swaps them into a ``transformers``
Llama. The ops are registered as ``torch.ops.zhllm.*`` custom ops, so ``torch.compile(fullgraph=True)``
traces through them. ``int8_matmul`` / ``int4_matmul`` (with ``quantize_int8`` / ``quantize_int4``) are
weight-only quantised matmuls for inference (:mod:`zhkernels.quant`).
"""

from . import reference
from .cross_entropy import FusedLinearCrossEntropyFunction, FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from .distill import FusedDistillLossFunction, fused_distill_loss
from .flash_attention import FlashAttention, FlashAttentionFunction, flash_attention
from .hf_llama import patch_hf_llama
from .logprobs import FusedLinearLogprobsFunction, fused_linear_logprobs
from .quant import int4_matmul, int8_matmul, quantize_int4, quantize_int8
from .rms_norm import RMSNorm, RMSNormFunction, rms_norm
from .rope import RoPEFunction, RotaryEmbedding, apply_rope
from .swiglu import SwiGLU, SwiGLUFunction, SwiGLUMLP, swiglu

__all__ = [
    "FlashAttention",
    "FlashAttentionFunction",
    "FusedDistillLossFunction",
    "FusedLinearCrossEntropyFunction",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearLogprobsFunction",
    "RMSNorm",
    "RMSNormFunction",
    "RoPEFunction",
    "RotaryEmbedding",
    "SwiGLU",
    "SwiGLUFunction",
    "SwiGLUMLP",
    "apply_rope",
    "flash_attention",
    "fused_distill_loss",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "int4_matmul",
    "int8_matmul",
    "patch_hf_llama",
    "quantize_int4",
    "quantize_int8",
    "reference",
    "rms_norm",
    "swiglu",
]
