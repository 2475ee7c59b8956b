"""Chat messages → the prompt text the checkpoint was fine-tuned on, as ``llama.chat`` renders it.

ChatML (``engine.chat_template``), the checkpoint's own system prompt when the request has none, and for a
``--template think`` fine-tune: past replies without reasoning rendered after the empty think block (as in
training), and thinking switched off by ending the prompt with that block (``InferenceInfo.think_off_prefix``).
"""

from __future__ import annotations

from engine.chat_template import render_text

from .errors import APIError
from .schemas import ChatMessage

THINK_OPEN = "<think>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


def chat_prompt(
    messages: list[ChatMessage], *, default_system: str | None, thinking: bool, think_off_prefix: str
) -> str:
    """The ChatML text of ``messages`` ending in the assistant's turn (after the empty think block when a think
    fine-tune is asked not to think); ``default_system`` goes first when no message is a system one."""
    turns = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}] has role {message.role!r}; this server takes {', '.join(ROLES)}",
                param=f"messages.{i}.role",
                code="invalid_value",
            )
        text = message_text(message, i)
        turns.append({"role": role, "content": rendered_reply(text, think_off_prefix) if role == "assistant" else text})
    if default_system and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": default_system})
    prompt = render_text(turns, add_generation_prompt=True)
    return prompt if thinking else prompt + think_off_prefix
