"""The :class:`Tokenizer` every engine stage uses, over a SentencePiece model or a Hugging Face ``tokenizer.json``.

Both backends behave the same way: ``encode`` never adds BOS/EOS and never a dummy-prefix space, so
``decode(encode(a) + encode(b)) == a + b`` (the SFT packer encodes chat segments one by one);
the chat markers (``<|im_start|>`` …) written in text become their single ids, while ``<s>``/``</s>``
written in text stay plain characters (a web page cannot inject an EOS). ``decode(encode(text)) == text``
for any text but one containing U+2581 "▁", SentencePiece's space marker, which decodes as a space.

A ``tokenizer.json``'s added tokens, and the pieces its ``tokenizer_config.json`` declares as added or special
tokens (``transformers`` adds those on load), are matched inside text as ``transformers`` matches them, with one
exception: a special token (unk/bos/eos/pad) that the model vocabulary also holds as a piece stays plain
characters, as in SentencePiece (``<s>``, ``</s>``, MiniMind's ``<|endoftext|>``), unless it
is a chat marker of :data:`CHAT_TOKENS` (MiniMind names ``<|im_start|>``/``<|im_end|>`` its BOS/EOS: they stay
single ids, so its chat data packs). A special token that exists only as an added token (no piece to fall back
on, as Qwen's ``<|endoftext|>``) is matched, as in ``transformers``. Decoding drops the special tokens that are
not chat markers; a chat marker decodes as its text in both backends.

A folder holding both ``tokenizer.model`` (loaded, the faster backend) and ``tokenizer.json`` (what
``transformers`` loads) is checked as a whole: the tokenizer.json must parse and hold the same pieces in the
same order, else :func:`load_tokenizer` refuses the folder instead of a later export or chat failing.
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
    FILE_DIGESTS,
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
    """HF ``tokenizers`` from a tokenizer.json; control tokens named in ``controls`` behave as in SentencePiece
    (not matched in text when the model vocab holds them, dropped by decode); other added tokens match as in HF."""

    def __init__(self, data: dict[str, Any], controls: Sequence[str], declared: Sequence[dict[str, Any]] = ()) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.data = data
        pieces = _model_pieces(data) or []
        in_model = set(pieces)
        # A control token that is also a model piece is taken out of the added tokens so that "</s>" typed in a
        # text stays characters, as in SentencePiece; its id still decodes through the model vocab.
        added = [t for t in data.get("added_tokens", []) if not (t["content"] in controls and t["content"] in in_model)]
        # transformers also adds the model pieces its tokenizer_config.json declares (``declared``): match those too.
        have = {t["content"] for t in data.get("added_tokens", [])} | set(controls)
        wanted = {t["content"]: t for t in declared if t["content"] in in_model and t["content"] not in have}
        added += [_added_token(i, wanted[p]) for i, p in enumerate(pieces) if p in wanted]
        self.hf = HFTokenizer.from_str(json.dumps(dict(data, added_tokens=added), ensure_ascii=False))
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


def _added_token(token_id: int, entry: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer.json ``added_tokens`` entry for piece ``token_id`` declared as ``entry`` (an AddedToken dict)."""
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    return {"id": token_id, "content": entry["content"], **{k: bool(entry.get(k, v)) for k, v in flags.items()}}


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


def _read_json(path: Path, fix: str = "re-save the tokenizer") -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise TokenizerError(f"{path} is not valid JSON ({_one_line(e)}): {fix}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object: {fix}")
    return data


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _model_pieces(data: dict[str, Any]) -> list[str] | None:
    """The model vocabulary of parsed tokenizer.json ``data`` in id order ("" for an unused id); None if it has none.

    BPE/WordPiece store ``{piece: id}``, Unigram ``[[piece, score], …]``."""
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, list):
        return [entry[0] if isinstance(entry, list) and entry else "" for entry in vocab]
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
        return None
    pieces = [""] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        pieces[i] = piece
    return pieces


def _pieces_by_id(data: dict[str, Any]) -> list[str] | None:
    """Every piece of tokenizer.json ``data`` in id order, added tokens included (what ``Tokenizer.sha256`` hashes)."""
    pieces = _model_pieces(data)
    if pieces is None:
        return None
    for token in data.get("added_tokens", []):
        i, content = token.get("id"), token.get("content")
        if isinstance(i, int) and i >= 0 and isinstance(content, str):
            pieces.extend([""] * (i + 1 - len(pieces)))
            pieces[i] = content
    return pieces


def _token_text(value: Any) -> str | None:
    """A config's special token: a string or an AddedToken dict ``{"content": …}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _declared_tokens(config: dict[str, Any], specials: dict[str, str | None]) -> list[dict[str, Any]]:
    """The tokens a tokenizer_config.json declares, which ``transformers`` adds as added tokens on load: its
    ``added_tokens_decoder``, ``additional_special_tokens`` / ``extra_special_tokens`` and the named specials."""
    declared: list[Any] = []
    decoder = config.get("added_tokens_decoder")
    declared += list(decoder.values()) if isinstance(decoder, dict) else []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        declared += list(extra.values()) if isinstance(extra, dict) else extra if isinstance(extra, list) else []
    declared += list(specials.values())
    entries = [value if isinstance(value, dict) else {"content": value} for value in declared]
    return [entry for entry in entries if isinstance(entry.get("content"), str)]


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
    pieces = _model_pieces(data)
    if not isinstance(model, dict) or pieces is None:
        raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json (no model.vocab)")
    known = set(pieces) | {t.get("content") for t in data.get("added_tokens", [])}
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
    # Chat markers named as specials (MiniMind: bos <|im_start|>, eos <|im_end|>) stay matched in text (module doc).
    controls = [t for t in specials.values() if t is not None and t not in CHAT_TOKENS]
    try:
        backend = _HuggingFaceBackend(data, controls, _declared_tokens(config, specials))
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise TokenizerError(f"{path}: Hugging Face tokenizers cannot load it ({_one_line(e)})") from None
    return Tokenizer(path, backend, specials, config.get("chat_template"), config.get("model_max_length"), facts)


CONFIG_FIX = "restore it from the tokenizer's source, or delete it (special tokens and chat template then use defaults)"
FACTS_FIX = "delete it (it only records where the tokenizer came from) or re-save the tokenizer"
# Folders whose files were found consistent in this process, by (path, size, mtime) of tokenizer.json and .model.
_consistent_folders: set[tuple[tuple[str, int, int], ...]] = set()


def _resave_hint(folder: Path, source: str = SP_MODEL) -> str:
    """How to rewrite a folder's other files from ``source`` (what load_tokenizer reads once the bad file is gone)."""
    quoted = repr(str(folder))
    return (
        f"delete it and re-save the folder from {source}: "
        f'python -c "from engine.tokenizer import load_tokenizer as t; t({quoted}).save_pretrained({quoted})"'
    )


def _file_stats(*files: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


def check_folder(folder: Path, model_bytes: bytes, proto: Any, facts: dict[str, Any]) -> None:
    """Refuse a folder whose tokenizer.json (what ``transformers`` loads) does not parse, does not hold the pieces
    of its tokenizer.model (``model_bytes``, parsed as ``proto``) in the same order, or cannot be loaded.

    A few milliseconds for a folder we saved (its zhllm_tokenizer.json records both files' sha256); another one is
    parsed and loaded by ``tokenizers`` once per process (about 0.2 s for 64k pieces), then remembered by file
    size and mtime (packing workers are forked after the main process loaded the tokenizer)."""
    json_path = folder / HF_JSON
    if not json_path.is_file():
        return
    key = _file_stats(json_path, folder / SP_MODEL)
    if key in _consistent_folders:
        return
    raw = json_path.read_bytes()
    recorded = facts.get(FILE_DIGESTS)
    saved_together = (
        isinstance(recorded, dict)
        and recorded.get(SP_MODEL) == hashlib.sha256(model_bytes).hexdigest()
        and recorded.get(HF_JSON) == hashlib.sha256(raw).hexdigest()
    )
    if not saved_together:
        _check_json_matches(json_path, raw, [p.piece for p in proto.pieces], _resave_hint(folder))
    _consistent_folders.add(key)


def _check_json_matches(json_path: Path, raw: bytes, expected: list[str], fix: str) -> None:
    """Refuse ``raw`` (a tokenizer.json) unless it parses, holds the pieces ``expected`` in order and loads."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        data = json.loads(raw)
    except ValueError as e:
        raise TokenizerError(f"{json_path} is not valid JSON ({_one_line(e)}): {fix}") from None
    pieces = _pieces_by_id(data) if isinstance(data, dict) else None
    if pieces is None:
        raise TokenizerError(f"{json_path} is not a Hugging Face tokenizer.json (no model.vocab): {fix}")
    if pieces != expected:
        first = next((i for i, (a, b) in enumerate(zip(pieces, expected)) if a != b), min(len(pieces), len(expected)))
        raise TokenizerError(
            f"{json_path} holds another vocabulary than the {SP_MODEL} beside it ({len(pieces):,} vs "
            f"{len(expected):,} pieces, first difference at id {first}), and transformers would load it: {fix} "
            f"(or delete the {SP_MODEL} if the tokenizer.json is the right one)"
        )
    try:
        HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise TokenizerError(f"{json_path}: Hugging Face tokenizers cannot load it ({_one_line(e)}): {fix}") from None


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer folder, a SentencePiece ``.model`` or a ``tokenizer.json``.

    A folder's tokenizer.model (SentencePiece, the faster backend) is preferred to its tokenizer.json; the
    folder's tokenizer_config.json names the special tokens and the chat template. A folder is checked as a
    whole (:func:`check_folder`); a file passed by name is not.

    Cheap (tens of milliseconds for a 64k vocabulary): packing workers call it once per process.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"{path} does not exist: pass a tokenizer directory (made by `python -m engine.tokenizer train`), "
            "a SentencePiece .model or a tokenizer.json"
        )
    file = _folder_file(path) if path.is_dir() else path
    # A lone file of another name: its folder's config may describe something else.
    folder = file.parent if path.is_dir() or file.name in (SP_MODEL, HF_JSON) else None
    config = _read_json(folder / HF_CONFIG, CONFIG_FIX) if folder and (folder / HF_CONFIG).is_file() else {}
    facts = _read_json(folder / FACTS, FACTS_FIX) if folder and (folder / FACTS).is_file() else {}
    if path.is_dir() and (path / HF_SPECIAL_MAP).is_file():
        _read_json(path / HF_SPECIAL_MAP, _resave_hint(path, file.name))
    if file.suffix == ".json":
        return tokenizer_from_json(_read_json(file), path, config, facts)
    data = file.read_bytes()
    proto = _sentencepiece_proto(data, file)
    if path.is_dir():
        check_folder(path, data, proto, facts)
    return tokenizer_from_proto(proto, path, config, facts)


def _folder_file(folder: Path) -> Path:
    for name in (SP_MODEL, HF_JSON):
        if (folder / name).is_file():
            return folder / name
    raise TokenizerError(
        f"{folder} holds neither {SP_MODEL} nor {HF_JSON}: train one with `python -m engine.tokenizer train`"
    )
