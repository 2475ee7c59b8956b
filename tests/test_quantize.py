"""llama.quantize: weight-only int8 / int4 quantisation as a model transform, on CPU (PyTorch's weight-only ops).

Error bounds of each scheme's round trip, the quantised layers' CPU ops against the reference (dequantise, then
matmul in fp32), a tiny Llama's logits against its fp32 self, the bytes saved, greedy generation, ``--quant`` on
chat / evaluate / generate, and the refusals (bad scheme, training, gradients) as one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from training_runs import write_packed

import llama.chat as chat_module
import llama.evaluate as evaluate_module
import llama.generate as generate_module
from llama.generation.generate import generate
from llama.generation.load import LoadError, load_for_inference
from llama.model import Llama, LlamaConfig, ModelOptions
from llama.quantize import SCHEMES, QuantLinear, QuantScheme, parse_quant, quantize_model, state_bytes
from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters
from zhkernels import quant, reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Logits of a random tiny Llama (init std 0.02), quantised vs fp32, max |difference| / max |fp32 logit|: measured
# about 0.007 (int8) and 0.10-0.12 (int4, any group) here; the bounds leave room for other seeds.
LOGIT_TOLERANCE = {"int8": 0.03, "int4": 0.3}


def tiny(vocab_size: int = 300, **overrides) -> LlamaConfig:
    fields = dict(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, ffn_dim=100, max_seq_len=64)
    return LlamaConfig(**{**fields, **overrides})  # ffn 100: K off every int4 group, N off aten's multiple of 16


def build(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny(**overrides), ModelOptions(kernels="torch")).eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# ---------------------------------------------------------------- schemes and round trips


def test_schemes_parse_and_a_bad_one_names_the_accepted_ones():
    assert SCHEMES == ("int8", "int4-g32", "int4-g32-asym", "int4-g64", "int4-g64-asym", "int4-g128", "int4-g128-asym")
    assert parse_quant("int8") == QuantScheme(8)
    assert parse_quant("INT4-g128-asym") == QuantScheme(4, 128, True)
    assert all(parse_quant(s).name == s for s in SCHEMES)
    for bad in ("int4", "int4-g16", "fp8", "int8-asym", ""):
        with pytest.raises(ValueError) as e:
            parse_quant(bad)
        assert len(str(e.value).splitlines()) == 1 and "int4-g64-asym" in str(e.value), str(e.value)


def test_int8_round_trip_is_within_half_a_step_per_channel():
    weight = torch.randn(37, 150) * torch.rand(37, 1)  # rows of different ranges
    qweight, scales = quant.quantize_int8(weight)
    error = (reference.dequantize_int8(qweight, scales) - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert torch.allclose(scales, weight.abs().amax(dim=1) / 127)


@pytest.mark.parametrize("group", quant.GROUP_SIZES)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
def test_int4_round_trip_is_within_half_a_step_per_group(group, asymmetric):
    weight = torch.randn(19, 200)  # 200 is no multiple of 64 or 128: padded
    qweight, scales, zeros = quant.quantize_int4(weight, group, asymmetric)
    back = reference.dequantize_int4(qweight, scales, zeros, group, 200)
    step = scales.t().repeat_interleave(group, dim=1)[:, :200]
    assert ((back - weight).abs() <= step / 2 + 1e-6).all()
    if asymmetric:  # the range over 15 levels: finer than symmetric's max|w| / 7
        sym_scales = quant.quantize_int4(weight, group)[1]
        assert (scales <= sym_scales + 1e-7).all()


def test_all_zero_rows_and_groups_stay_zero():
    weight = torch.zeros(4, 64)
    weight[1, 40:] = 1.0
    for scheme in SCHEMES:
        back = QuantLinear(_linear(weight), parse_quant(scheme)).dequantized_weight()
        assert not back.isnan().any() and torch.equal(back[0], torch.zeros(64)), scheme
        assert torch.equal(back[1, :32], torch.zeros(32)), scheme


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


# ---------------------------------------------------------------- the CPU ops


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_path_uses_torch_weight_only_ops_and_equals_the_reference(scheme, dtype):
    torch.manual_seed(0)
    k = 208 if dtype == torch.bfloat16 and scheme == "int8" else 200  # bf16 int8 at K % 16 falls back, see below
    layer = QuantLinear(_linear(torch.randn(100, k) * 0.05), parse_quant(scheme)).to(dtype)
    x = torch.randn(2, 3, k).to(dtype)
    expected_op = "aten._weight_int8pack_mm" if scheme == "int8" else "aten._weight_int4pack_mm_for_cpu"
    assert layer.cpu_op(dtype) == expected_op
    with torch.no_grad():
        got = layer(x)
    expected = x.float() @ layer.dequantized_weight().t()
    assert got.shape == (2, 3, 100) and got.dtype == dtype
    assert relative_error(got, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_bf16_int8_at_k_off_16_falls_back_with_a_logged_reason(caplog):
    layer = QuantLinear(_linear(torch.randn(16, 100)), QuantScheme(8)).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="llama.quantize"):
        assert layer.cpu_op(torch.bfloat16) == "reference"
    x = torch.randn(3, 100).to(torch.bfloat16)
    with torch.no_grad():
        assert relative_error(layer(x), x.float() @ layer.dequantized_weight().t()) <= 1e-2


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g64-asym", "int4-g128"])
def test_quantised_logits_equal_the_dequantised_model_and_stay_near_fp32(scheme):
    base = build()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    quantised = quantize_model(copy.deepcopy(base), scheme)
    dequantised = copy.deepcopy(base)  # the same codes as plain fp32 weights: what every path must compute
    with torch.no_grad():
        for name, layer in quantised.named_modules():
            if isinstance(layer, QuantLinear):
                dequantised.get_submodule(name).weight.copy_(layer.dequantized_weight())
        got, same, fp32 = (m(ids).logits for m in (quantised, dequantised, base))
    assert sum(isinstance(m, QuantLinear) for m in quantised.modules()) == 2 * 7
    assert isinstance(quantised.lm_head, nn.Linear) and isinstance(quantised.model.embed_tokens, nn.Embedding)
    assert relative_error(got, same) <= 1e-5
    assert relative_error(got, fp32) <= LOGIT_TOLERANCE[scheme[:4]]


@pytest.mark.parametrize("scheme", ["int8", "int4-g64", "int4-g128-asym"])
def test_state_bytes_match_the_format(scheme):
    base = build()
    quantised = quantize_model(copy.deepcopy(base), scheme)
    linear = [m for m in base.modules() if isinstance(m, nn.Linear) and m is not base.lm_head]
    other = state_bytes(base) - sum(m.weight.numel() * 4 for m in linear)
    parsed = parse_quant(scheme)
    expected = other
    for m in linear:
        n, k = m.weight.shape
        if parsed.bits == 8:
            expected += n * k + n * 4  # int8 codes + fp32 scales
        else:
            groups = -(-k // parsed.group_size)
            expected += n * groups * parsed.group_size // 2 + groups * n * (4 + parsed.asymmetric)
    assert state_bytes(quantised) == expected
    linear_fp32 = sum(m.weight.numel() * 4 for m in linear)
    if scheme == "int8":  # ≈ a quarter of the fp32 linear weights, plus one scale per row
        assert 0.25 <= (state_bytes(quantised) - other) / linear_fp32 <= 0.27


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_greedy_generation_runs_with_a_quantised_model(scheme):
    model = quantize_model(build(), scheme)
    result = generate(model, [[5, 6, 7], [8, 9]], 8)
    assert [len(s) for s in result.sequences] == [8, 8]
    assert all(0 <= t < 300 for s in result.sequences for t in s)


def test_training_and_gradients_are_refused_in_one_line():
    model = quantize_model(build(), "int8")
    assert not model.training
    with pytest.raises(ValueError, match="inference-only") as e:
        model.train()
    assert len(str(e.value).splitlines()) == 1
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(torch.randn(1, 96, requires_grad=True))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, "int4-g64")
    with pytest.raises(ValueError, match="no q_proj"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8")


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_tokenizer) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=small_tokenizer.vocab_size)
    model = Llama(config)
    reference_tok = {"path": str(Path(small_tokenizer.path).resolve()), "sha256": small_tokenizer.sha256}
    meta = {"model": dataclasses.asdict(config), "train": {"steps": 1}, "tokenizer": reference_tok, "step": 1}
    meta["tokens"] = 1
    out = tmp_path_factory.mktemp("quant") / "run"
    save_checkpoint(out, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out


CPU = ["--kernels", "torch", "--device", "cpu"]


def test_load_for_inference_quantises_and_refuses_a_bad_scheme(ckpt):
    model, _, _ = load_for_inference(ckpt, device="cpu", kernels="torch", quant="int4-g64")
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    with pytest.raises(LoadError, match="use one of int8"):
        load_for_inference(ckpt, device="cpu", quant="int3")


def test_quant_flag_on_chat_evaluate_and_generate(ckpt, small_tokenizer, tmp_path, capsys):
    data = write_packed(
        tmp_path / "corpus.val",
        [small_tokenizer.encode("今天天气很好，我们去公园。") + [small_tokenizer.eos_id]] * 8,
        small_tokenizer.vocab_size,
        bos_id=small_tokenizer.bos_id,
        eos_id=small_tokenizer.eos_id,
        pad_id=small_tokenizer.pad_id,
        tokenizer={"path": str(small_tokenizer.path), "sha256": small_tokenizer.sha256},
    )
    assert (
        evaluate_module.main(["--ckpt", str(ckpt), "--ppl", str(data), "--seq-len", "32", "--quant", "int8", *CPU]) == 0
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n", encoding="utf-8")
    argv = ["--ckpt", str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "4", "--greedy", *CPU]
    assert generate_module.main([*argv, "--quant", "int4-g32"]) == 0
    chat = ["--ckpt", str(ckpt), "--prompt", "你好", "--max-new-tokens", "4", "--greedy", *CPU]
    assert chat_module.main([*chat, "--quant", "int4-g128-asym"]) == 0
    capsys.readouterr()
    own = {
        evaluate_module.main: ["--ppl", str(data)],
        generate_module.main: ["--prompts", str(prompts)],
        chat_module.main: ["--prompt", "你好"],
    }
    for main, arguments in own.items():
        assert main(["--ckpt", str(ckpt), *arguments, "--quant", "int5", *CPU]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "int4-g64-asym" in err[0], err
