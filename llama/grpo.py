"""GRPO from checkable rewards: ``python -m llama.grpo --init out/sft --prompts q.jsonl --reward contains``.

Each step samples ``--group-size`` G completions for each of P prompts from the model being trained (P·G =
``--batch-size`` × ``--grad-accum``), scores them with the ``--reward`` functions (plain Python, no reward model:
built-ins ``format``, ``exact_match``, ``contains``, ``length:MIN:MAX``, ``repetition``, or ``file.py:function``;
several are summed, ``NAME=WEIGHT``; see :mod:`llama.rewards`), and trains on the group-relative advantages with the
clipped objective (ε, ``--epsilon-high``), token-level normalisation (DAPO; ``--loss-type sequence`` for the
original GRPO), β = 0 by default (``--beta`` > 0 adds the k3 KL to a reference: ``--ref-ckpt``, default ``--init``,
or under ``--lora`` the model with its adapters off); see :mod:`llama.training.grpo` and
:mod:`llama.training.rollouts`.

``--prompts`` is a ``.jsonl`` file, one object per line with a ``prompt`` (or ``text``) and the fields the rewards
read (``answer`` for ``exact_match`` / ``contains``; an optional ``system``), or a text file of one prompt per line.
Prompts are put in the checkpoint's chat template (ChatML, its system prompt) and end at the assistant's turn; ones
that leave no room for ``--max-new-tokens`` within the sequence length, and malformed lines, are skipped and counted
(more than ``--max-bad`` of them fail the run). ``--val-prompts`` are answered greedily at every evaluation and
before training: ``val_reward`` and each function's mean.

Every log step reports ``reward`` and ``reward/NAME`` (with ``reward_std/NAME``), ``reward_std``,
``zero_std_groups`` (groups whose G rewards were all equal: they teach nothing), ``completion_len``, ``truncated``
(completions cut by the token limit), ``clip_ratio``, ``kl`` (β > 0), and the speeds of sampling
(``gen_tokens_per_s``, ``gen_s``) and of the update (``update_tokens_per_s``) apart. The sampling RNG is a function
of counters in the checkpoint, so a killed run resumes exactly. The loop, profiles, LoRA and logging are the other
tasks'.

    python -m llama.grpo --init out/sft --prompts data/math.jsonl --reward exact_match --reward format=0.5
    python -m llama.grpo --init out/sft --prompts data/qa.jsonl --reward my_rewards.py:score --group-size 8 \
        --max-new-tokens 256 --temperature 1.0 --lora
    python -m llama.grpo --init out/sft --prompts data/qa.jsonl --reward contains --beta 0.04 --iterations 2
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from engine.cli import setup_logging
from engine.tokenizer import Tokenizer

from .dpo import load_reference
from .generate import prompt_text
from .generation.generate import stop_token_ids
from .generation.prompts import read_prompts
from .model import LlamaConfig
from .rewards import SPEC_HELP, parse_rewards, score
from .training.cli import run_training
from .training.config import TrainConfig, check_values
from .training.finetune import (
    FINETUNE_RULES,
    Planned,
    add_finetune_arguments,
    companion_record,
    data_tokenizer,
    finish_plan,
    plan_finetune,
    recorded_companion,
)
from .training.grpo import GRPO, LOSS_TYPES, GRPOSettings
from .training.loop import train
from .training.resume import resolve_init
from .training.rollouts import GreedyReward, Prompt, PromptFiles, PromptIndices, Replies, RolloutSource, Sampling

logger = logging.getLogger("llama.grpo")

GRPO_DEFAULTS: dict[str, Any] = {"out_dir": "out/grpo", "lr": 1e-6, "min_lr": 1e-7, "eval_every": 50, "grad_clip": 1.0}
GRPO_RULES: dict[str, dict[str, Any]] = {
    **FINETUNE_RULES,
    "group_size": {"at_least": 2, "float": False},
    "max_new_tokens": {"at_least": 1, "float": False},
    "temperature": {"above": 0},
    "top_p": {"above": 0, "at_most": 1},
    "top_k": {"at_least": 0, "float": False, "help": "(0 = off)"},
    "epsilon": {"above": 0, "below": 1},
    "epsilon_high": {"above": 0},
    "beta": {"at_least": 0},
    "iterations": {"at_least": 1, "float": False},
}


# ---------------------------------------------------------------- prompts


def load_prompts(
    path: str, tokenizer: Tokenizer, task: dict[str, Any], max_prompt_tokens: int, max_bad: float
) -> list[Prompt]:
    """The prompts of ``path`` in the checkpoint's chat template, encoded; malformed lines and prompts longer than
    ``max_prompt_tokens`` skipped and counted, refused when more than ``max_bad`` of the lines are."""
    found = read_prompts(path)
    prompts: list[Prompt] = []
    for (line, text), record in zip(found.prompts, found.records):
        system = record.get("system") if isinstance(record.get("system"), str) else task.get("system")
        ids = tokenizer.encode(prompt_text(text, chat=True, system=system))
        if len(ids) > max_prompt_tokens:
            found.skip("too_long", line, f"{len(ids)} tokens, more than the {max_prompt_tokens} left for the prompt")
            continue
        prompts.append(Prompt(line, text, ids, record))
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompt fits ({found.describe_skipped()}): lower --max-new-tokens")
    found.check(len(prompts), max_bad)
    if skipped := found.describe_skipped():
        logger.warning("%s of %s", skipped, path)
    return prompts


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.grpo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--prompts", required=True, help="prompts: a .jsonl of {'prompt': ..., 'answer': ...} or one prompt per line"
    )
    parser.add_argument("--val-prompts", help="held-out prompts answered greedily at each evaluation (val_reward)")
    parser.add_argument(
        "--init",
        help="the checkpoint to train (usually an SFT run): an --out-dir or a step_N folder (required unless "
        "--out-dir already holds this run's checkpoints, which are resumed)",
    )
    parser.add_argument("--tokenizer", help="the tokenizer to encode prompts with (default: the checkpoint's)")
    parser.add_argument(
        "--max-bad",
        type=float,
        default=0.01,
        help="fail when more than this share of the prompt lines is malformed or too long (default: 0.01)",
    )
    _add_grpo_arguments(parser.add_argument_group("GRPO"))
    add_finetune_arguments(parser, GRPO_DEFAULTS, epochs=1.0)
    return parser


def _add_grpo_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="NAME[=WEIGHT]",
        help=f"a reward, summed with the others: {SPEC_HELP} (repeat the flag for several)",
    )
    group.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt (default: 8)")
    group.add_argument(
        "--max-new-tokens", type=int, help="longest completion (default: 256, at most half the sequence length)"
    )
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, 1 = off (default: 1.0)")
    group.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default: 0)")
    group.add_argument("--epsilon", type=float, default=0.2, help="ε: the clip's lower bound 1 − ε (default: 0.2)")
    group.add_argument(
        "--epsilon-high", type=float, help="the clip's upper bound 1 + ε_high (default: ε; DAPO uses 0.28)"
    )
    group.add_argument("--beta", type=float, default=0.0, help="β: weight of the k3 KL to the reference (default: 0)")
    group.add_argument(
        "--ref-ckpt",
        help="the reference checkpoint when --beta > 0 (default: --init; under --lora: "
        "the model with its adapters off)",
    )
    group.add_argument(
        "--loss-type",
        choices=LOSS_TYPES,
        default="token",
        help="token: mean over every completion token of the step (DAPO); sequence: each completion's mean, then "
        "their mean (GRPO) (default: token)",
    )
    group.add_argument(
        "--no-scale-rewards",
        dest="scale_rewards",
        action="store_false",
        help="advantages r − group mean, not divided by the group's std (Dr. GRPO)",
    )
    group.add_argument(
        "--iterations", type=int, default=1, help="μ: updates per rollout (>1: the clip bounds each) (default: 1)"
    )


def _settings(args: argparse.Namespace) -> GRPOSettings:
    return GRPOSettings(
        group_size=args.group_size,
        epsilon=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        beta=args.beta,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        iterations=args.iterations,
        temperature=args.temperature,
    )


def whole_groups(planned: Planned, group_size: int, accum_given: bool) -> None:
    """Make a step whole groups: ``batch_size × grad_accum`` a multiple of G, raising the planned accumulation when
    it was not given; refused in one line when it was."""
    values = planned.values
    per_step = values["batch_size"] * values["grad_accum"]
    if per_step % group_size == 0:
        return
    if accum_given:
        raise ValueError(
            f"--batch-size {values['batch_size']} x --grad-accum {values['grad_accum']} = {per_step} sequences a step "
            f"is not whole groups of --group-size {group_size}: make it a multiple of {group_size}"
        )
    unit = group_size // math.gcd(values["batch_size"], group_size)
    values["grad_accum"] = math.ceil(values["grad_accum"] / unit) * unit


def reference_model(args: argparse.Namespace, planned: Planned, kernels: str) -> tuple[Any, dict[str, Any] | None]:
    """The reference for β > 0 and its record: a frozen model (``--ref-ckpt``, default ``--init``; a resumed run's
    recorded one), or None under ``--lora`` without ``--ref-ckpt`` (the adapters switched off)."""
    if not args.beta:
        return None, None
    adapters_off = {"adapters_off": True}
    recorded = (planned.saved.get("task") or {}).get("reference") if planned.resuming else None
    if recorded == adapters_off or (recorded is None and args.lora and not args.ref_ckpt):
        return None, adapters_off
    found = recorded_companion(planned, "reference", args.ref_ckpt, "--ref-ckpt", "was trained against the reference")
    if found is None:
        found = resolve_init(args.ref_ckpt) if args.ref_ckpt else (planned.checkpoint, planned.saved)
    return load_reference(*found, kernels), companion_record(*found)


def task_record(
    args: argparse.Namespace,
    settings: GRPOSettings,
    inherited: dict[str, Any],
    max_new: int,
    reference: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the run's checkpoints record of the task: the chat settings it inherits (for chat, evaluate and serve),
    the rewards, the sampling and the objective's settings (compared on resume), the reference."""
    return {
        **{key: inherited.get(key) for key in ("template", "think_off_prefix", "system") if inherited.get(key)},
        "name": "grpo",
        "rewards": args.reward,
        "group_size": settings.group_size,
        "max_new_tokens": max_new,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "epsilon": settings.epsilon,
        "epsilon_high": settings.epsilon_high,
        "beta": settings.beta,
        "loss_type": settings.loss_type,
        "scale_rewards": settings.scale_rewards,
        "iterations": settings.iterations,
        "reference": reference,
        "source": str(args.prompts),
    }


def configure(args: argparse.Namespace) -> tuple[LlamaConfig, TrainConfig, Any, GRPO, dict[str, Any], str]:
    """Model and training configs, the dataset factory (the rollout source), the objective, the task record, and a
    summary line."""
    check_values(vars(args), extra=GRPO_RULES)
    settings = _settings(args)
    rewards = parse_rewards(args.reward)
    planned = plan_finetune(args)
    max_new = args.max_new_tokens or min(256, planned.seq_len // 2)
    if max_new >= planned.seq_len:
        raise ValueError(f"--max-new-tokens {max_new} leaves no room for a prompt in --seq-len {planned.seq_len}")
    tokenizer = data_tokenizer(args, planned.checkpoint, planned.saved)
    inherited = planned.saved.get("task") or {}
    prompts = load_prompts(args.prompts, tokenizer, inherited, planned.seq_len - max_new, args.max_bad)
    whole_groups(planned, settings.group_size, accum_given=args.grad_accum is not None)
    cfg, steps, per_step = finish_plan(args, planned, len(prompts) * settings.group_size)
    reference, ref_record = reference_model(args, planned, cfg.kernels)
    files = PromptFiles(
        Path(args.prompts),
        {"tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.sha256}},
        len(prompts),
        sum(len(p.ids) for p in prompts),
        tokenizer.vocab_size,
    )
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    names = tuple(name for name, _, _ in rewards)
    sampling = Sampling(max_new, args.temperature, args.top_p, args.top_k)
    replies = Replies(
        sampling, partial(score, rewards), names, tokenizer.decode, stop_token_ids(tokenizer), pad_id, files.vocab_size
    )
    val_prompts = None
    if args.val_prompts:
        val_prompts = load_prompts(args.val_prompts, tokenizer, inherited, planned.seq_len - max_new, args.max_bad)
    source = partial(_rollout_source, prompts=(prompts, val_prompts), files=files, settings=settings, replies=replies)
    source = partial(source, reference=reference)
    task = task_record(args, settings, inherited, max_new, ref_record)
    groups = per_step // settings.group_size
    summary = (
        f"GRPO: {'resuming' if planned.resuming else 'training'} {planned.checkpoint} on {len(prompts):,} prompts of "
        f"{args.prompts}; {steps} steps of {groups} prompts x {settings.group_size} completions (up to {max_new} "
        f"tokens, T {args.temperature:g}), micro-batch {cfg.batch_size} x accumulation {cfg.grad_accum}, "
        f"{cfg.precision}; rewards {', '.join(args.reward)}; ε {settings.epsilon:g}/{settings.epsilon_high:g}, "
        f"β {settings.beta:g}, {settings.loss_type}-level loss"
    )
    objective = GRPO(settings, names, GreedyReward(val_prompts, replies) if val_prompts else None)
    return planned.config, cfg, source, objective, task, summary


def _rollout_source(
    path: Path,
    seq_len: int,
    *,
    validation: bool,
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    tokenizer_sha256: str | None,
    prompts: tuple[list[Prompt], list[Prompt] | None],
    files: PromptFiles,
    settings: GRPOSettings,
    replies: Replies,
    reference: Any,
) -> RolloutSource | PromptIndices:
    """The loop's dataset factory: this rank's rollout source, or the validation prompts (all ranks answer all)."""
    if validation:
        return PromptIndices(prompts[1], files)
    return RolloutSource(
        prompts[0],
        files,
        settings,
        replies,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        kl=settings.beta > 0,
        reference=reference,
    )


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, cfg, source, objective, task, summary = configure(args)
        logger.info("%s", summary)
        train(config, cfg, args.prompts, args.val_prompts, dataset_factory=source, task=task, objective=objective)

    return run_training(body)


if __name__ == "__main__":
    raise SystemExit(main())
