"""Fault suite, inference: chat, generate and evaluate fed hostile input (bytes that are not UTF-8, a checkpoint
never fine-tuned for chat, prompt files with bad lines, multiple-choice questions that cannot be scored).

Each case ends in a one-line ``error: …`` (or, inside a chat, an error line that keeps the conversation), counts
what it skips, and leaves its inputs unchanged. The model is the tiny checkpoint of ``tests/test_chat.py`` on CPU.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

import llama.chat as chat_module
import llama.evaluate as evaluate_module
import llama.generate as generate_module
from llama.generation.generate import generate_text
from llama.generation.load import load_for_inference
from tests.faults import assert_one_line_error, assert_unchanged, snapshot
from tests.test_chat import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = ["--kernels", "torch", "--device", "cpu"]
SFT_TASK = {"name": "sft", "template": "chatml"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pre") / "run", small_tokenizer)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sft") / "run", small_tokenizer, task=SFT_TASK)


def piped_stdin(monkeypatch, data: bytes) -> None:
    """``sys.stdin`` as a strict UTF-8 pipe holding ``data``, as a terminal or ``echo … |`` hands it over."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="strict"))


def spy_prompts(monkeypatch, tokenizer) -> list[str]:
    """Record the decoded prompt of every reply the chat generates (the real model still answers)."""
    seen: list[str] = []
    real = chat_module.generate

    def spy(model, prompts, max_new_tokens, **options):
        seen.append(tokenizer.decode(prompts[0]))
        return real(model, prompts, max_new_tokens, **options)

    monkeypatch.setattr(chat_module, "generate", spy)
    return seen


# ---------------------------------------------------------------- chat


def test_chat_stdin_line_that_is_not_utf8_is_an_error_line_and_the_conversation_goes_on(
    fine_tuned, small_tokenizer, monkeypatch, capsys
):
    seen = spy_prompts(monkeypatch, small_tokenizer)
    piped_stdin(monkeypatch, "你好\n".encode() + b"\xc4\xe3\xba\xc3 gbk\n" + "再见\n".encode())
    code = chat_module.main(["--ckpt", str(fine_tuned), "--max-new-tokens", "3", "--greedy", *CPU])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not valid UTF-8" in errors[0] and "conversation is kept" in errors[0]
    assert len(seen) == 2 and "你好" in seen[1] and "再见" in seen[1]  # the first turn survived the bad line


def test_chat_system_command_that_is_not_utf8_keeps_the_system_prompt(fine_tuned, small_tokenizer, monkeypatch, capsys):
    seen = spy_prompts(monkeypatch, small_tokenizer)
    piped_stdin(monkeypatch, "/system 你是助手\n".encode() + b"/system \xff\n" + "你好\n".encode())
    code = chat_module.main(["--ckpt", str(fine_tuned), "--max-new-tokens", "3", "--greedy", *CPU])
    err = capsys.readouterr().err
    assert code == 0 and "not valid UTF-8" in err
    assert len(seen) == 1 and seen[0].startswith("<|im_start|>system\n你是助手")


def test_chat_prompt_argument_that_is_not_utf8_is_one_line(fine_tuned, capsys):
    code = chat_module.main(["--ckpt", str(fine_tuned), "--prompt", "你好\udcff", "--greedy", *CPU])
    assert_one_line_error(code, capsys.readouterr().err, "--prompt", "not valid UTF-8")


def test_chat_on_a_pretrained_checkpoint_warns_once(pretrained, small_tokenizer, monkeypatch, caplog):
    piped_stdin(monkeypatch, "你好\n再见\n".encode())
    with caplog.at_level(logging.WARNING, logger="llama.chat"):
        code = chat_module.main(["--ckpt", str(pretrained), "--max-new-tokens", "2", "--greedy", *CPU])
    warnings = [r.getMessage() for r in caplog.records if "never fine-tuned" in r.getMessage()]
    assert code == 0 and len(warnings) == 1 and "llama.sft" in warnings[0]


def test_chat_on_a_fine_tuned_checkpoint_does_not_warn(fine_tuned, monkeypatch, caplog):
    piped_stdin(monkeypatch, "你好\n".encode())
    with caplog.at_level(logging.WARNING, logger="llama.chat"):
        assert chat_module.main(["--ckpt", str(fine_tuned), "--max-new-tokens", "2", "--greedy", *CPU]) == 0
    assert not [r for r in caplog.records if "never fine-tuned" in r.getMessage()]


# ---------------------------------------------------------------- generate


def test_generate_writes_one_greedy_completion_per_prompt_line(pretrained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("中国人民\n\n今天天气\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["--ckpt", str(pretrained), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4"]
    assert generate_module.main([*argv, "--greedy", "--batch-size", "1", *CPU]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["prompt"]) for r in rows] == [(1, "中国人民"), (3, "今天天气")]
    model, tokenizer, _ = load_for_inference(pretrained, kernels="torch", device="cpu")
    for row in rows:
        expected = generate_text(model, tokenizer, [row["prompt"]], max_new_tokens=4)
        assert row["completion"] == expected.texts[0] and row["finished"] == expected.finished[0]
        assert 1 <= row["new_tokens"] <= 4


def test_generate_chat_renders_each_prompt_as_a_user_turn(fine_tuned, tmp_path, monkeypatch):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"prompt": "你好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    seen: list[list[int]] = []
    real = generate_module.generate
    monkeypatch.setattr(generate_module, "generate", lambda m, p, n, **o: seen.extend(p) or real(m, p, n, **o))
    argv = ["--ckpt", str(fine_tuned), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--chat"]
    assert generate_module.main([*argv, "--system", "助手", "--max-new-tokens", "2", "--greedy", *CPU]) == 0
    _, tokenizer, _ = load_for_inference(fine_tuned, kernels="torch", device="cpu")
    expected = "<|im_start|>system\n助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(seen[0]) == expected


def test_generate_skips_and_counts_lines_that_are_not_utf8_or_not_json(pretrained, tmp_path, caplog):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes('"好"\n'.encode() + b'"\xff"\n' + b"{not json\n" + b'{"prompt": ""}\n')
    out = tmp_path / "o.jsonl"
    with caplog.at_level(logging.WARNING):
        argv = ["--ckpt", str(pretrained), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "2"]
        assert generate_module.main([*argv, "--greedy", *CPU]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1
    assert "3 line(s) skipped (empty: 1, not_json: 1, not_utf8: 1)" in caplog.text


@pytest.mark.parametrize(
    "content, needles",
    [(b"", ["holds no prompt"]), (b"\xff\xfe\n", ["holds no prompt", "not_utf8: 1"])],
    ids=["empty", "all-bad"],
)
def test_generate_with_no_usable_prompt_is_one_line(pretrained, tmp_path, capsys, content, needles):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(content)
    code = generate_module.main(["--ckpt", str(pretrained), "--prompts", str(prompts), *CPU])
    assert_one_line_error(code, capsys.readouterr().err, *needles)


def test_generate_refuses_to_overwrite_its_prompt_file(pretrained, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("你好\n", encoding="utf-8")
    before = snapshot(tmp_path)
    code = generate_module.main(["--ckpt", str(pretrained), "--prompts", str(prompts), "--out", str(prompts), *CPU])
    assert_one_line_error(code, capsys.readouterr().err, "--out", "overwritten")
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1"),
        (["--max-new-tokens", "500"], "leaves no room"),
        (["--batch-size", "0"], "--batch-size must be ≥ 1"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--system", "x"], "only with --chat"),
    ],
)
def test_generate_bad_values_are_one_line(pretrained, tmp_path, capsys, flags, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("你好\n", encoding="utf-8")
    code = generate_module.main(["--ckpt", str(pretrained), "--prompts", str(prompts), *flags, *CPU])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_generate_missing_prompt_file_is_one_line(pretrained, tmp_path, capsys):
    code = generate_module.main(["--ckpt", str(pretrained), "--prompts", str(tmp_path / "nope.txt"), *CPU])
    assert_one_line_error(code, capsys.readouterr().err, "no such file")


# ---------------------------------------------------------------- evaluate --choices


def test_choices_of_the_same_text_are_skipped_and_counted_not_scored(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"question": "选一个", "choices": ["好", "好"], "answer": 0},
        {"question": "选一个", "choices": ["北京", "上海", " 北京 "], "answer": 1},
        {"question": "选一个", "choices": ["北京", "上海"], "answer": 0},
    ]
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows) + b'{"q": "\xff"}\n')
    records, bad = evaluate_module.read_choice_records(path)
    assert len(records) == 1 and bad == {"duplicate_choices": 2, "not_utf8": 1}


def test_a_choices_file_of_only_duplicates_is_one_line(pretrained, tmp_path, capsys):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "选一个", "choices": ["好", "好"], "answer": 0}) + "\n", encoding="utf-8")
    code = evaluate_module.main(["--ckpt", str(pretrained), "--choices", str(path), *CPU])
    assert_one_line_error(code, capsys.readouterr().err, "duplicate_choices")


def test_evaluate_on_a_bare_bin_names_its_own_flag(pretrained, tmp_path, capsys):
    bare = tmp_path / "bare.bin"
    bare.write_bytes(bytes(2 * 600))  # 600 zero ids: a few windows of the model's 128
    code = evaluate_module.main(["--ckpt", str(pretrained), "--ppl", str(bare), *CPU])
    assert_one_line_error(code, capsys.readouterr().err, "--bin-dtype")
    assert evaluate_module.main(["--ckpt", str(pretrained), "--ppl", str(bare), "--bin-dtype", "uint16", *CPU]) == 0
