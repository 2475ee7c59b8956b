"""LoRA (llama.lora) and its PEFT files (llama.formats.peft): the transform starts exactly at the base model,
adapts GQA's narrower k/v, merges once and back, and its adapter folder is the one ``peft`` itself loads onto our
exported base (same logits), both ways."""

from __future__ import annotations

import json

import pytest
import torch

from llama.formats.hf import export_hf
from llama.formats.hf_io import ExportError
from llama.formats.peft import ADAPTER_CONFIG, load_peft_adapter, save_peft_adapter
from llama.generation.load import load_for_inference
from llama.lora import (
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    lora_layers,
    lora_parameter_count,
    merge_lora,
    parse_lora,
    strip_lora,
    unmerge_lora,
)
from tests.test_chat import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, small_tokenizer):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "base", small_tokenizer)


def load_base(base_ckpt):
    model, tokenizer, _ = load_for_inference(base_ckpt, kernels="torch", device="cpu", dtype="fp32")
    return model, tokenizer


def randomise_adapters(model, seed: int = 1) -> None:
    """Non-zero B, as after training (B starts at zero, which would make every comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


def ids_of(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("今天天气很好，我们去公园散步。")])


def test_parse_lora_reads_the_flag_and_refuses_what_it_cannot():
    config = parse_lora("r=8,alpha=16,dropout=0,targets=q+v,rslora=true")
    assert (config.r, config.alpha, config.dropout, config.targets, config.rslora) == (8, 16.0, 0.0, ("q", "v"), True)
    assert config.scaling == pytest.approx(16 / 8**0.5)
    assert parse_lora("").targets == ("q", "k", "v", "o", "gate", "up", "down") and parse_lora("").scaling == 2.0
    for bad, needle in [("r=0", "r must be"), ("targets=q+x", "unknown x"), ("rank=4", "not understood")]:
        with pytest.raises(ValueError, match=needle):
            parse_lora(bad)


def test_step_zero_equals_the_base_and_only_adapters_train(base_ckpt):
    model, tokenizer = load_base(base_ckpt)
    ids = ids_of(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    model.train()  # dropout on: B = 0 still makes the adapters add exactly nothing
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    names = [name for name, _ in lora_layers(model)]
    assert len(names) == 2 * 7  # two layers x q k v o gate up down: GQA's narrower k/v included
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert isinstance(k, LoraLinear) and k.lora_B.weight.shape[0] < model.config.dim  # n_kv_heads < n_heads
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    count, total = lora_parameter_count(model)
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in trainable) and count < total


def test_base_weights_can_stay_in_half_precision_beside_fp32_adapters(base_ckpt):
    model, _ = load_base(base_ckpt)
    apply_lora(model, LoraConfig(r=2), base_dtype=torch.bfloat16)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32


def test_merge_once_unmerge_and_strip_give_the_adapted_logits(base_ckpt):
    model, tokenizer = load_base(base_ckpt)
    ids = ids_of(tokenizer)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        with adapters_disabled(model):
            base = model(ids).logits
        assert not torch.allclose(adapted, base)
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="already merged"):
            merge_lora(model)
        unmerge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)
        strip_lora(model)
        assert not list(lora_layers(model))
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no such linear layers"):
        apply_lora(torch.nn.Sequential(torch.nn.ReLU()), LoraConfig())


def test_peft_loads_our_adapter_onto_our_exported_base_with_the_same_logits(base_ckpt, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (the dev extra) proves the adapter files")
    transformers = pytest.importorskip("transformers")
    hf_dir = export_hf(base_ckpt, tmp_path / "hf", dtype="fp32")
    model, tokenizer = load_base(base_ckpt)
    config = LoraConfig(r=4, alpha=16, dropout=0.0, targets=("q", "k", "v", "down"), rslora=True)
    apply_lora(model, config)
    randomise_adapters(model)
    adapter_dir = save_peft_adapter(model, config, tmp_path / "adapter", base_model=str(hf_dir))
    saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert saved["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"] and saved["use_rslora"] is True
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    ids = ids_of(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_an_adapter_trained_with_peft_loads_into_our_model(base_ckpt, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (the dev extra) proves the adapter files")
    transformers = pytest.importorskip("transformers")
    hf_dir = export_hf(base_ckpt, tmp_path / "hf", dtype="fp32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    spec = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    theirs = peft.get_peft_model(hf_model, spec)
    torch.manual_seed(3)
    with torch.no_grad():  # as if trained: B away from zero
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    model, tokenizer = load_base(base_ckpt)
    config = load_peft_adapter(model, tmp_path / "peft_adapter")
    assert config.targets == ("q", "v", "up") and config.r == 8 and config.scaling == 2.0
    assert len(adapter_state_dict(model)) == 2 * 3 * 2
    ids = ids_of(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"use_dora": True}, "use_dora"),
        ({"target_modules": "q_proj|v_proj"}, "target_modules"),
        ({"target_modules": ["embed_tokens"]}, "target_modules"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_adapters_we_cannot_read_exactly_are_refused_in_one_line(base_ckpt, tmp_path, change, needle):
    model, _ = load_base(base_ckpt)
    config = LoraConfig(r=2, dropout=0.0)
    adapter = save_peft_adapter(apply_lora(model, config), config, tmp_path / "a", base_model="x")
    saved = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**saved, **change}))
    fresh, _ = load_base(base_ckpt)
    with pytest.raises(ExportError, match=needle):
        load_peft_adapter(fresh, adapter)
