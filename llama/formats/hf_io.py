"""The Hugging Face side of :mod:`llama.export`: publishing a folder whole, HF's config files, reading HF weights.

A folder is published whole (:mod:`engine.publish`): an export killed midway leaves either the previous
folder or none under ``NAME``, never half of one; the temporaries of a killed process are removed by the
next run. Weights are read from safetensors only
(one file, or shards listed in ``model.safetensors.index.json``): a ``pytorch_model.bin`` is a pickle,
which can run code when loaded, so it is refused.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file

from engine import publish

log = logging.getLogger("llama.formats.hf_io")

HF_CONFIG, HF_GENERATION_CONFIG = "config.json", "generation_config.json"
HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
#: transformers.LlamaConfig's defaults, for config.json files that leave a field out.
HF_LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
}
HF_LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ExportError(ValueError):
    """An export or import cannot go on (one-line message saying what to do)."""


# ---------------------------------------------------------------- publishing a folder whole


def check_output(final: Path, overwrite: bool) -> None:
    """Refuse an existing ``final`` unless ``overwrite`` (called early too, before any slow work)."""
    if final.exists() and not final.is_dir():
        raise ExportError(f"{final} exists and is not a folder: choose another --out")
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists: pass --overwrite to replace it, or choose another --out")


@contextmanager
def publish_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """:func:`engine.publish.publish_directory`, refusing an existing ``final`` unless ``overwrite``."""
    publish.remove_stale_temporaries(final.parent, only=final.name)  # first: it may put back a moved-aside folder
    check_output(final, overwrite)
    with publish.publish_directory(final) as tmp:
        yield tmp


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} should hold a JSON object")
    return data


# ---------------------------------------------------------------- the Hugging Face config files


def generation_config(bos_id: int | None, eos_ids: list[int], pad_id: int | None) -> dict[str, Any]:
    """``generation_config.json``: greedy by default, stopping at any of ``eos_ids`` (EOS and ``<|im_end|>``).

    No length is set: a ``max_length`` here would draw a warning from every ``generate(max_new_tokens=…)``."""
    eos: int | list[int] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return {"bos_token_id": bos_id, "eos_token_id": eos, "pad_token_id": pad_id, "do_sample": False}


# ---------------------------------------------------------------- reading a Hugging Face Llama


def not_llama(config: dict[str, Any], path: Path) -> str | None:
    """Why the ``config.json`` at ``path`` is not a Llama (naming what it is), or None when it is one."""
    architectures = config.get("architectures") or []
    architectures = [architectures] if isinstance(architectures, str) else architectures
    model_type = config.get("model_type")
    if architectures and LLAMA_ARCHITECTURE not in architectures:
        return (
            f"{path} describes a {', '.join(map(str, architectures))} (model_type {model_type!r}), not a "
            f"{LLAMA_ARCHITECTURE}: only Llama models (zhllm checkpoints or Hugging Face Llama folders) work here"
        )
    if not architectures and model_type != "llama":
        return (
            f"{path} describes model_type {model_type!r}, not 'llama' ({LLAMA_ARCHITECTURE}): only Llama models "
            "(zhllm checkpoints or Hugging Face Llama folders) work here"
        )
    return None


def read_llama_config(hf_dir: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face Llama, HF's defaults filled in; any other architecture is refused."""
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise ExportError(f"{hf_dir} has no {HF_CONFIG}: give a folder written by save_pretrained")
    config = read_json(path)
    problem = not_llama(config, path)
    if problem:
        raise ExportError(problem)
    missing = [key for key in HF_LLAMA_REQUIRED if config.get(key) is None]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}: it does not describe a whole Llama")
    return {**HF_LLAMA_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index lists, on CPU, in their stored dtype."""
    single, index = hf_dir / HF_WEIGHTS, hf_dir / HF_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{index} has no weight_map: re-save the model with save_pretrained")
        files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
    elif any(hf_dir.glob("pytorch_model*.bin")):
        raise ExportError(
            f"{hf_dir} holds pytorch_model.bin (a pickle, which can run code when loaded): convert it "
            "with transformers, AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)"
        )
    else:
        raise ExportError(f"{hf_dir} holds neither {HF_WEIGHTS} nor {HF_INDEX}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for missing or torn files
            raise ExportError(
                f"{file} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
    return state
