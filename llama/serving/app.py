"""The FastAPI application: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``, streamed
(server-sent events) or whole, plus ``/health``, ``/stats`` (the batcher's counters) and the web chat page at ``/``.

Each handler checks the request, renders and tokenizes its prompt, and hands a :class:`~.batcher.Job` to the
:class:`~.batcher.Batcher`; it then relays the job's events as chunks, or gathers them into one answer. A client
that goes away marks its job cancelled: a streamed one when its response is torn down, a non-streamed one when a
poll of the connection finds it closed; the batcher then ends its rows.

With ``tools`` (and ``tool_choice`` "auto"), each reply is read for ``<tool_call>`` blocks
(:func:`engine.tool_calls.parse_reply`): when every block is a valid call, the choice answers ``tool_calls`` with
``finish_reason: "tool_calls"``, else its text as content. Streamed, such a choice's content is held back until it
ends (a call cannot be told from text before its block closes): its reasoning streams, then its content (if any) and
its calls come in one chunk each, then its finish reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from engine.reply_template import assistant_prefix
from engine.tokenizer import Tokenizer
from engine.tool_calls import parse_reply

from ..generation.load import InferenceInfo
from ..generation.prompts import invalid_bytes
from . import schemas
from .batcher import Batcher, Job, Sampling
from .errors import APIError, error_body, install_error_handlers
from .templates import chat_prompt, request_tools

STATIC = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass
class ServedModel:
    """The model as the API presents it: its name, tokenizer, context and the checkpoint's chat settings."""

    name: str
    tokenizer: Tokenizer
    context: int
    default_max_tokens: int = 256
    system: str | None = None  # the system prompt the checkpoint was fine-tuned with, used when a chat has none
    reasoning: bool = False  # a --template think fine-tune: <think>…</think> becomes reasoning_content
    think_off_prefix: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_checkpoint(
        cls, name: str, tokenizer: Tokenizer, info: InferenceInfo, default_max_tokens: int, system: str | None
    ) -> "ServedModel":
        reasoning = info.task.get("template") == "think"
        off = info.think_off_prefix or (assistant_prefix("think", thinking=False) if reasoning else "")
        return cls(
            name=name,
            tokenizer=tokenizer,
            context=info.model.max_seq_len,
            default_max_tokens=default_max_tokens,
            system=system if system is not None else info.task.get("system"),
            reasoning=reasoning,
            think_off_prefix=off,
        )


def create_app(served: ServedModel, batcher: Batcher) -> FastAPI:
    """The application serving ``served`` through ``batcher`` (started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="zhllm", summary="OpenAI-compatible API for a zhllm checkpoint", lifespan=lifespan)
    install_error_handlers(app)
    app.state.served, app.state.batcher = served, batcher

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": served.name}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**asdict(batcher.stats), "waiting": len(batcher.pending)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [schemas.model_card(served.name, served.context, served.created)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(served, model_id)
        return schemas.model_card(served.name, served.context, served.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Any:
        _check_model(served, body.model)
        tools = request_tools(body.tools, body.tool_choice)
        text = chat_prompt(
            body.messages,
            default_system=served.system,
            thinking=body.thinking or not served.reasoning,
            think_off_prefix=served.think_off_prefix,
            tools=tools,
        )
        prompt = _encode(served, text, "messages")
        max_tokens = _max_tokens(served, [prompt], body.length_limit, "messages")
        n = _choices(body.n, 1, batcher)
        job = Job([prompt] * n, max_tokens, _sampling(body), list(body.stop or []), served.reasoning)
        return await _answer("chat", job, body, served.name, len(prompt), request, batcher, bool(tools))

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request) -> Any:
        _check_model(served, body.model)
        prompts = [_encode(served, text, "prompt", bos=True) for text in body.prompts]
        max_tokens = _max_tokens(served, prompts, body.length_limit, "prompt")
        n = _choices(body.n, len(prompts), batcher)
        rows = [p for p in prompts for _ in range(n)]  # choice index = prompt index × n + j, as OpenAI numbers them
        job = Job(rows, max_tokens, _sampling(body), list(body.stop or []), False)
        return await _answer("text", job, body, served.name, sum(map(len, prompts)), request, batcher)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Any:
        page = STATIC / "index.html"
        if not page.is_file():
            return JSONResponse(error_body("no web page in this install", "not_found_error"), status_code=404)
        return FileResponse(page, media_type="text/html; charset=utf-8")

    return app


# ---------------------------------------------------------------- request checks


def _check_model(served: ServedModel, name: str | None) -> None:
    if name is not None and name != served.name:
        raise APIError(
            404,
            f"The model {name!r} does not exist: this server serves {served.name!r}",
            param="model",
            code="model_not_found",
        )


def _encode(served: ServedModel, text: str, param: str, bos: bool = False) -> list[int]:
    if invalid_bytes(text):
        raise APIError(400, f"{param} holds lone surrogates (\\ud800-\\udfff), not text", param=param)
    ids = served.tokenizer.encode(text)
    if not ids and bos and served.tokenizer.bos_id is not None:
        ids = [served.tokenizer.bos_id]  # an empty completion prompt starts a text from scratch
    if not ids:
        raise APIError(400, f"{param} is empty: give some text", param=param, code="invalid_value")
    return ids


def _max_tokens(served: ServedModel, prompts: list[list[int]], asked: int | None, param: str) -> int:
    """The reply length: ``asked``, or the server's default cut to the room left; a 400 when it does not fit."""
    longest = max(len(p) for p in prompts)
    room = served.context - longest
    if room < 1 or (asked is not None and asked > room):
        want = asked if asked is not None else 1
        raise APIError(
            400,
            f"This model's maximum context length is {served.context} tokens. However, you requested "
            f"{longest + want} tokens ({longest} in the {param}, {want} in the completion). Please reduce the "
            f"length of the {param} or completion.",
            param=param,
            code="context_length_exceeded",
        )
    return asked if asked is not None else min(served.default_max_tokens, room)


def _choices(n: int | None, prompts: int, batcher: Batcher) -> int:
    n = n or 1
    if n * prompts > batcher.max_rows:
        raise APIError(
            400,
            f"n={n} for {prompts} prompt(s) needs {n * prompts} rows, more than this server's --max-batch-size "
            f"{batcher.max_rows}",
            param="n",
            code="invalid_value",
        )
    return n


def _sampling(body: schemas.SamplingRequest) -> Sampling:
    temperature = 1.0 if body.temperature is None else body.temperature
    return Sampling(
        greedy=temperature == 0,
        temperature=temperature or 1.0,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
    )


# ---------------------------------------------------------------- answers


async def _answer(
    kind: schemas.Kind,
    job: Job,
    body: schemas.SamplingRequest,
    model: str,
    prompt_tokens: int,
    request: Request,
    batcher: Batcher,
    tools: bool = False,
) -> Any:
    """``tools``: read each reply for tool calls."""
    request_id = schemas.new_id(kind)
    batcher.submit(job)
    if body.stream:
        events = _stream(kind, job, request_id, model, prompt_tokens, body.include_usage, tools)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices, completion_tokens = await _gather(job, request)
    if tools:
        for choice in choices:
            choice.update(_read_calls(choice["text"], choice["finish"]))
    return schemas.completion_body(kind, request_id, model, choices, prompt_tokens, completion_tokens)


class _ConnectionWatch:
    """Checks, at most every :data:`DISCONNECT_POLL_S`, that a non-streamed request's client is still connected."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.checked = time.monotonic()

    async def gone(self) -> bool:
        if time.monotonic() - self.checked < DISCONNECT_POLL_S:
            return False
        self.checked = time.monotonic()
        return await self.request.is_disconnected()


async def _next_event(job: Job, watch: _ConnectionWatch) -> tuple:
    """The job's next event; meanwhile (even while events keep coming) polls the connection and cancels the job if
    it closed."""
    while True:
        if await watch.gone():
            job.cancelled = True
            raise APIError(499, "the client closed the connection", code="client_closed_request")  # nginx's 499
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


async def _gather(job: Job, request: Request) -> tuple[list[dict[str, Any]], int]:
    """Every choice of a non-streamed job: its text, reasoning and finish reason; and the tokens generated."""
    rows = len(job.prompts)
    content = [[] for _ in range(rows)]
    reasoning: list[list[str] | None] = [None] * rows
    finish: list[str] = ["length"] * rows
    tokens = 0
    done = False
    watch = _ConnectionWatch(request)
    try:
        while True:
            event = await _next_event(job, watch)
            if event[0] == "text":
                _, choice, more_reasoning, more = event
                content[choice].append(more)
                if more_reasoning:
                    reasoning[choice] = (reasoning[choice] or []) + [more_reasoning]
            elif event[0] == "end":
                finish[event[1]], tokens = event[2], tokens + event[3]
            elif event[0] == "error":
                raise APIError(500, f"generation failed: {event[1]}", type="server_error", code="internal_error")
            else:
                done = True
                break
    finally:
        if not done:
            job.cancelled = True
    choices = [
        {
            "index": i,
            "text": "".join(content[i]),
            "reasoning": None if reasoning[i] is None else "".join(reasoning[i]),
            "finish": finish[i],
        }
        for i in range(rows)
    ]
    return choices, tokens


def _read_calls(text: str, finish: str) -> dict[str, Any]:
    """A reply's content, calls and finish reason: ``tool_calls`` when it holds valid calls, else as it was."""
    content, calls = parse_reply(text)
    if not calls:
        return {"text": text, "tool_calls": [], "finish": finish}
    return {"text": content, "tool_calls": calls, "finish": "tool_calls"}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(
    kind: schemas.Kind,
    job: Job,
    request_id: str,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    tools: bool = False,
) -> AsyncIterator[str]:
    """The job's events as server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``. Leaving early (the
    client went away: Starlette cancels this generator) cancels the job. ``tools``: each choice's content is held
    until it ends, then sent as content and calls (:func:`_read_calls`)."""
    tokens = 0
    done = False
    held: dict[int, list[str]] = {}
    try:
        if kind == "chat":  # OpenAI's first chunk of each choice names the role
            for choice in range(len(job.prompts)):
                yield _sse(schemas.chunk(kind, request_id, model, choice, role=True))
        while True:
            event = await job.events.get()
            if event[0] == "text":
                _, choice, reasoning, content = event
                if tools:
                    held.setdefault(choice, []).append(content)
                    content = ""
                if content or reasoning:
                    yield _sse(schemas.chunk(kind, request_id, model, choice, text=content, reasoning=reasoning))
            elif event[0] == "end":
                tokens += event[3]
                finish = event[2]
                if tools:
                    read = _read_calls("".join(held.pop(event[1], [])), finish)
                    finish = read["finish"]
                    if read["text"]:
                        yield _sse(schemas.chunk(kind, request_id, model, event[1], text=read["text"]))
                    if read["tool_calls"]:
                        yield _sse(schemas.chunk(kind, request_id, model, event[1], tool_calls=read["tool_calls"]))
                yield _sse(schemas.chunk(kind, request_id, model, event[1], finish=finish))
            elif event[0] == "error":
                yield _sse(error_body(f"generation failed: {event[1]}", "server_error", code="internal_error"))
                done = True
                break
            else:
                done = True
                break
        if include_usage:
            yield _sse(schemas.usage_chunk(kind, request_id, model, prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            job.cancelled = True
