"""Raw SFT and DPO records -> checked ChatML messages -> token ids with an exact loss mask.

Accepted SFT records (the format is recognised from the record's keys):

- MiniMind / OpenAI: ``{"conversations" or "messages": [{"role": "system"|"user"|"assistant", "content": …}]}``
- ShareGPT (MedicalGPT): ``{"conversations": [{"from": "system"|"human"|"gpt", "value": …}]}``
  (``from`` may also be ``user``, ``assistant``, ``bot``, ``model``); an optional top-level ``"system"``.
- alpaca: ``{"instruction", "input", "output"}`` (either of ``instruction``/``input`` may be missing) with optional
  ``"system"`` and ``"history": [[question, answer], …]`` (earlier turns).
- one question and answer: ``{"question", "answer"}`` or ``{"prompt", "response"}``, with the same optional
  ``"instruction"`` (put before the question), ``"system"`` and ``"history"`` as alpaca.
- seed 000's medical CSV row ``{"department", "title", "ask", "answer"}``: one question and answer
  (see :func:`_medical_question` for how ``title`` and ``ask`` combine).

Accepted DPO records: MiniMind ``{"chosen": [messages…], "rejected": [messages…]}`` (the shared
leading turns are the prompt), MedicalGPT ``{"conversations": [prompt turns], "chosen": str,
"rejected": str}``, and ``{"prompt": str, "chosen": str, "rejected": str}``. Given as SFT data, a preference pair
is refused (:class:`PreferencePairError`), or read as its prompt and chosen reply with ``chosen_only``.

Tool calls, in either common shape, with the record's ``"tools"`` (OpenAI function schemas, or LLaMA-Factory's bare
``{"name", "description", "parameters"}``; a list or its JSON text):

- ShareGPT (LLaMA-Factory, glaive): a ``function_call`` turn (its value the JSON of ``{"name", "arguments"}`` or a
  list of them) in the assistant's place, then an ``observation`` turn (the result), then the assistant's reply;
- OpenAI: an assistant message with ``"tool_calls": [{"id", "type": "function", "function": {"name", "arguments":
  "<json>"}}]`` (``content`` null, empty or text said before the calls), then ``{"role": "tool", "tool_call_id",
  "content"}`` turns.

They are checked (a result must answer a call; arguments must be a JSON object) and lowered to plain ChatML by
:func:`engine.tool_calls.lower_tool_turns`: the tools in the system turn, the calls as ``<tool_call>`` blocks in the
assistant's (counted) reply, the results as an uncounted user turn. Faults raise ``bad_tools``, ``bad_tool_call`` or
``bad_tool_turn`` errors (:mod:`engine.tool_calls`), counted as bad records like any other.

Reasoning (OpenAI style): an assistant turn may carry ``"reasoning_content"`` beside its ``content`` (``value`` in
ShareGPT turns), and a one-turn record a top-level ``"reasoning_content"`` for its answer; it is kept in the message
under that key (``None``, ``""`` or whitespace is no reasoning). ``engine.reply_template``'s ``think`` template writes
it into the reply's ``<think>`` block; ChatML encoding leaves it out, and the packer counts every reply whose
reasoning was left out that way. A reply that has it and also opens its content with a ``<think>…</think>`` block
holds two reasonings: it is refused (:class:`TwoReasoningsError`, whether or not they agree), as is
``reasoning_content`` on a user or system turn.

Other field names are mapped onto these with ``names`` (``--fields question=q,answer=a``: the record's ``q`` is
its question); see :func:`parse_field_names`. A record of no known shape raises :class:`UnknownRecordError`,
naming its keys and ``--fields``.

Every conversation is: an optional system turn, then user/assistant turns alternating, ending with an
assistant turn (a DPO prompt ends with a user turn). Anything else raises
:class:`~engine.chat_template.ChatFormatError` with a one-line reason, which the packer counts as a
dropped record. Contents are kept exactly as given (no stripping), except the medical CSV's padded fields.
An empty system prompt counts as no system prompt; any other empty turn is an error. Turn numbers
in errors count from 0 over the parsed turns: the record's own list, unless a system prompt was
added from a top-level ``"system"`` field or an empty system turn dropped.

Encoding renders ChatML segment by segment (:func:`~engine.chat_template.render_segments`), so the
mask is exact. The ids equal encoding the whole text except where a tokenizer would fuse the
``"assistant\n"`` header's newline with the reply's first characters; there the reply starts on a
fresh token, which is also what the model sees at inference after the generation prompt.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from engine.chat_template import IM_END, IM_START, ChatFormatError, render_segments
from engine.tool_calls import check_tool_turns, has_tool_turns, lower_tool_turns, normalize_tools, parse_calls

Message = dict[str, str]

#: An assistant message's reasoning (OpenAI's ``reasoning_content``): the text of the reply's ``<think>`` block.
REASONING = "reasoning_content"
#: A ``<think>…</think>`` block opening a reply: the reply's reasoning, written in its content.
LEADING_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
#: ShareGPT senders of tool calls (LLaMA-Factory): a call in the assistant's place, and a tool's result.
SHAREGPT_TOOL_ROLES = {"function_call": "assistant", "observation": "tool", "tool": "tool"}
CHAT_ROLES = ("system", "user", "assistant")
#: Roles a record's turns may have: ChatML's, and tool results (lowered into user turns).
TURN_ROLES = (*CHAT_ROLES, "tool")
TOOLS = "tools"
ACCEPTED_SFT = (
    "conversations/messages (role/content or ShareGPT from/value), alpaca (instruction/input/output), "
    "question/answer, prompt/response, medical CSV (title/ask/answer)"
)
# One-turn shapes (question key, answer key), tried in this order; alpaca's "instruction" goes before the question.
ONE_TURN = (("input", "output"), ("question", "answer"), ("prompt", "response"))
# The record fields the parsers read: what ``--fields NAME=KEY`` may name.
FIELD_NAMES = (
    "conversations",
    "messages",
    "system",
    "instruction",
    "input",
    "output",
    "history",
    "question",
    "answer",
    "prompt",
    "response",
    "chosen",
    "rejected",
    REASONING,
    TOOLS,
)
FIELDS_ADVICE = "name its fields with --fields question=KEY,answer=KEY"
ACCEPTED_DPO = (
    "MiniMind (chosen/rejected message lists), MedicalGPT (conversations + chosen/rejected strings), "
    "prompt/chosen/rejected strings"
)
# Medical CSV fields that stand for "no question body" (seed 000's data has a few rows of ask="无").
EMPTY_ASK = {"", "无"}
TRAILING_PUNCTUATION = " \t?？。.!！,，"


class UnknownRecordError(ChatFormatError):
    """An SFT record of none of the accepted shapes (the packer counts it as ``unknown_format``)."""

    reason = "unknown_format"


class PreferencePairError(ChatFormatError):
    """A DPO preference pair given as SFT data (the packer counts it as ``preference_pair``)."""

    reason = "preference_pair"


class TwoReasoningsError(ChatFormatError):
    """A reply with a ``reasoning_content`` and a ``<think>…</think>`` block opening its content (counted as
    ``two_reasonings``): which one is the reasoning is not ours to guess."""

    reason = "two_reasonings"


class NotAPairError(ChatFormatError):
    """A DPO record with no chosen/rejected pair, such as an SFT conversation (counted as ``not_a_pair``)."""

    reason = "not_a_pair"


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def parse_field_names(text: str | None) -> dict[str, str]:
    """``"question=q,answer=a"`` (``--fields``) -> ``{"question": "q", "answer": "a"}``; a one-line error otherwise."""
    names: dict[str, str] = {}
    for item in (text or "").split(","):
        name, sep, key = (part.strip() for part in item.partition("="))
        if not (sep and name and key):
            raise ValueError(
                f"--fields expects NAME=KEY pairs joined by commas (e.g. question=q,answer=a), got {text!r}"
            )
        if name not in FIELD_NAMES:
            raise ValueError(
                f"--fields: {name!r} is not a field the conversation reader knows; use {', '.join(FIELD_NAMES)}"
            )
        if name in names:
            raise ValueError(f"--fields names {name!r} twice ({names[name]!r} and {key!r}): give it once")
        names[name] = key
    return names


def rename_fields(fields: Mapping[str, Any], names: Mapping[str, str] | None) -> Mapping[str, Any]:
    """The record with each mapped key read as its field name (``names = {"question": "q"}``: ``q`` is the question);
    a mapped key the record lacks leaves that field as the record has it."""
    if not names or not isinstance(fields, Mapping):
        return fields
    present = {name: key for name, key in names.items() if key in fields}
    renamed = {k: v for k, v in fields.items() if k not in present and k not in present.values()}
    renamed.update({name: fields[key] for name, key in present.items()})
    return renamed


def parse_conversation(
    fields: Mapping[str, Any],
    *,
    system: str | None = None,
    names: Mapping[str, str] | None = None,
    chosen_only: bool = False,
) -> list[Message]:
    """One SFT record -> checked messages ending with an assistant turn.

    ``system`` is a default system prompt, used only when the record carries none of its own; ``names`` maps
    field names onto the record's own keys (:func:`rename_fields`); ``chosen_only`` reads a DPO pair as its
    prompt and chosen reply (else a pair is refused: it is preference data, not a conversation).
    """
    if not isinstance(fields, Mapping):
        raise ChatFormatError(f"record is a {type(fields).__name__}, expected a JSON object; accepted: {ACCEPTED_SFT}")
    original, fields = fields, rename_fields(fields, names)
    if "chosen" in fields and "rejected" in fields:
        messages = _chosen_conversation(fields, chosen_only)
    elif (turns := _turn_list(fields)) is not None:
        if isinstance(fields.get(REASONING), str) and fields[REASONING].strip():
            raise ChatFormatError(f"a conversation's {REASONING} belongs on its assistant turns, not on the record")
        messages = _parse_turns(turns, _record_system(fields), _record_tools(fields), system)
    elif (shape := _one_turn_shape(fields)) is not None:
        messages = _parse_one_turn(fields, *shape)
    elif "ask" in fields and "answer" in fields:
        messages = _parse_medical_row(fields)
    else:
        raise UnknownRecordError(
            f"unknown SFT record format with keys {sorted(original)}: {FIELDS_ADVICE}; accepted: {ACCEPTED_SFT}"
        )
    check_conversation(messages, ends_with="assistant")
    return _with_default_system(messages, system)


def _chosen_conversation(fields: Mapping[str, Any], chosen_only: bool) -> list[Message]:
    """A DPO pair as SFT data: its prompt and chosen reply with ``chosen_only``, else refused."""
    if not chosen_only:
        raise PreferencePairError(
            "a DPO preference pair (chosen/rejected replies), not a conversation: "
            "pass --chosen-only to train on its prompt and chosen reply"
        )
    prompt, chosen, _ = parse_preference(fields)
    return [*prompt, {"role": "assistant", "content": chosen}]


def _one_turn_shape(fields: Mapping[str, Any]) -> tuple[str, str] | None:
    """(question key, answer key) of the first one-turn shape ``fields`` has (alpaca may lack its ``input``)."""
    for question, answer in ONE_TURN:
        if answer in fields and (question in fields or (answer == "output" and "instruction" in fields)):
            return question, answer
    return None


def parse_preference(
    fields: Mapping[str, Any], *, system: str | None = None, names: Mapping[str, str] | None = None
) -> tuple[list[Message], str, str]:
    """One DPO record -> (prompt messages ending with a user turn, chosen reply, rejected reply); ``names`` as in
    :func:`parse_conversation`."""
    if not isinstance(fields, Mapping):
        raise ChatFormatError(f"record is a {type(fields).__name__}, expected a JSON object; accepted: {ACCEPTED_DPO}")
    fields = rename_fields(fields, names)
    chosen, rejected = fields.get("chosen"), fields.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen_reply, rejected_reply = _split_minimind_pair(
            chosen, rejected, _record_system(fields), _record_tools(fields), system
        )
    elif "chosen" in fields and "rejected" in fields:
        chosen_reply = _text(chosen, "the chosen reply")
        rejected_reply = _text(rejected, "the rejected reply")
        turns = _turn_list(fields)
        if turns is not None:
            prompt = _parse_turns(turns, _record_system(fields), _record_tools(fields), system)
        elif "prompt" in fields:
            question = {"role": "user", "content": _text(fields["prompt"], "the prompt")}
            prompt = _with_system([question], _record_system(fields))
        else:
            raise ChatFormatError(
                f"DPO record with keys {sorted(fields)} has chosen/rejected but no prompt "
                "(conversations, messages or prompt)"
            )
    else:
        raise NotAPairError(f"unknown DPO record format with keys {sorted(fields)}; accepted: {ACCEPTED_DPO}")
    check_conversation(prompt, ends_with="user")
    if chosen_reply == rejected_reply:
        raise ChatFormatError("chosen and rejected replies are identical: the pair teaches nothing")
    return _with_default_system(prompt, system), chosen_reply, rejected_reply


def check_conversation(messages: Sequence[Mapping[str, str]], *, ends_with: str = "assistant") -> None:
    """Raise :class:`ChatFormatError` unless ``messages`` is [system], user, assistant, … ending with ``ends_with``."""
    if not messages:
        raise ChatFormatError("conversation has no turns")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ChatFormatError(f"turn {i} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ChatFormatError(f"turn {i} ({role}) has no text")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role == "system":
            raise ChatFormatError(f"turn {i} is a system turn: a system prompt may only be the first turn")
        if role != expected:
            raise ChatFormatError(
                f"turn {i} is {role!r} where {expected!r} was expected: "
                "turns must alternate user/assistant after an optional system turn"
            )
    if len(messages) == start:
        raise ChatFormatError("conversation has only a system prompt")
    if messages[-1]["role"] != ends_with:
        if ends_with == "user":
            raise ChatFormatError("prompt ends with an assistant turn: a DPO prompt must end with the user's turn")
        if len(messages) == start + 1:
            raise ChatFormatError("conversation has no assistant turn")
        raise ChatFormatError("conversation ends with a user turn (no reply to learn from)")


def _turn_list(fields: Mapping[str, Any]) -> list[Any] | None:
    for key in ("conversations", "messages"):
        if key in fields:
            turns = fields[key]
            if not isinstance(turns, list):
                raise ChatFormatError(f'"{key}" is a {type(turns).__name__}, expected a list of turns')
            return turns
    return None


def _parse_turns(
    turns: Sequence[Any],
    record_system: str | None,
    tools: list[dict[str, Any]] | None = None,
    default_system: str | None = None,
) -> list[Message]:
    """MiniMind/OpenAI (role/content) or ShareGPT (from/value) turns -> messages; with ``tools`` or tool turns, checked
    and lowered to plain ChatML (:func:`~engine.tool_calls.lower_tool_turns`), after ``default_system`` when the
    record has no system prompt of its own."""
    messages: list[Message] = []
    said: dict[int, str] = {}  # how each tool result's role was named, for errors
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ChatFormatError(
                f"turn {i} is a {type(turn).__name__}, expected an object with role/content or from/value"
            )
        calls = None
        if "role" in turn:
            role, content = turn["role"], turn.get("content")
            if role not in TURN_ROLES:
                raise ChatFormatError(f"turn {i} has role {role!r}; accepted: {', '.join(TURN_ROLES)}")
            if role == "assistant" and turn.get("tool_calls"):
                calls = parse_calls(turn["tool_calls"], f"turn {i} (assistant) tool_calls")
        elif "from" in turn:
            sender, content = turn["from"], turn.get("value")
            role = (SHAREGPT_ROLES.get(sender) or SHAREGPT_TOOL_ROLES.get(sender)) if isinstance(sender, str) else None
            if role is None:
                accepted = ", ".join([*SHAREGPT_ROLES, *SHAREGPT_TOOL_ROLES])
                raise ChatFormatError(f"turn {i} is from {sender!r}; accepted: {accepted}")
            if sender == "function_call":
                calls, content = parse_calls(content, f"turn {i} (function_call)"), None
        else:
            raise ChatFormatError(f"turn {i} has keys {sorted(turn)}; expected role/content or from/value")
        if role == "system" and (content is None or (isinstance(content, str) and not content.strip())):
            continue  # an empty system prompt is no system prompt
        index = len(messages)
        if calls:
            text = content if isinstance(content, str) and content.strip() else ""
            # a reply of calls alone has no text: check the reasoning against a placeholder, then empty it
            message = _message("assistant", text or "-", turn.get(REASONING), f"turn {i} (assistant)")
            message.update(content=text, tool_calls=calls)
        else:
            message = _message(role, content, turn.get(REASONING), f"turn {i} ({role})")
        if role == "tool":
            said[index] = f"is from {turn['from']!r}" if "from" in turn else "has role 'tool'"
            if isinstance(turn.get("tool_call_id"), str):
                message["tool_call_id"] = turn["tool_call_id"]
        messages.append(message)
    lower = bool(tools) or has_tool_turns(messages)
    if lower:
        check_tool_turns(messages, said)  # before a system prompt is added: turn numbers are the record's
    if not any(m["role"] == "system" for m in messages):
        messages = _with_system(messages, record_system)
    if not lower:
        return messages
    return lower_tool_turns(_with_default_system(messages, default_system), tools or [])


def _record_tools(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record's ``"tools"`` as OpenAI function tools (none when absent or empty)."""
    return normalize_tools(fields.get(TOOLS))


def _parse_one_turn(fields: Mapping[str, Any], question_key: str, answer_key: str) -> list[Message]:
    """alpaca (``input``/``output``) or another one-turn shape: the instruction and question joined by a newline,
    after the ``history`` turns, with the record's ``system``."""
    label = "alpaca " if answer_key == "output" else ""
    instruction = fields.get("instruction") or ""
    extra = fields.get(question_key) or ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise ChatFormatError(f"{label}instruction/{question_key} must be text")
    question = "\n".join(part for part in (instruction, extra) if part.strip())
    messages: list[Message] = []
    history = fields.get("history") or []
    if not isinstance(history, list):
        raise ChatFormatError(f'{label}"history" is a {type(history).__name__}, expected [[question, answer], …]')
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ChatFormatError(f"{label}history entry {i} is not a [question, answer] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"{label}history {i} question")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"{label}history {i} answer")})
    messages.append({"role": "user", "content": _text(question, f"the {label}instruction/{question_key}")})
    answer = _message("assistant", fields[answer_key], fields.get(REASONING), f"the {label}{answer_key}")
    return _with_system([*messages, answer], _record_system(fields))


def _parse_medical_row(fields: Mapping[str, Any]) -> list[Message]:
    title = str(fields.get("title") or "").strip()
    ask = str(fields.get("ask") or "").strip()
    answer = _text(str(fields.get("answer") or "").strip(), "the medical answer")
    return [{"role": "user", "content": _medical_question(title, ask)}, {"role": "assistant", "content": answer}]


def _medical_question(title: str, ask: str) -> str:
    """The user's question from a forum post: its title is usually a summary of its body (``ask``).

    The title is kept only when it adds something: ``ask`` alone when it already contains the title
    (trailing punctuation ignored), the title alone when ``ask`` is empty or the placeholder "无",
    else ``title + "\\n" + ask`` (a post's subject line, then its body).
    """
    if ask in EMPTY_ASK:
        return _text(title, "the medical question (title and ask)")
    core = title.rstrip(TRAILING_PUNCTUATION)
    if not core or core in ask:
        return ask
    return f"{title}\n{ask}"


def _split_minimind_pair(
    chosen: list[Any],
    rejected: list[Any],
    record_system: str | None,
    tools: list[dict[str, Any]] | None = None,
    default_system: str | None = None,
) -> tuple[list[Message], str, str]:
    """MiniMind DPO: both sides repeat the prompt; only their final assistant turns differ."""
    chosen_messages = _parse_turns(chosen, record_system, tools, default_system)
    rejected_messages = _parse_turns(rejected, record_system, tools, default_system)
    for side, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        if not messages or messages[-1]["role"] != "assistant":
            raise ChatFormatError(f"the {side} conversation does not end with an assistant reply")
    prompt = chosen_messages[:-1]
    if rejected_messages[:-1] != prompt:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt, rejected_messages[:-1])) if a != b),
            min(len(prompt), len(rejected_messages) - 1),
        )
        raise ChatFormatError(
            f"chosen and rejected conversations differ before their last turn (at turn {turn}): "
            "they must share the same prompt"
        )
    return prompt, chosen_messages[-1]["content"], rejected_messages[-1]["content"]


def _record_system(fields: Mapping[str, Any]) -> str | None:
    value = fields.get("system")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value, 'the record\'s "system"')


def _with_system(messages: list[Message], system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}, *messages] if system else messages


def _with_default_system(messages: list[Message], system: str | None) -> list[Message]:
    if messages and messages[0]["role"] == "system":
        return messages
    return _with_system(messages, system)


def _message(role: str, content: Any, reasoning: Any, what: str) -> Message:
    """A checked message; an assistant's non-empty ``reasoning`` is kept under :data:`REASONING`."""
    message = {"role": role, "content": _text(content, what)}
    if reasoning is None or (isinstance(reasoning, str) and not reasoning.strip()):
        return message
    if not isinstance(reasoning, str):
        raise ChatFormatError(f"{what} has a {REASONING} that is {type(reasoning).__name__}, not text")
    if role != "assistant":
        raise ChatFormatError(f"{what} has a {REASONING}: only an assistant reply carries reasoning")
    if LEADING_THINK.match(message["content"]):
        raise TwoReasoningsError(
            f"{what} has a {REASONING} and also opens with a <think>…</think> block: keep the reasoning in one of them"
        )
    message[REASONING] = reasoning
    return message


def count_reasoning(messages: Sequence[Mapping[str, str]]) -> int:
    """How many of ``messages`` carry a reasoning (:data:`REASONING`): what ChatML encoding leaves out."""
    return sum(1 for message in messages if message.get(REASONING))


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ChatFormatError(f"{what} is {type(value).__name__}, not text")
    if not value.strip():
        raise ChatFormatError(f"{what} has no text")
    return value


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

# Tokenizers already checked for single-token ChatML markers (weakly held: no leak across tokenizers).
_checked_tokenizers: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def check_chat_tokenizer(tokenizer: Any) -> None:
    """Raise :class:`ChatFormatError` unless ``<|im_start|>``/``<|im_end|>`` each encode to one token.

    Encoding segment by segment equals encoding the whole text only because every segment boundary
    sits next to one of these markers, which the tokenizer must match inside text as single tokens.
    """
    try:
        if _checked_tokenizers.get(tokenizer):
            return
    except TypeError:
        pass  # not weak-referenceable: check every time
    for marker in (IM_START, IM_END):
        marker_id = tokenizer.token_to_id(marker)
        if marker_id is None or list(tokenizer.encode(marker)) != [marker_id]:
            raise ChatFormatError(
                f"tokenizer {getattr(tokenizer, 'path', type(tokenizer).__name__)} has no "
                f"{IM_START}/{IM_END} tokens: train one with `python -m engine.tokenizer train` "
                "or trim one (trim adds them)"
            )
    try:
        _checked_tokenizers[tokenizer] = True
    except TypeError:
        pass


def encode_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """ChatML token ids (``int64``) and loss mask (``uint8``) of one conversation, ending with EOS.

    The mask is 1 on each assistant turn's content tokens and its closing ``<|im_end|>``, 0 on the
    rest (headers, user and system turns, the newline between turns, the final EOS). Each segment of
    :func:`render_segments` is encoded separately, so a token never straddles counted and uncounted text.
    """
    check_chat_tokenizer(tokenizer)
    check_conversation(messages, ends_with="assistant")
    return _encode_segments(tokenizer, render_segments(messages))


def encode_preference(
    tokenizer: Any, prompt: Sequence[Mapping[str, str]], chosen: str, rejected: str
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Two documents, prompt + chosen reply and prompt + rejected reply, each ending with EOS.

    Only the final reply and its ``<|im_end|>`` count: assistant turns inside a multi-turn prompt are
    context, not what the preference is about.
    """
    check_chat_tokenizer(tokenizer)
    check_conversation(prompt, ends_with="user")
    documents = []
    for reply in (chosen, rejected):
        messages = [*prompt, {"role": "assistant", "content": _text(reply, "the reply")}]
        segments = render_segments(messages)
        last = max(i for i, (_, counts) in enumerate(segments) if counts)
        documents.append(_encode_segments(tokenizer, [(text, i == last) for i, (text, _) in enumerate(segments)]))
    return documents[0], documents[1]


def _encode_segments(tokenizer: Any, segments: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    pieces = [tokenizer.encode(text) for text, _ in segments]
    total = sum(len(ids) for ids in pieces)
    token_ids = np.empty(total + 1, dtype=np.int64)
    mask = np.zeros(total + 1, dtype=np.uint8)
    pos = 0
    for ids, (_, counts) in zip(pieces, segments):
        token_ids[pos : pos + len(ids)] = ids
        mask[pos : pos + len(ids)] = counts
        pos += len(ids)
    token_ids[total] = tokenizer.eos_id  # every packed document ends with EOS, never counted
    return token_ids, mask
