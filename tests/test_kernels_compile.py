"""torch.compile(fullgraph=True) traces through every op (custom ops with fake implementations): no graph breaks."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, assert_fp32_close, randn, requires_triton
from torch import nn

import zhkernels
from zhkernels import reference

pytestmark = requires_triton


class TinyBlock(nn.Module):
    """One Llama block and the loss, written with every fused op."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 96, vocab: int = 97) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = zhkernels.RMSNorm(dim), zhkernels.RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp = zhkernels.SwiGLUMLP(dim, ffn)
        self.head = nn.Linear(dim, vocab, bias=False)
        cos, sin = reference.rope_cos_sin(64, self.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor):
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(h).view(b, t, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        q, k = zhkernels.apply_rope(q, k, self.cos, self.sin, position_ids)
        a = zhkernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        h, residual = self.norm2(self.wo(a.transpose(1, 2).reshape(b, t, -1)), residual=x)
        h = residual + self.mlp(h)
        return zhkernels.fused_linear_cross_entropy(h, self.head.weight, targets)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_fullgraph_compile_matches_eager(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    block = TinyBlock().to(DEVICE)
    x = randn(2, 21, 64)
    targets = torch.randint(0, 97, (2, 21), device=DEVICE)
    targets[:, :3] = -100
    position_ids = torch.cat([torch.arange(9), torch.arange(12)]).repeat(2, 1).to(DEVICE)
    doc_ids = torch.cat([torch.zeros(9), torch.ones(12)]).repeat(2, 1).to(DEVICE, torch.int32)
    eager_loss = block(x, targets, position_ids, doc_ids)
    eager_grads = torch.autograd.grad(eager_loss, list(block.parameters()))
    compiled = torch.compile(block, fullgraph=True, backend=backend)  # fullgraph: any graph break raises
    loss = compiled(x, targets, position_ids, doc_ids)
    grads = torch.autograd.grad(loss, list(block.parameters()))
    assert_fp32_close(loss, eager_loss, what="loss")
    for (name, _), g, e in zip(block.named_parameters(), grads, eager_grads):
        assert_fp32_close(g, e, what=f"grad {name}")


def test_inductor_compiles_a_fused_op():
    """The default backend (Inductor) around one custom op: compiles and gives the eager result."""
    torch._dynamo.reset()
    gate, up = randn(3, 40, requires_grad=True), randn(3, 40)
    fn = torch.compile(lambda g, u: zhkernels.swiglu(g, u) * 2.0 + 1.0, fullgraph=True)
    out = fn(gate, up)
    assert_fp32_close(out, reference.swiglu(gate, up) * 2.0 + 1.0)
    (g,) = torch.autograd.grad(out.sum(), [gate])
    (e,) = torch.autograd.grad((reference.swiglu(gate, up) * 2.0 + 1.0).sum(), [gate])
    assert_fp32_close(g, e, what="grad")
