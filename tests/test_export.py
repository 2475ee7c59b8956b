"""llama.export: our checkpoint → a folder transformers loads (same logits, tokenizer, chat template, greedy output),
a transformers Llama → our model (same logits), atomic publishing, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llama.formats.hf as export_module
from engine.chat_template import IM_END, render_text
from llama.export import main
from llama.formats.hf import ExportError, export_hf, import_hf
from llama.formats.hf_io import publish_directory
from llama.model import Llama, LlamaConfig
from llama.training.checkpoint import checkpoint_name, load_model_weights, read_config, save_checkpoint, tied_parameters

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra: pip install -e '.[dev]'")

SENTENCE = "今天天气很好，我们去公园散步吧。"
MESSAGES = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: quick and deterministic on CPU


def tiny_config(vocab_size: int, tie: bool, **overrides) -> LlamaConfig:
    """GQA 4/2, head_dim 16, an odd FFN; the tied one has MiniMind's theta 1e6 so config.json must carry it."""
    fields = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        vocab_size=vocab_size,
        max_seq_len=64,
        rope_theta=1e6 if tie else 1e4,
        tie_embeddings=tie,
    )
    return LlamaConfig(**{**fields, **overrides})


def save_ours(
    out_dir: Path, config: LlamaConfig, tokenizer, sha256: str | None = None, big_weight: float | None = None
) -> Path:
    """A checkpoint as llama.training writes it: weights (norms perturbed so they matter), trainer state, configs."""
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
        if big_weight is not None:
            model.model.layers[0].mlp.up_proj.weight[0, 0] = big_weight
    reference = {"path": str(Path(tokenizer.path).resolve()), "sha256": sha256 or tokenizer.sha256}
    meta = {"model": dataclasses.asdict(config), "train": {"steps": 1}, "tokenizer": reference, "step": 1, "tokens": 64}
    save_checkpoint(out_dir, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out_dir


def ours_from(checkpoint: Path) -> Llama:
    model = Llama(LlamaConfig(**read_config(checkpoint)["model"]))
    load_model_weights(checkpoint, model)
    return model.eval()


def greedy(model: Llama, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    """Argmax decoding, recomputing the whole prefix each step (no cache), stopping at any id in ``stop``."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id in stop:
                break
    return ids


YARN = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 32}  # max_seq_len 64 = factor x original


@pytest.fixture(scope="module", params=["untied", "tied", "yarn"])
def exported(request, small_tokenizer, tmp_path_factory) -> tuple[Path, Path, str]:
    """(our run dir, its HF export, which variant: untied, tied or yarn)."""
    tie = request.param == "tied"
    root = tmp_path_factory.mktemp(request.param)
    scaling = YARN if request.param == "yarn" else None
    run = save_ours(root / "run", tiny_config(small_tokenizer.vocab_size, tie, rope_scaling=scaling), small_tokenizer)
    return run, export_hf(run, root / "hf"), request.param


def test_transformers_loads_the_export_with_the_same_logits(exported, small_tokenizer):
    run, hf_dir, variant = exported
    tie = variant == "tied"
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) != tie  # as transformers' save_pretrained writes a tied model
        assert f.metadata() == {"format": "pt"}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.dtype == torch.float32
    assert theirs.config.tie_word_embeddings == tie
    rope = getattr(theirs.config, "rope_parameters", None) or theirs.config.rope_scaling or {}  # transformers 5 or 4
    assert rope.get("rope_type", "default") == ("yarn" if variant == "yarn" else "default")
    assert (theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()) == tie
    ours = ours_from(run / checkpoint_name(1))
    ids = torch.tensor([small_tokenizer.encode(SENTENCE) * 2])
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ by {diff}"


def test_greedy_generation_matches(exported, small_tokenizer):
    run, hf_dir, _ = exported
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = small_tokenizer.encode(SENTENCE)
    stop = set(json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"])
    with torch.no_grad():
        generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=12)[0].tolist()
    assert generated == greedy(ours_from(run / checkpoint_name(1)), prompt, 12, stop)
    assert len(generated) > len(prompt)


def test_tokenizer_chat_template_and_generation_config(exported, small_tokenizer):
    _, hf_dir, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.encode(SENTENCE) == small_tokenizer.encode(SENTENCE)  # no BOS added: the packer adds its own
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == render_text(
        MESSAGES, True
    )
    assert hf_tok.model_max_length == 64
    im_end = small_tokenizer.token_to_id(IM_END)
    assert im_end is not None and im_end != small_tokenizer.eos_id
    generation = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert generation.eos_token_id == [small_tokenizer.eos_id, im_end]
    assert generation.do_sample is False
    assert generation.pad_token_id == small_tokenizer.pad_id and generation.bos_token_id == small_tokenizer.bos_id
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["dtype"], config["eos_token_id"]) == ("float32", small_tokenizer.eos_id)


def test_round_trip_through_import(exported):
    run, hf_dir, variant = exported
    tie = variant == "tied"
    model, config = import_hf(hf_dir)
    assert config.tie_embeddings == tie and (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    original = ours_from(run / checkpoint_name(1))
    assert config == original.config  # theta, yarn scaling, GQA and the odd FFN survive the trip
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_export(exported, tmp_path):
    run, _, _ = exported
    hf_dir = export_hf(run, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert theirs.dtype == torch.bfloat16
    model, _ = import_hf(hf_dir)  # bf16 weights come back as float32 master weights, rounded once
    original = ours_from(run / checkpoint_name(1))
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16).float(), b), name


def test_fp16_export_refuses_out_of_range_weights(small_tokenizer, tmp_path):
    run = save_ours(tmp_path / "run", tiny_config(small_tokenizer.vocab_size, False), small_tokenizer, big_weight=1e5)
    with pytest.raises(ExportError, match="up_proj.weight holds .* beyond fp16's range: export with --dtype bf16"):
        export_hf(run, tmp_path / "hf", dtype="fp16")
    assert not (tmp_path / "hf").exists()
    export_hf(run, tmp_path / "hf", dtype="bf16")
    nan_run = save_ours(
        tmp_path / "nan", tiny_config(small_tokenizer.vocab_size, False), small_tokenizer, big_weight=float("nan")
    )
    with pytest.raises(ExportError, match="up_proj.weight holds NaN or inf: export an earlier checkpoint"):
        export_hf(nan_run, tmp_path / "hf-nan")


# ---------------------------------------------------------------- atomic publishing and refusals


@pytest.fixture(scope="module")
def run_dir(small_tokenizer, tmp_path_factory) -> Path:
    return save_ours(
        tmp_path_factory.mktemp("run") / "run", tiny_config(small_tokenizer.vocab_size, False), small_tokenizer
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_interrupted_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    def save_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []

    # a failure in the middle of an overwrite keeps the previous export whole
    monkeypatch.undo()
    first = export_hf(run_dir, tmp_path / "hf")
    before = (first / "model.safetensors").read_bytes()
    monkeypatch.setattr(export_module, "save_file", save_then_fail)
    with pytest.raises(OSError):
        export_hf(run_dir, tmp_path / "hf", overwrite=True)
    assert (first / "model.safetensors").read_bytes() == before and leftovers(tmp_path) == []


def test_stale_temporaries_are_cleaned(run_dir, tmp_path):
    stale = tmp_path / ".hf.tmp-99999999"  # a pid no process has
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    export_hf(run_dir, tmp_path / "hf")
    assert leftovers(tmp_path) == [] and (tmp_path / "hf" / "config.json").is_file()
    # killed between the two renames of an overwrite: the old folder is put back, never lost or silently replaced
    moved = tmp_path / ".kept.old-99999999"
    moved.mkdir()
    (moved / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="already exists"):
        with publish_directory(tmp_path / "kept"):
            pass
    assert (tmp_path / "kept" / "config.json").read_text() == "{}" and leftovers(tmp_path) == []


def test_existing_out_is_refused_unless_overwrite(run_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists: pass --overwrite"):
        export_hf(run_dir, out)
    assert (out / "notes.txt").exists()
    export_hf(run_dir, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file() and leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="holds the checkpoint"):
        export_hf(run_dir, run_dir, overwrite=True)


def test_tokenizer_sha_mismatch_is_refused(small_tokenizer, tmp_path):
    run = save_ours(tmp_path / "run", tiny_config(small_tokenizer.vocab_size, False), small_tokenizer, sha256="ab" * 32)
    with pytest.raises(ExportError) as info:
        export_hf(run, tmp_path / "hf")
    message = str(info.value)
    assert "ab" * 6 in message and small_tokenizer.sha256[:12] in message and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_tokenizer_override_when_the_reference_moved(small_tokenizer, tmp_path):
    run = save_ours(tmp_path / "run", tiny_config(small_tokenizer.vocab_size, False), small_tokenizer)
    config_file = run / checkpoint_name(1) / "config.json"
    meta = json.loads(config_file.read_text())
    meta["tokenizer"]["path"] = str(tmp_path / "moved-away")
    config_file.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="is gone: pass --tokenizer"):
        export_hf(run, tmp_path / "hf")
    export_hf(run, tmp_path / "hf", tokenizer_dir=small_tokenizer.path)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- import from transformers


def hf_llama(folder: Path, tie: bool, **save_kwargs) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=5e5,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.mark.parametrize(
    "tie,sharded", [(False, False), (True, False), (False, True)], ids=["untied", "tied", "sharded"]
)
def test_import_gives_the_same_logits(tmp_path, tie, sharded):
    theirs = hf_llama(tmp_path / "hf", tie, **({"max_shard_size": "40KB"} if sharded else {}))
    if sharded:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours, config = import_hf(tmp_path / "hf")
    assert (config.n_kv_heads, config.rope_theta, config.tie_embeddings) == (1, 5e5, tie)
    ids = torch.randint(0, 211, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ by {diff}"


def test_non_llama_and_unsafe_folders_are_refused(tmp_path):
    hf_llama(tmp_path / "hf", False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(
        json.dumps({**config, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    )
    with pytest.raises(ExportError, match="describes a Qwen2ForCausalLM .*, not a LlamaForCausalLM: only Llama models"):
        import_hf(tmp_path / "qwen")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text(json.dumps(config))
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ExportError, match="a pickle"):
        import_hf(tmp_path / "pickle")


# ---------------------------------------------------------------- the command line, both ways


def test_cli_both_directions(small_tokenizer, tmp_path, capsys):
    run = save_ours(tmp_path / "run", tiny_config(small_tokenizer.vocab_size, True), small_tokenizer)
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "\n" not in err

    # HF → ours: a weights-only checkpoint folder that find_checkpoint/load_model_weights read, and that exports again
    assert main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "init")]) == 0
    init = tmp_path / "init"
    assert sorted(p.name for p in init.iterdir()) == ["config.json", "model.safetensors"]
    saved = read_config(init)
    assert saved["kind"] == "init" and saved["step"] == 0
    assert saved["tokenizer"]["sha256"] == small_tokenizer.sha256  # the tokenizer shipped in the HF folder
    original, imported = ours_from(run / checkpoint_name(1)), ours_from(init)
    ids = torch.tensor([small_tokenizer.encode(SENTENCE)])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, imported(ids).logits)
    assert main(["--ckpt", str(init), "--out", str(tmp_path / "hf2")]) == 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    capsys.readouterr()
    assert main(["--from-hf", str(qwen), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Qwen2ForCausalLM" in err and not (tmp_path / "q").exists()
    assert main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_help_names_both_directions(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--from-hf" in text and "--ckpt" in text and "--dtype" in text and "llama.pretrain --init" in text
