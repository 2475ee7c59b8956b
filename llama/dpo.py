"""Direct Preference Optimization: ``python -m llama.dpo --data pairs.jsonl --init out/sft``.

``--data`` is a DPO dataset packed by ``python -m engine.prepare --kind dpo`` (its ``.val`` sibling is used for
validation), or raw preference pairs (MiniMind ``{"chosen": [messages], "rejected": [messages]}``, MedicalGPT
``{"conversations": [...], "chosen": "...", "rejected": "..."}``, ``{"prompt", "chosen", "rejected"}``), packed
once with the checkpoint's tokenizer into a hidden cache beside them (``.pairs.jsonl.zhllm-cache/…/dpo.*``).
Whole pairs are packed into rows with document masking, chosen and rejected of many pairs in one forward.

The loss is TRL's: ``--loss-type sigmoid`` (default, β = 0.1; ``--label-smoothing`` ε is cDPO), ``robust``,
``ipo`` or ``sigmoid_norm`` (length-normalised), plus ``--sft-weight`` times the chosen replies' NLL. Against a
reference equal to the starting policy the loss starts at ln 2 ≈ 0.693: that is the correct start, not a bug.
The reference (default: the ``--init`` checkpoint, or ``--ref-ckpt``) never sits beside the policy on a small
card: ``--ref precompute`` (default) scores every pair once before training and caches the log-probs beside the
data, keyed by the data's and the reference's sha256; ``--ref online`` keeps a frozen copy instead, and under
``--lora`` the reference is the policy with its adapters switched off. Every log step and validation reports the
loss, the rewards of chosen and rejected, their margin and the pairwise accuracy. The loop, profiles, LoRA,
resume and logging are the other tasks'.

    python -m llama.dpo --data ../shared/data/medicalgpt/dpo_zh_500.jsonl --init out/sft
    python -m llama.dpo --data data/dpo --init out/sft --beta 0.2 --loss-type ipo
    python -m llama.dpo --data pairs.jsonl --init out/sft --lora r=16,alpha=32 --ref online --profile 3060-6gb
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engine.cli import setup_logging
from engine.dataset import DPODataset
from engine.format import DatasetPaths, PackedFiles, open_packed
from engine.pack_cache import pack_cached
from engine.tokenizer import tokenizer_mismatch

from .model import Llama, LlamaConfig, ModelOptions
from .precision import resolve_precision
from .training import adapters
from .training import checkpoint as ckpt
from .training import reference as ref
from .training.cli import run_training
from .training.config import TrainConfig, check_values
from .training.dpo import DPO, LOSS_TYPES, DPOSettings
from .training.finetune import (
    FINETUNE_RULES,
    Planned,
    add_data_arguments,
    add_finetune_arguments,
    add_packing_arguments,
    companion_record,
    data_tokenizer,
    describe,
    finish_plan,
    open_quietly,
    plan_finetune,
    recorded_companion,
)
from .training.loop import train
from .training.objectives import place_frozen
from .training.resume import resolve_init
from .training.run import AUTOCAST_DTYPES
from .training.runtime import choose_device

logger = logging.getLogger("llama.dpo")

DPO_DEFAULTS: dict[str, Any] = {"out_dir": "out/dpo", "lr": 5e-6, "min_lr": 5e-7, "eval_every": 50, "save_every": 200}
#: llama.dpo's own numeric flags beside the fine-tunes', checked before anything is packed or scored.
DPO_RULES: dict[str, dict[str, Any]] = {**FINETUNE_RULES, "ref_batch_size": {"at_least": 1, "float": False}}


# ---------------------------------------------------------------- data


def dpo_dataset(
    path: Path,
    seq_len: int,
    *,
    validation: bool,
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    tokenizer_sha256: str | None,
) -> DPODataset:
    """The loop's dataset factory for DPO: rows of whole pairs, shuffled per epoch (validation: seed 0)."""
    seed = 0 if validation else cfg.seed
    return DPODataset(path, seq_len, seed=seed, rank=rank, world_size=world_size, tokenizer_sha256=tokenizer_sha256)


def open_dpo(prefix: str | os.PathLike[str]) -> PackedFiles:
    """Open a packed dataset and insist it holds preference pairs (one-line error otherwise)."""
    paths = DatasetPaths.of(prefix)
    if not paths.meta.is_file():
        raise ValueError(
            f"{paths.bin} has no {paths.meta.name}: DPO needs pairs packed by `python -m engine.prepare --kind dpo` "
            "(or give the raw .jsonl)"
        )
    files = open_packed(paths.prefix)
    if files.kind != "dpo":
        raise ValueError(
            f"{paths.prefix} is a {files.kind} dataset, not preference pairs: DPO needs records with a prompt and a "
            "chosen and a rejected reply (pack them with `python -m engine.prepare --kind dpo`, or give the raw "
            f"file){'; fine-tune on conversations with `python -m llama.sft`' if files.kind == 'sft' else ''}"
        )
    return files


def dpo_data(args: argparse.Namespace, checkpoint: Path, saved: dict[str, Any]) -> Path:
    """The packed training prefix: ``--data`` as given, or raw pairs packed into their cache."""
    paths = DatasetPaths.of(args.data)
    if paths.meta.exists() or paths.bin.exists():
        if args.system:
            raise ValueError(f"--system shapes the packing, but {args.data} is already packed: give the raw pairs")
        return paths.prefix
    if not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no packed dataset ({paths.bin.name}) and no file or folder of that name")
    return pack_cached(
        args.data,
        data_tokenizer(args, checkpoint, saved),
        kind="dpo",
        system=args.system,
        val_fraction=args.val_fraction,
        cache_dir=args.cache_dir,
        workers=args.pack_workers,
        progress=args.progress,
        max_bad=args.max_bad,
    )


def validation_prefix(args: argparse.Namespace, prefix: Path, cfg: TrainConfig) -> Path | None:
    """The validation set the loop will use (``--val``, else the ``.val`` beside the data), when it evaluates."""
    if not cfg.eval_every:
        return None
    if args.val:
        return DatasetPaths.of(args.val).prefix
    val = DatasetPaths.of(prefix).val()
    return val.prefix if val.bin.exists() else None


# ---------------------------------------------------------------- the reference


def reference_checkpoint(args: argparse.Namespace, planned: Planned) -> tuple[Path, dict[str, Any]]:
    """The reference: a resumed run's own record (``--ref-ckpt`` must agree), else ``--ref-ckpt``, else ``--init``."""
    recorded = recorded_companion(
        planned, "reference", args.ref_ckpt, "--ref-ckpt", "was trained against the reference"
    )
    if recorded:
        return recorded
    if args.ref_ckpt:
        return resolve_init(args.ref_ckpt)
    return planned.checkpoint, planned.saved


def check_reference_tokenizer(checkpoint: Path, saved: dict[str, Any], files: PackedFiles) -> None:
    refusal = tokenizer_mismatch(
        saved.get("tokenizer"),
        files.meta.get("tokenizer"),
        owner=f"the reference {checkpoint}",
        other=f"{files.paths.prefix}'s tokenizer",
        fix="give a reference of the same tokenizer (--ref-ckpt)",
    )
    if refusal:
        raise ValueError(refusal)


def load_reference(checkpoint: Path, saved: dict[str, Any], kernels: str) -> Llama:
    """The reference model, plain (a LoRA checkpoint's adapters merged), frozen, in eval mode on the CPU."""
    config = LlamaConfig.from_saved(saved.get("model"), str(checkpoint / ckpt.CONFIG_FILE))
    model = adapters.load_weights(checkpoint, saved, Llama(config, ModelOptions(kernels=kernels)))
    return model.requires_grad_(False).eval()


def reference_tables(
    args: argparse.Namespace, cfg: TrainConfig, checkpoint: Path, saved: dict[str, Any], sets: list[Path]
) -> list[np.ndarray]:
    """Each set's reference log-probs, from its cache or computed now (rank 0; other ranks wait for the file)."""
    device = choose_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    identity = adapters.weights_identity(checkpoint, saved)
    paths = [ref.cache_path(p, ref.dataset_sha256(p), identity, cfg.seq_len, precision) for p in sets]
    datasets = [open_quietly(lambda p=p: DPODataset(p, cfg.seq_len, pin_memory=False)) for p in sets]
    missing = [i for i, path in enumerate(paths) if ref.load_table(path, datasets[i].stored_pair_count) is None]
    if missing and int(os.environ.get("RANK", "0")) == 0:
        dtype = AUTOCAST_DTYPES.get(precision)  # the run's precision, as an online reference runs
        model = place_frozen(load_reference(checkpoint, saved, cfg.kernels), device, dtype)
        autocast = torch.autocast(device.type, AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32")
        for i in missing:
            logger.info(
                "scoring %d pairs of %s with the reference %s (once; cached as %s)",
                datasets[i].n_pairs,
                sets[i],
                checkpoint,
                paths[i].name,
            )
            table = ref.reference_pass(model, datasets[i], args.ref_batch_size, autocast, cfg.progress)
            ref.save_table(paths[i], table)
        del model
    for path in paths:  # ranks other than 0 wait for rank 0's files
        while not path.is_file():
            time.sleep(1)
    return [ref.load_table(path, d.stored_pair_count) for path, d in zip(paths, datasets)]


def build_reference(args: argparse.Namespace, planned: Planned, cfg: TrainConfig, prefix: Path, files: PackedFiles):
    """The objective's reference log-probs and what the run records of the reference."""
    checkpoint, saved = reference_checkpoint(args, planned)
    check_reference_tokenizer(checkpoint, saved, files)
    record = {**companion_record(checkpoint, saved), "mode": args.ref}
    if args.ref == "online":
        if cfg.lora:  # the same weights with the adapters off: no second model
            if checkpoint != planned.checkpoint and not planned.resuming:
                raise ValueError("--ref online with --lora uses the base with its adapters off: drop --ref-ckpt")
            return ref.OnlineReference(None), record
        return ref.OnlineReference(load_reference(checkpoint, saved, cfg.kernels)), record
    sets = [prefix] + ([val] if (val := validation_prefix(args, prefix, cfg)) else [])
    tables = reference_tables(args, cfg, checkpoint, saved, sets)
    return ref.CachedReference(tables[0], tables[1] if len(tables) > 1 else None), record


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.dpo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_data_arguments(
        parser,
        data="packed DPO dataset (data/dpo or data/dpo.bin), or raw preference pairs: a .jsonl/.json file or a "
        "folder of them, packed into a cache beside them",
        val="packed validation pairs",
        init="the checkpoint to train (usually an SFT run)",
    )
    _add_dpo_arguments(parser.add_argument_group("DPO"))
    _add_raw_data_arguments(parser.add_argument_group("raw pairs: how they are packed"))
    add_finetune_arguments(parser, DPO_DEFAULTS, epochs=1.0)
    return parser


def _add_dpo_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--beta", type=float, default=0.1, help="β: how far from the reference (default: 0.1)")
    group.add_argument(
        "--loss-type",
        choices=LOSS_TYPES,
        default="sigmoid",
        help="sigmoid (DPO), robust (rDPO), ipo, sigmoid_norm (length-normalised) (default: sigmoid)",
    )
    group.add_argument(
        "--label-smoothing", type=float, default=0.0, help="ε: share of flipped labels, sigmoid and robust (default: 0)"
    )
    group.add_argument(
        "--sft-weight", type=float, default=0.0, help="add this times the chosen replies' NLL (RPO; default: 0)"
    )
    group.add_argument(
        "--ref",
        choices=ref.REF_MODES,
        default="precompute",
        help="precompute: score every pair with the reference once, cached beside the data (one model in memory); "
        "online: run the reference during training (under --lora: the base with the adapters off) "
        "(default: precompute)",
    )
    group.add_argument("--ref-ckpt", help="the reference checkpoint (default: the --init checkpoint)")
    group.add_argument(
        "--ref-batch-size", type=int, default=8, help="rows per forward of the precompute pass (default: 8)"
    )


def _add_raw_data_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--system", help="system prompt for pairs whose prompt has none")
    add_packing_arguments(group, "pairs", val_fraction=0.05)


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, Path, DPO, dict[str, Any], str]:
    """Model and training configs, the packed training prefix, the objective, the task record, a summary line."""
    check_values(vars(args), extra=DPO_RULES)  # every number first, before anything is read, packed or written
    settings = DPOSettings(args.beta, args.loss_type, args.label_smoothing, args.sft_weight)
    planned = plan_finetune(args)
    prefix = dpo_data(args, planned.checkpoint, planned.saved)
    files = open_dpo(prefix)
    dataset = open_quietly(lambda: DPODataset(prefix, planned.seq_len, pin_memory=False))
    rows = dataset.n_rows
    cfg, steps, per_step = finish_plan(args, planned, rows)
    reference, record = build_reference(args, planned, cfg, prefix, files)
    inherited = planned.saved.get("task") or {}  # the SFT run's chat settings, for chat and evaluate
    task = {
        **{key: inherited.get(key) for key in ("template", "think_off_prefix", "system") if inherited.get(key)},
        "name": "dpo",
        "beta": settings.beta,
        "loss_type": settings.loss_type,
        "label_smoothing": settings.label_smoothing,
        "sft_weight": settings.sft_weight,
        "reference": record,
        "source": str(args.data),
    }
    pairs = f"{dataset.n_pairs:,} of {dataset.stored_pair_count:,} pairs"
    summary = describe(planned, cfg, prefix, pairs, rows, steps, per_step)
    return planned.config, cfg, prefix, DPO(settings, reference), task, summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, cfg, prefix, objective, task, summary = configure(args)
        logger.info("%s", summary)
        train(config, cfg, prefix, args.val, dataset_factory=dpo_dataset, task=task, objective=objective)

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(main())
