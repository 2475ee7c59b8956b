"""Knowledge distillation: the chunked loss equals its plain-PyTorch spec (loss and gradients, every divergence,
odd sizes), α = 0 is the plain next-token loss, a model's KL to itself is 0, bad settings and a teacher of another
tokenizer are one-line refusals, and on CPU a tiny student distilled from a larger tiny teacher on real medical
conversations ends closer to the teacher (validation KL) than the same student SFT-trained for the same steps."""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path

import pytest
import torch
from faults import assert_one_line_error
from kernel_checks import requires_triton
from training_runs import assert_resumed_identically, start_run, wait_until_stalled

from engine.dataset import SFTDataset
from engine.format import DatasetPaths
from llama import distill, sft
from llama.dpo import load_reference
from llama.model import Llama, LlamaConfig, ModelOptions
from llama.training.checkpoint import checkpoint_name, find_checkpoint, read_config, save_checkpoint, tied_parameters
from llama.training.distill import Distill, DistillSettings, Teacher, chunked_distill_loss
from llama.training.metrics import read_metrics
from llama.training.objectives import lm_loss
from tests.test_chat import save_tiny_checkpoint
from zhkernels import reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU

CPU = ["--profile", "cpu", "--kernels", "torch", "--no-progress", "--pack-workers", "1"]
KINDS = ("forward", "reverse", "jsd")


# ---------------------------------------------------------------- the loss


def _inputs(seed: int = 0, tokens: int = 37, vocab: int = 1003) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(tokens, 48, generator=g, dtype=torch.float64).float()
    s_weight = torch.randn(vocab, 48, generator=g) * 0.3
    t_hidden, t_weight = torch.randn(tokens, 80, generator=g), torch.randn(vocab, 80, generator=g) * 0.3
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.3] = -100
    return s_hidden, s_weight, t_hidden, t_weight, labels


@pytest.mark.parametrize("kind", KINDS)
def test_the_chunked_loss_and_its_gradients_equal_the_spec(kind):
    settings = DistillSettings(alpha=0.3, temperature=1.7, divergence=kind, jsd_beta=0.3)
    results = []
    for chunked in (False, True):
        s_hidden, s_weight, t_hidden, t_weight, labels = _inputs()
        s_hidden.requires_grad_(True), s_weight.requires_grad_(True)
        if chunked:  # 7 tokens a chunk: several chunks and a ragged last one
            terms = chunked_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, settings, chunk_size=7)
        else:
            terms = reference.distill_loss(
                s_hidden, s_weight, t_hidden, t_weight, labels, alpha=0.3, temperature=1.7, kind=kind, beta=0.3
            )
        terms[0].backward()
        results.append((*terms, s_hidden.grad, s_weight.grad))
    for spec, chunked in zip(*results):
        torch.testing.assert_close(chunked, spec, rtol=1e-5, atol=1e-6)
    assert results[0][2] > 0


def test_the_divergences_match_their_textbook_definitions():
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ps, pt = s.softmax(-1), t.softmax(-1)
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    m = 0.3 * pt + 0.7 * ps
    torch.testing.assert_close(reference.token_divergence(s, t, "forward"), kl(pt, ps))
    torch.testing.assert_close(reference.token_divergence(s, t, "reverse"), kl(ps, pt))
    torch.testing.assert_close(reference.token_divergence(s, t, "jsd", 0.3), 0.3 * kl(pt, m) + 0.7 * kl(ps, m))


def test_no_counted_token_gives_zeros_not_nan():
    s_hidden, s_weight, t_hidden, t_weight, labels = _inputs()
    terms = chunked_distill_loss(
        s_hidden, s_weight, t_hidden, t_weight, torch.full_like(labels, -100), DistillSettings()
    )
    assert [float(t) for t in terms] == [0.0, 0.0, 0.0]


def _tiny(dim: int, seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, max_seq_len=64)).eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (2, 24), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :8] = -100
    return {"input_ids": ids, "labels": labels}


def test_alpha_0_is_the_plain_next_token_loss():
    student, batch = _tiny(64, 0), _batch()
    objective = Distill(DistillSettings(alpha=0.0), Teacher(_tiny(96, 1)))
    loss, metrics = objective.loss(student, batch)
    torch.testing.assert_close(loss, lm_loss(student, batch), rtol=1e-5, atol=1e-6)
    assert objective.perplexity and not Distill(DistillSettings(alpha=0.5), Teacher(_tiny(96, 1))).perplexity
    assert set(metrics) == {"ce", "kl"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_distilled_against_itself_has_divergence_0(kind):
    student, batch = _tiny(64, 0), _batch()
    objective = Distill(DistillSettings(divergence=kind), Teacher(_tiny(64, 0)))
    with torch.no_grad():
        metrics = objective.validate(student, [batch])
    assert set(metrics) == {"loss", "ce", "jsd" if kind == "jsd" else "kl"}
    assert abs(float(metrics["jsd" if kind == "jsd" else "kl"])) < 1e-5


# ---------------------------------------------------------------- the command line on real conversations


def _save_teacher_base(out_dir: Path, tokenizer) -> Path:
    """A checkpoint like save_tiny_checkpoint's but wider (dim 96, 3 layers): the tiny family's larger member."""
    torch.manual_seed(1)
    config = LlamaConfig(dim=96, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size, max_seq_len=512)
    model = Llama(config)
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 1},
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "sha256": tokenizer.sha256},
        "step": 1,
        "tokens": 64,
        "task": None,
    }
    save_checkpoint(out_dir, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return find_checkpoint(out_dir)


def _sft(data: Path, init: Path, out: Path, steps: int, lr: str) -> Path:
    args = ["--data", str(data), "--init", str(init), "--out-dir", str(out), "--steps", str(steps), "--lr", lr]
    args += ["--batch-size", "4", "--seq-len", "256", "--val-fraction", "0.1", "--eval-every", "0"]
    assert sft.main([*args, *CPU]) == 0
    return find_checkpoint(out)


@pytest.fixture(scope="module")
def models(shared_data, small_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """200 real medical conversations (10% held out); a teacher (dim 96) SFT-trained 60 steps, a student (dim 64)
    SFT-trained 10 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # function fixtures (one_torch_thread) do not cover a module fixture's setup
    try:
        return _train_models(shared_data, small_tokenizer, tmp_path_factory.mktemp("distill"))
    finally:
        torch.set_num_threads(threads)


def _train_models(shared_data: Path, small_tokenizer, root: Path) -> dict[str, Path]:
    data = root / "medical.jsonl"
    with open(shared_data / "medicalgpt" / "medical_sft_1K_format.jsonl", encoding="utf-8") as f:
        data.write_text("".join(line for _, line in zip(range(200), f)), encoding="utf-8")
    student = find_checkpoint(save_tiny_checkpoint(root / "student-base", small_tokenizer, max_seq_len=512))
    teacher = _save_teacher_base(root / "teacher-base", small_tokenizer)
    return {
        "data": data,
        "teacher": _sft(data, teacher, root / "teacher", 60, "3e-3"),
        "student": _sft(data, student, root / "student", 10, "3e-3"),
    }


def distill_args(models: dict[str, Path], out: Path, steps: int, *extra: str) -> list[str]:
    args = ["--teacher", str(models["teacher"]), "--init", str(models["student"]), "--data", str(models["data"])]
    args += ["--out-dir", str(out), "--steps", str(steps), "--batch-size", "4", "--seq-len", "256", "--lr", "3e-3"]
    return [*args, "--val-fraction", "0.1", "--log-every", "1", *CPU, *extra]


def _validation_kl(models: dict[str, Path], student: Path) -> float:
    """The student's mean forward KL (T = 1) to the teacher over the held-out conversations."""
    val = DatasetPaths.of(next(models["data"].parent.glob(".medical.jsonl.zhllm-cache/**/sft.val.bin"))).prefix
    teacher = load_reference(models["teacher"], read_config(models["teacher"]), "torch")
    model = load_reference(student, read_config(student), "torch")
    objective = Distill(DistillSettings(alpha=1.0, temperature=1.0), Teacher(teacher))
    dataset = SFTDataset(val, 256, seed=0, pin_memory=False)
    batches = [dataset.next_batch(4) for _ in range(math.ceil(dataset.n_rows / 4))]
    with torch.no_grad():
        return float(objective.validate(model, batches)["kl"])


def test_a_distilled_student_ends_closer_to_its_teacher_than_an_sft_one(models, tmp_path):
    steps = 30
    out = tmp_path / "distilled"
    assert distill.main(distill_args(models, out, steps, "--eval-every", str(steps), "--alpha", "0.9")) == 0
    sft_student = _sft(models["data"], models["student"], tmp_path / "sft", steps, "3e-3")
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert "val_kl" in final and "val_ce" in final and "val_ppl" not in final, final
    distilled_kl, sft_kl = _validation_kl(models, find_checkpoint(out)), _validation_kl(models, sft_student)
    print(f"validation KL to the teacher: distilled {distilled_kl:.4f}, SFT {sft_kl:.4f}")
    assert distilled_kl < sft_kl
    task = read_config(find_checkpoint(out))["task"]
    assert task["name"] == "distill" and task["teacher"]["path"] == str(models["teacher"].resolve())


# ---------------------------------------------------------------- refusals, before anything is packed or written


class _OtherTokenizer:
    """Enough of a tokenizer for save_tiny_checkpoint: a vocabulary size, a path and a sha256."""

    def __init__(self, vocab_size: int, sha256: str) -> None:
        self.vocab_size, self.sha256, self.path = vocab_size, sha256, Path("elsewhere/tokenizer.model")


def _refusal_args(tmp_path: Path, teacher: Path, student: Path, *extra: str) -> list[str]:
    data = tmp_path / "chat.jsonl"  # never read: every refusal comes first
    args = ["--teacher", str(teacher), "--init", str(student), "--data", str(data), "--out-dir", str(tmp_path / "out")]
    return [*args, "--steps", "2", *CPU, *extra]


@pytest.fixture
def student_base(small_tokenizer, tmp_path) -> Path:
    return find_checkpoint(save_tiny_checkpoint(tmp_path / "student", small_tokenizer))


def test_a_teacher_of_another_tokenizer_is_refused_naming_both(student_base, small_tokenizer, tmp_path, capsys):
    other = _OtherTokenizer(small_tokenizer.vocab_size, "cd" * 32)
    teacher = find_checkpoint(save_tiny_checkpoint(tmp_path / "teacher", other, sha256=other.sha256))
    code = distill.main(_refusal_args(tmp_path, teacher, student_base))
    line = assert_one_line_error(code, capsys.readouterr().err, f"the teacher {teacher}", "another vocabulary")
    assert str(student_base) in line and "cdcdcdcd" in line and small_tokenizer.sha256[:12] in line
    assert not (tmp_path / "out").exists()


def test_a_teacher_of_another_vocabulary_size_is_refused(student_base, small_tokenizer, tmp_path, capsys):
    other = _OtherTokenizer(small_tokenizer.vocab_size + 7, small_tokenizer.sha256)
    teacher = find_checkpoint(save_tiny_checkpoint(tmp_path / "teacher", other, sha256=other.sha256))
    code = distill.main(_refusal_args(tmp_path, teacher, student_base))
    assert_one_line_error(code, capsys.readouterr().err, f"the teacher {teacher} has a vocabulary of 3,007 ids")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--alpha", "1.5"], "--alpha must be"),
        (["--alpha", "-0.1"], "--alpha must be"),
        (["--temperature", "0"], "--temperature must be"),
        (["--jsd-beta", "1", "--divergence", "jsd"], "--jsd-beta must be"),
        (["--jsd-beta", "0"], "--jsd-beta must be"),
    ],
)
def test_bad_settings_are_one_line_before_anything_is_written(student_base, tmp_path, capsys, flags, needle):
    code = distill.main(_refusal_args(tmp_path, student_base, student_base, *flags))
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


def test_a_missing_teacher_is_refused(student_base, tmp_path, capsys):
    args = _refusal_args(tmp_path, student_base, student_base)
    code = distill.main(args[2:])
    assert_one_line_error(code, capsys.readouterr().err, "--teacher is required")


def test_a_distill_run_killed_mid_run_resumes_bitwise_identically_against_its_teacher(models, tmp_path, capsys):
    script = tmp_path / "run_distill.py"
    script.write_text("from llama.distill import main\nraise SystemExit(main())\n", encoding="utf-8")
    steps, extra = 4, ("--save-every", "2", "--eval-every", "2", "--model", "dropout=0.1")
    reference_args = distill_args(models, tmp_path / "reference", steps, *extra)
    victim_args = distill_args(models, tmp_path / "victim", steps, *extra)
    reference = start_run(reference_args, tmp_path / "ref.log", script=str(script))
    victim = start_run(victim_args, tmp_path / "victim.log", stall_at=2, script=str(script))
    assert wait_until_stalled(tmp_path / "victim.log", victim) == 2
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    resumed = start_run(victim_args, tmp_path / "resumed.log", script=str(script))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert "RESUMING from" in (tmp_path / "resumed.log").read_text()
    assert_resumed_identically(tmp_path / "reference", tmp_path / "victim", steps, ("loss", "grad_norm", "ce", "kl"))
    other = distill_args(models, tmp_path / "victim", steps + 2, *extra)
    other[other.index("--teacher") + 1] = str(models["student"])
    code = distill.main(other)
    assert_one_line_error(code, capsys.readouterr().err, "was distilled from the teacher", "not --teacher")


@requires_triton
@pytest.mark.triton
@pytest.mark.parametrize("kind", KINDS)
def test_a_student_running_its_triton_kernels_gets_the_fused_loss_with_the_same_values_and_gradients(kind):
    """The objective picks zhkernels.fused_distill_loss when the student runs its kernels (the interpreter on CPU):
    same loss, metrics and gradients as the chunked torch path."""
    batch, results = _batch(), []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        student = Llama(
            LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, max_seq_len=64),
            ModelOptions(kernels=kernels),
        )
        objective = Distill(DistillSettings(alpha=0.4, temperature=1.5, divergence=kind), Teacher(_tiny(96, 1)))
        loss, metrics = objective.loss(student, batch)
        loss.backward()
        results.append((loss.detach(), metrics, student.lm_head.weight.grad.clone()))
    (eager_loss, eager_metrics, eager_grad), (fused_loss, fused_metrics, fused_grad) = results
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name in eager_metrics:
        torch.testing.assert_close(fused_metrics[name], eager_metrics[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-3, atol=1e-5)
