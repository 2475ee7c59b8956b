"""Rotary position embedding for q and k in one kernel, Hugging Face's rotate-half layout.

With ``x1, x2`` the first and second halves of a head and ``c, s`` the token's cos/sin row,
``out = x * cos + rotate_half(x) * sin``, i.e. ``out1 = x1*c1 - x2*s1`` and ``out2 = x2*c2 + x1*s2``.
The kernel loads both halves of the cos/sin row, so it is exact for any table; Hugging Face's tables
repeat the halves (``c1 == c2``), which costs one extra 2*D read per token and head block, nothing more.
Backward is the transposed (inverse) rotation: ``dx1 = d1*c1 + d2*s2``, ``dx2 = d2*c2 - d1*s1``.

cos/sin come either as a table ``[max_pos, D]`` indexed by ``position_ids [B, T]`` (packed documents
restart at 0; default ``0..T-1``) or per token ``[B, T, D]`` as Hugging Face's LlamaRotaryEmbedding
returns them. q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]`` may have different head counts (GQA) and any
strides with a unit last stride, such as ``x.view(B, T, H, D).transpose(1, 2)``; outputs are
``[B, H, T, D]`` in the input dtype, computed in float32, laid out in memory as ``[B, T, H, D]`` like
such a view. So the backward's gradients, in that layout too, flow back through the model's
``view``/``transpose`` of the projection for free (a contiguous ``[B, H, T, D]`` gradient would make
autograd copy dq and dk back into the projection's layout in every layer).
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
    def _rotate_heads(x_ptr, out_ptr, b, t, heads, n_heads, seq_len, half, x_sb, x_sh, x_st, c1, c2, m1, m2, d):
        """``out1 = x1*c1 + x2*m1``, ``out2 = x2*c2 + x1*m2`` for a block of heads of one token."""
        inside = (heads[:, None] < n_heads) & (d[None, :] < half)
        src = x_ptr + b * x_sb + heads[:, None].to(tl.int64) * x_sh + t * x_st + d[None, :]
        x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=inside, other=0.0).to(tl.float32)
        out1 = x1 * c1[None, :] + x2 * m1[None, :]
        out2 = x2 * c2[None, :] + x1 * m2[None, :]
        # outputs are [B, H, T, D] laid out as [B, T, H, D] in memory (the projections' layout)
        dst = out_ptr + ((b * seq_len + t) * n_heads + heads[:, None].to(tl.int64)) * (2 * half) + d[None, :]
        tl.store(dst, out1.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(dst + half, out2.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_out_ptr,
        k_out_ptr,
        seq_len,
        n_q_heads,
        n_k_heads,
        half,
        table_len,
        q_sb,
        q_sh,
        q_st,
        k_sb,
        k_sh,
        k_st,
        cos_sb,
        cos_st,
        sin_sb,
        sin_st,
        pos_sb,
        pos_st,
        HAS_POSITIONS: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        # grid: (B*T tokens, head blocks); each program rotates heads [hb*BLOCK_HEADS, ...) of q and of k.
        token = tl.program_id(0).to(tl.int64)
        b = token // seq_len
        t = token % seq_len
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        d = tl.arange(0, BLOCK_HALF)
        d_inside = d < half
        if HAS_POSITIONS:
            pos = tl.load(pos_ptr + b * pos_sb + t * pos_st).to(tl.int64)
            pos_bcast = pos + tl.zeros((BLOCK_HALF,), dtype=tl.int64)  # the interpreter wants vector masks
            d_inside = d_inside & (pos_bcast >= 0) & (pos_bcast < table_len)  # out-of-table positions read zeros
            cos_row = cos_ptr + pos * cos_st
            sin_row = sin_ptr + pos * sin_st
        else:
            cos_row = cos_ptr + b * cos_sb + t * cos_st
            sin_row = sin_ptr + b * sin_sb + t * sin_st
        c1 = tl.load(cos_row + d, mask=d_inside, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + half + d, mask=d_inside, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + d, mask=d_inside, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + half + d, mask=d_inside, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward rotation
            m1 = s2
            m2 = -s1
        else:
            m1 = -s1
            m2 = s2
        _rotate_heads(q_ptr, q_out_ptr, b, t, heads, n_q_heads, seq_len, half, q_sb, q_sh, q_st, c1, c2, m1, m2, d)
        _rotate_heads(k_ptr, k_out_ptr, b, t, heads, n_k_heads, seq_len, half, k_sb, k_sh, k_st, c1, c2, m1, m2, d)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bthd_like(t: torch.Tensor, fake: bool = False) -> torch.Tensor:
    return _dispatch.empty_bthd(*t.shape, t, fake=fake)


def launch_config(head_dim: int, n_q_heads: int, n_k_heads: int) -> tuple[int, int, int]:
    """(BLOCK_HEADS, BLOCK_HALF, num_warps): up to 1024 half-dims of several heads per program."""
    block_half = _dispatch.next_power_of_2(head_dim // 2)
    block_heads = min(_dispatch.next_power_of_2(max(n_q_heads, n_k_heads)), max(1, 1024 // block_half))
    return block_heads, block_half, max(1, min(8, block_heads * block_half // 256))


def _rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: rotate (or, for ``backward``, rotate back) q and k into new ``[B, T, H, D]``-laid tensors."""
    q, k, cos, sin = (_unit_last_stride(t) for t in (q, k, cos, sin))
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    q_out, k_out = _bthd_like(q), _bthd_like(k)
    if batch * seq_len == 0 or max(n_q_heads, n_k_heads) == 0:
        return q_out, k_out
    if cos.dim() == 3:  # per token [B or 1, T, D]: a batch of one broadcasts through a zero stride
        cos_sb, cos_st = (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)
        sin_sb, sin_st = (sin.stride(0) if sin.shape[0] > 1 else 0), sin.stride(1)
    else:  # table [max_pos, D], row = position
        cos_sb, cos_st, sin_sb, sin_st = 0, cos.stride(0), 0, sin.stride(0)
    if position_ids is not None:
        pos_sb, pos_st = (position_ids.stride(0) if position_ids.shape[0] > 1 else 0), position_ids.stride(1)
    else:
        pos_sb, pos_st = 0, 0
    half = head_dim // 2
    block_heads, block_half, num_warps = launch_config(head_dim, n_q_heads, n_k_heads)
    grid = (batch * seq_len, triton.cdiv(max(n_q_heads, n_k_heads), block_heads))
    _rope_kernel[grid](
        q,
        k,
        cos,
        sin,
        position_ids if position_ids is not None else cos,
        q_out,
        k_out,
        seq_len,
        n_q_heads,
        n_k_heads,
        half,
        cos.shape[0],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos_sb,
        cos_st,
        sin_sb,
        sin_st,
        pos_sb,
        pos_st,
        HAS_POSITIONS=position_ids is not None,
        BACKWARD=backward,
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out, k_out


@torch.library.custom_op("zhllm::rope_forward", mutates_args=())
def rope_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out): q and k rotated by their tokens' angles, new tensors laid out ``[B, T, H, D]``."""
    return _rotate(q, k, cos, sin, position_ids, backward=False)


@rope_forward.register_fake
def _(q, k, cos, sin, position_ids):
    return _bthd_like(q, fake=True), _bthd_like(k, fake=True)


@torch.library.custom_op("zhllm::rope_backward", mutates_args=())
def rope_backward(
    grad_q_out: torch.Tensor,
    grad_k_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k): the output gradients rotated back by the same angles."""
    return _rotate(grad_q_out, grad_k_out, cos, sin, position_ids, backward=True)


@rope_backward.register_fake
def _(grad_q_out, grad_k_out, cos, sin, position_ids):
    return _bthd_like(grad_q_out, fake=True), _bthd_like(grad_k_out, fake=True)


class RoPEFunction(torch.autograd.Function):
    """Autograd for the fused rotation: backward rotates the gradients back; cos/sin get no gradient."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        return torch.ops.zhllm.rope_forward(q, k, cos, sin, position_ids)

    @staticmethod
    def backward(ctx, grad_q_out: torch.Tensor, grad_k_out: torch.Tensor):
        cos, sin, position_ids = ctx.saved_tensors
        grad_q, grad_k = torch.ops.zhllm.rope_backward(grad_q_out, grad_k_out, cos, sin, position_ids)
        return grad_q, grad_k, None, None, None


def _check(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None
) -> None:
    """One-line errors for shapes, dtypes and positions the kernel cannot take."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D] (transpose [B, T, H, D])"
        )
    batch, _, seq_len, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length, head_dim")
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim {head_dim} must be even (rotate-half pairs its two halves)")
    _dispatch.check_float("q", q)
    if k.dtype != q.dtype:
        raise TypeError(f"apply_rope: q is {q.dtype} but k is {k.dtype}; cast one of them")
    _dispatch.check_float("cos", cos)
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} {cos.dtype} != sin {tuple(sin.shape)} {sin.dtype}")
    if cos.shape[-1] != head_dim:
        raise ValueError(f"apply_rope: cos/sin width {cos.shape[-1]} must equal head_dim {head_dim}")
    if cos.dim() == 3:
        if position_ids is not None:
            raise ValueError(
                "apply_rope: cos/sin are already per token [B, T, D]; pass position_ids only with a [max_pos, D] table"
            )
        if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
            raise ValueError(f"apply_rope: per-token cos/sin {tuple(cos.shape)} must be [{batch} or 1, {seq_len}, D]")
    elif cos.dim() != 2:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} must be a [max_pos, D] table or per token [B, T, D]")
    elif position_ids is None:
        if seq_len > cos.shape[0]:
            raise ValueError(
                f"apply_rope: {seq_len} tokens but the cos/sin table has {cos.shape[0]} positions; build a longer table"
            )
    else:
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError(f"apply_rope: position_ids has dtype {position_ids.dtype}; it must hold integers")
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
            raise ValueError(f"apply_rope: position_ids {tuple(position_ids.shape)} must be [{batch}, {seq_len}]")
        # on CUDA this check would sync the host, and under torch.compile it would break the graph
        if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= cos.shape[0]:
                raise ValueError(f"apply_rope: position_ids span {low}..{high}; table rows are 0..{cos.shape[0] - 1}")
    _dispatch.check_same_device(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]`` by RoPE (HF rotate-half); returns new ``(q_out, k_out)``."""
    _check(q, k, cos, sin, position_ids)
    if not _dispatch.use_triton(q, k, cos, sin, position_ids):
        return reference.apply_rope(q, k, cos, sin, position_ids)
    return RoPEFunction.apply(q, k, cos, sin, position_ids)


class RotaryEmbedding(nn.Module):
    """Llama's cos/sin tables as non-persistent buffers (state dicts hold weights only), applied to q and k."""

    def __init__(self, head_dim: int, max_position: int = 2048, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.theta = head_dim, max_position, theta
        cos, sin = reference.rope_cos_sin(max_position, head_dim, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, self.cos, self.sin, position_ids)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}, theta={self.theta}"
