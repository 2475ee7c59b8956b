"""The request bodies of the OpenAI API as far as this server speaks it, and the shapes of its answers.

Requests are pydantic models: a value out of range (``temperature`` 3, ``n`` 0, ``top_p`` 0…) fails validation and
becomes a 400 naming the parameter (:mod:`.errors`). Unknown fields are ignored, as vLLM does, so clients that send
more than we use still work; fields we know but cannot honour (``logprobs``, ``presence_penalty`` ≠ 0, ``echo``…)
are refused rather than silently dropped. Answers are plain dicts built by the ``*_body``/``*_chunk`` functions.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit


class ContentPart(BaseModel):
    """One part of a message's content list; only ``{"type": "text", "text": …}`` is understood."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text; an object is taken too


class ToolCall(BaseModel):
    """A call an earlier reply made (an assistant message's ``tool_calls``)."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # an earlier reply's reasoning: not fed back (as Qwen3 and DeepSeek-R1)
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, length, sampling, stop strings, n, seed, streaming."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters (``extra_body``)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    repetition_penalty: float | None = Field(None, gt=0)
    # known but not implemented: refused unless left at their neutral value
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> "SamplingRequest":
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server (use repetition_penalty); leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # thinking on/off: vLLM and SGLang take chat_template_kwargs={"enable_thinking": …} (Qwen3's documented way);
    # Alibaba Cloud's API (and Qwen's own examples for it) a top-level enable_thinking
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # function calling: checked by engine.tool_calls (a 400 naming "tools"); tool_choice "auto" or "none" only
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # the model may always make several calls

    @model_validator(mode="after")
    def _chat_unsupported(self) -> "ChatCompletionRequest":
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: give one of them")
        kwarg = (self.chat_template_kwargs or {}).get("enable_thinking")
        if kwarg is not None and not isinstance(kwarg, bool):
            raise ValueError("chat_template_kwargs.enable_thinking must be true or false")
        if kwarg is not None and self.enable_thinking is not None and kwarg != self.enable_thinking:
            raise ValueError("enable_thinking and chat_template_kwargs.enable_thinking disagree: give one of them")
        return self

    @property
    def length_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def thinking(self) -> bool:
        """Whether a reasoning model should think (the default), from either spelling of ``enable_thinking``."""
        kwarg = (self.chat_template_kwargs or {}).get("enable_thinking")
        chosen = kwarg if kwarg is not None else self.enable_thinking
        return True if chosen is None else bool(chosen)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list: give a string or a list of strings")
        return value

    @model_validator(mode="after")
    def _completion_unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server (use n)")
        return self

    @property
    def length_limit(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# ---------------------------------------------------------------- answers

Kind = Literal["chat", "text"]


def new_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, context: int, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "zhllm", "max_model_len": context}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_field(calls: list[dict[str, Any]], streamed: bool = False) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` of parsed calls ``{"name", "arguments": dict}``: ids ``call_…``, arguments as JSON text;
    streamed, each with its ``index``."""
    shaped = []
    for index, call in enumerate(calls):
        function = {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}
        entry: dict[str, Any] = {"index": index} if streamed else {}
        shaped.append({**entry, "id": new_call_id(), "type": "function", "function": function})
    return shaped


def completion_body(
    kind: Kind, request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A whole answer. ``choices`` hold ``index``, ``text`` (None: only calls), ``reasoning`` (None: no think block or
    not a reasoning model), ``finish`` and optionally ``tool_calls`` (parsed calls)."""
    shaped = []
    for c in choices:
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": c["text"]}
            if c.get("reasoning") is not None:
                message["reasoning_content"] = c["reasoning"]
            if c.get("tool_calls"):
                message["tool_calls"] = tool_calls_field(c["tool_calls"])
            shaped.append({"index": c["index"], "message": message, "logprobs": None, "finish_reason": c["finish"]})
        else:
            shaped.append({"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish"]})
    return {
        "id": request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": shaped,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    kind: Kind,
    request_id: str,
    model: str,
    index: int,
    *,
    text: str = "",
    reasoning: str = "",
    role: bool = False,
    finish: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed piece of choice ``index``: new text or reasoning, the role (first chunk), parsed tool calls (all
    at once), or its finish reason."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text or role:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = tool_calls_field(tool_calls, streamed=True)
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(kind: Kind, request_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` asks for it: no choices, the usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
