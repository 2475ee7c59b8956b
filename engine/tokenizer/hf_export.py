"""Hugging Face layout for a SentencePiece BPE: tokenizer.json that reproduces its encoding, configs, chat template.

SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the highest-scored piece
(leftmost on ties); HF's BPE merges the lowest-ranked pair (leftmost on ties). So every split ``left + right``
of a normal piece, with both halves pieces, becomes a merge ranked by that piece's score, and the two agree.
One difference stays: ``transformers`` matches "<s>", "</s>", "<unk>", "<pad>" typed inside a text as those
special tokens (its convention), where SentencePiece and our :class:`Tokenizer` keep them as characters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.chat_template import CHATML_TEMPLATE, CHATML_TEMPLATE_V1, IM_END, IM_START
from engine.publish import publish_directory, temporary_sibling

from .spec import CHAT_TOKENS, FACTS, FILE_DIGESTS, HF_CONFIG, HF_JSON, HF_SPECIAL_MAP, SP_MODEL, TokenizerError

if TYPE_CHECKING:
    from .core import Tokenizer

logger = logging.getLogger(__name__)

FACTS_FORMAT = "zhllm-tokenizer-v1"
DEFAULT_MODEL_MAX_LENGTH = 4096

# sentencepiece_model.proto, ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL_TYPE = 2


def bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """The merges, best first, that make HF's BPE encode like SentencePiece's BPE over ``proto``."""
    pieces = proto.pieces
    mergeable = {p.piece for p in pieces if p.type == NORMAL}  # frozen user symbols and bytes never merge
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        for k, cut in enumerate(range(1, len(p.piece))):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-p.score, i, k, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def tokenizer_json_from_proto(proto: Any) -> dict[str, Any]:
    """tokenizer.json content for a SentencePiece BPE model (with no dummy prefix, see core)."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    if proto.trainer_spec.model_type != BPE_MODEL_TYPE:
        raise TokenizerError("only SentencePiece BPE models can be exported to tokenizer.json (this one is not BPE)")
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.remove_extra_whitespaces:
        raise TokenizerError("export a model loaded through load_tokenizer (it turns the dummy prefix off)")
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next(p.piece for p in pieces if p.type == UNKNOWN)
    byte_fallback = any(p.type == BYTE for p in pieces)
    model = BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, byte_fallback=byte_fallback, fuse_unk=True)
    tok = HFTokenizer(model)
    steps = []
    if proto.normalizer_spec.precompiled_charsmap:  # a non-identity rule (nmt_nfkc…) ships as a compiled map
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control pieces and our chat markers are special (skipped by skip_special_tokens); other user symbols are not.
    special = [
        p.piece for p in pieces if p.type in (UNKNOWN, CONTROL) or (p.type == USER_DEFINED and p.piece in CHAT_TOKENS)
    ]
    plain = [p.piece for p in pieces if p.type == USER_DEFINED and p.piece not in CHAT_TOKENS]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return json.loads(tok.to_str())


def hf_configs(tok: "Tokenizer") -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` content."""
    named = {f"{role}_token": token for role, token in tok.special_tokens.items() if token is not None}
    extra = [t for t in CHAT_TOKENS if tok.token_to_id(t) is not None]
    template = tok.chat_template
    if template == CHATML_TEMPLATE_V1:  # saved before tool calls: the same ChatML, without tools
        template = CHATML_TEMPLATE
    if template is None and tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None:
        template = CHATML_TEMPLATE
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "add_bos_token": False,  # the packer adds BOS/EOS itself; HF's encode must equal ours
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": tok.model_max_length or DEFAULT_MODEL_MAX_LENGTH,
    }
    if template is not None:
        config["chat_template"] = template
    return config, {**named, "additional_special_tokens": extra}


def _file_contents(tok: "Tokenizer") -> dict[str, bytes]:
    dump = lambda obj: (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")  # noqa: E731
    files: dict[str, bytes] = {}
    proto = tok.sentencepiece_proto
    if proto is not None:
        files[SP_MODEL] = proto.SerializeToString()
        files[HF_JSON] = json.dumps(tokenizer_json_from_proto(proto), ensure_ascii=False).encode("utf-8")
    else:
        files[HF_JSON] = json.dumps(tok.tokenizer_json, ensure_ascii=False).encode("utf-8")
    config, special_map = hf_configs(tok)
    files[HF_CONFIG] = dump(config)
    files[HF_SPECIAL_MAP] = dump(special_map)
    special_ids = {role: tok.token_to_id(t) if t else None for role, t in tok.special_tokens.items()}
    special_ids.update({t: tok.token_to_id(t) for t in CHAT_TOKENS})
    own = ("format", "vocab_size", "sha256", "special_ids", FILE_DIGESTS)
    facts = {
        "format": FACTS_FORMAT,
        "vocab_size": tok.vocab_size,
        "sha256": tok.sha256,
        "special_ids": special_ids,
        **{k: v for k, v in tok.facts.items() if k not in own},
    }
    if SP_MODEL in files:  # load_tokenizer checks the pair cheaply when both are still these bytes
        facts[FILE_DIGESTS] = {name: hashlib.sha256(files[name]).hexdigest() for name in (SP_MODEL, HF_JSON)}
    files[FACTS] = dump(facts)
    return files


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_pretrained(tok: "Tokenizer", out_dir: Path) -> None:
    """Write the HF layout: a new folder appears whole (temporary folder, then rename); in an existing
    folder (a model export) each file is replaced atomically and other files are left alone."""
    files = _file_contents(tok)
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"{out_dir} exists and is not a folder: choose another output folder")
    if not out_dir.exists():
        with publish_directory(out_dir) as tmp:
            for name, data in files.items():
                _write(tmp / name, data)
    else:
        tmps = {name: temporary_sibling(out_dir / name) for name in files}
        try:
            for name, data in files.items():
                _write(tmps[name], data)
            for name in files:
                os.replace(tmps[name], out_dir / name)
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        # A stale tokenizer.model would be loaded in preference to the new tokenizer.json.
        for stale in (SP_MODEL,):
            if stale not in files and (out_dir / stale).exists():
                (out_dir / stale).unlink()
    logger.info("saved tokenizer (%d ids, sha256 %s) to %s", tok.vocab_size, tok.sha256[:12], out_dir)
