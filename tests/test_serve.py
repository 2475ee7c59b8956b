"""llama.serve: a live uvicorn server on a free localhost port, spoken to with the official ``openai`` client.

A tiny checkpoint (2 layers, dim 64, kernels="torch") over the session's small tokenizer is served for real: models
list, chat and text completions whole and streamed (equal, greedy), n, stop strings, usage counts against our
tokenizer, OpenAI error bodies and exception classes, and concurrent requests batched together. A think-template
checkpoint is served with a scripted ``generate`` (a random model never writes ``<think>``) to check the reasoning
split, thinking switched off per request, a client that goes away, and a batch that fails. Readiness is polled on
``/health``; no assertion depends on timing.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from engine.chat_template import IM_END, render_text
from llama.generation.generate import generate, generate_text
from llama.generation.load import load_for_inference
from llama.generation.sampling import GenerationResult
from llama.model import Llama, LlamaConfig
from llama.serve import build_parser, main
from llama.serving.app import ServedModel, create_app
from llama.serving.background import BackgroundServer
from llama.serving.batcher import Batcher
from llama.serving.detokenize import ReasoningSplitter, ReplyText, StopMatcher
from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_REPLY = "<think>\n推理过程，鑫龘\n</think>\n\n答案是好"
THINK_TASK = {"name": "sft", "template": "think", "think_off_prefix": EMPTY_THINK, "system": "你是一个助手。"}
QUESTION = [{"role": "user", "content": "今天天气怎么样？"}]


def save_tiny_checkpoint(out_dir: Path, tokenizer, max_seq_len: int = 256, task: dict | None = None) -> Path:
    """A checkpoint as llama.training writes it (tests/test_chat.py's, with a longer context)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len
    )
    model = Llama(config)
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 1},
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "sha256": tokenizer.sha256},
        "step": 1,
        "tokens": 64,
        "task": task,
    }
    save_checkpoint(out_dir, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out_dir


def serve(ckpt: Path, generate_fn=generate, context: int | None = None, **batching) -> BackgroundServer:
    model, tokenizer, info = load_for_inference(ckpt, device="cpu", dtype="fp32", kernels="torch")
    served = ServedModel.from_checkpoint(MODEL, tokenizer, info, default_max_tokens=16, system=None)
    if context is not None:
        served.context = context
    batcher = Batcher(model, tokenizer, generate_fn=generate_fn, **batching)
    return BackgroundServer(create_app(served, batcher)).start()


def client_of(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "run", small_tokenizer)


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    live = serve(tiny_ckpt, window_s=0.01, max_rows=8)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_of(server)


def post_raw(server: BackgroundServer, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream_chat(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict[int, str], dict[int, str], list]:
    """A streamed chat assembled: content and reasoning per choice, finish reasons, and every chunk."""
    content: dict[int, str] = {}
    reasoning: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for c in chunks:
        for choice in c.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            extra = getattr(choice.delta, "reasoning_content", None) or ""
            reasoning[choice.index] = reasoning.get(choice.index, "") + extra
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return content, reasoning, finish, chunks


# ---------------------------------------------------------------- text pieces (no server)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_reasoning_split_does_not_depend_on_how_the_text_is_cut(size):
    def run(text: str) -> tuple[str, str, bool]:
        splitter = ReasoningSplitter()
        pieces = [splitter.feed(text[i : i + size]) for i in range(0, len(text), size)] + [splitter.finish()]
        return "".join(r for r, _ in pieces), "".join(c for _, c in pieces), splitter.found

    assert run(THINK_REPLY) == ("推理过程，鑫龘", "答案是好", True)
    assert run(EMPTY_THINK + "直接回答") == ("", "直接回答", True)
    assert run("答案<think>不是推理</think>") == ("", "答案<think>不是推理</think>", False)
    assert run("<think>\n想到一半") == ("想到一半", "", True)  # the reply ended inside its block
    assert run("<thin") == ("", "<thin", False)
    assert run("<think>\n第一步\n\n第二步\n</think>\n答") == ("第一步\n\n第二步", "答", True)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_stop_strings_are_cut_wherever_the_text_is_split(size):
    def run(text: str, stops: list[str]) -> tuple[str, bool]:
        matcher = StopMatcher(stops)
        shown = "".join(matcher.feed(text[i : i + size]) for i in range(0, len(text), size)) + matcher.flush()
        return shown, matcher.stopped

    assert run("你好，世界。再见", ["。"]) == ("你好，世界", True)
    assert run("abcabd", ["abd", "xyz"]) == ("abc", True)
    assert run("abcab", ["abd"]) == ("abcab", False)  # held back while it could become a stop, then shown
    assert run("甲乙丙", ["乙丙", "甲乙丙丁"]) == ("甲", True)


def test_reply_text_never_shows_a_broken_character(small_tokenizer):
    ids = small_tokenizer.encode(THINK_REPLY)
    assert small_tokenizer.token_to_id("<0xE9>") in ids  # 鑫 and 龘 are byte-fallback pieces
    reply = ReplyText(small_tokenizer, [], split_reasoning=True)
    pieces = [reply.push(i) for i in ids] + [reply.finish()]
    assert not any("\ufffd" in r + c for r, c in pieces)
    assert "".join(r for r, _ in pieces) == "推理过程，鑫龘" and "".join(c for _, c in pieces) == "答案是好"


# ---------------------------------------------------------------- the live server


def test_help_names_the_endpoints_and_a_bad_flag_is_one_line(capsys):
    help_text = build_parser().format_help()
    for word in (
        "--ckpt",
        "--port",
        "--max-batch-size",
        "--batch-window-ms",
        "/v1/chat/completions",
        "enable_thinking",
    ):
        assert word in help_text
    assert main(["--ckpt", "nowhere", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be ≥ 1" in capsys.readouterr().err


def test_the_command_serves_a_checkpoint(tiny_ckpt):
    with socket.socket() as probe:  # a free port for the child (it binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "llama.serve", "--ckpt", str(tiny_ckpt), "--port", str(port), "--device", "cpu"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    models = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert child.poll() is None, child.stdout.read()
                assert time.monotonic() < deadline, "llama.serve did not answer in 120 s"
                time.sleep(0.05)
        assert [m["id"] for m in models["data"]] == ["run"]  # the run folder's name
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(model="run", messages=QUESTION, max_tokens=3).usage.completion_tokens
    finally:
        child.terminate()
        child.wait(timeout=30)


def test_models_list_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.get("/health")["status"] == "ok"


def test_chat_streamed_equals_whole_with_usage_counted_by_our_tokenizer(client, small_tokenizer):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, seed=1)
    content, reasoning, finish, chunks = stream_chat(
        client, model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, seed=1
    )
    message = whole.choices[0].message
    assert message.role == "assistant" and content[0] == message.content
    assert reasoning[0] == "" and getattr(message, "reasoning_content", None) is None  # not a reasoning model
    assert finish[0] == whole.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    prompt = render_text([*QUESTION], add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(small_tokenizer.encode(prompt))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 24
    else:  # the model ended it: the stop token is counted, as vLLM counts it
        assert whole.usage.completion_tokens == len(small_tokenizer.encode(message.content)) + 1


def test_chat_greedy_matches_our_generate(client, small_tokenizer, tiny_ckpt):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    model, tokenizer, _ = load_for_inference(tiny_ckpt, device="cpu", dtype="fp32", kernels="torch")
    from llama.generation.generate import generate_text

    expected = generate_text(
        model, tokenizer, [render_text(QUESTION, add_generation_prompt=True)], 12, do_sample=False
    ).texts[0]
    assert whole.choices[0].message.content == expected


def test_completions_whole_streamed_n_and_usage(client, small_tokenizer):
    prompt = "今天天气很好"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10)
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, stream=True))
    assert whole.object == "text_completion"
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert whole.usage.prompt_tokens == len(small_tokenizer.encode(prompt))

    two = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=8, temperature=0.9, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.usage.prompt_tokens == len(small_tokenizer.encode(prompt))
    assert two.usage.completion_tokens <= 16
    again = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=8, temperature=0.9, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]  # the seed makes sampling reproducible

    chat_two = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=6, temperature=1.0)
    assert sorted(c.index for c in chat_two.choices) == [0, 1]
    content, _, finish, _ = stream_chat(client, model=MODEL, messages=QUESTION, n=2, max_tokens=6, temperature=0)
    assert set(content) == {0, 1} and content[0] == content[1] and set(finish) == {0, 1}

    batch = client.completions.create(model=MODEL, prompt=["你好", "再见"], max_tokens=4, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    assert batch.usage.prompt_tokens == len(small_tokenizer.encode("你好")) + len(small_tokenizer.encode("再见"))


def test_stop_strings_cut_the_reply_whole_and_streamed(client):
    free = client.completions.create(model=MODEL, prompt="我们", temperature=0, max_tokens=30).choices[0].text
    assert len(free) >= 6, f"the tiny model ended its text too soon to test stop strings: {free!r}"
    stop = free[4:6]
    expected = free[: free.find(stop)]
    cut = client.completions.create(model=MODEL, prompt="我们", temperature=0, max_tokens=30, stop=[stop, "不会出现的"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = list(
        client.completions.create(model=MODEL, prompt="我们", temperature=0, max_tokens=30, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_stream_include_usage_sends_a_last_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),  # more rows than --max-batch-size
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"presence_penalty": 1.0}, None),
        ({"logprobs": True}, None),
    ],
)
def test_bad_parameters_are_400_in_openai_shape(client, kwargs, param):
    request = {"model": MODEL, "messages": QUESTION, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param
    # and the server carries on
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices


def test_unknown_model_is_404_and_too_long_a_prompt_is_context_length_exceeded(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")

    long_text = "今天天气很好" * 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="你好", max_tokens=256)  # the prompt leaves less room
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "prompt"
    assert client.completions.create(model=MODEL, prompt="你好", max_tokens=2).choices


def test_invalid_json_and_unknown_routes_answer_in_openai_shape(server):
    status, body = post_raw(server, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post_raw(server, "/v1/completions", b'{"model": "tiny"}')
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = post_raw(server, "/v1/embeddings", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post_raw(server, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert status == 400
    assert server.get("/health")["status"] == "ok"


def test_the_chat_page_is_served(server):
    with urllib.request.urlopen(server.url + "/", timeout=10) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode("utf-8")
    assert "<html" in page and "/v1/chat/completions" in page


# ---------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(tiny_ckpt, small_tokenizer):
    # the window is long and closes as soon as 8 rows wait: all 8 requests land in one batch, whatever the timing
    live = serve(tiny_ckpt, window_s=120.0, max_rows=8)
    try:
        client = client_of(live)
        questions = [f"第{i}个问题：{'天气' * (i + 1)}怎么样？" for i in range(8)]

        def ask(question: str) -> str:
            messages = [{"role": "user", "content": question}]
            return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, questions))
        stats = live.get("/stats")
        assert stats["largest_batch_requests"] == 8 and stats["batches_with_several_requests"] >= 1
    finally:
        live.stop()
    model, tokenizer, _ = load_for_inference(tiny_ckpt, device="cpu", dtype="fp32", kernels="torch")
    from llama.generation.generate import generate_text

    for question, answer in zip(questions, answers):  # each row got its own prompt's reply (left padding is exact)
        prompt = render_text([{"role": "user", "content": question}], add_generation_prompt=True)
        alone = generate_text(model, tokenizer, [prompt], 8, do_sample=False)
        assert answer.choices[0].message.content == alone.texts[0]
        assert answer.usage.completion_tokens == len(alone.sequences[0])


# ---------------------------------------------------------------- reasoning, disconnects, failures (scripted model)


def scripted_generate(tokenizer, reply: str, prompts_seen: list, forever: bool = False):
    """A stand-in for ``generate`` streaming ``reply`` then ``<|im_end|>`` to every row; ``forever``: the reply's
    first token again and again until the batcher stops it; a prompt holding "boom" fails the batch."""
    ids = tokenizer.encode(reply) + [tokenizer.token_to_id(IM_END)]

    def fake(model, prompts, max_new_tokens, *, stream=None, **options) -> GenerationResult:
        prompts_seen.extend(list(p) for p in prompts)
        if any("boom" in tokenizer.decode(p) for p in prompts):
            raise RuntimeError("CUDA out of memory (scripted)")
        if forever:
            while True:  # ends only when the stream callback raises (every row ended)
                for row in range(len(prompts)):
                    stream(row, ids[0])
                time.sleep(0.005)
        for token in ids:
            for row in range(len(prompts)):
                stream(row, token)
        return GenerationResult([ids] * len(prompts), [True] * len(prompts), 0.0, 0.0)

    return fake


@pytest.fixture(scope="module")
def think_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve_think") / "run", small_tokenizer, task=THINK_TASK)


def test_think_model_splits_reasoning_and_thinking_can_be_switched_off(think_ckpt, small_tokenizer):
    prompts: list[list[int]] = []
    live = serve(think_ckpt, scripted_generate(small_tokenizer, THINK_REPLY, prompts), window_s=0.0, max_rows=4)
    try:
        client = client_of(live)
        whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=64)
        message = whole.choices[0].message
        assert message.reasoning_content == "推理过程，鑫龘" and message.content == "答案是好"
        assert whole.choices[0].finish_reason == "stop"
        assert whole.usage.completion_tokens == len(small_tokenizer.encode(THINK_REPLY)) + 1
        prompt = small_tokenizer.decode(prompts[-1])
        assert prompt.startswith("<|im_start|>system\n你是一个助手。<|im_end|>")  # the checkpoint's system prompt
        assert prompt.endswith("<|im_start|>assistant\n")

        content, reasoning, finish, _ = stream_chat(client, model=MODEL, messages=QUESTION, max_tokens=64)
        assert (content[0], reasoning[0], finish[0]) == ("答案是好", "推理过程，鑫龘", "stop")

        for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}):
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=64, extra_body=extra)
            assert small_tokenizer.decode(prompts[-1]).endswith("<|im_start|>assistant\n" + EMPTY_THINK)
        history = [*QUESTION, {"role": "assistant", "content": "晴天。"}, {"role": "user", "content": "明天呢？"}]
        client.chat.completions.create(model=MODEL, messages=history, max_tokens=64)
        assert f"<|im_start|>assistant\n{EMPTY_THINK}晴天。<|im_end|>" in small_tokenizer.decode(prompts[-1])

        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                extra_body={"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}},
            )

        # a batch that fails answers 500 (streamed: an error event) and the server carries on
        boom = [{"role": "user", "content": "boom"}]
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=boom)
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(model=MODEL, messages=boom, stream=True))
        again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=64)
        assert again.choices[0].message.content == "答案是好"
        assert live.get("/stats")["failed_batches"] == 2
    finally:
        live.stop()


def test_a_client_that_goes_away_stops_its_row(think_ckpt, small_tokenizer):
    prompts: list[list[int]] = []
    never_ending = scripted_generate(small_tokenizer, "好", prompts, forever=True)
    live = serve(think_ckpt, never_ending, context=10**9, window_s=0.0, max_rows=4)
    try:
        for stream in (True, False):
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 10**8, "stream": stream}
            before = live.get("/stats")
            connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            if stream:
                response = connection.getresponse()
                assert response.status == 200 and response.readline().startswith(b"data: ")
            else:  # wait until its batch runs, so that leaving stops a running row
                deadline = time.monotonic() + 60
                while live.get("/stats")["batches"] < 2 - stream and time.monotonic() < deadline:
                    time.sleep(0.02)
            connection.sock.shutdown(2)
            connection.close()
            deadline = time.monotonic() + 60  # the row never ends by itself: only the disconnect can end it
            while live.get("/stats")["cancelled_rows"] == before["cancelled_rows"] and time.monotonic() < deadline:
                time.sleep(0.02)
            stats = live.get("/stats")
            assert stats["cancelled_rows"] == before["cancelled_rows"] + 1
            assert stats["stopped_early"] == before["stopped_early"] + 1
        client = client_of(live)  # and the model is free for the next request
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    finally:
        live.stop()


def test_concurrent_streams_each_end_with_done(server):
    results: list[bytes] = []
    lock = threading.Lock()

    def stream_raw() -> None:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "stream": True}
        request = urllib.request.Request(
            server.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        with lock:
            results.append(data)

    threads = [threading.Thread(target=stream_raw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for data in results:
        lines = [line for line in data.decode("utf-8").split("\n\n") if line]
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_a_quantised_model_is_served(tiny_ckpt, small_tokenizer):
    """``--quant`` reaches load_for_inference: an int8 model answers, greedy, as our generate does with it."""
    model, tokenizer, info = load_for_inference(tiny_ckpt, device="cpu", dtype="fp32", kernels="torch", quant="int8")
    served = ServedModel.from_checkpoint(MODEL, tokenizer, info, default_max_tokens=16, system=None)
    with BackgroundServer(create_app(served, Batcher(model, tokenizer, window_s=0.0))) as live:
        reply = client_of(live).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    prompt = render_text(QUESTION, add_generation_prompt=True)
    expected = generate_text(model, small_tokenizer, [prompt], 8).texts[0]
    assert reply.choices[0].message.content == expected and reply.usage.completion_tokens >= 1


# ---------------------------------------------------------------- tool calls (scripted model)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
SHANGHAI_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海", "days": 2}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_server(tiny_ckpt, small_tokenizer):
    """A plain checkpoint whose scripted model says ``script["reply"]``; the prompts it saw in ``script["prompts"]``."""
    script: dict = {"reply": CALL_BLOCK, "prompts": []}

    def fake(model, prompts, max_new_tokens, *, stream=None, **options):
        run = scripted_generate(small_tokenizer, script["reply"], script["prompts"])
        return run(model, prompts, max_new_tokens, stream=stream, **options)

    live = serve(tiny_ckpt, fake, context=4096, window_s=0.0, max_rows=4)  # the scripted model needs no room
    live.script = script
    yield live
    live.stop()


def ask_tools(server, reply: str, **kwargs):
    server.script["reply"] = reply
    request = {"model": MODEL, "messages": QUESTION, "tools": [WEATHER_TOOL], "max_tokens": 512, **kwargs}
    return client_of(server).chat.completions.create(**request)


def test_a_tool_call_is_parsed_and_the_tools_are_in_the_prompt(tool_server, small_tokenizer):
    from engine.chat_template import render_text
    from engine.tool_calls import lower_tool_turns

    answer = ask_tools(tool_server, CALL_BLOCK)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    expected = render_text(lower_tool_turns(QUESTION, [WEATHER_TOOL]), add_generation_prompt=True)
    assert small_tokenizer.decode(tool_server.script["prompts"][-1]) == expected
    assert (
        expected.startswith("<|im_start|>system\n# Tools\n\n")
        and json.dumps(WEATHER_TOOL, ensure_ascii=False) in expected
    )


def test_text_then_two_calls(tool_server):
    choice = ask_tools(tool_server, "我查一下。\n" + CALL_BLOCK + "\n" + SHANGHAI_BLOCK).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "我查一下。"
    calls = choice.message.tool_calls
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "北京"}, {"city": "上海", "days": 2}]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(
    "reply",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": 北京}}\n</tool_call>',  # not JSON
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}',  # never closed
        CALL_BLOCK + "\n然后我又说了话",  # text after the calls
    ],
)
def test_a_malformed_call_comes_back_as_content(tool_server, reply):
    choice = ask_tools(tool_server, reply).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == reply and not choice.message.tool_calls


def test_tool_choice_none_neither_renders_tools_nor_parses(tool_server, small_tokenizer):
    choice = ask_tools(tool_server, CALL_BLOCK, tool_choice="none").choices[0]
    assert choice.message.content == CALL_BLOCK and not choice.message.tool_calls and choice.finish_reason == "stop"
    assert small_tokenizer.decode(tool_server.script["prompts"][-1]) == render_text(QUESTION, True)
    assert ask_tools(tool_server, CALL_BLOCK, tool_choice="auto").choices[0].finish_reason == "tool_calls"


def test_a_history_with_calls_and_results_is_rendered_as_in_training(tool_server, small_tokenizer):
    from engine.conversations import parse_conversation

    history = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "北京和上海的天气？"},
        {
            "role": "assistant",
            "content": "我查一下。",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"上海"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "晴"},
        {"role": "tool", "tool_call_id": "call_b", "content": "雨"},
    ]
    answer = ask_tools(tool_server, "北京晴，上海雨。", messages=history)
    assert answer.choices[0].message.content == "北京晴，上海雨。" and answer.choices[0].finish_reason == "stop"
    trained = parse_conversation(
        {"messages": [*history, {"role": "assistant", "content": "北京晴，上海雨。"}], "tools": [WEATHER_TOOL]}
    )
    prompt = small_tokenizer.decode(tool_server.script["prompts"][-1])
    assert prompt == render_text(trained[:-1], add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>' in prompt
    assert (
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\n雨\n</tool_response><|im_end|>\n"
        in prompt
    )


def test_streamed_tool_calls_come_whole_at_the_end(tool_server):
    tool_server.script["reply"] = "我查一下。\n" + CALL_BLOCK
    chunks = list(
        client_of(tool_server).chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=512, stream=True
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == "我查一下。" and finish == ["tool_calls"]
    (call,) = calls
    assert call.index == 0 and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    # plain text streams as before when the reply holds no call
    tool_server.script["reply"] = "今天晴。"
    content, _, finish, _ = stream_chat(client_of(tool_server), model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL])
    assert (content[0], finish[0]) == ("今天晴。", "stop")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": [{"type": "function", "function": {"description": "无名"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        (
            {
                "messages": [
                    *QUESTION,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "r"},
                ]
            },
            "messages.1.tool_calls",
        ),
        (
            {"messages": [*QUESTION, {"role": "assistant", "content": "答"}, {"role": "tool", "content": "r"}]},
            "messages.2.role",
        ),
    ],
)
def test_bad_tools_are_400_in_openai_shape(tool_server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask_tools(tool_server, CALL_BLOCK, **kwargs)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"
