"""SwiGLU, ``silu(gate) * up``, fused: one read of each input and one write, forward and backward.

Layering (the same in every op file): Triton kernels → custom ops ``torch.ops.zhllm.*`` (opaque to
``torch.compile``, with fake implementations) → a ``torch.autograd.Function`` → the functional
entry point ``swiglu`` (which sends CPU tensors to the reference) → the ``nn.Module``s.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _dispatch, reference
from ._dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block(BLOCK: tl.constexpr, FLAT: tl.constexpr):
        """This program's row and column offsets. FLAT: contiguous inputs are one array of numel elements, so
        every block starts aligned whatever the width (an ffn of 1668 would otherwise give scalar 2-byte
        accesses); else one row per program along axis 0 and column blocks along axis 1."""
        if FLAT:  # one return statement: Triton checks every return's types, even in a branch never compiled
            row = 0
            cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            row = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        return row, cols

    @triton.jit
    def _swiglu_forward_kernel(
        gate_ptr,
        up_ptr,
        out_ptr,
        n_cols,
        gate_row_stride,
        up_row_stride,
        out_row_stride,
        BLOCK: tl.constexpr,
        FLAT: tl.constexpr,
    ):
        row, cols = _block(BLOCK, FLAT)
        inside = cols < n_cols
        g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * up_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_backward_kernel(
        grad_out_ptr,
        gate_ptr,
        up_ptr,
        grad_gate_ptr,
        grad_up_ptr,
        n_cols,
        grad_out_row_stride,
        gate_row_stride,
        up_row_stride,
        BLOCK: tl.constexpr,
        FLAT: tl.constexpr,
    ):
        # silu'(g) = s * (1 + g * (1 - s)) with s = sigmoid(g); the activation is recomputed, not stored.
        row, cols = _block(BLOCK, FLAT)
        inside = cols < n_cols
        dout = tl.load(grad_out_ptr + row * grad_out_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * up_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        grad_gate = dout * u * s * (1.0 + g * (1.0 - s))
        grad_up = dout * silu
        tl.store(grad_gate_ptr + row * n_cols + cols, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=inside)
        tl.store(grad_up_ptr + row * n_cols + cols, grad_up.to(grad_up_ptr.dtype.element_ty), mask=inside)


FLAT_BLOCK = 1024  # elements per program on the flat path: 8 per thread at 4 warps, 16-byte accesses in bf16


def _grid(rows: int, cols: int) -> tuple[tuple[int, int], int]:
    block = min(_dispatch.next_power_of_2(cols), 1024)
    return (rows, triton.cdiv(cols, block)), block


def _layout(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], tuple, int, bool]:
    """The tensors as launched, the grid, the block, and whether they go as one flat array (all contiguous)."""
    if all(t.is_contiguous() for t in tensors):
        n = tensors[0].numel()
        return [t.view(1, n) for t in tensors], (triton.cdiv(n, FLAT_BLOCK),), FLAT_BLOCK, True
    rows = [_dispatch.as_rows(t) for t in tensors]
    grid, block = _grid(*rows[0].shape)
    return rows, grid, block, False


@torch.library.custom_op("zhllm::swiglu_forward", mutates_args=())
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    (g, u), grid, block, flat = _layout(gate, up)
    out = _dispatch.empty(g.shape, gate.dtype, gate.device)
    if out.numel():
        _swiglu_forward_kernel[grid](
            g, u, out, g.shape[1], g.stride(0), u.stride(0), out.stride(0), BLOCK=block, FLAT=flat
        )
    return out.view(gate.shape)


@swiglu_forward.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("zhllm::swiglu_backward", mutates_args=())
def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (d, g, u), grid, block, flat = _layout(grad_out, gate, up)
    grad_gate = _dispatch.empty(g.shape, gate.dtype, gate.device)
    grad_up = _dispatch.empty(u.shape, up.dtype, up.device)
    if grad_gate.numel():
        _swiglu_backward_kernel[grid](
            d, g, u, grad_gate, grad_up, g.shape[1], d.stride(0), g.stride(0), u.stride(0), BLOCK=block, FLAT=flat
        )
    return grad_gate.view(gate.shape), grad_up.view(up.shape)


@swiglu_backward.register_fake
def _(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd for the fused op: saves the inputs, recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.ops.zhllm.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.zhllm.swiglu_backward(grad_out, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in float32, returned in the inputs' dtype; any shape, last dimension contiguous or not."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; cast one of them")
    _dispatch.check_float("gate", gate)
    _dispatch.check_same_device(gate=gate, up=up)
    if not _dispatch.use_triton(gate, up):
        return reference.swiglu(gate, up)
    return SwiGLUFunction.apply(gate, up)


class SwiGLU(nn.Module):
    """The activation alone: ``SwiGLU()(gate, up)``."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)


class SwiGLUMLP(nn.Module):
    """Llama's feed-forward block, ``down(silu(gate(x)) * up(x))``, with Hugging Face's parameter names."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
