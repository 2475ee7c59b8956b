"""The loop's seam: an objective written outside the package trains, validates, keeps state and resumes exactly.

The toy objective lives in a file this test writes (so nothing of it is in ``llama/``): every position's
target is one fixed token, its loss is a ``head`` over the model's hidden states and ``lm_head`` weight
(chunked, as ``zhkernels.fused_linear_cross_entropy`` computes it, never ``[tokens, vocab]`` logits), it
reports a metric of its own in training and in validation, and it counts its calls as state the checkpoint
must carry. A run killed by SIGKILL mid-way and restarted gives the uninterrupted run's losses, bit for bit.
"""

from __future__ import annotations

import importlib.util
import math
import random
import signal
from pathlib import Path

import pytest
import torch
from training_runs import VOCAB, start_run, torchrun_two_ranks, wait_until_stalled, write_corpus

from llama.model import Llama, LlamaConfig
from llama.training import objectives
from llama.training.config import TrainConfig
from llama.training.loop import train
from llama.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = '''
import sys

import torch
import zhkernels
from llama.model import LlamaConfig
from llama.training import TrainConfig, train


class FixedTarget:
    """Every position should predict token ``target``."""

    name = "fixed-target"

    def __init__(self, target):
        self.target, self.calls = target, 0

    def loss(self, model, batch):
        self.calls += 1
        targets = torch.full(batch["input_ids"].shape, self.target, device=batch["input_ids"].device)
        # chunked over hidden @ W.T inside the model's forward (DDP, FSDP and torch.compile see it)
        loss = model(batch["input_ids"], head=lambda hidden, weight: zhkernels.fused_linear_cross_entropy(
            hidden, weight, targets)).head
        return loss, {"calls": torch.tensor(float(self.calls))}

    def tokens(self, batch):
        return batch["input_ids"].numel()

    def validate(self, model, batches):
        hits = [(model(b["input_ids"]).logits.argmax(-1) == self.target).float().mean() for b in batches]
        return {"hit_rate": torch.stack(hits).mean()}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def config(out_dir, steps):
    return TrainConfig(steps=steps, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4, log_every=1,
                       save_every=2, keep_last=2, out_dir=out_dir, progress=False, dropout=0.1)


if __name__ == "__main__":
    corpus, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = LlamaConfig.from_preset("tiny", vocab_size=128, dim=64)
    train(model, config(out_dir, steps), corpus, objective=FixedTarget(7))
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy objective's file (outside the package) and the module loaded from it."""
    path = tmp_path_factory.mktemp("toy") / "toy_objective.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_objective", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_corpus(folder / "corpus.val", 40, seed=2)
    return write_corpus(folder / "corpus", 300, seed=1)


def tiny() -> LlamaConfig:
    return LlamaConfig.from_preset("tiny", vocab_size=VOCAB, dim=64)


def test_hidden_states_and_lm_head_give_the_models_loss():
    torch.manual_seed(0)
    model = Llama(tiny())
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = torch.randint(0, VOCAB, (2, 16))
    hidden = model.hidden_states(ids)
    assert hidden.shape == (2, 16, 64)
    logits = hidden @ model.lm_head.weight.T
    torch.testing.assert_close(model(ids).logits, logits)
    out = model(ids, head=lambda h, w: (h, w))  # a head gets the same hidden states and the output weight
    torch.testing.assert_close(out.head[0], hidden)
    assert out.head[1] is model.lm_head.weight and out.loss is None and out.logits is None
    torch.testing.assert_close(
        model(ids, labels=labels).loss, torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    )


def test_a_toy_objective_trains_validates_and_is_recorded(toy, corpus, tmp_path):
    _, module = toy
    objective = module.FixedTarget(7)
    result = train(tiny(), module.config(str(tmp_path), 8), corpus, objective=objective)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["calls"] == 1.0 and records[-1]["calls"] == 8.0  # its own training metric, per step
    assert records[-1]["loss"] < records[0]["loss"] / 2  # it learns the fixed target
    assert [r["val_hit_rate"] for r in records if "val_hit_rate" in r][-1] > 0.9
    assert all("val_loss" not in r for r in records)  # it reports what it validates, no perplexity
    assert result.val_loss is None and objective.calls == 8
    saved = torch.load(tmp_path / "step_000008" / "trainer.pt", weights_only=False)
    assert saved["objective"] == {"calls": 8}
    config = (tmp_path / "step_000008" / "config.json").read_text()
    assert '"objective": "fixed-target"' in config


def test_a_transform_runs_before_the_optimizer_is_built(corpus, tmp_path):
    """A model transform (here: freeze the input embeddings) changes the model the optimizer then trains."""
    at_transform = {}

    def freeze_embeddings(model):
        model.model.embed_tokens.weight.requires_grad_(False)
        at_transform.update(
            embed=model.model.embed_tokens.weight.detach().clone(),
            head=model.lm_head.weight.detach().clone(),
            model=model,
        )
        return model

    config = LlamaConfig.from_preset("tiny", vocab_size=VOCAB, dim=64, tie_embeddings=False)
    result = train(
        config,
        TrainConfig(
            steps=3, batch_size=4, seq_len=32, out_dir=str(tmp_path), progress=False, kernels="torch", eval_every=0
        ),
        corpus,
        transforms=[freeze_embeddings],
    )
    assert at_transform["model"] is result.model
    assert torch.equal(result.model.model.embed_tokens.weight.detach(), at_transform["embed"])  # frozen: untouched
    assert not torch.equal(result.model.lm_head.weight.detach(), at_transform["head"])  # the rest trained


def test_sigkill_then_resume_gives_the_toy_objectives_losses_bit_for_bit(toy, corpus, tmp_path):
    script, _ = toy
    steps, kill_after = 12, random.Random(7).randint(3, 9)
    args = lambda name: [str(corpus), str(tmp_path / name), str(steps)]  # noqa: E731
    reference = start_run(args("reference"), tmp_path / "reference.log", script=str(script))
    victim = start_run(args("victim"), tmp_path / "victim.log", stall_at=kill_after, script=str(script))
    assert wait_until_stalled(tmp_path / "victim.log", victim) == kill_after
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    resumed = start_run(args("victim"), tmp_path / "resumed.log", script=str(script))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    assert "RESUMING from" in (tmp_path / "resumed.log").read_text()
    expected = {r["step"]: r for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    after = read_metrics(tmp_path / "victim" / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(1, steps + 1))
    for record in after:
        for key in ("loss", "grad_norm", "calls") + (("val_hit_rate",) if "val_hit_rate" in record else ()):
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    assert math.isfinite(after[-1]["loss"])


def test_pretrain_and_sft_objectives_are_the_models_loss_and_sft_reports_its_supervised_share():
    torch.manual_seed(1)
    model = Llama(tiny())
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt
    batch = {"input_ids": ids, "labels": labels}
    expected = model(ids, labels=labels).loss
    loss, metrics = objectives.Pretrain().loss(model, batch)
    assert torch.equal(loss, expected) and metrics == {}
    loss, metrics = objectives.SFT().loss(model, batch)
    assert torch.equal(loss, expected) and metrics["supervised"].item() == pytest.approx(6 / 16)
    assert objectives.SFT().tokens(batch) == 32
    assert torch.equal(objectives.SFT().validate(model, [batch, batch])["loss"], expected.float())


def test_the_loop_counts_the_tokens_the_objective_says_a_batch_has(corpus, tmp_path):
    class HalfTokens(objectives.Pretrain):
        def tokens(self, batch):
            return batch["input_ids"].numel() // 2

    result = train(
        tiny(),
        TrainConfig(
            steps=3,
            batch_size=4,
            seq_len=32,
            out_dir=str(tmp_path),
            progress=False,
            kernels="torch",
            eval_every=0,
            log_every=1,
        ),
        corpus,
        objective=HalfTokens(),
    )
    assert result.tokens == 3 * 4 * 32 // 2
    assert [r["tokens"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [64, 128, 192]


HEAD_WORKER = """
import importlib.util, os, sys, torch
torch.set_num_threads(1)
from llama.model import LlamaConfig
from llama.training import TrainConfig, train
out_dir, corpus, toy_file, parallel = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("toy_objective", toy_file)
toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy)
model = LlamaConfig.from_preset("tiny", vocab_size=128, dim=64, tie_embeddings=True)
cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=2,
                  eval_batches=2, save_every=4, log_every=1, out_dir=out_dir, progress=False, parallel=parallel)
result = train(model, cfg, corpus, objective=toy.FixedTarget(7))
state = result.model.state_dict() if parallel == "ddp" else {}
torch.save({"state": state}, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_head_objective_trains_data_parallel(toy, corpus, tmp_path, parallel):
    """The head runs inside the model's forward, so DDP syncs its gradients and FSDP gathers the output weight."""
    script, _ = toy
    worker, out_dir = tmp_path / "worker.py", tmp_path / "out"
    worker.write_text(HEAD_WORKER)
    torchrun_two_ranks(worker, out_dir, corpus, script, parallel, timeout=300)
    records = read_metrics(out_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records if "val_hit_rate" in r] == [2, 4]
    if parallel == "ddp":  # gradients were all-reduced: the replicas are identical
        state0, state1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=True)["state"] for r in (0, 1))
        assert all(torch.equal(state0[k], state1[k]) for k in state0)
