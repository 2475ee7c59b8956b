"""What a tokenizer does to a sample of text: compression, byte fallback, <unk>, coverage of common hanzi.

"Common hanzi" are the 3,755 level-1 characters of GB2312 (byte pairs 0xB0A1–0xD7F9), decoded with
Python's own gb2312 codec, so no character list is shipped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable

from .core import CHAT_TOKENS, Tokenizer


@lru_cache(maxsize=1)
def common_hanzi() -> tuple[str, ...]:
    """The 3,755 level-1 GB2312 hanzi, in GB2312 (pinyin) order."""
    chars = []
    for row in range(0xB0, 0xD8):
        for col in range(0xA1, 0xFF):
            if row == 0xD7 and col > 0xF9:  # level 1 ends at D7F9; D7FA–D7FE are unassigned
                break
            chars.append(bytes((row, col)).decode("gb2312"))
    return tuple(chars)


@dataclass
class TokenizerReport:
    path: str
    backend: str
    vocab_size: int
    sha256: str
    special_ids: dict[str, int | None] = field(default_factory=dict)
    common_hanzi: int = 0
    common_hanzi_single_token: int = 0  # characters that are a piece of their own
    texts: int = 0
    chars: int = 0
    utf8_bytes: int = 0
    tokens: int = 0
    byte_fallback_tokens: int = 0
    unk_tokens: int = 0
    encode_seconds: float = 0.0

    @property
    def common_hanzi_share(self) -> float:
        return self.common_hanzi_single_token / self.common_hanzi if self.common_hanzi else 0.0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.utf8_bytes / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "common_hanzi_share": round(self.common_hanzi_share, 4),
            "chars_per_token": round(self.chars_per_token, 3),
            "bytes_per_token": round(self.bytes_per_token, 3),
        }

    def format(self) -> str:
        specials = ", ".join(f"{k}={v}" for k, v in self.special_ids.items())
        lines = [
            f"tokenizer      {self.path} ({self.backend})",
            f"vocab size     {self.vocab_size:,} ids (sha256 {self.sha256[:12]})",
            f"special ids    {specials}",
            f"common hanzi   {self.common_hanzi_single_token:,} of the {self.common_hanzi:,} level-1 GB2312 hanzi "
            f"are single tokens ({self.common_hanzi_share:.1%})",
        ]
        if self.texts:
            speed = self.utf8_bytes / self.encode_seconds / 1e6 if self.encode_seconds else 0.0
            lines += [
                f"sample         {self.texts:,} texts, {self.chars:,} chars, {self.utf8_bytes:,} UTF-8 bytes "
                f"-> {self.tokens:,} tokens ({speed:.1f} MB/s, one thread)",
                f"compression    {self.chars_per_token:.2f} chars/token, {self.bytes_per_token:.2f} bytes/token",
                f"byte fallback  {self.byte_fallback_tokens:,} tokens "
                f"({self.byte_fallback_tokens / max(self.tokens, 1):.2%})",
                f"unk            {self.unk_tokens:,} tokens",
            ]
        else:
            lines.append("sample         none given (pass --source or --text-file for compression figures)")
        return "\n".join(lines)


def inspect_tokenizer(tok: Tokenizer, texts: Iterable[str]) -> TokenizerReport:
    """Measure ``tok`` on ``texts`` (any iterable; consumed once)."""
    hanzi = common_hanzi()
    special_ids = {role: tok.token_to_id(t) if t else None for role, t in tok.special_tokens.items()}
    special_ids.update({t: tok.token_to_id(t) for t in CHAT_TOKENS})
    report = TokenizerReport(
        path=str(tok.path),
        backend=tok.backend,
        vocab_size=tok.vocab_size,
        sha256=tok.sha256,
        special_ids=special_ids,
        common_hanzi=len(hanzi),
        common_hanzi_single_token=sum(1 for ch in hanzi if tok.token_to_id(ch) is not None),
    )
    byte_ids = {i for i in (tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None}
    for text in texts:
        started = time.perf_counter()
        ids = tok.encode(text)
        report.encode_seconds += time.perf_counter() - started
        report.texts += 1
        report.chars += len(text)
        report.utf8_bytes += len(text.encode("utf-8"))
        report.tokens += len(ids)
        report.byte_fallback_tokens += sum(1 for i in ids if i in byte_ids)
        if tok.unk_id is not None:
            report.unk_tokens += ids.count(tok.unk_id)
    report.encode_seconds = round(report.encode_seconds, 4)
    return report
