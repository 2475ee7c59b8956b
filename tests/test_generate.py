"""llama.generation.generate: the KV cache equals recomputing, padded batches equal prompts alone, greedy/beam/sampling
rules, stopping, streaming, prompt truncation, the n-gram ban, and the same tokens as transformers' generate on the
same weights.

Models are tiny (2 layers, GQA 4/2 heads of 16 dims); the one kernels="triton" case runs the real Triton
kernels in the interpreter without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from kernel_checks import DEVICE, requires_triton

import zhkernels
from engine.chat_template import IM_END
from llama.generation.beam_search import beam_search
from llama.generation.generate import generate, generate_text
from llama.generation.kv_cache import KVCache
from llama.generation.sampling import penalize_repeats
from llama.model import Llama, LlamaConfig, LlamaOutput, ModelOptions
from zhkernels import reference

VOCAB = 61


def tiny(**overrides) -> LlamaConfig:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64)
    return LlamaConfig(**{**fields, **overrides})


def build(config: LlamaConfig | None = None, seed: int = 0, kernels: str = "torch") -> Llama:
    """Random weights large enough (norms not all 1) that greedy tokens vary and a wrong op shows."""
    torch.manual_seed(seed)
    model = Llama(config or tiny(), ModelOptions(kernels=kernels))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.dim() == 1 else 0.0))
    return model.to(DEVICE).eval()


def greedy_by_recomputing(model: Llama, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits from full forwards over the whole prefix (no cache)."""
    ids, steps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=DEVICE)).logits[0, -1]
            steps.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], steps


def sequence_log_prob(model: Llama, prompt: list[int], new: list[int]) -> float:
    """Sum of log p(new token | prefix), teacher-forced in one forward."""
    ids = torch.tensor([prompt + new], device=DEVICE)
    with torch.no_grad():
        log_probs = model(ids).logits[0].float().log_softmax(-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(new) - 1, device=DEVICE)
    return log_probs[rows, torch.tensor(new, device=DEVICE)].sum().item()


def scripted(model: Llama, logits_for: "callable") -> None:
    """Replace the model's forward: the logits after each row's last token are ``logits_for(last_ids) [B, V]``."""

    def forward(input_ids: torch.Tensor, **kwargs) -> LlamaOutput:
        return LlamaOutput(logits=logits_for(input_ids[:, -1])[:, None].float())

    model.forward = forward


def successor_logits(successor: dict[int, int]):
    """Logits that make ``successor[last]`` certain (0 otherwise): a model that recites fixed chains."""

    def logits_for(last: torch.Tensor) -> torch.Tensor:
        out = torch.full((last.shape[0], VOCAB), -10.0, device=last.device)
        for row, token in enumerate(last.tolist()):
            out[row, successor.get(token, 0)] = 10.0
        return out

    return logits_for


# 1. the cache ---------------------------------------------------------------------------------------------------


def test_cache_is_preallocated_per_kv_head_in_the_model_dtype() -> None:
    model = build().to(torch.bfloat16)
    cache = KVCache.for_model(model, batch_size=3, max_len=20)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 20, 16)  # [layers, B, n_kv_heads (not 4), max_len, head_dim]
    assert cache.k.dtype == torch.bfloat16 and cache.length == 0
    with pytest.raises(ValueError, match="max_len"):
        KVCache.for_model(model, batch_size=1, max_len=65)


@pytest.mark.parametrize("kernels_path", ["torch", pytest.param("triton", marks=requires_triton)])
def test_cached_decoding_equals_recomputing(kernels_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(tiny(), kernels=kernels_path)
    shapes: list[tuple[int, int]] = []
    if kernels_path == "triton":  # prove the flash kernel, not a fallback, attends over the cache
        flash = zhkernels.flash_attention
        monkeypatch.setattr(
            zhkernels,
            "flash_attention",
            lambda q, k, v, **kw: shapes.append((q.shape[2], k.shape[2])) or flash(q, k, v, **kw),
        )
        monkeypatch.setattr(reference, "flash_attention", None)
    prompts, n = [[5, 17, 3, 44, 9], [60, 2, 2, 31, 7]], 4
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 5 + n)
        cached = [model(torch.tensor(prompts, device=DEVICE), cache=cache).logits[:, -1]]
        tokens = [cached[-1].argmax(-1)]
        for _ in range(n - 1):
            cached.append(model(tokens[-1][:, None], cache=cache, logits_to_keep=1).logits[:, -1])
            tokens.append(cached[-1].argmax(-1))
    assert cache.length == 5 + n - 1
    result = generate(model, prompts, n)
    for row, prompt in enumerate(prompts):
        expected, logits = greedy_by_recomputing(model, prompt, n)
        assert result.sequences[row] == expected == [int(t[row]) for t in tokens]
        for step in range(n):
            assert (cached[step][row] - logits[step]).abs().max().item() < 1e-4
    if kernels_path == "triton":
        assert (5, 5) in shapes and (1, 8) in shapes, shapes  # prefill Tq == Tk, decode Tq = 1 < Tk
    short = prompts[0][2:]  # padded on the left: attention takes the masked SDPA path on either kernels setting
    padded = generate(model, [short, prompts[1]], n).sequences
    assert padded == [greedy_by_recomputing(model, short, n)[0], result.sequences[1]]


def test_left_padded_batch_equals_each_prompt_alone() -> None:
    model = build()
    prompts = [[3, 8, 1], [9, 22, 40, 41, 5, 13, 2, 60, 7], [11, 12, 13, 14, 15, 16]]
    batched = generate(model, prompts, 8)
    for row, prompt in enumerate(prompts):
        assert batched.sequences[row] == generate(model, [prompt], 8).sequences[0]
        assert batched.sequences[row] == greedy_by_recomputing(model, prompt, 8)[0]
    beams = generate(model, prompts, 6, num_beams=3)
    for row, prompt in enumerate(prompts):
        assert beams.sequences[row] == generate(model, [prompt], 6, num_beams=3).sequences[0]


# 2. greedy, beams, sampling -----------------------------------------------------------------------------------------


def test_beam_width_one_is_greedy() -> None:
    model = build()
    prompts = [[4, 5, 6], [30, 31]]
    greedy = generate(model, prompts, 10)
    assert beam_search(model, prompts, 10, num_beams=1).sequences == greedy.sequences
    stop = greedy.sequences[0][3]  # a stop token greedy meets in row 0: both must end there
    greedy = generate(model, prompts, 10, eos_ids=(stop,))
    assert greedy.sequences[0][-1] == stop and greedy.finished[0]
    assert beam_search(model, prompts, 10, num_beams=1, eos_ids=(stop,)).sequences == greedy.sequences


def test_beam_search_finds_a_likelier_sequence_than_greedy() -> None:
    model = build(seed=1)
    for prompt in ([7, 8, 9], [50, 3, 3, 1]):
        greedy = generate(model, [prompt], 8).sequences[0]
        beams = generate(model, [prompt], 8, num_beams=3)
        best = beams.sequences[0]
        assert len(best) == 8
        assert sequence_log_prob(model, prompt, best) >= sequence_log_prob(model, prompt, greedy) - 1e-5
        assert beams.scores[0] == pytest.approx(sequence_log_prob(model, prompt, best) / 8, abs=1e-4)


def test_top_k_one_sampling_is_greedy() -> None:
    model = build()
    prompts = [[4, 5, 6], [30, 31, 2, 9]]
    sampled = generate(model, prompts, 10, do_sample=True, top_k=1, temperature=0.7, seed=3)
    assert sampled.sequences == generate(model, prompts, 10).sequences


def test_sampling_is_seeded_and_draws_only_from_the_allowed_tokens() -> None:
    model = build()
    probs = torch.full((VOCAB,), 1e-3)
    probs[:4] = torch.tensor([0.5, 0.3, 0.12, 0.05])  # the other 57 tokens share the last ~0.03
    scripted(model, lambda last: probs.log().to(last.device).expand(last.shape[0], VOCAB))
    prompts = [[1]] * 8

    def drawn(**options) -> set[int]:
        first = generate(model, prompts, 20, do_sample=True, seed=11, **options).sequences
        assert generate(model, prompts, 20, do_sample=True, seed=11, **options).sequences == first, "seeded"
        return {t for seq in first for t in seq}

    assert drawn(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert drawn(top_p=0.85) == {0, 1, 2}
    assert drawn(top_k=3, temperature=2.0) == {0, 1, 2}
    assert drawn(top_k=2, top_p=0.4) == {0}
    assert len(drawn(temperature=5.0) - {0, 1, 2, 3}) > 0, "a hot temperature reaches the tail"
    one = generate(model, prompts, 20, do_sample=True, seed=1).sequences
    assert generate(model, prompts, 20, do_sample=True, seed=2).sequences != one


def test_repetition_penalty_matches_transformers_and_steers_greedy() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits, history = torch.randn(3, VOCAB), torch.randint(0, VOCAB, (3, 7))
    seen = torch.zeros(3, VOCAB, dtype=torch.bool).scatter_(1, history, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.equal(penalize_repeats(logits, seen, 1.3), theirs)

    model = build()
    table = torch.full((VOCAB,), -9.0)
    table[[0, 1, 2]] = torch.tensor([2.0, 1.5, -3.0])
    scripted(model, lambda last: table.to(last.device).expand(last.shape[0], VOCAB))
    assert generate(model, [[5, 0]], 3).sequences == [[0, 0, 0]]
    # 0 seen: 2.0 / 2 = 1.0 < 1.5 → 1; then both seen: 1.0 > 0.75 → 0
    assert generate(model, [[5, 0]], 3, repetition_penalty=2.0).sequences == [[1, 0, 0]]
    table[[0, 1]] = torch.tensor([-1.0, -1.5])  # negative logits are multiplied: -2.0 < -1.5 → 1
    assert generate(model, [[5, 0]], 1, repetition_penalty=2.0).sequences == [[1]]


# 3. stopping, streaming, long prompts ----------------------------------------------------------------------------


def test_eos_and_im_end_stop_their_row_while_others_continue() -> None:
    model = build()
    scripted(model, successor_logits({1: 2, 2: 3, 3: 59, 10: 11, 11: 12, 12: 10, 20: 21, 21: 60}))
    streamed: list[tuple[int, int]] = []
    result = generate(
        model, [[1], [10], [20]], 6, eos_ids=(59, 60), stream=lambda row, tok: streamed.append((row, tok))
    )
    assert result.sequences == [[2, 3, 59], [11, 12, 10, 11, 12, 10], [21, 60]]
    assert result.finished == [True, False, True]
    for row, seq in enumerate(result.sequences):
        assert [tok for r, tok in streamed if r == row] == seq
    assert len(streamed) == sum(map(len, result.sequences))

    class Tokenizer:  # the few members generate_text reads
        eos_id, pad_id = 59, None

        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

        def token_to_id(self, token: str) -> int | None:
            return 60 if token == IM_END else None

    texts = generate_text(model, Tokenizer(), ["1", "10", "20"], max_new_tokens=6).texts
    assert texts == ["2 3", "11 12 10 11 12 10", "21"]


def test_the_stream_gets_exactly_the_generated_tokens_in_order() -> None:
    model = build()
    prompts = [[3, 8, 1], [9, 22, 40, 41, 5]]
    for options in ({}, {"do_sample": True, "seed": 5}, {"num_beams": 2}):
        calls: list[tuple[int, int]] = []
        result = generate(model, prompts, 7, stream=lambda row, tok: calls.append((row, tok)), **options)
        assert len(calls) == 14
        for row, seq in enumerate(result.sequences):
            assert [tok for r, tok in calls if r == row] == seq
    assert calls[:7] == [(0, t) for t in result.sequences[0]], "beam search streams each prompt's tokens at the end"


def test_a_prompt_too_long_for_the_context_keeps_its_last_tokens(caplog: pytest.LogCaptureFixture) -> None:
    model = build()
    prompt = [(7 * i) % VOCAB for i in range(70)]
    with caplog.at_level(logging.WARNING, logger="llama.generation.sampling"):
        result = generate(model, [prompt, [1, 2]], 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 16 tokens" in warnings[0]
    assert result.sequences[0] == generate(model, [prompt[-54:]], 10).sequences[0]
    with pytest.raises(ValueError, match="no room"):
        generate(model, [[1]], 64)


def test_throughputs_are_reported_and_bad_options_are_one_line_errors() -> None:
    model = build()
    for options in ({}, {"num_beams": 2}):
        result = generate(model, [[1, 2, 3]], 5, **options)
        assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert generate(model, [[1, 2, 3]], 1).decode_tokens_per_s == 0.0  # no decode step ran
    for options, message in [
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"num_beams": 2, "do_sample": True}, "deterministic"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            generate(model, [[1]], 2, **options)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], 2)


# 4. the same tokens as transformers --------------------------------------------------------------------------------


def hf_generate(model: Llama, prompts: list[list[int]], n: int, **options) -> list[list[int]]:
    """transformers' generate on our weights (left-padded with 0), new tokens up to its padding after a stop."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(**model.config.to_hf_config())
    hf_config._attn_implementation = "eager"
    theirs = transformers.LlamaForCausalLM(hf_config).to(DEVICE).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    eos = options.get("eos_token_id")
    with torch.no_grad():
        out = theirs.generate(ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, **options)
    new = []
    for row in out[:, longest:].tolist():
        stops = [i for i, t in enumerate(row) if t == eos]
        new.append(row[: stops[0] + 1] if stops else row)
    return new


def test_greedy_and_beam_search_tokens_equal_transformers() -> None:
    model = build(seed=2)
    prompts = [[4, 5, 6, 7], [30, 31, 2, 9, 14, 1]]
    greedy = generate(model, prompts, 12)  # left-padded, as transformers is given them
    assert greedy.sequences == hf_generate(model, prompts, 12, do_sample=False, num_beams=1)
    penalized = generate(model, prompts, 12, repetition_penalty=1.5)
    assert penalized.sequences != greedy.sequences
    assert penalized.sequences == hf_generate(model, prompts, 12, do_sample=False, repetition_penalty=1.5)
    beam = dict(do_sample=False, num_beams=3, early_stopping=True)
    for prompt in prompts:
        stop = greedy_by_recomputing(model, prompt, 12)[0][5]  # a stop token that ends some beams early
        ours = generate(model, [prompt], 12, num_beams=3, eos_ids=(stop,))
        assert ours.sequences == hf_generate(model, [prompt], 12, length_penalty=1.0, eos_token_id=stop, **beam)
    stop = greedy.sequences[1][5]
    ours = generate(model, prompts, 12, num_beams=3, length_penalty=0.5, eos_ids=(stop,))
    assert ours.finished == [False, True]
    assert ours.sequences == hf_generate(model, prompts, 12, length_penalty=0.5, eos_token_id=stop, **beam)


def test_vocab_limit_keeps_ids_a_smaller_tokenizer_can_decode():
    """A model padded past its tokenizer's vocabulary never emits the padded ids when told the limit."""
    model = build(seed=7)
    with torch.no_grad():  # make the padded ids the most likely ones
        model.lm_head.weight[VOCAB - 8 :] *= 50
    free = generate(model, [[3, 4, 5]], 6).sequences[0]
    assert max(free) >= VOCAB - 8, "the test needs a model that prefers the padded ids"
    for options in ({}, {"num_beams": 2}, {"do_sample": True, "top_k": 5}):
        limited = generate(model, [[3, 4, 5]], 6, vocab_limit=VOCAB - 8, **options).sequences[0]
        assert limited and max(limited) < VOCAB - 8, options


def test_cache_follows_autocast_dtype():
    """Under autocast the keys are bf16 while the weights are fp32: the cache must hold what the keys are."""
    model = build()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert KVCache.for_model(model, 1, 16).k.dtype == torch.bfloat16
        out = generate(model, [[3, 4, 5]], 4).sequences[0]
    assert len(out) == 4
    assert KVCache.for_model(model, 1, 16).k.dtype == torch.float32


# 5. the n-gram ban ------------------------------------------------------------------------------------------------


def repeated_ngrams(prompt: list[int], new: list[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams that end on a new token and occurred earlier in ``prompt + new``."""
    text = prompt + new
    grams = [tuple(text[i : i + n]) for i in range(len(text) - n + 1)]
    first_new = max(0, len(prompt) - n + 1)  # the first n-gram that ends on a new token
    return [g for i, g in enumerate(grams) if i >= first_new and g in grams[:i]]


def test_no_repeat_ngram_tokens_equal_transformers() -> None:
    """Greedy, sampling-free beams and the ban on a batch (no padding: transformers' ban would read its pads)."""
    model = build(seed=2)
    prompts = [[4, 5, 6, 7, 4, 5], [30, 31, 2, 9, 14, 1]]
    stop = VOCAB - 1  # transformers' config would otherwise stop at its default EOS, 2
    free = generate(model, prompts, 24, eos_ids=(stop,)).sequences
    for n in (1, 2, 3):
        ours = generate(model, prompts, 24, no_repeat_ngram_size=n, eos_ids=(stop,))
        theirs = hf_generate(model, prompts, 24, do_sample=False, no_repeat_ngram_size=n, eos_token_id=stop)
        assert ours.sequences == theirs, n
        assert ours.sequences != free, f"n={n} must change this model's greedy tokens for the test to mean anything"
        for prompt, seq in zip(prompts, ours.sequences):
            assert not repeated_ngrams(prompt, seq, n), "no new token completes an n-gram seen before"
    beam = dict(do_sample=False, num_beams=3, early_stopping=True, length_penalty=1.0)
    changed = 0
    for prompt in prompts:
        ours = generate(model, [prompt], 16, num_beams=3, no_repeat_ngram_size=2, eos_ids=(stop,))
        assert ours.sequences == hf_generate(model, [prompt], 16, no_repeat_ngram_size=2, eos_token_id=stop, **beam)
        changed += ours.sequences != generate(model, [prompt], 16, num_beams=3, eos_ids=(stop,)).sequences
    assert changed, "the ban must change some beam search's tokens for the test to mean anything"


def test_no_repeat_ngram_leaves_padding_out_and_keeps_rows_apart() -> None:
    model = build(seed=2)
    prompts = [[4, 5, 6], [30, 31, 2, 9, 14, 1, 8, 8]]
    batched = generate(model, prompts, 20, no_repeat_ngram_size=2)
    alone = [generate(model, [p], 20, no_repeat_ngram_size=2).sequences[0] for p in prompts]
    assert batched.sequences == alone
    sampled = generate(model, prompts, 20, do_sample=True, seed=4, no_repeat_ngram_size=2, temperature=2.0)
    for prompt, seq in zip(prompts, sampled.sequences):
        assert not repeated_ngrams(prompt, seq, 2)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be ≥ 0"):
        generate(model, prompts, 2, no_repeat_ngram_size=-1)
