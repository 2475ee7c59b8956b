"""What the fine-tuning benchmarks share: one small model written as our checkpoint and exported to Hugging Face, the
real preference pairs packed for it, a timed training step, and three ways to size a step's memory.

``bench/test_lora_step.py`` and ``bench/test_dpo_step.py`` build on it. Everything is made once per session in a
temporary folder: a 6,400-id BPE trained by ``engine.tokenizer`` on the text of
``../shared/data/medicalgpt/dpo_zh_500.jsonl`` (MiniMind's vocabulary size), a randomly initialised checkpoint of
:data:`CPU_SIZE` (or :data:`GPU_SIZE` on CUDA) written the way ``llama.training`` writes one, and its
``llama.formats.hf.export_hf`` folder (fp32) that ``transformers``, PEFT and TRL load. Nothing here imports from
``tests/``.

Memory, three ways (each row says which it is):

* **measured on CUDA**: ``torch.cuda.max_memory_allocated()`` over one step, after ``reset_peak_memory_stats``;
* **measured on CPU**: the peak of live tensor storage during one real CPU step, PyTorch's ``MemTracker`` (parameters,
  gradients, optimizer state, activations and temporaries; not the allocator's caching, not Python objects). It is the
  CPU code path's figure (our model runs ``zhkernels.reference`` there), not a GPU figure;
* **counted for the GPU path on CPU**: the same step on ``meta`` tensors, as ``bench/count_memory.py`` counts a
  pre-training step (our ops' real host code with launches stubbed, autocast emulated); Hugging Face's SDPA is
  counted as its flash backend (``aten._scaled_dot_product_flash_attention``, K/V repeated for GQA), since on meta
  tensors it would take the math path a GPU does not. A count, not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (REPO, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchlib import PYTHON, SHARED_DATA  # noqa: E402

logger = logging.getLogger(__name__)

DPO_PAIRS = SHARED_DATA / "medicalgpt" / "dpo_zh_500.jsonl"
VOCAB = 6_400
BATCH_MS = 300.0  # each timed batch of steps lasts about this long
MAX_INNER = 20
MIB = 2**20


@dataclass(frozen=True)
class Size:
    """The model and batches one device runs: the architecture, the SFT batch (LoRA) and the DPO rows."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    sft_batch: int
    sft_seq: int
    dpo_rows: int
    dpo_seq: int

    def config(self) -> Any:
        from llama.model import LlamaConfig

        return LlamaConfig(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=VOCAB,
            max_seq_len=max(self.sft_seq, self.dpo_seq),
            tie_embeddings=True,
        )


#: CPU: small enough that each benchmark stays near a minute on 2 cores; head_dim 64 as the GPU kernels want.
CPU_SIZE = Size("dim 256 × 4 layers", 256, 4, 4, 4, sft_batch=4, sft_seq=256, dpo_rows=2, dpo_seq=1024)
#: CUDA: MiniMind2-small's shape (``minimind-26m``), batches a 24 GB card trains.
GPU_SIZE = Size("minimind-26m (dim 512 × 8 layers, 8/2 heads)", 512, 8, 8, 2, 16, 512, dpo_rows=8, dpo_seq=1024)


def device_size(on_gpu: bool) -> Size:
    return GPU_SIZE if on_gpu else CPU_SIZE


# ---------------------------------------------------------------- the model, its tokenizer and its HF export


def pair_texts(path: Path) -> list[str]:
    """Every prompt turn, chosen and rejected reply of a MedicalGPT pairs file: the tokenizer's training text."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts += [turn["value"] for turn in record["conversations"]] + [record["chosen"], record["rejected"]]
    return texts


def train_small_tokenizer(out: Path) -> Path:
    """A 6,400-id BPE (byte fallback, chat template) trained on the DPO pairs' text; returns its folder."""
    from engine.tokenizer import train_tokenizer

    train_tokenizer(pair_texts(DPO_PAIRS), out, vocab_size=VOCAB)
    return out


def write_checkpoint(config: Any, tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised checkpoint as ``llama.training`` writes one, naming ``tokenizer_dir`` as its own."""
    from engine.tokenizer import load_tokenizer
    from llama.model import Llama
    from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = Llama(config)
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 0},
        "tokenizer": {"path": str(tokenizer_dir.resolve()), "sha256": tokenizer.sha256},
        "step": 0,
        "tokens": 0,
    }
    name = checkpoint_name(0)
    save_checkpoint(out_dir, name, model.state_dict(), {"step": 0}, meta, tied=tied_parameters(model))
    return out_dir / name


def export(checkpoint: Path, out: Path) -> Path:
    """``llama.formats.hf.export_hf(checkpoint, out, dtype="fp32")``: the folder transformers, PEFT and TRL load."""
    from llama.formats.hf import export_hf

    return export_hf(checkpoint, out, dtype="fp32")


def load_ours(checkpoint: Path, device: torch.device) -> Any:
    """Our Llama with the checkpoint's weights, ``kernels="auto"`` (Triton on CUDA, the torch reference on CPU)."""
    from llama.model import Llama, LlamaConfig, ModelOptions
    from llama.training import checkpoint as ckpt

    saved = ckpt.read_config(checkpoint)
    config = LlamaConfig(**saved["model"])
    model = Llama(config, ModelOptions(kernels="auto"))
    ckpt.load_model_weights(checkpoint, model)
    return model.to(device)


def load_hf(export_dir: Path, device: torch.device) -> Any:
    """``transformers.AutoModelForCausalLM.from_pretrained(export_dir)`` with SDPA attention, on ``device``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="sdpa")
    return model.to(device)


@dataclass(frozen=True)
class FinetuneModel:
    """The session's model: its size, tokenizer folder, our checkpoint and its Hugging Face export."""

    size: Size
    tokenizer_dir: Path
    checkpoint: Path
    export_dir: Path
    folder: Path


def prepare_model(folder: Path, size: Size) -> FinetuneModel:
    """Tokenizer, checkpoint and HF export of ``size`` under ``folder`` (an empty temporary folder)."""
    tokenizer_dir = train_small_tokenizer(folder / "tokenizer")
    checkpoint = write_checkpoint(size.config(), tokenizer_dir, folder / "run")
    return FinetuneModel(size, tokenizer_dir, checkpoint, export(checkpoint, folder / "hf"), folder)


# ---------------------------------------------------------------- the preference pairs


def pack_pairs(source: Path, tokenizer_dir: Path, out: Path) -> Path:
    """``python -m engine.prepare --kind dpo`` (the packer users run); returns the dataset prefix."""
    command = [PYTHON, "-m", "engine.prepare", "--kind", "dpo", "--source", str(source), "--tokenizer"]
    command += [str(tokenizer_dir), "--out", str(out), "--no-progress", "--workers", "1"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return out


def fitting_pairs(tokenizer_dir: Path, seq_len: int, folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The pairs whose two sides fit one row of ``seq_len`` together, packed: (prefix, their source records).

    Packed once to learn each pair's length, then the pairs that fit are written to a JSONL file of their own and
    packed again, so no pair is cut (our packer cuts long pairs to one row; TRL truncates each side on its own:
    with whole pairs both sides see the same tokens). Stored pair ``i`` of the result is ``records[i]``.
    """
    import numpy as np

    from engine.format import open_packed

    records = [json.loads(line) for line in DPO_PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    probe = pack_pairs(DPO_PAIRS, tokenizer_dir, folder / "all")
    lengths = open_packed(probe).doc_lengths().reshape(-1, 2).sum(axis=1)
    if len(lengths) != len(records):
        raise RuntimeError(f"{probe}: {len(lengths)} pairs packed from {len(records)} records (some were dropped)")
    kept = [r for r, n in zip(records, lengths) if n <= seq_len]
    source = folder / "fitting.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    prefix = pack_pairs(source, tokenizer_dir, folder / "fitting")
    packed = open_packed(prefix).doc_lengths().reshape(-1, 2).sum(axis=1)
    if len(packed) != len(kept) or not np.all(packed <= seq_len):
        raise RuntimeError(f"{prefix}: the repacked pairs do not match the {len(kept)} records that fit")
    logger.info("%d of %d pairs fit %d tokens", len(kept), len(records), seq_len)
    return prefix, kept


def trl_record(record: dict[str, Any]) -> dict[str, Any]:
    """A MedicalGPT pair as TRL's conversational preference record (prompt messages, chosen and rejected replies)."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    prompt = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
    }


# ---------------------------------------------------------------- timing


def wall_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls by the wall clock."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def cuda_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` back-to-back calls between CUDA events (one synchronisation at the end)."""
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


def time_steps(benchmark: Any, step: Callable[[], Any], on_gpu: bool, rounds: int) -> list[float]:
    """Milliseconds of each measured step, from ``benchmark.pedantic`` batches of ``inner`` back-to-back steps."""
    timer = cuda_ms if on_gpu else wall_ms
    estimate = statistics.median(timer(step, 1))
    inner = max(1, min(MAX_INNER, math.ceil(BATCH_MS / max(estimate, 1e-3))))
    batches: list[list[float]] = []
    benchmark.pedantic(lambda: batches.append(timer(step, inner)), rounds=rounds, iterations=1, warmup_rounds=1)
    return [ms for b in batches[1:] for ms in b]  # pedantic's warm-up round is appended too: drop it


def timing(times: list[float]) -> dict[str, Any]:
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "steps": len(times)}


# ---------------------------------------------------------------- memory


def cuda_peak_mb(step: Callable[[], Any]) -> dict[str, float]:
    """(resident MiB before one step, peak MiB during it) by ``torch.cuda.max_memory_allocated``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return {"cuda_resident_mb": resident / MIB, "cuda_peak_mb": torch.cuda.max_memory_allocated() / MIB}


class _NoHook:
    def remove(self) -> None:
        pass


def memory_tracker(*modules: torch.nn.Module) -> Any:
    """PyTorch's ``MemTracker``, told that frozen parameters (LoRA's base, a reference model) need no gradient hook:
    it installs one on every parameter a forward reaches, and a tensor without ``requires_grad`` refuses hooks."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return tracker


def tracked_peak(step: Callable[[], Any], modules: list[torch.nn.Module], optimizer: Any, device: str) -> dict:
    """Peak live tensor storage of one ``step`` on ``device`` by ``MemTracker`` (``modules`` and ``optimizer``
    registered so that weights, gradients and AdamW state count): ``{"total": bytes, kind: bytes, ...}``."""
    tracker = memory_tracker(*modules)
    tracker.track_external(*modules, *([optimizer] if optimizer is not None else []))
    with tracker:
        step()
    return device_peak(tracker, device)


def device_peak(tracker: Any, device: str) -> dict[str, int]:
    """A ``MemTracker``'s peak on the device of type ``device``: ``{"total": bytes, kind: bytes, ...}``. Looked up by
    type: the tracker keys a CUDA storage by its indexed device (``cuda:0``), which ``torch.device("cuda")`` is not."""
    snapshot = tracker.get_tracker_snapshot("peak")
    peak = next(v for k, v in snapshot.items() if torch.device(k).type == device)
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in peak.items() if k != "Total"}
    return {"total": int(peak["Total"]), **by_kind}


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as its flash backend allocates on a GPU (output and a float32 log-sum-exp kept), for meta counting."""
    if attn_mask is not None:
        raise NotImplementedError("the meta count covers unpadded causal batches only (attn_mask is None)")
    if key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def hf_on_meta() -> Iterator[None]:
    """Hugging Face models on meta tensors as on a GPU: ``F.scaled_dot_product_attention`` counted as its flash
    backend, and the packed-sequence check of ``transformers.masking_utils`` (which reads values) answering what it
    answers for unpacked rows, None."""
    import transformers.masking_utils as masking

    sdpa, packed = torch.nn.functional.scaled_dot_product_attention, masking.find_packed_sequence_indices
    torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention, masking.find_packed_sequence_indices = sdpa, packed


def count_gpu_step(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    precision: str,
    extra_modules: tuple[torch.nn.Module, ...] = (),
) -> dict[str, int]:
    """Count one step's peak GPU memory on meta tensors: ``model`` (built on meta) trains its ``requires_grad``
    parameters with AdamW (both moments allocated, as after a first step); ``loss_fn()`` runs one forward under the
    emulated autocast of ``precision``, then backward and ``zero_grad``. See the module docstring."""
    from count_memory import LOW_DTYPES, _EmulatedAutocast, _no_kernel_launches, _RealOpBodies

    from zhkernels import _dispatch

    low = LOW_DTYPES[precision]
    meta = torch.device("meta")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    for p in params:
        optimizer.state[p] = {"step": torch.zeros((), device=meta), "exp_avg": torch.zeros_like(p)}
        optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p)
    tracker = memory_tracker(model, *extra_modules)
    tracker.track_external(model, *extra_modules, optimizer)
    autocast = _EmulatedAutocast(low) if low is not None else contextlib.nullcontext()
    forward = autocast.forward if low is not None else contextlib.nullcontext
    with _no_kernel_launches(), hf_on_meta(), _dispatch.meta_as_gpu(low), tracker, _RealOpBodies(), autocast:
        with forward():
            loss = loss_fn()
        loss.backward()
        del loss
        optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")[meta]
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in peak.items() if k != "Total"}
    return {"total": int(peak["Total"]), **by_kind}


def to_meta(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's shapes and dtypes on the meta device (values do not change memory)."""
    return {k: torch.empty_like(v, device="meta") for k, v in batch.items()}


# ---------------------------------------------------------------- the optimizer and precision


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, decay on matrices only (``rehearse_6gb.decay_groups``), fused on CUDA."""
    from rehearse_6gb import decay_groups

    return torch.optim.AdamW(
        decay_groups(model), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True if device.type == "cuda" else None
    )


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """The run's precision: bf16 autocast on CUDA (what the 4090 profile trains in), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"
