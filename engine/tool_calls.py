"""Tool calls in ChatML, Qwen2.5/Hermes style: checked, then written as plain system/user/assistant turns.

A conversation with tools is lowered to ordinary ChatML messages before it is rendered or packed, so the loss mask,
the packer and the server's prompt need nothing new:

- the tools (OpenAI function schemas) go into the system turn, after its prompt, as a ``# Tools`` section: one JSON
  schema a line inside ``<tools></tools>``, then how to call one (:func:`tools_system`);
- an assistant turn's calls follow its text (if any), one ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>``
  block each, joined by newlines (:func:`assistant_text`): the reply the model learns and writes;
- consecutive tool results share one ``user`` turn, each wrapped in ``<tool_response>\\n…\\n</tool_response>``
  (:func:`tool_results_text`): context, never counted.

``engine.chat_template.CHATML_TEMPLATE`` renders the same text from the structured messages (``tool_calls`` on
assistant messages, ``role: tool`` turns, ``tools=``), so ``transformers``' ``apply_chat_template`` agrees with
what was trained. Arguments are written canonically (``json.dumps``, no ASCII escaping); the Jinja template writes
a string ``arguments`` as given, which is the same text when the string is canonical (as the server writes it).

:func:`parse_reply` reads a generated reply back: text, then one or more complete ``<tool_call>`` blocks holding JSON
objects with a ``name`` and object ``arguments``; anything else is plain text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from engine.chat_template import TOOLS_HEAD, TOOLS_TAIL, ChatFormatError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class ToolsError(ChatFormatError):
    """A ``tools`` list that is not function schemas (counted as ``bad_tools``)."""

    reason = "bad_tools"


class ToolCallError(ChatFormatError):
    """A tool call with no name or arguments that are not a JSON object (counted as ``bad_tool_call``)."""

    reason = "bad_tool_call"


class ToolTurnError(ChatFormatError):
    """A tool result out of place: no call before it, a call with no result, an id no call has (``bad_tool_turn``)."""

    reason = "bad_tool_turn"


def check_name(name: Any, what: str, error: type[ChatFormatError] = ToolCallError) -> str:
    """A function name: non-empty text that JSON writes unescaped (it is written between quotes as is)."""
    if not isinstance(name, str) or not name.strip():
        raise error(f"{what} has no function name")
    if json.dumps(name, ensure_ascii=False) != f'"{name}"':
        raise error(f"{what} names the function {name!r}: quotes, backslashes and control characters are not allowed")
    return name


def _json_value(value: Any, what: str, error: type[ChatFormatError]) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e.msg} at character {e.pos})") from None


def normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """A record's or request's ``tools`` (a list, or a JSON string of one) -> OpenAI tools, ``{"type": "function",
    "function": {"name", …}}`` each; a bare function schema (``{"name", "description", "parameters"}``, as
    LLaMA-Factory's data has them) is wrapped. ``None``, ``""`` and ``[]`` are no tools."""
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return []
    tools = _json_value(tools, "tools", ToolsError)
    if not isinstance(tools, list):
        raise ToolsError(f"tools is a {type(tools).__name__}, expected a list of function schemas")
    normalized = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ToolsError(f"tools[{i}] is a {type(tool).__name__}, expected a function schema object")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise ToolsError(f"tools[{i}] has type {tool.get('type')!r}: only 'function' tools are supported")
            function = tool.get("function")
            wrapped = dict(tool) if "type" in tool else {"type": "function", **tool}
        else:
            function, wrapped = tool, {"type": "function", "function": dict(tool)}
        if not isinstance(function, Mapping):
            raise ToolsError(f"tools[{i}] has no function schema (expected {{'type': 'function', 'function': {{…}}}})")
        check_name(function.get("name"), f"tools[{i}]", ToolsError)
        if not isinstance(function.get("description", ""), str):
            raise ToolsError(f"tools[{i}]'s description is not text")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise ToolsError(f"tools[{i}]'s parameters is not a JSON schema object")
        normalized.append(wrapped)
    return normalized


def parse_call(call: Any, what: str) -> dict[str, Any]:
    """One call, OpenAI's ``{"id", "type": "function", "function": {"name", "arguments": "<json>"}}`` or a bare
    ``{"name", "arguments"}`` (arguments an object or its JSON text) -> ``{"name", "arguments": dict}`` (plus ``id``
    when given)."""
    if not isinstance(call, Mapping):
        raise ToolCallError(f"{what} is a {type(call).__name__}, expected an object with a name and arguments")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise ToolCallError(f"{what}'s function is a {type(function).__name__}, expected {{name, arguments}}")
    if call.get("type", "function") != "function":
        raise ToolCallError(f"{what} has type {call.get('type')!r}: only function calls are supported")
    name = check_name(function.get("name"), what)
    arguments = function.get("arguments", {})
    arguments = (
        {} if arguments is None or arguments == "" else _json_value(arguments, f"{what}'s arguments", ToolCallError)
    )
    if not isinstance(arguments, dict):
        raise ToolCallError(f"{what}'s arguments are a JSON {type(arguments).__name__}, expected an object")
    parsed: dict[str, Any] = {"name": name, "arguments": arguments}
    if isinstance(call.get("id"), str) and call["id"]:
        parsed["id"] = call["id"]
    return parsed


def parse_calls(value: Any, what: str) -> list[dict[str, Any]]:
    """A ShareGPT ``function_call`` turn's value (JSON text of one call or a list of calls), or OpenAI's
    ``tool_calls`` list -> checked calls."""
    value = _json_value(value, what, ToolCallError)
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ToolCallError(f"{what} holds no call")
    return [parse_call(call, f"{what} call {k}" if len(calls) > 1 else what) for k, call in enumerate(calls)]


def call_json(call: Mapping[str, Any]) -> str:
    return json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def assistant_text(content: str | None, calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant turn's text: its content (if any), then a ``<tool_call>`` block a call, joined by newlines."""
    blocks = [f"{TOOL_CALL_OPEN}\n{call_json(call)}\n{TOOL_CALL_CLOSE}" for call in calls]
    return "\n".join(([content] if content else []) + blocks)


def tool_results_text(results: Sequence[str]) -> str:
    """The user turn holding consecutive tool results."""
    return "\n".join(f"{TOOL_RESPONSE_OPEN}\n{result}\n{TOOL_RESPONSE_CLOSE}" for result in results)


def tools_system(system: str | None, tools: Sequence[Mapping[str, Any]]) -> str:
    """The system turn's text with the ``# Tools`` section after its prompt (if any)."""
    schemas = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (f"{system}\n\n" if system else "") + TOOLS_HEAD + schemas + TOOLS_TAIL


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def check_tool_turns(messages: Sequence[Mapping[str, Any]], role_names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ToolTurnError` unless every tool result answers a call: it follows an assistant turn with calls
    (or another result of that turn), names one of those calls' ids when it gives an id, there are no more results
    than calls, and a turn with calls is followed by its results (or ends the conversation).

    ``role_names`` maps turn index -> how the record named the result's role, for the error (``from 'observation'``).
    """
    calls: list[Mapping[str, Any]] = []
    results = 0
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            said = (role_names or {}).get(i, "has role 'tool'")
            if not calls:
                raise ToolTurnError(
                    f"turn {i} {said}; accepted only after an assistant turn with tool calls (a tool result answers a "
                    "call)"
                )
            results += 1
            if results > len(calls):
                raise ToolTurnError(f"turn {i} is tool result {results} for {len(calls)} call(s): one result a call")
            ids = {call["id"] for call in calls if "id" in call}
            given = message.get("tool_call_id")
            if given and ids and given not in ids:
                raise ToolTurnError(f"turn {i} answers tool_call_id {given!r}, which no call of turn before it has")
            continue
        if calls and not results:
            raise ToolTurnError(f"turn {i - 1} calls tools but turn {i} is {role!r}, not the tools' results")
        calls, results = list(message.get("tool_calls") or []), 0


def lower_tool_turns(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked structured messages (assistant ``tool_calls`` as ``{"name", "arguments": dict}``, ``role: tool``
    turns) and normalized ``tools`` -> plain system/user/assistant messages rendering the same ChatML text.

    Other keys of a message (``reasoning_content``) are kept; ``tool_calls`` and ``tool_call_id`` are written into the
    text. A system turn is added for the tools when there is none.
    """
    check_tool_turns(messages)
    lowered: list[dict[str, Any]] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            lowered.append({"role": "user", "content": tool_results_text(pending)})
            pending.clear()

    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            pending.append(message.get("content") or "")
            continue
        flush()
        plain = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        if role == "system" and i == 0 and tools:
            plain["content"] = tools_system(message.get("content"), tools)
        elif role == "assistant" and message.get("tool_calls"):
            plain["content"] = assistant_text(message.get("content"), message["tool_calls"])
        lowered.append(plain)
    flush()
    if tools and not (lowered and lowered[0]["role"] == "system"):
        lowered.insert(0, {"role": "system", "content": tools_system(None, tools)})
    return lowered


def parse_reply(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A generated reply -> (its text before the calls, or None when empty; its calls ``{"name", "arguments": dict}``).

    Calls are read only when the reply is text followed by complete ``<tool_call>`` blocks (whitespace between and
    after them), each a JSON object with a text ``name`` and object ``arguments`` (or their JSON text); otherwise, a
    malformed or unclosed block included, the whole reply is text and there are no calls.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    position = start
    for match in _BLOCK.finditer(text, start):
        if text[position : match.start()].strip():
            return text, []
        try:
            calls.append(parse_call(json.loads(match.group(1)), "call"))
        except (json.JSONDecodeError, ChatFormatError):
            return text, []
        position = match.end()
    if not calls or text[position:].strip():
        return text, []
    content = text[:start].rstrip("\n")
    return (content if content.strip() else None), [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
