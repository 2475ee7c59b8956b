"""Weight-only quantised matmuls, ``x @ W.T`` with W stored as int8 per output channel or int4 per group of K.

Formats (defined in :mod:`zhkernels.reference`, made by :func:`quantize_int8` / :func:`quantize_int4`):

- int8, symmetric per output channel: ``qweight`` int8 ``[N, K]`` in -127..127, ``scales`` ``[N]``.
- int4, group-wise along K (group 32, 64 or 128), symmetric (zero point 8) or asymmetric (``zeros`` uint8 codes):
  ``qweight`` uint8 ``[N, Kp / 2]``, two codes a byte, ``scales`` and ``zeros`` ``[G, N]``. A K that is not a
  multiple of the group (seed003's ffn of 1668) is padded with zero weights to Kp at quantisation time, so any
  layer quantises; the activations are never padded (the kernel masks columns ≥ K).

The kernels (decode is the target: M = 1 to a few rows of fp16/bf16 activations). Each program owns BLOCK_N
output features and loops over K; the integer codes minus their zero point are exact in fp16/bf16 (|q| ≤ 127), so
the inner products ``x · (q - z)`` run on them with fp32 accumulation and the scale multiplies once per group
(int4: one group per iteration) or once at the end (int8), never rounding a dequantised weight. int4 bytes are
not interleaved back into columns: the low nibbles meet the even columns of x, the high nibbles the odd ones.
M ≤ ``GEMV_ROWS`` runs one row per program with a broadcast multiply-and-sum (no tensor-core tile wasted on
padding rows); more rows use ``tl.dot`` on BLOCK_M ≥ 16 row tiles. There is no split-K: a decode step of our
presets' sizes launches N / BLOCK_N programs.

Layering: Triton kernels → custom ops ``torch.ops.zhllm.int8_matmul`` / ``int4_matmul`` (fake implementations,
no autograd: quantised weights are for inference) → :func:`int8_matmul` / :func:`int4_matmul`, which send CPU
tensors to the reference (dequantise, then matmul in fp32) unless ``TRITON_INTERPRET=1``. ``llama.quantize`` uses
PyTorch's own CPU weight-only kernels instead where they exist.
"""

from __future__ import annotations

import torch

from . import _dispatch, reference
from ._dispatch import HAS_TRITON

GROUP_SIZES = (32, 64, 128)
GEMV_ROWS = 4  # up to this many rows: one row per program, no tl.dot
INT8_MAX, INT4_LEVELS = 127, 15

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_dot(x, q, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + x @ q`` in fp32, the integer codes ``q`` cast to x's dtype (exact: |q| ≤ 127). UPCAST (interpreter
        + bfloat16 only): widen both first, as the interpreter keeps bf16 as raw uint16 bits (triton#11584)."""
        if UPCAST:
            return tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, q.to(x.dtype), acc, input_precision=PRECISION)

    @triton.jit
    def _int8_matmul_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        out_ptr,
        M,
        N,
        K,
        x_row_stride,
        out_row_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """``out = (x @ q.T) * s`` on this tile; loop invariant: ``acc = x[:, :k0] @ q[cols, :k0].T``."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok, row_ok = cols < N, rows < M
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * K  # [1, BLOCK_N]: the weight tile is read as [BLOCK_K, BLOCK_N]
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
            if DOT:
                acc = _quant_dot(x, q, acc, PRECISION, UPCAST)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
        scale = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        out_at = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + cols[None, :]
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        M,
        N,
        K,
        n_groups,
        x_row_stride,
        out_row_stride,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One group of K per iteration; loop invariant: ``acc = sum over groups so far of s_g * x_g @ (q_g - z_g).T``.

        Bytes hold columns 2j (low nibble) and 2j+1 (high): each meets its own strided half of x, so the codes are
        never interleaved back. Weight bytes exist up to the padded Kp; x is masked at K."""
        HALF: tl.constexpr = GROUP // 2
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok, row_ok = cols < N, rows < M
        row_bytes = n_groups * HALF
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * row_bytes
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
        j = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, n_groups):
            byte = g * HALF + j  # [HALF]
            packed = tl.load(w_cols + byte[:, None], mask=col_ok[None, :], other=0)  # [HALF, BLOCK_N] uint8
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g * N + cols, mask=col_ok, other=0).to(tl.int32)
            else:
                zero = tl.full((BLOCK_N,), 8, tl.int32)
            lo = (packed & 15).to(tl.int32) - zero[None, :]
            hi = (packed >> 4).to(tl.int32) - zero[None, :]
            even, odd = 2 * byte, 2 * byte + 1
            x_even = tl.load(x_rows + even[None, :], mask=row_ok[:, None] & (even < K)[None, :], other=0.0)
            x_odd = tl.load(x_rows + odd[None, :], mask=row_ok[:, None] & (odd < K)[None, :], other=0.0)
            if DOT:
                part = _quant_dot(x_even, lo, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
                part = _quant_dot(x_odd, hi, part, PRECISION, UPCAST)
            else:
                part = tl.sum(x_even.to(tl.float32)[:, :, None] * lo.to(tl.float32)[None, :, :], axis=1)
                part += tl.sum(x_odd.to(tl.float32)[:, :, None] * hi.to(tl.float32)[None, :, :], axis=1)
            scale = tl.load(s_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += part * scale[None, :]
        out_at = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + cols[None, :]
        tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def launch_config(m: int, kind: str, dtype: torch.dtype) -> dict:
    """The tiles an op launches for ``m`` rows (``kind`` "int8" or "int4"): GEMV for few rows, ``tl.dot`` above."""
    if m <= GEMV_ROWS:
        config = dict(BLOCK_M=1, BLOCK_N=32, DOT=False, num_warps=4)
        if kind == "int8":
            config["BLOCK_K"] = 128
        return config
    config = dict(BLOCK_M=min(64, max(16, _dispatch.next_power_of_2(m))), BLOCK_N=64, DOT=True, num_warps=4)
    if kind == "int8":
        config["BLOCK_K"] = 64
    config["PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 inputs
    return config


def _launch(kernel, m: int, n: int, kind: str, dtype: torch.dtype, *args, **constexprs) -> None:
    config = launch_config(m, kind, dtype)
    config.setdefault("PRECISION", "ieee")  # unused by the GEMV path
    config["UPCAST"] = config["DOT"] and dtype == torch.bfloat16 and _dispatch.interpret_mode()
    num_warps = config.pop("num_warps")
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
    kernel[grid](*args, num_warps=num_warps, **config, **constexprs)


@torch.library.custom_op("zhllm::int8_matmul", mutates_args=())
def int8_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (unit column stride) @ int8 ``qweight [N, K]`` with ``scales [N]`` → ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    out = _dispatch.empty((m, n), x.dtype, x.device)
    if out.numel():
        _launch(_int8_matmul_kernel, m, n, "int8", x.dtype, x, qweight, scales, out, m, n, k, x.stride(0), n)
    return out


@int8_matmul_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("zhllm::int4_matmul", mutates_args=())
def int4_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x [M, K]`` @ the int4 weight (see the module docstring) → ``[M, N]`` in x's dtype."""
    m = x.shape[0]
    n_groups, n = scales.shape
    out = _dispatch.empty((m, n), x.dtype, x.device)
    if out.numel():
        z = zeros if zeros is not None else scales  # a placeholder pointer, never read
        args = (x, qweight, scales, z, out, m, n, in_features, n_groups, x.stride(0), n)
        _launch(_int4_matmul_kernel, m, n, "int4", x.dtype, *args, GROUP=group_size, HAS_ZEROS=zeros is not None)
    return out


@int4_matmul_op.register_fake
def _(x, qweight, scales, zeros, group_size, in_features):
    return x.new_empty((x.shape[0], scales.shape[1]))


# ---------------------------------------------------------------- quantising


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight int8 [N, K], scales [N])``: symmetric per output channel, ``scale = max|w| / 127`` (rounded to
    ``scale_dtype``, default the weight's, before the codes are taken, so they are the best for the stored scale)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).to(scale_dtype or weight.dtype)
    safe = torch.where(scales.float() > 0, scales.float(), torch.ones_like(w[:, 0]))  # an all-zero row stays zero
    q = torch.round(w / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def quantize_int4(
    weight: torch.Tensor, group_size: int, asymmetric: bool = False, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(qweight uint8 [N, Kp / 2], scales [G, N], zeros uint8 [G, N] or None)`` for groups of ``group_size``
    along K (K padded with zeros to a multiple). Symmetric: ``scale = max|w| / 7``, codes ``round(w / scale) + 8``
    in 1..15. Asymmetric: the group's range (widened to hold 0) over 15 levels, ``zero = round(-min / scale)``."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    n, k = weight.shape
    padded = -(-k // group_size) * group_size
    w = torch.nn.functional.pad(weight.detach().float(), (0, padded - k)).view(n, -1, group_size)  # [N, G, g]
    if asymmetric:
        low, high = w.amin(dim=2).clamp(max=0), w.amax(dim=2).clamp(min=0)
        scales = ((high - low) / INT4_LEVELS).to(scale_dtype or weight.dtype)
        safe = torch.where(scales.float() > 0, scales.float(), torch.ones_like(low))
        zeros = torch.round(-low / safe).clamp_(0, INT4_LEVELS)
    else:
        scales = (w.abs().amax(dim=2) / 7).to(scale_dtype or weight.dtype)
        safe = torch.where(scales.float() > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
        zeros = torch.full_like(safe, 8)
    codes = (torch.round(w / safe[..., None]) + zeros[..., None]).clamp_(0, INT4_LEVELS).view(n, padded)
    packed = reference.int4_pack(codes)
    return packed, scales.t().contiguous(), zeros.t().contiguous().to(torch.uint8) if asymmetric else None


# ---------------------------------------------------------------- entry points


def _check_inference(x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            "quantised matmuls are inference-only (no backward): run under torch.no_grad(), or train the "
            "unquantised model"
        )


def _rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}, but the weight takes {k} input features")
    _dispatch.check_float("x", x)
    return _dispatch.as_rows(x)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with W = ``qweight * scales[:, None]`` (int8 ``[N, K]``, ``[N]``); x ``[..., K]`` → ``[..., N]``."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
        raise ValueError(
            f"int8_matmul: qweight must be int8 [N, K] and scales [N], got {qweight.dtype} {tuple(qweight.shape)} "
            f"and {tuple(scales.shape)} (make them with zhkernels.quant.quantize_int8)"
        )
    _check_inference(x)
    _dispatch.check_same_device(x=x, qweight=qweight, scales=scales)
    rows = _rows(x, qweight.shape[1], "int8_matmul")
    if not _dispatch.use_triton(rows, qweight, scales):
        out = reference.int8_matmul(rows, qweight, scales)
    else:
        out = torch.ops.zhllm.int8_matmul(rows, qweight, scales)
    return out.view(*x.shape[:-1], qweight.shape[0])


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T`` for a group-wise int4 W (see the module docstring); x ``[..., in_features]`` → ``[..., N]``."""
    n_groups = scales.shape[0] if scales.dim() == 2 else -1
    n = scales.shape[1] if scales.dim() == 2 else -1
    padded = n_groups * group_size
    if (
        group_size not in GROUP_SIZES
        or qweight.dtype != torch.uint8
        or tuple(qweight.shape) != (n, padded // 2)
        or not padded - group_size < in_features <= padded
        or (zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != scales.shape))
    ):
        raise ValueError(
            f"int4_matmul: expected qweight uint8 [N, Kp/2], scales [Kp/group, N], zeros uint8 like scales or None, "
            f"group in {GROUP_SIZES} and Kp - group < in_features ≤ Kp; got qweight {qweight.dtype} "
            f"{tuple(qweight.shape)}, scales {tuple(scales.shape)}, group {group_size}, in_features {in_features} "
            "(make them with zhkernels.quant.quantize_int4)"
        )
    _check_inference(x)
    _dispatch.check_same_device(x=x, qweight=qweight, scales=scales, zeros=zeros)
    rows = _rows(x, in_features, "int4_matmul")
    if not _dispatch.use_triton(rows, qweight, scales, zeros):
        out = reference.int4_matmul(rows, qweight, scales, zeros, group_size, in_features)
    else:
        out = torch.ops.zhllm.int4_matmul(rows, qweight, scales, zeros, group_size, in_features)
    return out.view(*x.shape[:-1], n)
