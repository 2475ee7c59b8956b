"""Chat messages → the prompt text the checkpoint was fine-tuned on, as ``llama.chat`` renders it.

ChatML (``engine.chat_template``), the checkpoint's own system prompt when the request has none, and for a
``--template think`` fine-tune: past replies without reasoning rendered after the empty think block (as in
training), and thinking switched off by ending the prompt with that block (``InferenceInfo.think_off_prefix``).
Tools, past calls (assistant ``tool_calls``) and tool results (``role: tool``) are written as in tool-call SFT
(:mod:`engine.tool_calls`): the tools in the system turn, calls as ``<tool_call>`` blocks, results in a user turn.
"""

from __future__ import annotations

import re
from typing import Any

from engine.chat_template import ChatFormatError, render_text
from engine.tool_calls import ToolCallError, ToolsError, check_tool_turns, lower_tool_turns, normalize_tools, parse_call

from .errors import APIError
from .schemas import ChatMessage

THINK_OPEN = "<think>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TOOL_CHOICES = ("auto", "none")


def message_text(message: ChatMessage, index: int) -> str:
    """A message's text: its string content, or its text parts joined; any other part is a 400."""
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise APIError(400, f"messages[{index}] ({message.role}) has no content", param=f"messages.{index}.content")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"messages[{index}] holds a {part.type!r} part: this model reads text only",
                param=f"messages.{index}.content",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "".join(texts)


def rendered_reply(content: str, think_off_prefix: str) -> str:
    """A past reply as the model saw replies in training: after the empty think block for a think fine-tune."""
    if think_off_prefix and not content.lstrip().startswith(THINK_OPEN):
        return think_off_prefix + content
    return content


def request_tools(tools: list[Any] | None, tool_choice: Any) -> list[dict[str, Any]]:
    """The request's tools, checked (a 400 naming ``tools``), or none when ``tool_choice`` is ``"none"``; a
    ``tool_choice`` other than ``"auto"``/``"none"`` is a 400 (forcing a call is not supported)."""
    if tool_choice is not None and tool_choice not in TOOL_CHOICES:
        raise APIError(
            400,
            f"tool_choice {tool_choice!r} is not supported by this server: use 'auto' or 'none'",
            param="tool_choice",
            code="invalid_value",
        )
    try:
        checked = normalize_tools(tools)
    except ToolsError as e:
        raise APIError(400, str(e), param="tools", code="invalid_value") from None
    return [] if tool_choice == "none" else checked


def _turn(message: ChatMessage, index: int) -> dict[str, Any]:
    """A request message as a structured turn: role, text, and an assistant's calls or a tool's call id."""
    role = ROLES.get(message.role)
    if role is None:
        raise APIError(
            400,
            f"messages[{index}] has role {message.role!r}; this server takes {', '.join(ROLES)}",
            param=f"messages.{index}.role",
            code="invalid_value",
        )
    turn: dict[str, Any] = {"role": role, "content": message_text(message, index)}
    if role == "assistant" and message.tool_calls:
        try:
            turn["tool_calls"] = [
                parse_call(call.model_dump(), f"messages[{index}].tool_calls[{k}]")
                for k, call in enumerate(message.tool_calls)
            ]
        except ToolCallError as e:
            raise APIError(400, str(e), param=f"messages.{index}.tool_calls", code="invalid_value") from None
    if role == "tool" and message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def chat_prompt(
    messages: list[ChatMessage],
    *,
    default_system: str | None,
    thinking: bool,
    think_off_prefix: str,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The ChatML text of ``messages`` ending in the assistant's turn (after the empty think block when a think
    fine-tune is asked not to think); ``default_system`` goes first when no message is a system one; ``tools``
    (checked by :func:`request_tools`) go into the system turn."""
    turns = [_turn(message, i) for i, message in enumerate(messages)]
    with_tools = bool(tools) or any(t["role"] == "tool" or t.get("tool_calls") for t in turns)
    if with_tools:
        try:
            check_tool_turns(turns)  # its turn numbers are the request's message indices
        except ChatFormatError as e:
            found = re.search(r"turn (\d+)", str(e))
            param = f"messages.{found.group(1)}.role" if found else "messages"
            raise APIError(400, f"messages: {e}", param=param, code="invalid_value") from None
    if default_system and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": default_system})
    if with_tools:
        turns = lower_tool_turns(turns, tools or [])
    turns = [
        {**t, "content": rendered_reply(t["content"], think_off_prefix)} if t["role"] == "assistant" else t
        for t in turns
    ]
    prompt = render_text(turns, add_generation_prompt=True)
    return prompt if thinking else prompt + think_off_prefix
