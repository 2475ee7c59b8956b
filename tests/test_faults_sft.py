"""Fault suite, ``python -m llama.sft`` on hostile raw data and flags: a stale packing cache, the ``--max-bad`` its
advice names, DPO pairs given as conversations, one-turn records and ``--fields``, and numbers refused before
anything is packed. One test per case; the data is hand-written, the model tiny (one step each)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faults import assert_one_line_error, assert_unchanged, snapshot

from engine.chat_template import IM_END
from engine.cli import run_cli
from engine.conversations import PreferencePairError, parse_conversation, parse_preference
from engine.format import DatasetPaths, open_packed
from engine.pack import PackConfig, pack_corpus
from engine.pack_cache import CACHE_SUFFIX
from engine.prepare import main as prepare_main
from engine.sources import Corpus
from llama import pretrain, sft

TINY = ["--profile", "cpu", "--kernels", "torch", "--no-progress", "--log-every", "1", "--eval-every", "0"]
SMALL = [*TINY, "--batch-size", "2", "--seq-len", "64", "--pack-workers", "1", "--val-fraction", "0"]
TEXT = "发烧的时候要多喝水，注意休息。如果体温超过三十九度，应该及时去医院看医生。感冒通常一周左右会好。\n\n"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


@pytest.fixture(scope="module")
def pretrained(small_tokenizer, tmp_path_factory) -> Path:
    """A tiny model pretrained one step on a few hand-written paragraphs packed with the small tokenizer."""
    folder = tmp_path_factory.mktemp("faults-sft-pre")
    (folder / "text.txt").write_text("".join(f"第{i}段：{TEXT}" for i in range(40)), encoding="utf-8")
    config = PackConfig(out=str(folder / "corpus"), workers=1, progress=False)
    pack_corpus(Corpus([str(folder / "text.txt")]), small_tokenizer, config)
    argv = ["--bin", str(folder / "corpus"), "--model", "dim=64", "--steps", "1", "--out-dir", str(folder / "out")]
    assert pretrain.main([*argv, *SMALL[:-4]]) == 0
    return folder / "out"


def conversation(i: int, answer: str = "多喝水，好好休息。") -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": f"第{i}个问题：发烧怎么办？"}, {"from": "gpt", "value": answer}]
    }


def write_jsonl(path: Path, records: list[Any], broken: int = 0) -> Path:
    """``records`` one per line, then ``broken`` lines of malformed JSON."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + ['{"conversations": [' for _ in range(broken)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_sft(data: Path, pretrained: Path, out: Path, capsys, *extra: str, steps: bool = True) -> tuple[int, str]:
    argv = ["--data", str(data), "--init", str(pretrained), "--out-dir", str(out), *SMALL, *extra]
    code = sft.main([*argv, "--steps", "1"] if steps else argv)
    return code, capsys.readouterr().err


def prepare(source: Path, tokenizer, out: Path, *extra: str) -> int:
    argv = ["--source", str(source), "--tokenizer", str(tokenizer.path), "--out", str(out), "--workers", "1"]
    return run_cli(prepare_main, [*argv, "--no-progress", *extra])


def cache_of(raw: Path) -> Path:
    return raw.with_name(f".{raw.name}{CACHE_SUFFIX}")


def cached_prefix(raw: Path) -> Path:
    return next(cache_of(raw).glob("*/sft.meta.json")).parent / "sft"


def learned_text(prefix: Path, tokenizer) -> list[str]:
    """The text the loss counts in each document of a packed SFT dataset (the replies and their end marker)."""
    files = open_packed(prefix)
    texts = []
    for doc in range(files.n_docs):
        start, end = files.offsets[doc], files.offsets[doc + 1]
        ids, mask = np.asarray(files.tokens[start:end]), np.asarray(files.mask[start:end])
        texts.append(tokenizer.decode(ids[mask == 1].tolist()))
    return texts


# --- case 1: the cache is keyed on the files' content, not their size and mtime ----------------------------------


def test_a_rewrite_that_keeps_size_and_mtime_is_packed_again_and_an_unchanged_file_is_not(
    pretrained, small_tokenizer, tmp_path, capsys, caplog
):
    raw = write_jsonl(tmp_path / "chat.jsonl", [conversation(i, "旧的回答甲乙丙。") for i in range(12)])
    caplog.set_level(logging.INFO)
    code, err = run_sft(raw, pretrained, tmp_path / "run1", capsys)
    assert code == 0, err
    prefix = cached_prefix(raw)
    packed_at = DatasetPaths.of(prefix).bin.stat().st_mtime_ns

    caplog.clear()
    code, err = run_sft(raw, pretrained, tmp_path / "run2", capsys)  # unchanged: reused, not packed again
    assert code == 0, err
    assert "packed before" in caplog.text and "unchanged" in caplog.text and "packing " not in caplog.text
    assert DatasetPaths.of(prefix).bin.stat().st_mtime_ns == packed_at

    before = raw.stat()
    raw.write_text(raw.read_text(encoding="utf-8").replace("旧的回答甲乙丙", "新的回答丁戊己"), encoding="utf-8")
    os.utime(raw, ns=(before.st_atime_ns, before.st_mtime_ns))  # the issue: same size, mtime restored
    assert (raw.stat().st_size, raw.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    caplog.clear()
    code, err = run_sft(raw, pretrained, tmp_path / "run3", capsys)
    assert code == 0, err
    assert "changed: sources" in caplog.text
    learned = learned_text(prefix, small_tokenizer)
    assert len(learned) == 12 and all(text == f"新的回答丁戊己。{IM_END}" for text in learned)


# --- case 2: the --max-bad the advice names is a flag of llama.sft (and of engine.prepare) -----------------------


def test_raise_max_bad_advice_can_be_followed_and_the_skipped_records_are_counted(
    pretrained, small_tokenizer, tmp_path, capsys, caplog
):
    raw = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(95)], broken=5)  # 5% malformed
    before = snapshot(raw)
    code, err = run_sft(raw, pretrained, tmp_path / "strict", capsys)
    assert_one_line_error(code, err, "5 of 100 records", "--max-bad 0.01", "bad_json", "raise --max-bad")
    assert not list(cache_of(raw).glob("*/sft.meta.json"))  # nothing half-packed left to be reused

    caplog.set_level(logging.INFO)
    code, err = run_sft(raw, pretrained, tmp_path / "lenient", capsys, "--max-bad", "0.1")
    assert code == 0, err
    assert "read 100 records from 1 source files: 95 documents, 5 bad" in caplog.text
    assert open_packed(cached_prefix(raw)).meta["dropped"] == {"bad:bad_json": 5}
    caplog.clear()  # the same run again reuses the cache and still says what it skipped
    code, err = run_sft(raw, pretrained, tmp_path / "again", capsys, "--max-bad", "0.1")
    assert code == 0, err
    assert "5 records were skipped when it was packed: bad:bad_json 5" in caplog.text

    code = prepare(raw, small_tokenizer, tmp_path / "packed" / "sft", "--kind", "sft")
    assert_one_line_error(code, capsys.readouterr().err, "5 of 100 records", "raise --max-bad")
    assert prepare(raw, small_tokenizer, tmp_path / "packed" / "sft", "--kind", "sft", "--max-bad", "0.1") == 0
    assert open_packed(tmp_path / "packed" / "sft").meta["dropped"] == {"bad:bad_json": 5}
    assert_unchanged(before, raw)


# --- case 3: DPO data given to SFT says what can be done: --chosen-only, never a command that refuses it too --------

DPO_SHAPES = {
    "medicalgpt": lambda i: {
        "conversations": [{"from": "human", "value": f"问题{i}"}],
        "chosen": "好答案",
        "rejected": "坏答案",
    },
    "prompt": lambda i: {"prompt": f"问题{i}", "chosen": "好答案", "rejected": "坏答案"},
    "minimind": lambda i: {
        "chosen": [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": "好答案"}],
        "rejected": [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": "坏答案"}],
    },
}


@pytest.mark.parametrize("shape", sorted(DPO_SHAPES))
def test_dpo_pairs_raw_or_packed_are_refused_with_advice_that_works(
    shape, pretrained, small_tokenizer, tmp_path, capsys
):
    raw = write_jsonl(tmp_path / "pairs.jsonl", [DPO_SHAPES[shape](i) for i in range(10)])
    code, err = run_sft(raw, pretrained, tmp_path / "raw", capsys)
    line = assert_one_line_error(code, err, "10 of 10 records", "DPO preference pairs", "--chosen-only", "--kind dpo")
    assert "llama.pretrain" not in line and "llama.dpo" not in line and "raise --max-bad" not in line

    assert prepare(raw, small_tokenizer, tmp_path / "dpo", "--kind", "dpo") == 0
    code, err = run_sft(tmp_path / "dpo", pretrained, tmp_path / "packed", capsys)
    line = assert_one_line_error(code, err, "is a dpo dataset", "preference pairs", f"--data {raw} --chosen-only")
    assert "llama.pretrain" not in line and "llama.dpo" not in line
    assert not (tmp_path / "raw").exists() and not (tmp_path / "packed").exists()

    code, err = run_sft(raw, pretrained, tmp_path / "chosen", capsys, "--chosen-only")  # the advice, followed
    assert code == 0, err
    assert learned_text(cached_prefix(raw), small_tokenizer) == [f"好答案{IM_END}"] * 10  # never the rejected reply


def test_the_real_dpo_file_packed_as_sft_gets_the_same_advice(shared_data, small_tokenizer, tmp_path, capsys):
    real = shared_data / "medicalgpt" / "dpo_zh_500.jsonl"
    code = prepare(real, small_tokenizer, tmp_path / "sft", "--kind", "sft")
    assert_one_line_error(code, capsys.readouterr().err, "500 of 500 records", "--chosen-only", "--kind dpo")
    assert prepare(real, small_tokenizer, tmp_path / "sft", "--kind", "sft", "--chosen-only") == 0
    meta = open_packed(tmp_path / "sft").meta
    assert meta["kind"] == "sft" and meta["n_docs"] + sum(meta["dropped"].values()) == 500  # each counted


# --- case 4: one-turn records, --fields for other names, and a record of no known shape -------------------------

ONE_TURN = [
    ({"question": "问", "answer": "答"}, [("user", "问"), ("assistant", "答")]),
    ({"prompt": "问", "response": "答"}, [("user", "问"), ("assistant", "答")]),
    ({"input": "问", "output": "答"}, [("user", "问"), ("assistant", "答")]),
    ({"question": "问", "answer": "答", "system": "医生"}, [("system", "医生"), ("user", "问"), ("assistant", "答")]),
    ({"instruction": "翻译", "input": "你好", "output": "Hello"}, [("user", "翻译\n你好"), ("assistant", "Hello")]),
    ({"instruction": "简答", "prompt": "问", "response": "答"}, [("user", "简答\n问"), ("assistant", "答")]),
]


@pytest.mark.parametrize("record, expected", ONE_TURN, ids=["+".join(sorted(r)) for r, _ in ONE_TURN])
def test_one_turn_records_are_one_user_and_one_assistant_turn(record, expected):
    assert parse_conversation(record) == [{"role": role, "content": text} for role, text in expected]


def test_prompt_chosen_rejected_stays_a_preference_pair_not_a_prompt_response():
    record = {"prompt": "问", "chosen": "好", "rejected": "坏"}
    with pytest.raises(PreferencePairError, match="--chosen-only"):
        parse_conversation(record)
    assert parse_conversation(record, chosen_only=True) == [
        {"role": "user", "content": "问"},
        {"role": "assistant", "content": "好"},
    ]
    assert parse_preference(record) == ([{"role": "user", "content": "问"}], "好", "坏")


def test_fields_maps_other_keys_and_a_record_of_no_known_shape_is_refused_naming_its_keys(
    pretrained, small_tokenizer, tmp_path, capsys
):
    records = [{"q": f"问题{i}", "a": f"回答{i}", "sys": "你是医生"} for i in range(8)]
    raw = write_jsonl(tmp_path / "qa.jsonl", records)
    code, err = run_sft(raw, pretrained, tmp_path / "refused", capsys)
    assert_one_line_error(code, err, "8 of 8 records", "['a', 'q', 'sys']", "--fields question=KEY,answer=KEY")
    code, err = run_sft(raw, pretrained, tmp_path / "typo", capsys, "--fields", "question")
    assert_one_line_error(code, err, "--fields expects NAME=KEY", "question=q,answer=a")
    assert not list(cache_of(raw).glob("*/sft.meta.json"))

    code, err = run_sft(raw, pretrained, tmp_path / "mapped", capsys, "--fields", "question=q,answer=a,system=sys")
    assert code == 0, err
    assert sorted(learned_text(cached_prefix(raw), small_tokenizer)) == sorted(f"回答{i}{IM_END}" for i in range(8))
    files = open_packed(cached_prefix(raw))
    first = small_tokenizer.decode(np.asarray(files.tokens[files.offsets[0] : files.offsets[1]]).tolist())
    assert "system\n你是医生" in first and "user\n问题" in first

    out = tmp_path / "prepared" / "qa"
    assert_one_line_error(prepare(raw, small_tokenizer, out, "--kind", "sft"), capsys.readouterr().err, "--fields")
    assert prepare(raw, small_tokenizer, out, "--kind", "sft", "--fields", "question=q,answer=a") == 0
    assert open_packed(out).n_docs == 8


# --- case 5: every number is checked before the raw data is packed -----------------------------------------------

BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "nan"], "--lr"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "100000"], "--seq-len"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--max-bad", "2"], "--max-bad"),
    (["--pack-workers", "-1"], "--pack-workers"),
    (["--steps", "0"], "--steps"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--model", "dropout=1.5"], "--dropout"),
]


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_numbers_are_refused_before_the_raw_data_is_packed(flags, named, pretrained, tmp_path, capsys):
    raw = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(6)])
    before = snapshot(raw, pretrained)
    steps = flags[0] not in ("--epochs", "--steps")  # --epochs counts only without --steps
    code, err = run_sft(raw, pretrained, tmp_path / "out", capsys, *flags, steps=steps)
    assert_one_line_error(code, err, named)
    assert not cache_of(raw).exists() and not (tmp_path / "out").exists()  # nothing packed, nothing created
    assert_unchanged(before, raw, pretrained)
