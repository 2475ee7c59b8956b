"""Fault suite, raw text reading: legacy encodings chosen by what the text looks like (or refused when unclear),
and over-long documents split while streaming, nothing lost, memory bounded."""

from __future__ import annotations

import hashlib
import json
import logging
import tracemalloc
from pathlib import Path

import pytest

from engine.cli import run_cli
from engine.prepare import main as prepare_main
from engine.sources import Corpus, SourceError, SourceOptions, decoding
from tests.faults import assert_one_line_error, assert_unchanged, snapshot

SIMPLIFIED = (
    "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。"
    "该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。今天天气很好，我们一起去公园散步吧！"
)
TRADITIONAL = (
    "人工智慧是電腦科學的一個分支，它企圖了解智慧的實質，並生產出一種新的能以人類智慧相似的方式做出反應的智慧機器。"
    "該領域的研究包括機器人、語言辨識、影像辨識、自然語言處理和專家系統等。臺灣與香港的讀者習慣使用繁體字。"
)
JAPANESE = (
    "人工知能とは、計算機科学の一分野であり、知能の本質を理解し、人間の知能に似た方法で反応する機械を作るものです。" * 2
)
AMBIGUOUS = "機器辨識\n"  # its Big5 bytes read as common characters in GB18030 and EUC-JP too


def documents(path: Path, **options) -> tuple[list, Corpus]:
    corpus = Corpus([str(path)], SourceOptions(**options))
    return list(corpus.documents()), corpus


def prepare(tmp_path: Path, tokenizer, source: Path, *extra: str) -> int:
    argv = ["--source", str(source), "--tokenizer", str(tokenizer.path), "--out", str(tmp_path / "out" / "corpus")]
    return run_cli(prepare_main, [*argv, "--workers", "1", "--no-progress", *extra])


# --- case 1: the encoding is judged by what the text looks like ---------------------------------------------


def test_big5_file_is_packed_as_big5_not_gb18030_mojibake(
    tmp_path: Path, small_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "tw.txt"
    source.write_bytes((TRADITIONAL + "\n\n" + TRADITIONAL[:40] + "\n").encode("big5"))
    assert source.read_bytes().decode("gb18030")  # the trap: Big5 bytes decode "fine" as GB18030
    with caplog.at_level(logging.INFO):
        assert prepare(tmp_path, small_tokenizer, source) == 0
    meta = json.loads((tmp_path / "out" / "corpus.meta.json").read_text(encoding="utf-8"))
    assert meta["sources"]["encodings"] == {"big5hkscs": 1} and meta["sources"]["bad"] == {}
    assert meta["sources"]["sources"][str(source)]["encoding"] == "big5hkscs"
    assert any("reading as big5hkscs" in r.getMessage() for r in caplog.records)  # named in one log line


@pytest.mark.parametrize(
    "text, codec, expected",
    [
        (SIMPLIFIED, "gb18030", "gb18030"),
        (SIMPLIFIED, "gbk", "gb18030"),
        (SIMPLIFIED, "gb2312", "gb18030"),
        (TRADITIONAL, "gb18030", "gb18030"),  # Traditional text written in GB18030 stays GB18030
        (TRADITIONAL, "big5", "big5hkscs"),
        (TRADITIONAL, "cp950", "big5hkscs"),
        (JAPANESE, "shift_jis", "cp932"),
        (JAPANESE, "euc_jp", "euc_jp"),
        (SIMPLIFIED, "utf-8", "utf-8"),
        (TRADITIONAL, "utf-8-sig", "utf-8"),
    ],
)
def test_legacy_encodings_are_told_apart(tmp_path: Path, text: str, codec: str, expected: str) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes((text + "\n").encode(codec))
    docs, corpus = documents(path)
    assert [d.text for d in docs] == [text]
    assert corpus.report.as_dict()["encodings"] == {expected: 1} and corpus.report.total_bad == 0


def test_ambiguous_short_file_is_refused_naming_candidates(tmp_path: Path, small_tokenizer, capsys) -> None:
    source = tmp_path / "short.txt"
    source.write_bytes(AMBIGUOUS.encode("big5"))
    before = snapshot(tmp_path)
    code = prepare(tmp_path, small_tokenizer, source)
    assert_one_line_error(
        code, capsys.readouterr().err, str(source), "cannot tell", "--encoding gb18030", "--encoding big5hkscs"
    )
    assert_unchanged(before, tmp_path)  # nothing packed, nothing half-written


def test_encoding_flag_is_honoured_for_an_ambiguous_file(tmp_path: Path, small_tokenizer) -> None:
    source = tmp_path / "short.txt"
    source.write_bytes(AMBIGUOUS.encode("big5"))
    docs, corpus = documents(source, encoding="big5")
    assert [d.text for d in docs] == [AMBIGUOUS.strip()] and corpus.report.as_dict()["encodings"] == {"big5": 1}
    assert prepare(tmp_path, small_tokenizer, source, "--encoding", "big5") == 0
    meta = json.loads((tmp_path / "out" / "corpus.meta.json").read_text(encoding="utf-8"))
    assert meta["sources"]["encodings"] == {"big5": 1} and meta["n_docs"] == 1


def test_text_in_no_candidate_encoding_is_refused(tmp_path: Path, small_tokenizer, capsys) -> None:
    source = tmp_path / "junk.txt"
    source.write_bytes(bytes(range(0x81, 0xFF)) * 20 + b"\n")  # decodes as GB18030, into rare characters only
    code = prepare(tmp_path, small_tokenizer, source)
    assert_one_line_error(code, capsys.readouterr().err, str(source), "no plausible text", "--encoding")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- case 2: over-long documents are split while streaming ---------------------------------------------------


class ReadSizes:
    """Wraps ``open_binary`` and remembers the longest single read: proof that no giant line is ever held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.longest = 0
        opener = decoding.open_binary

        def recording_open(path: Path):
            f = opener(path)
            readline, read = f.readline, f.read

            def wrapped_readline(size: int = -1) -> bytes:
                return self._seen(readline(size))

            def wrapped_read(size: int = -1) -> bytes:
                return self._seen(read(size))

            f.readline, f.read = wrapped_readline, wrapped_read
            return f

        monkeypatch.setattr(decoding, "open_binary", recording_open)

    def _seen(self, data: bytes) -> bytes:
        self.longest = max(self.longest, len(data))
        return data


def long_line(chars: int) -> str:
    """Sentences with no newline, about ``chars`` characters, ASCII and CJK mixed (1- to 3-byte characters)."""
    sentence = "第{}句：长文档没有换行，memory must stay flat！"
    return "".join(sentence.format(i) for i in range(chars // 30 + 1))


@pytest.mark.parametrize("unit", ["line", "block", "file"])
@pytest.mark.parametrize("codec", ["utf-8", "gb18030"])
def test_single_line_document_is_split_while_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, unit: str, codec: str
) -> None:
    monkeypatch.setattr(decoding, "READ_CHUNK_BYTES", 4099)  # odd, so reads end inside multibyte characters
    monkeypatch.setattr(decoding, "SAMPLE_BYTES", 4099)  # the encoding sample is the other bounded read
    text = long_line(200_000)
    path = tmp_path / "one-line.txt"
    path.write_bytes((text + "\r\n").encode(codec))
    reads = ReadSizes(monkeypatch)
    with caplog.at_level(logging.INFO):
        docs, corpus = documents(path, text_unit=unit, max_document_chars=5000, encoding=codec)
    expected = text + "\r\n" if unit == "file" else text
    assert "".join(d.text for d in docs) == expected  # nothing lost, nothing cut inside a character
    assert max(len(d.text) for d in docs) <= 5000 and len(docs) > 40
    assert all(d.text.endswith("！") for d in docs[:-1])  # cut after a sentence end
    assert reads.longest <= 4099
    report = corpus.report.as_dict()
    assert report["split_documents"] == 1 and report["documents"] == len(docs) and corpus.report.total_bad == 0
    assert any("split 1 over-long document" in r.getMessage() for r in caplog.records)


def test_memory_stays_bounded_reading_a_multi_megabyte_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(decoding, "READ_CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(decoding, "SAMPLE_BYTES", 1 << 16)
    text = long_line(3_000_000)  # ~6 MB of UTF-8 on one line
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8") + b"\n")
    want = hashlib.sha256(text.encode()).hexdigest()
    corpus = Corpus([str(path)], SourceOptions(text_unit="line", max_document_chars=100_000))
    digest, longest = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        for doc in corpus.documents():
            digest.update(doc.text.encode())
            longest = max(longest, len(doc.text))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == want and longest <= 100_000
    assert peak < 4_000_000 < len(text.encode()), f"peak {peak:,} bytes for a {len(text):,}-char line"


def test_long_jsonl_document_is_split_after_parsing(tmp_path: Path) -> None:
    text = long_line(50_000)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n" + '{"text": "短"}\n', encoding="utf-8")
    docs, corpus = documents(path, max_document_chars=2000)
    assert "".join(d.text for d in docs[:-1]) == text and docs[-1].text == "短"
    assert max(len(d.text) for d in docs) <= 2000 and {d.lineno for d in docs[:-1]} == {1}
    assert corpus.report.as_dict()["split_documents"] == 1


def test_undecodable_bytes_in_a_long_line_spoil_only_their_piece(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(decoding, "READ_CHUNK_BYTES", 4096)
    text = long_line(20_000)
    raw = text.encode("utf-8")
    middle = raw.index("第300句".encode())
    path = tmp_path / "bad.txt"
    path.write_bytes(raw[:middle] + b"\xff\xfe" + raw[middle:] + b"\n")
    docs, corpus = documents(path, text_unit="line", max_document_chars=2000, encoding="utf-8")
    kept = "".join(d.text for d in docs)
    assert corpus.report.bad_reasons == {"undecodable": 1} and "\ufffd" not in kept
    assert corpus.report.total_records == len(docs) + 1  # every piece counted, the bad one as bad
    start = next(i for i, (a, b) in enumerate(zip(kept, text)) if a != b)  # where the dropped piece was
    removed = len(text) - len(kept)
    assert kept == text[:start] + text[start + removed :] and 0 < removed <= 2000  # one piece lost, and counted
    assert start <= text.index("第300句") < start + removed


def test_max_document_chars_is_checked() -> None:
    with pytest.raises(SourceError, match="--max-document-chars"):
        SourceOptions(max_document_chars=10)
