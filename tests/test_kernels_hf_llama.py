"""patch_hf_llama on a tiny randomly initialised transformers Llama: same loss, logits, gradients and decoding.

These tests depend on the installed ``transformers`` release (see tests/README.md to run them against
another one). Every decoding test compares the logits of every step with the unpatched model's and
records which attention calls ran our flash kernel, so a cache that stops growing or a kernel that
silently stops running fails here, not only when the sampled tokens happen to differ.
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from kernel_checks import DEVICE, assert_fp32_close, poisoned, requires_triton

import zhkernels
import zhkernels.hf_llama as hf_llama

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra: pip install -e '.[dev]'")

pytestmark = [requires_triton, poisoned]

VOCAB = 301
LAYERS = 2
TOL = 1e-5  # fp32, relative to the largest logit


def tiny_config() -> "transformers.LlamaConfig":
    """GQA 4/2, head_dim 32, odd FFN and vocabulary."""
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=200,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_llama(config: "transformers.LlamaConfig") -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm that ignored them would show
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_pair():
    """An unpatched tiny Llama and a patched deep copy."""
    plain = random_llama(tiny_config())
    return plain, zhkernels.patch_hf_llama(copy.deepcopy(plain))


@pytest.fixture
def flash_calls(monkeypatch):
    """(queries, keys, with document ids) of every call that reached our flash kernel through the patch."""
    calls: list[tuple[int, int, bool]] = []
    real = hf_llama.flash_attention

    def counting(q, k, v, **kw):
        calls.append((q.shape[-2], k.shape[-2], kw.get("doc_ids") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf_llama, "flash_attention", counting)
    return calls


def batch(seed: int, b: int = 2, t: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    return ids.to(DEVICE), labels.to(DEVICE)


def test_every_llama_module_is_patched(hf_pair):
    plain, patched = hf_pair
    assert patched._zhllm_patched == {"rms_norm": 5, "mlp": 2, "attention": 2, "cross_entropy": 1}
    assert patched.config._attn_implementation == "zhllm"
    assert plain.config._attn_implementation != "zhllm"


def test_same_logits(hf_pair, flash_calls):
    plain, patched = hf_pair
    ids, _ = batch(1)
    with torch.no_grad():
        assert_fp32_close(patched(ids).logits, plain(ids).logits, what="logits")
    assert flash_calls == [(37, 37, False)] * LAYERS


def test_same_loss_and_gradients(hf_pair, flash_calls):
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
    assert len(flash_calls) == LAYERS


def test_labels_by_position_and_trainer_style_num_items_in_batch(hf_pair):
    """Every argument name and position of LlamaForCausalLM.forward reaches the fused loss."""
    plain, patched = hf_pair
    ids, labels = batch(3)
    names = list(inspect.signature(plain.forward).parameters)
    positional = [None] * (names.index("labels") + 1)
    positional[names.index("input_ids")], positional[names.index("labels")] = ids, labels
    with torch.no_grad():
        expected = plain(ids, labels=labels).loss
        by_position = patched(*positional)
        assert by_position.logits is None, "labels given by position must take the fused loss path"
        assert_fp32_close(by_position.loss, expected, what="loss with positional labels")
        expected = plain(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
        got = patched(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    assert_fp32_close(got, expected, what="loss / num_items_in_batch")


def test_padding_mask_falls_back_to_sdpa(hf_pair, flash_calls):
    plain, patched = hf_pair
    ids, _ = batch(4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        assert_fp32_close(patched(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
        assert flash_calls == [], "a padding mask must not reach the causal-only kernel"
        ones = torch.ones_like(ids)  # an all-ones mask is plain causal: transformers passes none, our kernel runs
        assert_fp32_close(patched(ids, attention_mask=ones).logits, plain(ids, attention_mask=ones).logits)
    assert flash_calls == [(37, 37, False)] * LAYERS


def generate_both(plain, patched, ids: torch.Tensor, **kw):
    kw = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    with torch.no_grad():
        return plain.generate(ids, **kw), patched.generate(ids, **kw)


def assert_same_decoding(ref, ours, steps: int) -> None:
    assert len(ours.logits) == len(ref.logits) == steps
    for i, (a, b) in enumerate(zip(ours.logits, ref.logits)):
        assert_fp32_close(a, b, tol=TOL, what=f"logits of decode step {i}")
    assert torch.equal(ours.sequences, ref.sequences)


STEPS = 6


@pytest.mark.parametrize("batch_size", [1, 2])
def test_greedy_decoding_grows_the_cache_and_matches_every_step(hf_pair, flash_calls, batch_size):
    """Prefill runs the kernel on the prompt; each step then one query against a cache one position longer."""
    plain, patched = hf_pair
    ids, _ = batch(5, b=batch_size, t=9)
    ref, ours = generate_both(plain, patched, ids, max_new_tokens=STEPS)
    assert_same_decoding(ref, ours, STEPS)
    expected = [(9, 9, False)] * LAYERS + [(1, 9 + s, False) for s in range(1, STEPS) for _ in range(LAYERS)]
    assert flash_calls == expected, "the KV cache must grow by one position per decode step"
    assert ours.past_key_values.get_seq_length() == 9 + STEPS - 1


def test_beam_search_matches_every_step(hf_pair, flash_calls):
    plain, patched = hf_pair
    ids, _ = batch(6, b=1, t=7)
    ref, ours = generate_both(plain, patched, ids, max_new_tokens=STEPS, num_beams=3, early_stopping=False)
    assert_same_decoding(ref, ours, STEPS)
    assert [k for _, k, _ in flash_calls[LAYERS:]] == [7 + s for s in range(1, STEPS) for _ in range(LAYERS)]


def test_static_cache_matches_every_step(hf_pair):
    plain, patched = hf_pair
    ids, _ = batch(7, b=1, t=8)
    ref, ours = generate_both(plain, patched, ids, max_new_tokens=STEPS, cache_implementation="static")
    assert_same_decoding(ref, ours, STEPS)
    assert ours.past_key_values.get_seq_length() == 8 + STEPS - 1


def test_left_padding_matches_every_step(hf_pair):
    plain, patched = hf_pair
    ids, _ = batch(8, b=2, t=10)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # the shorter prompt is padded on the left
    kw = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, max_new_tokens=STEPS)
    with torch.no_grad():
        ref = plain.generate(ids, attention_mask=mask, **kw)
        ours = patched.generate(ids, attention_mask=mask, **kw)
    assert_same_decoding(ref, ours, STEPS)


def test_decoding_without_cache_matches_every_step(hf_pair, flash_calls):
    plain, patched = hf_pair
    ids, _ = batch(9, b=1, t=9)
    ref, ours = generate_both(plain, patched, ids, max_new_tokens=STEPS, use_cache=False)
    assert_same_decoding(ref, ours, STEPS)
    assert flash_calls == [(9 + s, 9 + s, False) for s in range(STEPS) for _ in range(LAYERS)]


def test_a_model_sharing_the_config_keeps_its_attention(flash_calls):
    """Two models built from one config object: patching one leaves the other's attention (and logits) alone."""
    config = tiny_config()
    plain, twin = random_llama(config), random_llama(config)
    assert twin.config is plain.config
    zhkernels.patch_hf_llama(twin)
    assert plain.config._attn_implementation != "zhllm" and twin.config._attn_implementation == "zhllm"
    ids, _ = batch(10, b=1, t=12)
    with torch.no_grad():
        expected = plain(ids).logits
        assert flash_calls == [], "the unpatched model ran our kernel"
        assert_fp32_close(twin(ids).logits, expected, what="logits of the patched twin")
    assert len(flash_calls) == LAYERS


def test_packed_rows_are_masked_per_document(hf_pair, flash_calls):
    """Positions restarting mark packed documents (transformers' own rule, applied when there is no mask and no
    cache): a packed row equals its documents run one by one, and our kernel runs it with document ids
    rather than falling back to SDPA."""
    plain, patched = hf_pair
    ids, _ = batch(11, b=1, t=30)
    lengths = (13, 1, 16)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    with torch.no_grad():
        packed = patched(ids, position_ids=position_ids, use_cache=False).logits
        assert_fp32_close(plain(ids, position_ids=position_ids, use_cache=False).logits, packed, what="vs SDPA")
        alone = torch.cat([plain(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    assert_fp32_close(packed, alone, what="packed logits")
    assert flash_calls[:LAYERS] == [(30, 30, True)] * LAYERS


def test_not_a_llama_is_refused():
    with pytest.raises(ValueError, match="no Llama modules"):
        zhkernels.patch_hf_llama(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_patching_logs_what_it_swapped(hf_pair, caplog):
    plain, _ = hf_pair
    with caplog.at_level(logging.INFO, logger="zhkernels.hf_llama"):
        zhkernels.patch_hf_llama(copy.deepcopy(plain))
        zhkernels.patch_hf_llama(copy.deepcopy(plain), doc_mask_from_position_ids=True)
    assert "attention ×2" in caplog.text
    assert "doc_mask_from_position_ids is no longer needed" in caplog.text
