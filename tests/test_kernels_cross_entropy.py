"""Fused linear cross-entropy: the chunked Triton op against zhkernels.reference, loss and both gradients,
reductions, z-loss, ignored tokens (some, a whole chunk, all), fp16/bf16 with huge logits, strided inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    DEVICE,
    LOW_PRECISION,
    ON_GPU,
    assert_fp32_close,
    assert_low_precision_close,
    grads,
    poisoned,
    randn,
    rel_err,
    requires_triton,
)

import zhkernels.cross_entropy as ce
from zhkernels import reference

pytestmark = [requires_triton, poisoned]

IGNORE = -100
ONE = torch.ones((), device=DEVICE)  # grad_output of a scalar loss


def make_inputs(shape, hidden_dim, vocab, dtype=torch.float32, weight_scale=0.5, n_ignored=20, seed=0):
    """hidden [*shape, H] and weight [V, H] requiring grad, targets [*shape] with the first n_ignored ignored."""
    torch.manual_seed(seed)
    hidden = randn(*shape, hidden_dim).to(dtype).requires_grad_()
    weight = randn(vocab, hidden_dim, scale=weight_scale).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, shape, device=DEVICE)
    targets.view(-1)[:n_ignored] = IGNORE
    return hidden, weight, targets


def check_fp32(hidden, weight, targets, grad_out=3.5, **kwargs):
    """Loss and both gradients (for a grad_output other than 1) against the reference, relative error ≤ 1e-5."""
    kwargs_ref = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    ours = ce.fused_linear_cross_entropy(hidden, weight, targets, **kwargs)
    ref = reference.fused_linear_cross_entropy(hidden, weight, targets, **kwargs_ref)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert_fp32_close(ours, ref, what="loss")
    d = torch.full_like(ref, grad_out)
    for a, b, name in zip(grads(ours, [hidden, weight], d), grads(ref, [hidden, weight], d), ("hidden", "weight")):
        assert_fp32_close(a, b, what=f"grad {name}")


@pytest.mark.parametrize(
    "reduction, hidden_dim, vocab, chunk_size",
    [
        ("mean", 64, 6400, None),  # default chunking: one chunk at this size
        ("sum", 96, 6400, 48),  # 154 tokens in chunks of 48: the last chunk is ragged
        ("mean", 64, 35023, 64),  # odd vocab: the last vocab block is masked
    ],
)
def test_fp32_matches_reference(reduction, hidden_dim, vocab, chunk_size):
    hidden, weight, targets = make_inputs((2, 77), hidden_dim, vocab)
    check_fp32(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size)


def test_z_loss():
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, weight_scale=1.0, seed=1)
    check_fp32(hidden, weight, targets, z_loss=1e-2, chunk_size=32)
    with torch.no_grad():
        with_z = ce.fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-2)
        without = ce.fused_linear_cross_entropy(hidden, weight, targets)
    assert with_z > without  # the z-term is positive for every counted token


def test_huge_logits_across_vocab_blocks():
    """The first vocab block's logits are hundreds of times the last block's: the running max must carry over."""
    hidden, weight, targets = make_inputs((2, 77), 64, 9000, seed=13)  # blocks of 8192: two, the last ragged
    with torch.no_grad():
        weight[:8192] *= 300.0
    assert ce._kernel_config(9000)[0] == 8192
    check_fp32(hidden, weight, targets, reduction="sum", chunk_size=64)


def test_reduction_none_is_forward_only():
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, seed=2)
    with torch.no_grad():
        ours = ce.fused_linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_size=64)
        ref = reference.fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    assert ours.shape == targets.shape
    assert_fp32_close(ours, ref, what="per-token losses")
    assert (ours[targets == IGNORE] == 0).all()
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        ce.fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


def test_eval_computes_only_the_loss():
    hidden, weight, targets = make_inputs((154,), 64, 6400, seed=3)  # 2-D hidden [N, H]
    with torch.no_grad():
        loss = ce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=64)
    assert loss.grad_fn is None
    assert_fp32_close(loss, reference.fused_linear_cross_entropy(hidden, weight, targets))
    loss, grad_hidden, grad_weight = torch.ops.zhllm.fused_linear_cross_entropy_forward(
        hidden.detach(), weight.detach(), targets, IGNORE, "mean", 0.0, 64, False, False
    )
    assert grad_hidden.numel() == 0 and grad_weight.numel() == 0


def test_one_side_frozen():
    """A frozen lm_head (LoRA) gets no weight gradient computed; a frozen backbone no hidden gradient."""
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, seed=4)
    frozen_w = weight.detach()
    ours = ce.fused_linear_cross_entropy(hidden, frozen_w, targets, chunk_size=64)
    ref = reference.fused_linear_cross_entropy(hidden, frozen_w, targets)
    assert_fp32_close(grads(ours, [hidden], ONE)[0], grads(ref, [hidden], ONE)[0])
    frozen_h = hidden.detach()
    ours = ce.fused_linear_cross_entropy(frozen_h, weight, targets, chunk_size=64)
    ref = reference.fused_linear_cross_entropy(frozen_h, weight, targets)
    assert_fp32_close(grads(ours, [weight], ONE)[0], grads(ref, [weight], ONE)[0])


def test_all_ignored_batch_gives_zero_not_nan():
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, n_ignored=154, seed=5)
    for reduction in ("mean", "sum"):
        loss = ce.fused_linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=64)
        grad_hidden, grad_weight = grads(loss, [hidden, weight], ONE)
        assert loss.item() == 0.0
        assert (grad_hidden == 0).all() and (grad_weight == 0).all()


def test_no_tokens():
    hidden, weight, targets = make_inputs((0,), 64, 640, n_ignored=0, seed=5)
    loss = ce.fused_linear_cross_entropy(hidden, weight, targets)
    grad_hidden, grad_weight = grads(loss, [hidden, weight], ONE)
    assert loss.item() == 0.0 and grad_hidden.shape == (0, 64) and (grad_weight == 0).all()


def test_all_ignored_chunk_in_the_middle():
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, n_ignored=0, seed=6)
    targets.view(-1)[32:64] = IGNORE  # chunks 2 and 3 of 16 tokens count for nothing
    targets.view(-1)[100] = IGNORE
    check_fp32(hidden, weight, targets, chunk_size=16)


def test_backward_method_and_grad_accumulation():
    """``(loss * 3.5).backward()`` twice: .grad holds twice the scaled reference gradient."""
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, seed=7)
    for _ in range(2):
        (ce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=64) * 3.5).backward()
    ref_h, ref_w = grads(reference.fused_linear_cross_entropy(hidden, weight, targets) * 7.0, [hidden, weight], ONE)
    assert_fp32_close(hidden.grad, ref_h, what="grad hidden")
    assert_fp32_close(weight.grad, ref_w, what="grad weight")


def test_non_contiguous_hidden():
    """hidden as a transposed view, and as hidden[:, :-1] of a longer sequence (the causal-LM shift)."""
    torch.manual_seed(8)
    base = randn(64, 154, requires_grad=True)
    weight = randn(6400, 64, scale=0.5, requires_grad=True)
    targets = torch.randint(0, 6400, (154,), device=DEVICE)
    assert not base.t().is_contiguous()
    check_fp32(base.t(), weight, targets, chunk_size=48)
    longer = randn(2, 78, 64, requires_grad=True)
    check_fp32(longer[:, :-1], weight, targets.view(2, 77), chunk_size=48)


def _judge(ours, plain, fp32, dtype, what):
    """Against eager PyTorch in the same precision; where eager overflows, ours must stay finite and close."""
    if torch.isfinite(plain).all():
        assert_low_precision_close(ours, plain, fp32, what=what)
    else:
        assert_fp32_close(ours.float(), fp32.float(), tol=8 * torch.finfo(dtype).eps, what=what)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("weight_scale", [0.5, 7.5, 600.0])  # logits' largest magnitude ≈ 15, 250, 26000
def test_low_precision_against_fp32(dtype, weight_scale):
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, dtype=dtype, weight_scale=weight_scale, seed=9)
    logits = hidden @ weight.T
    if weight_scale > 1:  # exp of the raw logits overflows in this dtype: only a max-subtracted lse survives
        assert torch.isinf(torch.exp(logits.detach())).any()
    ours = ce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=48)
    plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    fp32 = reference.fused_linear_cross_entropy(h32, w32, targets)
    assert torch.isfinite(ours)
    _judge(ours, plain, fp32, dtype, "loss")
    ours_g = grads(ours, [hidden, weight], ONE)
    plain_g = grads(plain, [hidden, weight], ONE.to(dtype))
    fp32_g = grads(fp32, [h32, w32], ONE)
    for a, b, c, name in zip(ours_g, plain_g, fp32_g, ("hidden", "weight")):
        assert a.dtype == dtype
        _judge(a, b, c, dtype, f"grad {name}")


def test_fp16_gradients_under_a_loss_scaler_are_as_good_as_eager_fp16():
    """The 6 GB recipe trains in fp16 with a GradScaler (loss × 2**16). d(mean loss)/d(logits) ≈ softmax / n is
    below fp16's range at thousands of tokens and a real vocabulary, so it must not be rounded to fp16 before
    the scale reaches it: our gradients must be as close to fp32 as eager fp16 + GradScaler's."""
    n, h, v, scale = 2048, 64, 8009, 2.0**16  # softmax/n ≈ 6e-8 at init: fp16's smallest subnormal
    torch.manual_seed(13)
    h32 = torch.randn(n, h, device=DEVICE)
    w32 = torch.randn(v, h, device=DEVICE) * 0.02  # init-like logits: a flat softmax
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[:100] = IGNORE
    want = grads(
        reference.fused_linear_cross_entropy(h32.requires_grad_(), w32.requires_grad_(), targets), [h32, w32], ONE
    )

    def scaled_grads(loss_fn):
        h16, w16 = h32.detach().half().requires_grad_(), w32.detach().half().requires_grad_()
        loss = loss_fn(h16, w16)
        got = grads(loss * scale, [h16, w16], ONE)
        assert all(g.dtype == torch.float16 for g in got)
        return [g.float() / scale for g in got]

    eager = scaled_grads(lambda a, b: F.cross_entropy((a @ b.T).float(), targets, ignore_index=IGNORE))
    ours = scaled_grads(lambda a, b: ce.fused_linear_cross_entropy(a, b, targets))
    for a, b, c, name in zip(ours, eager, want, ("hidden", "weight")):
        ours_err, eager_err = rel_err(a, c), rel_err(b, c)
        assert ours_err <= 1.5 * eager_err + 1e-4, (
            f"grad {name}: {ours_err:.2e} vs fp32; eager fp16 + scaler {eager_err:.2e}"
        )


def test_out_of_range_targets():
    """CPU tensors are checked; the op itself (what CUDA runs unchecked) marks such a token's loss NaN."""
    hidden, weight, targets = make_inputs((2, 77), 64, 640, seed=10)
    targets[1, 5] = 640
    if not ON_GPU:
        with pytest.raises(ValueError, match=r"outside \[0, 640\)"):
            ce.fused_linear_cross_entropy(hidden, weight, targets)
    losses, _, _ = torch.ops.zhllm.fused_linear_cross_entropy_forward(
        hidden.detach().reshape(-1, 64), weight.detach(), targets.reshape(-1), IGNORE, "none", 0.0, 64, False, False
    )
    assert torch.isnan(losses[77 + 5]) and torch.isfinite(torch.cat([losses[:82], losses[83:]])).all()


def test_autocast_runs_in_the_autocast_dtype():
    """fp32 master weights under autocast: the matmuls run in bf16, the gradients come back in fp32."""
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, seed=15)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = ce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=64)
    grad_hidden, grad_weight = grads(loss, [hidden, weight], ONE)
    assert grad_hidden.dtype == grad_weight.dtype == torch.float32
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    with torch.no_grad():
        assert_fp32_close(loss, ce.fused_linear_cross_entropy(h16, w16, targets, chunk_size=64), what="loss")


def test_compiles_fullgraph():
    """torch.compile traces through the custom op (its fake implementation), forward and backward."""
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, seed=16)
    compiled = torch.compile(
        lambda h, w, t: ce.fused_linear_cross_entropy(h, w, t, chunk_size=64) * 2, fullgraph=True, backend="aot_eager"
    )
    loss = compiled(hidden, weight, targets)
    ref = reference.fused_linear_cross_entropy(hidden, weight, targets) * 2
    assert_fp32_close(loss, ref)
    for a, b in zip(grads(loss, [hidden, weight], ONE), grads(ref, [hidden, weight], ONE)):
        assert_fp32_close(a, b, what="grad")


def test_module():
    hidden, weight, targets = make_inputs((2, 77), 64, 6400, seed=11)
    loss_fn = ce.FusedLinearCrossEntropyLoss(reduction="sum", z_loss=1e-3, chunk_size=64)
    assert_fp32_close(
        loss_fn(hidden, weight, targets),
        reference.fused_linear_cross_entropy(hidden, weight, targets, reduction="sum", z_loss=1e-3),
    )
    with pytest.raises(ValueError, match="reduction must be one of"):
        ce.FusedLinearCrossEntropyLoss(reduction="avg")


def test_default_chunk_size():
    assert ce.default_chunk_size(16384, 151936, 4096) == 512  # ceil(16384 / 38) = 432 → 512 tokens
    assert ce.default_chunk_size(100, 32000, 4096) == 256  # clamped from below
    assert ce.default_chunk_size(10**6, 6400, 8192) == 8192  # clamped from above


def test_bad_input_errors():
    hidden, weight, targets = make_inputs((2, 7), 64, 640, n_ignored=0)
    with pytest.raises(ValueError, match=r"lm_head weight \[V, H\]"):
        ce.fused_linear_cross_entropy(hidden, weight[:, :32], targets)
    with pytest.raises(ValueError, match="leading shape"):
        ce.fused_linear_cross_entropy(hidden, weight, targets[:, :6])
    with pytest.raises(TypeError, match="int64"):
        ce.fused_linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="'mean', 'sum' or 'none'"):
        ce.fused_linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(TypeError, match="cast"):
        ce.fused_linear_cross_entropy(hidden, weight.half(), targets)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ce.fused_linear_cross_entropy(hidden.double(), weight.double(), targets)
    with pytest.raises(ValueError, match="chunk_size"):
        ce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=0)


@pytest.mark.parametrize("reduction, need_grads", [("mean", True), ("none", False)])
def test_custom_op_passes_opcheck(reduction, need_grads):
    hidden, weight, targets = make_inputs((21,), 32, 300, n_ignored=3, seed=12)
    args = (hidden.detach(), weight.detach(), targets, IGNORE, reduction, 1e-3, 8, need_grads, need_grads)
    torch.library.opcheck(torch.ops.zhllm.fused_linear_cross_entropy_forward.default, args)


@pytest.mark.skipif(not ON_GPU, reason="large shapes only with CUDA")
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_large_low_precision(dtype):
    hidden, weight, targets = make_inputs(
        (8, 2048), 768, 35023, dtype=dtype, weight_scale=0.05, n_ignored=3000, seed=13
    )
    ours = ce.fused_linear_cross_entropy(hidden, weight, targets)
    logits = hidden @ weight.T
    plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    fp32 = reference.fused_linear_cross_entropy(h32, w32, targets)
    _judge(ours, plain, fp32, dtype, "loss")
    for a, b, c, name in zip(
        grads(ours, [hidden, weight], ONE),
        grads(plain, [hidden, weight], ONE.to(dtype)),
        grads(fp32, [h32, w32], ONE),
        ("hidden", "weight"),
    ):
        _judge(a, b, c, dtype, f"grad {name}")


@pytest.mark.skipif(not ON_GPU, reason="large shapes only with CUDA")
def test_large_fp32():
    hidden, weight, targets = make_inputs((4, 1024), 768, 35023, weight_scale=0.05, n_ignored=500, seed=14)
    check_fp32(hidden, weight, targets, chunk_size=1000)
