"""GRPO: group advantages and loss weights by hand, the clipped loss and its gradient against the policy-gradient
formula, k3 KL, rollouts packed with labels on the completions only; on CPU a tiny SFT model's mean reward on a
checkable toy task rises clearly (fixed seed); a run killed mid-way (μ = 2, β > 0: a rollout and the reference
in play) resumes bit for bit; LoRA's adapters-off reference starts at KL 0; bad settings are one-line errors."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from faults import assert_one_line_error
from training_runs import assert_resumed_identically, start_run, wait_until_stalled

from llama import grpo, sft
from llama.model import Llama, LlamaConfig
from llama.training.checkpoint import find_checkpoint, read_config
from llama.training.grpo import GRPO, GRPOSettings, group_advantages, loss_weights, policy_loss
from llama.training.metrics import read_metrics
from llama.training.rollouts import Prompt, _pack
from tests.test_chat import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU

CPU = ["--profile", "cpu", "--kernels", "torch", "--no-progress"]


# ---------------------------------------------------------------- the math


def test_group_advantages_are_each_groups_standardised_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as TRL
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group of equal rewards teaches nothing
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_loss_weights_token_level_and_per_sequence():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    token = loss_weights(mask, "token", accum=2)
    assert torch.equal(token, torch.tensor([[0.5, 0.5, 0.5, 0], [0.5, 0, 0, 0]]))  # 2 / 4 tokens each
    sequence = loss_weights(mask, "sequence", accum=2)
    torch.testing.assert_close(sequence, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0], [1.0, 0, 0, 0]]))
    assert float(token.sum()) == 2 and float(sequence.sum()) == pytest.approx(2)


def test_the_clip_bounds_the_ratio_in_the_advantages_direction():
    settings = GRPOSettings(epsilon=0.2, epsilon_high=0.3)
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[0.5, 1.5, 0.9, 1.2]]))  # ratios 0.5, 1.5, 0.9, 1.2
    for adv, active in ((1.0, [False, True, False, False]), (-1.0, [True, False, False, False])):
        loss, clip, k3 = policy_loss(logps, old, torch.tensor([adv]), settings)
        assert clip.tolist() == [active] and k3 is None
        bounded = torch.tensor([0.5, 1.3, 0.9, 1.2]) if adv > 0 else torch.tensor([0.8, 1.5, 0.9, 1.2])
        torch.testing.assert_close(loss[0], -adv * bounded)


def test_k3_is_zero_at_the_reference_and_positive_away_from_it():
    settings = GRPOSettings(beta=0.5)
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    _, _, k3 = policy_loss(logps, logps, torch.zeros(1), settings, ref_logps=logps)
    assert torch.equal(k3, torch.zeros(1, 3))
    loss, _, k3 = policy_loss(logps, logps, torch.zeros(1), settings, ref_logps=logps - 0.7)
    delta = torch.tensor(-0.7)
    torch.testing.assert_close(k3, (delta.exp() - delta - 1).expand(1, 3))
    torch.testing.assert_close(loss, 0.5 * k3)


def _tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, max_seq_len=32))


def _rollout_batch() -> dict[str, torch.Tensor]:
    prompts = [Prompt(1, "a", [3, 4, 5], {}), Prompt(2, "b", [6, 7], {})]
    rollout = _pack(prompts, [[8, 9], [10], [11, 12, 13], []], pad_id=0)
    mask = rollout["labels"] != -100
    rollout["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout["weights"] = loss_weights(mask, "token", accum=1)
    rollout["rewards"] = rollout["reward_total"] = torch.zeros(4)
    rollout["rewards"] = rollout["rewards"][:, None]
    rollout["reward_fn_std"], rollout["stats"] = torch.zeros(4, 1), torch.zeros(4, 5)
    return rollout


def test_a_rollout_trains_on_its_completion_tokens_only():
    batch = _rollout_batch()
    assert batch["input_ids"].tolist() == [[3, 4, 5, 8, 9], [3, 4, 5, 10, 0], [6, 7, 11, 12, 13], [6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, 8, 9, -100],
        [-100, -100, 10, -100, -100],
        [-100, 11, 12, 13, -100],
        [-100] * 5,  # an empty completion (it stopped at once) trains nothing
    ]
    assert batch["lengths"].tolist() == [5, 4, 5, 2] and batch["completion_len"].tolist() == [2, 1, 3, 0]


def test_one_update_per_rollout_is_the_policy_gradient():
    """ratio = 1 (detached): the gradient is −Σ_i A_i Σ_t ∇log π(t) / (completion tokens), token-level."""
    batch, model = _rollout_batch(), _tiny()
    loss, metrics = GRPO(GRPOSettings(group_size=2), ["r"]).loss(model, batch)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch["input_ids"]).logits.float()
    labels = batch["labels"]
    logp = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    mask = (labels != -100).float()
    (-(logp * mask * batch["advantages"][:, None]).sum() / mask.sum()).backward()
    for g, expected in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert float(metrics["clip_ratio"]) == 0.0 and "kl" not in metrics


# ---------------------------------------------------------------- the command line on a toy task

QUESTIONS = ["这个怎么样", "东西好不好", "价格贵吗", "质量如何"]


@pytest.fixture(scope="module")
def toy(small_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A tiny model SFT-trained to answer each question with a random digit (so a digit is right 1 time in 10),
    and prompts whose checkable answer is "3"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # function fixtures (one_torch_thread) do not cover a module fixture's setup
    try:
        root = tmp_path_factory.mktemp("grpo")
        rng = random.Random(0)
        records = [{"question": QUESTIONS[i % 4], "answer": str(rng.randrange(10))} for i in range(400)]
        data = root / "digits.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        prompts = root / "prompts.jsonl"
        prompts.write_text(
            "".join(json.dumps({"prompt": q, "answer": "3"}, ensure_ascii=False) + "\n" for q in QUESTIONS),
            encoding="utf-8",
        )
        base = save_tiny_checkpoint(root / "base", small_tokenizer, max_seq_len=64)
        args = ["--data", str(data), "--init", str(base), "--out-dir", str(root / "sft"), "--steps", "60"]
        args += ["--lr", "3e-3", "--batch-size", "8", "--seq-len", "64", "--val-fraction", "0.05"]
        assert sft.main([*args, "--eval-every", "0", "--pack-workers", "1", *CPU]) == 0
        return {"sft": find_checkpoint(root / "sft"), "prompts": prompts}
    finally:
        torch.set_num_threads(threads)


def grpo_args(toy: dict[str, Path], out: Path, steps: int, *extra: str) -> list[str]:
    args = ["--init", str(toy["sft"]), "--prompts", str(toy["prompts"]), "--reward", "exact_match"]
    args += ["--out-dir", str(out), "--steps", str(steps), "--lr", "1e-3", "--warmup-steps", "0"]
    args += ["--batch-size", "8", "--grad-accum", "2", "--group-size", "8", "--max-new-tokens", "6"]
    return [*args, "--seq-len", "64", "--log-every", "1", *CPU, *extra]


def test_grpo_raises_the_mean_reward_of_a_tiny_sft_model(toy, tmp_path):
    out = tmp_path / "grpo"
    assert grpo.main(grpo_args(toy, out, 150)) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 151))
    first = sum(r["reward"] for r in records[:20]) / 20
    last = sum(r["reward"] for r in records[-30:]) / 30
    print(f"mean reward: first 20 steps {first:.3f}, last 30 steps {last:.3f}")
    assert first < 0.35 and last > first + 0.3, (first, last)
    for key in ("reward/exact_match", "reward_std", "zero_std_groups", "completion_len", "clip_ratio", "truncated"):
        assert key in records[-1], key
    assert records[-1]["gen_tokens_per_s"] > 0 and records[-1]["update_tokens_per_s"] > 0
    assert 0 < records[-1]["data_share"] < 1
    task = read_config(find_checkpoint(out))["task"]
    assert task["name"] == "grpo" and task["rewards"] == ["exact_match"] and task["group_size"] == 8


def test_val_prompts_are_answered_greedily_before_and_during_training(toy, tmp_path, caplog):
    out = tmp_path / "val"
    with caplog.at_level("INFO"):
        assert grpo.main(grpo_args(toy, out, 4, "--val-prompts", str(toy["prompts"]), "--eval-every", "2")) == 0
    assert "validation before training: completion_len" in caplog.text  # the starting weights' greedy reward
    records = [r for r in read_metrics(out / "metrics.jsonl") if "val_reward" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["val_reward"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 prompts, one greedy reply each, reward 0 or 1
        assert r["val_reward/exact_match"] == r["val_reward"] and r["val_completion_len"] >= 0
        assert "val_ppl" not in r


def test_a_grpo_run_killed_mid_run_resumes_bitwise_identically(toy, tmp_path):
    script = tmp_path / "run_grpo.py"
    script.write_text("from llama.grpo import main\nraise SystemExit(main())\n", encoding="utf-8")
    steps, extra = 5, ("--save-every", "1", "--iterations", "2", "--beta", "0.1")  # stalls mid-rollout (μ = 2)
    reference = start_run(
        grpo_args(toy, tmp_path / "reference", steps, *extra), tmp_path / "ref.log", script=str(script)
    )
    victim_args = grpo_args(toy, tmp_path / "victim", steps, *extra)
    victim = start_run(victim_args, tmp_path / "victim.log", stall_at=3, script=str(script))
    assert wait_until_stalled(tmp_path / "victim.log", victim) == 3
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    resumed = start_run(victim_args, tmp_path / "resumed.log", script=str(script))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert "RESUMING from" in (tmp_path / "resumed.log").read_text()
    keys = ("loss", "grad_norm", "reward", "kl", "clip_ratio", "completion_len")
    assert_resumed_identically(tmp_path / "reference", tmp_path / "victim", steps, keys)
    records = read_metrics(tmp_path / "reference" / "metrics.jsonl")
    assert records[0]["kl"] == 0.0 and records[1]["gen_s"] == 0.0  # the 2nd update reuses the 1st rollout


def test_a_resume_with_another_group_size_is_refused_and_another_epsilon_recorded(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo.main(grpo_args(toy, out, 1)) == 0
    code = grpo.main(grpo_args(toy, out, 2, "--group-size", "4"))
    assert_one_line_error(code, capsys.readouterr().err, "--group-size 8 -> 4", "would not continue it exactly")
    assert grpo.main(grpo_args(toy, out, 2, "--epsilon", "0.1")) == 0
    changes = read_config(find_checkpoint(out))["config_changes"]
    assert changes[0]["changed"] == {"--epsilon": [0.2, 0.1], "--epsilon-high": [0.2, 0.1]}


def test_under_lora_the_reference_is_the_model_with_its_adapters_off(toy, tmp_path):
    out = tmp_path / "lora"
    assert grpo.main(grpo_args(toy, out, 2, "--lora", "r=4,alpha=8", "--beta", "0.1", "--lr", "1e-2")) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0  # LoRA starts as the base; one update moves it
    assert read_config(find_checkpoint(out))["task"]["reference"] == {"adapters_off": True}


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--group-size", "1"), "--group-size"),
        (("--grad-accum", "3", "--group-size", "16"), "not whole groups of --group-size 16"),
        (("--reward", "nonsense"), "unknown reward"),
        (("--max-new-tokens", "64"), "leaves no room for a prompt"),
        (("--max-new-tokens", "60"), "no prompt fits"),
        (("--epsilon", "1.5"), "--epsilon"),
    ],
)
def test_bad_settings_are_one_line_errors(toy, tmp_path, capsys, extra, expected):
    code = grpo.main(grpo_args(toy, tmp_path / "bad", 1, *extra))
    assert_one_line_error(code, capsys.readouterr().err, expected)


def test_a_missing_prompts_file_is_a_one_line_error(toy, tmp_path, capsys):
    args = grpo_args(toy, tmp_path / "bad", 1)
    args[args.index("--prompts") + 1] = str(tmp_path / "nope.jsonl")
    assert_one_line_error(grpo.main(args), capsys.readouterr().err, "no such file")
