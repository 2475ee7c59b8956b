"""zhkernels.quant: the Triton weight-only matmuls (Triton's interpreter on CPU) equal the reference, dequantise
then matmul in fp32, at odd sizes (N odd, K not a multiple of the group, M = 1, 3, 17), and the formats round-trip."""

from __future__ import annotations

import pytest
import torch

from zhkernels import _dispatch, quant, reference

pytestmark = pytest.mark.skipif(
    not _dispatch.interpret_mode(), reason="runs the Triton kernels in the interpreter (TRITON_INTERPRET=1)"
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# vs the fp32 reference on the same codes: fp32 exact up to summation order; fp16/bf16 by the output's rounding
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
SHAPES = [(33, 100), (7, 64), (65, 200)]  # (N, K): N odd; K = 100 and 200 are no multiple of 64 or 128


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_kernel_equals_the_reference(dtype, m, n, k, poisoned_outputs):
    torch.manual_seed(m * n + k)
    dt = DTYPES[dtype]
    qweight, scales = quant.quantize_int8(torch.randn(n, k), scale_dtype=dt)
    x = torch.randn(m, k).to(dt)
    got = quant.int8_matmul(x, qweight, scales)
    expected = reference.int8_matmul(x.float(), qweight, scales)
    assert got.dtype == dt and got.shape == (m, n) and not got.isnan().any()
    assert relative_error(got, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", quant.GROUP_SIZES)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
def test_int4_kernel_equals_the_reference(dtype, m, n, k, group, asymmetric, poisoned_outputs):
    torch.manual_seed(m * n + k + group)
    dt = DTYPES[dtype]
    qweight, scales, zeros = quant.quantize_int4(torch.randn(n, k), group, asymmetric, scale_dtype=dt)
    x = torch.randn(m, k).to(dt)
    got = quant.int4_matmul(x, qweight, scales, zeros, group, k)
    expected = reference.int4_matmul(x.float(), qweight, scales, zeros, group, k)
    assert got.dtype == dt and got.shape == (m, n) and not got.isnan().any()
    assert relative_error(got, expected) <= TOLERANCE[dtype]


def test_strided_and_batched_activations_are_read_in_place():
    torch.manual_seed(0)
    qweight, scales, zeros = quant.quantize_int4(torch.randn(24, 96), 32, True)
    wide = torch.randn(2, 3, 200)
    x = wide[..., 10:106]  # last dim contiguous, rows 200 apart
    got = quant.int4_matmul(x, qweight, scales, zeros, 32, 96)
    assert got.shape == (2, 3, 24)
    assert relative_error(got, reference.int4_matmul(x, qweight, scales, zeros, 32, 96)) <= 1e-5


def test_int4_packing_round_trips_exactly():
    codes = torch.randint(0, 16, (13, 96), dtype=torch.uint8)
    packed = reference.int4_pack(codes)
    assert packed.shape == (13, 48) and packed.dtype == torch.uint8
    assert torch.equal(reference.int4_unpack(packed), codes)
    assert torch.equal(packed[0, 0], codes[0, 0] | (codes[0, 1] << 4))  # column 2j low nibble, 2j + 1 high


def test_quantising_a_k_off_the_group_pads_with_zero_weights():
    weight = torch.randn(5, 100)
    qweight, scales, zeros = quant.quantize_int4(weight, 64, asymmetric=True)
    assert qweight.shape == (5, 64) and scales.shape == (2, 5) and zeros.shape == (2, 5)
    full = reference.dequantize_int4(qweight, scales, zeros, 64, 128)
    assert torch.equal(full[:, 100:], torch.zeros(5, 28))


def test_bad_inputs_and_gradients_are_one_line_errors():
    qweight, scales = quant.quantize_int8(torch.randn(8, 32))
    with pytest.raises(ValueError, match="32 input features"):
        quant.int8_matmul(torch.randn(2, 31), qweight, scales)
    with pytest.raises(ValueError, match="qweight must be int8"):
        quant.int8_matmul(torch.randn(2, 32), qweight.float(), scales)
    with pytest.raises(RuntimeError, match="inference-only"):
        quant.int8_matmul(torch.randn(2, 32, requires_grad=True), qweight, scales)
    packed, s4, _ = quant.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="int4_matmul: expected"):
        quant.int4_matmul(torch.randn(2, 64), packed, s4, None, 64, 64)
    with pytest.raises(ValueError, match="group size must be one of 32, 64, 128"):
        quant.quantize_int4(torch.randn(8, 64), 16)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quant.int4_matmul(torch.randn(2, 64).double(), packed, s4, None, 32, 64)


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    qweight, scales = quant.quantize_int8(torch.randn(9, 40))
    x = torch.randn(3, 40)
    torch.library.opcheck(
        torch.ops.zhllm.int8_matmul, (x, qweight, scales), test_utils=("test_schema", "test_faketensor")
    )
    packed, s4, z4 = quant.quantize_int4(torch.randn(9, 40), 32, True)
    torch.library.opcheck(
        torch.ops.zhllm.int4_matmul, (x, packed, s4, z4, 32, 40), test_utils=("test_schema", "test_faketensor")
    )
