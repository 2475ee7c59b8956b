"""DPO (llama.training.dpo): TRL's losses against a plain reference written from the formulas, ln 2 at the start,
sequence log-probs of packed pairs equal to each sequence scored alone, and the settings' one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch

from llama.model import Llama, LlamaConfig
from llama.training.dpo import DPO, DPOSettings, preference_losses, sequence_logps
from llama.training.reference import CachedReference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logsig(v: float) -> float:
    return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))


def formula_loss(pc, pr, rc, rr, nc, nr, loss_type: str, beta: float, eps: float) -> float:
    """One pair's loss, scalar by scalar, from the papers' (and TRL's) definitions."""
    if loss_type == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -logsig(beta * ((pc - rc) / nc - (pr - rr) / nr))
    x = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x)
    return (-(1 - eps) * logsig(beta * x) + eps * logsig(-beta * x)) / (1 - 2 * eps)  # robust


@pytest.mark.parametrize(
    ("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("ipo", 0.0), ("sigmoid_norm", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_match_the_formulas(loss_type, eps, beta):
    generator = torch.Generator().manual_seed(0)
    policy = -torch.rand(6, 2, generator=generator, dtype=torch.float64) * 40
    reference = policy + torch.randn(6, 2, generator=generator, dtype=torch.float64) * 3
    counts = torch.randint(1, 30, (6, 2), generator=generator).double()
    settings = DPOSettings(beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses, rewards = preference_losses(policy, reference, counts, settings)
    for i in range(6):
        args = (*policy[i].tolist(), *reference[i].tolist(), *counts[i].tolist())
        assert losses[i].item() == pytest.approx(formula_loss(*args, loss_type, beta, eps), rel=1e-9, abs=1e-12)
    expected_rewards = beta * ((policy - reference) / (counts if loss_type == "ipo" else 1))
    torch.testing.assert_close(rewards, expected_rewards)


def test_a_policy_equal_to_its_reference_starts_at_ln2_with_accuracy_one_half():
    policy = -torch.rand(5, 2) * 20
    losses, rewards = preference_losses(policy, policy.clone(), torch.full((5, 2), 7.0), DPOSettings())
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert torch.all(rewards == 0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"loss_type": "hinge"}, "--loss-type must be one of sigmoid, robust, ipo, sigmoid_norm"),
        ({"beta": 0.0}, "--beta must be a finite number > 0"),
        ({"beta": float("nan")}, "--beta must be a finite number > 0"),
        ({"label_smoothing": 0.5}, "--label-smoothing must be in [0, 0.5)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to the sigmoid and robust losses"),
        ({"sft_weight": -1.0}, "--sft-weight must be a finite number >= 0"),
    ],
)
def test_settings_out_of_range_are_one_line(kwargs, needle):
    with pytest.raises(ValueError) as e:
        DPOSettings(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- sequence log-probs of packed pairs


def tiny_model() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    return Llama(config).eval()


def packed_batch(pairs: list[tuple[list[int], list[int], int]], seq_len: int) -> dict[str, torch.Tensor]:
    """One row per two pairs, in the dataset's layout: chosen then rejected documents, labels on the reply
    (documents' tokens after ``prompt`` positions), ``seq_ids = 2 * slot + side``."""
    rows = [pairs[i : i + 2] for i in range(0, len(pairs), 2)]
    keys = ("input_ids", "labels", "position_ids", "doc_ids", "seq_ids")
    out = {k: torch.full((len(rows), seq_len), -100 if k in ("labels",) else -1, dtype=torch.int64) for k in keys}
    out["input_ids"].fill_(0)
    slot = 0
    for r, row in enumerate(rows):
        column, doc = 0, 0
        for chosen, rejected, prompt in row:
            for side, tokens in enumerate((chosen, rejected)):
                n = len(tokens)
                span = slice(column, column + n)
                out["input_ids"][r, span] = torch.tensor(tokens)
                out["position_ids"][r, span] = torch.arange(n)
                out["doc_ids"][r, span] = doc
                labels = torch.full((n,), -100)
                labels[prompt - 1 : n - 1] = torch.tensor(tokens[prompt:])  # next token, on the reply
                out["labels"][r, span] = labels
                out["seq_ids"][r, span] = torch.where(labels != -100, 2 * slot + side, -1)
                column, doc = column + n, doc + 1
            slot += 1
        out["position_ids"][r, column:] = torch.arange(seq_len - column)
        out["doc_ids"][r, column:] = doc
    out["doc_ids"] = out["doc_ids"].int()
    out["pair_index"] = torch.arange(len(pairs))
    return out


def alone(model: Llama, tokens: list[int], prompt: int) -> float:
    """A sequence's reply log-prob, scored on its own with plain log_softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[t - 1, tokens[t]].item() for t in range(prompt, len(tokens)))


def test_packed_pairs_score_as_each_sequence_alone():
    model = tiny_model()
    generator = torch.Generator().manual_seed(3)

    def seq(n: int) -> list[int]:
        return torch.randint(3, 50, (n,), generator=generator).tolist()

    pairs = []
    for length_c, length_r, prompt in ((9, 12, 4), (7, 5, 3), (15, 6, 6)):
        head = seq(prompt)
        pairs.append((head + seq(length_c - prompt), head + seq(length_r - prompt), prompt))
    batch = packed_batch(pairs, seq_len=40)
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch)
    for k, (chosen, rejected, prompt) in enumerate(pairs):
        assert logps[k, 0].item() == pytest.approx(alone(model, chosen, prompt), abs=1e-4)
        assert logps[k, 1].item() == pytest.approx(alone(model, rejected, prompt), abs=1e-4)
        assert counts[k].tolist() == [len(chosen) - prompt, len(rejected) - prompt]


def test_the_objective_starts_at_ln2_against_its_own_precomputed_reference_and_learns():
    model = tiny_model()
    generator = torch.Generator().manual_seed(5)
    pairs = []
    for _ in range(4):
        head = torch.randint(3, 50, (3,), generator=generator).tolist()
        pairs.append((head + [7, 8, 9], head + [40, 41], 3))
    batch = packed_batch(pairs, seq_len=24)
    with torch.no_grad():
        table = sequence_logps(model, batch)[0].double().numpy()
    objective = DPO(DPOSettings(beta=0.5), CachedReference(table))
    loss, metrics = objective.loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["accuracy"].item() == 0.5  # the same forward: every pair ties, and ties count half
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss, metrics = objective.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 and metrics["accuracy"].item() == 1.0 and metrics["margin"].item() > 0


def test_a_frozen_reference_runs_in_the_autocast_precision_on_the_batch_device():
    """--ref online's copy (and a distillation teacher) is cast once to the run's half precision: half the memory."""
    from llama.training.reference import OnlineReference

    model, copy = tiny_model(), tiny_model()
    pairs = [([3, 4, 5, 6, 7], [3, 4, 9, 9], 2)]
    batch = packed_batch(pairs, seq_len=12)
    reference = OnlineReference(copy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = reference(model, batch, validation=False)
        with torch.no_grad():
            expected = sequence_logps(model.to(torch.bfloat16), batch)[0]
    assert next(copy.parameters()).dtype == torch.bfloat16 and not any(p.requires_grad for p in copy.parameters())
    torch.testing.assert_close(logps, expected)
