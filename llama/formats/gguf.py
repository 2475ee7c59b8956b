"""GGUF out: :func:`export_gguf` writes a checkpoint as one ``.gguf`` file that llama.cpp, Ollama and
``transformers`` (``gguf_file=``) load, with an Ollama ``Modelfile`` beside it.

The file is written with ``gguf``, llama.cpp's own Python writer: architecture ``llama`` and its hyperparameters,
tensors under llama.cpp's names (``gguf.tensor_mapping``), and the tokenizer as metadata. Three things differ from
our Hugging Face export:

- **q/k rows are permuted.** We (and HF) rotate the two halves of each head (``rotate_half``); llama.cpp's
  ``llama`` graph rotates adjacent pairs ``(2i, 2i+1)``. :func:`to_interleaved_rope` reorders each head's rows
  so that both compute the same attention; a GQA model's ``k_proj`` is reordered per KV head.
- **The tokenizer is metadata.** A SentencePiece BPE is written as llama.cpp's ``llama`` vocabulary (pieces,
  scores, token types); a Hugging Face byte-level BPE as its ``gpt2`` vocabulary (pieces, merges, a named
  pre-tokenizer). llama.cpp defaults differ from ours, so the flags are written explicitly: no BOS/EOS added,
  no dummy-prefix space, whitespace kept. ``<|im_end|>`` is the end-of-turn token; the chat markers are control
  tokens (not printed by llama.cpp), ``<think>``/``</think>`` user-defined ones (printed, matched in text). A
  tokenizer llama.cpp would tokenize otherwise (a SentencePiece Unigram, a normalization rule, another
  pre-tokenizer) is refused in one line, never written wrong.
- **Precision** is ``--gguf-type``: ``f16``, ``q8_0`` or ``q4_0`` (``gguf.quants``) for the matrices; norms stay
  float32, as llama.cpp's converter keeps them. A matrix whose rows are not a multiple of the 32-wide quant block
  stays f16; under ``q4_0`` the output matrix (the embedding when tied) is ``q8_0``, since the logits suffer most
  from 4 bits (llama-quantize keeps it at 6 bits; gguf-py quantizes no 6-bit type).

RoPE: plain, ``linear`` and ``yarn`` scaling are written as llama.cpp reads them; ``dynamic`` (NTK) has no GGUF
form and is refused. Files are built under a temporary name and renamed: an interrupted export leaves the
previous file or none.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import publish
from engine.chat_template import IM_END, IM_START
from engine.tokenizer import Tokenizer
from engine.tokenizer.hf_export import BPE_MODEL_TYPE, hf_configs
from engine.tokenizer.spec import CHAT_TOKENS

from ..model import LlamaConfig
from ..training import checkpoint as ckpt
from .hf import _model_config, hf_state_dict, resolve_tokenizer
from .hf_io import ExportError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0", "q4_0")
MODELFILE = "Modelfile"
QUANT_BLOCK = 32  # q8_0 and q4_0 quantize runs of 32 weights along a row
FP16_MAX = float(np.finfo(np.float16).max)
MARKER_TOKENS = (IM_START, IM_END)  # chat markers: control tokens in llama.cpp (matched in templates, not printed)

# GPT-2's split (what tokenizers' ByteLevel(use_regex=True) applies), written "gpt-2" for llama.cpp's pre-tokenizer.
GPT2_PRE = "gpt-2"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # a declared dependency; a broken environment still gets one line
        raise ExportError("the gguf package is missing: pip install 'gguf>=0.17,<1'") from None
    return gguf


# ---------------------------------------------------------------- weights


def to_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from HF's rotate-half layout (per head: all first halves, then all second halves) to llama.cpp's
    adjacent pairs: row ``i`` of a head's first half is followed by its partner ``i + head_dim/2``."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def from_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`to_interleaved_rope` (what a reader of the GGUF does to get HF's layout back)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tensor_type(gguf: Any, name: str, shape: tuple[int, ...], gguf_type: str, tied: bool) -> Any:
    """The GGML type a tensor is stored as (see the module docstring)."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return types.F32
    if gguf_type == "f16" or shape[-1] % QUANT_BLOCK:
        return types.F16
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if gguf_type == "q4_0" and not is_output:
        return types.Q4_0
    return types.Q8_0


def gguf_tensors(
    state: dict[str, torch.Tensor], config: LlamaConfig, gguf_type: str
) -> list[tuple[str, np.ndarray, Any]]:
    """``(gguf name, data, GGML type)`` of every weight: named by llama.cpp's map, q/k permuted, cast/quantized."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    out = []
    fallback = []
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"{hf_name} has no llama.cpp name: this checkpoint holds a weight GGUF's llama lacks")
        weight = tensor.float()
        if hf_name.endswith("self_attn.q_proj.weight"):
            weight = to_interleaved_rope(weight, config.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            weight = to_interleaved_rope(weight, config.kv_heads)
        qtype = _tensor_type(gguf, name, tuple(weight.shape), gguf_type, config.tie_embeddings)
        data = weight.numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            data = data.astype(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
            if gguf_type != "f16":
                fallback.append(name)
        else:
            data = gguf.quants.quantize(data, qtype)
        out.append((name, data, qtype))
    if fallback:
        log.warning(
            "%d matrices have rows not a multiple of %d and stay f16: %s", len(fallback), QUANT_BLOCK, fallback[:3]
        )
    return out


# ---------------------------------------------------------------- architecture


def check_architecture(config: LlamaConfig) -> None:
    """Refuse in one line what llama.cpp's ``llama`` cannot run as we do."""
    scaling = config.rope_scaling
    if scaling is None:
        return
    if scaling["type"] == "dynamic":
        raise ExportError(
            "rope_scaling 'dynamic' (NTK-aware, the base following the input length) has no GGUF form: llama.cpp "
            "knows linear and yarn; export without it or retrain/convert to one of those"
        )
    if scaling["type"] == "yarn":
        default = 0.1 * math.log(scaling["factor"]) + 1.0
        given = scaling.get("attention_factor")
        if given is not None and not math.isclose(given, default, rel_tol=1e-6):
            raise ExportError(
                f"rope_scaling yarn attention_factor {given} differs from YaRN's 0.1*ln(factor)+1 = {default:.6g}, "
                "which llama.cpp always uses: GGUF cannot express it"
            )


def write_hyperparameters(writer: Any, config: LlamaConfig, name: str, gguf_type: str) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[gguf_type]
    )
    if gguf_type != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling is not None and scaling["type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_seq_len"])
        writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])


# ---------------------------------------------------------------- tokenizer


@dataclass
class GGUFVocab:
    """A tokenizer as GGUF metadata: llama.cpp's ``tokenizer.ggml.*`` keys."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)


def _marker_type(gguf: Any, piece: str, default: int) -> int:
    token_type = gguf.TokenType
    if piece in MARKER_TOKENS:
        return int(token_type.CONTROL)
    if piece in CHAT_TOKENS:
        return int(token_type.USER_DEFINED)
    return default


def _sentencepiece_vocab(tokenizer: Tokenizer, proto: Any) -> GGUFVocab:
    """llama.cpp's ``llama`` vocabulary: a SentencePiece BPE (merges by piece score, byte fallback)."""
    gguf = _gguf()
    where = tokenizer.path
    if proto.trainer_spec.model_type != BPE_MODEL_TYPE:
        raise ExportError(
            f"{where} is a SentencePiece {'Unigram' if proto.trainer_spec.model_type == 1 else 'non-BPE'} model: "
            "llama.cpp's llama tokenizer merges pieces like a BPE and would split text otherwise"
        )
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap:
        raise ExportError(
            f"{where} normalizes text with the rule {norm.name or 'a precompiled map'!r} (NFKC…), which llama.cpp's "
            "llama tokenizer does not apply: a GGUF would tokenize otherwise (a tokenizer trained here uses identity)"
        )
    tokens, types, scores = [], [], []
    for piece in proto.pieces:
        tokens.append(piece.piece)
        types.append(_marker_type(gguf, piece.piece, int(piece.type)))  # SentencePiece's type numbers are GGUF's
        scores.append(float(piece.score))
    return GGUFVocab("llama", "default", tokens, types, scores)


def _byte_level_pre(pre: Any, normalizer: Any, where: Path) -> str:
    """llama.cpp's name for a byte-level tokenizer.json's pre-tokenization; one-line refusal for any other."""
    if normalizer:
        raise ExportError(
            f"{where} normalizes text ({normalizer.get('type')}) before its byte-level BPE; llama.cpp's gpt2 "
            "tokenizer does not: a GGUF would tokenize otherwise"
        )
    if (
        isinstance(pre, dict)
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    ):
        return GPT2_PRE
    raise ExportError(
        f"{where} pre-tokenizes with {_describe(pre)}; only a plain ByteLevel (GPT-2's split, no prefix space) is "
        "written to GGUF here, as llama.cpp names pre-tokenizers by their regex"
    )


def _describe(pre: Any) -> str:
    if not isinstance(pre, dict):
        return "nothing" if pre is None else repr(pre)
    inner = pre.get("pretokenizers")
    return f"{pre.get('type')}[{', '.join(_describe(p) for p in inner)}]" if inner else str(pre.get("type"))


def _byte_level_vocab(tokenizer: Tokenizer, data: dict[str, Any]) -> GGUFVocab:
    """llama.cpp's ``gpt2`` vocabulary: a Hugging Face byte-level BPE (its merges, GPT-2's split)."""
    gguf = _gguf()
    where = tokenizer.path
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{where} is a Hugging Face {model.get('type')} tokenizer; GGUF takes a BPE here")
    decoder = data.get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    if not byte_level or model.get("byte_fallback"):
        raise ExportError(
            f"{where} is a Hugging Face BPE that is not byte-level (decoder {decoder.get('type')}): llama.cpp reads "
            "such a vocabulary only from SentencePiece; export with the tokenizer.model it came from"
        )
    pre = _byte_level_pre(data.get("pre_tokenizer"), data.get("normalizer"), where)
    tokens: list[str] = []
    types: list[int] = []
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_token(i)
        if i in added:
            default = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        else:
            default = gguf.TokenType.NORMAL
        tokens.append(piece)
        types.append(_marker_type(gguf, piece, int(default)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(" " in part for m in model.get("merges", []) if not isinstance(m, str) for part in m):
        raise ExportError(f"{where} has a merge of pieces holding a space, which GGUF's 'a b' merges cannot spell")
    return GGUFVocab("gpt2", pre, tokens, types, None, merges)


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The tokenizer as llama.cpp reads it, padded with unused ``[PADn]`` tokens to the model's ``vocab_size``."""
    gguf = _gguf()
    proto = tokenizer.sentencepiece_proto
    if proto is not None:
        vocab = _sentencepiece_vocab(tokenizer, proto)
    else:
        vocab = _byte_level_vocab(tokenizer, tokenizer.tokenizer_json or {})
    if len(set(vocab.tokens)) != len(vocab.tokens):
        raise ExportError(f"{tokenizer.path} has two ids with the same text, which a GGUF vocabulary cannot hold")
    for i in range(len(vocab.tokens), vocab_size):  # the model's embedding has rows past the tokenizer's last id
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(int(gguf.TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    return vocab


def write_tokenizer(writer: Any, tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.unk_id is not None:
        writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id)
    im_end = tokenizer.token_to_id(IM_END)
    if im_end is not None and im_end != tokenizer.eos_id:
        writer.add_eot_token_id(im_end)  # llama.cpp stops a reply at it (end of generation) like at EOS
    # llama.cpp's defaults are Llama 2's (BOS added, a dummy prefix space); ours are neither: see engine.tokenizer.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if vocab.model == "llama":
        writer.add_remove_extra_whitespaces(False)
    template = chat_template(tokenizer)
    if template is not None:
        writer.add_chat_template(template)


def chat_template(tokenizer: Tokenizer) -> str | None:
    """The Jinja chat template the HF export ships (the tokenizer's own, else ChatML when it has the markers)."""
    return hf_configs(tokenizer)[0].get("chat_template")


# ---------------------------------------------------------------- Ollama


OLLAMA_CHATML = """\
{{- range $i, $_ := .Messages }}
{{- if eq $i 0 }}{{ if $.System }}<|im_start|>system
{{ $.System }}<|im_end|>
{{ end }}{{ end }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def modelfile_text(gguf_name: str, tokenizer: Tokenizer, context: int, system: str | None) -> str:
    """An Ollama Modelfile for ``./gguf_name``: ChatML (the template our SFT renders), its stop tokens, the
    model's context, and the system prompt it was fine-tuned with (if any)."""
    lines = [f"FROM ./{gguf_name}"]
    has_markers = all(tokenizer.token_to_id(t) is not None for t in MARKER_TOKENS)
    if has_markers:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
    if system:
        if '"""' in system:
            raise ExportError('the system prompt holds """, which an Ollama Modelfile cannot quote: export without it')
        lines.append(f'SYSTEM """{system}"""')
    stops = [IM_END, IM_START] if has_markers else []
    stops.append(tokenizer.id_to_token(tokenizer.eos_id))
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    lines.append(f"PARAMETER num_ctx {context}")  # Ollama's default is longer than our models were trained on
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- export


def _write_atomic(final: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename onto ``final``; a failure or interrupt leaves no temporary behind."""
    tmp = publish.temporary_sibling(final)
    try:
        write(tmp)
        publish.fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_gguf(
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
    merge_lora: bool = False,
) -> Path:
    """Write ``checkpoint_dir``'s model (a step folder or a run's ``--out-dir``) as the GGUF file ``out_path`` and an
    Ollama ``Modelfile`` beside it; return ``out_path``. A LoRA run needs ``merge_lora`` (base + adapters in one
    model). See the module docstring."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    out = Path(out_path)
    if out.suffix != ".gguf":
        raise ExportError(f"--gguf {out} should end in .gguf (llama.cpp and Ollama look for that name)")
    modelfile = out.with_name(MODELFILE)
    for target in (out, modelfile):
        if target.exists() and not target.is_file():
            raise ExportError(f"{target} exists and is not a file: choose another --gguf path")
        if target.exists() and not overwrite:
            raise ExportError(f"{target} already exists: pass --overwrite to replace it, or choose another --gguf path")
    checkpoint = ckpt.find_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise ExportError(
            f"no checkpoint in {checkpoint_dir}: give a step_N folder, a training --out-dir, "
            "or a folder written by --from-hf"
        )
    if checkpoint.resolve() in out.resolve().parents:
        raise ExportError(f"--gguf {out} is inside the checkpoint {checkpoint} being exported: choose another path")
    saved = ckpt.read_config(checkpoint)
    config = _model_config(saved.get("model"), checkpoint)
    if merge_lora and not saved.get("lora"):
        raise ExportError(f"{checkpoint} has no LoRA adapters to merge: export it without --merge-lora")
    if saved.get("lora") and not merge_lora:
        raise ExportError(
            f"{checkpoint} is a LoRA run: a GGUF holds one plain model, so pass --merge-lora (base + adapters)"
        )
    check_architecture(config)
    tokenizer = resolve_tokenizer(saved.get("tokenizer"), tokenizer_dir, checkpoint)
    if tokenizer.vocab_size > config.vocab_size:
        raise ExportError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size:,} ids, more than the model's "
            f"vocab_size {config.vocab_size:,}: it is not the tokenizer this model was trained with"
        )
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    system = (saved.get("task") or {}).get("system")
    modelfile_body = modelfile_text(out.name, tokenizer, config.max_seq_len, system)
    state = hf_state_dict(checkpoint, saved, config, torch.float32)  # checked, finite, tied lm_head dropped
    if gguf_type == "f16":
        biggest = max((t.abs().max().item() for t in state.values() if t.dim() > 1 and t.numel()), default=0.0)
        if biggest > FP16_MAX:
            raise ExportError(f"a weight holds |w| = {biggest:.3g}, beyond f16's range: use --gguf-type q8_0")
    tensors = gguf_tensors(state, config, gguf_type)

    gguf = _gguf()
    name = re.sub(r"\s+", "-", checkpoint.parent.name if checkpoint.name.startswith("step_") else checkpoint.name)

    def write_gguf(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        write_hyperparameters(writer, config, name, gguf_type)
        write_tokenizer(writer, tokenizer, vocab)
        for tensor_name, data, qtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, write_gguf)
    _write_atomic(modelfile, lambda tmp: tmp.write_text(modelfile_body, encoding="utf-8"))
    log.info(
        "exported %s (%s parameters, %s, vocab %s, %s tokenizer) to %s (%.1f MB) and %s; run it with "
        "`ollama create NAME -f %s` or llama.cpp's `llama-cli -m %s`",
        checkpoint,
        f"{sum(t.numel() for t in state.values()):,}",
        gguf_type,
        f"{config.vocab_size:,}",
        vocab.model,
        out,
        out.stat().st_size / 1e6,
        modelfile.name,
        modelfile,
        out,
    )
    return out
