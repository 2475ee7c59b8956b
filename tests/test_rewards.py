"""llama.rewards: the built-in GRPO rewards, loading them by name or from a file, weights, and the weighted score."""

from __future__ import annotations

import math

import pytest

from llama.rewards import (
    answer_part,
    contains_answer,
    exact_match,
    format_reward,
    length_window,
    load_reward,
    normalise,
    parse_rewards,
    repetition_penalty,
    score,
)

ZH_GOOD = "<think>\n中国的首都是北京。\n</think>\n\n北京。"
EN_GOOD = "<think>\nTwo plus two is four.\n</think>\n\n4!"
ZH_UNCLOSED = "<think>\n让我想想，答案大概是北京"
EN_EMPTY_ANSWER = "<think>\nThe answer is 4.\n</think>\n\n   "
ZH_LOOP = "<think>\n嗯\n</think>\n\n北京" + "我不知道答案。" * 10
EN_LOOP = "<think>\nhmm\n</think>\n\nthe answer is " + "and then " * 8
NO_THINK = "北京"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (ZH_GOOD, 1.0),
        (EN_GOOD, 1.0),
        (ZH_UNCLOSED, 0.0),
        (EN_EMPTY_ANSWER, 0.0),
        (NO_THINK, 0.0),
        ("<think>a</think><think>b</think>c", 0.0),
        ("  <think>\n\n</think>\n\nok", 1.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward("q", completion, {}) == expected


def test_answer_part():
    assert answer_part(ZH_GOOD) == "\n\n北京。"
    assert answer_part(ZH_UNCLOSED) == ""
    assert answer_part(NO_THINK) == "北京"
    assert answer_part(EN_EMPTY_ANSWER) == "\n\n   "


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  北京。 ", "北京"),
        ("北京！？", "北京"),
        ("4!\n", "4"),
        ("yes.", "yes"),
        ("北京 。", "北京"),
        ("3.14", "3.14"),
        ("。北京", "。北京"),
        ("Beijing", "Beijing"),
        ("", ""),
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_exact_match():
    assert exact_match("q", ZH_GOOD, {"answer": "北京"}) == 1.0
    assert exact_match("q", ZH_GOOD, {"answer": " 北京！"}) == 1.0
    assert exact_match("q", EN_GOOD, {"answer": "4"}) == 1.0
    assert exact_match("q", EN_GOOD, {"answer": 4}) == 1.0
    assert exact_match("q", EN_GOOD, {"answer": "5"}) == 0.0
    assert exact_match("q", ZH_GOOD, {"answer": "北"}) == 0.0
    assert exact_match("q", ZH_UNCLOSED, {"answer": "北京"}) == 0.0  # the reasoning is no answer
    assert exact_match("q", EN_EMPTY_ANSWER, {"answer": "4"}) == 0.0
    assert exact_match("q", NO_THINK, {"answer": "北京"}) == 1.0


def test_contains_answer():
    assert contains_answer("q", ZH_GOOD, {"answer": "北京"}) == 1.0
    assert contains_answer("q", ZH_GOOD, {"answer": "北"}) == 1.0
    assert contains_answer("q", ZH_LOOP, {"answer": "北京。"}) == 1.0
    assert contains_answer("q", ZH_GOOD, {"answer": "上海"}) == 0.0
    assert contains_answer("q", ZH_UNCLOSED, {"answer": "北京"}) == 0.0
    assert contains_answer("q", EN_EMPTY_ANSWER, {"answer": "4"}) == 0.0
    assert contains_answer("q", "<think>x</think>The answer is 42.", {"answer": "42"}) == 1.0


@pytest.mark.parametrize("reward", [exact_match, contains_answer])
def test_answer_rewards_refuse_missing_or_empty_answer(reward):
    with pytest.raises(ValueError, match=r"'answer' field.*keys \['question', 'solution'\]"):
        reward("q", ZH_GOOD, {"question": "首都？", "solution": "北京"})
    with pytest.raises(ValueError, match="'answer' field is empty"):
        reward("q", ZH_GOOD, {"answer": " 。"})


@pytest.mark.parametrize(
    ("completion", "expected"),
    [(ZH_GOOD, 0.0), (EN_GOOD, 0.0), (ZH_LOOP, -1.0), (EN_LOOP, -1.0), ("哈哈哈哈", 0.0), (ZH_UNCLOSED, 0.0)],
)
def test_repetition_penalty(completion, expected):
    assert repetition_penalty("q", completion, {}) == expected


def test_length_window():
    reward = length_window(10, 20, margin=10)
    assert [reward("q", "x" * n, {}) for n in (10, 15, 20)] == [1.0, 1.0, 1.0]
    assert reward("q", "x" * 5, {}) == pytest.approx(0.5)
    assert reward("q", "x" * 25, {}) == pytest.approx(0.5)
    assert reward("q", "x" * 30, {}) == 0.0
    assert reward("q", "x" * 100, {}) == 0.0
    assert reward("q", "", {}) == 0.0
    assert reward("q", "北" * 12, {}) == 1.0  # characters, not bytes
    default = length_window(0, 100)  # margin 50
    assert default("q", "x" * 125, {}) == pytest.approx(0.5)


@pytest.mark.parametrize(("args"), [(-1, 10), (20, 10), (0, 10, 0)])
def test_length_window_refuses_bad_bounds(args):
    with pytest.raises(ValueError, match="0 ≤ MIN ≤ MAX and MARGIN ≥ 1"):
        length_window(*args)


def test_load_reward_builtins():
    assert load_reward("format") is format_reward
    assert load_reward("exact_match") is exact_match
    assert load_reward("contains") is contains_answer
    assert load_reward(" repetition ") is repetition_penalty
    length = load_reward("length:10:20")
    assert length("q", "x" * 15, {}) == 1.0 and length("q", "x" * 25, {}) == pytest.approx(0.5)  # margin 10
    assert load_reward("length:10:20:5")("q", "x" * 25, {}) == 0.0


@pytest.mark.parametrize("spec", ["length:10", "length:a:b", "length:1:2:3:4", "length:-1:5"])
def test_load_reward_refuses_bad_length(spec):
    with pytest.raises(ValueError, match="length:MIN:MAX"):
        load_reward(spec)


def test_load_reward_refuses_unknown_name():
    with pytest.raises(ValueError, match="unknown reward 'formats': give one of format, exact_match"):
        load_reward("formats")


def write_rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def mentions_prompt(prompt, completion, example):\n"
        "    return 1.0 if prompt in completion else 0.0\n"
        "def bad_nan(prompt, completion, example):\n"
        "    return float('nan')\n"
        "def bad_text(prompt, completion, example):\n"
        "    return 'high'\n"
        "THRESHOLD = 3\n",
        encoding="utf-8",
    )
    return path


def test_load_reward_from_file(tmp_path):
    path = write_rewards_file(tmp_path)
    reward = load_reward(f"{path}:mentions_prompt")
    assert reward("北京", ZH_GOOD, {}) == 1.0
    assert reward("上海", ZH_GOOD, {}) == 0.0


def test_load_reward_from_file_refusals(tmp_path):
    path = write_rewards_file(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_reward(f"{tmp_path / 'absent.py'}:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_reward(f"{path}:missing")
    with pytest.raises(ValueError, match=r"'THRESHOLD' .* is not callable \(int\); name a function"):
        load_reward(f"{path}:THRESHOLD")
    with pytest.raises(ValueError, match="write path/to/file.py:function_name"):
        load_reward(f"{path}:")
    text = tmp_path / "rewards.txt"
    text.write_text("def f(p, c, e):\n    return 1.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot be imported; give a .py file"):
        load_reward(f"{text}:f")


def test_parse_rewards_weights(tmp_path):
    path = write_rewards_file(tmp_path)
    rewards = parse_rewards(
        ["format", "exact_match=2", "length:10:20=0.25", "repetition=-0.5", f"{path}:mentions_prompt=1.5"]
    )
    assert [(name, weight) for name, weight, _ in rewards] == [
        ("format", 1.0),
        ("exact_match", 2.0),
        ("length:10:20", 0.25),
        ("repetition", -0.5),
        (f"{path}:mentions_prompt", 1.5),
    ]
    assert rewards[0][2] is format_reward and rewards[3][2] is repetition_penalty


def test_parse_rewards_path_with_equals_needs_weight(tmp_path):
    folder = tmp_path / "a=b"
    folder.mkdir()
    path = write_rewards_file(folder)
    rewards = parse_rewards([f"{path}:mentions_prompt=1"])
    assert rewards[0][:2] == (f"{path}:mentions_prompt", 1.0)
    with pytest.raises(ValueError, match="NAME=WEIGHT with a finite number"):
        parse_rewards([f"{path}:mentions_prompt"])


@pytest.mark.parametrize("specs", [["format=abc"], ["format=nan"], ["format=inf"], ["=2"], ["format="]])
def test_parse_rewards_refuses_bad_weight(specs):
    with pytest.raises(ValueError, match="write NAME=WEIGHT with a finite number"):
        parse_rewards(specs)


def test_parse_rewards_refusals():
    with pytest.raises(ValueError, match="no rewards given"):
        parse_rewards([])
    with pytest.raises(ValueError, match="'format' is given twice"):
        parse_rewards(["format", "format=2"])
    with pytest.raises(ValueError, match="unknown reward 'fromat'"):
        parse_rewards(["fromat=1"])


def test_score_weighted_sum_and_values():
    rewards = parse_rewards(["format=0.5", "exact_match=2", "contains", "repetition=1", "length:0:1000"])
    total, values = score(rewards, "首都？", ZH_GOOD, {"answer": "北京"})
    assert values == {"format": 1.0, "exact_match": 1.0, "contains": 1.0, "repetition": 0.0, "length:0:1000": 1.0}
    assert total == pytest.approx(0.5 + 2 + 1 + 0 + 1)
    total, values = score(rewards, "首都？", ZH_LOOP, {"answer": "北京"})
    assert values == {"format": 1.0, "exact_match": 0.0, "contains": 1.0, "repetition": -1.0, "length:0:1000": 1.0}
    assert total == pytest.approx(0.5 + 0 + 1 - 1 + 1)
    total, values = score(rewards, "q", ZH_UNCLOSED, {"answer": "北京"})
    assert values["format"] == 0.0 and values["exact_match"] == 0.0 and values["contains"] == 0.0
    assert total == pytest.approx(1.0)


def test_score_refuses_bad_values(tmp_path):
    path = write_rewards_file(tmp_path)
    for name, shown in (("bad_nan", "nan"), ("bad_text", "'high'")):
        rewards = parse_rewards(["format", f"{path}:{name}"])
        with pytest.raises(ValueError, match=f"reward '.*:{name}' returned {shown}; a reward must return a finite"):
            score(rewards, "q", ZH_GOOD, {})
    inf = [("inf", 1.0, lambda p, c, e: math.inf)]
    with pytest.raises(ValueError, match="reward 'inf' returned inf"):
        score(inf, "q", ZH_GOOD, {})
    none = [("none", 1.0, lambda p, c, e: None)]
    with pytest.raises(ValueError, match="reward 'none' returned None"):
        score(none, "q", ZH_GOOD, {})
