"""Fault suite, tokenizers: a third-party ``tokenizer.json`` whose ChatML markers are added tokens (MiniMind's and
Qwen's layouts) encodes chat as ``transformers`` does and packs; a tokenizer folder whose tokenizer.json or configs
are broken, or whose tokenizer.json holds another vocabulary than its tokenizer.model, is refused when loaded, in one
line that says what to do, before anything is written. One test per case.

Not repeated here: ``<s>``/``</s>`` typed in pretraining text stay characters with our SentencePiece tokenizers
(``tests/test_tokenizer.py::test_round_trip_no_unk_and_markers``) and with their tokenizer.json
(``::test_tokenizer_json_backend_matches_sentencepiece``, whose sample holds "</s> <s> <pad> text").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.chat_template import IM_END, IM_START, render_segments, render_text
from engine.cli import run_cli
from engine.conversations import encode_conversation
from engine.format import open_packed
from engine.prepare import main as prepare_main
from engine.tokenizer import core as tokenizer_core
from engine.tokenizer import load_tokenizer
from tests.faults import assert_one_line_error, assert_unchanged, snapshot

REPO = Path(__file__).resolve().parents[1]
ENDOFTEXT = "<|endoftext|>"
MARKERS = [ENDOFTEXT, IM_START, IM_END]
# Qwen1.5's ChatML template (no default system prompt): renders exactly what engine.chat_template renders.
QWEN_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAINING_TEXT = [
    "你好，世界。今天天气很好，我们一起去公园散步吧！",
    "我最近总是头痛。头痛持续多久了？有没有发烧？多休息，少看屏幕。",
    "人工智能是计算机科学的一个分支，研究语言识别、图像识别和自然语言处理。",
    "Hello world, the quick brown fox jumps over the lazy dog. Is it serious?",
    "def f(x):\n    return x * 2\n\n\tindented  two spaces\n",
]
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "chinese": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    "english-system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What does the fox do?"},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    ],
    "multi-turn-mixed": [
        {"role": "system", "content": "你是一名耐心的全科医生。"},
        {"role": "user", "content": "我最近总是头痛。"},
        {"role": "assistant", "content": "头痛持续多久了？有没有发烧？"},
        {"role": "user", "content": "两天了，没有发烧。Is it serious?"},
        {"role": "assistant", "content": "多半是紧张性头痛：\n1. 多休息\n2. 少看屏幕"},
    ],
    "spaces-at-edges": [
        {"role": "system", "content": " 系统 "},
        {"role": "user", "content": " 你好 "},
        {"role": "assistant", "content": " hello  world "},
        {"role": "user", "content": "\tquestion\t"},
        {"role": "assistant", "content": "  两个空格"},
    ],
    "newlines-at-edges": [
        {"role": "user", "content": "\n为什么？\n"},
        {"role": "assistant", "content": "\n\n因为天气很好\n\n"},
        {"role": "user", "content": "code?\n\n"},
        {"role": "assistant", "content": "def f(x):\n    return x * 2\n"},
    ],
}


def _config(tok: Any, **specials: str | None) -> dict[str, Any]:
    added = {
        str(tok.token_to_id(m)): {
            "content": m,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for m in MARKERS
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **{f"{role}_token": token for role, token in specials.items()},
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": QWEN_TEMPLATE,
    }


def build_byte_bpe(folder: Path, layout: str) -> Path:
    """A byte-level BPE ``tokenizer.json`` + ``tokenizer_config.json`` made with HF ``tokenizers``.

    ``minimind``: the markers are trainer special tokens, so ids 0..2 both in the model vocab and added tokens;
    bos ``<|im_start|>``, eos ``<|im_end|>``, unk/pad ``<|endoftext|>`` (MiniMind's tokenizer_config.json).
    ``qwen``: the markers are added after training, ids past the model vocab; eos ``<|endoftext|>`` (Qwen base).
    ``declared``: as ``minimind``, but tokenizer.json lists no added tokens: only tokenizer_config.json declares
    them (``transformers`` adds them on load).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[] if layout == "qwen" else MARKERS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    if layout == "qwen":
        tok.add_special_tokens(MARKERS)
        config = _config(tok, eos=ENDOFTEXT, pad=ENDOFTEXT, bos=None)
    else:
        config = _config(tok, bos=IM_START, eos=IM_END, pad=ENDOFTEXT, unk=ENDOFTEXT)
    folder.mkdir(parents=True)
    data = json.loads(tok.to_str())
    if layout == "declared":
        data["added_tokens"] = []
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["minimind", "qwen", "declared"])
def byte_bpe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_byte_bpe(tmp_path_factory.mktemp("byte-bpe") / request.param, request.param)


@pytest.fixture(scope="module")
def auto_tokenizer(byte_bpe: Path) -> Any:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
    return transformers.AutoTokenizer.from_pretrained(str(byte_bpe))


def header_merges(tok: Any, messages: list[dict[str, str]]) -> bool:
    """Does whole-text encoding fuse an assistant header's "\n" with its content's first characters?"""
    header = tok.encode("assistant\n")
    return any(
        tok.encode("assistant\n" + m["content"]) != header + tok.encode(m["content"])
        for m in messages
        if m["role"] == "assistant"
    )


# --- case 1: ChatML markers that are added tokens of a tokenizer.json -----------------------------------------


def test_added_chat_markers_encode_as_their_single_ids(byte_bpe: Path, auto_tokenizer: Any) -> None:
    """Each ChatML marker is its one id, alone or inside text, in our encoding as in transformers'."""
    tok = load_tokenizer(byte_bpe)
    for marker in (IM_START, IM_END):
        assert tok.encode(marker) == [tok.token_to_id(marker)] == auto_tokenizer.convert_tokens_to_ids([marker])
    text = f"{IM_START}user\n你好{IM_END}\n{IM_START}assistant\nHello{IM_END}"
    assert tok.encode(text) == auto_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text)) == text  # a chat marker decodes as its text, even when it is the EOS
    assert (tok.eos_id, tok.bos_id) == (auto_tokenizer.eos_token_id, auto_tokenizer.bos_token_id)


def test_endoftext_stays_characters_only_where_the_vocab_holds_it(byte_bpe: Path, auto_tokenizer: Any) -> None:
    """MiniMind's unk/pad <|endoftext|> is a model piece (in both MiniMind layouts): typed in text it stays
    characters (a page cannot inject a special id; transformers would match it). Qwen's EOS <|endoftext|> is only
    an added token: it is matched, as in transformers (there is no piece to fall back on)."""
    tok = load_tokenizer(byte_bpe)
    text = f"a{ENDOFTEXT}b"
    special = tok.token_to_id(ENDOFTEXT)
    if byte_bpe.name != "qwen":
        assert special not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    else:
        assert tok.encode(text) == auto_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert special in tok.encode(text) and special == tok.eos_id and tok.decode(tok.encode(text)) == "ab"


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_sft_encoding_equals_transformers_apply_chat_template(byte_bpe: Path, auto_tokenizer: Any, name: str) -> None:
    """Token by token, as tests/test_conversations.py compares: our ids less the trailing EOS are HF's whole-text
    ids, except where a header "\n" fuses with a reply's first characters; there each segment is HF's own ids."""
    messages = CONVERSATIONS[name]
    tok = load_tokenizer(byte_bpe)
    hf_ids = list(auto_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert hf_ids == tok.encode(render_text(messages)), "HF and our tokenizer encode the same text differently"
    ids, mask = encode_conversation(tok, messages)
    assert ids[-1] == tok.eos_id == auto_tokenizer.eos_token_id and mask[-1] == 0
    merges = header_merges(tok, messages)
    assert merges == (name == "newlines-at-edges")  # "\n" + "\n\n因为" fuses; every other case is compared whole
    if merges:
        segments = [
            auto_tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in render_segments(messages)
        ]
        assert ids[:-1].tolist() == [i for segment in segments for i in segment]
    else:
        assert ids[:-1].tolist() == hf_ids
    assert tok.decode(ids[:-1].tolist()) == render_text(messages)


def test_prepare_sft_packs_every_conversation_with_added_token_markers(byte_bpe: Path, tmp_path: Path) -> None:
    source = tmp_path / "chat.jsonl"
    lines = [json.dumps({"conversations": m}, ensure_ascii=False) for m in CONVERSATIONS.values()]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    argv = ["--kind", "sft", "--source", str(source), "--tokenizer", str(byte_bpe), "--out", str(out)]
    assert run_cli(prepare_main, [*argv, "--workers", "2", "--no-progress"]) == 0  # workers load the folder too
    meta = json.loads(out.with_name("sft.meta.json").read_text(encoding="utf-8"))
    assert meta["n_docs"] == len(CONVERSATIONS) and meta["dropped"] == {} and meta["sources"]["bad"] == {}
    tok = load_tokenizer(byte_bpe)
    files = open_packed(out, tokenizer_sha256=tok.sha256)
    bounds = zip(files.offsets[:-1], files.offsets[1:])
    packed = sorted((files.tokens[a:b].tolist(), files.mask[a:b].tolist()) for a, b in bounds)
    expected = sorted(
        (ids.tolist(), mask.tolist()) for ids, mask in (encode_conversation(tok, m) for m in CONVERSATIONS.values())
    )
    assert packed == expected


# --- case 2: a tokenizer folder whose files disagree or do not parse ---------------------------------------------


@pytest.fixture
def sp_folder(small_tokenizer, tmp_path: Path) -> Path:
    """A copy of the conftest's SentencePiece tokenizer folder (tokenizer.model + tokenizer.json + configs)."""
    folder = tmp_path / "tok"
    shutil.copytree(small_tokenizer.path, folder)
    return folder


def prepare_pretrain(tmp_path: Path, tokenizer: Path) -> int:
    """``python -m engine.prepare`` (pretraining) of a two-document source, in this process."""
    source = tmp_path / "docs.txt"
    if not source.exists():
        source.write_text(
            "今天天气很好，我们一起去公园散步吧！\n\n这家店的菜很好吃，服务也很周到。\n", encoding="utf-8"
        )
    argv = ["--source", str(source), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out" / "corpus")]
    return run_cli(prepare_main, [*argv, "--workers", "1", "--no-progress"])


def refused(tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """prepare with the tokenizer ``folder`` ends in one ``error:`` line holding ``needles`` and writes nothing."""
    (tmp_path / "docs.txt").write_text("今天天气很好。\n", encoding="utf-8")
    before = snapshot(tmp_path)
    code = prepare_pretrain(tmp_path, folder)
    line = assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert_unchanged(before, tmp_path)
    assert not (tmp_path / "out").exists()
    return line


def test_truncated_tokenizer_json_beside_tokenizer_model_is_refused(
    sp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sp_folder / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(tmp_path, sp_folder, capsys, str(path), "not valid JSON", "delete it and re-save", "save_pretrained")


def test_tokenizer_json_of_another_vocabulary_is_refused(
    sp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = build_byte_bpe(tmp_path / "other", "minimind")
    shutil.copy(other / "tokenizer.json", sp_folder / "tokenizer.json")
    needles = (
        str(sp_folder / "tokenizer.json"),
        "another vocabulary",
        "400 vs 3,000 pieces",
        "first difference at id 0",
    )
    refused(tmp_path, sp_folder, capsys, *needles)


def test_tokenizer_json_with_two_pieces_swapped_is_refused(
    sp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same size, same pieces, two ids swapped: transformers would read another model's embeddings for them."""
    path = sp_folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    first, second = (p for p, i in vocab.items() if i in (1000, 2000))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    refused(tmp_path, sp_folder, capsys, str(path), "3,000 vs 3,000 pieces", "first difference at id 1000")


def test_tokenizer_json_that_tokenizers_cannot_load_is_refused(
    sp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sp_folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["type"] = "NoSuchModel"  # the vocabulary is right, the file is not
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    refused(tmp_path, sp_folder, capsys, str(path), "tokenizers cannot load it", "delete it and re-save")


def test_tokenizer_config_that_is_not_json_is_refused(
    sp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sp_folder / "tokenizer_config.json"
    path.write_text('{"eos_token": "</s>", "chat_template": ', encoding="utf-8")
    refused(tmp_path, sp_folder, capsys, str(path), "not valid JSON", "restore it")


def test_special_tokens_map_that_is_not_utf8_json_is_refused(
    sp_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sp_folder / "special_tokens_map.json"
    path.write_bytes(b"\xff\xfe{garbage")
    refused(tmp_path, sp_folder, capsys, str(path), "not valid JSON", "delete it and re-save")


def test_the_refusals_resave_command_repairs_the_folder(
    sp_folder: Path, small_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sp_folder / "tokenizer.json"
    path.write_text("{}", encoding="utf-8")
    line = refused(tmp_path, sp_folder, capsys, str(path), "no model.vocab")
    command = re.search(r'python -c "(.*)"$', line)
    assert command is not None, line
    path.unlink()  # "delete it and re-save …"
    subprocess.run([sys.executable, "-c", command.group(1)], cwd=REPO, check=True, capture_output=True)
    assert prepare_pretrain(tmp_path, sp_folder) == 0
    assert load_tokenizer(sp_folder).sha256 == small_tokenizer.sha256
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    auto = transformers.AutoTokenizer.from_pretrained(str(sp_folder))
    assert auto("今天天气很好", add_special_tokens=False)["input_ids"] == small_tokenizer.encode("今天天气很好")


def test_a_saved_folder_is_checked_by_its_recorded_digests(
    sp_folder: Path, small_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing workers load the tokenizer once each: a folder we saved is checked by two sha256, not by parsing."""

    def parse(*args: Any) -> None:
        raise AssertionError("the tokenizer.json of a folder saved by save_pretrained was parsed")

    monkeypatch.setattr(tokenizer_core, "_check_json_matches", parse)
    assert load_tokenizer(sp_folder).sha256 == small_tokenizer.sha256
    facts = json.loads((sp_folder / "zhllm_tokenizer.json").read_text(encoding="utf-8"))
    del facts["file_sha256"]  # a third-party folder records nothing: checked by parsing, once per process
    (sp_folder / "zhllm_tokenizer.json").write_text(json.dumps(facts), encoding="utf-8")
    tokenizer_core._consistent_folders.clear()
    with pytest.raises(AssertionError, match="was parsed"):
        load_tokenizer(sp_folder)
    monkeypatch.undo()
    load_tokenizer(sp_folder)
    monkeypatch.setattr(tokenizer_core, "_check_json_matches", parse)
    assert load_tokenizer(sp_folder).sha256 == small_tokenizer.sha256  # remembered by file size and mtime
