"""Fused linear log-probs: the chunked Triton op against zhkernels.reference, log-probs and both gradients for a
per-token upstream gradient (as DPO's), temperature, ignored tokens, odd sizes (vocab 35,023, hidden 896),
fp16/bf16 against eager in the same precision, one side frozen, torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import (
    DEVICE,
    LOW_PRECISION,
    assert_fp32_close,
    assert_low_precision_close,
    grads,
    poisoned,
    randn,
    requires_triton,
)

import zhkernels
import zhkernels.logprobs as lp
from zhkernels import reference

pytestmark = [requires_triton, poisoned]

IGNORE = -100


def make_inputs(n, hidden_dim, vocab, dtype=torch.float32, weight_scale=0.5, n_ignored=3, seed=0):
    torch.manual_seed(seed)
    hidden = randn(n, hidden_dim).to(dtype).requires_grad_()
    weight = randn(vocab, hidden_dim, scale=weight_scale).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    targets[:n_ignored] = IGNORE
    return hidden, weight, targets


def per_token_grad(n, seed=1):
    """A different upstream gradient per token, signs mixed (DPO pushes chosen up and rejected down)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(n, generator=generator) * 2.0).to(DEVICE)


def check_fp32(hidden, weight, targets, **kwargs):
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    ours = lp.fused_linear_logprobs(hidden, weight, targets, **kwargs)
    ref = reference.fused_linear_logprobs(hidden, weight, targets, **ref_kwargs)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    assert type(ours.grad_fn).__name__ == "FusedLinearLogprobsFunctionBackward"  # the Triton op, not the reference
    assert (ours[targets == IGNORE] == 0).all() and (ours[targets != IGNORE] < 0).all()
    assert_fp32_close(ours, ref, what="log-probs")
    g = per_token_grad(targets.numel()).reshape(targets.shape)
    for a, b, name in zip(grads(ours, [hidden, weight], g), grads(ref, [hidden, weight], g), ("hidden", "weight")):
        assert_fp32_close(a, b, what=f"grad {name}")


@pytest.mark.parametrize(
    "n, hidden_dim, vocab, chunk_size",
    [
        (37, 64, 6400, None),  # one chunk
        (37, 96, 6400, 16),  # ragged last chunk, several chunks summed into grad_weight
        (13, 896, 35023, 8),  # the sizes of a 35,023-token vocabulary and hidden 896: last vocab block masked
    ],
)
def test_fp32_matches_reference(n, hidden_dim, vocab, chunk_size):
    hidden, weight, targets = make_inputs(n, hidden_dim, vocab, weight_scale=0.05 if hidden_dim > 100 else 0.5)
    check_fp32(hidden, weight, targets, chunk_size=chunk_size)


def test_temperature_and_three_dimensional_inputs():
    torch.manual_seed(2)
    hidden = randn(2, 9, 64, requires_grad=True)
    weight = randn(6400, 64, scale=0.5, requires_grad=True)
    targets = torch.randint(0, 6400, (2, 9), device=DEVICE)
    targets[1, -2:] = IGNORE
    check_fp32(hidden, weight, targets, temperature=0.7, chunk_size=5)


def test_huge_logits_across_vocab_blocks_keep_the_running_max():
    hidden, weight, targets = make_inputs(21, 64, 9000, seed=13)
    with torch.no_grad():
        weight[:8192] *= 300.0
    check_fp32(hidden, weight, targets, chunk_size=8)


def test_frozen_lm_head_computes_no_weight_gradient():
    hidden, weight, targets = make_inputs(21, 64, 6400, seed=4)
    frozen = weight.detach()
    g = per_token_grad(21)
    ours = grads(lp.fused_linear_logprobs(hidden, frozen, targets, chunk_size=8), [hidden], g)[0]
    ref = grads(reference.fused_linear_logprobs(hidden, frozen, targets), [hidden], g)[0]
    assert_fp32_close(ours, ref, what="grad hidden")
    _, grad_weight = torch.ops.zhllm.fused_linear_logprobs_backward(
        g, hidden.detach(), frozen, targets, torch.zeros(21, device=DEVICE), IGNORE, 1.0, 8, True, False
    )
    assert grad_weight.numel() == 0


def test_all_ignored_and_no_tokens_give_zeros_not_nan():
    hidden, weight, targets = make_inputs(16, 64, 640, n_ignored=16, seed=5)
    out = lp.fused_linear_logprobs(hidden, weight, targets, chunk_size=4)
    grad_hidden, grad_weight = grads(out, [hidden, weight], per_token_grad(16))
    assert (out == 0).all() and (grad_hidden == 0).all() and (grad_weight == 0).all()
    empty_h, empty_w, empty_t = make_inputs(0, 64, 640, n_ignored=0)
    out = lp.fused_linear_logprobs(empty_h, empty_w, empty_t)
    assert out.shape == (0,)
    assert grads(out.sum(), [empty_w], torch.ones((), device=DEVICE))[0].eq(0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_against_eager_in_the_same_precision(dtype):
    hidden, weight, targets = make_inputs(37, 64, 6400, dtype=dtype, seed=9)
    g = per_token_grad(37)
    ours = lp.fused_linear_logprobs(hidden, weight, targets, chunk_size=16)
    logits = hidden @ weight.T
    counted = targets != IGNORE
    plain = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    plain = torch.where(counted, plain.float(), torch.zeros_like(plain.float()))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    fp32 = reference.fused_linear_logprobs(h32, w32, targets)
    assert ours.dtype == torch.float32
    assert_low_precision_close(ours, plain, fp32, what="log-probs")
    for a, b, c, name in zip(
        grads(ours, [hidden, weight], g), grads(plain, [hidden, weight], g), grads(fp32, [h32, w32], g), "hw"
    ):
        assert a.dtype == dtype
        assert_low_precision_close(a, b, c, what=f"grad {name}")


def test_bad_inputs_are_one_line_errors():
    hidden, weight, targets = make_inputs(5, 64, 640)
    with pytest.raises(ValueError, match="outside"):
        lp.fused_linear_logprobs(hidden, weight, torch.full_like(targets, 640))
    with pytest.raises(ValueError, match="temperature"):
        lp.fused_linear_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        lp.fused_linear_logprobs(hidden, weight[:, :32], targets)


def test_traced_by_torch_compile_fullgraph():
    hidden, weight, targets = make_inputs(21, 64, 640, seed=6)

    def sequence_logprob(h, w, t):
        return zhkernels.fused_linear_logprobs(h, w, t, chunk_size=8).sum()

    compiled = torch.compile(sequence_logprob, fullgraph=True, backend="aot_eager")
    ours = compiled(hidden, weight, targets)
    ref = reference.fused_linear_logprobs(hidden, weight, targets).sum()
    assert_fp32_close(ours, ref, what="compiled log-prob")
    one = torch.ones((), device=DEVICE)
    for a, b in zip(grads(ours, [hidden, weight], one), grads(ref, [hidden, weight], one)):
        assert_fp32_close(a, b, what="compiled grad")
