"""Load a model to run it: a training checkpoint (a step folder or a run's ``--out-dir``) or a Hugging Face Llama.

    model, tokenizer, info = load_for_inference("out/sft")                      # the run's newest checkpoint
    model, tokenizer, info = load_for_inference("hf/zh-llama", dtype="bf16")    # a folder llama.export wrote

Shared by ``llama.chat`` and ``llama.evaluate``. The tokenizer is the one the checkpoint names (an exported
folder carries its own); ``tokenizer=`` replaces it and must have the same sha256. Refused with a one-line
error naming both sides: a folder whose ``config.json`` describes another architecture than Llama, and a
tokenizer whose vocabulary (sha256) is not the one the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.tokenizer import Tokenizer, load_tokenizer, tokenizer_mismatch

from ..formats.hf import import_hf, resolve_tokenizer
from ..formats.hf_io import HF_CONFIG, not_llama, read_json
from ..model import KERNEL_CHOICES, Llama, LlamaConfig, ModelOptions
from ..precision import DTYPES, best_precision
from ..quantize import parse_quant, quantize_model
from ..training import adapters
from ..training import checkpoint as ckpt
from .sampling import SamplingOptions

log = logging.getLogger("llama.generation.load")

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ckpt`` and ``--tokenizer``, as every inference command (chat, evaluate) takes them."""
    parser.add_argument(
        "--ckpt",
        required=True,
        metavar="DIR",
        help="a checkpoint (step_N folder or a training --out-dir, its newest) or a Hugging Face "
        "Llama folder (llama.export's output)",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="the tokenizer (default: the checkpoint's; same sha256 required)"
    )


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--kernels``, ``--quant`` and ``-v``, as every inference command takes them."""
    parser.add_argument(
        "--device", metavar="DEVICE", default="auto", help="cpu, cuda or cuda:N (default: CUDA when present)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weights and compute precision (default: bf16 on a GPU that has it, fp32 on CPU)",
    )
    parser.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default="auto",
        help="Triton kernels or plain PyTorch (default: Triton on CUDA)",
    )
    parser.add_argument(
        "--quant",
        metavar="SCHEME",
        help="weight-only quantisation of the linear layers at load time, for inference: "
        "int8, int4-g32, int4-g64, int4-g128 (each int4 also -asym); default: none",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How tokens are picked (temperature, top-k/p, repetition penalty, beams, greedy, n-gram ban, think budget), as
    chat, generate and evaluate take them; :func:`sampling_options` checks the values."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--temperature", type=float, metavar="T", default=0.7, help="sampling temperature (default: %(default)s)"
    )
    group.add_argument(
        "--top-k", type=int, metavar="K", default=0, help="sample among the k likeliest tokens; 0 = off (default)"
    )
    group.add_argument(
        "--top-p", type=float, metavar="P", default=0.9, help="nucleus sampling mass; 1 = off (default: %(default)s)"
    )
    group.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        default=1.0,
        help="> 1 makes tokens already in the text less likely; 1 = off (default)",
    )
    group.add_argument(
        "--num-beams",
        type=int,
        metavar="N",
        default=1,
        help="beam search with this many beams (deterministic; the text shows when complete)",
    )
    group.add_argument("--greedy", action="store_true", help="always take the likeliest token (no sampling)")
    group.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        default=0,
        help="never repeat an N-token sequence already in the text, prompt included (as transformers); 0 = off "
        "(default)",
    )
    group.add_argument(
        "--max-think-tokens",
        type=int,
        metavar="K",
        help="reasoning models: close a <think> block with </think> once it holds K generated tokens, then "
        "let the answer follow (default: no budget)",
    )


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The options :func:`add_sampling_arguments` read (sampling unless --greedy or beams), or a one-line
    ValueError for a value out of range."""
    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be ≥ 1, got {args.num_beams}")
    if args.no_repeat_ngram_size < 0:
        raise ValueError(f"--no-repeat-ngram-size must be ≥ 0 (0 = off), got {args.no_repeat_ngram_size}")
    if args.max_think_tokens is not None and args.max_think_tokens < 1:
        raise ValueError(f"--max-think-tokens must be ≥ 1 (leave it out for no budget), got {args.max_think_tokens}")
    return SamplingOptions(
        not args.greedy and args.num_beams == 1,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
        args.no_repeat_ngram_size,
        args.max_think_tokens,
    )


class LoadError(ValueError):
    """A model cannot be loaded for inference (one-line message saying what to do)."""


@dataclass
class InferenceInfo:
    """What was loaded: the folder, its kind (``"checkpoint"`` or ``"hf"``), the model config and the raw
    ``config.json`` (for a checkpoint: step, tokenizer reference, and the training task, e.g. SFT's template)."""

    path: Path
    kind: str
    model: LlamaConfig
    saved: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> dict[str, Any]:
        """The task a checkpoint was trained for (``{"name": "sft", "template": …}``), empty when unrecorded."""
        task = self.saved.get("task") if self.kind == "checkpoint" else None
        return task if isinstance(task, dict) else {}

    @property
    def think_off_prefix(self) -> str:
        """The reply prefix that switches a reasoning (``--template think``) model's thinking off, else ``""``."""
        return str(self.task.get("think_off_prefix") or "")

    def describe(self) -> str:
        step = self.saved.get("step") if self.kind == "checkpoint" else None
        where = f"{self.path} (step {step})" if step is not None else str(self.path)
        c = self.model
        return f"{where}: {c.dim}d x {c.n_layers} layers, vocab {c.vocab_size:,}, context {c.max_seq_len}"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise LoadError(f"--device {device!r} is not a device ({e}): use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(
            f"--device {device} asked for CUDA, but this machine has none (or torch was built without it): "
            "use --device cpu"
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` (a name of :data:`DTYPES` or a torch dtype); by default bf16 on a GPU that has it, fp16 on an older
    GPU, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return DTYPES[best_precision(device)]
    if dtype not in DTYPES:
        raise LoadError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _model_config(saved: Any, where: Path) -> LlamaConfig:
    """The checkpoint's :class:`LlamaConfig`, or a one-line :class:`LoadError`."""
    try:
        return LlamaConfig.from_saved(saved, str(where / ckpt.CONFIG_FILE))
    except ValueError as e:
        raise LoadError(str(e)) from None


def _check_architecture(config: dict[str, Any], config_path: Path) -> None:
    """Refuse a ``config.json`` of another model family, naming what it is and what is loaded here."""
    problem = not_llama(config, config_path)
    if problem:
        raise LoadError(problem)


def _tokenizer(
    reference: dict[str, Any], tokenizer: str | os.PathLike[str] | Tokenizer | None, where: Path
) -> Tokenizer:
    """The checkpoint's tokenizer or ``tokenizer``, refused when its sha256 is not ``reference``'s."""
    if not isinstance(tokenizer, Tokenizer):
        return resolve_tokenizer(reference, tokenizer, where)  # names both sha256s when they differ
    refusal = tokenizer_mismatch(
        reference,
        {"path": tokenizer.path, "sha256": tokenizer.sha256},
        owner=str(where),
        other="the tokenizer given",
        fix="pass the tokenizer it was trained with",
    )
    if refusal:
        raise LoadError(refusal)
    return tokenizer


def _hf_tokenizer_reference(hf_dir: Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of the tokenizer saved beside an exported model, empty when there is none."""
    if not any((hf_dir / name).is_file() for name in HF_TOKENIZER_FILES):
        return {}
    return {"path": str(hf_dir), "sha256": load_tokenizer(hf_dir).sha256}


def load_for_inference(
    ckpt_or_hf_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    kernels: str = "auto",
    quant: str | None = None,
) -> tuple[Llama, Tokenizer, InferenceInfo]:
    """``(model in eval mode on device/dtype, its tokenizer, what was loaded)`` from a checkpoint or an HF folder.

    ``ckpt_or_hf_dir``: a ``step_N`` folder, a training ``--out-dir`` (its ``latest``/newest checkpoint), a folder
    written by ``llama.export --from-hf``, or a Hugging Face ``LlamaForCausalLM`` folder. ``tokenizer``: a folder,
    file or :class:`Tokenizer` replacing the checkpoint's own (same sha256 required). ``quant``: a weight-only
    quantisation scheme of :mod:`llama.quantize` (``"int8"``, ``"int4-g64"``, …) applied after the model is on its
    device and dtype.
    """
    if kernels not in KERNEL_CHOICES:
        raise LoadError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    scheme = None
    if quant is not None:
        try:
            scheme = parse_quant(quant)
        except ValueError as e:
            raise LoadError(str(e)) from None
    path = Path(ckpt_or_hf_dir)
    if not path.exists():
        raise LoadError(
            f"{path} does not exist: give a checkpoint (step_N folder or a training --out-dir) "
            "or a Hugging Face Llama folder"
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    found = ckpt.find_checkpoint(path)
    saved = read_json(found / ckpt.CONFIG_FILE) if found is not None and (found / ckpt.CONFIG_FILE).is_file() else {}
    if found is not None and ("format" in saved or "model" in saved):  # ours; an HF folder has the same file names
        saved = ckpt.read_config(found)  # refuses another format version
        config = _model_config(saved.get("model"), found)
        tok = _tokenizer(saved.get("tokenizer") or {}, tokenizer, found)
        model = Llama(config, ModelOptions(kernels=kernels))  # inference: no checkpointing, no dropout
        model = adapters.load_weights(found, saved, model)  # a LoRA run: its base, adapters merged
        info = InferenceInfo(found, "checkpoint", config, saved)
    elif ((hf_dir := found or path) / HF_CONFIG).is_file():  # sharded HF folders have no model.safetensors
        hf = read_json(hf_dir / HF_CONFIG)
        _check_architecture(hf, hf_dir / HF_CONFIG)
        tok = _tokenizer(_hf_tokenizer_reference(hf_dir), tokenizer, hf_dir)
        model, config = import_hf(hf_dir, kernels=kernels)
        info = InferenceInfo(hf_dir, "hf", config, hf)
    else:
        raise LoadError(
            f"no checkpoint in {path}: give a step_N folder, a training --out-dir, or a Hugging Face "
            "Llama folder (config.json + model.safetensors)"
        )
    if tok.vocab_size > config.vocab_size:
        raise LoadError(
            f"tokenizer {tok.path} has {tok.vocab_size:,} ids, more than the model's vocab_size "
            f"{config.vocab_size:,}: it is not the tokenizer {info.path} was trained with"
        )
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    if scheme is not None:
        model = quantize_model(model, scheme)
    quantised = f", {scheme.name} weights" if scheme is not None else ""
    log.info(
        "loaded %s on %s (%s%s)", info.describe(), torch_device, str(torch_dtype).removeprefix("torch."), quantised
    )
    return model, tok, info
