"""RMSNorm: the Triton op against zhkernels.reference, forward and every gradient, with and without the fused
residual."""

from __future__ import annotations

import importlib

import pytest
import torch
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

from zhkernels import reference

rn = importlib.import_module("zhkernels.rms_norm")  # the module (zhkernels.rms_norm is the function)
pytestmark = [requires_triton, poisoned]

SHAPES = [(3, 77, 1), (3, 77, 896), (3, 77, 1668), (5, 512)] + ([(4, 2048, 4096), (8192, 5120)] if ON_GPU else [])


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm formula, computed the way it is in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fp32_matches_reference(shape, with_residual):
    torch.manual_seed(0)
    x = randn(*shape, requires_grad=True)
    w = (1.0 + 0.5 * randn(shape[-1])).requires_grad_()
    r = randn(*shape, requires_grad=True) if with_residual else None
    inputs = [x, w] + ([r] if with_residual else [])
    ours, ref = rn.rms_norm(x, w, residual=r), reference.rms_norm(x, w, residual=r)
    if with_residual:
        assert_fp32_close(ours[1], ref[1], what="new residual")
        ours, ref = ours[0], ref[0]
    assert_fp32_close(ours, ref)
    d = randn(*shape)
    for a, b, name in zip(grads(ours, inputs, d), grads(ref, inputs, d), ("x", "weight", "residual")):
        assert_fp32_close(a, b, what=f"grad {name}")


@pytest.mark.parametrize("low", LOW_PRECISION)
@pytest.mark.parametrize("with_residual", [False, True])
def test_low_precision_input_on_a_float32_stream_writes_the_output_in_out_dtype(low, with_residual):
    """The model's autocast form: a 16-bit sub-layer output plus a float32 residual, the sum kept in float32 and
    the output written in the 16-bit dtype; values and gradients equal the reference's (which upcasts first)."""
    torch.manual_seed(2)
    x = randn(3, 77, 96).to(low).requires_grad_()
    r = randn(3, 77, 96, requires_grad=True) if with_residual else None
    w = (1.0 + 0.5 * randn(96)).requires_grad_()
    ours = rn.rms_norm(x, w, residual=r, out_dtype=low)
    ref = reference.rms_norm(x.float() if r is None else x, w, residual=r, out_dtype=low)
    out, ref_out = (ours[0], ref[0]) if with_residual else (ours, ref)
    assert out.dtype == low
    if with_residual:
        assert ours[1].dtype == torch.float32 and ref[1].dtype == torch.float32
        torch.testing.assert_close(ours[1], (x.float() + r).detach(), rtol=0, atol=0)
    tol = dict(rtol=1e-2, atol=1e-2) if low == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    inputs = [x, w] + ([r] if with_residual else [])
    d = randn(3, 77, 96).to(low)
    got = grads(out, inputs, d)
    assert got[0].dtype == low and (not with_residual or got[2].dtype == torch.float32)
    for a, b, name in zip(got, grads(ref_out, inputs, d), ("x", "weight", "residual")):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"grad {name}: {m}")


def test_a_residual_narrower_than_x_is_refused_in_one_line():
    x, r, w = randn(2, 8), randn(2, 8).to(torch.bfloat16), randn(8)
    with pytest.raises(TypeError, match="residual stream must be x's dtype or float32"):
        rn.rms_norm(x, w, residual=r)


@pytest.mark.parametrize("used", ["both", "out", "new_residual"])
def test_residual_gradients_when_caller_uses_either_output(used):
    """The gradient reaching the new residual is added to dx; x and residual both get the sum."""
    torch.manual_seed(1)
    x, r = randn(3, 77, 96, requires_grad=True), randn(3, 77, 96, requires_grad=True)
    w = randn(96, requires_grad=True)
    d_out, d_res = randn(3, 77, 96), randn(3, 77, 96)

    def loss(out, new_res):
        total = 0.0
        if used in ("both", "out"):
            total = total + (out * d_out).sum()
        if used in ("both", "new_residual"):
            total = total + (new_res * d_res).sum()
        return total

    ours = torch.autograd.grad(loss(*rn.rms_norm(x, w, residual=r)), [x, w, r], allow_unused=True)
    ref = torch.autograd.grad(loss(*reference.rms_norm(x, w, residual=r)), [x, w, r], allow_unused=True)
    for a, b, name in zip(ours, ref, ("x", "weight", "residual")):
        b = torch.zeros_like(w) if b is None else b  # the reference does not reach weight through new_residual alone
        assert_fp32_close(a, b, what=f"grad {name}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("with_residual", [False, True])
def test_low_precision_against_fp32(dtype, with_residual):
    torch.manual_seed(2)
    shape = (3, 77, 896)
    x = randn(*shape, dtype=dtype, requires_grad=True)
    r = randn(*shape, dtype=dtype, requires_grad=True) if with_residual else None
    w = (1.0 + 0.5 * randn(shape[-1])).to(dtype).requires_grad_()
    inputs = [x, w] + ([r] if with_residual else [])
    d = randn(*shape).to(dtype)
    ours = rn.rms_norm(x, w, residual=r)
    plain_in = x + r if with_residual else x  # eager PyTorch rounds the sum to the dtype too
    plain = hf_rms_norm(plain_in, w)
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    ref = reference.rms_norm(f32[0], f32[1], residual=f32[2] if with_residual else None)
    if with_residual:
        ours, new_res = ours
        ref, ref_res = ref
        assert_low_precision_close(new_res, plain_in, ref_res, what="new residual")
    assert ours.dtype == dtype
    assert_low_precision_close(ours, plain, ref)
    names = ("x", "weight", "residual")
    for a, b, c, name in zip(grads(ours, inputs, d), grads(plain, inputs, d), grads(ref, f32, d.float()), names):
        assert a.dtype == dtype
        assert_low_precision_close(a, b, c, what=f"grad {name}")


def test_float32_weight_with_bfloat16_activations():
    """Master weights in float32 under bf16 activations: output in bf16, dweight in float32."""
    torch.manual_seed(3)
    x = randn(3, 77, 512, dtype=torch.bfloat16, requires_grad=True)
    w = (1.0 + 0.5 * randn(512)).requires_grad_()
    out = rn.rms_norm(x, w)
    assert out.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    ref = reference.rms_norm(x32, w)
    assert_fp32_close(out.float(), ref, tol=2**-8)
    d = randn(3, 77, 512).to(torch.bfloat16)
    gx, gw = grads(out, [x, w], d)
    rx, rw = grads(ref, [x32, w], d.float())
    assert gw.dtype == torch.float32
    assert_fp32_close(gw, rw, tol=1e-5, what="grad weight")
    assert_fp32_close(gx.float(), rx, tol=2**-7, what="grad x")


def test_strided_rows_and_transposed_input():
    torch.manual_seed(4)
    wide = randn(2, 9, 200, requires_grad=True)
    x, r = wide[..., :96], wide[..., 100:196]  # row stride 200, unit last stride: read in place
    assert not x.is_contiguous()
    w = randn(96, requires_grad=True)
    out, new_res = rn.rms_norm(x, w, residual=r)
    ref, ref_res = reference.rms_norm(x, w, residual=r)
    assert_fp32_close(out, ref)
    assert_fp32_close(new_res, ref_res, what="new residual")
    d = randn(2, 9, 96)
    for a, b, name in zip(grads(out, [wide, w], d), grads(ref, [wide, w], d), ("wide", "weight")):
        assert_fp32_close(a, b, what=f"grad {name}")
    xt = randn(33, 17).t()  # last stride 33: copied, not misread
    wt = randn(33)
    assert_fp32_close(rn.rms_norm(xt, wt), reference.rms_norm(xt, wt))


def test_empty_rows():
    x = randn(0, 64, requires_grad=True)
    w = randn(64, requires_grad=True)
    out = rn.rms_norm(x, w)
    assert out.shape == (0, 64)
    gx, gw = grads(out, [x, w], randn(0, 64))
    assert gx.shape == (0, 64) and torch.equal(gw, torch.zeros_like(w))


def test_module_state_dict_and_hugging_face_interchange():
    torch.manual_seed(5)
    norm = rn.RMSNorm(96, eps=1e-5).to(randn(1).device)
    assert list(norm.state_dict()) == ["weight"]
    assert torch.equal(norm.weight, torch.ones(96, device=norm.weight.device))
    with torch.no_grad():
        norm.weight.copy_(randn(96))
    x, r = randn(4, 7, 96), randn(4, 7, 96)
    assert_fp32_close(norm(x), reference.rms_norm(x, norm.weight, 1e-5))
    out, new_res = norm(x, r)
    assert_fp32_close(out, reference.rms_norm(x + r, norm.weight, 1e-5))
    assert_fp32_close(new_res, x + r)
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except Exception:  # transformers is optional
        pytest.skip("transformers is not importable")
    hf = LlamaRMSNorm(96, eps=1e-5).to(x.device)
    hf.load_state_dict(norm.state_dict())
    with torch.no_grad():
        assert_fp32_close(norm(x), hf(x))


def test_bad_input_errors():
    x = randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight \(7,\) must be \(8,\)"):
        rn.rms_norm(x, randn(7))
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        rn.rms_norm(x, randn(8), residual=randn(2, 4, 8))
    with pytest.raises(TypeError, match="cast"):
        rn.rms_norm(x, randn(8), residual=randn(2, 3, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        rn.rms_norm(x.long(), randn(8))
    with pytest.raises(ValueError, match="scalar"):
        rn.rms_norm(randn(1)[0], randn(1))


def test_custom_ops_pass_opcheck():
    x, r, d, d_res = (randn(5, 33) for _ in range(4))
    w = randn(33)
    f32, bf16 = torch.float32, torch.bfloat16
    torch.library.opcheck(torch.ops.zhllm.rms_norm_forward.default, (x, w, None, 1e-6, f32))
    torch.library.opcheck(torch.ops.zhllm.rms_norm_forward.default, (x, w, r, 1e-6, f32))
    torch.library.opcheck(torch.ops.zhllm.rms_norm_forward.default, (x.to(bf16), w, r, 1e-6, bf16))
    _, h, rstd = torch.ops.zhllm.rms_norm_forward(x, w, r, 1e-6, f32)
    torch.library.opcheck(torch.ops.zhllm.rms_norm_backward.default, (d, h, w, rstd, None))
    torch.library.opcheck(torch.ops.zhllm.rms_norm_backward.default, (d, h, w, rstd, d_res))


def test_compiles_fullgraph_with_residual():
    """torch.compile traces through the custom ops, including the two-output residual form."""
    torch.manual_seed(6)
    x, r, w = randn(3, 5, 32, requires_grad=True), randn(3, 5, 32, requires_grad=True), randn(32, requires_grad=True)

    def block(x, r, w):
        out, new_res = rn.rms_norm(x, w, residual=r)
        return rn.rms_norm(out + new_res, w)

    def block_ref(x, r, w):
        out, new_res = reference.rms_norm(x, w, residual=r)
        return reference.rms_norm(out + new_res, w)

    ours, ref = torch.compile(block, fullgraph=True)(x, r, w), block_ref(x, r, w)
    assert_fp32_close(ours, ref)
    d = randn(3, 5, 32)
    for a, b, name in zip(grads(ours, [x, r, w], d), grads(ref, [x, r, w], d), ("x", "residual", "weight")):
        assert_fp32_close(a, b, what=f"grad {name}")


@pytest.mark.parametrize("n_rows,n_cols,n_sms", [(16384, 1668, 28), (16384, 512, 132), (7, 896, 132), (1, 64, 4)])
def test_backward_split_covers_every_row_with_several_programs_per_sm(n_rows, n_cols, n_sms):
    rows_per_program, programs = rn.backward_split(n_rows, n_cols, n_sms)
    block_rows, _, num_warps = rn._launch_shape(n_cols)
    assert (programs - 1) * rows_per_program < n_rows <= programs * rows_per_program  # every row, no idle program
    assert programs <= -(-n_rows // block_rows)  # never more programs than row blocks
    if n_rows >= 4096:
        assert programs >= 2 * n_sms, "a single program per SM leaves the row loop latency-bound"
        assert programs * num_warps <= n_sms * rn.BACKWARD_WARPS_PER_SM
