"""Fused distillation loss: the chunked Triton op against zhkernels.reference.distill_loss and its autograd, for
each divergence (forward and reverse KL, JSD), at odd sizes (vocab 37 to 5,000 so rows span several vocab blocks,
Hs != Ht, 1 to 33 tokens in several chunks), ignored and all-ignored labels, α 0 / 0.3 / 1, temperatures 1 and
2.5, upstream gradients on all three outputs, bf16 against eager in the same precision, a frozen lm_head and a
teacher that would take gradients, the CPU path without the interpreter, torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import (
    DEVICE,
    assert_fp32_close,
    assert_low_precision_close,
    grads,
    poisoned,
    randn,
    rel_err,
    requires_triton,
)

import zhkernels
import zhkernels.distill as kd
from zhkernels import _dispatch, reference

pytestmark = poisoned

IGNORE = -100
KINDS = ("forward", "reverse", "jsd")


def make_inputs(n, vocab, hs, ht, dtype=torch.float32, n_ignored=2, seed=0, lead=None):
    """Student and teacher hidden states and lm_heads (the teacher sharper than the student), labels with the first
    ``n_ignored`` ignored; ``lead`` reshapes the tokens (e.g. ``(2, 9)`` for ``[B, T, H]`` inputs)."""
    torch.manual_seed(seed)
    lead = lead or (n,)
    s_hidden = randn(*lead, hs).to(dtype).requires_grad_()
    s_weight = randn(vocab, hs, scale=0.3).to(dtype).requires_grad_()
    t_hidden = randn(*lead, ht).to(dtype)
    t_weight = randn(vocab, ht, scale=0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[:n_ignored] = IGNORE
    return s_hidden, s_weight, t_hidden, t_weight, labels.reshape(lead)


#: Upstream gradients of (loss, ce, divergence): a training loss, and all three outputs carrying gradients at once.
UPSTREAM = {"loss": (1.0, 0.0, 0.0), "all": (0.8, -0.7, 1.3)}


def weighted(outs, upstream):
    return sum(w * o for w, o in zip(upstream, outs) if w)


def check_fp32(inputs, *, upstream="all", **kwargs):
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    s_hidden, s_weight = inputs[0], inputs[1]
    ours = kd.fused_distill_loss(*inputs, **kwargs)
    ref = reference.distill_loss(*inputs, **ref_kwargs)
    assert type(ours[1].grad_fn).__name__ == "FusedDistillLossFunctionBackward"  # the Triton op, not the reference
    for a, b, name in zip(ours, ref, ("loss", "ce", "divergence")):
        assert a.dtype == torch.float32 and a.shape == ()
        assert_fp32_close(a, b, what=name)
    one = torch.ones((), device=DEVICE)
    got = grads(weighted(ours, UPSTREAM[upstream]), [s_hidden, s_weight], one)
    want = grads(weighted(ref, UPSTREAM[upstream]), [s_hidden, s_weight], one)
    for a, b, name in zip(got, want, ("student hidden", "student weight")):
        assert a.dtype == b.dtype
        assert_fp32_close(a, b, what=f"grad {name}")


SIZES = [  # tokens, vocab, student hidden, teacher hidden, chunk
    pytest.param(1, 37, 16, 24, None, id="1tok-V37"),
    pytest.param(7, 101, 24, 40, 3, id="7tok-V101-chunks"),
    pytest.param(33, 1000, 32, 48, 8, id="33tok-V1000-chunks"),
    pytest.param(5, 5000, 16, 8, 2, id="5tok-V5000-2vocab-blocks"),
]
SETTINGS = [  # alpha, temperature
    pytest.param(0.3, 2.5, id="a0.3-T2.5"),
    pytest.param(0.0, 1.0, id="a0-T1"),
    pytest.param(1.0, 2.5, id="a1-T2.5"),
]


@requires_triton
@pytest.mark.parametrize("alpha, temperature", SETTINGS)
@pytest.mark.parametrize("n, vocab, hs, ht, chunk_size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_matches_reference(kind, n, vocab, hs, ht, chunk_size, alpha, temperature):
    inputs = make_inputs(n, vocab, hs, ht, n_ignored=min(2, n - 1), seed=n + vocab)
    check_fp32(inputs, alpha=alpha, temperature=temperature, kind=kind, chunk_size=chunk_size)


@requires_triton
@pytest.mark.parametrize("kind", KINDS)
def test_loss_alone_three_dimensional_inputs_and_other_beta(kind):
    inputs = make_inputs(18, 640, 24, 40, n_ignored=5, seed=3, lead=(2, 9))
    check_fp32(inputs, upstream="loss", alpha=0.5, temperature=2.0, kind=kind, beta=0.3, chunk_size=5)


@requires_triton
@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_across_vocab_blocks_keep_the_running_max(kind):
    """Logits ~±60 (nearly one-hot softmaxes, reverse KL ~100 nats): against float64, ours errs no more than the
    float32 reference does (whose own error here is ~1e-4, beyond the usual 1e-5)."""
    inputs = make_inputs(6, 5000, 16, 8, seed=13)
    with torch.no_grad():
        inputs[1][:4096] *= 30.0  # the student's largest logits in the first block, the teacher's elsewhere
        inputs[3][4096:] *= 30.0
    kwargs = dict(alpha=0.5, temperature=1.5, kind=kind)
    ours = kd.fused_distill_loss(*inputs, chunk_size=4, **kwargs)
    ref32 = reference.distill_loss(*inputs, **kwargs)
    wide = [t.detach().double().requires_grad_(i < 2) for i, t in enumerate(inputs[:4])]
    truth = eager(*wide, inputs[4], **kwargs)
    one, up = torch.ones((), device=DEVICE), UPSTREAM["all"]
    ours += tuple(grads(weighted(ours, up), list(inputs[:2]), one))
    ref32 += tuple(grads(weighted(ref32, up), list(inputs[:2]), one))
    truth += tuple(grads(weighted(truth, up), wide[:2], one.double()))
    for a, b, c, name in zip(ours, ref32, truth, ("loss", "ce", "divergence", "grad hidden", "grad weight")):
        ours_err, ref_err = rel_err(a.double(), c), rel_err(b.double(), c)
        assert ours_err <= 3 * ref_err + 2e-6, f"{name}: error {ours_err:.2e} vs float32 reference's {ref_err:.2e}"


@requires_triton
@pytest.mark.parametrize("kind", KINDS)
def test_all_ignored_and_no_tokens_give_zeros_not_nan(kind):
    inputs = make_inputs(9, 101, 16, 24, n_ignored=9, seed=5)
    outs = kd.fused_distill_loss(*inputs, alpha=0.3, temperature=2.0, kind=kind, chunk_size=4)
    grad_hidden, grad_weight = grads(weighted(outs, UPSTREAM["all"]), inputs[:2], torch.ones((), device=DEVICE))
    assert all((o == 0).all() for o in outs) and (grad_hidden == 0).all() and (grad_weight == 0).all()
    empty = make_inputs(0, 101, 16, 24, n_ignored=0)
    outs = kd.fused_distill_loss(*empty, alpha=0.3, temperature=2.0, kind=kind)
    assert all(o.shape == () and o == 0 for o in outs)
    (grad_weight,) = grads(outs[0], [empty[1]], torch.ones((), device=DEVICE))
    assert (grad_weight == 0).all()


def eager(s_hidden, s_weight, t_hidden, t_weight, labels, *, alpha, temperature, kind):
    """The reference's formulas on logits as an eager lm_head makes them in the inputs' dtype (bf16: rounded to it,
    then fp32; float64 stays float64, a truth for the float32 paths)."""
    wide = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
    s_logits = (s_hidden.reshape(-1, s_hidden.shape[-1]) @ s_weight.T).to(wide)
    t_logits = (t_hidden.reshape(-1, t_hidden.shape[-1]) @ t_weight.T).to(wide)
    flat = labels.reshape(-1)
    counted = flat != IGNORE
    ce = torch.logsumexp(s_logits, -1) - s_logits.gather(1, flat.clamp(min=0)[:, None]).squeeze(1)
    div = reference.token_divergence(s_logits / temperature, t_logits / temperature, kind) * temperature**2
    n = counted.sum().clamp(min=1)
    ce = torch.where(counted, ce, 0.0).sum() / n
    div = torch.where(counted, div, 0.0).sum() / n
    return (1 - alpha) * ce + alpha * div, ce, div


@requires_triton
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_against_eager_in_the_same_precision(kind):
    dtype = torch.bfloat16
    inputs = make_inputs(21, 1000, 32, 48, dtype=dtype, seed=9)
    kwargs = dict(alpha=0.5, temperature=2.0, kind=kind)
    ours = kd.fused_distill_loss(*inputs, chunk_size=8, **kwargs)
    plain = eager(*inputs, **kwargs)
    s32, w32 = (t.detach().float().requires_grad_() for t in inputs[:2])
    fp32 = reference.distill_loss(s32, w32, inputs[2].float(), inputs[3].float(), inputs[4], **kwargs)
    for a, b, c, name in zip(ours, plain, fp32, ("loss", "ce", "divergence")):
        assert a.dtype == torch.float32
        assert_low_precision_close(a, b, c, what=name)
    one, up = torch.ones((), device=DEVICE), UPSTREAM["all"]
    got = grads(weighted(ours, up), list(inputs[:2]), one)
    same = grads(weighted(plain, up), list(inputs[:2]), one)
    want = grads(weighted(fp32, up), [s32, w32], one)
    for a, b, c, name in zip(got, same, want, ("hidden", "weight")):
        assert a.dtype == dtype
        assert_low_precision_close(a, b, c, what=f"grad {name}")


@requires_triton
def test_frozen_lm_head_and_a_teacher_that_requires_grad():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs(11, 101, 16, 24, seed=4)
    t_hidden.requires_grad_()
    frozen = s_weight.detach()
    loss, _, _ = kd.fused_distill_loss(s_hidden, frozen, t_hidden, t_weight, labels, alpha=0.5, temperature=2.0)
    loss.backward()
    assert t_hidden.grad is None  # the teacher is a constant: detached, no gradient reaches it
    ref = reference.distill_loss(s_hidden, frozen, t_hidden.detach(), t_weight, labels, alpha=0.5, temperature=2.0)
    (want,) = grads(ref[0], [s_hidden], torch.ones((), device=DEVICE))
    assert_fp32_close(s_hidden.grad, want, what="grad hidden")
    stats = torch.zeros(11, kd.N_STATS, device=DEVICE)
    zero = torch.zeros((), device=DEVICE)
    args = (s_hidden.detach(), frozen, t_hidden.detach(), t_weight, labels, stats, 0.5, "forward", 0.5, IGNORE, 4)
    _, grad_weight = torch.ops.zhllm.fused_distill_loss_backward(zero, zero, *args, True, False)
    assert grad_weight.numel() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_without_the_interpreter_runs_the_reference(kind, monkeypatch):
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: False)
    inputs = make_inputs(7, 101, 16, 24, seed=2)
    inputs = tuple(t.cpu() for t in inputs)
    kwargs = dict(alpha=0.3, temperature=2.5, kind=kind)
    ours, ref = kd.fused_distill_loss(*inputs, chunk_size=3, **kwargs), reference.distill_loss(*inputs, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert type(ours[0].grad_fn).__name__ != "FusedDistillLossFunctionBackward"


def test_bad_inputs_are_one_line_errors():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs(5, 37, 16, 24)
    args = dict(alpha=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="outside"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, torch.full_like(labels, 37), **args)
    with pytest.raises(ValueError, match="temperature"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="kind"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, kind="kl", **args)
    with pytest.raises(ValueError, match="beta"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, kind="jsd", beta=1.0, **args)
    with pytest.raises(ValueError, match="vocabulary"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight[:30], labels, **args)
    with pytest.raises(ValueError, match="teacher hidden .* do not match"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden[:, :8], t_weight, labels, **args)
    with pytest.raises(ValueError, match="leading shape"):
        kd.fused_distill_loss(s_hidden, s_weight, t_hidden[:4], t_weight, labels, **args)


@requires_triton
def test_traced_by_torch_compile_fullgraph():
    torch._dynamo.reset()
    inputs = make_inputs(13, 101, 16, 24, seed=6)

    def distill(sh, sw, th, tw, t):
        loss, ce, div = zhkernels.fused_distill_loss(sh, sw, th, tw, t, alpha=0.3, temperature=2.0, chunk_size=4)
        return loss + 0.5 * ce - div

    compiled = torch.compile(distill, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    ours = compiled(*inputs)
    loss, ce, div = reference.distill_loss(*inputs, alpha=0.3, temperature=2.0)
    ref = loss + 0.5 * ce - div
    assert_fp32_close(ours, ref, what="compiled loss")
    one = torch.ones((), device=DEVICE)
    for a, b in zip(grads(ours, list(inputs[:2]), one), grads(ref, list(inputs[:2]), one)):
        assert_fp32_close(a, b, what="compiled grad")
