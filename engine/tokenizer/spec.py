"""What a zhllm tokenizer is made of, for every module of :mod:`engine.tokenizer` (no imports among them go
round in a circle through here): its special tokens, the files of its folder, its error, and the identity
check between two records of one."""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CONTROL_TOKENS = SPECIAL_TOKENS[:4]  # SentencePiece's unk/bos/eos/pad: never matched inside text
CHAT_TOKENS = SPECIAL_TOKENS[4:]  # user-defined symbols: matched as single pieces inside text

SP_MODEL = "tokenizer.model"
HF_JSON = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL_MAP = "special_tokens_map.json"
FACTS = "zhllm_tokenizer.json"
FILE_DIGESTS = "file_sha256"  # key of FACTS: sha256 of tokenizer.model and tokenizer.json as saved together

UNK_SURFACE = " \u2047 "  # what SentencePiece decodes <unk> to; the HF backend does the same


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, trained, trimmed or saved (one-line message saying what to do)."""


def tokenizer_mismatch(
    expected: dict[str, Any] | None,
    actual: dict[str, Any] | None,
    *,
    owner: str,
    other: str,
    fix: str,
    verb: str = "trained",
) -> str | None:
    """The one-line refusal when two records of a tokenizer (``{"path", "sha256"}``) are different vocabularies:
    ``owner`` was ``verb`` with ``expected``, ``other`` is ``actual``, and ``fix`` says what to do. None when the
    sha256s agree or either side records none (there is nothing to compare; callers decide whether to warn)."""
    expected, actual = expected or {}, actual or {}
    theirs, ours = expected.get("sha256"), actual.get("sha256")
    if not theirs or not ours or theirs == ours:
        return None
    return (
        f"{owner} was {verb} with tokenizer {expected.get('path')} (sha256 {theirs[:12]}), but {other} is "
        f"{actual.get('path')} (sha256 {ours[:12]}), another vocabulary: {fix}"
    )
