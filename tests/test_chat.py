"""llama.chat and llama.generation.load: turns, /system and /reset through stdin, one-shot --prompt, streaming that
never
shows a broken character, hidden reasoning, history cut to the context, and the one-line refusals.

The model is tiny (2 layers, dim 64, kernels="torch") over the session's small tokenizer, saved as a checkpoint
that names that tokenizer, so everything runs the real load path on CPU in a few seconds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama.chat as chat_module
from engine.chat_template import IM_END
from llama.chat import ChatOptions, ChatSession, IncrementalDecoder, ThinkFilter, main, run_repl
from llama.formats.hf import export_hf
from llama.generation.generate import generate
from llama.generation.load import LoadError, load_for_inference
from llama.generation.sampling import GenerationResult
from llama.model import Llama, LlamaConfig
from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters

REPO = Path(__file__).resolve().parents[1]
THINK_REPLY = "<think>\n推理过程\n</think>\n\n答案是好"
EMPTY_THINK = "<think>\n\n</think>\n\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def tiny_config(vocab_size: int, max_seq_len: int = 128) -> LlamaConfig:
    return LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=max_seq_len)


def save_tiny_checkpoint(
    out_dir: Path, tokenizer, sha256: str | None = None, max_seq_len: int = 128, task: dict | None = None
) -> Path:
    """A checkpoint as llama.training writes it, naming ``tokenizer`` (or a made-up ``sha256``) as its own."""
    torch.manual_seed(0)
    config = tiny_config(tokenizer.vocab_size, max_seq_len)
    model = Llama(config)
    reference = {"path": str(Path(tokenizer.path).resolve()), "sha256": sha256 or tokenizer.sha256}
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 1},
        "tokenizer": reference,
        "step": 1,
        "tokens": 64,
        "task": task,
    }
    save_checkpoint(out_dir, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out_dir


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "run", small_tokenizer)


def fake_generate(tokenizer, reply: str, prompts_seen: list[list[int]]):
    """A stand-in for llama.generation.generate.generate that streams ``reply`` then ``<|im_end|>``, recording each
    prompt."""
    ids = tokenizer.encode(reply) + [tokenizer.token_to_id(IM_END)]

    def fake(model, prompts, max_new_tokens, *, stream=None, **options) -> GenerationResult:
        prompts_seen.append(list(prompts[0]))
        for token in ids:
            stream(0, token)
        return GenerationResult([ids], [True], 0.0, 0.0)

    return fake


# ---------------------------------------------------------------- streaming pieces


def test_incremental_decoder_never_shows_a_broken_character(small_tokenizer):
    text = "今天鑫龘很好，Hello 世界\n"
    ids = small_tokenizer.encode(text)
    first_byte = small_tokenizer.token_to_id("<0xE9>")  # 鑫 and 龘 are rare: each is three byte-fallback pieces
    assert first_byte in ids and ids.count(first_byte) == 2
    decoder = IncrementalDecoder(small_tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == small_tokenizer.decode(ids) == text
    start = ids.index(first_byte)
    assert pieces[start] == pieces[start + 1] == "" and pieces[start + 2] == "鑫"  # held until the third byte

    broken = IncrementalDecoder(small_tokenizer)  # a reply cut mid-character shows the break only at the end
    assert [broken.push(i) for i in ids[: start + 2]][-2:] == ["", ""]
    assert broken.flush().endswith("\ufffd")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_think_filter_hides_a_leading_block_split_anywhere(size):
    def run(text: str) -> str:
        hide = ThinkFilter()
        shown = "".join(hide.feed(text[i : i + size]) for i in range(0, len(text), size))
        return shown + hide.finish()

    assert run(THINK_REPLY) == "答案是好"
    assert run("  " + THINK_REPLY + "\n") == "答案是好\n"
    assert run("答案<think>不是推理</think>") == "答案<think>不是推理</think>"  # only a block that opens the reply
    assert run("<thin") == "<thin"
    hide = ThinkFilter()
    assert hide.feed("<think>还在想") == "" and hide.finish() == "" and hide.unclosed


# ---------------------------------------------------------------- the session


def test_chat_cli_through_stdin_keeps_turns_and_obeys_system_and_reset(chat_ckpt, small_tokenizer, monkeypatch, capsys):
    prompts: list[str] = []
    replies: list[str] = []

    def spy(model, prompt_ids, max_new_tokens, **options):
        prompts.append(small_tokenizer.decode(prompt_ids[0]))
        result = generate(model, prompt_ids, max_new_tokens, **options)
        seq = result.sequences[0]
        replies.append(small_tokenizer.decode(seq[:-1] if result.finished[0] else seq))
        return result

    monkeypatch.setattr(chat_module, "generate", spy)
    monkeypatch.setattr(
        sys,
        "stdin",
        io.StringIO("你好\n今天天气怎么样\n/system 你是一个助手。\n第三句\n/reset\n第四句\n/exit\n第五句不会被读到\n"),
    )
    code = main(
        ["--ckpt", str(chat_ckpt), "--max-new-tokens", "4", "--greedy", "--kernels", "torch", "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(prompts) == 4
    first, second, third, fourth = prompts
    assert first == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert (
        second == first + replies[0] + "<|im_end|>\n<|im_start|>user\n今天天气怎么样<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        third
        == "<|im_start|>system\n你是一个助手。<|im_end|>\n<|im_start|>user\n第三句<|im_end|>\n<|im_start|>assistant\n"
    )
    assert fourth.startswith("<|im_start|>system\n你是一个助手。") and "第三句" not in fourth and "第四句" in fourth
    assert "conversation cleared" in out.err
    assert out.out == "".join(reply + "\n" for reply in replies)  # each reply streamed whole, then a newline


def test_one_shot_prompt_prints_the_answer_and_exits(chat_ckpt, small_tokenizer):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama.chat",
            "--ckpt",
            str(chat_ckpt),
            "--prompt",
            "你好",
            "--max-new-tokens",
            "5",
            "--greedy",
            "--kernels",
            "torch",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    model, tokenizer, _ = load_for_inference(chat_ckpt, kernels="torch", device="cpu")
    prompt = tokenizer.encode("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    result = generate(model, [prompt], 5, eos_ids=chat_module.stop_token_ids(tokenizer))
    seq = result.sequences[0]
    assert proc.stdout == tokenizer.decode(seq[:-1] if result.finished[0] else seq) + "\n"


def test_no_think_hides_the_reasoning_and_keeps_only_the_answer(small_tokenizer, monkeypatch):
    model = Llama(tiny_config(small_tokenizer.vocab_size))
    prompts: list[list[int]] = []
    monkeypatch.setattr(chat_module, "generate", fake_generate(small_tokenizer, THINK_REPLY, prompts))

    out = io.StringIO()
    hidden = ChatSession(model, small_tokenizer, ChatOptions(max_new_tokens=32, think=False), out=out)
    assert hidden.reply("问题") == "答案是好"
    assert out.getvalue() == "答案是好\n"
    assert hidden.messages[-1] == {"role": "assistant", "content": "答案是好"}

    out = io.StringIO()
    shown = ChatSession(model, small_tokenizer, ChatOptions(max_new_tokens=32, think=True), out=out)
    shown.reply("问题")
    assert out.getvalue() == THINK_REPLY + "\n" and shown.messages[-1]["content"] == THINK_REPLY

    monkeypatch.setattr(chat_module, "generate", fake_generate(small_tokenizer, "<thin", prompts))
    out = io.StringIO()  # text that only starts like the marker is shown once the reply ends
    assert (
        ChatSession(model, small_tokenizer, ChatOptions(max_new_tokens=32, think=False), out=out).reply("问") == "<thin"
    )
    assert out.getvalue() == "<thin\n"

    monkeypatch.setattr(chat_module, "generate", fake_generate(small_tokenizer, THINK_REPLY, prompts))
    # a --template think fine-tune: --no-think asks for a direct answer; past answers are rendered after the empty block
    think_model = ChatSession(
        model,
        small_tokenizer,
        ChatOptions(max_new_tokens=32, think=False),
        think_off_prefix=EMPTY_THINK,
        out=io.StringIO(),
    )
    prompts.clear()
    think_model.reply("一")
    think_model.reply("二")
    assert small_tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert f"<|im_start|>assistant\n{EMPTY_THINK}答案是好<|im_end|>" in small_tokenizer.decode(prompts[1])


def test_history_is_cut_from_the_oldest_turns_to_fit_the_context(small_tokenizer, monkeypatch, caplog):
    model = Llama(tiny_config(small_tokenizer.vocab_size, max_seq_len=128))
    prompts: list[list[int]] = []
    monkeypatch.setattr(chat_module, "generate", fake_generate(small_tokenizer, "好的，我知道了。", prompts))
    session = ChatSession(
        model, small_tokenizer, ChatOptions(max_new_tokens=24), system="你是助手。", out=io.StringIO()
    )
    questions = [f"第{n}个问题是什么呢" for n in "一二三四五六"]
    with caplog.at_level(logging.WARNING, logger="llama.chat"):
        for question in questions:
            session.reply(question)
    assert all(len(p) + 24 <= 128 for p in prompts)
    assert questions[0] in small_tokenizer.decode(prompts[1])  # kept while it fits
    assert "oldest turn(s)" in caplog.text
    last = small_tokenizer.decode(prompts[-1])
    assert last.startswith("<|im_start|>system\n你是助手。") and questions[-1] in last and questions[0] not in last
    assert session.messages[-2]["content"] == questions[-1] and len(session.messages) < 2 * len(questions)

    before = list(session.messages)
    with pytest.raises(ValueError, match="shorten it"):
        session.prompt_ids("很长" * 60)
    assert session.messages == before  # a message that cannot fit costs the history nothing

    notices = io.StringIO()  # in the chat, it is reported and the conversation goes on
    run_repl(session, io.StringIO("很长" * 60 + "\n" + "短的\n"), notices)
    assert "error: this message needs" in notices.getvalue()
    assert small_tokenizer.decode(prompts[-1]).endswith("短的<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- loading and refusals


def test_a_tokenizer_of_another_vocabulary_is_refused_naming_both_sha256s(tmp_path, small_tokenizer, capsys):
    other = "ab" * 32
    run = save_tiny_checkpoint(tmp_path / "run", small_tokenizer, sha256=other)
    with pytest.raises(ValueError) as refused:
        load_for_inference(run, device="cpu")
    assert other[:12] in str(refused.value) and small_tokenizer.sha256[:12] in str(refused.value)
    with pytest.raises(LoadError, match=small_tokenizer.sha256[:12]):
        load_for_inference(run, tokenizer=small_tokenizer, device="cpu")

    code = main(["--ckpt", str(run), "--tokenizer", str(small_tokenizer.path), "--prompt", "你好", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and err[-1].startswith("error: ") and other[:12] in err[-1] and small_tokenizer.sha256[:12] in err[-1]
    )


def test_a_model_of_another_architecture_is_refused(tmp_path, capsys):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64})
    )
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="Qwen2ForCausalLM.*LlamaForCausalLM"):
        load_for_inference(folder, device="cpu")
    assert main(["--ckpt", str(folder), "--prompt", "你好", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Qwen2ForCausalLM" in err[0] and "LlamaForCausalLM" in err[0]


def test_an_exported_hugging_face_folder_loads_as_the_same_model(chat_ckpt, tmp_path, small_tokenizer):
    hf_dir = export_hf(chat_ckpt, tmp_path / "hf")
    ours, tok, info = load_for_inference(chat_ckpt, kernels="torch", device="cpu")
    theirs, hf_tok, hf_info = load_for_inference(hf_dir, kernels="torch", device="cpu")
    assert (info.kind, hf_info.kind) == ("checkpoint", "hf") and hf_tok.sha256 == tok.sha256 == small_tokenizer.sha256
    ids = torch.tensor([small_tokenizer.encode("<|im_start|>user\n你好<|im_end|>\n")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=0)
