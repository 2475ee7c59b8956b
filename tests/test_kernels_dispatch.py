"""Dispatch: CPU tensors outside the interpreter run zhkernels.reference (no custom op is called); CUDA or the
interpreter run the Triton ops; mixed devices are refused."""

from __future__ import annotations

import pytest
import torch

import zhkernels
from zhkernels import _dispatch, reference

OPS = [
    ("rms_norm", lambda: (torch.randn(3, 8), torch.ones(8))),
    ("swiglu", lambda: (torch.randn(3, 8), torch.randn(3, 8))),
    ("apply_rope", lambda: (torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), *reference.rope_cos_sin(5, 8))),
    ("flash_attention", lambda: (torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))),
    ("fused_linear_cross_entropy", lambda: (torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,)))),
    ("fused_linear_logprobs", lambda: (torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,)))),
]


@pytest.fixture
def custom_op_calls(monkeypatch):
    """Counts calls into torch.ops.zhllm.* (the Triton path) by wrapping each autograd Function's apply."""
    calls = []
    for cls in (
        zhkernels.RMSNormFunction,
        zhkernels.SwiGLUFunction,
        zhkernels.RoPEFunction,
        zhkernels.FlashAttentionFunction,
        zhkernels.FusedLinearCrossEntropyFunction,
        zhkernels.FusedLinearLogprobsFunction,
    ):
        original = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _o=original, _n=cls.__name__: calls.append(_n) or _o(*a))
    return calls


@pytest.mark.parametrize("name,make", OPS, ids=[n for n, _ in OPS])
def test_cpu_without_interpreter_runs_the_reference(name, make, monkeypatch, custom_op_calls):
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: False)
    torch.manual_seed(0)
    args = make()
    ours, ref = getattr(zhkernels, name)(*args), getattr(reference, name)(*args)
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(a, b)
    assert custom_op_calls == []


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name,make", OPS, ids=[n for n, _ in OPS])
def test_interpreter_runs_the_triton_op(name, make, monkeypatch, custom_op_calls):
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: True)
    if not _dispatch.interpret_mode_at_import():
        pytest.skip("the kernels were decorated without TRITON_INTERPRET=1 (a CUDA machine): nothing to interpret")
    getattr(zhkernels, name)(*make())
    assert len(custom_op_calls) == 1


def test_without_triton_everything_falls_back(monkeypatch, custom_op_calls):
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    assert not _dispatch.use_triton(torch.randn(2))
    zhkernels.swiglu(torch.randn(2, 3), torch.randn(2, 3))
    assert custom_op_calls == []


def test_mixed_devices_are_refused():
    meta = torch.empty(3, 8, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        zhkernels.swiglu(torch.randn(3, 8), meta)


def test_interpreter_index_fix_applies_exactly_where_triton_needs_it():
    """Triton 3.3–3.6's interpreter int()s shape-(1,) arrays, which numpy ≥ 2.4 refuses; 3.7 fixed it."""
    from zhkernels._interpreter_compat import needs_index_fix

    assert needs_index_fix("3.6.0", "2.4.6") and needs_index_fix("3.3.1", "2.5.0")
    assert not needs_index_fix("3.7.0", "2.4.6") and not needs_index_fix("3.9.0", "2.5.1")
    assert not needs_index_fix("3.6.0", "2.3.5") and not needs_index_fix("3.6.0rc1", "2.2.0")
