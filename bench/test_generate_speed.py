"""Generation speed: our ``llama.generation.generate.generate`` (Triton kernels / torch ops) vs ``transformers``'
``generate``.

    pytest bench/test_generate_speed.py --benchmark-only                     # GPU: every preset × precision × batch ×
    impl
    pytest bench/test_generate_speed.py --benchmark-only -k "seed003 and bf16"
    pytest bench/test_generate_speed.py --benchmark-only -q                  # CPU: the small torch-path case only
    ZHLLM_BENCH_CPU_SMOKE=1 pytest bench/test_generate_speed.py --benchmark-disable   # CPU: each GPU body once, tiny
    shapes

What is compared. The same weights (our ``Llama`` built from a fixed seed with its own init; Hugging Face's
``LlamaForCausalLM(LlamaConfig(**config.to_hf_config()), attn_implementation="sdpa")`` loads our
``state_dict``, which is what ``llama.export`` writes; both then cast to the precision, the RoPE tables staying
float32 on both sides as after a real export and ``from_pretrained``), the same device, the same random prompt
ids (``batch`` rows of ``PROMPT_LEN`` tokens, no padding), greedy, exactly ``NEW_TOKENS`` new tokens:

- *ours*: ``generate(model, prompts, n)`` with no ``eos_ids`` (``kernels="triton"`` and ``kernels="torch"``);
- *HF*: ``model.generate(ids, attention_mask=ones, generation_config=GenerationConfig(do_sample=False,
  max_new_tokens=n, min_new_tokens=n, pad_token_id=0))`` with the model's own ``generation_config.eos_token_id``
  set to None (otherwise transformers merges LlamaConfig's default EOS id 2 back in and masks it every step),
  with its default ``DynamicCache`` (*hf*) and with ``cache_implementation="static"`` (*hf-static*; on CUDA
  transformers then compiles the decoding forward with ``torch.compile`` by default, and the warm-up run pays for it).

Neither side has a stop token to check or mask, and every row must come back with exactly ``n`` tokens (asserted).

How prefill and decode are separated: both sides are timed the same way, through their public ``generate``.
*Prefill* = the call with ``max_new_tokens=1`` (setup, one forward over the prompts that fills the cache,
the first token chosen); *full* = the call with ``NEW_TOKENS``; *decode* = full − prefill (medians), i.e. the
``NEW_TOKENS - 1`` one-token steps. Prefill tokens/s = batch × prompt ÷ prefill time; decode tokens/s = batch ×
(NEW_TOKENS − 1) ÷ decode time. Each call is timed with CUDA events after a synchronisation (both generates
synchronise with the host every step anyway). Two more figures, not used for the ratios: *forward-only
prefill*, one bare model forward over the prompts with a fresh cache and the last position's logits (ours:
``model(ids, cache=KVCache.for_model(...), logits_to_keep=1)``; HF: ``model(ids, attention_mask,
use_cache=True, logits_to_keep=1)``, a DynamicCache), which leaves out each ``generate``'s own setup; and
ours' self-reported ``GenerationResult.prefill_tokens_per_s`` / ``decode_tokens_per_s`` (its internal clock).

Greedy tokens: each case notes its tokens; the rows of one (preset, precision, batch) record how many leading
tokens they share with each other impl (the minimum over rows). In fp32 (the CPU case, and the smoke run's
fp32 group) they must be equal to the end: a case whose counterpart did not run computes it, untimed. In bf16
and fp16 they may part where two logits are within rounding of each other, which is recorded, not asserted.
A fresh random model's greedy continuation soon loops over a few tokens (``distinct_tokens`` is recorded):
the match says "same weights, same algorithm", not more.

On a GPU, per preset in bf16 (seed003-92m also in fp16), batch 1 and 8, prompt 256, 128 new tokens:
32 cases, each a warm-up, then ``rounds(3)`` rounds of ``PREFILL_REPEATS`` prefill calls, as many
forward-only prefills and one full call, inside ``benchmark.pedantic``. Figures go to
``bench/.results/generate.json`` (``conftest.py``) and ``python bench/report.py`` renders them
(``generate_report.py``). Not yet timed on a GPU: a few minutes on an H100 is the estimate, most of it
transformers compiling the eight static-cache cases (``-k "not static"`` leaves them out). Run every case
you want in one session: a later session's ``generate.json`` replaces the earlier one.

Without CUDA the GPU cases skip and one small CPU benchmark runs (ours with ``kernels="torch"`` vs HF, the
``tiny`` preset in fp32, batch 1, prompt 64, 32 new tokens), recorded as a CPU figure that says nothing
about GPU speed. ``ZHLLM_BENCH_CPU_SMOKE=1`` runs each GPU body once on CPU at tiny shapes (our Triton
path through the interpreter), plus an fp32 group whose tokens must equal HF's, and records nothing.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest
import torch

SMOKE = os.environ.get("ZHLLM_BENCH_CPU_SMOKE", "0") not in ("", "0")
if SMOKE:  # before ``kernels`` is imported (through llama.model): triton.jit reads it when the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
ON_GPU = torch.cuda.is_available() and not SMOKE
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NO_GPU = (
    "needs a CUDA GPU: generation tokens/s are GPU figures (the small CPU case below runs instead; "
    "ZHLLM_BENCH_CPU_SMOKE=1 runs each GPU body once on tiny CPU shapes)"
)
HAS_GPU_REASON = "a GPU is present: the GPU cases are the measurement (this CPU case is for machines without one)"

from benchlib import Recorder, require_transformers, rounds, versions  # noqa: E402

logger = logging.getLogger(__name__)

gpu_only = pytest.mark.skipif(not ON_GPU and not SMOKE, reason=NO_GPU)

IMPLS = (
    "triton",
    "torch",
    "hf",
    "hf-static",
)  # ours on zhkernels/, ours on torch ops, transformers (dynamic / static cache)
OURS = ("triton", "torch")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPT_LEN, NEW_TOKENS, BATCHES = 256, 128, (1, 8)
PRESET_RUNS = [("seed003-92m", "bf16"), ("seed003-92m", "fp16"), ("minimind-26m", "bf16"), ("seed000-160m", "bf16")]
if SMOKE:  # one fp32 group too: there the greedy tokens of every impl must be equal
    PRESET_RUNS.append(("minimind-26m", "fp32"))
CASES = [(preset, precision, batch, impl) for preset, precision in PRESET_RUNS for batch in BATCHES for impl in IMPLS]
CPU_RUN = ("tiny", "fp32", 1, 64, 32, 8_000)  # preset, precision, batch, prompt, new tokens, vocab
CPU_IMPLS = ("torch", "hf")
PREFILL_REPEATS = 5  # prefill calls (and forward-only prefills) per round: they are short
SEED = 0
PAD_ID = 0
# CPU smoke shapes: the preset's heads and tying kept, everything else shrunk so Triton's interpreter is quick
SMOKE_HEAD_DIM, SMOKE_LAYERS, SMOKE_FFN, SMOKE_VOCAB, SMOKE_PROMPT, SMOKE_NEW, SMOKE_BATCH = 16, 1, 64, 256, 16, 6, 2


def case_id(case: tuple) -> str:
    preset, precision, batch, impl = case
    return f"{preset}-{precision}-b{batch}-{impl}"


@dataclass(frozen=True)
class GenSpec:
    """One benchmarked generation: model preset and implementation, precision, batch, prompt and new-token counts."""

    preset: str
    impl: str
    precision: str
    batch: int
    prompt_len: int = PROMPT_LEN
    new_tokens: int = NEW_TOKENS
    vocab: int | None = None  # None: the preset's own
    smoke: bool = False  # shrink the model to SMOKE_* (CPU smoke runs)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch < 1 or self.prompt_len < 1 or self.new_tokens < 2:
            raise ValueError(
                f"batch and prompt_len must be ≥ 1 and new_tokens ≥ 2, got {self.batch}, "
                f"{self.prompt_len}, {self.new_tokens}"
            )

    @property
    def group(self) -> tuple:
        """The rows whose tokens and speeds are compared: same model, precision, batch and lengths."""
        return (self.preset, self.precision, self.batch, self.prompt_len, self.new_tokens, self.smoke)


# ---------------------------------------------------------------- environment


# ---------------------------------------------------------------- the models


def model_config(spec: GenSpec) -> Any:
    """Our ``LlamaConfig`` for ``spec``, long enough for prompt + new tokens (HF's is its ``to_hf_config()``)."""
    from llama.model import PRESETS, LlamaConfig

    base = PRESETS[spec.preset]
    fields: dict[str, Any] = {"max_seq_len": max(base["max_seq_len"], spec.prompt_len + spec.new_tokens)}
    if spec.vocab is not None:
        fields["vocab_size"] = spec.vocab
    if spec.smoke:
        fields.update(
            dim=base["n_heads"] * SMOKE_HEAD_DIM,
            n_layers=SMOKE_LAYERS,
            ffn_dim=SMOKE_FFN,
            vocab_size=SMOKE_VOCAB,
            max_seq_len=spec.prompt_len + spec.new_tokens,
        )
    return LlamaConfig.from_preset(spec.preset, **fields)


def hf_model(ours: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``transformers.LlamaForCausalLM`` + SDPA holding ``ours``' weights in ``dtype``, RoPE frequencies kept float32,
    with no EOS id anywhere in its generation config."""
    import transformers

    hf_config = transformers.LlamaConfig(**ours.config.to_hf_config(), attn_implementation="sdpa")
    device = next(ours.parameters()).device
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(ours.state_dict(), strict=True)
    float32_buffers = {name: b.clone() for name, b in model.named_buffers() if b.is_floating_point()}  # inv_freq
    model.to(dtype)
    for name, buffer in float32_buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, not sdpa")
    model.generation_config.eos_token_id = None  # else generate merges LlamaConfig's default (2) back in
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def _timer(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of one call: CUDA events after a synchronisation on the GPU, the wall clock on CPU."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), result
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1e3, result


class Runner:
    """One model (ours or HF) on fixed random prompts; :meth:`generate` is one greedy call of its public API."""

    def __init__(self, spec: GenSpec, device: torch.device) -> None:
        from llama.model import Llama, ModelOptions

        self.spec, self.device = spec, device
        self.config = model_config(spec)
        dtype = PRECISIONS[spec.precision]
        torch.manual_seed(SEED)
        with torch.device(device):
            ours = Llama(self.config, ModelOptions(kernels=spec.impl if spec.impl in OURS else "torch")).eval()
        self.params = ours.num_params()
        self.model = hf_model(ours, dtype) if spec.impl.startswith("hf") else ours.to(dtype)
        generator = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(0, self.config.vocab_size, (spec.batch, spec.prompt_len), generator=generator)
        self.prompts = ids.tolist()
        self.ids = ids.to(device)
        self.mask = torch.ones_like(self.ids)

    def uses_triton(self) -> bool:
        return not self.spec.impl.startswith("hf") and self.model.uses_triton(self.ids)

    def generate(self, n: int) -> tuple[list[list[int]], Any]:
        """(new tokens per row, ours' ``GenerationResult`` or None) of one greedy call for exactly ``n`` tokens."""
        if not self.spec.impl.startswith("hf"):
            from llama.generation.generate import generate

            result = generate(self.model, self.prompts, n)
            return result.sequences, result
        import transformers

        static = {"cache_implementation": "static"} if self.spec.impl == "hf-static" else {}
        config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD_ID, **static
        )
        out = self.model.generate(self.ids, attention_mask=self.mask, generation_config=config)
        return out[:, self.spec.prompt_len :], None

    def timed_generate(self, n: int) -> tuple[float, list[list[int]], Any]:
        ms, (tokens, result) = _timer(lambda: self.generate(n))
        return ms, tokens if isinstance(tokens, list) else tokens.tolist(), result

    @torch.no_grad()
    def forward(self) -> Any:
        """One bare prefill forward with a fresh cache, the last position's logits only."""
        if not self.spec.impl.startswith("hf"):
            from llama.generation.kv_cache import KVCache

            cache = KVCache.for_model(self.model, self.spec.batch, self.spec.prompt_len)
            return self.model(self.ids, cache=cache, logits_to_keep=1).logits
        named = inspect.signature(self.model.forward).parameters
        keep = "logits_to_keep" if "logits_to_keep" in named else "num_logits_to_keep"  # before transformers 4.50
        return self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True, **{keep: 1}).logits

    def close(self) -> None:
        del self.model, self.ids, self.mask
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- greedy tokens


# group → impl → (the tokens it generated, its recorded row or None)
_TOKENS: dict[tuple, dict[str, tuple[list[list[int]], dict[str, Any] | None]]] = {}


def common_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """Leading tokens two batches of sequences share, the fewest over rows."""

    def one(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))

    return min(one(x, y) for x, y in zip(a, b))


def check_new_tokens(tokens: list[list[int]], spec: GenSpec, n: int) -> None:
    assert len(tokens) == spec.batch, f"{spec.impl}: {len(tokens)} rows came back, expected {spec.batch}"
    lengths = sorted({len(row) for row in tokens})
    assert lengths == [n], (
        f"{spec.impl}: rows of {lengths} new tokens, expected exactly {n} (did a stop token end one?)"
    )


def note_tokens(spec: GenSpec, tokens: list[list[int]], row: dict[str, Any] | None) -> dict[str, int]:
    """Remember this impl's tokens; return (and write into the other rows) the shared-prefix length with each other
    impl.

    In fp32 ours and HF must agree to the end: when neither family's counterpart ran in this session,
    it is computed here, untimed (only fp32 runs are small enough: the CPU case and the smoke run).
    """
    seen = _TOKENS.setdefault(spec.group, {})
    seen[spec.impl] = (tokens, row)
    if spec.precision == "fp32":
        other_family = [i for i in seen if (i in OURS) != (spec.impl in OURS)]
        partner = replace(spec, impl="hf" if spec.impl in OURS else "torch")
        if not other_family and (partner.impl in OURS or importlib.util.find_spec("transformers") is not None):
            runner = Runner(partner, DEVICE)
            try:
                seen[partner.impl] = (runner.timed_generate(partner.new_tokens)[1], None)
            finally:
                runner.close()
    matches = {}
    for other, (theirs, other_row) in seen.items():
        if other == spec.impl:
            continue
        matches[other] = common_prefix(tokens, theirs)
        if other_row is not None:
            other_row.setdefault("matches", {})[spec.impl] = matches[other]
        if spec.precision == "fp32":
            assert matches[other] == spec.new_tokens, (
                f"fp32 greedy tokens of {spec.impl} and {other} part after {matches[other]} of {spec.new_tokens}"
            )
    if row is not None:
        row.setdefault("matches", {}).update(matches)
    return matches


# ---------------------------------------------------------------- measuring


def measure(benchmark: Any, runner: Runner) -> dict[str, list]:
    """Prefill calls, forward-only prefills and full calls, ``rounds()`` rounds inside ``benchmark.pedantic``."""
    n = runner.spec.new_tokens
    forward_only = runner.spec.impl != "hf-static"
    rounds_seen: list[dict[str, list]] = []

    def one_round() -> None:
        got: dict[str, list] = {"prefill": [], "forward": [], "full": [], "results": []}
        for _ in range(PREFILL_REPEATS):
            got["prefill"].append(runner.timed_generate(1)[0])
            if forward_only:
                got["forward"].append(_timer(runner.forward)[0])
        ms, tokens, result = runner.timed_generate(n)
        check_new_tokens(tokens, runner.spec, n)
        got["full"].append(ms)
        got["results"].append(result)
        rounds_seen.append(got)

    benchmark.pedantic(one_round, rounds=rounds(3), iterations=1, warmup_rounds=1)
    kept = rounds_seen[1:]  # pedantic's warm-up round is appended too: drop it
    return {key: [v for r in kept for v in r[key]] for key in ("prefill", "forward", "full", "results")}


def generation_row(runner: Runner, times: dict[str, list], tokens: list[list[int]], case: str) -> dict[str, Any]:
    """What every measured case records: the spec, the model, the timings and the throughputs."""
    spec, config = runner.spec, runner.config
    prefill_ms, full_ms = statistics.median(times["prefill"]), statistics.median(times["full"])
    decode_ms = full_ms - prefill_ms
    decode_steps = spec.new_tokens - 1
    forward_ms = statistics.median(times["forward"]) if times["forward"] else None
    results = [r for r in times["results"] if r is not None]
    prompt_tokens = spec.batch * spec.prompt_len
    return {
        "case": case,
        "preset": spec.preset,
        "impl": spec.impl,
        "precision": spec.precision,
        "batch": spec.batch,
        "prompt_len": spec.prompt_len,
        "new_tokens": spec.new_tokens,
        "vocab": config.vocab_size,
        "dim": config.dim,
        "n_layers": config.n_layers,
        "params": runner.params,
        "prefill_ms": prefill_ms,
        "prefill_ms_min": min(times["prefill"]),
        "prefill_ms_max": max(times["prefill"]),
        "prefill_tokens_per_s": prompt_tokens / (prefill_ms / 1e3),
        "forward_ms": forward_ms,
        "forward_tokens_per_s": prompt_tokens / (forward_ms / 1e3) if forward_ms else None,
        "full_ms": full_ms,
        "full_ms_min": min(times["full"]),
        "full_ms_max": max(times["full"]),
        "decode_ms": decode_ms,
        "decode_ms_per_step": decode_ms / decode_steps,
        "decode_tokens_per_s": spec.batch * decode_steps / (decode_ms / 1e3) if decode_ms > 0 else None,
        "own_prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in results) if results else None,
        "own_decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results) if results else None,
        "distinct_tokens": min(len(set(row)) for row in tokens),
        "prefill_calls": len(times["prefill"]),
        "full_calls": len(times["full"]),
        **versions(ON_GPU),
    }


def run_case(benchmark: Any, recorder: Recorder, spec: GenSpec, case: str) -> None:
    """Warm up, check the tokens, measure, record (nothing is recorded in a smoke run)."""
    if spec.impl.startswith("hf"):
        require_transformers()
    runner = Runner(spec, DEVICE)
    try:
        if spec.impl == "triton":
            assert runner.uses_triton(), (
                "kernels=triton did not reach the Triton kernels (TRITON_INTERPRET unset on CPU?)"
            )
        tokens = runner.timed_generate(spec.new_tokens)[
            1
        ]  # warm-up: Triton/torch.compile compiles, the allocator settles
        check_new_tokens(tokens, spec, spec.new_tokens)
        runner.timed_generate(1)
        if spec.impl != "hf-static":
            runner.forward()
        if SMOKE:  # the body once through pytest-benchmark's machinery; nothing is claimed or recorded
            benchmark.pedantic(lambda: runner.generate(spec.new_tokens), rounds=1, iterations=1, warmup_rounds=0)
            note_tokens(spec, tokens, None)
            return
        times = measure(benchmark, runner)
        if benchmark.disabled or not times["full"]:
            note_tokens(spec, tokens, None)
            return
        row = generation_row(runner, times, tokens, case)
        if case == "cpu-generate":
            row.update(device="cpu", cores=os.cpu_count(), threads=torch.get_num_threads())
        note_tokens(spec, tokens, row)
        recorder.add("generate", row)
        benchmark.extra_info.update(
            {
                "prefill_tokens_per_s": round(row["prefill_tokens_per_s"]),
                "decode_tokens_per_s": None
                if row["decode_tokens_per_s"] is None
                else round(row["decode_tokens_per_s"]),
                "decode_ms_per_step": round(row["decode_ms_per_step"], 3),
            }
        )
    finally:
        runner.close()


# ---------------------------------------------------------------- GPU: presets × precision × batch × impl


@gpu_only
@pytest.mark.parametrize(("preset", "precision", "batch", "impl"), CASES, ids=[case_id(c) for c in CASES])
def test_generate_speed(benchmark: Any, recorder: Recorder, preset: str, precision: str, batch: int, impl: str) -> None:
    spec = GenSpec(preset, impl, precision, batch)
    if SMOKE:
        spec = replace(spec, batch=min(batch, SMOKE_BATCH), prompt_len=SMOKE_PROMPT, new_tokens=SMOKE_NEW, smoke=True)
    benchmark.group = f"generate {preset} {precision} batch {batch}"
    run_case(benchmark, recorder, spec, "generate")


# ---------------------------------------------------------------- CPU: the torch paths at a small size


@pytest.mark.skipif(ON_GPU, reason=HAS_GPU_REASON)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_generate_speed(benchmark: Any, recorder: Recorder, impl: str) -> None:
    """CPU, few cores: ours (``kernels="torch"``) vs HF + SDPA on the ``tiny`` preset in fp32; not a GPU claim."""
    preset, precision, batch, prompt_len, new_tokens, vocab = CPU_RUN
    spec = GenSpec(preset, impl, precision, batch, prompt_len, new_tokens, vocab=vocab)
    benchmark.group = f"CPU generate {preset} {precision} batch {batch}"
    run_case(benchmark, recorder, spec, "cpu-generate")
