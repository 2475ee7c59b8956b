"""engine.tool_calls: SFT records with tool calls (ShareGPT function_call/observation, OpenAI tool_calls/tool), their
ChatML text and exact loss masks, the Jinja template ``transformers`` renders them with, and replies read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.chat_template import (
    CHATML_TEMPLATE,
    CHATML_TEMPLATE_V1,
    IM_END,
    ChatFormatError,
    render_segments,
    render_text,
)
from engine.conversations import encode_conversation, parse_conversation
from engine.tool_calls import ToolCallError, ToolsError, ToolTurnError, normalize_tools, parse_reply

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "现在几点", "parameters": {}}}
TOOLS = [WEATHER, TIME]
BEIJING = '{"name": "get_weather", "arguments": {"city": "北京"}}'
CALL_BLOCK = f"<tool_call>\n{BEIJING}\n</tool_call>"


def call(name: str, arguments: dict, id: str = "call_1") -> dict:
    return {
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


OPENAI_RECORD = {
    "messages": [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "北京"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 25}'},
        {"role": "assistant", "content": "北京 25 度。"},
    ],
    "tools": TOOLS,
}
SHAREGPT_RECORD = {
    "conversations": [
        {"from": "human", "value": "北京天气怎么样？"},
        {"from": "function_call", "value": BEIJING},
        {"from": "observation", "value": '{"temp": 25}'},
        {"from": "gpt", "value": "北京 25 度。"},
    ],
    "system": "你是助手。",
    "tools": json.dumps([t["function"] for t in TOOLS], ensure_ascii=False),  # LLaMA-Factory: bare schemas, as text
}
SYSTEM_WITH_TOOLS = (
    "<|im_start|>system\n你是助手。\n\n# Tools\n\n你可以调用下面的函数来完成用户的请求。每个函数的签名是一行 JSON，"
    "全部写在 <tools></tools> 标签里：\n<tools>\n"
    + json.dumps(WEATHER, ensure_ascii=False)
    + "\n"
    + json.dumps(TIME, ensure_ascii=False)
    + "\n</tools>\n\n要调用函数时，把函数名和参数写成一个 JSON 对象，"
    "放进 <tool_call></tool_call> 标签，每次调用一个：\n"
    '<tool_call>\n{"name": <函数名>, "arguments": <参数的 JSON 对象>}\n</tool_call><|im_end|>\n'
)
EXPECTED = (
    SYSTEM_WITH_TOOLS + "<|im_start|>user\n北京天气怎么样？<|im_end|>\n"
    f"<|im_start|>assistant\n{CALL_BLOCK}<|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n北京 25 度。<|im_end|>\n"
)


@pytest.fixture(scope="module")
def exported(small_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tool_tok") / "hf"
    small_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(exported))


# ---------------------------------------------------------------- records -> text


@pytest.mark.parametrize("record", [OPENAI_RECORD, SHAREGPT_RECORD], ids=["openai", "sharegpt"])
def test_both_shapes_render_the_qwen_layout(record):
    messages = parse_conversation(record)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert render_text(messages) == EXPECTED


def test_text_before_calls_two_calls_and_two_results_share_a_turn():
    record = {
        "messages": [
            {"role": "user", "content": "北京天气和时间？"},
            {
                "role": "assistant",
                "content": "我来查一下。",
                "tool_calls": [call("get_weather", {"city": "北京"}, "a"), call("get_time", {}, "b")],
            },
            {"role": "tool", "tool_call_id": "a", "content": "晴"},
            {"role": "tool", "tool_call_id": "b", "content": "12:00"},
            {"role": "assistant", "content": "晴，12 点。"},
        ],
        "tools": TOOLS,
    }
    text = render_text(parse_conversation(record))
    assert (
        "<|im_start|>assistant\n我来查一下。\n"
        f"{CALL_BLOCK}\n"
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
    ) in text
    assert text.startswith("<|im_start|>system\n# Tools\n\n")  # no system prompt: the tools alone


def test_a_default_system_prompt_goes_before_the_tools_and_tools_without_calls_are_kept():
    record = {
        "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
        "tools": [TIME],
    }
    messages = parse_conversation(record, system="默认系统。")
    assert messages[0]["content"].startswith("默认系统。\n\n# Tools\n\n")
    assert json.dumps(TIME, ensure_ascii=False) in messages[0]["content"]
    # a conversation ending with a call (nothing answered yet) still teaches the call
    ends = {
        "messages": [{"role": "user", "content": "几点了"}, {"role": "assistant", "tool_calls": [call("get_time", {})]}]
    }
    assert parse_conversation(ends)[-1]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def test_conversations_without_tools_are_unchanged():
    record = {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}], "tools": []}
    assert parse_conversation(record) == [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]


def test_masks_count_calls_and_replies_never_tools_or_results(small_tokenizer):
    messages = parse_conversation(OPENAI_RECORD)
    ids, mask = encode_conversation(small_tokenizer, messages)
    counted = [(text, loss) for text, loss in render_segments(messages) if loss]
    assert [text for text, _ in counted] == [f"{CALL_BLOCK}{IM_END}", f"北京 25 度。{IM_END}"]
    runs, current = [], []
    for token, loss in zip(ids.tolist(), mask.tolist()):
        if loss:
            current.append(token)
        elif current:
            runs.append(small_tokenizer.decode(current))
            current = []
    assert runs == [f"{CALL_BLOCK}{IM_END}", f"北京 25 度。{IM_END}"]
    assert mask[-1] == 0 and ids[-1] == small_tokenizer.eos_id
    assert small_tokenizer.decode(ids[:-1].tolist()) == EXPECTED


BAD = [
    (
        {
            **SHAREGPT_RECORD,
            "conversations": [SHAREGPT_RECORD["conversations"][0], {"from": "function_call", "value": "{bad"}],
        },
        ToolCallError,
        "not valid JSON",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}],
                },
            ]
        },
        ToolCallError,
        "expected an object",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
            ]
        },
        ToolCallError,
        "no function name",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "content": "答"},
                {"role": "tool", "content": "结果"},
                {"role": "assistant", "content": "答"},
            ]
        },
        ToolTurnError,
        "turn 2 has role 'tool'; accepted only after",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "问"},
                {"from": "observation", "value": "结果"},
                {"from": "gpt", "value": "答"},
            ]
        },
        ToolTurnError,
        "turn 1 is from 'observation'",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "tool_calls": [call("f", {})]},
                {"role": "user", "content": "又问"},
                {"role": "assistant", "content": "答"},
            ]
        },
        ToolTurnError,
        "turn 1 calls tools but turn 2 is 'user'",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "tool_calls": [call("f", {}, "x")]},
                {"role": "tool", "tool_call_id": "y", "content": "r"},
                {"role": "assistant", "content": "答"},
            ]
        },
        ToolTurnError,
        "tool_call_id 'y'",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "tool_calls": [call("f", {})]},
                {"role": "tool", "content": "r"},
                {"role": "tool", "content": "r2"},
                {"role": "assistant", "content": "答"},
            ]
        },
        ToolTurnError,
        "one result a call",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "tool_calls": [call("f", {})]},
                {"role": "tool", "content": "r"},
            ]
        },
        ChatFormatError,
        "ends with a user turn",
    ),
    ({"messages": [{"role": "function", "content": "x"}]}, ChatFormatError, "role 'function'; accepted"),
    ({"conversations": [{"from": "plugin", "value": "x"}]}, ChatFormatError, "from 'plugin'; accepted"),
    ({**OPENAI_RECORD, "tools": [{"type": "retrieval"}]}, ToolsError, "only 'function' tools"),
    ({**OPENAI_RECORD, "tools": "not json"}, ToolsError, "not valid JSON"),
    ({**OPENAI_RECORD, "tools": [{"description": "无名"}]}, ToolsError, "no function name"),
]


@pytest.mark.parametrize("record, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_tool_records_raise_one_line_reasons(record, error, message):
    with pytest.raises(error, match=message) as caught:
        parse_conversation(record)
    assert "\n" not in str(caught.value)


def test_bad_tool_records_are_counted_by_reason_when_packed(small_tokenizer, tmp_path):
    from engine.format import open_packed
    from engine.pack import PackConfig, pack_corpus
    from engine.sources import Corpus, SourceOptions

    records = [OPENAI_RECORD, SHAREGPT_RECORD, *(record for record, _, _ in BAD[:8])]
    src = tmp_path / "tools.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    meta = pack_corpus(
        Corpus([str(src)], SourceOptions(max_bad=0.9)),
        small_tokenizer,
        PackConfig(out=str(tmp_path / "sft"), kind="sft", workers=1, progress=False),
    )
    assert meta["sources"]["bad"] == {"bad_tool_call": 3, "bad_tool_turn": 5}
    # the two good records render the same text: one is kept, the other dropped as its duplicate
    assert meta["n_docs"] == 1 and meta["clean"]["dropped"]["duplicate"] == 1
    files = open_packed(tmp_path / "sft")
    assert small_tokenizer.decode(np.asarray(files.tokens)[:-1].tolist()) == EXPECTED


# ---------------------------------------------------------------- the Jinja template transformers renders


def hf_view(record: dict) -> tuple[list[dict], list[dict] | None]:
    """A record's messages and tools as a transformers user passes them (arguments as dicts)."""
    messages = []
    for m in record["messages"]:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        messages.append(m)
    return messages, normalize_tools(record.get("tools")) or None


CONVERSATIONS = [
    OPENAI_RECORD,
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], "tools": [TIME]},
    {
        "messages": [
            {"role": "user", "content": "北京和上海？"},
            {
                "role": "assistant",
                "content": "查两个城市。",
                "tool_calls": [call("get_weather", {"city": "北京"}, "a"), call("get_weather", {"city": "上海"}, "b")],
            },
            {"role": "tool", "tool_call_id": "a", "content": "晴"},
            {"role": "tool", "tool_call_id": "b", "content": "雨"},
            {"role": "assistant", "content": "北京晴，上海雨。"},
            {"role": "user", "content": "几点？"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_time", {}, "c")]},
            {"role": "tool", "tool_call_id": "c", "content": "12:00"},
            {"role": "assistant", "content": "12 点。"},
        ],
        "tools": TOOLS,
    },
]


@pytest.mark.parametrize("record", CONVERSATIONS, ids=["call", "plain", "tools-no-call", "multi"])
@pytest.mark.parametrize("prompt", [False, True])
def test_transformers_renders_what_we_train_on(hf_tokenizer, record, prompt):
    messages, tools = hf_view(record)
    ours = render_text(parse_conversation(record), add_generation_prompt=prompt)
    assert hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt) == ours
    # OpenAI-style arguments (JSON text, as our server writes it) render the same
    assert (
        hf_tokenizer.apply_chat_template(record["messages"], tools=tools, tokenize=False, add_generation_prompt=prompt)
        == ours
    )


def test_the_export_ships_the_tool_template_even_for_an_old_tokenizer(small_tokenizer, exported, tmp_path):
    config = json.loads((exported / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHATML_TEMPLATE
    small_tokenizer.chat_template, kept = CHATML_TEMPLATE_V1, small_tokenizer.chat_template
    try:
        small_tokenizer.save_pretrained(tmp_path / "old")
    finally:
        small_tokenizer.chat_template = kept
    config = json.loads((tmp_path / "old" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHATML_TEMPLATE


# ---------------------------------------------------------------- replies read back


def test_replies_are_parsed_only_when_every_block_is_a_valid_call():
    assert parse_reply(CALL_BLOCK) == (None, [{"name": "get_weather", "arguments": {"city": "北京"}}])
    text, calls = parse_reply(f"我查一下。\n{CALL_BLOCK}\n{CALL_BLOCK}\n")
    assert text == "我查一下。" and len(calls) == 2
    args_as_text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert parse_reply(args_as_text) == (None, [{"name": "f", "arguments": {"a": 1}}])
    for reply in (
        "没有调用",
        "<tool_call>\n{bad json}\n</tool_call>",
        '<tool_call>\n{"name": "f"',  # cut off
        f"{CALL_BLOCK}\n然后又说话",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n["f"]\n</tool_call>',
    ):
        assert parse_reply(reply) == (reply, []), reply


def test_arguments_render_canonically():
    record = {
        "messages": [
            {"role": "user", "content": "问"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"b":1,"a":"中"}'}}]},
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "答"},
        ]
    }
    assert '{"name": "f", "arguments": {"b": 1, "a": "中"}}' in render_text(parse_conversation(record))
