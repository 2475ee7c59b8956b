"""Train a SentencePiece BPE with byte fallback on streamed texts and save it in Hugging Face layout.

SentencePiece silently skips every sentence longer than ``max_sentence_length`` bytes, so long documents are
cut here first: at line ends, then at sentence ends, and hard-cut only inside a single over-long sentence.
Every cut and every empty text is counted and logged; nothing is lost without a count.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from engine.chat_template import CHATML_TEMPLATE

from .core import CHAT_TOKENS, SPECIAL_TOKENS, Tokenizer, TokenizerError, _sentencepiece_proto, tokenizer_from_proto

logger = logging.getLogger(__name__)

BYTE_PIECES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_PIECES + 128  # specials, byte fallback, room for 128 more pieces
SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])")  # cut after these when a single line is too long


@dataclass
class TrainStats:
    """What was fed to SentencePiece: written to zhllm_tokenizer.json and logged."""

    documents: int = 0
    empty_skipped: int = 0  # empty or whitespace-only texts: SentencePiece cannot use them
    documents_split: int = 0  # documents longer than max_sentence_bytes, cut into pieces
    pieces_from_split: int = 0  # how many pieces those documents became
    hard_cuts: int = 0  # cuts inside a sentence (a single sentence over the limit)
    sentences_fed: int = 0  # what SentencePiece received (may sample input_sentence_size of them)
    chars_fed: int = 0
    seconds: float = 0.0


def _hard_cut(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` at character boundaries into parts of at most ``max_bytes`` UTF-8 bytes."""
    parts, start, size = [], 0, 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        if size + n > max_bytes:
            parts.append(text[start:i])
            start, size = i, 0
        size += n
    parts.append(text[start:])
    return parts


def split_long_text(text: str, max_bytes: int, stats: TrainStats | None = None) -> list[str]:
    """``text`` as parts of at most ``max_bytes`` UTF-8 bytes whose concatenation is ``text``.

    Cuts fall after newlines where possible, then after sentence-ending punctuation, then anywhere.
    """
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    units: list[str] = []
    for line in text.splitlines(keepends=True):
        if len(line.encode("utf-8")) <= max_bytes:
            units.append(line)
            continue
        for sentence in SENTENCE_END.split(line):
            if len(sentence.encode("utf-8")) <= max_bytes:
                units.append(sentence)
            else:
                cut = _hard_cut(sentence, max_bytes)
                units.extend(cut)
                if stats is not None:
                    stats.hard_cuts += len(cut) - 1
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        n = len(unit.encode("utf-8"))
        if current and size + n > max_bytes:
            parts.append("".join(current))
            current, size = [], 0
        current.append(unit)
        size += n
    if current:
        parts.append("".join(current))
    if stats is not None:
        stats.documents_split += 1
        stats.pieces_from_split += len(parts)
    return parts


class _Feed:
    """The sentence iterator handed to SentencePiece; keeps counts and any error of the source."""

    def __init__(self, texts: Iterable[str], max_bytes: int, stats: TrainStats, progress: bool) -> None:
        self.texts, self.max_bytes, self.stats, self.progress = texts, max_bytes, stats, progress
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        stats = self.stats
        try:
            for text in tqdm(self.texts, desc="tokenizer corpus", unit=" docs", disable=not self.progress):
                stats.documents += 1
                if not isinstance(text, str):
                    raise TokenizerError(f"train_tokenizer needs texts (str), got {type(text).__name__}")
                if not text.strip():
                    stats.empty_skipped += 1
                    continue
                for part in split_long_text(text, self.max_bytes, stats):
                    stats.sentences_fed += 1
                    stats.chars_fed += len(part)
                    yield part
        except BaseException as e:  # SentencePiece aborts with a RuntimeError; keep the original to re-raise
            self.error = e
            raise


def _sentencepiece_error(message: str, vocab_size: int) -> TokenizerError:
    found = re.search(r"value <= (\d+)", message)
    if found:
        return TokenizerError(
            f"the corpus is too small for --vocab-size {vocab_size}: use at most {found.group(1)}, or add text"
        )
    found = re.search(r"required_chars\. \d+ vs (\d+)", message)
    if found or "required_chars" in message:
        need = f" ({int(found.group(1)):,} distinct characters plus the specials)" if found else ""
        return TokenizerError(
            f"--vocab-size {vocab_size} is smaller than the characters the corpus needs{need}: raise it, "
            "or lower --character-coverage so rare characters fall back to bytes"
        )
    return TokenizerError(f"SentencePiece training failed: {message.strip().splitlines()[-1]}")


def check_train_options(vocab_size: int, character_coverage: float, max_sentence_bytes: int) -> None:
    """Refuse bad options before any text is read."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: it counts {len(SPECIAL_TOKENS)} specials and {BYTE_PIECES} "
            f"byte pieces, so use at least {MIN_VOCAB_SIZE} (16000 is a good start for Chinese)"
        )
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own bounds
        raise TokenizerError(f"--character-coverage must be between 0.98 and 1.0, not {character_coverage}")
    if max_sentence_bytes < 64:
        raise TokenizerError(f"--max-sentence-bytes must be at least 64, not {max_sentence_bytes}")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 16000,
    *,
    character_coverage: float = 0.9995,
    max_sentence_bytes: int = 16384,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    num_threads: int | None = None,
    model_max_length: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **more: Any,
) -> Tokenizer:
    """Train (see :func:`fit_tokenizer`) and save the Hugging Face layout to ``out_dir``.

    Refuses an existing ``out_dir`` unless ``overwrite`` (then its tokenizer files are replaced, others kept).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise TokenizerError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    tok = fit_tokenizer(
        texts,
        vocab_size,
        path=out,
        character_coverage=character_coverage,
        max_sentence_bytes=max_sentence_bytes,
        input_sentence_size=input_sentence_size,
        seed=seed,
        num_threads=num_threads,
        model_max_length=model_max_length,
        progress=progress,
        **more,
    )
    tok.save_pretrained(out)
    return tok


def fit_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 16000,
    *,
    path: str | os.PathLike[str] = "tokenizer",
    character_coverage: float = 0.9995,
    max_sentence_bytes: int = 16384,
    input_sentence_size: int = 2_000_000,
    max_piece_chars: int = 16,
    split_digits: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
    model_max_length: int | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Train a SentencePiece BPE (byte fallback, specials at ids 0..7); unsaved (``path`` is where it will go).

    ``vocab_size`` counts every id: the 8 specials, the 256 byte pieces and the learned pieces.
    ``texts`` is consumed once, as a stream; ``input_sentence_size`` caps how many pieces SentencePiece
    keeps in memory (a random sample when there are more). Normalization is the identity: no dummy prefix,
    whitespace and newlines kept, so ``decode(encode(text)) == text``.
    """
    import sentencepiece as spm

    check_train_options(vocab_size, character_coverage, max_sentence_bytes)
    stats = TrainStats()
    feed = _Feed(texts, max_sentence_bytes, stats, progress)
    model = io.BytesIO()
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=SPECIAL_TOKENS[0],
        bos_piece=SPECIAL_TOKENS[1],
        eos_piece=SPECIAL_TOKENS[2],
        pad_piece=SPECIAL_TOKENS[3],
        user_defined_symbols=list(CHAT_TOKENS),
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=split_digits,
        max_sentencepiece_length=max_piece_chars,
        max_sentence_length=max_sentence_bytes,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,  # SentencePiece's own progress lines are noise; our counts are logged below
    )
    started = time.perf_counter()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(feed), model_writer=model, **options)
    except RuntimeError as e:
        if feed.error is not None:
            raise feed.error from None
        if stats.sentences_fed == 0:
            raise TokenizerError(f"no text to train on: all {stats.documents} documents were empty") from None
        raise _sentencepiece_error(str(e), vocab_size) from None
    if feed.error is not None:
        raise feed.error
    stats.seconds = round(time.perf_counter() - started, 3)

    logger.info(
        "fed SentencePiece %d sentences (%d chars) from %d documents; %d empty skipped; "
        "%d long documents split into %d pieces (%d hard cuts inside a sentence); trained in %.1f s",
        stats.sentences_fed,
        stats.chars_fed,
        stats.documents,
        stats.empty_skipped,
        stats.documents_split,
        stats.pieces_from_split,
        stats.hard_cuts,
        stats.seconds,
    )
    if stats.sentences_fed > input_sentence_size:
        logger.info(
            "SentencePiece sampled %d of the %d sentences (input_sentence_size)",
            input_sentence_size,
            stats.sentences_fed,
        )

    proto = _sentencepiece_proto(model.getvalue(), Path(path))
    facts = {
        "made_by": "train",
        "trainer": "sentencepiece-bpe",
        "options": {k: v for k, v in options.items() if k not in ("minloglevel", "num_threads")},
        "seed": seed,
        "stats": asdict(stats),
    }
    config = {"chat_template": CHATML_TEMPLATE, "model_max_length": model_max_length}
    return tokenizer_from_proto(proto, Path(path), config, facts)
