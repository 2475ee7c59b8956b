"""Distillation over a pretraining corpus and from a teacher top-K cache on disk: the top-K loss equals a hand
computation and, with K = the vocabulary, the full forward KL; the cache holds the teacher's real top-K log-probs
of every counted token at its offset (corpus chunks and packed SFT rows alike); training from a K = vocabulary
cache gives the online teacher's loss; a tiny student distilled over a small corpus ends closer to its teacher; a
run from the cache killed mid-run resumes bit for bit; and every bad cache or setting is a one-line error or a
logged rebuild, never silently trusted."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import assert_one_line_error
from training_runs import VOCAB, assert_resumed_identically, start_run, wait_until_stalled, write_corpus

from engine.dataset import PretrainDataset
from engine.dataset.pretrain import document_positions
from engine.format import FORMAT, AtomicOutput, DatasetPaths, token_dtype
from llama import distill
from llama.dpo import load_reference
from llama.model import Llama, LlamaConfig
from llama.training import teacher_cache
from llama.training.checkpoint import checkpoint_name, find_checkpoint, read_config, save_checkpoint, tied_parameters
from llama.training.config import TrainConfig
from llama.training.distill import (
    Distill,
    DistillSettings,
    Teacher,
    chunked_topk_distill_loss,
    topk_distill_loss,
    topk_forward_kl,
)
from llama.training.loop import train
from llama.training.metrics import read_metrics
from zhkernels import reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU

TOKENIZER = {"path": "tok/tokenizer.json", "sha256": "ab" * 32}  # training_runs.write_corpus's
SEQ, K, T = 32, 16, 1.0
CPU = ["--profile", "cpu", "--kernels", "torch", "--no-progress"]


# ---------------------------------------------------------------- the top-K loss


def test_topk_forward_kl_equals_a_hand_computation():
    logits = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    ids = torch.tensor([[0, 2]])
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])  # renormalised over the two ids: 2/3, 1/3
    for temperature in (1.0, 2.0):
        z = [x / temperature for x in (1.0, 0.0, 0.0, -1.0)]
        log_norm = math.log(sum(math.exp(x) for x in z))
        log_q0, log_q2 = z[0] - log_norm, z[2] - log_norm
        hand = 2 / 3 * (math.log(2 / 3) - log_q0) + 1 / 3 * (math.log(1 / 3) - log_q2)
        got = topk_forward_kl(logits, ids, logprobs, temperature)
        assert got.shape == (1,) and abs(float(got[0]) - hand) < 1e-6, (temperature, float(got[0]), hand)


def _topk_inputs(k: int, vocab: int = 211) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    s_hidden, s_weight = torch.randn(29, 24, generator=g), torch.randn(vocab, 24, generator=g) * 0.3
    t_logits = torch.randn(29, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (29,), generator=g)
    labels[torch.rand(29, generator=g) < 0.3] = -100
    top = torch.log_softmax(t_logits / 1.7, -1)[labels != -100].topk(k, -1)
    return s_hidden, s_weight, t_logits, labels, top.indices, top.values


def test_the_chunked_topk_loss_and_its_gradients_equal_the_spec():
    results = []
    for chunked in (False, True):
        s_hidden, s_weight, _, labels, ids, logprobs = _topk_inputs(k=9)
        s_hidden.requires_grad_(True), s_weight.requires_grad_(True)
        if chunked:
            terms = chunked_topk_distill_loss(
                s_hidden, s_weight, ids, logprobs, labels, DistillSettings(alpha=0.3, temperature=1.7), chunk_size=5
            )
        else:
            terms = topk_distill_loss(s_hidden, s_weight, ids, logprobs, labels, alpha=0.3, temperature=1.7)
        terms[0].backward()
        results.append((*terms, s_hidden.grad, s_weight.grad))
    for spec, chunked in zip(*results):
        torch.testing.assert_close(chunked, spec, rtol=1e-5, atol=1e-6)
    assert results[0][2] > 0


def test_with_k_the_whole_vocabulary_it_is_the_full_forward_kl():
    s_hidden, s_weight, t_logits, labels, ids, logprobs = _topk_inputs(k=211)
    ours = topk_distill_loss(s_hidden, s_weight, ids, logprobs, labels, alpha=0.3, temperature=1.7)
    eye = torch.eye(211)  # teacher hidden = its logits, weight = identity
    full = reference.distill_loss(s_hidden, s_weight, t_logits, eye, labels, alpha=0.3, temperature=1.7)
    for a, b in zip(ours, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_cached_teacher_takes_forward_kl_only():
    with pytest.raises(ValueError, match="--divergence reverse needs the teacher's whole distribution"):
        Distill(DistillSettings(divergence="reverse"), None)


# ---------------------------------------------------------------- a corpus, a teacher and a student


def _save(out_dir: Path, config: LlamaConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Llama(config)
    meta = {"model": dataclasses.asdict(config), "train": {"steps": 1}, "tokenizer": TOKENIZER, "step": 1}
    save_checkpoint(out_dir, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return find_checkpoint(out_dir)


def _config(dim: int) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64)


def _corpus(folder: Path) -> Path:
    write_corpus(folder / "corpus.val", 12, seed=2)
    return write_corpus(folder / "corpus", 120, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A small packed corpus (~4,000 tokens, and a .val), a teacher (dim 64) pretrained on it for 40 steps, an
    untrained student (dim 32)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # function fixtures (one_torch_thread) do not cover a module fixture's setup
    try:
        root = tmp_path_factory.mktemp("distill-cache")
        data = _corpus(root)
        cfg = TrainConfig(
            steps=40, batch_size=8, seq_len=SEQ, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, save_every=0,
            out_dir=str(root / "teacher"), progress=False, kernels="torch", doc_masking=True, data_mode="epoch",
        )  # fmt: skip
        train(_config(64), cfg, data)
        return {
            "data": data,
            "teacher": find_checkpoint(root / "teacher"),
            "student": _save(root / "s", _config(32), 3),
        }
    finally:
        torch.set_num_threads(threads)


def distill_args(models: dict[str, Path], out: Path, steps: int, *extra: str, data: Path | None = None) -> list[str]:
    args = [
        "--teacher",
        str(models["teacher"]),
        "--init",
        str(models["student"]),
        "--data",
        str(data or models["data"]),
    ]
    args += ["--out-dir", str(out), "--steps", str(steps), "--batch-size", "4", "--seq-len", str(SEQ), "--lr", "3e-3"]
    return [*args, "--log-every", "1", "--temperature", str(T), *CPU, *extra]


def _cache_files(data: Path) -> list[Path]:
    prefix = DatasetPaths.of(data).bin
    return sorted(p for p in prefix.parent.iterdir() if p.name.startswith(f"{prefix.stem}.topk-"))


def _cache(data: Path, k: int = K) -> teacher_cache.TopKCache:
    metas = [p for p in _cache_files(data) if p.suffix == ".json" and json.loads(p.read_text())["top_k"] == k]
    assert len(metas) == 1, metas
    meta = json.loads(metas[0].read_text())
    spec = teacher_cache.CacheSpec(**{f.name: meta[f.name] for f in dataclasses.fields(teacher_cache.CacheSpec)})
    cache = teacher_cache.open_cache(teacher_cache.CachePaths.of(data, spec.key), spec)
    assert cache is not None
    return cache


@pytest.fixture(scope="module")
def cached(corpus, tmp_path_factory) -> dict[str, Path]:
    """One step of distillation from a top-16 cache of the corpus (T = 1): the cache exists beside it afterwards."""
    out = tmp_path_factory.mktemp("cached") / "run"
    assert distill.main(distill_args(corpus, out, 1, "--teacher-top-k", str(K), "--eval-every", "1")) == 0
    return {**corpus, "run": out}


# ---------------------------------------------------------------- (a) the cache holds the teacher's real top-K


def _real_logprobs(model: Llama, ids: np.ndarray, eos: int | None = None) -> torch.Tensor:
    """The teacher's log-softmax(logits / T) over one row, computed on its own (with document positions)."""
    x = torch.from_numpy(ids.astype(np.int64))[None]
    if eos is None:
        position_ids, doc_ids = None, None
    else:
        positions, docs = document_positions(ids[None], eos)
        position_ids, doc_ids = torch.from_numpy(positions), torch.from_numpy(docs)
    with torch.no_grad():
        logits = model(x, position_ids=position_ids, doc_ids=doc_ids).logits[0].float()
    return torch.log_softmax(logits / T, -1)


def _assert_rows_are_the_top_k(cache: teacher_cache.TopKCache, offsets: np.ndarray, real: torch.Tensor) -> None:
    """The cached values are the real top-K values, and each cached id's real log-prob is its cached value."""
    ids, values = cache.rows(offsets)
    values = torch.from_numpy(values.astype(np.float32))
    top = real.topk(cache.spec.top_k, -1).values
    torch.testing.assert_close(values, top, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(real.gather(1, torch.from_numpy(ids.astype(np.int64))), values, rtol=2e-3, atol=2e-3)


def test_the_corpus_cache_holds_the_teachers_top_k_at_each_token_offset(cached):
    cache = _cache(cached["data"])
    meta = json.loads(cache.paths.meta.read_text())
    assert (
        meta["ids_dtype"] == "uint16"
        and meta["logprobs_dtype"] == "float16"
        and meta["shape"] == [cache.spec.n_tokens, K]
    )
    assert meta["data_kind"] == "pretrain" and meta["top_k"] == K and meta["temperature"] == T
    assert cache.paths.ids.stat().st_size == cache.spec.n_tokens * K * 2
    teacher = load_reference(cached["teacher"], read_config(cached["teacher"]), "torch")
    tokens = np.fromfile(DatasetPaths.of(cached["data"]).bin, dtype=np.uint16)
    for chunk in (0, 7, (len(tokens) // (SEQ + 1)) - 1):  # first, middle, last chunk of seq_len + 1 tokens
        start = chunk * (SEQ + 1)
        real = _real_logprobs(teacher, tokens[start : start + SEQ], eos=2)
        _assert_rows_are_the_top_k(cache, np.arange(start, start + SEQ), real)


def _write_sft(prefix: Path, n_docs: int, seed: int) -> Path:
    """A packed SFT dataset of random conversations: a prompt (mask 0) then a reply (mask 1) ending with EOS."""
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for _ in range(n_docs):
        prompt, reply = int(rng.integers(2, 12)), int(rng.integers(3, 30))  # some longer than SEQ: cut
        docs.append(np.append(rng.integers(3, VOCAB, prompt + reply - 1), 2))
        masks.append(np.r_[np.zeros(prompt), np.ones(reply)].astype(np.uint8))
    paths, dtype = DatasetPaths.of(prefix), token_dtype(VOCAB)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    with AtomicOutput(paths) as out:
        np.concatenate(docs).astype(dtype).tofile(out.tmp(paths.bin))
        np.concatenate(masks).tofile(out.tmp(paths.mask))
        with open(out.tmp(paths.idx), "wb") as f:
            np.save(f, offsets)
        meta = {"format": FORMAT, "kind": "sft", "dtype": dtype.name, "n_tokens": int(offsets[-1])}
        out.commit({**meta, "n_docs": n_docs, "vocab_size": VOCAB, "eos_id": 2, "pad_id": 0, "tokenizer": TOKENIZER})
    return paths.prefix


def test_the_sft_cache_holds_each_reply_tokens_top_k_however_conversations_are_packed(corpus, tmp_path):
    prefix = _write_sft(tmp_path / "chat", 40, seed=5)
    teacher = load_reference(corpus["teacher"], read_config(corpus["teacher"]), "torch")
    settings = teacher_cache.CacheSettings(
        str(corpus["teacher"]), "cd" * 32, top_k=8, temperature=T, seq_len=SEQ, precision="fp32", batch_size=3
    )
    caches = teacher_cache.teacher_caches([prefix], "sft", settings, VOCAB, lambda: (teacher, None))
    cache = caches[prefix.resolve()]
    meta = json.loads(cache.paths.meta.read_text())
    tokens = np.fromfile(DatasetPaths.of(prefix).bin, dtype=np.uint16)
    mask = np.fromfile(DatasetPaths.of(prefix).mask, dtype=np.uint8)
    offsets, counted = np.load(DatasetPaths.of(prefix).idx), 0
    for start, end in zip(offsets[:-1], offsets[1:]):
        end = min(end, start + SEQ)  # a conversation longer than seq_len is cut
        rows = np.flatnonzero(mask[start + 1 : end]) + start  # positions whose next token counts
        counted += rows.size
        real = _real_logprobs(teacher, tokens[start:end])  # the conversation alone
        _assert_rows_are_the_top_k(cache, rows, real[rows - start])
    assert meta["counted_tokens"] == counted > 0


def test_sft_rows_from_a_whole_vocabulary_cache_give_the_online_teachers_loss(corpus, tmp_path):
    prefix = _write_sft(tmp_path / "chat", 40, seed=5)
    extra = ("--alpha", "0.5", "--eval-every", "0")
    assert distill.main(distill_args(corpus, tmp_path / "online", 2, *extra, data=prefix)) == 0
    cached = distill_args(corpus, tmp_path / "cached", 2, *extra, "--teacher-top-k", str(VOCAB), data=prefix)
    assert distill.main(cached) == 0
    online, from_cache = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("online", "cached"))
    for key in ("loss", "ce", "kl"):
        assert from_cache[0][key] == pytest.approx(online[0][key], rel=2e-3), key
    assert read_config(find_checkpoint(tmp_path / "cached"))["task"]["data_kind"] == "sft"


# ---------------------------------------------------------------- (b) K = vocabulary: the online teacher's loss


def test_training_from_a_whole_vocabulary_cache_gives_the_online_teachers_loss(corpus, tmp_path):
    extra = ("--alpha", "0.5", "--eval-every", "2")
    assert distill.main(distill_args(corpus, tmp_path / "online", 2, *extra)) == 0
    assert distill.main(distill_args(corpus, tmp_path / "cached", 2, *extra, "--teacher-top-k", str(VOCAB))) == 0
    online, cached = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("online", "cached"))
    for key in ("loss", "ce", "kl"):
        assert cached[0][key] == pytest.approx(online[0][key], rel=2e-3), key
    for key in ("val_loss", "val_kl"):
        assert cached[-1][key] == pytest.approx(online[-1][key], rel=5e-3), key
    task = read_config(find_checkpoint(tmp_path / "cached"))["task"]
    assert task["data_kind"] == "pretrain" and task["teacher_cache"]["top_k"] == VOCAB
    assert read_config(find_checkpoint(tmp_path / "online"))["task"]["teacher_cache"] is None
    assert read_config(find_checkpoint(tmp_path / "cached"))["train"]["data_mode"] == "epoch"


def test_epochs_over_a_corpus_count_its_chunks(corpus, tmp_path):
    args = distill_args(corpus, tmp_path / "run", 1, "--eval-every", "0")
    args[args.index("--steps") : args.index("--steps") + 2] = ["--epochs", "0.25"]
    assert distill.main(args) == 0
    chunks = PretrainDataset(corpus["data"], SEQ, mode="epoch", pin_memory=False).n_chunks
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == math.ceil(0.25 * chunks / 4)


# ---------------------------------------------------------------- (c) the student ends closer to its teacher


def _validation_kl(models: dict[str, Path], student: Path) -> float:
    """The student's mean forward KL (T = 1) to the online teacher over the held-out corpus chunks."""
    teacher = load_reference(models["teacher"], read_config(models["teacher"]), "torch")
    model = load_reference(student, read_config(student), "torch")
    objective = Distill(DistillSettings(alpha=1.0, temperature=1.0), Teacher(teacher))
    val = DatasetPaths.of(models["data"]).val().prefix
    dataset = PretrainDataset(val, SEQ, mode="epoch", return_doc_ids=True, pin_memory=False)
    batches = [dataset.next_batch(4) for _ in range(dataset.n_chunks // 4)]
    with torch.no_grad():
        return float(objective.validate(model, batches)["kl"])


def test_a_student_distilled_over_a_corpus_from_the_cache_ends_closer_to_its_teacher(
    cached, tmp_path, caplog, monkeypatch
):
    out = tmp_path / "run"

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its cache is there")

    monkeypatch.setattr(distill, "load_reference", no_teacher)  # training from the cache never loads the teacher
    with caplog.at_level(logging.INFO):
        assert distill.main(distill_args(cached, out, 30, "--teacher-top-k", str(K), "--alpha", "1")) == 0
    err = caplog.text
    assert "computing the teacher's top" not in err and f"teacher top-{K} log-probs from" in err  # reused
    before, after = _validation_kl(cached, cached["student"]), _validation_kl(cached, find_checkpoint(out))
    print(f"validation KL to the teacher: {before:.4f} before, {after:.4f} after 30 steps from the top-{K} cache")
    assert after < 0.7 * before


# ---------------------------------------------------------------- (d) exact resume from the cache


def test_a_run_from_the_cache_killed_mid_run_resumes_bitwise_identically(cached, tmp_path, capsys):
    script = tmp_path / "run_distill.py"
    script.write_text("from llama.distill import main\nraise SystemExit(main())\n", encoding="utf-8")
    steps, extra = 4, ("--teacher-top-k", str(K), "--save-every", "2", "--eval-every", "2", "--model", "dropout=0.1")
    reference_args = distill_args(cached, tmp_path / "reference", steps, *extra)
    victim_args = distill_args(cached, tmp_path / "victim", steps, *extra)
    reference_run = start_run(reference_args, tmp_path / "ref.log", script=str(script))
    victim = start_run(victim_args, tmp_path / "victim.log", stall_at=2, script=str(script))
    assert wait_until_stalled(tmp_path / "victim.log", victim) == 2
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert reference_run.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    resumed = start_run(victim_args, tmp_path / "resumed.log", script=str(script))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    log = (tmp_path / "resumed.log").read_text()
    assert "RESUMING from" in log and "computing the teacher's top" not in log
    assert_resumed_identically(tmp_path / "reference", tmp_path / "victim", steps, ("loss", "grad_norm", "ce", "kl"))
    other = distill_args(cached, tmp_path / "victim", steps + 2, *extra)
    other[other.index("--teacher-top-k") + 1] = "8"
    assert_one_line_error(distill.main(other), capsys.readouterr().err, "was distilled with --teacher-top-k 16")


# ---------------------------------------------------------------- (e) faults


@pytest.fixture
def own_corpus(corpus, tmp_path) -> dict[str, Path]:
    """The corpus written again in a folder of this test's own (its caches are this test's to damage)."""
    return {**corpus, "data": _corpus(tmp_path / "data")}


def test_a_truncated_cache_is_refused_naming_the_file_and_rebuilt_once_deleted(own_corpus, tmp_path, capsys):
    args = distill_args(own_corpus, tmp_path / "a", 1, "--teacher-top-k", "4")
    assert distill.main(args) == 0
    cache = _cache(own_corpus["data"], 4)
    with open(cache.paths.logprobs, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    code = distill.main(distill_args(own_corpus, tmp_path / "b", 1, "--teacher-top-k", "4"))
    line = assert_one_line_error(code, capsys.readouterr().err, str(cache.paths.logprobs), "100 bytes", "delete")
    assert cache.paths.pattern in line
    for path in _cache_files(own_corpus["data"]):  # what the error says to do
        path.unlink()
    assert distill.main(distill_args(own_corpus, tmp_path / "b", 1, "--teacher-top-k", "4")) == 0
    assert _cache(own_corpus["data"], 4).paths.logprobs.stat().st_size == cache.spec.n_tokens * 4 * 2


def test_an_unreadable_cache_meta_is_refused_in_one_line(own_corpus, tmp_path, capsys):
    assert distill.main(distill_args(own_corpus, tmp_path / "a", 1, "--teacher-top-k", "4")) == 0
    meta = _cache(own_corpus["data"], 4).paths.meta
    meta.write_text("{", encoding="utf-8")
    capsys.readouterr()
    code = distill.main(distill_args(own_corpus, tmp_path / "b", 1, "--teacher-top-k", "4"))
    assert_one_line_error(code, capsys.readouterr().err, str(meta), "unreadable", "to compute the cache again")


def test_a_cache_of_another_k_or_temperature_is_not_used_a_new_one_is_computed(own_corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert distill.main(distill_args(own_corpus, tmp_path / "a", 1, "--teacher-top-k", "4")) == 0
    caplog.clear()
    assert distill.main(distill_args(own_corpus, tmp_path / "b", 1, "--teacher-top-k", "8")) == 0
    assert "teacher caches of other settings beside" in caplog.text and "(K 4, T 1.0" in caplog.text
    assert "computing the teacher's top-8 log-probs (T 1)" in caplog.text
    caplog.clear()
    args = distill_args(own_corpus, tmp_path / "c", 1, "--teacher-top-k", "8")
    args[args.index("--temperature") + 1] = "2"
    assert distill.main(args) == 0
    assert "computing the teacher's top-8 log-probs (T 2)" in caplog.text
    metas = [json.loads(p.read_text()) for p in _cache_files(own_corpus["data"]) if p.suffix == ".json"]
    assert sorted((m["top_k"], m["temperature"]) for m in metas) == [(4, 1.0), (8, 1.0), (8, 2.0)]


def test_an_interrupted_precompute_leaves_nothing_that_is_trusted_later(own_corpus, tmp_path, monkeypatch):
    calls, real = [], teacher_cache.topk_logprobs

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "topk_logprobs", interrupted)
    assert distill.main(distill_args(own_corpus, tmp_path / "a", 1, "--teacher-top-k", "4")) == 130
    folder = DatasetPaths.of(own_corpus["data"]).bin.parent
    assert _cache_files(own_corpus["data"]) == [] and not [p for p in folder.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(teacher_cache, "topk_logprobs", real)
    assert distill.main(distill_args(own_corpus, tmp_path / "b", 1, "--teacher-top-k", "4")) == 0
    good = _cache(own_corpus["data"], 4)
    expected = np.array(good.logprobs)
    # killed between the renames and the meta: the files are there, the meta not; then the files are damaged
    good.paths.meta.unlink()
    np.zeros_like(expected).tofile(good.paths.logprobs)
    assert distill.main(distill_args(own_corpus, tmp_path / "c", 1, "--teacher-top-k", "4")) == 0
    assert np.array_equal(np.array(_cache(own_corpus["data"], 4).logprobs), expected)  # computed again


def test_a_disk_without_room_for_the_cache_is_refused_before_the_pass(own_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    code = distill.main(distill_args(own_corpus, tmp_path / "a", 1, "--teacher-top-k", "4"))
    assert_one_line_error(code, capsys.readouterr().err, "the teacher cache of", "GiB free", "lower --teacher-top-k")
    assert _cache_files(own_corpus["data"]) == []


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--teacher-top-k", "4", "--divergence", "reverse"], ["--divergence reverse needs the teacher's whole"]),
        (["--teacher-top-k", "4", "--divergence", "jsd"], ["--divergence jsd needs", "use --divergence forward"]),
        (["--teacher-top-k", str(VOCAB + 1)], [f"--teacher-top-k {VOCAB + 1} is more than the vocabulary"]),
        (["--teacher-top-k", "0"], ["--teacher-top-k"]),
    ],
)
def test_bad_top_k_settings_are_one_line_before_anything_is_written(own_corpus, tmp_path, capsys, flags, needles):
    code = distill.main(distill_args(own_corpus, tmp_path / "out", 1, *flags))
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert not (tmp_path / "out").exists() and _cache_files(own_corpus["data"]) == []


def test_a_bare_bin_without_meta_is_refused_naming_what_distillation_takes(corpus, tmp_path, capsys):
    bare = tmp_path / "bare.bin"
    np.arange(200, dtype=np.uint16).tofile(bare)
    code = distill.main(distill_args(corpus, tmp_path / "out", 1, data=bare))
    assert_one_line_error(code, capsys.readouterr().err, "has no bare.meta.json", "--kind pretrain")
