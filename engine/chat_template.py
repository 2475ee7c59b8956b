"""The ChatML chat template, as Jinja (for Hugging Face) and as loss-masked segments (for packing).

One conversation renders to::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

:data:`CHATML_TEMPLATE` is saved in ``tokenizer_config.json`` so ``transformers``'
``apply_chat_template`` renders exactly what :func:`render_segments` renders. The segments say which
text the loss counts on: each assistant turn's content and its closing ``<|im_end|>``, nothing else.
Reasoning SFT keeps ``<think>…</think>`` inside the assistant content, so it is learned like the answer.

Tool calls (:mod:`engine.tool_calls`) are lowered to these same three roles before rendering; the Jinja template
also takes them structured (``tools=``, assistant ``tool_calls``, ``role: tool`` turns) and renders the same text.
"""

from __future__ import annotations

from typing import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")
#: The ``# Tools`` section of a system turn with tools (:mod:`engine.tool_calls`), around the schemas (one
#: ``\n{schema}`` each): our own wording of Qwen2.5's, with its markers.
TOOLS_HEAD = (
    "# Tools\n\n你可以调用下面的函数来完成用户的请求。"
    "每个函数的签名是一行 JSON，全部写在 <tools></tools> 标签里：\n<tools>"
)
TOOLS_TAIL = (
    "\n</tools>\n\n要调用函数时，把函数名和参数写成一个 JSON 对象，"
    "放进 <tool_call></tool_call> 标签，每次调用一个：\n"
    '<tool_call>\n{"name": <函数名>, "arguments": <参数的 JSON 对象>}\n</tool_call>'
)

#: The template shipped before tool calls (conversations without tools render the same under both); an exported
#: tokenizer that still carries it is given :data:`CHATML_TEMPLATE` (``engine.tokenizer.hf_export``).
CHATML_TEMPLATE_V1 = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _literal(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _chatml_template() -> str:
    """ChatML, plus tools (``tools=``: a ``# Tools`` section in the system turn), assistant ``tool_calls``
    (``<tool_call>`` blocks after the text) and ``role: tool`` turns (consecutive ones share a user turn), as
    :mod:`engine.tool_calls` lowers them."""
    return (
        "{%- if tools -%}"
        "{{- '<|im_start|>system\\n' -}}"
        "{%- if messages[0]['role'] == 'system' and messages[0]['content'] -%}"
        "{{- messages[0]['content'] + '\\n\\n' -}}"
        "{%- endif -%}"
        "{{- " + _literal(TOOLS_HEAD) + " -}}"
        "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
        "{{- " + _literal(TOOLS_TAIL) + " + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if tools and loop.first and message['role'] == 'system' -%}"
        "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{{- '<|im_start|>assistant' -}}"
        "{%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}"
        "{%- for call in message['tool_calls'] -%}"
        "{%- set function = call['function'] if call['function'] is defined else call -%}"
        "{{- '\\n<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' -}}"
        "{%- if function['arguments'] is string -%}{{- function['arguments'] -}}"
        "{%- else -%}{{- function['arguments'] | tojson -}}{%- endif -%}"
        "{{- '}\\n</tool_call>' -}}"
        "{%- endfor -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- elif message['role'] == 'tool' -%}"
        "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
        "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
        "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


CHATML_TEMPLATE = _chatml_template()


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
