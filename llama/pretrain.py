"""Pretrain a Llama on a packed corpus: ``python -m llama.pretrain --bin data/corpus.bin``.

The corpus comes from ``python -m engine.prepare`` (``corpus.bin`` + ``corpus.idx.npy`` +
``corpus.meta.json``; ``corpus.val.bin`` beside it is used for validation). A hardware profile picks
precision, micro-batch, activation checkpointing and accumulation so the run fits the card
(``--profile auto`` reads this machine); any of them can be set by hand. Output goes to ``--out-dir``:
checkpoints (safetensors), ``metrics.jsonl``, TensorBoard events and a loss curve when those packages
are installed. Running the same command again resumes from the last checkpoint.

    python -m llama.pretrain --bin data/corpus.bin                                   # auto profile, default preset
    python -m llama.pretrain --bin data/corpus.bin --preset seed003-92m --profile 3060-6gb
    python -m llama.pretrain --bin data/corpus.bin --profile 3060-6gb --max-memory-gb 6   # rehearse a 6 GB card
    torchrun --nproc_per_node=2 -m llama.pretrain --bin data/corpus.bin               # data-parallel on 2 GPUs
    python -m llama.pretrain --bin data/more.bin --init out/pretrain --out-dir out/more  # continue from its weights
    python -m llama.pretrain --bin nanogpt/train.bin --dtype uint16 --vocab-size 50304  # a bare .bin, no meta
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from typing import Sequence

from engine.cli import setup_logging
from engine.format import DatasetError, DatasetPaths, PackedFiles, open_packed

from .model import PRESETS, LlamaConfig
from .training.cli import add_train_arguments, choose_seq_len, model_overrides, planned_values, run_training
from .training.config import TrainConfig
from .training.data import pretrain_dataset
from .training.loop import train
from .training.profiles import PROFILES, get_profile
from .training.resume import resolve_init

logger = logging.getLogger("llama.pretrain")

#: TrainConfig fields the profile decides unless given on the command line.
PLANNED = ("batch_size", "grad_accum", "precision", "activation_checkpointing", "steps", "seq_len")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.pretrain",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--bin", required=True, help="packed training corpus: data/corpus.bin (or its prefix data/corpus)"
    )
    parser.add_argument("--val", help="packed validation corpus (default: corpus.val.bin beside --bin, when present)")
    parser.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} (default: the profile's)")
    parser.add_argument(
        "--profile",
        default="auto",
        choices=("auto", *PROFILES),
        help="hardware profile that sizes the run to fit (default: auto, from this machine)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="model vocabulary (default: the preset's, else the corpus's tokenizer); for a bare .bin, also its ids'",
    )
    parser.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        help="token type of a bare .bin with no .meta.json (nanoGPT / baby-llama2 style); needs --vocab-size",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model field, value as JSON (e.g. dim=640, rope_theta=1e6); repeatable",
    )
    add_train_arguments(parser, defaults={name: None for name in PLANNED} | {"out_dir": "out/pretrain"})
    return parser


def model_config(args: argparse.Namespace, corpus_vocab: int, preset: str) -> LlamaConfig:
    """The preset with --model overrides; its vocabulary must cover the corpus's ids (one-line error otherwise)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = model_overrides(args.model)
    preset_vocab = PRESETS[preset].get("vocab_size")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be a whole number >= 1 (the tokenizer's size), got {args.vocab_size}")
    vocab = next(v for v in (args.vocab_size, preset_vocab, corpus_vocab) if v is not None)  # 0 is a value
    if preset_vocab and args.vocab_size is None and preset_vocab != corpus_vocab:
        raise ValueError(
            f"preset {preset} has a {preset_vocab:,}-id vocabulary but {args.bin} was packed with a "
            f"{corpus_vocab:,}-id "
            f"tokenizer: pass --vocab-size {corpus_vocab} (or pack the corpus with the preset's tokenizer)"
        )
    if vocab < corpus_vocab:
        raise ValueError(
            f"--vocab-size {vocab:,} is smaller than the corpus tokenizer's {corpus_vocab:,} ids; "
            f"use --vocab-size {corpus_vocab}"
        )
    return LlamaConfig.from_preset(preset, **{**overrides, "vocab_size": vocab})


def init_model_config(args: argparse.Namespace) -> LlamaConfig:
    """The --init checkpoint's model config with --model overrides (the loop checks they keep its architecture)."""
    found, saved = resolve_init(args.init)
    overrides = model_overrides(args.model)
    return LlamaConfig.from_saved(saved.get("model"), f"--init {found}", **overrides)


def bare_reading(args: argparse.Namespace) -> dict[str, object]:
    """How to read --bin: a bare ``.bin`` (no meta, nanoGPT style) as --dtype and --vocab-size say."""
    bare = not DatasetPaths.of(args.bin).meta.exists()
    return {"dtype": args.dtype, "vocab_size": args.vocab_size if bare else None}


def open_corpus(args: argparse.Namespace) -> PackedFiles:
    """The training corpus, its ids checked against its vocabulary before anything is written."""
    try:
        return open_packed(args.bin, **bare_reading(args))
    except (DatasetError, OSError) as e:
        raise ValueError(f"cannot read the corpus {args.bin}: {e}") from None


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, str]:
    """Model and training configs from the arguments, the profile filling what was not given."""
    files = open_corpus(args)
    profile = get_profile(args.profile)
    if args.init and not args.preset:  # continue the --init checkpoint's architecture (e.g. a model from --from-hf)
        config, preset = init_model_config(args), f"from {args.init}"
    else:
        preset = args.preset or profile.default_preset
        config = model_config(args, files.vocab_size, preset)
    seq_len = choose_seq_len(args.seq_len, profile, config, f"{preset}'s")
    values, chosen = planned_values(args, profile, config, seq_len)
    if args.steps is None and args.tokens is None:
        values["steps"] = profile.default_steps
    cfg = TrainConfig(**values)
    summary = (
        f"profile {profile.name}: preset {preset} ({config.dim}d x {config.n_layers} layers, vocab "
        f"{config.vocab_size:,}); {chosen.describe(seq_len)}"
    )
    return config, cfg, summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, cfg, summary = configure(args)
        logger.info("%s", summary)
        factory = partial(pretrain_dataset, **bare_reading(args))
        train(config, cfg, args.bin, args.val, dataset_factory=factory)  # logs its one-line summary at the end

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(main())
