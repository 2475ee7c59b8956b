"""Reasoning SFT: OpenAI-style ``reasoning_content`` read in every record shape (written into the think block, or left
out of ChatML and counted), the tag-weighted loss against its plain-PyTorch definition, the empty-think share, and an
end-to-end ``llama.sft --template think --think-tag-weight 10 --no-think-share 0.3`` run that resumes exactly.

The model is tiny (2 layers, dim 64, CPU); the tokenizer is the session's small BPE, which has ``<think>`` and
``</think>`` as single tokens (no ``<answer>``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faults import assert_one_line_error

from engine import pack_cache, reply_template
from engine.chat_template import IM_END
from engine.conversations import REASONING, TwoReasoningsError, parse_conversation, parse_field_names
from engine.dataset import SFTDataset
from engine.format import DatasetPaths, open_packed
from engine.prepare import main as prepare_main
from engine.reply_template import EMPTY_THINK, TemplatedCorpus, no_think_chosen, think_tag_ids
from engine.sources import Corpus
from llama import sft
from llama.model import Llama, LlamaConfig, ModelOptions
from llama.training import objectives
from llama.training.checkpoint import checkpoint_name, find_checkpoint, read_config, save_checkpoint, tied_parameters

TINY = ["--profile", "cpu", "--kernels", "torch", "--no-progress", "--log-every", "1"]
SMALL = [*TINY, "--batch-size", "2", "--seq-len", "96", "--pack-workers", "1"]
VOCAB = 96

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


REPLY = {"role": "assistant", "content": "答"}
TWO_REASONINGS = {
    "messages": [
        {"role": "user", "content": "问"},
        {"role": "assistant", "content": "<think>甲</think>答", REASONING: "乙"},
    ]
}


def openai_record(i: int, reasoning: str | None = None) -> dict[str, Any]:
    """One OpenAI-style conversation whose reply carries ``reasoning`` as reasoning_content (none: no reasoning)."""
    reply: dict[str, Any] = {"role": "assistant", "content": f"答案{i}：多喝水。"}
    if reasoning is not None:
        reply[REASONING] = reasoning
    return {"messages": [{"role": "user", "content": f"第{i}个问题：发烧怎么办？"}, reply]}


def reasoning_records(n: int) -> list[dict[str, Any]]:
    return [openai_record(i, f"先想想第{i}题。") for i in range(n)]


def masked_texts(prefix: Path, tokenizer) -> list[str]:
    """The decoded loss-counted tokens (the replies) of every packed conversation, in order."""
    files = open_packed(prefix)
    texts = []
    for doc in range(files.n_docs):
        start, end = files.offsets[doc], files.offsets[doc + 1]
        ids, mask = np.asarray(files.tokens[start:end]), np.asarray(files.mask[start:end])
        texts.append(tokenizer.decode(ids[mask == 1].tolist()))
    return texts


@pytest.fixture(scope="module")
def tiny_init(small_tokenizer, tmp_path_factory) -> Path:
    """A tiny random checkpoint that names the small tokenizer, as llama.training writes one."""
    torch.manual_seed(0)
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=small_tokenizer.vocab_size)
    model = Llama(config)
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 1},
        "tokenizer": {"path": str(Path(small_tokenizer.path).resolve()), "sha256": small_tokenizer.sha256},
        "step": 1,
        "tokens": 64,
    }
    out = tmp_path_factory.mktemp("reasoning-init") / "run"
    save_checkpoint(out, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out


# ---------------------------------------------------------------- reasoning_content in every shape


def test_reasoning_content_is_read_in_every_record_shape():
    openai = parse_conversation(openai_record(1, "想一想"))
    assert openai[-1] == {"role": "assistant", "content": "答案1：多喝水。", REASONING: "想一想"}
    sharegpt = parse_conversation(
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答", REASONING: "想"}]}
    )
    assert sharegpt[-1] == {"role": "assistant", "content": "答", REASONING: "想"}
    one_turn = parse_conversation({"question": "问", "answer": "答", REASONING: "想"})
    assert one_turn[-1][REASONING] == "想"
    # Chinese-DeepSeek-R1-Distill style: {"input", "content", "reasoning_content"}, named with --fields
    distill = parse_conversation(
        {"input": "问", "content": "答", "reasoning_content": "想"}, names={"question": "input", "answer": "content"}
    )
    assert distill == [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答", REASONING: "想"}]
    names = parse_field_names("question=q,answer=a,reasoning_content=r")
    renamed = parse_conversation({"q": "问", "a": "答", "r": "想"}, names=names)
    assert renamed[-1][REASONING] == "想"
    for nothing in (None, "", " \n"):  # OpenAI writes null for models that do not reason
        assert REASONING not in parse_conversation(openai_record(2, nothing))[-1]


@pytest.mark.parametrize(
    "record, needle",
    [
        (TWO_REASONINGS, "two_reasonings"),
        ({"messages": [{"role": "user", "content": "问", REASONING: "想"}, REPLY]}, "only an assistant"),
        (openai_record(1, ["想"]), "list, not text"),  # type: ignore[arg-type]
        ({"messages": openai_record(1)["messages"], REASONING: "想"}, "belongs on its assistant turns"),
    ],
)
def test_conflicting_or_misplaced_reasoning_is_a_bad_record_with_a_reason(record, needle):
    with pytest.raises(ValueError) as caught:
        parse_conversation(record)
    assert needle in str(caught.value) or needle == getattr(caught.value, "reason", None)
    if needle == "two_reasonings":
        assert isinstance(caught.value, TwoReasoningsError) and "keep the reasoning in one of them" in str(caught.value)


def test_think_template_writes_reasoning_content_into_the_think_block(small_tokenizer, tmp_path):
    records = [*reasoning_records(3), openai_record(3)]
    prefix = pack_cache.pack_cached(
        write_jsonl(tmp_path / "r1.jsonl", records),
        small_tokenizer,
        template="think",
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    assert masked_texts(prefix, small_tokenizer) == [
        *(f"<think>\n先想想第{i}题。\n</think>\n\n答案{i}：多喝水。{IM_END}" for i in range(3)),
        f"{EMPTY_THINK}答案3：多喝水。{IM_END}",
    ]
    assert open_packed(prefix).meta["reasoning_left_out"] == 0


def test_chatml_leaves_reasoning_content_out_counts_it_and_says_so_once(small_tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    raw = write_jsonl(tmp_path / "r1.jsonl", [*reasoning_records(5), openai_record(5)])
    prefix = pack_cache.pack_cached(raw, small_tokenizer, val_fraction=0.0, workers=1, progress=False)
    assert masked_texts(prefix, small_tokenizer) == [f"答案{i}：多喝水。{IM_END}" for i in range(6)]
    assert open_packed(prefix).meta["reasoning_left_out"] == 5
    warnings = [r.getMessage() for r in caplog.records if "reasoning_content was left out" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("5 replies'") and "--template think" in warnings[0]
    caplog.clear()  # the reused cache still says it
    pack_cache.pack_cached(raw, small_tokenizer, val_fraction=0.0, workers=1, progress=False)
    assert "packed before" in caplog.text and "5 replies' reasoning_content was left out" in caplog.text

    caplog.clear()  # engine.prepare --kind sft (ChatML only) counts it too
    out = tmp_path / "prepared"
    argv = ["--kind", "sft", "--source", str(raw), "--tokenizer", str(small_tokenizer.path), "--out", str(out)]
    assert prepare_main([*argv, "--workers", "1", "--no-progress"]) == 0
    assert open_packed(out).meta["reasoning_left_out"] == 5 and "reasoning_content was left out" in caplog.text


def test_a_reply_with_two_reasonings_is_skipped_and_counted_when_packed(small_tokenizer, tmp_path):
    raw = write_jsonl(tmp_path / "r1.jsonl", [*reasoning_records(200), TWO_REASONINGS])
    prefix = pack_cache.pack_cached(raw, small_tokenizer, template="think", val_fraction=0.0, workers=1, progress=False)
    meta = open_packed(prefix).meta
    assert meta["n_docs"] == 200 and meta["dropped"] == {"bad:two_reasonings": 1}


# ---------------------------------------------------------------- the tag-weighted loss


def tiny_model(kernels: str) -> Llama:
    torch.manual_seed(3)
    return Llama(
        LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB), ModelOptions(kernels=kernels)
    )


def tag_batch(tags: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Two rows with a prompt (-100), random targets and tag targets sprinkled in."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    labels = torch.randint(0, VOCAB, (2, 24), generator=generator)
    labels[:, :6] = -100
    labels[0, [7, 12, 20]] = tags[0]
    labels[1, [9, 15]] = tags[1]
    return {"input_ids": ids, "labels": labels}


def reference_weighted_loss(model: Llama, batch: dict[str, torch.Tensor], tags: tuple[int, ...], weight: float):
    """The definition: the mean per-token cross-entropy over the counted labels, tag targets weighted ``weight``."""
    logits = model(batch["input_ids"]).logits.float()
    labels = batch["labels"].reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, VOCAB), labels, ignore_index=-100, reduction="none")
    is_tag = torch.isin(labels, torch.tensor(tags))
    weights = torch.where(is_tag, weight, 1.0) * (labels != -100)
    return (weights * losses).sum() / weights.sum(), losses[is_tag].mean()


@pytest.mark.parametrize("kernels", ["torch", "triton"])  # triton: the chunked kernels (interpreted on CPU)
@pytest.mark.parametrize("weight", [10.0, 0.5])
def test_tag_weighted_loss_and_gradients_equal_the_weighted_mean_reference(kernels, weight):
    tags = (17, 42)
    batch = tag_batch(tags)
    model = tiny_model(kernels)
    loss, metrics = objectives.SFT(tag_ids=tags, tag_weight=weight).loss(model, batch)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected, expected_tags = reference_weighted_loss(model, batch, tags, weight)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["tag_loss"], expected_tags.detach())
    assert metrics["supervised"].item() == pytest.approx(36 / 48)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, msg=name)
    unweighted, _ = reference_weighted_loss(model, batch, tags, 1.0)
    assert abs(loss.item() - unweighted.item()) > 1e-3  # the weight changes the loss: the test can fail


def test_weight_one_is_the_unweighted_loss_exactly_and_validation_reports_tag_loss():
    tags = (17, 42)
    batch = tag_batch(tags)
    model = tiny_model("torch")
    loss, metrics = objectives.SFT(tag_ids=tags, tag_weight=1.0).loss(model, batch)
    assert torch.equal(loss, objectives.lm_loss(model, batch)) and set(metrics) == {"supervised"}
    other = {key: value.flip(0) for key, value in batch.items()}
    with torch.no_grad():
        val = objectives.SFT(tag_ids=tags).validate(model, [batch, other])
        plain = objectives.SFT().validate(model, [batch, other])
        _, tag_mean = reference_weighted_loss(model, batch, tags, 1.0)
    torch.testing.assert_close(val["loss"], plain["loss"])  # validation stays the plain mean whatever the weight
    torch.testing.assert_close(val["tag_loss"], tag_mean)  # both batches hold the same tag targets
    with pytest.raises(ValueError, match="--think-tag-weight"):
        objectives.SFT(tag_ids=tags, tag_weight=0.0)


def test_the_small_tokenizer_has_the_think_tags_as_single_tokens(small_tokenizer):
    tags = think_tag_ids(small_tokenizer)
    assert set(tags) == {"<think>", "</think>"}  # no <answer>/</answer> in it: they are weighted only when present
    assert all(small_tokenizer.encode(tag) == [token] for tag, token in tags.items())


# ---------------------------------------------------------------- the empty-think share


def test_the_empty_think_share_is_deterministic_nested_and_close_to_p():
    conversations = [parse_conversation(r) for r in reasoning_records(200)]
    chosen = [no_think_chosen(c, 0.3) for c in conversations]
    assert chosen == [no_think_chosen(c, 0.3) for c in conversations]  # the same every time
    assert abs(sum(chosen) - 60) <= 20, sum(chosen)  # binomial(200, 0.3): sd 6.5
    fewer = [no_think_chosen(c, 0.1) for c in conversations]
    assert 0 < sum(fewer) < sum(chosen) and all(c for c, f in zip(chosen, fewer) if f)  # a smaller share: a subset
    assert not any(no_think_chosen(c, 0.0) for c in conversations)
    assert all(no_think_chosen(c, 1.0) for c in conversations)


def test_emptied_conversations_decode_to_the_empty_block_and_are_counted(small_tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    records = reasoning_records(200)
    raw = write_jsonl(tmp_path / "r1.jsonl", records)
    prefix = pack_cache.pack_cached(
        raw, small_tokenizer, template="think", no_think_share=0.3, val_fraction=0.0, workers=1, progress=False
    )
    emptied = {i for i, r in enumerate(records) if no_think_chosen(parse_conversation(r), 0.3)}
    expected = [
        f"{EMPTY_THINK}答案{i}：多喝水。{IM_END}"
        if i in emptied
        else f"<think>\n先想想第{i}题。\n</think>\n\n答案{i}：多喝水。{IM_END}"
        for i in range(200)
    ]
    assert masked_texts(prefix, small_tokenizer) == expected
    off = reply_template.assistant_prefix("think", thinking=False)
    assert off == EMPTY_THINK  # the block the emptied replies start with is what switches thinking off
    assert f"--no-think-share 0.3: {len(emptied)} of 200 conversations" in caplog.text
    assert f"({len(emptied)} replies' reasoning left out of them)" in caplog.text


def test_the_cache_repacks_when_the_share_changes(small_tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    raw = write_jsonl(tmp_path / "r1.jsonl", reasoning_records(40))
    options = dict(template="think", val_fraction=0.0, workers=1, progress=False)
    prefix = pack_cache.pack_cached(raw, small_tokenizer, no_think_share=0.3, **options)
    first = masked_texts(prefix, small_tokenizer)
    caplog.clear()
    pack_cache.pack_cached(raw, small_tokenizer, no_think_share=0.3, **options)
    assert "packed before" in caplog.text and "packing " not in caplog.text
    caplog.clear()
    pack_cache.pack_cached(raw, small_tokenizer, no_think_share=0.9, **options)
    assert "changed: no_think_share" in caplog.text
    second = masked_texts(prefix, small_tokenizer)
    assert sum(t.startswith(EMPTY_THINK) for t in second) > sum(t.startswith(EMPTY_THINK) for t in first)


def test_templated_corpus_refuses_a_share_without_the_think_template(tmp_path):
    corpus = Corpus([str(write_jsonl(tmp_path / "r.jsonl", reasoning_records(2)))])
    with pytest.raises(ValueError, match="--template think"):
        TemplatedCorpus(corpus, "chatml", False, no_think_share=0.2)
    with pytest.raises(ValueError, match="not both"):
        TemplatedCorpus(corpus, "think", True, no_think_share=0.2)


# ---------------------------------------------------------------- llama.sft end to end


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sft_args(raw: Path, init: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--data", str(raw), "--init", str(init), "--out-dir", str(out), "--steps", str(steps),
        "--template", "think", "--think-tag-weight", "10", "--no-think-share", "0.3",
        "--lr", "3e-3", "--schedule", "constant", "--warmup-steps", "1", "--val-fraction", "0.15",
        "--eval-every", "2", "--eval-batches", "2", "--save-every", "2", *SMALL, *extra,
    ]  # fmt: skip


def test_reasoning_sft_trains_logs_tag_loss_and_resumes_exactly(tiny_init, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    raw = write_jsonl(tmp_path / "r1.jsonl", [*reasoning_records(60), openai_record(60)])
    assert sft.main(sft_args(raw, tiny_init, tmp_path / "whole", 6)) == 0, capsys.readouterr().err
    assert "trained with an empty think block" in caplog.text and "counts x10" in caplog.text
    whole = read_metrics(tmp_path / "whole")
    assert [r["step"] for r in whole] == list(range(1, 7))
    assert all(r["tag_loss"] > 0 for r in whole) and any("val_tag_loss" in r for r in whole)
    task = read_config(find_checkpoint(tmp_path / "whole"))["task"]
    assert (
        task["think_tag_weight"] == 10
        and task["no_think_share"] == 0.3
        and task["think_tags"] == ["</think>", "<think>"]
    )

    # the same run stopped after step 4 and resumed: the same losses, bit for bit
    assert sft.main(sft_args(raw, tiny_init, tmp_path / "split", 4)) == 0, capsys.readouterr().err
    caplog.clear()
    assert sft.main(sft_args(raw, tiny_init, tmp_path / "split", 6)) == 0, capsys.readouterr().err
    assert "RESUMING" in caplog.text and "packed before" in caplog.text
    split = {r["step"]: r for r in read_metrics(tmp_path / "split")}
    for record in whole:
        for key in ("loss", "tag_loss", "grad_norm", "supervised"):
            assert split[record["step"]][key] == record[key], (record["step"], key)

    # a changed weight resumes with a warning and is recorded; a changed share rewrites the data: refused
    caplog.clear()
    code = sft.main([*sft_args(raw, tiny_init, tmp_path / "split", 7), "--think-tag-weight", "5"])
    assert code == 0, capsys.readouterr().err
    assert "--think-tag-weight 10.0 -> 5.0" in caplog.text
    changes = read_config(find_checkpoint(tmp_path / "split"))["config_changes"]
    assert changes[-1]["changed"] == {"--think-tag-weight": [10.0, 5.0]} and changes[-1]["breaks_exact_resume"] == []
    capsys.readouterr()
    code = sft.main([*sft_args(raw, tiny_init, tmp_path / "split", 8), "--no-think-share", "0.5"])
    assert_one_line_error(code, capsys.readouterr().err, "--no-think-share 0.3 -> 0.5", "--allow-config-change")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--template", "think", "--think-tag-weight", "0"], "--think-tag-weight must be"),
        (["--template", "think", "--think-tag-weight", "-2"], "--think-tag-weight must be"),
        (["--template", "think", "--no-think-share", "1.5"], "--no-think-share must be"),
        (["--template", "think", "--no-think-share", "-0.1"], "--no-think-share must be"),
        (["--no-think-share", "0.3"], "use it with --template think"),
        (["--template", "think", "--drop-think", "--no-think-share", "0.3"], "not both"),
    ],
)
def test_bad_reasoning_flags_are_one_line_errors_before_anything_is_packed(tiny_init, tmp_path, capsys, extra, needle):
    raw = write_jsonl(tmp_path / "r1.jsonl", reasoning_records(4))
    code = sft.main(["--data", str(raw), "--init", str(tiny_init), "--out-dir", str(tmp_path / "out"), *SMALL, *extra])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.jsonl"]  # no cache, no output folder


def test_think_tag_weight_on_packed_data_is_allowed_but_no_think_share_is_a_packing_flag(
    tiny_init, small_tokenizer, tmp_path, capsys
):
    raw = write_jsonl(tmp_path / "r1.jsonl", reasoning_records(20))
    prefix = pack_cache.pack_cached(raw, small_tokenizer, template="think", val_fraction=0.0, workers=1, progress=False)
    args = ["--data", str(prefix), "--init", str(tiny_init), "--out-dir", str(tmp_path / "out"), "--steps", "1", *SMALL]
    assert sft.main([*args, "--eval-every", "0", "--think-tag-weight", "3"]) == 0, capsys.readouterr().err
    assert read_metrics(tmp_path / "out")[0]["tag_loss"] > 0
    code = sft.main([*args, "--out-dir", str(tmp_path / "other"), "--no-think-share", "0.2", "--template", "think"])
    assert_one_line_error(code, capsys.readouterr().err, "already packed")
    assert DatasetPaths.of(prefix).meta.is_file() and SFTDataset(prefix, 64, pin_memory=False).n_rows > 0
