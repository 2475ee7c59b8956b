"""SwiGLU: the Triton op against zhkernels.reference, forward and both gradients, odd sizes, strided inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    LOW_PRECISION,
    ON_GPU,
    assert_fp32_close,
    assert_low_precision_close,
    grads,
    poisoned,
    randn,
    requires_triton,
)

import zhkernels
from zhkernels import reference

pytestmark = [requires_triton, poisoned]

SHAPES = [(1, 1), (3, 77, 1668), (2, 5, 896)] + ([(8, 2048, 5632)] if ON_GPU else [])


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(shape):
    torch.manual_seed(0)
    gate, up = randn(*shape, requires_grad=True), randn(*shape, requires_grad=True)
    out = zhkernels.swiglu(gate, up)
    ref = reference.swiglu(gate, up)
    assert_fp32_close(out, ref)
    d = randn(*shape)
    for ours, theirs, name in zip(grads(out, [gate, up], d), grads(ref, [gate, up], d), ("gate", "up")):
        assert_fp32_close(ours, theirs, what=f"grad {name}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_against_fp32(dtype):
    torch.manual_seed(1)
    g32, u32 = randn(4, 77, 1668, requires_grad=True), randn(4, 77, 1668, requires_grad=True)
    g, u = (t.detach().to(dtype).requires_grad_() for t in (g32, u32))
    d32 = randn(4, 77, 1668)
    out = zhkernels.swiglu(g, u)
    plain = F.silu(g) * u  # what eager PyTorch does in this precision
    assert out.dtype == dtype
    assert_low_precision_close(out, plain, reference.swiglu(g.float(), u.float()))
    ours = grads(out, [g, u], d32.to(dtype))
    eager = grads(plain, [g, u], d32.to(dtype))
    g_ref, u_ref = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    fp32 = grads(reference.swiglu(g_ref, u_ref), [g_ref, u_ref], d32.to(dtype).float())
    for a, b, c, name in zip(ours, eager, fp32, ("gate", "up")):
        assert_low_precision_close(a, b, c, what=f"grad {name}")


def test_strided_halves_of_a_fused_projection():
    """gate and up as the two halves of one [.., 2F] projection: non-contiguous rows, handled by strides."""
    torch.manual_seed(2)
    gate_up = randn(2, 9, 2 * 96, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = zhkernels.swiglu(gate, up)
    ref = reference.swiglu(gate, up)
    assert_fp32_close(out, ref)
    d = randn(2, 9, 96)
    assert_fp32_close(grads(out, [gate_up], d)[0], grads(ref, [gate_up], d)[0], what="grad")


def test_transposed_input_is_copied_not_misread():
    torch.manual_seed(3)
    gate, up = randn(33, 17).t(), randn(33, 17).t()
    assert_fp32_close(zhkernels.swiglu(gate, up), reference.swiglu(gate, up))


def test_module_and_mlp():
    torch.manual_seed(4)
    mlp = zhkernels.SwiGLUMLP(64, 96).to(randn(1).device)
    x = randn(2, 7, 64)
    expected = mlp.down_proj(reference.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
    assert_fp32_close(mlp(x), expected)
    assert_fp32_close(zhkernels.SwiGLU()(x, x), reference.swiglu(x, x))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        zhkernels.swiglu(randn(2, 3), randn(2, 4))
    with pytest.raises(TypeError, match="cast"):
        zhkernels.swiglu(randn(2, 3), randn(2, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        zhkernels.swiglu(
            torch.ones(2, 3, dtype=torch.int64, device=randn(1).device),
            torch.ones(2, 3, dtype=torch.int64, device=randn(1).device),
        )


def test_custom_ops_pass_opcheck():
    x = [randn(4, 33) for _ in range(3)]
    torch.library.opcheck(torch.ops.zhllm.swiglu_forward.default, (x[0], x[1]))
    torch.library.opcheck(torch.ops.zhllm.swiglu_backward.default, (x[0], x[1], x[2]))
