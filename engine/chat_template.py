"""The ChatML chat template, as Jinja (for Hugging Face) and as loss-masked segments (for packing).

One conversation renders to::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

:data:`CHATML_TEMPLATE` is saved in ``tokenizer_config.json`` so ``transformers``'
``apply_chat_template`` renders exactly what :func:`render_segments` renders. The segments say which
text the loss counts on: each assistant turn's content and its closing ``<|im_end|>``, nothing else.
Reasoning SFT keeps ``<think>…</think>`` inside the assistant content, so it is learned like the answer.
"""

from __future__ import annotations

from typing import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A conversation cannot be rendered (unknown role, empty, no assistant turn…)."""


def render_segments(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """Render ``messages`` as ``(text, counts_for_loss)`` segments; their concatenation is the ChatML text.

    Adjacent segments with the same flag are merged, so a typical turn costs the tokenizer two calls.
    """
    segments: list[tuple[str, bool]] = []

    def add(text: str, loss: bool) -> None:
        if segments and segments[-1][1] == loss:
            segments[-1] = (segments[-1][0] + text, loss)
        else:
            segments.append((text, loss))

    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) has no text content")
        if role == "assistant":
            add(f"{IM_START}assistant\n", False)
            add(f"{content}{IM_END}", True)
            add("\n", False)
        else:
            add(f"{IM_START}{role}\n{content}{IM_END}\n", False)
    if add_generation_prompt:
        add(f"{IM_START}assistant\n", False)
    return segments


def render_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The whole ChatML text, exactly as ``CHATML_TEMPLATE`` renders it."""
    return "".join(text for text, _ in render_segments(messages, add_generation_prompt))
