"""RoPE against zhkernels.reference and transformers: GQA, strided views, packed positions, both cos/sin forms."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import (
    DEVICE,
    LOW_PRECISION,
    ON_GPU,
    assert_fp32_close,
    assert_low_precision_close,
    poisoned,
    randn,
    requires_triton,
)

from zhkernels import reference

rp = importlib.import_module("zhkernels.rope")  # the module (zhkernels.rope is the function)
pytestmark = [requires_triton, poisoned]


def model_layout(batch: int, heads: int, seq_len: int, head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """``[B, H, T, D]`` as models make it: a transposed view of ``[B, T, H, D]`` (not contiguous), a leaf with grad."""
    leaf = randn(batch, seq_len, heads, head_dim, dtype=dtype, requires_grad=True)
    return leaf.transpose(1, 2)


def hf_apply_rope(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb on per-token ``[B, T, D]`` cos/sin, in the inputs' dtype."""
    c, s = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    return q * c + reference.rotate_half(q) * s, k * c + reference.rotate_half(k) * s


def packed_positions(batch: int, doc_lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in doc_lengths]).repeat(batch, 1).to(DEVICE)


CASES = [(64, 4, 2), (96, 4, 1), (128, 4, 2), (96, 2, 2)] + ([(128, 32, 8)] if ON_GPU else [])


@pytest.mark.parametrize("head_dim,n_q,n_k", CASES)
@pytest.mark.parametrize("positions", ["default", "packed"])
def test_fp32_matches_reference(head_dim, n_q, n_k, positions):
    torch.manual_seed(0)
    batch, seq_len = 2, (2048 if ON_GPU and n_q == 32 else 77)
    q, k = model_layout(batch, n_q, seq_len, head_dim), model_layout(batch, n_k, seq_len, head_dim)
    assert not q.is_contiguous()
    cos, sin = reference.rope_cos_sin(seq_len + 5, head_dim, device=DEVICE)
    pos = packed_positions(batch, [30, seq_len - 30]) if positions == "packed" else None
    ours, ref = rp.apply_rope(q, k, cos, sin, pos), reference.apply_rope(q, k, cos, sin, pos)
    assert_fp32_close(ours[0], ref[0], what="q")
    assert_fp32_close(ours[1], ref[1], what="k")
    dq, dk = randn(*q.shape), randn(*k.shape)
    leaves = [q._base, k._base]
    ours_g = torch.autograd.grad(ours, leaves, [dq, dk])
    ref_g = torch.autograd.grad(ref, leaves, [dq, dk])
    for a, b, name in zip(ours_g, ref_g, ("q", "k")):
        assert_fp32_close(a, b, what=f"grad {name}")


def test_any_table_not_only_repeated_halves():
    """The kernel reads both halves of the cos/sin row, so even tables whose halves differ match the reference."""
    torch.manual_seed(6)
    q, k = model_layout(2, 2, 11, 32), model_layout(2, 1, 11, 32)
    cos, sin = randn(20, 32), randn(20, 32)
    assert not torch.equal(cos[:, :16], cos[:, 16:])
    pos = torch.randint(0, 20, (2, 11), device=DEVICE)
    ours, ref = rp.apply_rope(q, k, cos, sin, pos), reference.apply_rope(q, k, cos, sin, pos)
    d = [randn(*q.shape), randn(*k.shape)]
    leaves = [q._base, k._base]
    for a, b, name in zip(ours, ref, ("q", "k")):
        assert_fp32_close(a, b, what=name)
    for a, b, name in zip(torch.autograd.grad(ours, leaves, d), torch.autograd.grad(ref, leaves, d), ("q", "k")):
        assert_fp32_close(a, b, what=f"grad {name}")


def test_packed_documents_equal_each_document_alone():
    """Positions restarting at 0 inside a packed row give what each document gets when run by itself."""
    torch.manual_seed(1)
    lengths = [20, 40, 17]
    q, k = model_layout(2, 4, 77, 64), model_layout(2, 2, 77, 64)
    cos, sin = reference.rope_cos_sin(64, 64, device=DEVICE)
    q_out, k_out = rp.apply_rope(q, k, cos, sin, packed_positions(2, lengths))
    start = 0
    for n in lengths:
        q_doc, k_doc = rp.apply_rope(q[:, :, start : start + n], k[:, :, start : start + n], cos, sin)
        assert_fp32_close(q_out[:, :, start : start + n], q_doc, tol=1e-6, what="q")
        assert_fp32_close(k_out[:, :, start : start + n], k_doc, tol=1e-6, what="k")
        start += n


def test_per_token_cos_sin_equal_table_with_positions():
    torch.manual_seed(2)
    q, k = model_layout(2, 4, 33, 96), model_layout(2, 2, 33, 96)
    cos, sin = reference.rope_cos_sin(50, 96, device=DEVICE)
    pos = torch.randint(0, 50, (2, 33), device=DEVICE)
    from_table = rp.apply_rope(q, k, cos, sin, pos)
    per_token = rp.apply_rope(q, k, cos[pos], sin[pos])
    for a, b in zip(per_token, from_table):
        assert_fp32_close(a, b, tol=1e-7)
    shared = rp.apply_rope(q, k, cos[:33][None], sin[:33][None])  # [1, T, D] broadcasts over the batch
    for a, b in zip(shared, rp.apply_rope(q, k, cos, sin)):
        assert_fp32_close(a, b, tol=1e-7)
    one_row_ids = rp.apply_rope(q, k, cos, sin, pos[:1])  # position_ids [1, T] broadcast too
    for a, b in zip(one_row_ids, reference.apply_rope(q, k, cos, sin, pos[:1])):
        assert_fp32_close(a, b)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_against_fp32(dtype):
    torch.manual_seed(3)
    q, k = model_layout(2, 4, 77, 128, dtype), model_layout(2, 2, 77, 128, dtype)
    cos, sin = reference.rope_cos_sin(100, 128, device=DEVICE)
    pos = packed_positions(2, [40, 37])
    ours = rp.apply_rope(q, k, cos, sin, pos)
    plain = hf_apply_rope(q, k, cos[pos], sin[pos])
    leaves = [q._base, k._base]
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = reference.apply_rope(f32[0].transpose(1, 2), f32[1].transpose(1, 2), cos, sin, pos)
    d = [randn(*q.shape).to(dtype), randn(*k.shape).to(dtype)]
    for a, b, c, name in zip(ours, plain, ref, ("q", "k")):
        assert a.dtype == dtype
        assert_low_precision_close(a, b, c, what=name)
    ours_g = torch.autograd.grad(ours, leaves, d)
    plain_g = torch.autograd.grad(plain, leaves, d)
    ref_g = torch.autograd.grad(ref, f32, [t.float() for t in d])
    for a, b, c, name in zip(ours_g, plain_g, ref_g, ("q", "k")):
        assert_low_precision_close(a, b, c, what=f"grad {name}")


def test_matches_transformers_llama():
    """Our rotation on Hugging Face's own cos/sin equals transformers' apply_rotary_pos_emb (weights interchange)."""
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    except Exception:  # transformers is optional
        pytest.skip("transformers is not importable")
    torch.manual_seed(4)
    head_dim, n_q, n_k = 64, 4, 2
    config = LlamaConfig(
        hidden_size=head_dim * n_q, num_attention_heads=n_q, num_key_value_heads=n_k, max_position_embeddings=128
    )
    q, k = model_layout(2, n_q, 45, head_dim), model_layout(2, n_k, 45, head_dim)
    pos = packed_positions(2, [25, 20])
    cos, sin = LlamaRotaryEmbedding(config=config).to(DEVICE)(q, pos)
    theirs = apply_rotary_pos_emb(q, k, cos, sin)
    ours = rp.apply_rope(q, k, cos, sin)
    ref_cos, ref_sin = reference.rope_cos_sin(128, head_dim, device=DEVICE)
    from_table = rp.apply_rope(q, k, ref_cos, ref_sin, pos)
    for a, b, c, name in zip(ours, theirs, from_table, ("q", "k")):
        assert_fp32_close(a, b, what=name)
        assert_fp32_close(c, b, what=f"{name} from our table")
    d = [randn(*q.shape), randn(*k.shape)]
    leaves = [q._base, k._base]
    for a, b, name in zip(torch.autograd.grad(ours, leaves, d), torch.autograd.grad(theirs, leaves, d), ("q", "k")):
        assert_fp32_close(a, b, what=f"grad {name}")


def test_module():
    torch.manual_seed(5)
    rope = rp.RotaryEmbedding(64, max_position=128).to(DEVICE)
    assert rope.state_dict() == {}  # tables are rebuilt, never saved
    q, k = model_layout(1, 2, 10, 64), model_layout(1, 1, 10, 64)
    cos, sin = reference.rope_cos_sin(128, 64, device=DEVICE)
    pos = torch.tensor([[3, 4, 5, 6, 0, 1, 2, 3, 4, 5]], device=DEVICE)
    for a, b in zip(rope(q, k, pos), reference.apply_rope(q, k, cos, sin, pos)):
        assert_fp32_close(a, b)
    for a, b in zip(rope(q, k), reference.apply_rope(q, k, cos, sin)):
        assert_fp32_close(a, b)


def test_bad_input_errors():
    cos, sin = reference.rope_cos_sin(16, 8, device=DEVICE)
    q, k = randn(2, 4, 10, 8), randn(2, 2, 10, 8)
    with pytest.raises(ValueError, match="even"):
        rp.apply_rope(randn(2, 4, 10, 7), randn(2, 2, 10, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="width 6 must equal head_dim 8"):
        rp.apply_rope(q, k, cos[:, :6], sin[:, :6])
    with pytest.raises(ValueError, match="build a longer table"):
        rp.apply_rope(q, k, cos[:9], sin[:9])
    with pytest.raises(TypeError, match="integers"):
        rp.apply_rope(q, k, cos, sin, torch.zeros(2, 10, device=DEVICE))
    with pytest.raises(ValueError, match=r"position_ids \(2, 9\)"):
        rp.apply_rope(q, k, cos, sin, torch.zeros(2, 9, dtype=torch.long, device=DEVICE))
    if not ON_GPU:  # range check only where it costs no host sync
        with pytest.raises(ValueError, match="span 0..16"):
            rp.apply_rope(q, k, cos, sin, torch.full((2, 10), 16, device=DEVICE).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="agree in batch"):
        rp.apply_rope(q, randn(3, 2, 10, 8), cos, sin)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        rp.apply_rope(q[0], k[0], cos, sin)
    with pytest.raises(TypeError, match="cast"):
        rp.apply_rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="already per token"):
        rp.apply_rope(q, k, cos[:10][None], sin[:10][None], torch.zeros(2, 10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="per-token"):
        rp.apply_rope(q, k, cos[:9][None], sin[:9][None])


def test_custom_ops_pass_opcheck():
    q, k = randn(2, 4, 9, 16), randn(2, 2, 9, 16)
    cos, sin = reference.rope_cos_sin(12, 16, device=DEVICE)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2, device=DEVICE)
    torch.library.opcheck(torch.ops.zhllm.rope_forward.default, (q, k, cos, sin, None))
    torch.library.opcheck(torch.ops.zhllm.rope_forward.default, (q, k, cos, sin, pos))
    torch.library.opcheck(torch.ops.zhllm.rope_forward.default, (q, k, cos[pos], sin[pos], None))
    torch.library.opcheck(torch.ops.zhllm.rope_backward.default, (q, k, cos, sin, pos))


def test_compiles_fullgraph_with_positions():
    """torch.compile traces through the custom ops; the CPU range check must not break the graph."""
    torch.manual_seed(7)
    q, k = model_layout(2, 2, 5, 16), model_layout(2, 1, 5, 16)
    cos, sin = reference.rope_cos_sin(8, 16, device=DEVICE)
    pos = torch.randint(0, 8, (2, 5), device=DEVICE)
    compiled = torch.compile(rp.apply_rope, fullgraph=True)
    ours, ref = compiled(q, k, cos, sin, pos), reference.apply_rope(q, k, cos, sin, pos)
    d = [randn(*q.shape), randn(*k.shape)]
    leaves = [q._base, k._base]
    for a, b, name in zip(ours, ref, ("q", "k")):
        assert_fp32_close(a, b, what=name)
    for a, b, name in zip(torch.autograd.grad(ours, leaves, d), torch.autograd.grad(ref, leaves, d), ("q", "k")):
        assert_fp32_close(a, b, what=f"grad {name}")


def test_gradients_flow_back_into_the_projection_without_a_copy():
    """Outputs and input gradients are laid out [B, T, H, D]: autograd's view/transpose of the projection then
    passes dq/dk through as views (a contiguous [B, H, T, D] gradient is copied back in every layer)."""
    torch.manual_seed(21)
    b, t, hq, hk, d = 2, 9, 4, 2, 16
    x = randn(b, t, (hq + hk) * d, requires_grad=True)
    q_flat, k_flat = x.split([hq * d, hk * d], dim=-1)
    q, k = q_flat.view(b, t, hq, d).transpose(1, 2), k_flat.view(b, t, hk, d).transpose(1, 2)
    cos, sin = reference.rope_cos_sin(t, d, device=DEVICE)
    q_out, k_out = rp.apply_rope(q, k, cos, sin)
    assert q_out.transpose(1, 2).is_contiguous() and k_out.transpose(1, 2).is_contiguous()
    grad_q, grad_k = torch.ops.zhllm.rope_backward(q_out.detach(), k_out.detach(), cos, sin, None)
    assert grad_q.transpose(1, 2).is_contiguous() and grad_k.transpose(1, 2).is_contiguous()
    ref_q, ref_k = reference.apply_rope(q, k, cos, sin)
    torch.testing.assert_close(q_out, ref_q)
    torch.testing.assert_close(k_out, ref_k)
    g = randn(b, hq, t, d)
    ours = torch.autograd.grad(q_out, x, g)[0]
    theirs = torch.autograd.grad(ref_q, x, g)[0]
    torch.testing.assert_close(ours, theirs)
