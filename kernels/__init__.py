"""Fused Triton kernels for Llama training, importable into any model: ``import kernels``.

Every op has a functional entry point and an ``nn.Module``; CUDA tensors run the Triton kernels, CPU
tensors run the plain-PyTorch definition in :mod:`kernels.reference` (or the Triton kernels in Triton's
interpreter when ``TRITON_INTERPRET=1``).
"""

from .swiglu import SwiGLU, SwiGLUFunction, SwiGLUMLP, swiglu

__all__ = ["SwiGLU", "SwiGLUFunction", "SwiGLUMLP", "swiglu"]
