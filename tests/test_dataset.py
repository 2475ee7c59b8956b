"""engine.dataset: pretrain windows, SFT rows packed by first-fit decreasing, resume, sharding (DPO: its own file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.dataset import PretrainDataset, SFTDataset
from engine.dataset.binpack import pack_first_fit_decreasing, pack_next_fit
from engine.format import FORMAT, AtomicOutput, DatasetError, DatasetPaths, token_dtype

EOS, PAD, VOCAB, SHA = 2, 0, 100, "ab" * 32


def write_packed(
    prefix: Path,
    docs: list[list[int]],
    masks: list[list[int]] | None = None,
    *,
    kind: str = "pretrain",
    vocab_size: int = VOCAB,
    pad_id: int | None = PAD,
    extra_meta: dict | None = None,
) -> Path:
    """Write ``docs`` (each already ending with EOS) exactly as engine.format.open_packed reads them."""
    paths = DatasetPaths.of(prefix)
    dtype = token_dtype(vocab_size)
    lengths = [len(d) for d in docs]
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    with AtomicOutput(paths) as out:
        np.concatenate([np.asarray(d, dtype=dtype) for d in docs]).tofile(out.tmp(paths.bin))
        with open(out.tmp(paths.idx), "wb") as f:
            np.save(f, offsets)
        if masks is not None:
            np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks]).tofile(out.tmp(paths.mask))
        meta = {
            "format": FORMAT,
            "kind": kind,
            "dtype": dtype.name,
            "n_tokens": int(offsets[-1]),
            "n_docs": len(docs),
            "vocab_size": vocab_size,
            "bos_id": 1,
            "eos_id": EOS,
            "pad_id": pad_id,
            "tokenizer": {"path": "tok/tokenizer.json", "sha256": SHA},
        }
        meta.update(extra_meta or {})
        out.commit(meta)
    return paths.prefix


def random_docs(rng: np.random.Generator, n_docs: int, low: int, high: int) -> list[list[int]]:
    return [list(rng.integers(3, VOCAB, size=int(rng.integers(low, high)))) + [EOS] for _ in range(n_docs)]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, np.ndarray]:
    docs = random_docs(np.random.default_rng(1), 60, 3, 40)
    prefix = write_packed(tmp_path / "corpus", docs)
    return prefix, np.concatenate([np.asarray(d) for d in docs])


def take(dataset, n_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [dataset.next_batch(batch_size) for _ in range(n_batches)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


# ---------------------------------------------------------------- pretrain


@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_pretrain_windows_are_slices_of_the_stream(corpus, mode):
    prefix, stream = corpus
    seq_len = 16
    ds = PretrainDataset(prefix, seq_len, mode=mode, seed=3, tokenizer_sha256=SHA)
    for batch in take(ds, 5, 4):
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape == (4, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            window = np.concatenate([row_x, row_y[-1:]])
            starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1).__eq__(window).all(1))
            assert starts.size >= 1
            if mode == "epoch":
                assert any(s % (seq_len + 1) == 0 for s in starts)


def test_pretrain_is_deterministic_and_seeded(corpus):
    prefix, _ = corpus
    a = take(PretrainDataset(prefix, 8, seed=5), 3, 4)
    assert_same_batches(a, take(PretrainDataset(prefix, 8, seed=5), 3, 4))
    other = take(PretrainDataset(prefix, 8, seed=6), 3, 4)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, other))
    rank1 = take(PretrainDataset(prefix, 8, seed=5, rank=1, world_size=2), 3, 4)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, rank1))


@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_pretrain_resume_continues_exactly(corpus, mode):
    prefix, stream = corpus
    seq_len, batch_size = 20, 7
    ds = PretrainDataset(prefix, seq_len, mode=mode, seed=11)
    per_epoch = stream.size // (seq_len + 1)
    # Stop just before an epoch boundary so the resumed batches cross it.
    n_before = per_epoch // batch_size if mode == "epoch" else 4
    take(ds, n_before, batch_size)
    state = ds.state_dict()
    expected = take(ds, 3, batch_size)
    assert mode == "random" or ds.epoch >= 1
    fresh = PretrainDataset(prefix, seq_len, mode=mode, seed=11)
    fresh.load_state_dict(state)
    assert_same_batches(take(fresh, 3, batch_size), expected)


def test_pretrain_refuses_state_from_other_settings(corpus):
    prefix, _ = corpus
    state = PretrainDataset(prefix, 8, mode="epoch", seed=1).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PretrainDataset(prefix, 9, mode="epoch", seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="mode"):
        PretrainDataset(prefix, 8, mode="random", seed=1).load_state_dict(state)


def chunk_ids(batches: list[dict], stream: np.ndarray, seq_len: int) -> list[int]:
    chunks = stream[: stream.size // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
    lookup = {tuple(c): i for i, c in enumerate(chunks)}
    assert len(lookup) == len(chunks)  # chunks are distinguishable in this random corpus
    ids = []
    for b in batches:
        for x, y in zip(b["input_ids"].numpy(), b["labels"].numpy()):
            ids.append(lookup[tuple(np.concatenate([x, y[-1:]]))])
    return ids


@pytest.mark.parametrize("world_size", [1, 3])
def test_pretrain_epoch_shards_cover_each_chunk_once(corpus, world_size):
    prefix, stream = corpus
    seq_len = 12
    n_chunks = stream.size // (seq_len + 1)
    shards = [
        PretrainDataset(prefix, seq_len, mode="epoch", seed=2, rank=r, world_size=world_size) for r in range(world_size)
    ]
    per_rank = shards[0].samples_per_epoch
    assert per_rank == n_chunks // world_size and shards[0].leftover_chunks_per_epoch == n_chunks % world_size
    assert shards[0].tail_tokens == stream.size - n_chunks * (seq_len + 1)
    seen_epochs = []
    for _ in range(2):
        ids = [i for ds in shards for i in chunk_ids([ds.next_batch(per_rank)], stream, seq_len)]
        assert len(ids) == len(set(ids)) == n_chunks - n_chunks % world_size
        seen_epochs.append(ids)
    assert seen_epochs[0] != seen_epochs[1]  # a fresh permutation each epoch
    assert all(ds.epoch == 2 for ds in shards)


def test_pretrain_position_and_doc_ids(tmp_path):
    docs = [[5, 6, EOS], [7, EOS], [8, 9, 10, 11, EOS], [12, 13, EOS]]
    prefix = write_packed(tmp_path / "docs", docs)
    chunks = take(PretrainDataset(prefix, 5, mode="epoch", return_doc_ids=True), 1, 2)[0]
    first = chunks["input_ids"][:, 0].tolist().index(5)  # chunk [5, 6, EOS, 7, EOS, 8]
    assert chunks["position_ids"][first].tolist() == [0, 1, 2, 0, 1]
    assert chunks["doc_ids"][first].tolist() == [0, 0, 0, 1, 1]
    ds = PretrainDataset(prefix, 6, seed=0, return_doc_ids=True)
    for batch in take(ds, 10, 3):
        assert batch["doc_ids"].dtype == torch.int32 and batch["position_ids"].dtype == torch.int64
        for x, pos, doc in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), batch["doc_ids"].tolist()):
            expected_pos, expected_doc, p, d = [], [], 0, 0
            for t, token in enumerate(x):
                if t > 0 and x[t - 1] == EOS:
                    p, d = 0, d + 1
                expected_pos.append(p)
                expected_doc.append(d)
                p += 1
            assert pos == expected_pos and doc == expected_doc


def test_pretrain_refusals(tmp_path, corpus):
    prefix, stream = corpus
    with pytest.raises(DatasetError, match="seq_len"):
        PretrainDataset(prefix, stream.size)
    PretrainDataset(prefix, stream.size - 1)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(DatasetError, match="tokenizer"):
        PretrainDataset(prefix, 8, tokenizer_sha256="cd" * 32)
    with pytest.raises(ValueError, match="mode"):
        PretrainDataset(prefix, 8, mode="sequential")
    sft = write_packed(tmp_path / "chat", [[5, EOS]], [[1, 0]], kind="sft")
    with pytest.raises(DatasetError, match="SFTDataset"):
        PretrainDataset(sft, 1)


def test_pretrain_reads_a_bare_bin_and_uint32(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    tokens.tofile(tmp_path / "bare.bin")
    with pytest.raises(DatasetError, match="--dtype"):
        PretrainDataset(tmp_path / "bare.bin", 8)
    ds = PretrainDataset(tmp_path / "bare.bin", 8, dtype="uint16", vocab_size=256)
    x = ds.next_batch(4)["input_ids"]
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.int64))
    with pytest.raises(DatasetError, match="eos_id"):
        PretrainDataset(tmp_path / "bare.bin", 8, dtype="uint16", vocab_size=256, return_doc_ids=True)

    big = [[70_000, 70_001, EOS], [65_536, EOS]]
    prefix = write_packed(tmp_path / "wide", big, vocab_size=80_000)
    batch = PretrainDataset(prefix, 4, mode="epoch").next_batch(1)
    assert batch["input_ids"].tolist() == [[70_000, 70_001, EOS, 65_536]]
    assert batch["labels"].tolist() == [[70_001, EOS, 65_536, EOS]]


def test_pretrain_iterable_feeds_a_dataloader(corpus):
    prefix, _ = corpus
    loader = torch.utils.data.DataLoader(PretrainDataset(prefix, 8, seed=4).iterable(2), batch_size=None)
    first = next(iter(loader))
    assert_same_batches([first], take(PretrainDataset(prefix, 8, seed=4), 1, 2))


# ---------------------------------------------------------------- first-fit decreasing


def brute_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if room >= lengths[item]:
                rows[r].append(item)
                free[r] -= lengths[item]
                break
        else:
            rows.append([item])
            free.append(capacity - lengths[item])
    return rows


def optimal_rows(lengths: list[int], capacity: int) -> int:
    best = len(lengths)

    def place(k: int, free: list[int]) -> None:
        nonlocal best
        if len(free) >= best:
            return
        if k == len(lengths):
            best = len(free)
            return
        for r in range(len(free)):
            if free[r] >= lengths[k]:
                free[r] -= lengths[k]
                place(k + 1, free)
                free[r] += lengths[k]
        place(k + 1, free + [capacity - lengths[k]])

    place(0, [])
    return best


def test_first_fit_decreasing_matches_brute_force():
    rng = np.random.default_rng(0)
    for case in range(300):
        capacity = int(rng.integers(1, 40))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(0, 60))).tolist()
        offsets, items = pack_first_fit_decreasing(np.array(lengths, dtype=np.int64), capacity)
        rows = [items[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
        assert rows == brute_first_fit_decreasing(lengths, capacity), case
        assert sorted(items.tolist()) == list(range(len(lengths)))  # each placed exactly once
        for row in rows:
            assert sum(lengths[i] for i in row) <= capacity
            assert [lengths[i] for i in row] == sorted((lengths[i] for i in row), reverse=True)


def test_first_fit_decreasing_is_near_optimal_on_small_cases():
    rng = np.random.default_rng(1)
    for _ in range(40):
        capacity = int(rng.integers(5, 20))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 8))).tolist()
        offsets, _ = pack_first_fit_decreasing(np.array(lengths), capacity)
        assert len(offsets) - 1 <= 11 / 9 * optimal_rows(lengths, capacity) + 6 / 9
    with pytest.raises(ValueError, match="length"):
        pack_first_fit_decreasing(np.array([3, 9]), 8)


def test_next_fit_keeps_order_and_opens_a_row_on_each_misfit():
    assert pack_next_fit(np.array([3, 4, 2, 5, 1, 1]), 6).tolist() == [0, 1, 1, 2, 2, 3]
    assert pack_next_fit(np.array([6, 6]), 6).tolist() == [0, 1]
    assert pack_next_fit(np.array([], dtype=np.int64), 6).size == 0
    with pytest.raises(ValueError, match="length"):
        pack_next_fit(np.array([3, 9]), 8)


# ---------------------------------------------------------------- SFT

CHAT_DOCS = [[10, 11, 12, 13, EOS], [20, 21, 22, EOS], [30, 31, EOS]]
CHAT_MASKS = [[0, 0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0]]
N = -100


def test_sft_rows_token_by_token(tmp_path):
    prefix = write_packed(tmp_path / "chat", CHAT_DOCS, CHAT_MASKS, kind="sft")
    ds = SFTDataset(prefix, 8, tokenizer_sha256=SHA)
    assert ds.n_rows == 2 and ds.n_truncated == 0 and ds.packing_efficiency == pytest.approx(12 / 16)
    batch = ds.next_batch(2)
    rows = {row[0]: i for i, row in enumerate(batch["input_ids"].tolist())}
    a, b = rows[10], rows[20]  # rows come shuffled; find them by their first token
    assert batch["input_ids"][a].tolist() == [10, 11, 12, 13, EOS, 30, 31, EOS]
    assert batch["labels"][a].tolist() == [N, 12, 13, N, N, 31, N, N]
    assert batch["position_ids"][a].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["doc_ids"][a].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert batch["input_ids"][b].tolist() == [20, 21, 22, EOS, PAD, PAD, PAD, PAD]
    assert batch["labels"][b].tolist() == [21, 22, N, N, N, N, N, N]
    assert batch["position_ids"][b].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch["doc_ids"][b].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["doc_ids"].dtype == torch.int32 and batch["labels"].dtype == torch.int64


def test_sft_pads_with_eos_without_a_pad_id(tmp_path):
    prefix = write_packed(tmp_path / "chat", CHAT_DOCS, CHAT_MASKS, kind="sft", pad_id=None)
    ds = SFTDataset(prefix, 8)
    assert ds.pad_id == EOS and SFTDataset(prefix, 8, pad_id=7).pad_id == 7


def test_sft_counts_truncation_and_drops_label_free_conversations(tmp_path):
    long_doc = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, EOS]
    long_mask = [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0]  # cut at 6 keeps targets 2, 3; loses 6..9
    prompt_heavy = [50, 51, 52, 53, 54, 55, 56, EOS]
    prompt_mask = [0, 0, 0, 0, 0, 0, 0, 1]  # its only label lies beyond the cut
    prefix = write_packed(
        tmp_path / "chat", [long_doc, prompt_heavy, [30, 31, EOS]], [long_mask, prompt_mask, [0, 1, 0]], kind="sft"
    )
    ds = SFTDataset(prefix, 6)
    assert ds.n_truncated == 2 and ds.n_label_tokens_truncated == 5
    assert ds.n_dropped_no_labels == 1 and ds.n_rows == 2
    rows = ds.next_batch(2)
    by_first = {r[0]: i for i, r in enumerate(rows["input_ids"].tolist())}
    i = by_first[40]
    assert rows["input_ids"][i].tolist() == [40, 41, 42, 43, 44, 45]
    assert rows["labels"][i].tolist() == [N, 42, 43, N, N, N]


def test_sft_refuses_other_kinds(tmp_path, corpus):
    prefix, _ = corpus
    with pytest.raises(DatasetError, match="not sft"):
        SFTDataset(prefix, 8)


def chat_corpus(tmp_path: Path, n: int = 80) -> tuple[Path, list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(7)
    docs, masks = [], []
    for k in range(n):
        prompt, answer = int(rng.integers(1, 10)), int(rng.integers(1, 20))
        docs.append([3 + k] + list(rng.integers(3, VOCAB, size=prompt + answer - 1)) + [EOS])  # k by first token
        masks.append([0] * prompt + [1] * answer + [0])
    return write_packed(tmp_path / "chats", docs, masks, kind="sft"), docs, masks


def reference_labels(doc: list[int], mask: list[int]) -> list[int]:
    return [doc[t + 1] if t + 1 < len(doc) and mask[t + 1] else N for t in range(len(doc))]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sft_shards_and_epochs_cover_rows_once(tmp_path, world_size):
    prefix, docs, masks = chat_corpus(tmp_path)
    shards = [SFTDataset(prefix, 64, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    n_rows, per_rank = shards[0].n_rows, shards[0].samples_per_epoch
    assert per_rank == n_rows // world_size and 0.8 < shards[0].packing_efficiency <= 1
    for _ in range(2):
        rows = [tuple(r) for ds in shards for r in ds.next_batch(per_rank)["input_ids"].tolist()]
        assert len(rows) == len(set(rows)) == n_rows - n_rows % world_size
    if world_size > 1:
        return
    batch = shards[0].next_batch(n_rows)  # one whole epoch: every conversation exactly once, labels by the rule
    seen = []
    for x, y, pos, doc in zip(*(batch[k].tolist() for k in ("input_ids", "labels", "position_ids", "doc_ids"))):
        assert doc == sorted(doc)  # ids never decrease along a row, padding last
        for d in sorted(set(doc)):
            cells = [t for t, i in enumerate(doc) if i == d]
            if x[cells[0]] == PAD:
                assert all(x[t] == PAD and y[t] == N for t in cells) and d == max(doc)
                continue
            k = x[cells[0]] - 3
            seen.append(k)
            assert [x[t] for t in cells] == docs[k] and [pos[t] for t in cells] == list(range(len(cells)))
            assert [y[t] for t in cells] == reference_labels(docs[k], masks[k])
    assert sorted(seen) == list(range(80))


def test_sft_resume_across_epoch(tmp_path):
    prefix, _, _ = chat_corpus(tmp_path)
    ds = SFTDataset(prefix, 64, seed=9)
    take(ds, ds.n_rows // 3, 3)
    state = ds.state_dict()
    expected = take(ds, 3, 3)
    assert ds.epoch == 1
    fresh = SFTDataset(prefix, 64, seed=9)
    fresh.load_state_dict(state)
    assert_same_batches(take(fresh, 3, 3), expected)
    assert_same_batches(take(SFTDataset(prefix, 64, seed=9), 2, 3), take(SFTDataset(prefix, 64, seed=9), 2, 3))


# ---------------------------------------------------------------- DPO: tests/test_dataset_dpo.py


def test_batches_are_pinned_only_with_cuda(corpus):
    prefix, _ = corpus
    batch = PretrainDataset(prefix, 8).next_batch(2)
    assert batch["input_ids"].is_pinned() == torch.cuda.is_available()
    assert not PretrainDataset(prefix, 8, pin_memory=False).next_batch(2)["labels"].is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs an accelerator")
def test_pinned_batches_match_unpinned(tmp_path):
    prefix, _, _ = chat_corpus(tmp_path)
    pinned = SFTDataset(prefix, 64, pin_memory=True).next_batch(3)
    assert all(t.is_pinned() for t in pinned.values())
    assert_same_batches([pinned], [SFTDataset(prefix, 64, pin_memory=False).next_batch(3)])
