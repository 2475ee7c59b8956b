"""One training step of our Llama or of ``transformers``' ``LlamaForCausalLM``, and the small-card memory rehearsal.

    python bench/rehearse_6gb.py --preset seed003-92m --batch 32                       # one candidate, JSON on stdout
    python bench/rehearse_6gb.py --preset seed003-92m --search 4,8,16,32,48,64         # each candidate in a subprocess
    python bench/rehearse_6gb.py --preset seed003-92m --batch 16 --impl hf --no-checkpointing

A *step* is what ``llama.training`` does per optimizer step with one micro-batch: zero the gradients,
forward under autocast, ``GradScaler.scale(loss).backward()``, AdamW step (fused on CUDA), scaler
update; no clipping, no data loading (one fixed batch of random ids). ``bench/test_train_step.py``
times :class:`Trainer` for the speed table and calls :func:`search` for the rehearsal.

The rehearsal answers "what micro-batch trains on a 6 GB card": with one candidate per process,
``torch.cuda.set_per_process_memory_fraction(cap / total)`` (``llama.training.runtime.cap_memory``), so neither
the cap nor the allocator state of an out-of-memory attempt leaks into the next. A candidate fits
when ``--warmup`` + ``--steps`` steps complete. Exit status: 0 fits, 2 out of memory, 1 another error;
the last stdout line is always one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(REPO))

logger = logging.getLogger(__name__)

IMPLS = ("triton", "torch", "hf")  # ours on zhkernels/, ours on zhkernels.reference + SDPA, transformers + SDPA
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
ASSUMED_VOCAB = 16_000  # presets whose vocabulary is the tokenizer's (seed002-120m, seed004-baby)
SEARCH_BATCHES = (4, 8, 16, 32, 48, 64)
CAP_GIB = 6.0
GIB = 2**30
OOM_EXIT = 2
# CPU smoke shapes: the preset's heads and tying kept, everything else shrunk so Triton's interpreter is quick
SMOKE_HEAD_DIM, SMOKE_LAYERS, SMOKE_FFN, SMOKE_VOCAB, SMOKE_SEQ, SMOKE_BATCH = 16, 1, 64, 256, 16, 2


@dataclass(frozen=True)
class StepSpec:
    """What one benchmarked step trains: model preset and implementation, micro-batch, precision, checkpointing."""

    preset: str
    impl: str
    batch: int
    seq: int
    precision: str = "bf16"
    checkpointing: bool = False
    vocab: int | None = None  # None: the preset's own, or ASSUMED_VOCAB where the preset has none
    smoke: bool = False  # shrink the model to SMOKE_* (CPU smoke runs)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch < 1 or self.seq < 2:
            raise ValueError(f"batch must be ≥ 1 and seq ≥ 2, got {self.batch} × {self.seq}")


def model_config(spec: StepSpec) -> Any:
    """Our ``LlamaConfig`` for ``spec`` (Hugging Face's model is built from its ``to_hf_config()``)."""
    from llama.model import PRESETS, LlamaConfig

    if spec.preset not in PRESETS:
        raise ValueError(f"unknown preset {spec.preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[spec.preset]
    fields: dict[str, Any] = {"max_seq_len": max(spec.seq, base["max_seq_len"])}
    if spec.vocab is not None or base["vocab_size"] is None:
        fields["vocab_size"] = spec.vocab or ASSUMED_VOCAB
    if spec.smoke:
        fields.update(
            dim=base["n_heads"] * SMOKE_HEAD_DIM,
            n_layers=SMOKE_LAYERS,
            ffn_dim=SMOKE_FFN,
            vocab_size=SMOKE_VOCAB,
            max_seq_len=max(spec.seq, SMOKE_SEQ),
        )
    return LlamaConfig.from_preset(spec.preset, **fields)


def model_options(spec: StepSpec) -> Any:
    """How our model runs for ``spec``: its kernels (``torch`` beside Hugging Face's) and activation checkpointing."""
    from llama.model import ModelOptions

    return ModelOptions(kernels="torch" if spec.impl == "hf" else spec.impl, checkpointing=spec.checkpointing)


def vocab_assumed(spec: StepSpec) -> bool:
    """Whether the vocabulary is ours to choose (the preset takes the tokenizer's and none was given)."""
    from llama.model import PRESETS

    return PRESETS[spec.preset]["vocab_size"] is None and spec.vocab is None and not spec.smoke


def model_numbers(config: Any, seq: int) -> dict[str, int]:
    """Parameters and training FLOPs per token (``Llama.flops_per_token``) of ``config``, built on the meta device."""
    from llama.model import Llama

    with torch.device("meta"):
        model = Llama(config)
    return {"params": model.num_params(), "flops_per_token": model.flops_per_token(seq)}


def hf_model(config: Any, checkpointing: bool) -> torch.nn.Module:
    """``transformers.LlamaForCausalLM`` with SDPA attention at ``config``'s shape (on the current default device)."""
    import transformers

    hf_config = transformers.LlamaConfig(**config.to_hf_config(), use_cache=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, not sdpa")
    if checkpointing:  # transformers 5.2x renamed it; the old name warns there
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def decay_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """AdamW groups as ``Llama.configure_optimizer_groups`` makes them: decay on matrices, none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class Trainer:
    """The model, AdamW, the loss scaler and one fixed batch of ``spec``; :meth:`step` is one training step."""

    INIT_SCALE = 2.0**16  # GradScaler's default: the number of skipped fp16 steps is log2(INIT_SCALE / scale)

    def __init__(self, spec: StepSpec, device: torch.device, seed: int = 0) -> None:
        self.spec, self.device = spec, device
        self.config = model_config(spec)
        torch.manual_seed(seed)
        with torch.device(device):
            if spec.impl == "hf":
                self.model = hf_model(self.config, spec.checkpointing)
            else:
                from llama.model import Llama

                self.model = Llama(self.config, model_options(spec))
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model),
            lr=3e-4,
            betas=(0.9, 0.95),
            eps=1e-8,
            fused=True if device.type == "cuda" else None,
        )
        dtype = PRECISIONS[spec.precision]
        self.scaler = torch.amp.GradScaler(device.type, init_scale=self.INIT_SCALE, enabled=spec.precision == "fp16")
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        generator = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, self.config.vocab_size, (spec.batch, spec.seq + 1), generator=generator).to(device)
        self.inputs = tokens[:, :-1].contiguous()
        self.labels = tokens[:, 1:].contiguous()  # ours takes shifted labels; HF shifts ``labels=inputs`` itself
        self.steps_run = 0

    @property
    def tokens_per_step(self) -> int:
        return self.spec.batch * self.spec.seq

    def uses_triton(self) -> bool:
        """Whether the forward really goes through :mod:`zhkernels` (CUDA, or CPU under Triton's interpreter)."""
        if self.spec.impl != "triton":
            return False
        from zhkernels._dispatch import use_triton

        return use_triton(self.inputs.float())

    def loss(self) -> torch.Tensor:
        if self.spec.impl == "hf":
            return self.model(input_ids=self.inputs, labels=self.inputs).loss
        return self.model(self.inputs, labels=self.labels).loss

    def step(self) -> torch.Tensor:
        """Zero grads, forward under autocast, scaled backward, AdamW step, scaler update; returns the loss (no
        sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.loss()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # fused AdamW unscales and skips inf/NaN steps on the GPU, no host sync
        self.scaler.update()
        self.steps_run += 1
        return loss.detach()

    def skipped_steps(self) -> int:
        """fp16 steps the scaler skipped so far (each halves the scale; it grows back only after 2,000 good steps)."""
        if not self.scaler.is_enabled():
            return 0
        return max(0, round(math.log2(self.INIT_SCALE / self.scaler.get_scale())))

    def close(self) -> None:
        """Drop the model, the optimizer state and the batch, and return the memory to the device."""
        del self.model, self.optimizer, self.inputs, self.labels
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- the rehearsal: one candidate per process


def _cuda_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _wall_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def is_oom(error: BaseException) -> bool:
    """An allocation refused under the cap: PyTorch's OOM, or a cuBLAS/cuDNN workspace that could not be allocated."""
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "status_alloc_failed" in text


def attempt(
    spec: StepSpec, device: torch.device, cap_gib: float | None, warmup: int = 1, steps: int = 3
) -> dict[str, Any]:
    """Train ``max(1, warmup) + steps`` steps of ``spec`` in this process under the memory cap; a result dict, never
    raises."""
    from llama.training.runtime import cap_memory

    result: dict[str, Any] = {"batch": spec.batch, "ok": False, "oom": False}
    trainer = None
    if device.type == "cuda" and device.index is None:  # set_per_process_memory_fraction wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        if device.type == "cuda":
            cap_memory(cap_gib, device)
            torch.set_float32_matmul_precision("high")
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(spec, device)
        first_loss = float(trainer.step())  # the first step is untimed (Triton compiles, AdamW allocates its state)
        for _ in range(warmup - 1):
            trainer.step()
        timer = _cuda_ms if device.type == "cuda" else _wall_ms
        times = timer(trainer.step, steps)
        ms = statistics.median(times)
        result.update(
            ok=True,
            ms=ms,
            tokens_per_s=trainer.tokens_per_step / (ms / 1e3),
            steps=trainer.steps_run,
            first_loss=first_loss,
            skipped_steps=trainer.skipped_steps(),
        )
    except Exception as e:  # an OOM is the expected way for a candidate to fail; anything else is reported too
        result.update(oom=is_oom(e), error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        if device.type == "cuda":
            result.update(
                peak_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20,
                total_mb=torch.cuda.get_device_properties(device).total_memory / 2**20,
            )
        if trainer is not None:
            trainer.close()
    return result


def subprocess_attempt(
    spec: StepSpec,
    cap_gib: float | None,
    device: str = "cuda",
    warmup: int = 1,
    steps: int = 3,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """:func:`attempt` in a fresh Python process (this file run as a script), so no cap or allocator state leaks."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--preset",
        spec.preset,
        "--impl",
        spec.impl,
        "--batch",
        str(spec.batch),
        "--seq",
        str(spec.seq),
        "--precision",
        spec.precision,
        "--checkpointing" if spec.checkpointing else "--no-checkpointing",
        "--device",
        device,
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
    ]
    command += ["--cap-gib", str(cap_gib)] if cap_gib is not None else []
    command += ["--vocab", str(spec.vocab)] if spec.vocab is not None else []
    command += ["--smoke"] if spec.smoke else []
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"batch": spec.batch, "ok": False, "oom": False, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"batch": spec.batch, "ok": False, "oom": False, "error": f"exit {done.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def search(candidates: Sequence[int], try_batch: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Try micro-batches in increasing order until one fails; the largest that fit, and every attempt."""
    tried: list[dict[str, Any]] = []
    for batch in sorted(candidates):
        tried.append(try_batch(batch))
        if not tried[-1]["ok"]:
            break
    fits = [t for t in tried if t["ok"]]
    failed = tried[-1] if tried and not tried[-1]["ok"] else None
    return {
        "tried": tried,
        "largest_batch": fits[-1]["batch"] if fits else None,
        "largest": fits[-1] if fits else None,
        "stopped_by": None if failed is None else ("oom" if failed.get("oom") else "error"),
        "candidates": sorted(candidates),
    }


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a few steps under a GPU memory cap; print one JSON line.")
    p.add_argument("--preset", default="seed003-92m", help="llama.model.PRESETS name (default: seed003-92m)")
    p.add_argument(
        "--impl", default="triton", choices=IMPLS, help="ours on zhkernels/ (triton), ours on torch ops, or hf"
    )
    p.add_argument("--batch", type=int, default=32, help="micro-batch (sequences)")
    p.add_argument(
        "--search",
        default=None,
        help="comma-separated micro-batches: try each in a subprocess, stop at the first failure",
    )
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument(
        "--precision", default="fp16", choices=tuple(PRECISIONS), help="autocast dtype (fp16 adds a GradScaler)"
    )
    p.add_argument(
        "--checkpointing", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing"
    )
    p.add_argument("--cap-gib", type=float, default=CAP_GIB, help="memory cap in GiB (0: none)")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default: the preset's, else {ASSUMED_VOCAB})")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu: no cap, wall-clock timing)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps that must complete")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cap = args.cap_gib or None
    spec = StepSpec(
        args.preset, args.impl, args.batch, args.seq, args.precision, args.checkpointing, args.vocab, args.smoke
    )
    if args.search:
        candidates = [int(b) for b in args.search.split(",") if b.strip()]
        found = search(
            candidates,
            lambda b: subprocess_attempt(
                StepSpec(
                    spec.preset, spec.impl, b, spec.seq, spec.precision, spec.checkpointing, spec.vocab, spec.smoke
                ),
                cap,
                args.device,
                args.warmup,
                args.steps,
            ),
        )
        print(json.dumps(found))
        return 0 if found["largest_batch"] is not None else 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            json.dumps(
                {"batch": args.batch, "ok": False, "oom": False, "error": "CUDA is not available (use --device cpu)"}
            )
        )
        return 1
    if device.type == "cpu" and args.impl == "triton":  # before zhkernels is imported: triton.jit reads it then
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = attempt(spec, device, cap, args.warmup, args.steps)
    print(json.dumps(result))
    return 0 if result["ok"] else OOM_EXIT if result["oom"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
