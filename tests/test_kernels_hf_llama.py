"""patch_hf_llama on a tiny randomly initialised transformers Llama: same loss, logits, gradients and greedy output."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import zhkernels
from kernel_checks import DEVICE, assert_fp32_close, poisoned, requires_triton

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra: pip install -e '.[dev]'")

pytestmark = [requires_triton, poisoned]

VOCAB = 301


@pytest.fixture(scope="module")
def hf_pair():
    """An unpatched tiny Llama (GQA 4/2, head_dim 32, odd FFN and vocab) and a patched deep copy."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    plain = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm that ignored them would show
        for m in plain.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    patched = zhkernels.patch_hf_llama(copy.deepcopy(plain))
    return plain, patched


def batch(seed: int, b: int = 2, t: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    return ids.to(DEVICE), labels.to(DEVICE)


def test_every_llama_module_is_patched(hf_pair):
    _, patched = hf_pair
    assert patched._zhllm_patched == {"rms_norm": 5, "mlp": 2, "attention": 2, "cross_entropy": 1}


def test_same_logits(hf_pair):
    plain, patched = hf_pair
    ids, _ = batch(1)
    with torch.no_grad():
        assert_fp32_close(patched(ids).logits, plain(ids).logits, what="logits")


def test_same_loss_and_gradients(hf_pair):
    plain, patched = hf_pair
    ids, labels = batch(2)
    for m in (plain, patched):
        m.zero_grad(set_to_none=True)
    loss_plain = plain(ids, labels=labels).loss
    out = patched(ids, labels=labels)
    assert out.logits is None, "with labels the patched model must not build the logits"
    assert_fp32_close(out.loss, loss_plain, what="loss")
    loss_plain.backward()
    out.loss.backward()
    named = dict(patched.named_parameters())
    for name, p in plain.named_parameters():
        assert named[name].grad is not None, f"no gradient reached {name}"
        assert_fp32_close(named[name].grad, p.grad, tol=2e-5, what=f"grad {name}")


def test_trainer_style_num_items_in_batch(hf_pair):
    plain, patched = hf_pair
    ids, labels = batch(3)
    with torch.no_grad():
        expected = plain(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
        got = patched(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    assert_fp32_close(got, expected, what="loss / num_items_in_batch")


def test_padding_mask_falls_back_to_the_models_attention(hf_pair):
    plain, patched = hf_pair
    ids, _ = batch(4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        assert_fp32_close(patched(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


def test_greedy_generation_with_kv_cache_matches(hf_pair):
    """Decoding runs the flash kernel with fewer queries than keys (causal aligned to the end)."""
    plain, patched = hf_pair
    ids, _ = batch(5, b=1, t=9)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(patched.generate(ids, **kw), plain.generate(ids, **kw))


def test_packed_rows_with_document_masking(hf_pair):
    """With doc_mask_from_position_ids, a packed row equals its documents run one by one."""
    plain, _ = hf_pair
    packed_model = zhkernels.patch_hf_llama(copy.deepcopy(plain), doc_mask_from_position_ids=True)
    ids, _ = batch(6, b=1, t=30)
    lengths = (13, 1, 16)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    with torch.no_grad():
        packed = packed_model(ids, position_ids=position_ids).logits
        alone = torch.cat([plain(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    assert_fp32_close(packed, alone, what="packed logits")


def test_not_a_llama_is_refused():
    with pytest.raises(ValueError, match="no Llama modules"):
        zhkernels.patch_hf_llama(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_patching_logs_what_it_swapped(hf_pair, caplog):
    plain, _ = hf_pair
    with caplog.at_level(logging.INFO, logger="zhkernels.hf_llama"):
        zhkernels.patch_hf_llama(copy.deepcopy(plain))
    assert "attention ×2" in caplog.text
