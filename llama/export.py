"""Export a checkpoint to a Hugging Face Llama folder or a GGUF file, or import one as weights to start training from.

    python -m llama.export --ckpt out/pretrain --out hf/zh-llama            # newest checkpoint of a run
    python -m llama.export --ckpt out/pretrain/step_001000 --out hf/zh-llama --dtype bf16
    python -m llama.export --from-hf hf/some-llama --out out/imported        # then: llama.pretrain --init out/imported
    python -m llama.export --ckpt out/sft-lora --out hf/zh-llama-chat --merge-lora   # a LoRA run, merged
    python -m llama.export --ckpt out/sft-lora --out hf/adapter              # its adapters alone, PEFT's layout
    python -m llama.export --from-peft their-adapter --base out/sft --out out/their-lora  # a PEFT adapter, ours
    python -m llama.export --ckpt out/sft --gguf out/gguf/model.gguf --gguf-type q8_0     # llama.cpp / Ollama
    python -m llama.export --ckpt out/sft-lora --gguf out/gguf/model.gguf --merge-lora   # a LoRA run, merged

The export writes config.json (LlamaForCausalLM), model.safetensors (our parameter names are Hugging
Face's; a tied lm_head is left out, as save_pretrained does), generation_config.json (greedy, stopping at
EOS and <|im_end|>) and the tokenizer the checkpoint was trained with, chat template included, so
transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained(folder) load it unchanged. The tokenizer
is the one the checkpoint names (--tokenizer overrides it) and must have the same sha256.

--gguf writes one GGUF file instead (llama.cpp's own writer, the `gguf` package: architecture llama, q/k rows in
llama.cpp's RoPE order, the tokenizer with our flags: no BOS added, no dummy-prefix space; ChatML template) at
--gguf-type f16 (default), q8_0 or q4_0, and an Ollama Modelfile beside it (ChatML, stop tokens, the context and
the fine-tune's system prompt): `cd out/gguf && ollama create zh-llama -f Modelfile`. What GGUF cannot express
(dynamic NTK RoPE, a SentencePiece Unigram or normalizing tokenizer…) is refused in one line.

The import reads a LlamaForCausalLM folder (config.json + model.safetensors, single or sharded) and writes
model.safetensors + config.json in our checkpoint layout: weights only, no optimizer state, to start a new
run from. Both directions build a temporary folder and rename it at the end: an interrupted run leaves no
half folder under --out.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from engine.cli import run_cli, setup_logging

from .formats.gguf import GGUF_TYPES, export_gguf
from .formats.hf import DEFAULT_DTYPE, export_hf, import_peft_adapter, import_to_checkpoint
from .formats.hf_io import ExportError
from .precision import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.export",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ckpt", metavar="DIR", help="export: a checkpoint (step_N folder) or a training --out-dir (its newest)"
    )
    source.add_argument(
        "--from-hf", metavar="DIR", help="import: a Hugging Face LlamaForCausalLM folder (config.json + safetensors)"
    )
    source.add_argument(
        "--from-peft",
        metavar="DIR",
        help="import: a PEFT LoRA adapter folder trained on the export of --base (written as a LoRA checkpoint)",
    )
    parser.add_argument(
        "--base", metavar="DIR", help="with --from-peft: our checkpoint the adapter's base was exported from"
    )
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument(
        "--out", help="folder to write: the Hugging Face model (export) or a weights-only checkpoint (import)"
    )
    output.add_argument(
        "--gguf",
        metavar="FILE.gguf",
        help="export: write one GGUF file (llama.cpp, Ollama) and an Ollama Modelfile beside it, instead of --out",
    )
    parser.add_argument(
        "--gguf-type",
        metavar="TYPE",
        default=None,
        help=f"with --gguf: weight type, one of {', '.join(GGUF_TYPES)} (default f16; norms stay f32; q4_0 keeps "
        "the output matrix at q8_0)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="export: the tokenizer to ship (default: the one the checkpoint names; its sha256 must match)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help=f"export: weight precision (default: {DEFAULT_DTYPE}, lossless; bf16 halves the files)",
    )
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="export of a LoRA run: one plain model, the adapters merged into their base (default: the adapters "
        "alone, in PEFT's layout)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out folder (or --gguf file and its Modelfile)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.ckpt is None and (args.tokenizer or args.dtype or args.merge_lora):
        raise ExportError(
            "--tokenizer, --dtype and --merge-lora apply to export (--ckpt); an import keeps the model's own "
            "tokenizer reference and float32 weights"
        )
    if args.gguf_type is not None and args.gguf is None:
        raise ExportError("--gguf-type applies to a GGUF export: add --gguf FILE.gguf")
    if args.gguf is not None and args.ckpt is None:
        raise ExportError("--gguf writes an export of a checkpoint: give it --ckpt DIR (imports take --out)")
    if args.gguf is not None and args.dtype is not None:
        raise ExportError("--dtype sets the Hugging Face export's precision; a GGUF's is --gguf-type (f16, q8_0, q4_0)")
    if (args.base is not None) != (args.from_peft is not None):
        raise ExportError("--from-peft and --base go together: a PEFT adapter and our checkpoint it was trained on")
    if args.from_peft is not None:
        import_peft_adapter(args.from_peft, args.base, args.out, overwrite=args.overwrite)
    elif args.gguf is not None:
        export_gguf(
            args.ckpt, args.gguf, args.tokenizer, args.gguf_type or "f16", args.overwrite, merge_lora=args.merge_lora
        )
    elif args.from_hf is not None:
        import_to_checkpoint(args.from_hf, args.out, overwrite=args.overwrite)
    else:
        dtype = args.dtype or DEFAULT_DTYPE
        export_hf(args.ckpt, args.out, args.tokenizer, dtype, overwrite=args.overwrite, merge_lora=args.merge_lora)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code: 0, or 2 with a one-line ``error: …`` on stderr."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
