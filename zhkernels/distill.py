"""Fused knowledge-distillation loss: ``(1−α)·CE + α·T²·D(teacher, student)`` of two models' lm_heads without ever
storing either model's ``[N, V]`` logits (the student side's gradients; the teacher is a constant).

Tokens go through in chunks, as in :mod:`zhkernels.logprobs`. Forward: cuBLAS computes a chunk's student and
teacher logits, ONE Triton kernel per row reads both rows and keeps six fp32 statistics of it (the student's
log-sum-exp at T = 1 for the cross-entropy; the student's and the teacher's max and log-sum at temperature T, kept
apart so log-softmax stays exact to ~1e-7 however large the logits; the divergence's own sum, which its gradient
needs), writes the row's cross-entropy and T²-scaled divergence, and the chunk is dropped. Backward: the upstream
gradients of ``ce`` and ``divergence`` (``loss`` reaches both through autograd) are known only now, so both
chunks' logits are recomputed, the kernel overwrites the student's in place with d(ce, divergence)/d(student
logits) from the saved statistics (no second reduction), and two matmuls give the chunk's share of grad_hidden
and grad_weight. Gradients per row, p = softmax(logits / T), K = the row's sum::

    ce:       softmax(s) − onehot(label)
    forward:  T·(p_s − p_t)                          D = KL(t‖s)
    reverse:  T·p_s·(log p_s − log p_t − D)          D = KL(s‖t)
    jsd:      T·(1−β)·p_s·(log p_s − log m − K)      D = β·KL(t‖m) + (1−β)·K, K = KL(s‖m), m = β·p_t + (1−β)·p_s

each times its output's upstream gradient over n, the number of counted tokens (a device tensor: no host sync).

Memory, N tokens, Hs/Ht hidden, V vocab, chunk c (default: a student chunk's logits ≈ its hidden states' size,
at least 256 tokens), bs/bt the student's and teacher's bytes per element:
  forward: c*V*(bs + bt) at peak; kept for backward: N*24 (six fp32 statistics a token) plus references to the
  four inputs; backward: c*V*(bs + bt) + N*Hs*bs (grad_hidden) + V*Hs*4 (fp32 grad_weight accumulator, several
  chunks). Eager :func:`zhkernels.reference.distill_loss` keeps both models' fp32 logits, their log-softmaxes and
  products, several N*V*4 tensors. At 8,192 tokens x 35,023 x (512, 768) bf16, forward + backward, counted by
  ``bench/test_distill_step.py``: ours 145 MiB at peak (c = 256: 2 x 17 MiB of chunk logits, the rest grad_weight
  and its fp32 accumulator) against eager's 9,959 MiB.

Precision: the logits are in the inputs' dtypes (cuBLAS with fp32 accumulation, as an eager half-precision
lm_head); the log-sum-exps, softmaxes, divergence and gradient are fp32 inside the kernel; the outputs are fp32.
The stored gradient is rounded to the student's dtype (in fp16 as eager fp16 rounds it: a GradScaler's scale,
carried by the upstream gradient, keeps it in range); grad_weight sums chunks in fp32.

Teacher inputs are detached: no gradient reaches them. Caveats as for cross-entropy: on CUDA, labels outside
``[0, V)`` (other than ignore_index) give NaN; CPU tensors are checked and raise.

Layering: Triton kernels → custom ops ``torch.ops.zhllm.fused_distill_loss_forward`` / ``_backward`` (with fake
implementations, so ``torch.compile(fullgraph=True)`` traces them) → ``FusedDistillLossFunction`` (→ ``ce``,
``divergence``) → ``fused_distill_loss`` (adds ``loss``; CPU tensors go to :func:`zhkernels.reference.distill_loss`).
"""

from __future__ import annotations

import math

import torch

from . import _dispatch, reference
from ._dispatch import HAS_TRITON
from .cross_entropy import addmm_fp32_, default_chunk_size
from .logprobs import _chunk_logits

_NAME = "fused_distill_loss"
#: The divergences, as the kernels' ``KIND``.
KINDS = {"forward": 0, "reverse": 1, "jsd": 2}
#: Per-token fp32 statistics kept for backward: lse(s); max and log-sum of s / T and of t / T; the divergence's sum.
N_STATS = 6

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _distill_forward_kernel(
        s_ptr,
        t_ptr,
        labels_ptr,
        ce_ptr,
        div_ptr,
        stats_ptr,
        row_stride,
        n_vocab,
        ignore_index,
        inv_t,
        t_sq,
        beta,
        log_beta,
        log_1m_beta,
        KIND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row per program: the student's cross-entropy and the T²-scaled divergence (0 when ignored), and the
        row's statistics for backward.

        Both rows are ``row_stride`` (a multiple of 64 ≥ n_vocab) apart; columns from n_vocab on count as -inf.
        Pass 1 takes three online log-sum-exps; pass 2, with them known, sums the divergence as the reference does.
        """
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = s_ptr + row * row_stride, t_ptr + row * row_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        counted = label != ignore_index
        ignored = label == ignore_index  # not ~counted: Triton < 3.4's interpreter cannot invert an int1
        in_range = (label >= 0) & (label < n_vocab)
        n_read = tl.where(counted, row_stride, 0)  # ignored rows read nothing
        # Pass 1, online log-sum-exps: m is the max read so far, s the sum of exp(x - m) over it.
        # One name per statement: Triton < 3.4 cannot carry a loop variable first bound in a tuple of constants.
        m1 = float("-inf")  # student logits (T = 1, the cross-entropy)
        s1 = 0.0
        ma = float("-inf")  # student logits / T
        sa = 0.0
        mb = float("-inf")  # teacher logits / T
        sb = 0.0
        for start in range(0, n_read, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < row_stride
            valid = cols < n_vocab
            z = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
            z = tl.where(valid, z, float("-inf"))
            b = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
            b = tl.where(valid, b * inv_t, float("-inf"))
            a = z * inv_t
            m1_new = tl.maximum(m1, tl.max(z, axis=0))
            s1 = s1 * tl.exp(m1 - m1_new) + tl.sum(tl.exp(z - m1_new), axis=0)
            m1 = m1_new
            ma_new = tl.maximum(ma, tl.max(a, axis=0))
            sa = sa * tl.exp(ma - ma_new) + tl.sum(tl.exp(a - ma_new), axis=0)
            ma = ma_new
            mb_new = tl.maximum(mb, tl.max(b, axis=0))
            sb = sb * tl.exp(mb - mb_new) + tl.sum(tl.exp(b - mb_new), axis=0)
            mb = mb_new
        lse1 = tl.where(counted, m1 + tl.log(tl.where(counted, s1, 1.0)), 0.0)  # ignored rows: 0, not -inf
        # At temperature T the max and the log of the sum stay apart: log p = (x - m) - log(s) keeps log p exact to
        # ~1e-7 where m + log(s) would round to ulp(m) (4e-6 at 50), an error reverse KL's gradient multiplies by D.
        ma, la = tl.where(counted, ma, 0.0), tl.log(tl.where(counted, sa, 1.0))
        mb, lb = tl.where(counted, mb, 0.0), tl.log(tl.where(counted, sb, 1.0))
        # Pass 2: the divergence's sums (jsd: of t and of s against the mixture), elementwise as the reference.
        acc_t = 0.0
        acc_s = 0.0
        for start in range(0, n_read, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < row_stride
            valid = cols < n_vocab
            z = tl.load(s_row + cols, mask=inside, other=0.0).to(tl.float32)
            z = tl.where(valid, z, 0.0)  # padding columns hold anything: keep them finite, then out of the sums
            b = tl.load(t_row + cols, mask=inside, other=0.0).to(tl.float32)
            b = tl.where(valid, b, 0.0)
            log_ps = (z * inv_t - ma) - la
            log_pt = (b * inv_t - mb) - lb
            if KIND == 0:
                term_t = tl.exp(log_pt) * (log_pt - log_ps)
                acc_t += tl.sum(tl.where(valid, term_t, 0.0), axis=0)
            elif KIND == 1:
                term_s = tl.exp(log_ps) * (log_ps - log_pt)
                acc_s += tl.sum(tl.where(valid, term_s, 0.0), axis=0)
            else:
                x = log_pt + log_beta  # log m = logaddexp(log β + log p_t, log(1 − β) + log p_s)
                y = log_ps + log_1m_beta
                hi = tl.maximum(x, y)
                log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))
                term_t = tl.exp(log_pt) * (log_pt - log_m)
                term_s = tl.exp(log_ps) * (log_ps - log_m)
                acc_t += tl.sum(tl.where(valid, term_t, 0.0), axis=0)
                acc_s += tl.sum(tl.where(valid, term_s, 0.0), axis=0)
        if KIND == 0:
            div = acc_t
        elif KIND == 1:
            div = acc_s
        else:
            div = beta * acc_t + (1.0 - beta) * acc_s
        label_logit = tl.load(s_row + label, mask=counted & in_range, other=0.0).to(tl.float32)
        ce = tl.where(counted, lse1 - label_logit, 0.0)
        ce = tl.where(in_range | ignored, ce, float("nan"))  # a bad label on CUDA shows as NaN
        div = tl.where(counted, div * t_sq, 0.0)
        tl.store(ce_ptr + row, ce)
        tl.store(div_ptr + row, div)
        stats_row = stats_ptr + row * 6
        tl.store(stats_row, lse1)
        tl.store(stats_row + 1, ma)
        tl.store(stats_row + 2, la)
        tl.store(stats_row + 3, mb)
        tl.store(stats_row + 4, lb)
        tl.store(stats_row + 5, tl.where(counted, acc_s, 0.0))  # reverse: D itself; jsd: K = KL(s‖m)

    @triton.jit
    def _distill_backward_kernel(
        s_ptr,
        t_ptr,
        labels_ptr,
        stats_ptr,
        coef_ptr,
        row_stride,
        n_vocab,
        ignore_index,
        inv_t,
        beta,
        log_beta,
        log_1m_beta,
        KIND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row per program: the student's logits overwritten in place by ``c_ce * (softmax(s) - onehot) +
        c_div * dD/d(s / T)`` from the forward's statistics (``coef_ptr`` holds c_ce = g_ce / n and
        c_div = g_div * T / n); ignored rows and the padding columns get zeros."""
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = s_ptr + row * row_stride, t_ptr + row * row_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        counted = label != ignore_index
        stats_row = stats_ptr + row * 6
        lse1 = tl.load(stats_row)
        ma = tl.load(stats_row + 1)
        la = tl.load(stats_row + 2)
        mb = tl.load(stats_row + 3)
        lb = tl.load(stats_row + 4)
        aux = tl.load(stats_row + 5)
        c_ce = tl.where(counted, tl.load(coef_ptr), 0.0)
        c_div = tl.where(counted, tl.load(coef_ptr + 1), 0.0)
        n_read = tl.where(counted, row_stride, 0)
        for start in range(0, row_stride, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < row_stride
            keep = (cols < n_vocab) & (cols < n_read)
            z = tl.load(s_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
            z = tl.where(keep, z, 0.0)  # padding columns hold anything: keep them finite, then zero their gradient
            b = tl.load(t_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
            b = tl.where(keep, b, 0.0)
            log_ps = (z * inv_t - ma) - la
            log_pt = (b * inv_t - mb) - lb
            p_s = tl.exp(log_ps)
            if KIND == 0:
                d_div = p_s - tl.exp(log_pt)
            elif KIND == 1:
                d_div = p_s * (log_ps - log_pt - aux)
            else:
                x = log_pt + log_beta  # log m = logaddexp(log β + log p_t, log(1 − β) + log p_s)
                y = log_ps + log_1m_beta
                hi = tl.maximum(x, y)
                log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))
                d_div = (1.0 - beta) * p_s * (log_ps - log_m - aux)
            d_ce = tl.exp(z - lse1) - tl.where(cols == label, 1.0, 0.0)
            grad = tl.where(keep, c_ce * d_ce + c_div * d_div, 0.0)
            tl.store(s_row + cols, grad.to(s_ptr.dtype.element_ty), mask=inside)


def _kernel_config(vocab: int) -> tuple[int, int]:
    """Vocab block (4,096 at most: two rows and their temporaries live at once) and warps (8 values a thread)."""
    block = min(_dispatch.next_power_of_2(vocab), 4096)
    return block, max(4, min(16, block // 256))


def _jsd_logs(kind: str, beta: float) -> tuple[float, float]:
    """log β and log(1 − β) for the jsd mixture (unused otherwise)."""
    return (math.log(beta), math.log1p(-beta)) if kind == "jsd" else (0.0, 0.0)


@torch.library.custom_op("zhllm::fused_distill_loss_forward", mutates_args=())
def fused_distill_loss_forward(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    kind: str,
    beta: float,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``s_hidden [N, Hs]``, ``s_weight [V, Hs]``, ``t_hidden [N, Ht]``, ``t_weight [V, Ht]``, ``labels [N]`` →
    (ce, divergence, stats): fp32 means over the counted tokens (0-d) and the ``[N, 6]`` fp32 row statistics."""
    n_tokens, vocab = s_hidden.shape[0], s_weight.shape[0]
    labels = labels.contiguous()
    ce_rows = _dispatch.empty((n_tokens,), torch.float32, s_hidden.device)
    div_rows = _dispatch.empty((n_tokens,), torch.float32, s_hidden.device)
    stats = _dispatch.empty((n_tokens, N_STATS), torch.float32, s_hidden.device)
    block, num_warps = _kernel_config(vocab)
    log_beta, log_1m_beta = _jsd_logs(kind, beta)
    rows = min(chunk_size, n_tokens)
    s_buffer, t_buffer = _chunk_logits(rows, vocab, s_hidden), _chunk_logits(rows, vocab, t_hidden)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        s_logits, t_logits = s_buffer[: end - start], t_buffer[: end - start]
        torch.mm(s_hidden[start:end], s_weight.t(), out=s_logits)
        torch.mm(t_hidden[start:end], t_weight.t(), out=t_logits)
        _distill_forward_kernel[(end - start,)](
            s_logits,
            t_logits,
            labels[start:end],
            ce_rows[start:end],
            div_rows[start:end],
            stats[start:end],
            s_logits.stride(0),
            vocab,
            ignore_index,
            inv_t,
            1.0 / (inv_t * inv_t),
            beta,
            log_beta,
            log_1m_beta,
            KIND=KINDS[kind],
            BLOCK=block,
            num_warps=num_warps,
        )
    n = (labels != ignore_index).sum().clamp(min=1)  # on the device: no host sync
    return ce_rows.sum() / n, div_rows.sum() / n, stats


@fused_distill_loss_forward.register_fake
def _(s_hidden, s_weight, t_hidden, t_weight, labels, inv_t, kind, beta, ignore_index, chunk_size):
    scalar = s_hidden.new_empty((), dtype=torch.float32)
    return scalar, scalar.clone(), s_hidden.new_empty((s_hidden.shape[0], N_STATS), dtype=torch.float32)


@torch.library.custom_op("zhllm::fused_distill_loss_backward", mutates_args=())
def fused_distill_loss_backward(
    grad_ce: torch.Tensor,
    grad_div: torch.Tensor,
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    inv_t: float,
    kind: str,
    beta: float,
    ignore_index: int,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_ce``, ``grad_div`` (0-d) → (grad of s_hidden [N, Hs], of s_weight [V, Hs]); one not asked for is
    empty."""
    n_tokens, vocab = s_hidden.shape[0], s_weight.shape[0]
    labels, stats = labels.contiguous(), stats.contiguous()
    n = (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    # c_ce = g_ce / n, c_div = g_div * T / n (d(T² D)/d s = T * dD/d(s / T)), on the device.
    coef = (torch.stack([grad_ce.float().reshape(()), grad_div.float().reshape(()) / inv_t]) / n).contiguous()
    grad_hidden = (
        _dispatch.empty(s_hidden.shape, s_hidden.dtype, s_hidden.device) if need_grad_hidden else s_hidden.new_empty(0)
    )
    starts = range(0, n_tokens, chunk_size)
    accumulate = need_grad_weight and (len(starts) > 1 or s_weight.dtype == torch.float16)
    grad_weight = s_weight.new_empty(0)
    acc = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if accumulate else None
    if need_grad_weight and not accumulate:  # zeros: with no tokens at all no chunk writes it
        grad_weight = torch.zeros(s_weight.shape, dtype=s_weight.dtype, device=s_weight.device)
    block, num_warps = _kernel_config(vocab)
    log_beta, log_1m_beta = _jsd_logs(kind, beta)
    rows = min(chunk_size, n_tokens)
    s_buffer, t_buffer = _chunk_logits(rows, vocab, s_hidden), _chunk_logits(rows, vocab, t_hidden)
    for start in starts:
        end = min(start + chunk_size, n_tokens)
        h_chunk, s_logits, t_logits = s_hidden[start:end], s_buffer[: end - start], t_buffer[: end - start]
        torch.mm(h_chunk, s_weight.t(), out=s_logits)  # recomputed: cheaper in memory than keeping N x V
        torch.mm(t_hidden[start:end], t_weight.t(), out=t_logits)
        _distill_backward_kernel[(end - start,)](
            s_logits,
            t_logits,
            labels[start:end],
            stats[start:end],
            coef,
            s_logits.stride(0),
            vocab,
            ignore_index,
            inv_t,
            beta,
            log_beta,
            log_1m_beta,
            KIND=KINDS[kind],
            BLOCK=block,
            num_warps=num_warps,
        )
        if need_grad_hidden:
            torch.mm(s_logits, s_weight, out=grad_hidden[start:end])
        if acc is not None:
            addmm_fp32_(acc, s_logits.t(), h_chunk)
        elif need_grad_weight:
            torch.mm(s_logits.t(), h_chunk, out=grad_weight)
    if acc is not None:
        grad_weight = acc.to(s_weight.dtype)
    return grad_hidden, grad_weight


@fused_distill_loss_backward.register_fake
def _(
    grad_ce,
    grad_div,
    s_hidden,
    s_weight,
    t_hidden,
    t_weight,
    labels,
    stats,
    inv_t,
    kind,
    beta,
    ignore_index,
    chunk_size,
    need_grad_hidden,
    need_grad_weight,
):
    return (
        s_hidden.new_empty(s_hidden.shape) if need_grad_hidden else s_hidden.new_empty(0),
        s_weight.new_empty(s_weight.shape) if need_grad_weight else s_weight.new_empty(0),
    )


class FusedDistillLossFunction(torch.autograd.Function):
    """Autograd for the fused op → ``(ce, divergence)``: forward keeps six fp32 statistics a token, backward
    recomputes both models' chunk logits. Differentiable in the student's hidden states and weight only."""

    @staticmethod
    def forward(
        ctx,
        s_hidden: torch.Tensor,
        s_weight: torch.Tensor,
        t_hidden: torch.Tensor,
        t_weight: torch.Tensor,
        labels: torch.Tensor,
        inv_t: float,
        kind: str,
        beta: float,
        ignore_index: int,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s2d, t2d = s_hidden.reshape(-1, s_hidden.shape[-1]), t_hidden.reshape(-1, t_hidden.shape[-1])
        flat = labels.reshape(-1)
        ce, div, stats = torch.ops.zhllm.fused_distill_loss_forward(
            s2d, s_weight, t2d, t_weight, flat, inv_t, kind, beta, ignore_index, chunk_size
        )
        ctx.save_for_backward(s2d, s_weight, t2d, t_weight, flat, stats)
        ctx.args = (inv_t, kind, beta, ignore_index, chunk_size)
        ctx.hidden_shape = s_hidden.shape
        return ce, div

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce: torch.Tensor, grad_div: torch.Tensor):
        s2d, s_weight, t2d, t_weight, flat, stats = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden, grad_weight = torch.ops.zhllm.fused_distill_loss_backward(
            grad_ce, grad_div, s2d, s_weight, t2d, t_weight, flat, stats, *ctx.args, need_hidden, need_weight
        )
        return (
            grad_hidden.reshape(ctx.hidden_shape) if need_hidden else None,
            grad_weight if need_weight else None,
            *(None,) * 8,
        )


def _check_inputs(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kind: str,
    beta: float,
    ignore_index: int,
    chunk_size: int | None,
) -> None:
    """One-line errors that say what to pass instead."""
    for who, hidden, weight in (("student", s_hidden, s_weight), ("teacher", t_hidden, t_weight)):
        if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{_NAME}: {who} hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
                "pass hidden [..., H] and that model's lm_head weight [V, H]"
            )
        if hidden.dtype != weight.dtype:
            raise TypeError(f"{_NAME}: {who} hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
        _dispatch.check_float(f"{who} hidden", hidden)
    if s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(
            f"{_NAME}: student vocabulary {s_weight.shape[0]} != teacher vocabulary {t_weight.shape[0]}; "
            "distillation needs one shared tokenizer"
        )
    if labels.shape != s_hidden.shape[:-1] or labels.shape != t_hidden.shape[:-1]:
        raise ValueError(
            f"{_NAME}: labels {tuple(labels.shape)}, student hidden {tuple(s_hidden.shape)} and teacher hidden "
            f"{tuple(t_hidden.shape)} must share the leading shape (one label a token)"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_NAME}: labels have dtype {labels.dtype}; pass token ids as int64 (.long())")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"{_NAME}: temperature must be a finite number > 0, got {temperature}")
    if kind not in KINDS:
        raise ValueError(f"{_NAME}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"{_NAME}: jsd needs 0 < beta < 1 (0 and 1 are kind='forward'/'reverse'), got {beta}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{_NAME}: chunk_size must be a positive number of tokens, got {chunk_size}")
    _dispatch.check_same_device(
        student_hidden=s_hidden,
        student_weight=s_weight,
        teacher_hidden=t_hidden,
        teacher_weight=t_weight,
        labels=labels,
    )
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= s_weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"{_NAME}: labels hold ids outside [0, {s_weight.shape[0]}) such as {int(labels[bad][0])}; "
                f"use ignore_index={ignore_index} for tokens without a label"
            )


def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "forward",
    beta: float = 0.5,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`zhkernels.reference.distill_loss` without storing either model's logits: ``(loss, ce, divergence)``,
    fp32 0-d, ``loss = (1−α)·ce + α·divergence``, means over the counted tokens (0 when there are none).

    ``student_hidden [..., Hs]`` with ``student_weight [V, Hs]``, ``teacher_hidden [..., Ht]`` with
    ``teacher_weight [V, Ht]``, ``labels [...]``; ``kind`` is ``forward`` KL(t‖s), ``reverse`` KL(s‖t) or ``jsd``
    (β, 0 < β < 1); the divergence is T²-scaled, ce at temperature 1. Differentiable in the student's hidden states
    and weight (through all three outputs); the teacher's tensors are detached. ``chunk_size`` tokens per matmul.
    Under ``torch.autocast`` every input is cast to the autocast dtype first, as ``F.linear`` would.
    """
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    dtype = _dispatch.autocast_dtype(student_hidden.device.type)
    if dtype is not None:
        student_hidden, student_weight, teacher_hidden, teacher_weight = (
            t.to(dtype) if t.is_floating_point() else t
            for t in (student_hidden, student_weight, teacher_hidden, teacher_weight)
        )
    _check_inputs(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        temperature,
        kind,
        beta,
        ignore_index,
        chunk_size,
    )
    if not _dispatch.use_triton(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
        return reference.distill_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            alpha=alpha,
            temperature=temperature,
            kind=kind,
            beta=beta,
            ignore_index=ignore_index,
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(labels.numel(), student_weight.shape[0], student_weight.shape[1])
    ce, div = FusedDistillLossFunction.apply(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        1.0 / float(temperature),
        kind,
        float(beta),
        int(ignore_index),
        int(chunk_size),
    )
    return (1 - alpha) * ce + alpha * div, ce, div
