"""engine.dataset.DPODataset: preference pairs packed into rows, chosen and rejected side by side, one forward."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dataset import EOS, PAD, SHA, VOCAB, assert_same_batches, take, write_packed

from engine.dataset import DPODataset
from engine.dataset.dpo import pair_keep_lengths
from engine.format import DatasetError

N = -100
KEYS = {"input_ids", "labels", "position_ids", "doc_ids", "seq_ids", "pair_index"}

Side = tuple[list[int], list[int]]  # (tokens, mask) of one document


def write_dpo(prefix: Path, sides: list[Side], **meta) -> Path:
    n_pairs = meta.pop("n_pairs", len(sides) // 2)
    docs, masks = [d for d, _ in sides], [m for _, m in sides]
    return write_packed(prefix, docs, masks, kind="dpo", extra_meta={"n_pairs": n_pairs, **meta})


def side(prompt: list[int], reply: list[int]) -> Side:
    """prompt + reply + EOS, the loss on the reply only (as the DPO packer writes it)."""
    return prompt + reply + [EOS], [0] * len(prompt) + [1] * len(reply) + [0]


def expected_keep(chosen: int, rejected: int, seq_len: int) -> tuple[int, int]:
    """The truncation rule, written out independently of the dataset's vectorised version."""
    if chosen + rejected <= seq_len:
        return chosen, rejected
    if chosen <= rejected:
        short = min(chosen, seq_len // 2)
        return short, seq_len - short
    short = min(rejected, seq_len // 2)
    return seq_len - short, short


def expected_labels(tokens: list[int], mask: list[int], keep: int) -> list[int]:
    return [tokens[j + 1] if j + 1 < keep and mask[j + 1] else N for j in range(keep)]


class Pairs:
    """The test's own view of a DPO file: which pairs survive at ``seq_len`` and what each side must look like."""

    def __init__(self, sides: list[Side], seq_len: int) -> None:
        self.sides, self.seq_len = sides, seq_len
        self.keep = [expected_keep(len(sides[2 * p][0]), len(sides[2 * p + 1][0]), seq_len) for p in range(self.n)]
        self.usable = [p for p in range(self.n) if all(any(v != N for v in self.labels(p, s)) for s in (0, 1))]

    @property
    def n(self) -> int:
        return len(self.sides) // 2

    def tokens(self, pair: int, s: int) -> list[int]:
        return self.sides[2 * pair + s][0][: self.keep[pair][s]]

    def labels(self, pair: int, s: int) -> list[int]:
        tokens, mask = self.sides[2 * pair + s]
        return expected_labels(tokens, mask, self.keep[pair][s])


def split_rows(batch: dict[str, torch.Tensor]) -> list[list[tuple[int, int]]]:
    """Each row's documents as (start, end) columns, from doc_ids alone, the trailing all-PAD padding left out."""
    rows = []
    for ids, tokens in zip(batch["doc_ids"].tolist(), batch["input_ids"].tolist()):
        cuts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
        spans = list(zip(cuts[:-1], cuts[1:]))
        if all(tok == PAD for tok in tokens[spans[-1][0] :]):
            spans.pop()
        rows.append(spans)
    return rows


def check_batch(batch: dict[str, torch.Tensor], pairs: Pairs) -> list[int]:
    """Assert the whole batch contract against the test's own view; return the batch's pair numbers by slot."""
    assert set(batch) == KEYS
    n_rows, width = batch["input_ids"].shape
    assert width == pairs.seq_len
    for key in KEYS - {"pair_index"}:
        assert batch[key].shape == (n_rows, width), key
        assert batch[key].dtype == (torch.int32 if key == "doc_ids" else torch.int64), key
    pair_index = batch["pair_index"].tolist()
    expected_seq = torch.full((n_rows, width), -1, dtype=torch.int64)
    k = 0
    for row, spans in enumerate(split_rows(batch)):
        assert len(spans) % 2 == 0, "every row holds whole pairs"
        for d, (start, end) in enumerate(spans):
            pair, s = pair_index[k + d // 2], d % 2
            assert batch["input_ids"][row, start:end].tolist() == pairs.tokens(pair, s)
            assert batch["labels"][row, start:end].tolist() == pairs.labels(pair, s)
            assert batch["position_ids"][row, start:end].tolist() == list(range(end - start))
            assert (batch["doc_ids"][row, start:end] == d).all()  # one id per side: no attention across sides
            counted = batch["labels"][row, start:end] != N
            expected_seq[row, start:end][counted] = 2 * (k + d // 2) + s
        used = spans[-1][1]
        assert (batch["doc_ids"][row, used:] == len(spans)).all()  # padding: the next id
        assert (batch["labels"][row, used:] == N).all() and (batch["input_ids"][row, used:] == PAD).all()
        assert batch["position_ids"][row, used:].tolist() == list(range(width - used))
        k += len(spans) // 2
    assert k == len(pair_index)
    assert torch.equal(batch["seq_ids"], expected_seq)
    return pair_index


def random_sides(rng: np.random.Generator, n_pairs: int) -> list[Side]:
    sides = []
    for p in range(n_pairs):
        prompt = [3 + p % 50] + [int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(0, 16)))]
        for _ in range(2):
            sides.append(side(prompt, [int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(1, 24)))]))
    long_prompt = [5] * 40  # both replies start past seq_len // 2: dropped, so usable and stored numbers part
    return sides[:20] + [side(long_prompt, [7, 8]), side(long_prompt, [9, 10, 11])] + sides[20:]


SEQ = 48


@pytest.fixture
def prefs(tmp_path: Path) -> tuple[Path, Pairs]:
    sides = random_sides(np.random.default_rng(7), 60)
    pairs = Pairs(sides, SEQ)
    assert 0 < len(pairs.usable) < pairs.n and any(sum(k) == SEQ for k in pairs.keep)  # some cut, some dropped
    return write_dpo(tmp_path / "prefs", sides), pairs


def one_epoch(ds: DPODataset, pairs: Pairs, batch_rows: int) -> list[int]:
    seen: list[int] = []
    left = ds.samples_per_epoch
    while left:
        seen += check_batch(ds.next_batch(min(batch_rows, left)), pairs)
        left -= min(batch_rows, left)
    return seen


# ---------------------------------------------------------------- layout


HAND = [  # pair 0: prompt 60 61; pair 1: prompt 70 71 72, its rejected side cut from 9 to 7 tokens at seq_len 14
    side([60, 61], [62, 63]),
    side([60, 61], [64]),
    side([70, 71, 72], [73, 74, 75]),
    side([70, 71, 72], [76, 77, 78, 79, 80]),
]


def test_dpo_rows_token_by_token(tmp_path):
    ds = DPODataset(write_dpo(tmp_path / "hand", HAND), 14, tokenizer_sha256=SHA)
    assert (ds.n_truncated, ds.n_label_tokens_truncated, ds.n_dropped_no_labels) == (1, 1, 0)
    assert (ds.n_pairs, ds.stored_pair_count, ds.n_rows) == (2, 2, 2)
    assert ds.packing_efficiency == pytest.approx((14 + 9) / 28)
    batch = ds.next_batch(2)
    r1 = batch["pair_index"].tolist().index(1)  # the row holding pair 1 (a row holds one pair here)
    r0 = 1 - r1
    assert batch["input_ids"][r1].tolist() == [70, 71, 72, 73, 74, 75, EOS, 70, 71, 72, 76, 77, 78, 79]
    assert batch["labels"][r1].tolist() == [N, N, 73, 74, 75, N, N, N, N, 76, 77, 78, 79, N]
    assert batch["position_ids"][r1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    assert batch["doc_ids"][r1].tolist() == [0] * 7 + [1] * 7
    assert batch["seq_ids"][r1].tolist() == [-1, -1, 2 * r1, 2 * r1, 2 * r1] + [-1] * 4 + [2 * r1 + 1] * 4 + [-1]
    assert batch["input_ids"][r0].tolist() == [60, 61, 62, 63, EOS, 60, 61, 64, EOS] + [PAD] * 5
    assert batch["labels"][r0].tolist() == [N, 62, 63, N, N, N, 64] + [N] * 7
    assert batch["position_ids"][r0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert batch["doc_ids"][r0].tolist() == [0] * 5 + [1] * 4 + [2] * 5
    assert batch["seq_ids"][r0].tolist() == [-1, 2 * r0, 2 * r0, -1, -1, -1, 2 * r0 + 1] + [-1] * 7


def test_dpo_packs_several_pairs_per_row(tmp_path):
    ds = DPODataset(write_dpo(tmp_path / "hand", HAND), 64)
    assert (ds.n_rows, ds.n_truncated, ds.n_label_tokens_truncated) == (1, 0, 0)
    batch = ds.next_batch(1)
    assert batch["pair_index"].tolist() == [1, 0]  # longest first
    assert batch["doc_ids"][0].tolist() == [0] * 7 + [1] * 9 + [2] * 5 + [3] * 4 + [4] * (64 - 25)
    assert check_batch(batch, Pairs(HAND, 64)) == [1, 0]


def test_dpo_epoch_covers_every_kept_token_once(prefs):
    prefix, pairs = prefs
    ds = DPODataset(prefix, SEQ, seed=3)
    assert ds.n_pairs == len(pairs.usable) and ds.stored_pair_count == pairs.n
    assert ds.n_dropped_no_labels == pairs.n - len(pairs.usable)
    assert ds.packing_efficiency == pytest.approx(sum(sum(pairs.keep[p]) for p in pairs.usable) / (ds.n_rows * SEQ))
    assert ds.packing_efficiency > 0.9
    for epoch in range(2):
        seen = one_epoch(ds, pairs, batch_rows=4)  # check_batch compares every token and label of each side
        assert sorted(seen) == pairs.usable, epoch
    assert ds.epoch == 2


def test_dpo_seq_ids_sum_each_sides_scores(prefs):
    prefix, pairs = prefs
    batch = DPODataset(prefix, SEQ, seed=1).next_batch(5)
    score = (batch["labels"] * 1000 + batch["position_ids"]).double()  # a fake log-prob that knows where it is
    m = batch["seq_ids"] >= 0
    n_seq = 2 * batch["pair_index"].numel()
    sums = torch.zeros(n_seq, dtype=torch.float64).index_add_(0, batch["seq_ids"][m], score[m]).view(-1, 2)
    counts = torch.zeros(n_seq, dtype=torch.int64).index_add_(0, batch["seq_ids"][m], torch.ones_like(score[m]).long())
    for k, pair in enumerate(batch["pair_index"].tolist()):
        for s in (0, 1):
            labels = pairs.labels(pair, s)
            assert sums[k, s].item() == sum(v * 1000 + j for j, v in enumerate(labels) if v != N)
            assert counts.view(-1, 2)[k, s].item() == sum(v != N for v in labels) > 0


def test_dpo_doc_ids_change_exactly_where_a_side_starts(prefs):
    prefix, pairs = prefs
    batch = DPODataset(prefix, SEQ).next_batch(6)
    doc_ids, positions = batch["doc_ids"].long(), batch["position_ids"]
    step = doc_ids[:, 1:] - doc_ids[:, :-1]
    assert ((step == 0) | (step == 1)).all()
    assert torch.equal(step == 1, positions[:, 1:] == 0)  # a new document exactly where positions restart
    assert (doc_ids[:, 0] == 0).all() and (positions[:, 0] == 0).all()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # the attention mask a packed forward builds
    seq = batch["seq_ids"]
    counted = (seq[:, :, None] >= 0) & (seq[:, None, :] >= 0)
    assert torch.equal(same_doc & counted, (seq[:, :, None] == seq[:, None, :]) & counted)


# ---------------------------------------------------------------- long pairs


def test_pair_keep_lengths_rule():
    lengths = np.array([[4, 12], [12, 4], [8, 8], [9, 8], [3, 3], [20, 30], [1, 40]])
    keep = pair_keep_lengths(lengths, 10)
    assert keep.tolist() == [[4, 6], [6, 4], [5, 5], [5, 5], [3, 3], [5, 5], [1, 9]]
    assert pair_keep_lengths(np.array([[7, 7], [6, 9]]), 11).tolist() == [[5, 6], [5, 6]]
    for (c, r), (kc, kr) in zip(lengths.tolist(), keep.tolist()):
        assert (kc, kr) == expected_keep(c, r, 10)


def test_dpo_cuts_long_pairs_and_drops_label_free_sides(tmp_path, caplog):
    sides = [
        side([10], [11, 12]),  # 4 + 12 at seq_len 10: chosen keeps 4, rejected 6 (targets 25..29 lost)
        side([10], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        side([30, 31, 32], [35, 36, 37]),  # 7 + 8: each keeps 5 (targets 37 | 40, 41 lost)
        side([30, 31, 32], [38, 39, 40, 41]),
        side([40, 41, 42, 43, 44, 45], [46]),  # 8 + 9: each keeps 5, all prompt: dropped (46 | 47, 48 lost)
        side([40, 41, 42, 43, 44, 45], [47, 48]),
    ]
    with caplog.at_level("WARNING", logger="engine.dataset.dpo"):
        ds = DPODataset(write_dpo(tmp_path / "long", sides), 10)
    assert (ds.n_truncated, ds.n_dropped_no_labels, ds.n_pairs, ds.stored_pair_count) == (3, 1, 2, 3)
    assert ds.n_label_tokens_truncated == 5 + 3 + 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "3 of 3 pairs" in warnings[0] and "11 label tokens" in warnings[0]
    assert "1 pairs dropped" in warnings[1]
    pairs = Pairs(sides, 10)
    assert pairs.usable == [0, 1] and pairs.keep[:2] == [(4, 6), (5, 5)]
    seen = check_batch(ds.next_batch(ds.n_rows), pairs)
    assert sorted(seen) == [0, 1]


def test_dpo_counts_prompt_mismatch(tmp_path, caplog):
    sides = [side([10, 11], [12]), side([10], [13, 14])] + HAND
    with caplog.at_level("WARNING", logger="engine.dataset.dpo"):
        ds = DPODataset(write_dpo(tmp_path / "mismatch", sides), 32)
    assert ds.n_prompt_mismatch == 1 and ds.n_pairs == 3
    assert any("1 pairs whose chosen and rejected replies start" in r.getMessage() for r in caplog.records)


def test_dpo_refusals(tmp_path):
    with pytest.raises(DatasetError, match="2 documents per pair"):
        DPODataset(write_dpo(tmp_path / "odd", HAND[:3]), 16)
    with pytest.raises(DatasetError, match="2 documents per pair"):
        DPODataset(write_dpo(tmp_path / "count", HAND, n_pairs=3), 16)
    with pytest.raises(DatasetError, match="not dpo"):
        DPODataset(write_packed(tmp_path / "chat", [d for d, _ in HAND], [m for _, m in HAND], kind="sft"), 16)
    with pytest.raises(DatasetError, match="no pair with reply tokens on both sides"):
        DPODataset(write_dpo(tmp_path / "short", HAND), 4)


# ---------------------------------------------------------------- order, ranks, resume


def test_dpo_shuffles_rows_per_epoch(prefs):
    prefix, pairs = prefs
    ds = DPODataset(prefix, SEQ, seed=5)
    first, second = one_epoch(ds, pairs, ds.n_rows), one_epoch(ds, pairs, ds.n_rows)
    assert first != second and sorted(first) == sorted(second)
    again = DPODataset(prefix, SEQ, seed=5)
    assert one_epoch(again, pairs, 3) == first  # the order depends on (seed, epoch), not on batch size


def test_dpo_ranks_see_disjoint_rows(prefs):
    prefix, pairs = prefs
    shards = [DPODataset(prefix, SEQ, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = [one_epoch(ds, pairs, 4) for ds in shards]
    assert shards[0].samples_per_epoch == shards[1].samples_per_epoch == shards[0].n_rows // 2
    assert not set(seen[0]) & set(seen[1])
    left_out = len(pairs.usable) - len(seen[0]) - len(seen[1])  # the pairs of the odd row out, if any
    assert left_out == 0 if shards[0].n_rows % 2 == 0 else left_out > 0
    assert Counter(seen[0] + seen[1]).most_common(1)[0][1] == 1


def test_dpo_resume_mid_epoch(prefs):
    prefix, _ = prefs
    ds = DPODataset(prefix, SEQ, seed=4)
    take(ds, 3, 4)
    state = ds.state_dict()
    expected = take(ds, ds.n_rows // 4 + 2, 4)  # runs into the next epoch
    assert ds.epoch == 1
    fresh = DPODataset(prefix, SEQ, seed=4)
    fresh.load_state_dict(state)
    assert_same_batches(take(fresh, len(expected), 4), expected)
    with pytest.raises(ValueError, match="seq_len"):
        DPODataset(prefix, SEQ + 8, seed=4).load_state_dict(state)


# ---------------------------------------------------------------- one pass in stored order


@pytest.mark.parametrize("batch_rows", [1, 3, 1000])
def test_dpo_pairs_in_order_covers_each_pair_once(prefs, batch_rows):
    prefix, pairs = prefs
    ds = DPODataset(prefix, SEQ, seed=9, rank=1, world_size=2)  # shuffling and ranks play no part
    ds.next_batch(2)
    before = ds.state_dict()
    batches = list(ds.pairs_in_order(batch_rows))
    assert all(b["input_ids"].shape[0] == batch_rows for b in batches[:-1])
    assert 1 <= batches[-1]["input_ids"].shape[0] <= batch_rows
    assert [i for b in batches for i in check_batch(b, pairs)] == pairs.usable
    assert ds.state_dict() == before  # training order untouched
    with pytest.raises(ValueError, match="batch_rows"):
        next(ds.pairs_in_order(0))


def test_dpo_pairs_in_order_fills_rows_by_next_fit(tmp_path):
    ds = DPODataset(write_dpo(tmp_path / "hand", HAND * 3), 25)  # pairs of 9, 16, 9, 16, 9, 16 tokens
    batches = list(ds.pairs_in_order(2))  # next fit: 9+16 | 9+16 | 9+16
    assert [b["pair_index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert [b["input_ids"].shape for b in batches] == [(2, 25), (1, 25)]
    assert batches[0]["doc_ids"][1].tolist() == [0] * 5 + [1] * 4 + [2] * 7 + [3] * 9
    assert batches[0]["seq_ids"][1].max().item() == 7  # slot 3, rejected
    pairs = Pairs(HAND * 3, 25)
    assert [i for b in batches for i in check_batch(b, pairs)] == list(range(6))
    sixteen_first = DPODataset(write_dpo(tmp_path / "swap", HAND[2:] + HAND[:2] + HAND[2:]), 25)
    assert [b["input_ids"].shape[0] for b in sixteen_first.pairs_in_order(8)] == [2]  # 16+9 | 16


# ---------------------------------------------------------------- real pairs


def test_dpo_real_pairs_pack_tightly(tmp_path, shared_data, small_tokenizer):
    from engine.prepare import main as prepare_main

    src = shared_data / "medicalgpt" / "dpo_zh_500.jsonl"
    out = tmp_path / "dpo"
    argv = ["--source", str(src), "--tokenizer", str(small_tokenizer.path), "--out", str(out)]
    assert prepare_main([*argv, "--kind", "dpo", "--workers", "1", "--no-progress"]) == 0
    seq_len = 512
    ds = DPODataset(out, seq_len)
    assert ds.stored_pair_count == 500  # a 3,000-id tokenizer makes long pairs: many are cut, some dropped
    assert ds.n_pairs == ds.stored_pair_count - ds.n_dropped_no_labels > 300
    tokens = int(ds._keep.sum())
    padded_to_seq_len = tokens / (2 * ds.n_pairs * seq_len)  # the old layout at a fixed shape
    longest = np.array([ds._keep[i : i + 8].max() for i in range(0, ds.n_pairs, 8)])
    sizes = np.diff(np.r_[np.arange(0, ds.n_pairs, 8), ds.n_pairs])
    padded_to_longest = tokens / int((2 * sizes * longest).sum())  # the old layout, batches of 8 pairs
    assert ds.packing_efficiency > 0.9
    assert ds.packing_efficiency > padded_to_longest > padded_to_seq_len
    in_order = [b["input_ids"].shape[0] for b in ds.pairs_in_order(64)]
    assert ds.n_rows <= sum(in_order) < 1.1 * ds.n_rows and in_order[0] == 64
