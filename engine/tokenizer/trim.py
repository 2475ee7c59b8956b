"""Trim a SentencePiece BPE vocabulary (say ChatGLM's 64,789 pieces) to the pieces a Chinese model needs.

Kept: every control/byte/user-defined piece, every single character, every piece with a CJK ideograph or
CJK punctuation, whitespace runs, the best-ranked English (ASCII) pieces and any given English words.
A BPE piece can only appear if the merges that build it survive, so each kept piece brings the
intermediate pieces of its own derivation (counted as ``reachability``). With every piece of a text's
original encoding kept, the trimmed model encodes that text into the very same pieces (only the ids change).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .core import CHAT_TOKENS, SPECIAL_TOKENS, Tokenizer, TokenizerError, tokenizer_from_proto
from .hf_export import BPE_MODEL_TYPE, BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED

logger = logging.getLogger(__name__)

SPACE = "\u2581"
IDEOGRAPHS = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F), (0x2E80, 0x2FDF))
# CJK symbols and punctuation, full-width forms, vertical/compatibility forms, and the quotes, dashes,
# ellipsis and middle dot Chinese text uses from general punctuation.
CJK_PUNCTUATION = (
    (0x3000, 0x303F),
    (0xFF00, 0xFFEF),
    (0xFE10, 0xFE1F),
    (0xFE30, 0xFE4F),
    (0x2010, 0x2027),
    (0x00B7, 0x00B7),
)


def _in(ranges: tuple[tuple[int, int], ...], ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in ranges)


def is_cjk_piece(piece: str) -> bool:
    """A piece holding a CJK ideograph or CJK punctuation (``▁中国``, ``，“``, ``.”``)."""
    return any(_in(IDEOGRAPHS, ch) or _in(CJK_PUNCTUATION, ch) for ch in piece)


def is_ascii_piece(piece: str) -> bool:
    return all(ord(ch) < 128 or ch == SPACE for ch in piece) and piece.strip(SPACE) != ""


@dataclass
class TrimConfig:
    """What to keep besides the always-kept classes (module docstring)."""

    english_top: int = 3000  # best-ranked ASCII pieces: the model's own merge order ranks them by frequency
    english_words: frozenset[str] = frozenset()  # pieces equal to a word, or ▁ + word (case-insensitive)
    vocab_size: int | None = None  # fill up to this many ids with the next best-ranked pieces
    add_specials: bool = True  # add <pad> and the ChatML/think markers when absent


@dataclass
class TrimReport:
    original_size: int
    trimmed_size: int
    kept: dict[str, int] = field(default_factory=dict)  # by reason, in the order reasons are tried
    dropped: int = 0
    unreachable_dropped: int = 0  # pieces the original BPE can never produce (dropping them changes nothing)
    added_specials: list[str] = field(default_factory=list)
    english_words_given: int = 0
    english_words_found: int = 0

    def format(self) -> str:
        reasons = ", ".join(f"{k} {v:,}" for k, v in self.kept.items() if v)
        return (
            f"trimmed {self.original_size:,} ids to {self.trimmed_size:,}: kept {reasons}; "
            f"dropped {self.dropped:,} "
            f"(of which {self.unreachable_dropped:,} unreachable in the original); "
            f"added {', '.join(self.added_specials) or 'no specials'}; "
            f"English words found {self.english_words_found:,} of {self.english_words_given:,}"
        )


def read_word_list(path: str | Path) -> frozenset[str]:
    """One word per line; blank lines and ``#`` comments ignored; compared case-insensitively."""
    words = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            word = line.split("#", 1)[0].strip()
            if word:
                words.add(word.lower())
    if not words:
        raise TokenizerError(f"{path} holds no words: write one English word per line")
    return frozenset(words)


def derivation(piece: str, scores: dict[str, float]) -> list[str] | None:
    """The pieces SentencePiece's BPE builds on its way to ``piece`` (None when it never reaches it)."""
    symbols = list(piece)
    made: list[str] = []
    while len(symbols) > 1:
        best, at = None, -1
        for i in range(len(symbols) - 1):
            score = scores.get(symbols[i] + symbols[i + 1])
            if score is not None and (best is None or score > best):  # strict: leftmost wins a tie
                best, at = score, i
        if best is None:
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        made.append(symbols[at])
    return made[:-1] if symbols == [piece] else None


def _reasons(pieces: list[Any], config: TrimConfig) -> list[str | None]:
    """Why each piece is kept (None: not on its own merit)."""
    ascii_rank = 0
    reasons: list[str | None] = []
    for p in pieces:
        text = p.piece
        if p.type in (UNKNOWN, CONTROL, USER_DEFINED):
            reasons.append("control_or_user")
        elif p.type == BYTE:
            reasons.append("byte")
        elif p.type != NORMAL:
            reasons.append(None)  # unused pieces
        elif len(text) == 1:
            reasons.append("single_char")
        elif is_cjk_piece(text):
            reasons.append("cjk")
        elif text.strip(SPACE) == "" or text.isspace():
            reasons.append("whitespace")
        elif config.english_words and text.lstrip(SPACE).lower() in config.english_words:
            reasons.append("english_words")
        elif is_ascii_piece(text) and ascii_rank < config.english_top:
            reasons.append("english_top")
        else:
            reasons.append(None)
        if p.type == NORMAL and len(text) > 1 and is_ascii_piece(text):
            ascii_rank += 1  # pieces come in score order, so this counts rank among ASCII pieces
    return reasons


def trim_tokenizer(
    tok: Tokenizer, config: TrimConfig | None = None, path: str | Path | None = None
) -> tuple[Tokenizer, TrimReport]:
    """A trimmed copy of SentencePiece BPE ``tok`` (unsaved; call ``save_pretrained``) and what was kept."""
    config = config or TrimConfig()
    source = tok.sentencepiece_proto
    if source is None or source.trainer_spec.model_type != BPE_MODEL_TYPE:
        raise TokenizerError(f"{tok.path}: trim needs a SentencePiece BPE model (a .model file or a folder with one)")
    pieces = list(source.pieces)
    scores = {p.piece: p.score for p in pieces if p.type == NORMAL}
    reasons = _reasons(pieces, config)
    by_piece = {p.piece: i for i, p in enumerate(pieces)}
    derivations: dict[int, list[int] | None] = {}

    def needs(i: int) -> list[int] | None:
        if i not in derivations:
            made = derivation(pieces[i].piece, scores) if pieces[i].type == NORMAL and len(pieces[i].piece) > 1 else []
            derivations[i] = None if made is None else [by_piece[m] for m in made]
        return derivations[i]

    keep: dict[int, str] = {}
    unreachable = 0
    for i, reason in enumerate(reasons):
        if reason is None:
            continue
        parts = needs(i)
        if parts is None:
            unreachable += 1
            continue
        keep[i] = reason
        for j in parts:
            keep.setdefault(j, "reachability")
    # Reasons above may have kept a piece as "reachability" before its own reason came up: prefer its own.
    for i, reason in enumerate(reasons):
        if reason is not None and keep.get(i) == "reachability":
            keep[i] = reason

    pad = source.trainer_spec.pad_piece or SPECIAL_TOKENS[3]
    new_specials = [t for t in (pad, *CHAT_TOKENS) if t not in by_piece] if config.add_specials else []
    base = len(keep) + len(new_specials)
    if config.vocab_size is not None:
        if config.vocab_size < base:
            raise TokenizerError(
                f"--vocab-size {config.vocab_size} is below the {base:,} ids trimming must keep "
                "(every CJK piece, single character, byte and special): use at least that, or lower --english-top"
            )
        for i, p in enumerate(pieces):  # best-ranked first: pieces are stored in score order
            if len(keep) + len(new_specials) >= config.vocab_size:
                break
            if i in keep or p.type != NORMAL:
                continue
            parts = needs(i)
            if parts is None:
                continue
            missing = [j for j in parts if j not in keep]
            if len(keep) + len(new_specials) + 1 + len(missing) <= config.vocab_size:
                keep[i] = "fill"
                for j in missing:
                    keep[j] = "reachability"

    proto = _rebuild(source, sorted(keep), new_specials)
    counts = Counter(keep.values())
    order = [
        "control_or_user",
        "byte",
        "single_char",
        "cjk",
        "whitespace",
        "english_words",
        "english_top",
        "reachability",
        "fill",
    ]
    kept_words = {pieces[i].piece.lstrip(SPACE).lower() for i in keep if pieces[i].type == NORMAL}
    report = TrimReport(
        original_size=len(pieces),
        trimmed_size=len(proto.pieces),
        kept={k: counts.get(k, 0) for k in order},
        dropped=len(pieces) - len(keep),
        unreachable_dropped=unreachable,
        added_specials=new_specials,
        english_words_given=len(config.english_words),
        english_words_found=len(config.english_words & kept_words),
    )
    logger.debug(report.format())
    facts = {
        "made_by": "trim",
        "trimmed_from": str(tok.path),
        "trimmed_from_sha256": tok.sha256,
        **(
            {"normalization_changed": tok.facts["normalization_changed"]}
            if "normalization_changed" in tok.facts
            else {}
        ),
        "trim": {
            "config": {
                "english_top": config.english_top,
                "english_words": len(config.english_words),
                "vocab_size": config.vocab_size,
            },
            "report": asdict(report),
        },
    }
    trimmed = tokenizer_from_proto(
        proto,
        Path(path) if path is not None else tok.path,
        {"chat_template": tok.chat_template, "model_max_length": tok.model_max_length},
        facts,
    )
    return trimmed, report


def _rebuild(source: Any, kept: Iterable[int], new_specials: list[str]) -> Any:
    """A copy of ``source`` with only the ``kept`` pieces (original order, original scores) plus new specials."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.CopyFrom(source)
    del proto.pieces[:]
    kept = list(kept)
    meta = [i for i in kept if source.pieces[i].type in (UNKNOWN, CONTROL, USER_DEFINED)]
    rest = [i for i in kept if source.pieces[i].type not in (UNKNOWN, CONTROL, USER_DEFINED)]
    for i in meta:
        proto.pieces.append(source.pieces[i])
    for text in new_specials:  # after the existing meta pieces, so ids of specials stay small
        piece = proto.pieces.add()
        piece.piece, piece.score = text, 0.0
        piece.type = USER_DEFINED if text in CHAT_TOKENS else CONTROL
    for i in rest:
        proto.pieces.append(source.pieces[i])
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    spec = proto.trainer_spec
    for role in ("unk", "bos", "eos", "pad"):
        setattr(spec, f"{role}_id", ids.get(getattr(spec, f"{role}_piece"), -1))
    spec.vocab_size = len(proto.pieces)
    return proto
