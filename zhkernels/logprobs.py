"""Fused linear log-probs: each target token's ``log_softmax(hidden @ weight.T / T)[target]`` without ever
storing the ``[N, V]`` logits (DPO's and GRPO's sequence log-probs, a distillation's targets).

Tokens go through in chunks, as in :mod:`zhkernels.cross_entropy`. Forward: cuBLAS computes a chunk's logits,
ONE Triton kernel turns each row into its log-prob and keeps its log-sum-exp (4 bytes a token), the chunk is
dropped. Backward: the upstream gradient ``g`` is one number per token, known only now (DPO's weights each
pair's tokens by its sigmoid), so the chunk's logits are recomputed, the kernel overwrites them in place with
``g * (onehot(target) - softmax) / T`` from the saved log-sum-exp (no second reduction), and two matmuls give
the chunk's share of grad_hidden and grad_weight. Four matmuls instead of eager's three, for memory that does
not grow with N times V.

Memory, N tokens, H hidden, V vocab, chunk c (default: chunk logits ≈ the hidden states' size), b bytes:
  forward: c*V*b at peak; kept for backward: N*4 (log-sum-exp) plus references to hidden and weight;
  backward: c*V*b + N*H*b (grad_hidden) + V*H*4 (fp32 grad_weight accumulator, only when weight needs grad).
  Eager ``log_softmax(hidden @ W.T).gather(...)`` keeps N*V*b logits and N*V*b log-softmax (fp32 when upcast) to
  backward. At 16k tokens x 35,023 x 896 bf16: ours ≈ 29 MB forward (c = 512) against eager's 2.3 GB.

Precision: the logits are in the input dtype (cuBLAS with fp32 accumulation, as an eager half-precision
lm_head); the log-sum-exp, softmax and gradient are fp32 inside the kernel; the log-probs are fp32. In fp16 the
stored gradient ``g * (onehot - softmax)`` is rounded to fp16 as eager fp16 rounds it (``g`` carries a
GradScaler's scale); grad_weight sums chunks in fp32.

Caveats as for cross-entropy: on CUDA, targets outside ``[0, V)`` (other than ignore_index) give NaN (a check
would sync with the host); CPU tensors are checked and raise.

Layering: Triton kernels → custom ops ``torch.ops.zhllm.fused_linear_logprobs_forward`` / ``_backward`` (with
fake implementations, so ``torch.compile(fullgraph=True)`` traces them) → ``FusedLinearLogprobsFunction`` →
``fused_linear_logprobs`` (CPU tensors go to :func:`zhkernels.reference.fused_linear_logprobs`).
"""

from __future__ import annotations

import torch

from . import _dispatch, reference
from ._dispatch import HAS_TRITON
from .cross_entropy import _kernel_config, addmm_fp32_, default_chunk_size, padded_vocab

_NAME = "fused_linear_logprobs"

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _logprobs_forward_kernel(
        logits_ptr, targets_ptr, logprobs_ptr, lse_ptr, row_stride, n_vocab, ignore_index, inv_t, BLOCK: tl.constexpr
    ):
        """One row per program: log-sum-exp of ``logits / T`` and the target's log-prob (both 0 when ignored).

        Rows are ``row_stride`` (a multiple of 64 ≥ n_vocab) apart; columns from n_vocab on count as -inf.
        """
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        counted = target != ignore_index
        ignored = target == ignore_index  # not ~counted: Triton < 3.4's interpreter cannot invert an int1
        in_range = (target >= 0) & (target < n_vocab)
        n_read = tl.where(counted, row_stride, 0)
        # Online log-sum-exp: after each block m is the max of the scaled logits read so far and s the sum of
        # exp(x - m) over them, so m + log(s) is their log-sum-exp with nothing overflowing.
        m = float("-inf")
        s = 0.0
        for start in range(0, n_read, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < row_stride, other=float("-inf")).to(tl.float32) * inv_t
            x = tl.where(cols < n_vocab, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = tl.where(counted, m + tl.log(tl.where(counted, s, 1.0)), 0.0)
        target_logit = tl.load(row_ptr + target, mask=counted & in_range, other=0.0).to(tl.float32) * inv_t
        logprob = tl.where(counted, target_logit - lse, 0.0)
        logprob = tl.where(in_range | ignored, logprob, float("nan"))  # a bad target on CUDA shows as NaN
        tl.store(logprobs_ptr + row, logprob)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _logprobs_backward_kernel(
        logits_ptr, targets_ptr, lse_ptr, grad_ptr, row_stride, n_vocab, ignore_index, inv_t, BLOCK: tl.constexpr
    ):
        """One row per program: its logits overwritten in place by ``g * (onehot(target) - softmax(x / T)) / T``,
        from the log-sum-exp the forward saved; ignored rows and the padding columns get zeros."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        counted = target != ignore_index
        lse = tl.load(lse_ptr + row)
        coef = tl.where(counted, tl.load(grad_ptr + row).to(tl.float32) * inv_t, 0.0)
        n_read = tl.where(counted, row_stride, 0)
        for start in range(0, row_stride, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32) * inv_t
            x = tl.where(cols < n_vocab, x, float("-inf"))
            grad = coef * (tl.where(cols == target, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < row_stride)


def _chunk_logits(n_rows: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """A ``[n_rows, V]`` view of rows padded to :func:`padded_vocab` (128-byte aligned rows whatever V)."""
    return torch.empty((n_rows, padded_vocab(vocab)), dtype=like.dtype, device=like.device)[:, :vocab]


@torch.library.custom_op("zhllm::fused_linear_logprobs_forward", mutates_args=())
def fused_linear_logprobs_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, inv_t: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``weight [V, H]``, ``targets [N]`` → (log-probs [N], log-sum-exp [N]), both fp32."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.contiguous()
    logprobs = _dispatch.empty((n_tokens,), torch.float32, hidden.device)
    lse = _dispatch.empty((n_tokens,), torch.float32, hidden.device)
    block, num_warps = _kernel_config(vocab)
    buffer = _chunk_logits(min(chunk_size, n_tokens), vocab, hidden)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        logits = buffer[: end - start]
        torch.mm(hidden[start:end], weight.t(), out=logits)
        _logprobs_forward_kernel[(end - start,)](
            logits,
            targets[start:end],
            logprobs[start:end],
            lse[start:end],
            logits.stride(0),
            vocab,
            ignore_index,
            inv_t,
            BLOCK=block,
            num_warps=num_warps,
        )
    return logprobs, lse


@fused_linear_logprobs_forward.register_fake
def _(hidden, weight, targets, ignore_index, inv_t, chunk_size):
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("zhllm::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    inv_t: float,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad [N]`` (d loss / d log-prob) → (grad_hidden [N, H], grad_weight [V, H]); one not asked for is empty."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    targets, grad = targets.contiguous(), grad.contiguous()
    grad_hidden = (
        _dispatch.empty(hidden.shape, hidden.dtype, hidden.device) if need_grad_hidden else hidden.new_empty(0)
    )
    starts = range(0, n_tokens, chunk_size)
    accumulate = need_grad_weight and (len(starts) > 1 or weight.dtype == torch.float16)
    grad_weight = weight.new_empty(0)
    acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if accumulate else None
    if need_grad_weight and not accumulate:  # zeros: with no tokens at all no chunk writes it
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    block, num_warps = _kernel_config(vocab)
    buffer = _chunk_logits(min(chunk_size, n_tokens), vocab, hidden)
    for start in starts:
        end = min(start + chunk_size, n_tokens)
        h_chunk, logits = hidden[start:end], buffer[: end - start]
        torch.mm(h_chunk, weight.t(), out=logits)  # recomputed: cheaper in memory than keeping N x V
        _logprobs_backward_kernel[(end - start,)](
            logits,
            targets[start:end],
            lse[start:end],
            grad[start:end],
            logits.stride(0),
            vocab,
            ignore_index,
            inv_t,
            BLOCK=block,
            num_warps=num_warps,
        )
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if acc is not None:
            addmm_fp32_(acc, logits.t(), h_chunk)
        elif need_grad_weight:
            torch.mm(logits.t(), h_chunk, out=grad_weight)
    if acc is not None:
        grad_weight = acc.to(weight.dtype)
    return grad_hidden, grad_weight


@fused_linear_logprobs_backward.register_fake
def _(grad, hidden, weight, targets, lse, ignore_index, inv_t, chunk_size, need_grad_hidden, need_grad_weight):
    return (
        hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0),
    )


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Autograd for the fused op: forward keeps the log-sum-exp, backward recomputes the chunks' logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, inv_t: float, chunk_size: int) -> torch.Tensor:
        h2d, t1d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        logprobs, lse = torch.ops.zhllm.fused_linear_logprobs_forward(h2d, weight, t1d, ignore_index, inv_t, chunk_size)
        ctx.save_for_backward(h2d, weight, t1d, lse)
        ctx.args = (ignore_index, inv_t, chunk_size)
        ctx.hidden_shape = hidden.shape
        return logprobs.reshape(targets.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        h2d, weight, t1d, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden, grad_weight = torch.ops.zhllm.fused_linear_logprobs_backward(
            grad_output.reshape(-1).float(), h2d, weight, t1d, lse, *ctx.args, need_hidden, need_weight
        )
        return (
            grad_hidden.reshape(ctx.hidden_shape) if need_hidden else None,
            grad_weight if need_weight else None,
            None,
            None,
            None,
            None,
        )


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> None:
    """One-line errors that say what to pass instead."""
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{_NAME}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
            "pass hidden [..., H] and the lm_head weight [V, H]"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"{_NAME}: targets {tuple(targets.shape)} must have hidden's leading shape (one id a token)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_NAME}: targets have dtype {targets.dtype}; pass token ids as int64 (.long())")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{_NAME}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if not temperature > 0:
        raise ValueError(f"{_NAME}: temperature must be > 0, got {temperature}")
    _dispatch.check_float("hidden", hidden)
    _dispatch.check_same_device(hidden=hidden, weight=weight, targets=targets)
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"{_NAME}: targets hold ids outside [0, {weight.shape[0]}) such as {int(targets[bad][0])}; "
                f"use ignore_index={ignore_index} for tokens without a target"
            )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T / temperature)`` at each target, fp32 ``[...]`` (0 where ``ignore_index``),
    differentiable in ``hidden`` and ``weight``, without storing the logits.

    ``hidden [..., H]``, ``weight [V, H]``, ``targets [...]``; a sequence's log-prob is the sum over its reply's
    tokens. Under ``torch.autocast`` both inputs are cast to the autocast dtype first, as ``F.linear`` would.
    """
    dtype = _dispatch.autocast_dtype(hidden.device.type)
    if dtype is not None and hidden.is_floating_point() and weight.is_floating_point():
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    _check_inputs(hidden, weight, targets, ignore_index, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{_NAME}: chunk_size must be a positive number of tokens, got {chunk_size}")
    if not _dispatch.use_triton(hidden, weight, targets):
        return reference.fused_linear_logprobs(hidden, weight, targets, ignore_index, temperature)
    if chunk_size is None:
        chunk_size = default_chunk_size(targets.numel(), weight.shape[0], weight.shape[1])
    return FusedLinearLogprobsFunction.apply(
        hidden, weight, targets, int(ignore_index), 1.0 / float(temperature), int(chunk_size)
    )
