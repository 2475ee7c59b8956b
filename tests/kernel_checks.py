"""Shared checks for the kernel tests: where they run, NaN-poisoned outputs, and the error budgets.

On a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``), so shapes stay small; with CUDA the same tests also run larger shapes.
"""

from __future__ import annotations

import pytest
import torch

from zhkernels import _dispatch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
LOW_PRECISION = (torch.float16, torch.bfloat16)

requires_triton = pytest.mark.skipif(
    not _dispatch.HAS_TRITON or not (ON_GPU or _dispatch.interpret_mode()),
    reason="Triton kernels need triton and either CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)",
)


#: Every buffer a kernel allocates starts NaN-filled (fixture in conftest), so an unwritten element fails the test.
poisoned = pytest.mark.usefixtures("poisoned_outputs")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude (a scale-free error)."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), "non-finite values in the output (an element left unwritten?)"
    if ours.numel() == 0:
        return 0.0
    return max_abs(ours, ref) / max(ref.double().abs().max().item(), 1e-30)


def assert_fp32_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5, what: str = "output") -> None:
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def assert_low_precision_close(
    ours: torch.Tensor,
    same_precision_torch: torch.Tensor,
    fp32_ref: torch.Tensor,
    slack: float = 1.5,
    tol: float = 2e-3,
    what: str = "output",
) -> None:
    """Our low-precision result is judged against the float32 reference: its error may be at most
    ``slack`` times the error of plain PyTorch computing in the same precision, plus ``tol`` (relative)."""
    ours_err = rel_err(ours.float(), fp32_ref.float())
    torch_err = rel_err(same_precision_torch.float(), fp32_ref.float())
    assert ours_err <= slack * torch_err + tol, (
        f"{what}: error {ours_err:.3e} vs float32 reference; plain PyTorch in {ours.dtype} gets {torch_err:.3e}"
    )


def randn(
    *shape: int, dtype: torch.dtype = torch.float32, requires_grad: bool = False, scale: float = 1.0
) -> torch.Tensor:
    t = (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out, allow_unused=False))
