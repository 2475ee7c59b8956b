"""The command line every task shares: one ``--flag`` per TrainConfig field, ``--model KEY=VALUE`` overrides,
and the exit codes (0, 2 for a one-line ``error:``, 128 + signal); also ``python -m llama.train``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Callable, Sequence

from engine.format import DatasetPaths, open_packed

from ..model import LlamaConfig
from .config import OPTION_FIELDS, TrainConfig, check_seq_len, check_values
from .errors import TrainingError, TrainingInterrupted
from .loop import train
from .profiles import Plan, Profile, plan, used_plan


def _field_parser(hint: Any) -> tuple[type, bool]:
    """(element type, is_bool) of a TrainConfig annotation such as ``int | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0], bool in args


def parse_resume(text: str) -> bool | str | None:
    lowered = text.lower()
    return {"auto": None, "true": True, "yes": True, "false": False, "no": False}.get(lowered, text)


def add_train_arguments(
    parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None, exclude: Sequence[str] = ()
) -> None:
    """One ``--flag`` per :class:`TrainConfig` field, its help from the field's metadata; ``defaults`` override;
    ``exclude`` names fields a task fixes itself (they keep their default, or ``defaults``'s value)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            parser.set_defaults(**{f.name: (defaults or {}).get(f.name, f.default)})
            continue
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        kind, is_bool = _field_parser(hints[f.name])
        help_text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
        if f.name == "resume":
            parser.add_argument(flag, type=parse_resume, default=default, help=help_text)
        elif is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags give, run options among ``--model`` items (``kernels=torch``) applied."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, **option_overrides(getattr(args, "model", []))})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama.train", description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="packed training corpus (data/corpus or data/corpus.bin)")
    parser.add_argument("--val", help="packed validation corpus (default: the .val beside --train, if any)")
    parser.add_argument("--preset", default="tiny", help="model preset from llama.model.PRESETS (default: tiny)")
    parser.add_argument("--vocab-size", type=int, help="model vocabulary (default: the corpus meta's)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a LlamaConfig field, value as JSON (e.g. dim=64), or a run option "
        "(kernels, checkpointing, dropout); repeatable",
    )
    parser.add_argument("--tokenizer-sha256", help="refuse data packed with a tokenizer of another sha256")
    add_train_arguments(parser)
    return parser


def model_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--model KEY=VALUE`` items naming LlamaConfig fields, values read as JSON (a bare word stays a string)."""
    return {key: value for key, value in _parse_model_items(items).items() if key not in OPTION_FIELDS}


def option_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--model`` items naming run options (``kernels``, ``checkpointing``, ``dropout``), as TrainConfig values."""
    return {OPTION_FIELDS[key]: value for key, value in _parse_model_items(items).items() if key in OPTION_FIELDS}


def _parse_model_items(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)} - set(OPTION_FIELDS)
    if unknown:
        raise ValueError(f"--model: unknown field(s) {', '.join(sorted(unknown))}; see llama.model.LlamaConfig")
    return overrides


def model_config_from_args(args: argparse.Namespace) -> LlamaConfig:
    if not DatasetPaths.of(args.train).meta.exists() and DatasetPaths.of(args.train).bin.is_file():
        raise ValueError(
            f"{args.train} is a bare .bin with no meta: llama.train reads packed datasets; train it with "
            "python -m llama.pretrain --bin FILE --dtype uint16 --vocab-size N"
        )
    vocab_size = open_packed(args.train).vocab_size if args.vocab_size is None else args.vocab_size
    return LlamaConfig.from_preset(args.preset, **{"vocab_size": vocab_size, **model_overrides(args.model)})


def choose_seq_len(requested: int | None, profile: Profile, config: LlamaConfig, whose: str) -> int:
    """``--seq-len`` (checked against the model's context), else the profile's default within that context."""
    if requested is None:
        requested = min(profile.default_seq_len or config.max_seq_len, config.max_seq_len)
    return check_seq_len(requested, config, whose)


def planned_values(
    args: argparse.Namespace, profile: Profile, config: LlamaConfig, seq_len: int
) -> tuple[dict[str, Any], Plan]:
    """TrainConfig values from the arguments, the profile's memory plan filling precision, micro-batch,
    accumulation and activation checkpointing where they were not given (shared by every task CLI); the plan
    returned holds the values used, each one given by hand noted with the profile's own. Out-of-range values given
    (``--batch-size 0``) are refused here, before anything is planned or written."""
    values = {name: getattr(args, name) for name in (f.name for f in dataclasses.fields(TrainConfig))}
    values.update(option_overrides(args.model))  # --model kernels=torch, checkpointing=true, dropout=0.1
    check_values(values)
    chosen = plan(dataclasses.replace(profile, precision=args.precision or profile.precision), config, seq_len)
    values["seq_len"] = seq_len
    values["precision"] = args.precision or chosen.precision
    values["batch_size"] = chosen.micro_batch if args.batch_size is None else args.batch_size
    if args.grad_accum is None:  # a micro-batch given by hand is the whole step unless --grad-accum says otherwise
        values["grad_accum"] = chosen.grad_accum if args.batch_size is None else 1
    if values["activation_checkpointing"] is None:
        values["activation_checkpointing"] = chosen.checkpointing
    return values, used_plan(chosen, values, config, profile)


def run_training(body: Callable[[], object]) -> int:
    """Run ``body`` (configure and train) with the task CLIs' exit codes: 0, 2 (one-line ``error:``), 128 + signal."""
    try:
        body()
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once, without a checkpoint of the current step", file=sys.stderr)
        return 130
    except (TrainingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_from_args(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, print the summary; exit code 0, 2 (error), or 128 + signal when stopped by one."""
    from engine.cli import setup_logging

    setup_logging()

    def body() -> None:
        args = build_parser().parse_args(argv)
        train(model_config_from_args(args), train_config_from_args(args), args.train, args.val, args.tokenizer_sha256)

    return run_training(body)
