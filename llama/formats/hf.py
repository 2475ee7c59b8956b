"""Hugging Face Llama folders in and out: :func:`export_hf` writes a checkpoint as a ``LlamaForCausalLM`` folder
that ``transformers`` loads unchanged, :func:`import_hf` / :func:`import_to_checkpoint` read one back.

The command line is :mod:`llama.export`; its help says what each direction writes."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.chat_template import IM_END
from engine.tokenizer import Tokenizer, TokenizerError, load_tokenizer, tokenizer_mismatch

from ..lora import adapter_state_dict
from ..model import Llama, LlamaConfig, ModelOptions
from ..precision import DTYPES
from ..training import adapters
from ..training import checkpoint as ckpt
from .hf_io import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_WEIGHTS,
    LLAMA_ARCHITECTURE,
    ExportError,
    check_output,
    generation_config,
    publish_directory,
    read_hf_weights,
    read_json,
    read_llama_config,
    write_json,
)
from .peft import load_peft_adapter, save_peft_adapter

log = logging.getLogger(__name__)

HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: fp32 by default: bit-identical to the checkpoint, and these models are small (a 160M one is 640 MB).
DEFAULT_DTYPE = "fp32"
FP16_MAX = torch.finfo(torch.float16).max
TOKENIZER_CONFIG = "tokenizer_config.json"


# ---------------------------------------------------------------- export


def _model_config(saved: dict[str, Any] | None, checkpoint: Path) -> LlamaConfig:
    """The :class:`LlamaConfig` a checkpoint's ``config.json`` describes."""
    try:
        return LlamaConfig.from_saved(saved, str(checkpoint / ckpt.CONFIG_FILE))
    except ValueError as e:
        raise ExportError(str(e)) from None


def resolve_tokenizer(
    reference: dict[str, Any] | None, tokenizer_dir: str | os.PathLike[str] | None, checkpoint: Path
) -> Tokenizer:
    """The checkpoint's tokenizer: ``tokenizer_dir`` or the path it names, refused if its sha256 differs."""
    reference = reference or {}
    ref_path, ref_sha = reference.get("path"), reference.get("sha256")
    if tokenizer_dir is None:
        if not ref_path:
            raise ExportError(
                f"{checkpoint} names no tokenizer: pass --tokenizer DIR (the one its corpus was packed with)"
            )
        if not Path(ref_path).exists():
            raise ExportError(
                f"the tokenizer {ref_path} named by {checkpoint} is gone: pass --tokenizer DIR with the "
                f"same tokenizer (sha256 {ref_sha})"
            )
        tokenizer_dir = ref_path
    tokenizer = load_tokenizer(tokenizer_dir)
    refusal = tokenizer_mismatch(
        reference,
        {"path": tokenizer_dir, "sha256": tokenizer.sha256},
        owner=str(checkpoint),
        other="the tokenizer given",
        fix="pass the tokenizer its corpus was packed with",
    )
    if refusal:
        raise ExportError(refusal)
    if not ref_sha:
        log.warning(
            "%s records no tokenizer sha256: cannot check that %s is the one it was trained with",
            checkpoint,
            tokenizer_dir,
        )
    return tokenizer


def checkpoint_weights(checkpoint: Path, saved: dict[str, Any], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights on CPU: its own file, or for a LoRA run its base's with the adapters merged."""
    if not saved.get("lora"):
        return ckpt.read_model_state(checkpoint)
    model = adapters.load_weights(checkpoint, saved, Llama(config, ModelOptions(kernels="torch")))
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def hf_state_dict(
    checkpoint: Path, saved: dict[str, Any], config: LlamaConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under HF's names, checked against ``config``, cast to ``dtype``, tied lm_head
    dropped."""
    with torch.device("meta"):  # names and shapes only: nothing is allocated or initialised
        expected = {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}
    state = checkpoint_weights(checkpoint, saved, config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{checkpoint / ckpt.MODEL_FILE} does not fit its own config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): the checkpoint is damaged"
        )
    wrong = next((n for n, shape in expected.items() if tuple(state[n].shape) != shape), None)
    if wrong is not None:
        raise ExportError(
            f"{checkpoint / ckpt.MODEL_FILE}: {wrong} has shape {tuple(state[wrong].shape)}, its "
            f"config.json says {expected[wrong]}: the checkpoint is damaged"
        )
    if config.tie_embeddings:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise ExportError(f"{checkpoint} says tie_embeddings but stores an lm_head unlike its embeddings")
        del state["lm_head.weight"]  # transformers ties it back from tie_word_embeddings, as save_pretrained expects
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ExportError(f"{checkpoint}: {name} holds NaN or inf: export an earlier checkpoint")
        biggest = tensor.abs().max().item() if tensor.numel() else 0.0
        if dtype == torch.float16 and biggest > FP16_MAX:
            raise ExportError(
                f"{name} holds |w| = {biggest:.3g}, beyond fp16's range: export with --dtype bf16 or fp32"
            )
    return {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}


def hf_config(config: LlamaConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for ``transformers.LlamaForCausalLM`` (v4 and v5 both read these keys)."""
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        **config.to_hf_config(),
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": pad_id,
        "dtype": HF_DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def export_hf(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    merge_lora: bool = False,
) -> Path:
    """Write ``checkpoint_dir``'s model (a step folder, or a run's ``--out-dir`` for its newest) as a Hugging Face
    Llama folder ``out_dir`` with its tokenizer; return ``out_dir``. A LoRA run's checkpoint is written as its
    adapters in PEFT's layout, or with ``merge_lora`` as a plain model (base + adapters). See the module
    docstring."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    checkpoint = ckpt.find_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise ExportError(
            f"no checkpoint in {checkpoint_dir}: give a step_N folder, a training --out-dir, "
            "or a folder written by --from-hf"
        )
    out = Path(out_dir)
    if out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents:
        raise ExportError(f"--out {out} holds the checkpoint {checkpoint} being exported: choose another folder")
    check_output(out, overwrite)
    saved = ckpt.read_config(checkpoint)
    config = _model_config(saved.get("model"), checkpoint)
    tokenizer = resolve_tokenizer(saved.get("tokenizer"), tokenizer_dir, checkpoint)
    tokenizer_path = Path(tokenizer.path).resolve()
    if out.resolve() == tokenizer_path or out.resolve() in tokenizer_path.parents:
        raise ExportError(f"--out {out} holds the tokenizer {tokenizer.path} being exported: choose another folder")
    if tokenizer.vocab_size > config.vocab_size:
        raise ExportError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size:,} ids, more than the model's "
            f"vocab_size {config.vocab_size:,}: it is not the tokenizer this model was trained with"
        )
    if merge_lora and not saved.get("lora"):
        raise ExportError(f"{checkpoint} has no LoRA adapters to merge: export it without --merge-lora")
    if saved.get("lora") and not merge_lora:
        return export_adapter(checkpoint, saved, config, tokenizer, out, overwrite)
    torch_dtype = DTYPES[dtype]
    state = hf_state_dict(checkpoint, saved, config, torch_dtype)
    im_end = tokenizer.token_to_id(IM_END)
    eos_ids = [tokenizer.eos_id] + ([im_end] if im_end is not None and im_end != tokenizer.eos_id else [])
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    with publish_directory(out, overwrite) as tmp:
        save_file(state, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / HF_CONFIG, hf_config(config, tokenizer, torch_dtype))
        write_json(tmp / HF_GENERATION_CONFIG, generation_config(tokenizer.bos_id, eos_ids, pad_id))
        tokenizer.save_pretrained(tmp)
        tokenizer_config = read_json(tmp / TOKENIZER_CONFIG)
        tokenizer_config["model_max_length"] = config.max_seq_len  # the model's context, not the tokenizer's default
        write_json(tmp / TOKENIZER_CONFIG, tokenizer_config)
    log.info(
        "exported %s (%s parameters, %s, vocab %s) to %s",
        checkpoint,
        f"{sum(t.numel() for t in state.values()):,}",
        dtype,
        f"{config.vocab_size:,}",
        out,
    )
    return out


def export_adapter(
    checkpoint: Path, saved: dict[str, Any], config: LlamaConfig, tokenizer: Tokenizer, out: Path, overwrite: bool
) -> Path:
    """A LoRA run's adapters as a PEFT adapter folder (with the tokenizer), to load onto its exported base."""
    model, lora, base = adapters.adapted_model(checkpoint, saved, Llama(config, ModelOptions(kernels="torch")))
    with publish_directory(out, overwrite) as tmp:
        save_peft_adapter(model, lora, tmp, base_model=str(base))
        tokenizer.save_pretrained(tmp)
    log.info(
        "wrote the adapters of %s (%s) in PEFT's layout to %s. Their base is %s: export it with `python -m "
        "llama.export --ckpt %s --out BASE_HF`, then peft.PeftModel.from_pretrained(AutoModelForCausalLM."
        "from_pretrained(BASE_HF), %r); or write one merged model with --merge-lora",
        checkpoint,
        lora.describe(),
        out,
        base,
        base,
        str(out),
    )
    return out


# ---------------------------------------------------------------- import


def import_hf(hf_dir: str | os.PathLike[str], kernels: str = "auto") -> tuple[Llama, LlamaConfig]:
    """A Hugging Face ``LlamaForCausalLM`` folder as our :class:`Llama` (float32, eval mode) and its config."""
    hf_dir = Path(hf_dir)
    hf = read_llama_config(hf_dir)
    try:
        config = LlamaConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{hf_dir / HF_CONFIG} describes a Llama this code cannot build: {e}") from None
    state = {name: t for name, t in read_hf_weights(hf_dir).items() if not name.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:  # lm_head is the embedding matrix, stored or not (transformers ignores a stored one)
        head = state.pop("lm_head.weight", None)
        embed = state.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            log.warning(
                "%s: tie_word_embeddings is set, so the stored lm_head.weight is ignored (as transformers does)", hf_dir
            )
        if embed is not None:
            state["lm_head.weight"] = embed
    model = Llama(config, ModelOptions(kernels=kernels))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"the weights in {hf_dir} do not fit its {HF_CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    wrong = next((n for n, t in expected.items() if t.shape != state[n].shape), None)
    if wrong is not None:
        raise ExportError(
            f"{hf_dir}: {wrong} has shape {tuple(state[wrong].shape)}, its {HF_CONFIG} says "
            f"{tuple(expected[wrong].shape)}"
        )
    model.load_state_dict(state)  # copies, so bf16/fp16 weights become our float32 master weights
    return model.eval(), config


def _tokenizer_reference(hf_dir: Path, vocab_size: int) -> dict[str, Any]:
    """``{"path", "sha256"}`` of the tokenizer saved beside the weights, or Nones when there is none we can read."""
    if not any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        log.warning("%s has no tokenizer: pack the corpus with the tokenizer this model was trained with", hf_dir)
        return {"path": None, "sha256": None}
    try:
        tokenizer = load_tokenizer(hf_dir)
    except TokenizerError as e:
        log.warning("the tokenizer in %s cannot be read (%s); none recorded", hf_dir, e)
        return {"path": None, "sha256": None}
    if tokenizer.vocab_size > vocab_size:
        log.warning(
            "the tokenizer in %s has %d ids, more than the model's %d", hf_dir, tokenizer.vocab_size, vocab_size
        )
    return {"path": str(hf_dir.resolve()), "sha256": tokenizer.sha256}


def save_init_checkpoint(
    model: Llama,
    config: LlamaConfig,
    out_dir: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` in :mod:`llama.checkpoint`'s layout (no ``trainer.pt``): weights
    to start a run from, read by ``find_checkpoint``, ``read_config`` and ``load_model_weights``."""
    out = Path(out_dir)
    if (extra or {}).get("lora"):  # a LoRA checkpoint holds its adapters; its base is named in config.json
        tensors, aliases = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}, {}
    else:
        tensors, aliases = ckpt.unique_tensors(model.state_dict(), ckpt.tied_parameters(model))
    meta = {
        "format": ckpt.FORMAT,
        "kind": "init",
        "model": dataclasses.asdict(config),
        "train": None,
        "step": 0,
        "tokens": 0,
        **(extra or {}),
    }
    with publish_directory(out, overwrite) as tmp:
        ckpt.write_model_file(tmp / ckpt.MODEL_FILE, tensors, aliases)  # the same bytes for the same weights
        write_json(tmp / ckpt.CONFIG_FILE, meta)
    return out


def import_to_checkpoint(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Import ``hf_dir`` and save it as a weights-only checkpoint folder ``out_dir`` (see
    :func:`save_init_checkpoint`)."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.resolve() == hf_dir.resolve() or out.resolve() in hf_dir.resolve().parents:
        raise ExportError(f"--out {out} holds the model {hf_dir} being imported: choose another folder")
    check_output(out, overwrite)
    model, config = import_hf(hf_dir)
    extra = {
        "tokenizer": _tokenizer_reference(hf_dir, config.vocab_size),
        "source": {"hf_dir": str(hf_dir.resolve()), "architectures": [LLAMA_ARCHITECTURE]},
    }
    save_init_checkpoint(model, config, out, extra, overwrite)
    log.info(
        "imported %s (%s parameters, %d layers x %d dim, vocab %s) to %s; train from it with "
        "python -m llama.pretrain --init %s --out-dir NEW_DIR",
        hf_dir,
        f"{model.num_params():,}",
        config.n_layers,
        config.dim,
        f"{config.vocab_size:,}",
        out,
        out,
    )
    return out


def import_peft_adapter(
    adapter_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """A PEFT LoRA adapter trained elsewhere on the export of our checkpoint ``base_dir``, saved as a LoRA checkpoint
    of ours in ``out_dir`` (its adapters; the base named by path and sha256), which chat, evaluate, generate, export
    and ``--init`` take like any LoRA run."""
    base = ckpt.find_checkpoint(base_dir)
    if base is None:
        raise ExportError(f"--base {base_dir}: no checkpoint there (the one whose export the adapter was trained on)")
    out = Path(out_dir)
    check_output(out, overwrite)
    saved = ckpt.read_config(base)
    config = _model_config(saved.get("model"), base)
    model = adapters.load_weights(base, saved, Llama(config, ModelOptions(kernels="torch")))
    lora = load_peft_adapter(model, adapter_dir)
    extra = {
        "tokenizer": saved.get("tokenizer"),
        "task": saved.get("task"),
        "lora": adapters.lora_record(lora, base),
        "source": {"peft_adapter": str(Path(adapter_dir).resolve())},
    }
    save_init_checkpoint(model, config, out, extra, overwrite)
    log.info("imported the PEFT adapter %s (%s) on %s to %s", adapter_dir, lora.describe(), base, out)
    return out


# ---------------------------------------------------------------- command line
