"""Tokenizers for the engine: train a SentencePiece BPE, load SentencePiece or HF ones, trim, inspect, export.

::

    tok = train_tokenizer(texts, "tokenizers/zh16k", vocab_size=16000)   # also writes the HF layout
    tok = load_tokenizer("tokenizers/zh16k")        # or a .model file, or a tokenizer.json
    ids = tok.encode("<|im_start|>user\\n你好<|im_end|>\\n")

CLI: ``python -m engine.tokenizer train|inspect|trim --help``.
"""

from .core import SPECIAL_TOKENS, Tokenizer, TokenizerError, load_tokenizer, tokenizer_mismatch
from .report import TokenizerReport, common_hanzi, inspect_tokenizer
from .train import MIN_VOCAB_SIZE, TrainStats, fit_tokenizer, split_long_text, train_tokenizer
from .trim import TrimConfig, TrimReport, trim_tokenizer

__all__ = [
    "MIN_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "TokenizerReport",
    "TrainStats",
    "TrimConfig",
    "TrimReport",
    "common_hanzi",
    "fit_tokenizer",
    "inspect_tokenizer",
    "load_tokenizer",
    "split_long_text",
    "tokenizer_mismatch",
    "train_tokenizer",
    "trim_tokenizer",
]
