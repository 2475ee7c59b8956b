"""Flash attention: the Triton op against zhkernels.reference, forward and dq/dk/dv, GQA, documents, strides, errors."""

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

fa = importlib.import_module("zhkernels.flash_attention")  # the module (zhkernels.flash_attention is the function)
pytestmark = [requires_triton, poisoned]

# (B, Hq, Hk, Tq, Tk, D, causal)
FP32_CASES = [
    (2, 4, 2, 77, 77, 64, True),  # GQA, causal, length not a multiple of any block
    (2, 4, 2, 77, 77, 96, True),  # head_dim padded to a 128 tile
    (1, 2, 2, 77, 77, 64, False),  # non-causal
    (1, 2, 1, 33, 77, 64, True),  # Tq < Tk: causal aligned to the end (KV cache)
    (1, 2, 1, 33, 77, 96, False),
    (1, 4, 1, 1, 50, 64, True),  # one decoding step
    (1, 2, 1, 50, 50, 40, True),  # an odd head_dim
    (1, 2, 2, 45, 45, 128, True),
    (1, 1, 1, 20, 20, 256, False),
    (1, 1, 1, 3, 3, 64, True),  # (one key alone has a zero dq: a relative error against 0 means nothing)
]
if ON_GPU:
    FP32_CASES += [(4, 8, 8, 1024, 1024, 64, True), (2, 8, 2, 2048, 2048, 128, True), (2, 8, 4, 1000, 1500, 96, False)]


def case_id(c: tuple) -> str:
    return "B{}_Hq{}_Hk{}_Tq{}_Tk{}_D{}_{}".format(*c[:6], "causal" if c[6] else "full")


def qkv(b: int, hq: int, hk: int, tq: int, tk: int, d: int, dtype: torch.dtype = torch.float32):
    return (
        randn(b, hq, tq, d, dtype=dtype, requires_grad=True),
        randn(b, hk, tk, d, dtype=dtype, requires_grad=True),
        randn(b, hk, tk, d, dtype=dtype, requires_grad=True),
    )


def plain_attention(q, k, v, causal=True, doc_ids=None, scale=None):
    """What eager PyTorch computes in the inputs' own precision (GQA by repeating K/V)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = reference.attention_mask(q.shape[-2], k.shape[-2], causal, doc_ids, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def check_fp32(q, k, v, causal=True, doc_ids=None, scale=None, what=""):
    out = fa.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    ref = reference.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale)
    assert_fp32_close(out, ref, what=f"{what} output")
    d = randn(*out.shape)
    for ours, theirs, name in zip(grads(out, [q, k, v], d), grads(ref, [q, k, v], d), "qkv"):
        assert_fp32_close(ours, theirs, what=f"{what} grad {name}")
    return out


@pytest.mark.parametrize("case", FP32_CASES, ids=case_id)
def test_fp32_matches_reference(case):
    torch.manual_seed(0)
    *shape, causal = case
    check_fp32(*qkv(*shape), causal=causal)


def test_explicit_scale_and_module():
    torch.manual_seed(1)
    q, k, v = qkv(1, 2, 1, 40, 40, 64)
    check_fp32(q, k, v, causal=False, scale=0.3)
    module = fa.FlashAttention(causal=False, scale=0.3)
    assert_fp32_close(module(q, k, v), reference.flash_attention(q, k, v, causal=False, scale=0.3))
    assert "causal=False" in repr(module)


LOW_CASES = [(2, 4, 2, 77, 77, 64, True), (1, 2, 1, 77, 77, 96, False), (1, 2, 2, 40, 40, 128, True)]
if ON_GPU:
    LOW_CASES += [(4, 8, 8, 1024, 1024, 64, True), (4, 8, 2, 2048, 2048, 128, True), (4, 8, 8, 1024, 1024, 96, False)]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", LOW_CASES, ids=case_id)
def test_low_precision_against_fp32(dtype, case):
    torch.manual_seed(2)
    b, hq, hk, tq, tk, d, causal = case
    q32, k32, v32 = qkv(b, hq, hk, tq, tk, d)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))
    grad_out = randn(b, hq, tq, d).to(dtype)
    out = fa.flash_attention(q, k, v, causal=causal)
    plain = plain_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference.flash_attention(*ref_in, causal=causal)
    assert_low_precision_close(out, plain, ref)
    ours = grads(out, [q, k, v], grad_out)
    eager = grads(plain, [q, k, v], grad_out)
    fp32 = grads(ref, ref_in, grad_out.float())
    for a, b_, c, name in zip(ours, eager, fp32, "qkv"):
        assert a.dtype == dtype
        assert_low_precision_close(a, b_, c, what=f"grad {name}")


DOC_LENGTHS = [[30, 1, 46], [77], [5, 60, 12]]


def doc_ids_for(rows: list[list[int]], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Packed rows: document i of a row is a run of (arbitrary, increasing) id 3*i+1."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)) * 3 + 1, torch.tensor(r)) for r in rows]).to(
        dtype=dtype, device=randn(1).device
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_documents_match_reference_and_separate_runs(causal):
    torch.manual_seed(3)
    rows = DOC_LENGTHS[:2] if causal else [DOC_LENGTHS[0], DOC_LENGTHS[2]]
    doc_ids = doc_ids_for(rows, torch.int64 if causal else torch.int32)
    q, k, v = qkv(2, 4, 2, 77, 77, 64)
    out = check_fp32(q, k, v, causal=causal, doc_ids=doc_ids, what="packed")
    # Each document alone through the op gives the same rows and the same gradients.
    d = randn(*out.shape)
    packed_grads = grads(fa.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids), [q, k, v], d)
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            qs, ks, vs = (t.detach()[b : b + 1, :, part].clone().requires_grad_() for t in (q, k, v))
            alone = fa.flash_attention(qs, ks, vs, causal=causal)
            assert_fp32_close(out[b : b + 1, :, part], alone, what=f"row {b} document {part}")
            for g_packed, g_alone, name in zip(packed_grads, grads(alone, [qs, ks, vs], d[b : b + 1, :, part]), "qkv"):
                assert_fp32_close(g_packed[b : b + 1, :, part], g_alone, what=f"grad {name} row {b} document {part}")
            start += n


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_documents_low_precision(dtype):
    torch.manual_seed(4)
    doc_ids = doc_ids_for([DOC_LENGTHS[0], DOC_LENGTHS[2]])
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv(2, 2, 1, 77, 77, 96))
    out = fa.flash_attention(q, k, v, doc_ids=doc_ids)
    ref = reference.flash_attention(q.float(), k.float(), v.float(), doc_ids=doc_ids)
    assert_low_precision_close(out, plain_attention(q, k, v, doc_ids=doc_ids), ref)
    assert torch.isfinite(torch.cat([g.flatten() for g in grads(out, [q, k, v], torch.ones_like(out))])).all()


def test_strided_views_of_a_fused_projection():
    """q/k/v as ``x.view(B, T, H, D).transpose(1, 2)`` slices of one projection: read through strides, no copy."""
    torch.manual_seed(5)
    b, t, hq, hk, d = 2, 45, 4, 2, 64
    x = randn(b, t, (hq + 2 * hk) * d, requires_grad=True)
    q_flat, k_flat, v_flat = x.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = (f.view(b, t, -1, d).transpose(1, 2) for f in (q_flat, k_flat, v_flat))
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = fa.flash_attention(q, k, v)
    ref = reference.flash_attention(q, k, v)
    assert_fp32_close(out, ref)
    assert out.transpose(1, 2).is_contiguous(), "output should be laid out [B, T, H, D] for the model's reshape"
    grad_out = randn(b, t, hq, d).transpose(1, 2)  # a non-contiguous incoming gradient too
    assert_fp32_close(grads(out, [x], grad_out)[0], grads(ref, [x], grad_out)[0], what="grad x")


def test_non_unit_last_stride_is_copied_not_misread():
    torch.manual_seed(6)
    q = randn(1, 2, 64, 30).transpose(-1, -2)
    k, v = randn(1, 1, 64, 30).transpose(-1, -2), randn(1, 1, 30, 64)
    assert q.stride(-1) != 1
    assert_fp32_close(fa.flash_attention(q, k, v), reference.flash_attention(q, k, v))


def test_gpu_block_table_in_the_interpreter(monkeypatch):
    """The tile sizes a GPU uses (a single ragged block at these lengths) give the same answer."""
    torch.manual_seed(7)
    monkeypatch.setattr(fa, "INTERPRET_BLOCKS", None)
    check_fp32(*qkv(1, 2, 1, 70, 70, 96), causal=True, doc_ids=doc_ids_for([[20, 50]]), what="gpu tiles")
    q, k, v = (t.detach().half().requires_grad_() for t in qkv(1, 2, 1, 40, 70, 128))
    out = fa.flash_attention(q, k, v)
    ref = reference.flash_attention(q.float(), k.float(), v.float())
    assert_low_precision_close(out, plain_attention(q, k, v), ref)


def test_bad_input_errors():
    q, k = randn(1, 4, 8, 64), randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="multiple of"):
        fa.flash_attention(randn(1, 3, 8, 64), k, k)
    with pytest.raises(ValueError, match="head_dim"):
        fa.flash_attention(randn(1, 4, 8, 32), k, k)
    with pytest.raises(ValueError, match="same shape"):
        fa.flash_attention(q, k, randn(1, 2, 9, 64))
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        fa.flash_attention(randn(4, 8, 64), k, k)
    with pytest.raises(TypeError, match="cast"):
        fa.flash_attention(q.half(), k, k)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fa.flash_attention(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match=r"doc_ids must be \[B, Tk\]"):
        fa.flash_attention(q, k, k, doc_ids=torch.zeros(1, 7, dtype=torch.int32, device=q.device))
    with pytest.raises(TypeError, match="integer"):
        fa.flash_attention(q, k, k, doc_ids=torch.zeros(1, 8, device=q.device))
    with pytest.raises(ValueError, match="Tq == Tk"):
        fa.flash_attention(randn(1, 4, 5, 64), k, k, doc_ids=torch.zeros(1, 8, dtype=torch.int32, device=q.device))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        fa.flash_attention(randn(1, 4, 9, 64), k, k)
    with pytest.raises(ValueError, match="head_dim 320"):
        fa.flash_attention(randn(1, 4, 8, 320), randn(1, 2, 8, 320), randn(1, 2, 8, 320))


def test_custom_ops_pass_opcheck():
    torch.manual_seed(8)
    q, k, v = randn(1, 2, 20, 32), randn(1, 1, 20, 32), randn(1, 1, 20, 32)
    doc_ids = doc_ids_for([[7, 13]])
    for bounds, causal in ((None, True), (reference.doc_bounds(doc_ids), False)):
        torch.library.opcheck(torch.ops.zhllm.flash_attention_forward.default, (q, k, v, bounds, causal, 0.2))
        out, lse = torch.ops.zhllm.flash_attention_forward(q, k, v, bounds, causal, 0.2)
        grad_out = randn(1, 2, 20, 32)
        args = (grad_out, q, k, v, out, lse, bounds, causal, 0.2)
        torch.library.opcheck(torch.ops.zhllm.flash_attention_backward.default, args)


def test_forward_op_returns_the_log_sum_exp():
    torch.manual_seed(9)
    q, k, v = randn(2, 4, 37, 64), randn(2, 2, 50, 64), randn(2, 2, 50, 64)
    out, lse = torch.ops.zhllm.flash_attention_forward(q, k, v, None, True, 0.125)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 37)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.125
    scores = scores.masked_fill(~reference.attention_mask(37, 50, True, None, q.device), float("-inf"))
    assert_fp32_close(lse, torch.logsumexp(scores, dim=-1), what="lse")
    assert_fp32_close(out, reference.flash_attention(q, k, v, scale=0.125))


def test_an_id_met_again_later_is_a_new_document_in_kernel_and_reference():
    """Documents are contiguous runs of one id (as packed rows are); both the kernel and the reference say so."""
    torch.manual_seed(11)
    q, k, v = randn(1, 2, 20, 64), randn(1, 2, 20, 64), randn(1, 2, 20, 64)
    doc_ids = torch.tensor([[0] * 6 + [1] * 7 + [0] * 7], device=q.device, dtype=torch.int32)
    relabelled = torch.tensor([[0] * 6 + [1] * 7 + [2] * 7], device=q.device, dtype=torch.int32)
    expected = reference.flash_attention(q, k, v, doc_ids=relabelled)
    assert_fp32_close(reference.flash_attention(q, k, v, doc_ids=doc_ids), expected, what="reference")
    assert_fp32_close(fa.flash_attention(q, k, v, doc_ids=doc_ids), expected, what="kernel")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_documents_at_and_off_block_edges(causal):
    """Only blocks at a document edge, the diagonal or the ragged end are masked: documents that start on,
    just before and just after the interpreter's 16/32 block edges, single tokens, and one row-long document."""
    torch.manual_seed(12)
    rows = [[16, 16, 1, 31, 31, 1], [15, 2, 32, 47], [96], [1] * 6 + [33, 57]]
    doc_ids = doc_ids_for(rows)
    q, k, v = qkv(len(rows), 4, 2, 96, 96, 64)
    check_fp32(q, k, v, causal=causal, doc_ids=doc_ids, what="block edges")


def test_doc_bounds_once_equal_doc_ids_and_are_checked():
    torch.manual_seed(13)
    doc_ids = doc_ids_for([DOC_LENGTHS[0], DOC_LENGTHS[2]])
    bounds = reference.doc_bounds(doc_ids)
    assert bounds.dtype == torch.int32 and bounds.shape == (2, 2, 77)
    assert bounds[:, 0, 30].tolist() == [30, 31] and bounds[:, 1, 70].tolist() == [65, 77]
    q, k, v = qkv(2, 4, 2, 77, 77, 64)
    d = randn(2, 4, 77, 64)
    with_ids = fa.flash_attention(q, k, v, doc_ids=doc_ids)
    with_bounds = fa.flash_attention(q, k, v, doc_bounds=bounds)
    assert torch.equal(with_ids, with_bounds)
    for a, b in zip(grads(with_ids, [q, k, v], d), grads(with_bounds, [q, k, v], d)):
        assert torch.equal(a, b)
    assert_fp32_close(
        reference.flash_attention(q, k, v, doc_bounds=bounds),
        reference.flash_attention(q, k, v, doc_ids=doc_ids),
        what="reference with bounds",
    )
    with pytest.raises(ValueError, match="not both"):
        fa.flash_attention(q, k, v, doc_ids=doc_ids, doc_bounds=bounds)
    with pytest.raises(ValueError, match=r"int32 \[2, B, Tk\]"):
        fa.flash_attention(q, k, v, doc_bounds=bounds.long())


def test_kv_split_fills_the_gpu_with_a_divisor_of_the_group():
    assert fa.kv_split(programs=256, group=4, n_sms=132) == 2  # minimind-26m-like grid on an H100
    assert fa.kv_split(programs=16, group=7, n_sms=132) == 7  # not enough even split 7 ways: the whole group
    assert fa.kv_split(programs=16, group=6, n_sms=4) == 1
    assert fa.kv_split(programs=3, group=6, n_sms=4) == 3  # 3 × 3 ≥ 8
    assert fa.kv_split(programs=1, group=1, n_sms=132) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_dkdv_sums_to_the_unsplit_gradients(monkeypatch, dtype):
    """A GQA group's query heads summed by several programs into fp32 slices = one program summing all."""
    torch.manual_seed(14)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv(2, 8, 2, 50, 50, 64))
    doc_ids = doc_ids_for([[20, 30], [50]])
    d = randn(2, 8, 50, 64).to(dtype)

    def run(programs_per_sm: int, expected_split: int):
        monkeypatch.setattr(fa, "DKDV_PROGRAMS_PER_SM", programs_per_sm)
        assert fa.kv_split(2 * 2 * 2, 4, 4) == expected_split  # B × Hk × key blocks of 32 programs, group 4
        return grads(fa.flash_attention(q, k, v, doc_ids=doc_ids), [q, k, v], d)

    whole, split = run(0, 1), run(1000, 4)
    assert torch.equal(whole[0], split[0]), "dq does not depend on the split"
    for a, b, name in zip(whole[1:], split[1:], "kv"):
        assert b.dtype == dtype and b.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(
            b,
            a,
            rtol=1e-5 if dtype == torch.float32 else 1e-2,
            atol=1e-5 if dtype == torch.float32 else 1e-2,
            msg=f"grad {name}",
        )


def test_autotune_times_every_candidate_once_and_keeps_the_fastest(monkeypatch):
    """With ZHLLM_FLASH_AUTOTUNE the first call per key times each candidate tile of the GPU's table (here a
    fake timer that runs each launch and finds every candidate faster than the last); later calls reuse the choice."""
    torch.manual_seed(15)
    monkeypatch.setattr(fa, "AUTOTUNE", True)
    monkeypatch.setattr(fa, "_TUNED", {})
    monkeypatch.setattr(fa, "TUNING_LOG", [])
    countdown = iter(range(100, 0, -1))

    def fake_time_ms(fn):
        fn()  # the launch runs for real (in the interpreter)
        return float(next(countdown))  # each candidate looks faster than the one before

    monkeypatch.setattr(fa, "_time_ms", fake_time_ms)
    arch = fa._dispatch.gpu_arch(torch.device("cpu"))
    forward = fa.candidates("forward", 64, torch.float16, arch)
    backward = fa.candidates("backward", 64, torch.float16, arch)
    q, k, v = (t.detach().half().requires_grad_() for t in qkv(1, 4, 2, 40, 40, 64))
    out = fa.flash_attention(q, k, v)
    ref = reference.flash_attention(q.float(), k.float(), v.float())
    assert_low_precision_close(out, plain_attention(q, k, v), ref)
    grads(out, [q, k, v], torch.ones_like(out))
    timed = [(e["pass"], tuple(e["tile"])) for e in fa.TUNING_LOG]
    assert timed == [("forward", tuple(t)) for t in forward] + [("backward", tuple(t)) for t in backward]
    assert fa._TUNED[("forward", arch, torch.float16, 64, True, False, 64)] == forward[-1]
    assert fa._TUNED[("backward", arch, torch.float16, 64, True, False, 64)] == backward[-1]
    fa.flash_attention(q, k, v)
    assert len(fa.TUNING_LOG) == len(timed), "a second call with the same key must not time again"
