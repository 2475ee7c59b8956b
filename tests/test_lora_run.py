"""LoRA on the one loop (``--lora`` with ``--init BASE``): checkpoints hold only the adapters and name their base
by sha256, resume is exact after SIGKILL, another base or another ``--lora`` is refused in one line, and
inference, export (merged, or PEFT's adapter layout read by ``peft`` itself) take a LoRA run directly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import assert_one_line_error
from safetensors.torch import load_file, save_file
from training_runs import REPO, assert_resumed_identically, start_run, wait_until_stalled, write_corpus

from llama import sft
from llama.formats.hf import export_hf
from llama.formats.hf_io import ExportError
from llama.generation.load import load_for_inference
from llama.lora import apply_lora, lora_layers, strip_lora
from llama.model import Llama, LlamaConfig
from llama.training.adapters import config_of, load_weights, weights_sha256
from llama.training.checkpoint import MODEL_FILE, CheckpointError, find_checkpoint, read_config
from llama.training.cli import run_from_args
from llama.training.metrics import read_metrics
from tests.test_chat import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU

TRAIN = ["--model", "dim=64", "--model", "kernels=torch", "--no-progress", "--batch-size", "2", "--seq-len", "32"]
TRAIN += ["--eval-every", "0", "--log-every", "1", "--warmup-steps", "1", "--lr", "1e-2"]
LORA = ["--lora", "r=4,alpha=8,dropout=0.1"]  # dropout: the resumed run must restore the RNG too


# ---------------------------------------------------------------- the loop: a synthetic corpus, llama.train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("lora-run") / "corpus", 120, seed=3)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> Path:
    """A base model trained 3 steps on the corpus (its newest checkpoint)."""
    out = tmp_path_factory.mktemp("lora-base") / "base"
    assert run_from_args(train_args(corpus, out, 3)) == 0
    return find_checkpoint(out)


def train_args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--train", str(corpus), "--out-dir", str(out), "--steps", str(steps), *TRAIN, *extra]


def lora_run(corpus: Path, base: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return train_args(corpus, out, steps, "--init", str(base), *LORA, *extra)


def test_a_lora_checkpoint_holds_only_the_adapters_and_names_its_base(corpus, base, tmp_path, capsys):
    base_bytes = (base / MODEL_FILE).read_bytes()
    assert run_from_args(lora_run(corpus, base, tmp_path / "lora", 4)) == 0, capsys.readouterr().err
    checkpoint = find_checkpoint(tmp_path / "lora")
    weights = load_file(str(checkpoint / MODEL_FILE))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(t.abs().sum() > 0 for k, t in weights.items() if ".lora_B." in k), "B moved off zero: adapters trained"
    record = read_config(checkpoint)["lora"]
    assert record["base"] == {"path": str(base.resolve()), "sha256": weights_sha256(base)}
    assert config_of(record).r == 4 and len(weights) == 2 * 7 * 2  # 2 layers x 7 targets x (A, B)
    assert (base / MODEL_FILE).read_bytes() == base_bytes, "the base is never written"


def test_step_zero_of_a_lora_run_is_the_base(corpus, base, tmp_path, capsys):
    """The first logged loss of a LoRA run equals the base's loss on the same batch: B starts at zero."""
    for name, extra in (("lora", LORA), ("plain", [])):
        args = train_args(corpus, tmp_path / name, 1, "--init", str(base), *extra)
        assert run_from_args(args) == 0, capsys.readouterr().err
    first = {name: read_metrics(tmp_path / name / "metrics.jsonl")[0]["loss"] for name in ("lora", "plain")}
    assert first["lora"] == pytest.approx(first["plain"], rel=1e-6)


def test_a_lora_run_killed_at_a_random_step_resumes_bitwise_identically(corpus, base, tmp_path):
    steps, kill_after = 8, 5
    extra = ("--save-every", "2", "--keep-last", "2")
    reference = start_run(lora_run(corpus, base, tmp_path / "reference", steps, *extra), tmp_path / "reference.log")
    victim_args = lora_run(corpus, base, tmp_path / "victim", steps, *extra)
    victim = start_run(victim_args, tmp_path / "victim.log", stall_at=kill_after)
    assert wait_until_stalled(tmp_path / "victim.log", victim) == kill_after
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    resumed = start_run(victim_args, tmp_path / "resumed.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    assert "RESUMING from" in (tmp_path / "resumed.log").read_text()
    assert_resumed_identically(
        tmp_path / "reference", tmp_path / "victim", steps, ("loss", "grad_norm", "lr", "tokens")
    )


@pytest.fixture(scope="module")
def lora_out(corpus, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-done") / "lora"
    assert run_from_args(lora_run(corpus, base, out, 2)) == 0
    return out


def test_a_lora_run_can_adapt_another_lora_run_merged_and_resume(corpus, base, lora_out, tmp_path):
    """SFT -> LoRA SFT -> LoRA DPO chains: --init may be a LoRA run (its adapters merged into its base)."""
    out = tmp_path / "second"
    assert run_from_args(train_args(corpus, out, 2, "--init", str(lora_out), *LORA)) == 0
    assert run_from_args(train_args(corpus, out, 3, "--init", str(lora_out), *LORA)) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]  # resumed at 2, not restarted
    first, second = find_checkpoint(lora_out), find_checkpoint(out)
    assert second.name == "step_000003"
    assert read_config(second)["lora"]["base"]["path"] == str(first.resolve())
    config = LlamaConfig.from_saved(read_config(base)["model"], "config.json")
    by_hand = Llama(config)
    by_hand.load_state_dict(load_file(str(base / MODEL_FILE)), strict=False)
    for checkpoint in (first, second):  # each run's adapters merged in turn
        apply_lora(by_hand, config_of(read_config(checkpoint)["lora"]))
        state = load_file(str(checkpoint / MODEL_FILE))
        for name, layer in lora_layers(by_hand):
            layer.lora_A.weight.data.copy_(state[f"{name}.lora_A.weight"])
            layer.lora_B.weight.data.copy_(state[f"{name}.lora_B.weight"])
        strip_lora(by_hand)
    loaded = load_weights(second, read_config(second), Llama(config))
    for name, tensor in by_hand.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_resuming_on_another_base_is_refused_naming_both(corpus, lora_out, tmp_path, capsys):
    assert run_from_args(train_args(corpus, tmp_path / "other", 1)) == 0
    other = find_checkpoint(tmp_path / "other")
    capsys.readouterr()
    code = run_from_args(train_args(corpus, lora_out, 4, "--init", str(other), *LORA))
    line = assert_one_line_error(code, capsys.readouterr().err, "adapts base", str(other), "resume with the base")
    assert read_config(find_checkpoint(lora_out))["lora"]["base"]["path"] in line


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ([], "resume it with the same --lora ('r=4,alpha=8,dropout=0.1')"),
        (["--lora", "r=8"], "resume it with the same --lora"),
    ],
)
def test_resuming_a_lora_run_with_other_adapters_is_refused(corpus, base, lora_out, flags, needle, capsys):
    code = run_from_args(train_args(corpus, lora_out, 4, "--init", str(base), *flags))
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_lora_on_a_full_run_is_refused_and_lora_needs_init(corpus, base, tmp_path, capsys):
    assert run_from_args(train_args(corpus, tmp_path / "full", 1)) == 0
    capsys.readouterr()
    code = run_from_args(train_args(corpus, tmp_path / "full", 2, *LORA))
    assert_one_line_error(code, capsys.readouterr().err, "is a full training run: resume it without --lora")
    code = run_from_args(train_args(corpus, tmp_path / "fresh", 2, *LORA))
    assert_one_line_error(code, capsys.readouterr().err, "--lora adapts a trained model: give it with --init")
    code = run_from_args(train_args(corpus, tmp_path / "fresh", 2, "--init", str(base), "--lora", "r=0"))
    assert_one_line_error(code, capsys.readouterr().err, "--lora r must be ≥ 1")
    assert not (tmp_path / "fresh").exists()


def test_a_lora_run_whose_base_changed_or_went_is_refused_in_one_line(corpus, tmp_path, capsys):
    assert run_from_args(train_args(corpus, tmp_path / "base", 1)) == 0
    base = find_checkpoint(tmp_path / "base")
    assert run_from_args(lora_run(corpus, base, tmp_path / "lora", 1)) == 0
    capsys.readouterr()
    weights = load_file(str(base / MODEL_FILE))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(base / MODEL_FILE))
    code = run_from_args(lora_run(corpus, base, tmp_path / "lora", 2))
    assert_one_line_error(code, capsys.readouterr().err, "whose weights changed since", "put the original base back")
    checkpoint = find_checkpoint(tmp_path / "lora")
    saved = read_config(checkpoint)
    fresh = lambda: Llama(LlamaConfig.from_saved(saved["model"], "config.json"))  # noqa: E731
    with pytest.raises(CheckpointError, match="whose weights changed since"):  # what inference and export call
        load_weights(checkpoint, saved, fresh())
    (base / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match="which is gone: put it back"):
        load_weights(checkpoint, saved, fresh())


# ---------------------------------------------------------------- inference and export on a real tokenizer


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-sft") / "chat.jsonl"
    lines = []
    for i in range(24):
        turns = [
            {"role": "user", "content": f"第{i}个问题：今天天气好吗？"},
            {"role": "assistant", "content": "很好。"},
        ]
        lines.append(json.dumps({"conversations": turns}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sft_lora(small_tokenizer, conversations, tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, LoRA SFT run on it): python -m llama.sft --lora."""
    root = tmp_path_factory.mktemp("lora-sft-run")
    base = find_checkpoint(save_tiny_checkpoint(root / "base", small_tokenizer))
    args = ["--data", str(conversations), "--init", str(base), "--out-dir", str(root / "sft"), "--steps", "3"]
    args += ["--batch-size", "2", "--seq-len", "64", "--lr", "5e-2", "--val-fraction", "0", "--eval-every", "0"]
    args += ["--profile", "cpu", "--kernels", "torch", "--no-progress", "--pack-workers", "1", *LORA]
    assert sft.main(args) == 0
    return base, root / "sft"


def adapted_by_hand(base: Path, run: Path) -> torch.nn.Module:
    """The base model with the run's adapters applied and loaded by hand (unmerged): what every reader must match."""
    model, _, _ = load_for_inference(base, device="cpu", dtype="fp32", kernels="torch")
    checkpoint = find_checkpoint(run)
    apply_lora(model, config_of(read_config(checkpoint)["lora"]))
    state = load_file(str(checkpoint / MODEL_FILE))
    for name, layer in lora_layers(model):
        layer.lora_A.weight.data.copy_(state[f"{name}.lora_A.weight"])
        layer.lora_B.weight.data.copy_(state[f"{name}.lora_B.weight"])
    return model.eval()


def test_inference_takes_a_lora_run_directly(sft_lora, small_tokenizer):
    base, run = sft_lora
    model, tokenizer, info = load_for_inference(run, device="cpu", dtype="fp32", kernels="torch")
    assert not any(True for _ in lora_layers(model)), "merged into a plain model"
    ids = torch.tensor([tokenizer.encode("第3个问题：今天天气好吗？")])
    with torch.no_grad():
        ours, expected = model(ids).logits, adapted_by_hand(base, run)(ids).logits
        plain = load_for_inference(base, device="cpu", dtype="fp32", kernels="torch")[0](ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-4), "the adapters changed the model"


def test_generate_cli_on_a_lora_run(sft_lora, tmp_path):
    _, run = sft_lora
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("今天天气好吗？\n", encoding="utf-8")
    args = [sys.executable, "-m", "llama.generate", "--ckpt", str(run), "--prompts", str(prompts)]
    args += ["--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--device", "cpu"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_export_merge_lora_gives_transformers_our_logits(sft_lora, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, run = sft_lora
    hf_dir = export_hf(run, tmp_path / "merged", dtype="fp32", merge_lora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, adapted_by_hand(base, run)(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_of_a_lora_run_is_a_peft_adapter_peft_loads_onto_the_exported_base(sft_lora, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, run = sft_lora
    base_hf = export_hf(base, tmp_path / "base", dtype="fp32")
    adapter = export_hf(run, tmp_path / "adapter")
    assert sorted(p.name for p in adapter.iterdir() if p.name.startswith("adapter_")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base_hf)), str(adapter))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, adapted_by_hand(base, run)(ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_lora_on_a_plain_checkpoint_is_one_line(sft_lora, tmp_path):
    base, _ = sft_lora
    with pytest.raises(ExportError, match="has no LoRA adapters to merge: export it without --merge-lora"):
        export_hf(base, tmp_path / "x", merge_lora=True)
    assert not (tmp_path / "x").exists()


def test_a_peft_adapter_trained_elsewhere_is_imported_as_a_lora_run(sft_lora, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, _ = sft_lora
    base_hf = export_hf(base, tmp_path / "base-hf", dtype="fp32")
    spec = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "down_proj"], lora_dropout=0.0)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(base_hf)), spec)
    torch.manual_seed(7)
    with torch.no_grad():  # as if trained: B away from zero
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    args = [sys.executable, "-m", "llama.export", "--from-peft", str(tmp_path / "adapter"), "--base", str(base)]
    done = subprocess.run([*args, "--out", str(tmp_path / "ours")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_config(find_checkpoint(tmp_path / "ours"))["lora"]["base"]["path"] == str(base.resolve())
    model, _, _ = load_for_inference(tmp_path / "ours", device="cpu", dtype="fp32", kernels="torch")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4)
    refused = subprocess.run(args[:5] + ["--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert_one_line_error(refused.returncode, refused.stderr, "--from-peft and --base go together")
