"""The :class:`Tokenizer` every engine stage uses, over a SentencePiece model or a Hugging Face ``tokenizer.json``.

Both backends behave the same way: ``encode`` never adds BOS/EOS and never a dummy-prefix space, so
``decode(encode(a) + encode(b)) == a + b`` (the SFT packer encodes chat segments one by one);
the chat markers (``<|im_start|>`` …) written in text become their single ids, while ``<s>``/``</s>``
written in text stay plain characters (a web page cannot inject an EOS). ``decode(encode(text)) == text``
for any text but one containing U+2581 "▁", SentencePiece's space marker, which decodes as a space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from .hf_export import save_pretrained
from .spec import (  # noqa: F401  (re-exported: the names the tokenizer modules share)
    CHAT_TOKENS,
    CONTROL_TOKENS,
    FACTS,
    HF_CONFIG,
    HF_JSON,
    HF_SPECIAL_MAP,
    SP_MODEL,
    SPECIAL_TOKENS,
    UNK_SURFACE,
    TokenizerError,
    tokenizer_mismatch,
)

logger = logging.getLogger(__name__)


class _SentencePieceBackend:
    """SentencePiece BPE/Unigram: the fast backend (about 2x HF tokenizers on Chinese)."""

    def __init__(self, proto: Any) -> None:
        import sentencepiece as spm

        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def piece_count(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.IdToPiece(i) if 0 <= i < self.sp.get_piece_size() else None


class _HuggingFaceBackend:
    """HF ``tokenizers`` from a tokenizer.json; control tokens named in ``controls`` behave as in SentencePiece."""

    def __init__(self, data: dict[str, Any], controls: Sequence[str]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.data = data
        vocab = data.get("model", {}).get("vocab")
        in_model = set(vocab) if isinstance(vocab, dict) else set()
        # A control token that is also a model piece is taken out of the added tokens so that "</s>" typed in a
        # text stays characters, as in SentencePiece; its id still decodes through the model vocab.
        runtime = dict(
            data,
            added_tokens=[
                t for t in data.get("added_tokens", []) if not (t["content"] in controls and t["content"] in in_model)
            ],
        )
        self.hf = HFTokenizer.from_str(json.dumps(runtime, ensure_ascii=False))
        self.control_ids = frozenset(i for t in controls if (i := self.hf.token_to_id(t)) is not None)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if num_threads <= 1:  # stay off HF's thread pool: packing workers are forked processes
            return [self.hf.encode(t, add_special_tokens=False).ids for t in texts]
        # Above one thread, HF's pool size is set by RAYON_NUM_THREADS, not per call.
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def piece_count(self) -> int:
        vocab = self.hf.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)


class Tokenizer:
    """A loaded tokenizer; create one with :func:`load_tokenizer` or :func:`engine.tokenizer.train_tokenizer`.

    ``path`` (what was loaded), ``vocab_size`` (max id + 1), ``unk_id``/``bos_id``/``pad_id`` (None when absent),
    ``eos_id`` (always), ``chat_template`` and ``sha256`` (the vocabulary's fingerprint) describe it.
    """

    def __init__(
        self,
        path: Path,
        backend: _SentencePieceBackend | _HuggingFaceBackend,
        specials: dict[str, str | None],
        chat_template: str | None = None,
        model_max_length: int | None = None,
        facts: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self._backend = backend
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.facts: dict[str, Any] = dict(facts or {})  # provenance written to zhllm_tokenizer.json
        self.vocab_size = backend.piece_count()
        self.special_tokens = specials  # role -> token text, for the HF config files
        ids = {role: (self.token_to_id(tok) if tok else None) for role, tok in specials.items()}
        self.unk_id, self.bos_id, self.pad_id = ids.get("unk"), ids.get("bos"), ids.get("pad")
        eos_id = ids.get("eos")
        if eos_id is None:
            raise TokenizerError(
                f"{path}: no EOS token found (the packer ends every document with it): "
                f"name it as eos_token in a {HF_CONFIG} beside the tokenizer"
            )
        self.eos_id: int = eos_id

    @property
    def backend(self) -> str:
        return "sentencepiece" if isinstance(self._backend, _SentencePieceBackend) else "tokenizers"

    @cached_property
    def sha256(self) -> str:
        """Fingerprint of the vocabulary: the pieces in id order (same from tokenizer.model or tokenizer.json)."""
        pieces = [self._backend.id_to_token(i) or "" for i in range(self.vocab_size)]
        return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; never adds BOS/EOS; chat markers written in the text become their single ids."""
        return self._backend.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._backend.encode_batch(list(texts), num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; BOS/EOS/pad decode to nothing, <unk> to " ⁇ " (as SentencePiece does)."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"id {bad} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})")
        if isinstance(self._backend, _SentencePieceBackend):
            return self._backend.decode(ids)
        parts, run = [], []
        for i in ids:
            if i == self.unk_id:
                parts.append(self._backend.decode(run) + UNK_SURFACE)
                run = []
            elif i not in self._backend.control_ids:
                run.append(i)
        return "".join(parts) + self._backend.decode(run)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        token = self._backend.id_to_token(int(i))
        if token is None:
            raise TokenizerError(f"id {i} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})")
        return token

    @property
    def sentencepiece_proto(self) -> Any | None:
        """The SentencePiece ModelProto behind this tokenizer (None for a tokenizer.json one)."""
        return self._backend.proto if isinstance(self._backend, _SentencePieceBackend) else None

    @property
    def tokenizer_json(self) -> dict[str, Any] | None:
        return self._backend.data if isinstance(self._backend, _HuggingFaceBackend) else None

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> None:
        """Write the Hugging Face layout (tokenizer.model, tokenizer.json, configs) atomically."""
        save_pretrained(self, Path(out_dir))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, backend={self.backend}, vocab_size={self.vocab_size})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}): re-save the tokenizer") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A config's special token: a string or an AddedToken dict ``{"content": …}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _sentencepiece_proto(data: bytes, where: Path) -> Any:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        proto.Clear()
    if not proto.pieces:
        raise TokenizerError(
            f"{where} is not a SentencePiece model: pass a tokenizer directory, a SentencePiece .model "
            "or a tokenizer.json"
        )
    return proto


def tokenizer_from_proto(
    proto: Any, path: Path, config: dict[str, Any] | None = None, facts: dict[str, Any] | None = None
) -> Tokenizer:
    """A SentencePiece-backed Tokenizer; the dummy prefix and whitespace folding are turned off (see module doc)."""
    facts = dict(facts or {})
    norm = proto.normalizer_spec
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        # Both would break decode(encode(a) + encode(b)) == a + b, which chat packing relies on.
        logger.debug("%s: dummy prefix / whitespace folding turned off", path)
        facts.setdefault(
            "normalization_changed",
            {
                "add_dummy_prefix": bool(norm.add_dummy_prefix),
                "remove_extra_whitespaces": bool(norm.remove_extra_whitespaces),
            },
        )
        norm.add_dummy_prefix = False
        norm.remove_extra_whitespaces = False
    backend = _SentencePieceBackend(proto)
    sp = backend.sp
    name = lambda i: sp.IdToPiece(i) if i >= 0 else None  # noqa: E731
    specials = {"unk": name(sp.unk_id()), "bos": name(sp.bos_id()), "eos": name(sp.eos_id()), "pad": name(sp.pad_id())}
    config = config or {}
    for role in specials:  # a config may name another EOS (say <|im_end|>); it must be in the vocabulary
        token = _token_text(config.get(f"{role}_token"))
        if token is not None and (sp.PieceToId(token) != sp.unk_id() or token == specials["unk"]):
            specials[role] = token
    return Tokenizer(path, backend, specials, config.get("chat_template"), config.get("model_max_length"), facts)


def tokenizer_from_json(
    data: dict[str, Any], path: Path, config: dict[str, Any] | None = None, facts: dict[str, Any] | None = None
) -> Tokenizer:
    """A tokenizers-backed Tokenizer from parsed tokenizer.json ``data``."""
    config = config or {}
    model = data.get("model")
    if not isinstance(model, dict) or "vocab" not in model:
        raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json (no model.vocab)")
    known = set(model["vocab"]) | {t.get("content") for t in data.get("added_tokens", [])}
    guesses = {
        "unk": [model.get("unk_token"), "<unk>"],
        "bos": ["<s>", "<|begin_of_text|>", "<bos>"],
        "eos": ["</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"],
        "pad": ["<pad>"],
    }
    specials: dict[str, str | None] = {}
    for role, candidates in guesses.items():
        named = _token_text(config.get(f"{role}_token"))
        options = [named] if named is not None else candidates
        specials[role] = next((t for t in options if t in known), None)
    controls = [t for t in specials.values() if t is not None]
    try:
        backend = _HuggingFaceBackend(data, controls)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise TokenizerError(f"{path}: Hugging Face tokenizers cannot load it ({e})") from None
    return Tokenizer(path, backend, specials, config.get("chat_template"), config.get("model_max_length"), facts)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer folder, a SentencePiece ``.model`` or a ``tokenizer.json``.

    A folder's tokenizer.model (SentencePiece, the faster backend) is preferred to its tokenizer.json; the
    folder's tokenizer_config.json names the special tokens and the chat template.

    Cheap (tens of milliseconds for a 64k vocabulary): packing workers call it once per process.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"{path} does not exist: pass a tokenizer directory (made by `python -m engine.tokenizer train`), "
            "a SentencePiece .model or a tokenizer.json"
        )
    folder = path if path.is_dir() else path.parent
    config = _read_json(folder / HF_CONFIG) if (folder / HF_CONFIG).is_file() else {}
    facts = _read_json(folder / FACTS) if (folder / FACTS).is_file() else {}
    if path.is_dir():
        if (path / SP_MODEL).is_file():
            file = path / SP_MODEL
        elif (path / HF_JSON).is_file():
            file = path / HF_JSON
        else:
            raise TokenizerError(
                f"{path} holds neither {SP_MODEL} nor {HF_JSON}: train one with `python -m engine.tokenizer train`"
            )
    else:
        file = path
        if file.name not in (SP_MODEL, HF_JSON):  # a lone file: its folder's config may describe something else
            config, facts = {}, {}
    if file.suffix == ".json":
        return tokenizer_from_json(_read_json(file), path, config, facts)
    return tokenizer_from_proto(_sentencepiece_proto(file.read_bytes(), file), path, config, facts)
