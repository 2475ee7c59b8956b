"""RMSNorm, optionally fused with the residual add before it: one read and one write of each row.

``out = x / sqrt(mean(x**2) + eps) * weight`` over the last dimension, statistics in float32. With a
``residual``, ``h = x + residual`` (summed in float32, rounded to the residual's dtype) is written out as
the new residual stream and normalised, which saves a separate add kernel per sub-layer of a block.
``x`` may be in a lower precision than ``residual`` (a bf16 sub-layer output added to a float32
stream): the sum is kept in the residual's dtype, and ``out_dtype`` writes the normalised output
straight in the dtype the next matmul runs in (under autocast, its 16-bit dtype). That spares the
model a float32 copy of each sub-layer output before the norm and one 16-bit copy of the norm's
output per projection that reads it (autocast casts q, k and v's shared input three times).

Backward recomputes ``xhat`` from the saved input and per-row ``rstd``. The weight gradient is a sum
over rows: each program sums a contiguous range of rows into its own float32 row of a
``[n_programs, H]`` buffer, and torch reduces that buffer, so no atomics and a deterministic result.
Several programs share an SM (``backward_split``), so while one waits on its next rows another computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _dispatch, reference
from ._dispatch import HAS_TRITON

#: A whole row lives in registers: wider rows spill (backward from 16384 on sm_80–90, per zhkernels.aot_check),
#: so they are refused rather than run slowly; zhkernels.reference.rms_norm serves them.
MAX_HIDDEN = 8192

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_forward_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        new_res_ptr,
        rstd_ptr,
        n_rows,
        n_cols,
        x_row_stride,
        res_row_stride,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        h = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
        dense = rows[:, None] * n_cols + cols[None, :]  # outputs are contiguous [rows, H]
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * res_row_stride + cols[None, :], mask=inside, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(new_res_ptr.dtype.element_ty)  # the residual's dtype
            tl.store(new_res_ptr + dense, h, mask=inside)
        hf = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        out = hf * rstd[:, None] * w[None, :]
        tl.store(out_ptr + dense, out.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def _rms_norm_backward_kernel(
        grad_out_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        grad_res_ptr,
        grad_x_ptr,
        grad_w_partial_ptr,
        n_rows,
        n_cols,
        rows_per_program,
        grad_out_row_stride,
        x_row_stride,
        grad_res_row_stride,
        HAS_GRAD_RESIDUAL: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)); dw = sum over rows of dy * xhat.
        program = tl.program_id(0)
        first_row = program.to(tl.int64) * rows_per_program
        last_row = tl.minimum(first_row + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_H)
        col_inside = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_inside, other=0.0).to(tl.float32)
        grad_w_acc = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
        for start in range(first_row, last_row, BLOCK_ROWS):
            # invariant: grad_w_acc holds dy * xhat summed over this program's rows before `start`
            rows = start + tl.arange(0, BLOCK_ROWS)
            inside = (rows[:, None] < last_row) & col_inside[None, :]
            dy = tl.load(grad_out_ptr + rows[:, None] * grad_out_row_stride + cols[None, :], mask=inside, other=0.0)
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rows < last_row, other=0.0)
            dy = dy.to(tl.float32)
            xhat = x.to(tl.float32) * rstd[:, None]
            dyw = dy * w[None, :]
            mean_dyw_xhat = tl.sum(dyw * xhat, axis=1) / n_cols
            dx = rstd[:, None] * (dyw - xhat * mean_dyw_xhat[:, None])
            if HAS_GRAD_RESIDUAL:
                dres_ptrs = grad_res_ptr + rows[:, None] * grad_res_row_stride + cols[None, :]
                dx += tl.load(dres_ptrs, mask=inside, other=0.0).to(tl.float32)
            dense = rows[:, None] * n_cols + cols[None, :]
            tl.store(grad_x_ptr + dense, dx.to(grad_x_ptr.dtype.element_ty), mask=inside)
            grad_w_acc += dy * xhat
        tl.store(grad_w_partial_ptr + program * n_cols + cols, tl.sum(grad_w_acc, axis=0), mask=col_inside)


def _launch_shape(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_H, num_warps): a tile of about 4K elements, several short rows per program."""
    block_h = _dispatch.next_power_of_2(n_cols)
    block_rows = max(1, min(16, 4096 // block_h))
    num_warps = max(1, min(16, block_rows * block_h // 512))
    return block_rows, block_h, num_warps


#: Warps the backward keeps resident per SM (of 48–64): enough programs that one's loads overlap another's math.
BACKWARD_WARPS_PER_SM = 32


def backward_split(n_rows: int, n_cols: int, n_sms: int) -> tuple[int, int]:
    """(rows per program, programs) for the backward: each program sums its own contiguous rows' weight
    gradient, several programs per SM (``BACKWARD_WARPS_PER_SM``) so the serial row loop is not latency-bound,
    never more programs than row blocks."""
    block_rows, _, num_warps = _launch_shape(n_cols)
    workers = n_sms * max(1, BACKWARD_WARPS_PER_SM // num_warps)
    rows_per_program = triton.cdiv(n_rows, min(workers, triton.cdiv(n_rows, block_rows)))
    return rows_per_program, triton.cdiv(n_rows, rows_per_program)


@torch.library.custom_op("zhllm::rms_norm_forward", mutates_args=())
def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out in ``out_dtype``, new_residual in the residual's dtype or an empty tensor when ``residual`` is None,
    rstd [rows] float32)."""
    x2, weight = _dispatch.as_rows(x), weight.contiguous()
    n_rows, n_cols = x2.shape
    out = _dispatch.empty(x2.shape, out_dtype, x.device)
    res_dtype = residual.dtype if residual is not None else x.dtype
    new_res = _dispatch.empty(x2.shape if residual is not None else (0,), res_dtype, x.device)
    rstd = _dispatch.empty((n_rows,), torch.float32, x.device)
    r2 = _dispatch.as_rows(residual) if residual is not None else x2
    if n_rows:
        block_rows, block_h, num_warps = _launch_shape(n_cols)
        _rms_norm_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2,
            r2,
            weight,
            out,
            new_res if residual is not None else out,
            rstd,
            n_rows,
            n_cols,
            x2.stride(0),
            r2.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return out.view(x.shape), new_res.view(x.shape) if residual is not None else new_res, rstd


@rms_norm_forward.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, out_dtype: torch.dtype):
    n_rows = math.prod(x.shape[:-1])
    new_res = residual.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape, dtype=out_dtype), new_res, x.new_empty((n_rows,), dtype=torch.float32)


@torch.library.custom_op("zhllm::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    grad_residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight); ``x`` is what was normalised (the new residual when one was added).

    ``grad_residual``, the gradient reaching the new residual output, is added to ``grad_x``.
    """
    d2, x2, weight = _dispatch.as_rows(grad_out), _dispatch.as_rows(x), weight.contiguous()
    n_rows, n_cols = x2.shape
    grad_x = _dispatch.empty(x2.shape, x.dtype, x.device)
    if not n_rows:
        return grad_x.view(x.shape), torch.zeros_like(weight)
    dr2 = _dispatch.as_rows(grad_residual) if grad_residual is not None else d2
    block_rows, block_h, num_warps = _launch_shape(n_cols)
    rows_per_program, n_programs = backward_split(n_rows, n_cols, _dispatch.sm_count(x.device))
    partial = _dispatch.empty((n_programs, n_cols), torch.float32, x.device)
    _rms_norm_backward_kernel[(n_programs,)](
        d2,
        x2,
        weight,
        rstd,
        dr2,
        grad_x,
        partial,
        n_rows,
        n_cols,
        rows_per_program,
        d2.stride(0),
        x2.stride(0),
        dr2.stride(0),
        HAS_GRAD_RESIDUAL=grad_residual is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return grad_x.view(x.shape), partial.sum(0).to(weight.dtype)


@rms_norm_backward.register_fake
def _(grad_out, x, weight, rstd, grad_residual):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    """Autograd for the fused op: saves the normalised input and rstd; x and residual share one gradient."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, out_dtype: torch.dtype
    ):
        out, new_res, rstd = torch.ops.zhllm.rms_norm_forward(x, weight, residual, eps, out_dtype)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(new_res if residual is not None else x, weight, rstd)
        ctx.set_materialize_grads(False)
        return (out, new_res) if residual is not None else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_new_res: torch.Tensor | None = None):
        normed, weight, rstd = ctx.saved_tensors
        if grad_out is None:  # only the new residual was used downstream
            grad_out = torch.zeros_like(normed)
        grad_x, grad_w = torch.ops.zhllm.rms_norm_backward(grad_out, normed, weight, rstd, grad_new_res)
        # grad_x is in the normalised input's dtype (the residual's); autograd casts x's share to x's dtype
        return grad_x, grad_w, None, grad_x if ctx.has_residual else None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; with ``residual`` returns ``(norm(x + residual), x + residual)``.

    ``weight`` may be in another float dtype than ``x`` (e.g. float32 master weights). ``residual`` may be in a
    higher precision than ``x``; the sum is in the residual's dtype. The output is in ``out_dtype`` (default:
    the dtype of what is normalised: x's, or the residual's with one).
    """
    _dispatch.check_float("x", x)
    _dispatch.check_float("weight", weight)
    if x.dim() == 0:
        raise ValueError("rms_norm: x is a scalar; it needs a last dimension to normalise over")
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"rms_norm: weight {tuple(weight.shape)} must be ({x.shape[-1]},), the last dimension of x {tuple(x.shape)}"
        )
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(
            f"rms_norm: last dimension {x.shape[-1]} > {MAX_HIDDEN}, wider than the fused kernel keeps in registers; "
            "use zhkernels.reference.rms_norm for it"
        )
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        _dispatch.check_float("residual", residual)
        if residual.dtype.itemsize < x.dtype.itemsize or {residual.dtype, x.dtype} == {torch.float16, torch.bfloat16}:
            raise TypeError(
                f"rms_norm: residual is {residual.dtype} but x is {x.dtype}; the residual stream must be "
                "x's dtype or float32 (cast one of them)"
            )
    if out_dtype is not None and out_dtype not in _dispatch.SUPPORTED_FLOATS:
        raise TypeError(f"rms_norm: out_dtype {out_dtype} is not float32, float16 or bfloat16")
    _dispatch.check_same_device(x=x, weight=weight, residual=residual)
    if not _dispatch.use_triton(x, weight, residual):
        return reference.rms_norm(x, weight, eps, residual, out_dtype)
    normed_dtype = residual.dtype if residual is not None else x.dtype
    return RMSNormFunction.apply(x, weight, float(eps), residual, out_dtype or normed_dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm with Hugging Face's parameter name (``weight``), so state dicts load into LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
