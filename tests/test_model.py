"""llama.model: same math as transformers' Llama, Triton path = torch path (values and gradients), packed
documents, presets, activation checkpointing, RoPE scaling against transformers, torch.compile.

Without CUDA, kernels="triton" runs the real Triton kernels in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so those models stay tiny.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import DEVICE, ON_GPU, assert_fp32_close, requires_triton

from llama import model as model_module
from llama.model import PRESETS, Llama, LlamaConfig, ModelOptions
from llama.rope_scaling import inv_freq_and_attention_factor, rope_tables
from zhkernels import reference

VOCAB = 61
KERNELS = ["torch", pytest.param("triton", marks=requires_triton)]


def tiny(**overrides) -> LlamaConfig:
    """2 layers, GQA 4/2 heads of 16 dims, fp32: small enough for the Triton interpreter."""
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64)
    return LlamaConfig(**{**fields, **overrides})


def build(config: LlamaConfig, seed: int = 0, kernels: str = "torch", **options) -> Llama:
    """A model whose weights are large enough (and norms not all 1) that a wrong op shows in the logits."""
    torch.manual_seed(seed)
    model = Llama(config, ModelOptions(kernels=kernels, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.dim() == 1 else 0.0))
    return model.to(DEVICE)


def shifted(ids: torch.Tensor) -> torch.Tensor:
    """Labels as the data engine gives them: the next token, -100 after the last."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def forbid_reference_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make kernels' fallback to zhkernels.reference raise, so a kernels="triton" test proves the Triton kernels ran."""

    def refuse(*args, **kwargs):
        raise AssertionError("kernels fell back to zhkernels.reference on the Triton path")

    for name in ("rms_norm", "apply_rope", "swiglu", "flash_attention", "fused_linear_cross_entropy"):
        monkeypatch.setattr(reference, name, refuse)  # TORCH_OPS keeps the originals it captured at import


def hf():
    """transformers (a dev extra): the tests that compare with it skip without it."""
    return pytest.importorskip("transformers")


def hf_model(config: LlamaConfig, state: dict) -> torch.nn.Module:
    transformers = hf()
    hf_config = transformers.LlamaConfig(**config.to_hf_config())
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).to(DEVICE).eval()
    model.load_state_dict(state, strict=True)
    return model


# 1. the same network as transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_loss_match_transformers(kernels: str, tie: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels == "triton":
        forbid_reference_fallback(monkeypatch)
    config = tiny(tie_embeddings=tie)
    ours = build(config, kernels=kernels).eval()
    theirs = hf_model(config, ours.state_dict())
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == tie
    ids = torch.randint(0, VOCAB, (2, 21), device=DEVICE)
    with torch.no_grad():
        expected = theirs(ids, labels=ids)
        logits = ours(ids).logits
        loss = ours(ids, labels=shifted(ids)).loss
    assert logits.shape == (2, 21, VOCAB)
    assert (logits - expected.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - expected.loss.item()) <= 1e-5


def test_transformers_weights_load_into_ours() -> None:
    transformers = hf()
    config = tiny(tie_embeddings=False)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config()))
    ours = Llama(LlamaConfig.from_hf(theirs.config), ModelOptions(kernels="torch"))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())


# 2./3. the Triton path: gradients, packed documents --------------------------------------------------------------


def packed_batch(lengths: list[int], rows: int = 1) -> dict[str, torch.Tensor]:
    """Rows of documents back to back, positions restarting at 0 in each, doc ids 0, 1, 2, … (as engine.dataset)."""
    ids = torch.randint(0, VOCAB, (rows, sum(lengths)), device=DEVICE)
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(rows, -1).to(DEVICE)
    doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)]).expand(rows, -1)
    return {"input_ids": ids, "labels": shifted(ids), "position_ids": positions, "doc_ids": doc_ids.to(DEVICE)}


@requires_triton
def test_triton_gradients_equal_torch_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_reference_fallback(monkeypatch)
    batch = packed_batch([9, 14, 7], rows=2)
    results = {}
    for kernels in ("torch", "triton"):
        model = build(tiny(), kernels=kernels)
        loss = model(**batch).loss
        loss.backward()
        results[kernels] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results["torch"], results["triton"]
    assert_fp32_close(loss_tri, loss_ref, what="loss")
    assert grads_tri.keys() == grads_ref.keys()
    for name, grad in grads_tri.items():
        assert grads_ref[name].abs().max() > 0, name
        assert_fp32_close(grad, grads_ref[name], what=f"grad of {name}")


@pytest.mark.parametrize("kernels", KERNELS)
def test_packed_documents_equal_documents_alone(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels == "triton":
        forbid_reference_fallback(monkeypatch)
    lengths = [5, 11, 8]
    model = build(tiny(), kernels=kernels).eval()
    batch = packed_batch(lengths)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"]).logits
        alone = [model(doc).logits for doc in batch["input_ids"].split(lengths, dim=1)]
        unmasked = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (packed - torch.cat(alone, dim=1)).abs().max().item() <= 1e-5
    assert (unmasked - torch.cat(alone, dim=1)).abs().max().item() > 1e-3  # the mask is what makes them equal


# 4. presets ---------------------------------------------------------------------------------------------------


def expected_params(dim: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, tied: bool) -> int:
    head_dim = dim // heads
    attention = dim * head_dim * (heads + 2 * kv) + heads * head_dim * dim
    block = attention + 3 * dim * ffn + 2 * dim
    return layers * block + dim + vocab * dim * (1 if tied else 2)


PRESET_SHAPES = {  # DESIGN.md's table; ffn "auto" worked out by hand: int(8 * 512 / 3) = 1365 → 1376 (×32), 1408 (×64)
    "seed000-160m": (896, 12, 14, 2, 2560, 10_000, False),
    "seed002-120m": (512, 12, 8, 8, 2048, 6400, False),
    "seed003-92m": (768, 6, 8, 8, 1668, 35_023, False),
    "seed004-baby": (512, 8, 8, 8, 1376, 6400, True),
    "minimind-26m": (512, 8, 8, 2, 1408, 6_400, True),
    "tiny": (128, 2, 4, 2, 384, 6400, False),
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_with_the_right_parameter_counts(name: str) -> None:
    assert set(PRESET_SHAPES) == set(PRESETS)
    needs_vocab = PRESETS[name]["vocab_size"] is None
    config = LlamaConfig.from_preset(name, **({"vocab_size": 6400} if needs_vocab else {}))
    with torch.device("meta"):
        model = Llama(config)
    assert model.lm_head.weight.is_meta
    assert model.num_params() == expected_params(*PRESET_SHAPES[name])
    if needs_vocab:
        with pytest.raises(ValueError, match="vocab_size"):
            LlamaConfig.from_preset(name)


def test_preset_sizes_are_what_their_names_say() -> None:
    with torch.device("meta"):
        assert 90e6 < Llama(LlamaConfig.from_preset("seed003-92m")).num_params() < 93e6
        assert 25e6 < Llama(LlamaConfig.from_preset("minimind-26m")).num_params() < 27e6


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="seed003-92m.*tiny"):
        LlamaConfig.from_preset("seed999")


# 5. activation checkpointing ------------------------------------------------------------------------------------


def test_checkpointing_gives_the_same_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = packed_batch([12, 20], rows=2)
    results, block_calls = {}, {}
    calls: list[int] = []
    attention_forward = model_module.Attention.forward
    monkeypatch.setattr(
        model_module.Attention, "forward", lambda *a, **k: calls.append(1) or attention_forward(*a, **k)
    )
    for on in (False, True):
        model = build(tiny(), checkpointing=on, dropout=0.1).train()
        calls.clear()
        torch.manual_seed(123)  # the same dropout masks; checkpoint replays the RNG state on recompute
        loss = model(**batch).loss
        loss.backward()
        results[on] = loss.detach(), [p.grad for p in model.parameters()]
        block_calls[on] = len(calls)
    assert block_calls == {False: 2, True: 4}  # checkpointing re-ran both blocks in backward
    assert torch.equal(results[False][0], results[True][0])
    for g_off, g_on in zip(results[False][1], results[True][1]):
        assert torch.allclose(g_off, g_on, rtol=0, atol=1e-7)


# 6. RoPE scaling ------------------------------------------------------------------------------------------------

SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 4.0, "original_max_seq_len": 128},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 128},
    "yarn-custom": {
        "type": "yarn",
        "factor": 8.0,
        "original_max_seq_len": 64,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.25,
    },
}


@pytest.mark.parametrize("name", SCALINGS)
def test_rope_scaling_matches_transformers(name: str) -> None:
    transformers = hf()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(dim=512, n_heads=8, vocab_size=10, max_seq_len=512, rope_scaling=SCALINGS[name])
    hf_config = transformers.LlamaConfig(**config.to_hf_config())
    seq_len = config.max_seq_len
    rope = getattr(hf_config, "rope_parameters", None) or hf_config.rope_scaling  # transformers 5 / 4
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu", seq_len=seq_len)
    inv_freq, factor = inv_freq_and_attention_factor(config.head_dim, config.rope_theta, config.rope_scaling, seq_len)
    assert factor == pytest.approx(hf_factor, abs=1e-12)
    assert ((inv_freq - hf_inv_freq.double()).abs() / hf_inv_freq.double()).max() < 2e-7  # HF rounds to float32
    cos, sin = rope_tables(seq_len, config.head_dim, config.rope_theta, config.rope_scaling, seq_len=seq_len)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1), torch.arange(seq_len)[None])
    # early positions: equal to 1e-6; later ones drift by HF's float32 angle (position * inv_freq) rounding
    assert (cos[:16] - hf_cos[0, :16]).abs().max() < 1e-6 and (sin[:16] - hf_sin[0, :16]).abs().max() < 1e-6
    assert (cos - hf_cos[0]).abs().max() < 2 * seq_len * 2**-24 and (sin - hf_sin[0]).abs().max() < 2 * seq_len * 2**-24


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn"])
def test_scaled_model_past_its_trained_length_matches_transformers(name: str) -> None:
    transformers = hf()
    scaling = {**SCALINGS[name], "original_max_seq_len": 16} if name != "linear" else SCALINGS[name]
    config = tiny(max_seq_len=64, rope_scaling=scaling)
    ours = build(config).eval()
    theirs = hf_model(config, ours.state_dict())
    ids = torch.randint(0, VOCAB, (1, 40), device=DEVICE)
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-5
    round_trip = LlamaConfig.from_hf(transformers.LlamaConfig(**config.to_hf_config()))
    assert round_trip.to_hf_config() == config.to_hf_config() and round_trip.max_seq_len == config.max_seq_len


@pytest.mark.parametrize(
    "scaling",
    [
        {"type": "linear", "factor": 1.0},
        {"type": "yarn", "factor": 1.0, "original_max_seq_len": 16},
        {"type": "ntk", "factor": 4.0, "original_max_seq_len": 64},
    ],
)
def test_neutral_scaling_equals_plain_rope(scaling: dict) -> None:
    ids = torch.randint(0, VOCAB, (2, 30), device=DEVICE)
    with torch.no_grad():
        plain = build(tiny()).eval()(ids).logits
        scaled = build(tiny(rope_scaling=scaling)).eval()(ids).logits  # ntk within its trained length: no change
    assert (plain - scaled).abs().max().item() <= 1e-6


def test_rope_tables_stay_float32_when_the_model_is_cast() -> None:
    model = Llama(tiny())
    cos = model.model.rotary.cos.clone()
    model.to(torch.bfloat16)
    assert model.model.rotary.cos.dtype == torch.float32 and torch.equal(model.model.rotary.cos, cos)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert "cos" not in str(list(model.state_dict()))


def test_meta_model_materialises_with_to_empty_and_init_weights() -> None:
    with torch.device("meta"):
        model = Llama(tiny())
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.model.rotary.cos, Llama(tiny()).model.rotary.cos)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert 0.015 < model.model.layers[0].mlp.up_proj.weight.std() < 0.025
    assert 0.006 < model.model.layers[0].mlp.down_proj.weight.std() < 0.014  # 0.02 / sqrt(2 * 2 layers) = 0.01


# 7. config, counts, optimizer groups, small behaviours -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(dim=100, n_heads=8), "divisible by n_heads"),
        (dict(n_heads=8, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(dim=24, n_heads=8), "even"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "unknown"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "original_max_seq_len"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0, "beta_fast": 3}), "takes keys"),
    ],
)
def test_config_errors_are_one_line(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        LlamaConfig(**{"dim": 64, "n_heads": 4, "vocab_size": VOCAB, **fields})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "fields, message",
    [(dict(kernels="cuda"), "kernels must be one of"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout")],
)
def test_option_errors_are_one_line(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ModelOptions(**fields)
    assert "\n" not in str(info.value)


def test_architecture_differences_resolve_derived_fields() -> None:
    implicit = tiny(n_kv_heads=None, ffn_dim=None, n_heads=4)
    explicit = tiny(n_kv_heads=4, ffn_dim=implicit.ffn_hidden_dim)
    assert implicit.differences(explicit) == []
    longer = tiny(max_seq_len=128, n_kv_heads=4)
    assert implicit.differences(longer) == [("max_seq_len", 64, 128)]
    assert implicit.differences(longer, ignore=("max_seq_len",)) == []


def test_ffn_auto_rule_and_head_dim() -> None:
    config = LlamaConfig(dim=512, n_heads=8, n_kv_heads=2, vocab_size=VOCAB)
    assert (config.ffn_hidden_dim, config.head_dim, config.kv_heads) == (1408, 64, 2)
    assert LlamaConfig(dim=512, vocab_size=VOCAB, multiple_of=256).ffn_hidden_dim == 1536  # llama2.c's rounding
    assert LlamaConfig(dim=512, vocab_size=VOCAB).kv_heads == 8


@pytest.mark.parametrize("tie", [False, True])
def test_flops_and_parameter_counts(tie: bool) -> None:
    config = tiny(tie_embeddings=tie)
    model = Llama(config)
    d, layers, kv_dim, ffn, seq = 64, 2, 2 * 16, 192, 40
    per_layer = d * d + 2 * d * kv_dim + d * d + 3 * d * ffn
    matmuls = layers * per_layer + VOCAB * d  # lm_head, shared or not, is a matmul; the lookup is not
    assert model.flops_per_token(seq) == 6 * matmuls + 12 * layers * d * seq
    assert model.flops_per_token() == 6 * matmuls + 12 * layers * d * 64
    norms = (2 * layers + 1) * d
    assert model.num_params() == matmuls + norms + (0 if tie else VOCAB * d)
    assert model.num_params(exclude_embeddings=True) == matmuls + norms


@pytest.mark.parametrize("tie", [False, True])
def test_optimizer_groups_decay_matrices_only(tie: bool) -> None:
    model = Llama(tiny(tie_embeddings=tie))
    decay, no_decay = model.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as they are


def test_auto_kernels_choose_torch_on_cpu_and_fully_ignored_labels_give_zero_loss() -> None:
    model = Llama(tiny())  # default options: kernels="auto"
    assert not model.uses_triton(torch.zeros(1, 1, dtype=torch.long))  # even under TRITON_INTERPRET=1
    ids = torch.randint(0, VOCAB, (1, 8))
    assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


# 8. torch.compile ----------------------------------------------------------------------------------------------


@requires_triton
def test_compiles_without_graph_breaks_on_the_triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_reference_fallback(monkeypatch)
    torch._dynamo.reset()
    model = build(tiny(n_layers=1), kernels="triton")
    batch = packed_batch([10, 14])
    eager = model(**batch).loss
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(**batch)
    assert out.logits is None
    out.loss.backward()
    assert_fp32_close(out.loss.detach(), eager.detach(), what="compiled loss")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_bf16_autocast_on_gpu_triton_close_to_torch() -> None:
    batch = packed_batch([100, 157, 255], rows=4)
    losses = {}
    for kernels in ("torch", "auto"):
        model = build(tiny(max_seq_len=512, dim=256, n_heads=4, n_kv_heads=2), kernels=kernels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[kernels] = model(**batch).loss.float()
        assert model.uses_triton(batch["input_ids"]) == (kernels == "auto")
    assert math.isfinite(losses["auto"].item())
    assert abs(losses["auto"].item() - losses["torch"].item()) < 2e-2 * abs(losses["torch"].item())


def test_from_saved_drops_unknown_fields_and_names_bad_configs(caplog):
    saved = dict(LlamaConfig.from_preset("tiny", vocab_size=300).__dict__, future_field=1)
    saved.update(kernels="torch", checkpointing=True, dropout=0.1)  # what checkpoints before ModelOptions held
    config = LlamaConfig.from_saved(saved, "ckpt/config.json", dim=128)
    assert config.vocab_size == 300 and config.dim == 128
    assert "future_field" in caplog.text and "kernels" not in caplog.text  # old run options: dropped quietly
    with pytest.raises(ValueError, match="ckpt/config.json holds no model config"):
        LlamaConfig.from_saved({}, "ckpt/config.json")
    with pytest.raises(ValueError, match="cannot build"):
        LlamaConfig.from_saved({**saved, "dim": 130}, "ckpt/config.json")
