"""engine.clean: each filter on cases that would catch a wrong one, and every drop counted."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import pytest

from engine.clean import (
    CleanConfig,
    CleanConfigError,
    Cleaner,
    CleanStats,
    Deduplicator,
    add_clean_arguments,
    clean_config_from_args,
    clean_texts,
)


def cleaned(text: str, **config) -> str | None:
    return Cleaner(CleanConfig(**config)).clean(text)[0]


def test_nfkc_only_on_request() -> None:
    text = "ﬁ①Ａ㎏…"
    assert cleaned(text) == text
    assert cleaned(text, nfkc=True) == "fi1Akg..."


def test_control_format_and_replacement_characters_are_removed() -> None:
    text = "甲\x00乙\x07丙\u200b丁\ufeff戊\u00ad己\x7f庚\ud800辛\ufffd壬\x1b[0m癸"
    assert cleaned(text) == "甲乙丙丁戊己庚辛壬[0m癸"
    assert cleaned("第一行\n第二行") == "第一行\n第二行"  # the newline is not a control character to drop
    lone_surrogate = json.loads('"a\\udc80b"')  # what a JSON "\udc80" escape decodes to
    out = cleaned(lone_surrogate)
    assert out == "ab" and out.encode("utf-8") == b"ab"


def test_whitespace_is_collapsed_and_lines_stripped() -> None:
    assert cleaned("  你好 \t  世界  ") == "你好 世界"
    assert cleaned("\u3000\u3000第一章\u3000开始\u00a0了") == "第一章 开始 了"
    assert cleaned("一\r\n二\r三\u2028四") == "一\n二\n三\n四"
    assert cleaned("段一\n\n\n\n段二\n \n \n段三") == "段一\n\n段二\n\n段三"
    assert cleaned("word\u200b \u200bword") == "word word"  # removing a format character leaves no double space


def test_poem_line_structure_is_kept() -> None:
    poem = "静夜思\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert cleaned(poem + "\n\n") == poem


def test_fullwidth_letters_and_digits_only() -> None:
    text = "Ｇｏｏｇｌｅ２０２４年，（注）：ＡＩ！"
    assert cleaned(text) == text
    assert cleaned(text, fullwidth_to_halfwidth=True) == "Google2024年，（注）：AI！"


def test_traditional_to_simplified() -> None:
    assert cleaned("長城萬里", traditional_to_simplified=True) == "长城万里"
    assert cleaned("長城萬里") == "長城萬里"


def test_traditional_to_simplified_on_a_real_tang_line(shared_data: Path) -> None:
    poems = json.loads((shared_data / "poetry" / "tang" / "poet.tang.0.json").read_text(encoding="utf-8"))
    line = next(p for poem in poems for p in poem["paragraphs"] if "長" in p)
    out = cleaned(line, traditional_to_simplified=True)
    assert out is not None and "長" not in out and "长" in out
    assert len(out) == len(line) and out[-1] == line[-1] == "。"


def test_missing_opencc_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opencc", None)  # makes `import opencc` fail
    with pytest.raises(CleanConfigError, match="pip install opencc-python-reimplemented"):
        Cleaner(CleanConfig(traditional_to_simplified=True))
    assert Cleaner(CleanConfig()).clean("好") == ("好", None)  # not needed unless asked for


def test_length_filters_and_reasons() -> None:
    cleaner = Cleaner(CleanConfig(min_chars=3, max_chars=5))
    assert cleaner.clean(" \n\u200b\t") == (None, "empty")
    assert cleaner.clean("一二") == (None, "too_short")
    assert cleaner.clean("  一二三  ") == ("一二三", None)  # counted after cleaning
    assert cleaner.clean("一二三四五") == ("一二三四五", None)
    assert cleaner.clean("一二三四五六") == (None, "too_long")
    with pytest.raises(CleanConfigError, match="--min-chars"):
        CleanConfig(min_chars=-1)
    with pytest.raises(CleanConfigError, match="--max-chars"):
        CleanConfig(min_chars=10, max_chars=5)


def test_deduplicator_counts() -> None:
    dedup = Deduplicator()
    flags = [dedup.is_duplicate(t) for t in ["一", "二", "一", "一", "三", "二"]]
    assert flags == [False, False, True, True, False, True]
    assert dedup.duplicates == 3 and len(dedup) == 3


def test_clean_texts_counts_every_drop() -> None:
    texts = ["你好 世界", "你好\t\t世界", "", "短", "一段够长的文字", "一段够长的文字。" * 10]
    stats = CleanStats()
    kept = list(clean_texts(texts, Cleaner(CleanConfig(min_chars=2, max_chars=40)), stats))
    assert kept == ["你好 世界", "一段够长的文字"]
    assert stats.as_dict() == {
        "kept": 2,
        "kept_chars": 12,
        "dropped": {"duplicate": 1, "empty": 1, "too_long": 1, "too_short": 1},
        "total_dropped": 4,
    }
    no_dedup = CleanStats()
    assert len(list(clean_texts(texts, Cleaner(CleanConfig(dedup=False)), no_dedup))) == 5
    assert no_dedup.dropped == {"empty": 1}


def test_stats_merge() -> None:
    a, b = CleanStats(), CleanStats()
    a.keep("一二"), a.drop("empty"), b.keep("三"), b.drop("empty"), b.drop("too_long")
    merged = CleanStats().merge(a).merge(b)
    assert (merged.kept, merged.kept_chars, merged.total_dropped) == (2, 3, 3)
    assert merged.dropped == {"empty": 2, "too_long": 1}
    assert json.loads(json.dumps(merged.as_dict()))["dropped"]["empty"] == 2


def test_cleaner_pickles_for_worker_processes() -> None:
    cleaner = Cleaner(CleanConfig(traditional_to_simplified=True, fullwidth_to_halfwidth=True, min_chars=2))
    clone = pickle.loads(pickle.dumps(cleaner))
    assert clone.config == cleaner.config
    assert len(pickle.dumps(cleaner)) < 1000  # the OpenCC dictionaries are rebuilt in the worker, not shipped
    for text in ["長安　Ａ１", "一", "  "]:
        assert clone.clean(text) == cleaner.clean(text)
    assert clone.clean("長安　Ａ１") == ("长安 A1", None)


def test_command_line_flags() -> None:
    parser = argparse.ArgumentParser()
    add_clean_arguments(parser)
    config = clean_config_from_args(parser.parse_args(["--t2s", "--nfkc", "--min-chars", "5", "--no-dedup"]))
    assert config == CleanConfig(nfkc=True, traditional_to_simplified=True, min_chars=5, dedup=False)
    assert clean_config_from_args(parser.parse_args([])) == CleanConfig()


def test_fast_path_gives_what_the_full_cleaning_gives(monkeypatch):
    """Texts that skip the work (nothing to change) must equal what the full normalisation returns."""
    import random

    import engine.clean as clean_module

    alphabet = [
        "a",
        "中",
        " ",
        "\n",
        "\t",
        "\u3000",
        "\u200b",
        "\r",
        "\x00",
        "\ufffd",
        "\u2028",
        "\x85",
        "\ue000",
        "。",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    texts += ["春眠不觉晓\n处处闻啼鸟", "两行\n\n之间", "行尾 \n下一行"]
    cleaner = clean_module.Cleaner(clean_module.CleanConfig())
    fast = [cleaner.normalize(t) for t in texts]
    assert sum(map(clean_module.is_clean, texts)) > 100  # the fast path is taken at all
    monkeypatch.setattr(clean_module, "is_clean", lambda text: False)  # force the full path
    assert [cleaner.normalize(t) for t in texts] == fast
