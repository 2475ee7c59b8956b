"""python -m llama.pretrain: defaults, profiles (memory plans), resume, and one-line errors for bad runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_train import VOCAB, write_corpus

from llama import pretrain
from llama.generation.sample import sample
from llama.model import LlamaConfig
from llama.training.profiles import PROFILES, ProfileError, estimate_memory_gib, get_profile, plan

SMALL = [
    "--profile",
    "cpu",
    "--kernels",
    "torch",
    "--model",
    "dim=64",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-batches",
    "2",
    "--no-progress",
    "--log-every",
    "1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrain")
    write_corpus(folder / "corpus.val", 20, seed=4)
    write_corpus(folder / "corpus", 120, seed=3)
    return folder / "corpus.bin"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = pretrain.main(argv)
    return code, capsys.readouterr().err


def test_help_names_the_profiles(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--profile" in out and "3060-6gb" in out and "--max-memory-gb" in out


def test_trains_with_defaults_then_resumes(corpus, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    code, err = run(["--bin", str(corpus), "--steps", "3", "--out-dir", str(out), *SMALL], capsys)
    assert code == 0, err
    assert (out / "step_000003" / "model.safetensors").exists() or any(out.glob("step_000003*"))
    assert (out / "metrics.jsonl").read_text().count('"step"') >= 3
    code, err = run(["--bin", str(corpus), "--steps", "5", "--out-dir", str(out), *SMALL], capsys)
    assert code == 0, err
    assert "RESUMING" in caplog.text
    assert any(out.glob("step_000005*"))


def test_preset_with_another_vocabulary_is_refused(corpus, tmp_path, capsys):
    code, err = run(
        ["--bin", str(corpus), "--preset", "seed003-92m", "--steps", "1", "--out-dir", str(tmp_path)], capsys
    )
    assert code == 2
    assert err.startswith("error: ") and f"--vocab-size {VOCAB}" in err and err.count("\n") == 1


def test_seq_len_above_the_context_is_refused(corpus, tmp_path, capsys):
    code, err = run(
        ["--bin", str(corpus), "--preset", "tiny", "--seq-len", "4096", "--steps", "1", "--out-dir", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "context of 256 tokens" in err and "--seq-len 256" in err


def test_bad_inputs_give_one_line_errors(corpus, tmp_path, capsys):
    code, err = run(["--bin", str(tmp_path / "missing.bin"), "--steps", "1"], capsys)
    assert code == 2 and err.startswith("error: cannot read the corpus")
    code, err = run(["--bin", str(corpus), "--model", "colour=3", "--steps", "1", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "unknown field(s) colour" in err
    code, err = run(["--bin", str(corpus), "--vocab-size", "50", "--steps", "1", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "smaller than the corpus tokenizer's" in err


def test_profiles_plan_to_fit_their_cards():
    seed003 = LlamaConfig.from_preset("seed003-92m")
    small = plan(PROFILES["3060-6gb"], seed003, 512)
    assert small.precision == "fp16"
    assert small.estimated_gib <= 6.0 - 0.6
    assert small.micro_batch * small.grad_accum * 512 >= PROFILES["3060-6gb"].tokens_per_step
    big = plan(PROFILES["4090-24gb"], seed003, 512)
    assert big.precision == "bf16" and big.micro_batch >= small.micro_batch
    cpu = plan(PROFILES["cpu"], LlamaConfig.from_preset("tiny", vocab_size=8000), 256)
    assert (cpu.micro_batch, cpu.checkpointing, cpu.precision) == (8, False, "fp32")


def test_checkpointing_is_chosen_only_when_it_is_needed():
    seed000 = LlamaConfig.from_preset("seed000-160m")
    assert estimate_memory_gib(seed000, 16, 1024, "fp16", True) < estimate_memory_gib(seed000, 16, 1024, "fp16", False)
    tight = plan(PROFILES["3060-6gb"], seed000, 1024)
    assert tight.checkpointing, "a 6 GB card needs checkpointing for seed000 at 1024 tokens (estimate)"
    assert not plan(PROFILES["4090-24gb"], LlamaConfig.from_preset("minimind-26m"), 512).checkpointing


def test_a_profile_that_cannot_fit_says_what_would():
    huge = LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096)
    with pytest.raises(ProfileError, match="try --seq-len 2048") as e:
        plan(PROFILES["3060-6gb"], huge, 4096)
    assert "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="choose one of"):
        get_profile("a100")


def test_auto_profile_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert get_profile("auto") == PROFILES["cpu"]


def test_sample_continues_and_respects_eos():
    torch.manual_seed(0)
    from llama.model import Llama

    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=50, dim=32))
    new = sample(model, [3, 4, 5], max_new_tokens=7, seed=1)
    assert len(new) == 7 and all(0 <= t < 50 for t in new)
    assert sample(model, [3, 4, 5], max_new_tokens=7, seed=1) == new, "sampling is seeded"
    greedy_first = sample(model, [3], max_new_tokens=1, temperature=1e-4)[0]
    assert sample(model, [3], max_new_tokens=5, temperature=1e-4, eos_id=greedy_first) == [], "stops at EOS"
    held = sample(model, [3], max_new_tokens=5, temperature=1e-4, eos_id=greedy_first, min_new_tokens=3)
    assert len(held) >= 3 and greedy_first not in held[:3], "EOS is held back for min_new_tokens"
    with pytest.raises(ValueError, match="empty"):
        sample(model, [])


def test_init_from_an_imported_hugging_face_llama_needs_no_preset(corpus, tmp_path, capsys, caplog):
    """--from-hf output as --init: the architecture comes from the checkpoint, training continues from its weights."""
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    from llama.formats.hf import import_to_checkpoint

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    init = import_to_checkpoint(tmp_path / "hf", tmp_path / "imported")
    args = [
        "--bin",
        str(corpus),
        "--init",
        str(init),
        "--profile",
        "cpu",
        "--kernels",
        "torch",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--eval-batches",
        "2",
        "--no-progress",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    code, err = run(args, capsys)
    assert code == 0, err
    assert "initialised from" in caplog.text
    code, err = run([*args[:-1], str(tmp_path / "run2"), "--seq-len", "128"], capsys)
    assert code == 2 and "context of 64 tokens" in err
