"""Fused linear cross-entropy: the loss of ``hidden @ weight.T`` without ever storing the ``[N, V]`` logits.

Tokens go through in chunks. For each chunk, cuBLAS computes the chunk's logits, ONE Triton kernel turns
every row into its loss and overwrites the logits in place with d(loss)/d(logits), then two more matmuls
give the chunk's share of grad_hidden and grad_weight, and the chunk's logits are dropped. So the forward
pass already computes the gradients (as Liger-Kernel does); backward only multiplies them by grad_output.

Why the logits are in the input dtype (cuBLAS, fp32 accumulation, output rounded to bf16/fp16) and not in
fp32: the three matmuls are almost all of the work, and in bf16/fp16 they run on tensor cores at several
times the fp32 rate, with half the chunk memory. The rounding of each logit is then the same as an eager
bf16 lm_head's (what Hugging Face training does); everything after that, the max-subtracted log-sum-exp,
softmax and gradient, is fp32 inside the kernel, so nothing overflows whatever the logits' magnitude
(fp16 logits beyond ±65504 are inf straight out of the matmul, as in eager fp16).

Memory, N tokens, H hidden, V vocab, chunk c, input dtype of b bytes (default c ≈ N / ceil(V / H), so the
chunk's logits are about the size of the hidden states):
  held at peak in forward: c*V*b (chunk logits, reused as their gradient) + N*H*b (grad_hidden)
  + V*H*4 (fp32 grad_weight accumulator) + V*H*b (one chunk's bf16 grad_weight product, only where
  PyTorch has no fp32-output GEMM: before 2.8, or not CUDA);
  held from forward to backward: N*H*b + V*H*b (the gradients, in the inputs' dtypes).
  Eager ``F.cross_entropy(hidden @ W.T, t)`` holds N*V*b logits plus N*V*b log-softmax, and backward adds an
  N*V*b gradient (each doubled when the logits are upcast to fp32). Example, N=16,384, H=4,096, V=151,936,
  bf16: c=512; ours ≈ 0.16 + 0.13 + 2.5 + 1.2 = 4 GB at peak, of which 2.5 + 1.2 GB scale with V*H only
  (no N); eager ≈ 5 + 5 GB in forward and another 5 GB in backward, 30 GB with fp32 logits.

Caveats. On CUDA, targets outside ``[0, V)`` (other than ignore_index) are not checked (that would need a
host sync): their loss and gradient rows are NaN, so the mean is NaN and the mistake shows. CPU tensors are
checked and raise.

fp16 (the 6 GB card's recipe, with a GradScaler): d(mean loss)/d(logits) ≈ softmax / n lies below fp16's
range at thousands of tokens and a real vocabulary (Liger-Kernel stores it so and loses it). Here the
kernel stores it without the 1/n and times ``FP16_GRAD_LIFT``, the two gradient matmuls write fp32
(cuBLAS's fp32-output GEMM where PyTorch has it, else upcast inputs), and grad_hidden and grad_weight stay
fp32 until backward multiplies them by grad_output (the scaler's scale) and casts them to fp16: as good
as eager fp16 with a GradScaler (tested). That costs N*H*2 + V*H*2 more bytes held to backward than bf16.

Layering as in every op file: Triton kernel → custom op ``torch.ops.zhllm.fused_linear_cross_entropy_forward``
(with a fake implementation) → ``FusedLinearCrossEntropyFunction`` → ``fused_linear_cross_entropy`` (CPU
tensors go to the reference) → ``FusedLinearCrossEntropyLoss``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _dispatch, reference
from ._dispatch import HAS_TRITON

REDUCTIONS = ("mean", "sum", "none")
_NAME = "fused_linear_cross_entropy"  # prefix of the error messages

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,
        targets_ptr,
        losses_ptr,
        grad_scale_ptr,
        row_stride,
        n_vocab,
        ignore_index,
        z_loss,
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row (token) per program: its fp32 loss and (WRITE_GRAD) its logits overwritten by d(loss)/d(logits).

        Rows are ``row_stride`` elements apart, a multiple of 64 ≥ n_vocab (``padded_vocab``), and the padding
        columns are scratch: reads and writes are masked at row_stride, not n_vocab, so they stay 16-byte
        vector accesses whatever the vocabulary, and columns from n_vocab on count as -inf logits.
        """
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        counted = target != ignore_index
        ignored = target == ignore_index  # not ~counted: Triton < 3.4's interpreter cannot invert an int1
        in_range = (target >= 0) & (target < n_vocab)
        # Ignored rows read nothing: their pass-1 loop is empty and their gradient is written as zeros.
        n_read = tl.where(counted, row_stride, 0)

        # Pass 1, online log-sum-exp: after each block, m is the max of the logits read so far and
        # s the sum of exp(logit - m) over them, so m + log(s) is their log-sum-exp with nothing overflowing.
        m = float("-inf")
        s = 0.0
        for start in range(0, n_read, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < row_stride, other=float("-inf")).to(tl.float32)
            x = tl.where(cols < n_vocab, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = tl.where(counted, m + tl.log(tl.where(counted, s, 1.0)), 0.0)  # ignored rows: 0, not -inf
        target_logit = tl.load(row_ptr + target, mask=counted & in_range, other=0.0).to(tl.float32)
        loss = lse - target_logit + z_loss * lse * lse
        loss = tl.where(counted, loss, 0.0)
        loss = tl.where(in_range | ignored, loss, float("nan"))  # a bad target on CUDA shows as NaN
        tl.store(losses_ptr + row, loss)

        if WRITE_GRAD:
            # d(loss)/d(logit_j) = softmax_j * (1 + 2 z lse) - [j == target], times 1/n_counted for "mean".
            grad_scale = tl.load(grad_scale_ptr)
            softmax_coef = (1.0 + 2.0 * z_loss * lse) * grad_scale
            for start in range(0, n_vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < row_stride
                x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
                x = tl.where(cols < n_vocab, x, float("-inf"))  # padding: a zero gradient
                grad = tl.exp(x - lse) * softmax_coef - tl.where(cols == target, grad_scale, 0.0)
                grad = tl.where(counted, grad, 0.0)
                grad = tl.where(in_range | ignored, grad, float("nan"))
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


#: fp16 only: the kernel stores d(loss)/d(logits) times this (a power of two, so exact) and without the 1/n
#: of the mean, which keeps its entries ≥ 2**-14 (fp16's normal range) down to softmax ≈ 1/16000 and never
#: above 2**10 in magnitude (|gradient| ≤ 1); the gradient matmuls then output fp32, where 1/n and 1/lift apply.
FP16_GRAD_LIFT = 1024.0


def stored_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward keeps grad_hidden and grad_weight in until backward: fp32 for fp16 inputs (whose
    mean-loss gradients lie below fp16's range until a loss scaler multiplies them), else the input dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


_FP32_GEMM: dict[torch.device, bool] = {}


def fp32_output_gemm(device: torch.device) -> bool:
    """Whether cuBLAS writes fp32 from fp16/bf16 inputs here (``aten::mm.dtype``/``addmm.dtype``, PyTorch ≥ 2.8,
    CUDA), checked once per device on a small product; elsewhere the inputs are upcast first."""
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    if device.type == "meta":  # counting GPU memory (bench/count_memory.py): as on a CUDA build that has them
        return True
    if device.type != "cuda":
        return False
    if device not in _FP32_GEMM:
        try:
            a = torch.randn(64, 32, device=device, dtype=torch.float16)
            b = torch.randn(32, 16, device=device, dtype=torch.float16)
            acc = torch.ones(64, 16, device=device)
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            out = torch.empty(64, 16, device=device)
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
            want = a.float() @ b.float()
            _FP32_GEMM[device] = bool(torch.allclose(acc, want + 1, atol=1e-2) and torch.allclose(out, want, atol=1e-2))
        except (RuntimeError, TypeError):
            _FP32_GEMM[device] = False
    return _FP32_GEMM[device]


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` into an fp32 ``out`` from low-precision ``a``, ``b``, never rounding the product to their
    dtype."""
    if fp32_output_gemm(out.device):
        torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into fp32 ``acc``, from inputs of any float dtype, never rounding the product to theirs."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif fp32_output_gemm(acc.device):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk for chunk logits about the size of the hidden states (a power of two, 256 to 8192)."""
    ratio = max(1, math.ceil(vocab / max(hidden, 1)))
    return min(max(_dispatch.next_power_of_2(math.ceil(max(n_tokens, 1) / ratio)), 256), 8192)


def padded_vocab(vocab: int) -> int:
    """The row stride of the chunk logits buffer: the vocabulary rounded up to a multiple of 64 elements."""
    return -(-vocab // 64) * 64


def _kernel_config(vocab: int) -> tuple[int, int]:
    """Vocab block (32 KB of fp32 at most, looped over) and warps: 16 warps keep 16 values per thread at 8192."""
    block = min(_dispatch.next_power_of_2(vocab), 8192)
    return block, max(4, min(16, block // 512))


@torch.library.custom_op("zhllm::fused_linear_cross_entropy_forward", mutates_args=())
def fused_linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``weight [V, H]``, ``targets [N]`` → (loss, grad_hidden, grad_weight) of that loss.

    loss is fp32: a scalar, or ``[N]`` for ``reduction="none"``. A gradient not asked for is an empty tensor.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.contiguous()
    losses = _dispatch.empty((n_tokens,), torch.float32, hidden.device)
    # Counted on the device: no host sync. "sum" (and "none") scale the gradient by 1.
    if reduction == "mean":
        grad_scale = 1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    lifted = hidden.dtype == torch.float16
    if lifted:  # fp16: the kernel writes the gradient × FP16_GRAD_LIFT; 1/n and 1/lift are applied in fp32 below
        kernel_scale = torch.full((), FP16_GRAD_LIFT, dtype=torch.float32, device=hidden.device)
    else:
        kernel_scale = grad_scale
    write_grad = need_grad_hidden or need_grad_weight
    grad_hidden = hidden.new_empty(0)
    if need_grad_hidden:
        grad_hidden = _dispatch.empty(hidden.shape, stored_grad_dtype(hidden.dtype), hidden.device)
    starts = range(0, n_tokens, chunk_size)
    # Several chunks (or any fp16 chunk) sum into an fp32 buffer; one bf16/fp32 chunk needs none, its one
    # matmul already accumulates in fp32 before rounding.
    accumulate = need_grad_weight and (len(starts) > 1 or lifted)
    grad_weight, grad_weight_acc, product = weight.new_empty(0), None, None
    if accumulate:
        grad_weight_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if weight.dtype == torch.bfloat16 and not fp32_output_gemm(weight.device):
            product = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    elif need_grad_weight:  # zeros: with no tokens at all no chunk writes it
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)

    block, num_warps = _kernel_config(vocab)
    # Rows padded to padded_vocab(V) elements: every row starts 128-byte aligned, for the kernel's vector
    # accesses and cuBLAS's aligned kernels (an odd vocabulary such as 35,023 would leave every row unaligned).
    logits_buffer = torch.empty(
        (min(chunk_size, n_tokens), padded_vocab(vocab)), dtype=hidden.dtype, device=hidden.device
    )[:, :vocab]
    for start in starts:
        end = min(start + chunk_size, n_tokens)
        h_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        torch.mm(h_chunk, weight.t(), out=logits)
        _cross_entropy_rows_kernel[(end - start,)](
            logits,
            targets[start:end],
            losses[start:end],
            kernel_scale,
            logits.stride(0),
            vocab,
            ignore_index,
            float(z_loss),
            WRITE_GRAD=write_grad,
            BLOCK=block,
            num_warps=num_warps,
        )
        # logits now holds d(loss)/d(logits) of this chunk (× FP16_GRAD_LIFT in fp16).
        if need_grad_hidden and lifted:
            mm_fp32_out(logits, weight, grad_hidden[start:end])
        elif need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if not need_grad_weight:
            continue
        if not accumulate:
            torch.mm(logits.t(), h_chunk, out=grad_weight)
        elif product is None:
            addmm_fp32_(grad_weight_acc, logits.t(), h_chunk)
        else:
            grad_weight_acc.add_(torch.mm(logits.t(), h_chunk, out=product))
    if lifted:
        unlift = grad_scale / FP16_GRAD_LIFT
        if need_grad_hidden:
            grad_hidden.mul_(unlift)
        if grad_weight_acc is not None:
            grad_weight = grad_weight_acc.mul_(unlift)  # kept in fp32 until backward has applied grad_output
    elif grad_weight_acc is not None:
        grad_weight = grad_weight_acc.to(weight.dtype)

    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() * grad_scale if reduction == "mean" else losses.sum()
    return loss, grad_hidden, grad_weight


@fused_linear_cross_entropy_forward.register_fake
def _(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss_shape = (hidden.shape[0],) if reduction == "none" else ()
    grad_dtype = stored_grad_dtype(hidden.dtype)
    return (
        hidden.new_empty(loss_shape, dtype=torch.float32),
        hidden.new_empty(hidden.shape, dtype=grad_dtype) if need_grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape, dtype=grad_dtype) if need_grad_weight else weight.new_empty(0),
    )


def _times(grad: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * grad_output`` computed in fp32 (grad_output is not rounded to bf16 first), returned in the input's
    ``dtype``; always multiplied, since testing ``grad_output == 1`` would sync with the host."""
    if grad.dtype == torch.float32 and dtype == torch.float32:
        return grad * grad_output
    return (grad.float() * grad_output).to(dtype)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for the fused op: forward computes the gradients, backward scales them by grad_output."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        z_loss: float,
        chunk_size: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> torch.Tensor:
        h2d = hidden.reshape(-1, hidden.shape[-1])
        loss, grad_hidden, grad_weight = torch.ops.zhllm.fused_linear_cross_entropy_forward(
            h2d,
            weight,
            targets.reshape(-1),
            ignore_index,
            reduction,
            z_loss,
            chunk_size,
            need_grad_hidden,
            need_grad_weight,
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_shape, ctx.computed = hidden.shape, (need_grad_hidden, need_grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss.reshape(targets.shape) if reduction == "none" else loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        with_hidden, with_weight = ctx.computed
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = _times(grad_hidden, grad_output, hidden_dtype).reshape(ctx.hidden_shape) if with_hidden else None
        grad_weight = _times(grad_weight, grad_output, weight_dtype) if with_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
) -> None:
    """One-line errors that say what to pass instead."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_NAME}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{_NAME}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
            "pass hidden [..., H] and the lm_head weight [V, H]"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{_NAME}: targets {tuple(targets.shape)} must have hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (one target id per token)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_NAME}: targets have dtype {targets.dtype}; pass token ids as int64 (.long())")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{_NAME}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    _dispatch.check_float("hidden", hidden)
    _dispatch.check_same_device(hidden=hidden, weight=weight, targets=targets)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{_NAME}: chunk_size must be a positive number of tokens, got {chunk_size}")
    # Checked only where it costs no host sync (CPU, eager; torch.compile cannot branch on data): else a NaN loss.
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"{_NAME}: targets hold ids outside [0, {weight.shape[0]}) such as "
                f"{int(targets[bad][0])}; use ignore_index={ignore_index} for tokens without a target"
            )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` (fp32 loss) without storing the logits.

    ``hidden [..., H]``, ``weight [V, H]``, ``targets [...]``; "mean" is over tokens whose target is not
    ``ignore_index`` (0 when there are none); ``z_loss`` adds ``z_loss * logsumexp**2`` per counted token;
    "none" gives per-token losses, forward only. ``chunk_size`` tokens per matmul (default: logits ≈ hidden size).
    Under ``torch.autocast`` both inputs are cast to the autocast dtype first.
    """
    dtype = _dispatch.autocast_dtype(hidden.device.type)
    if dtype is not None and hidden.is_floating_point() and weight.is_floating_point():
        # the lm_head matmul in the autocast dtype, as F.linear would run it
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    _check_inputs(hidden, weight, targets, ignore_index, reduction, chunk_size)
    need_grad_hidden = torch.is_grad_enabled() and hidden.requires_grad
    need_grad_weight = torch.is_grad_enabled() and weight.requires_grad
    if reduction == "none" and (need_grad_hidden or need_grad_weight):
        raise ValueError(
            "fused_linear_cross_entropy: reduction='none' is forward only; train with 'mean' or 'sum', "
            "or compute per-token losses under torch.no_grad()"
        )
    if not _dispatch.use_triton(hidden, weight, targets):
        return reference.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, z_loss)
    n_tokens = targets.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n_tokens, weight.shape[0], weight.shape[1])
    return FusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        targets,
        int(ignore_index),
        reduction,
        float(z_loss),
        int(chunk_size),
        need_grad_hidden,
        need_grad_weight,
    )


class FusedLinearCrossEntropyLoss(nn.Module):
    """``loss_fn(hidden, lm_head.weight, targets)``: the lm_head projection and the cross-entropy in one op."""

    def __init__(
        self, ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"FusedLinearCrossEntropyLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ignore_index, self.reduction, self.z_loss, self.chunk_size = ignore_index, reduction, z_loss, chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden, weight, targets, self.ignore_index, self.reduction, self.z_loss, self.chunk_size
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, z_loss={self.z_loss}"
