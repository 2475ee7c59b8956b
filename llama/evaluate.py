"""Evaluate a model: perplexity, multiple-choice accuracy by log-likelihood, and the format and loops of its replies.

    python -m llama.evaluate --ckpt out/pretrain --ppl data/corpus.val
    python -m llama.evaluate --ckpt out/pretrain --ppl data/corpus.val --seq-len 256 --batches 50 --json ppl.json
    python -m llama.evaluate --ckpt out/sft --choices ceval_val.jsonl --chat --json ceval.json
    python -m llama.evaluate --ckpt out/sft-think --generate prompts.jsonl --chat --greedy --json replies.json

Perplexity: the token stream is cut into windows of --seq-len predicted tokens, each window starting where
the previous one's targets ended (every token but the first is predicted exactly once, with the context
its window gives it). --batches N evaluates N batches of --batch-size windows spread evenly over the file
instead of all of them; the choice is fixed, so two runs count the same tokens. The dataset must have been
packed with the model's tokenizer. Reported: mean loss per token (nats), exp(loss), tokens counted.

Multiple choice: a .jsonl of ``{"question", "choices", "answer"}`` records (C-Eval style; ``choices`` a list,
or the choices as fields ``"A"``, ``"B"``, … as C-Eval ships them); ``answer`` is a 0-based index or a letter.
Each choice is scored by the summed log-likelihood of its tokens after the question prompt (--prompt-template,
or the question as a ChatML user turn with --chat); the likeliest is the prediction. Also reported: the
accuracy when each choice's log-likelihood is divided by its length in characters (which does not favour
short choices, and does not depend on the tokenizer). Malformed records (not JSON or not UTF-8, no question,
fewer than two choices, two choices of the same text, an answer that names none) are skipped and counted by
reason, the first few logged with their line; more than --max-bad of them fails the run.

Replies (--generate): every prompt of the file (one per line, or a .jsonl of JSON strings or {"prompt": …})
is answered, as a ChatML user turn with --chat (after the system prompt the checkpoint was fine-tuned with, if
any), with the sampling options (seeded by --seed). Reported: the format rate, the share of replies that
are one <think>…</think> block then a non-empty answer (n/a for a checkpoint not trained with the think template,
unless --think-format; n/a without --chat); the repetition rate, the share of replies whose text ends in one unit
of 1-200 characters repeated back to back at least 3 times over at least 32 characters (a model looping on one
phrase until the limit; see llama.generation.quality); and how many replies hit --max-new-tokens. Each reply,
with its verdicts, is in the --json summary. Prompt lines that are not UTF-8, not JSON or empty are skipped,
counted by reason and capped by --max-bad.

The result is printed as one line per task and, with --json, written as a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engine.chat_template import render_text
from engine.cli import run_cli, setup_logging
from engine.dataset.pretrain import document_positions
from engine.format import DatasetError, DatasetPaths, PackedFiles, open_packed, write_json_atomic
from engine.tokenizer import Tokenizer

from .generate import prompt_text
from .generation.generate import generate, require_think_ids, stop_token_ids
from .generation.load import (
    InferenceInfo,
    add_checkpoint_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    load_for_inference,
    sampling_options,
)
from .generation.prompts import invalid_bytes, read_prompts
from .generation.quality import LoopRule, ReplyQuality, ReplyScore, score_reply
from .generation.sampling import SamplingOptions
from .model import Llama

log = logging.getLogger("llama.evaluate")

DEFAULT_PROMPT = "{question}\n答案："
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_MAX_BAD = 0.05
DEFAULT_REPLY_TOKENS = 256


# ---------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    """Mean loss (nats per token) and perplexity over ``tokens`` predicted tokens in ``windows`` windows."""

    dataset: str
    seq_len: int
    windows: int
    tokens: int
    loss: float
    perplexity: float
    doc_masking: bool = False

    def line(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} (loss {self.loss:.4f} nats/token) over {self.tokens:,} tokens in "
            f"{self.windows:,} windows of {self.seq_len} on {self.dataset}"
        )


def window_starts(n_tokens: int, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Start offsets of the windows: ``seq_len`` targets each, back to back (``limit``: that many, spread evenly)."""
    count = (n_tokens - 1) // seq_len
    if count < 1:
        raise ValueError(
            f"the dataset has {n_tokens:,} tokens, too few for one window of {seq_len} + 1: use a shorter --seq-len"
        )
    chosen = np.arange(count) if limit is None or limit >= count else np.linspace(0, count - 1, limit).round()
    return chosen.astype(np.int64) * seq_len


def _open_scored(
    model: Llama, path: str | os.PathLike[str], tokenizer: Tokenizer | None, bin_dtype: str | None
) -> PackedFiles:
    """The packed dataset to score, refused in one line when it does not fit ``model`` or ``tokenizer``."""
    if not bin_dtype and not DatasetPaths.of(path).meta.exists() and Path(path).is_file():
        raise ValueError(
            f"{path} has no {DatasetPaths.of(path).meta.name}: pass --bin-dtype (uint16/uint32) to read a bare "
            ".bin (its ids are checked against the model's vocabulary)"
        )
    try:
        files = open_packed(
            path,
            tokenizer_sha256=None if bin_dtype else (tokenizer.sha256 if tokenizer else None),
            dtype=bin_dtype,
            vocab_size=model.config.vocab_size if bin_dtype else None,
        )
    except DatasetError as e:
        raise ValueError(str(e)) from None
    if files.kind != "pretrain":
        log.warning("%s is a %s dataset: its perplexity counts every token, prompts included", path, files.kind)
    if files.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{path} holds ids up to {files.vocab_size - 1:,}, beyond the model's vocabulary of "
            f"{model.config.vocab_size:,}: it was packed for another model"
        )
    return files


@torch.no_grad()
def _summed_loss(
    model: Llama, tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int, eos_id: int | None
) -> tuple[float, int]:
    """(sum of -log p, targets counted) over the windows at ``starts``; ``eos_id``: mask per document."""
    device = next(model.parameters()).device
    offsets = np.arange(seq_len + 1)
    total_loss, counted = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        # Invariant: total_loss sums -log p over the `counted` targets of the windows done so far.
        for first in range(0, len(starts), batch_size):
            window = np.asarray(tokens[starts[first : first + batch_size, None] + offsets], dtype=np.int64)
            ids = torch.from_numpy(window).to(device)
            extra: dict[str, torch.Tensor] = {}
            if eos_id is not None:
                positions, doc_ids = document_positions(window[:, :-1], int(eos_id))
                extra = {
                    "position_ids": torch.from_numpy(positions).to(device),
                    "doc_ids": torch.from_numpy(doc_ids).to(device),
                }
            loss = model(ids[:, :-1], labels=ids[:, 1:], **extra).loss  # mean over every target of the batch
            n = ids.shape[0] * seq_len
            total_loss += float(loss) * n
            counted += n
    finally:
        model.train(was_training)
    return total_loss, counted


@torch.no_grad()
def perplexity(
    model: Llama,
    path: str | os.PathLike[str],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    batches: int | None = None,
    tokenizer: Tokenizer | None = None,
    doc_masking: bool = False,
    bin_dtype: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the packed dataset ``path`` (see the module docstring).

    ``tokenizer``: refuse a dataset packed with another one. ``doc_masking``: attend only inside each document,
    positions restarting after every EOS (as ``--doc-masking`` training does). ``bin_dtype``: read a bare ``.bin``
    with no meta (uint16 or uint32).
    """
    context = model.config.max_seq_len
    seq_len = seq_len or context
    if not 1 <= seq_len <= context:
        raise ValueError(f"--seq-len must be in 1..{context} (the model's context), got {seq_len}")
    if batch_size < 1 or (batches is not None and batches < 1):
        raise ValueError("--batch-size and --batches must be ≥ 1")
    files = _open_scored(model, path, tokenizer, bin_dtype)
    eos_id = files.meta.get("eos_id")
    if doc_masking and eos_id is None:
        raise ValueError(f"{path} records no eos_id: --doc-masking cannot find its documents")
    starts = window_starts(files.n_tokens, seq_len, None if batches is None else batches * batch_size)
    log.info("perplexity on %s: %d windows of %d tokens in batches of %d", path, len(starts), seq_len, batch_size)
    total_loss, counted = _summed_loss(
        model, files.tokens, starts, seq_len, batch_size, eos_id if doc_masking else None
    )
    mean = total_loss / counted
    return PerplexityResult(str(path), seq_len, len(starts), counted, mean, math.exp(min(mean, 700.0)), doc_masking)


# ---------------------------------------------------------------- multiple choice


@dataclass
class ChoiceRecord:
    """One question: where it came from, its text, its choices and the index of the right one."""

    line: int
    question: str
    choices: list[str]
    answer: int


@dataclass
class ChoiceResult:
    """Accuracy by summed and by per-character log-likelihood; skipped records by reason."""

    file: str
    scored: int
    correct: int
    correct_norm: int
    bad: dict[str, int] = field(default_factory=dict)
    cut_questions: int = 0  # questions cut from the left to fit the context with their longest choice
    predictions: list[int] = field(default_factory=list)  # by summed log-likelihood, one per scored record
    predictions_norm: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.scored if self.scored else 0.0

    @property
    def accuracy_norm(self) -> float:
        return self.correct_norm / self.scored if self.scored else 0.0

    def line(self) -> str:
        bad = sum(self.bad.values())
        skipped = (
            f"; {bad} bad record(s) skipped ({', '.join(f'{k}: {v}' for k, v in sorted(self.bad.items()))})"
            if bad
            else ""
        )
        cut = f"; {self.cut_questions} question(s) cut to fit the context" if self.cut_questions else ""
        return (
            f"multiple choice: accuracy {self.accuracy:.1%} ({self.correct}/{self.scored}), length-normalised "
            f"{self.accuracy_norm:.1%} ({self.correct_norm}/{self.scored}) on {self.file}{skipped}{cut}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "scored": self.scored,
            "accuracy": self.accuracy,
            "accuracy_norm": self.accuracy_norm,
            "correct": self.correct,
            "correct_norm": self.correct_norm,
            "bad": dict(self.bad),
            "bad_total": sum(self.bad.values()),
            "cut_questions": self.cut_questions,
        }


def parse_answer(value: Any, n_choices: int) -> int:
    """The 0-based index ``value`` names: an int index, or a letter ``"A"``/``"b"``…; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        raise ValueError(f"answer {value!r} is neither an index nor a letter")
    if not 0 <= index < n_choices:
        raise ValueError(f"answer {value!r} is outside the {n_choices} choices")
    return index


def _choices_of(record: dict[str, Any]) -> list[str]:
    """The ``choices`` list (or ``{"A": …}`` mapping), or C-Eval's top-level ``A``, ``B``, … fields."""
    choices = record.get("choices")
    if choices is None:
        choices = [record[letter] for letter in LETTERS if letter in record]
    elif isinstance(choices, dict):
        choices = [choices[letter] for letter in LETTERS if letter in choices]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError("needs at least two choices")
    if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) and str(c).strip() for c in choices):
        raise ValueError("every choice must be a non-empty text")
    return [str(c) for c in choices]


def duplicate_choices(choices: list[str]) -> str:
    """Which choices are the same text (a question that cannot be scored: its copies tie), or ``""``."""
    first: dict[str, int] = {}
    for i, choice in enumerate(choices):
        text = choice.strip()
        if text in first:
            return f"choices {LETTERS[first[text]]} and {LETTERS[i]} are the same text {text[:40]!r}"
        first[text] = i
    return ""


def read_choice_records(path: str | Path) -> tuple[list[ChoiceRecord], Counter[str]]:
    """The well-formed records of a jsonl file, and the others counted by reason (logged with their line)."""
    records: list[ChoiceRecord] = []
    bad: Counter[str] = Counter()

    def skip(reason: str, lineno: int, detail: str) -> None:
        bad[reason] += 1
        if bad[reason] <= 3:
            log.warning("%s:%d: skipped (%s): %s", path, lineno, reason, detail)

    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if invalid_bytes(line):
                skip("not_utf8", lineno, f"{invalid_bytes(line)} byte(s) that are not valid UTF-8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skip("not_json", lineno, str(e))
                continue
            if not isinstance(record, dict):
                skip("not_object", lineno, "the line is not a JSON object")
                continue
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                skip("no_question", lineno, "no question text")
                continue
            try:
                choices = _choices_of(record)
            except (ValueError, KeyError) as e:
                skip("bad_choices", lineno, str(e))
                continue
            if duplicate := duplicate_choices(choices):
                skip("duplicate_choices", lineno, duplicate)
                continue
            try:
                answer = parse_answer(record.get("answer"), len(choices))
            except ValueError as e:
                skip("bad_answer", lineno, str(e))
                continue
            records.append(ChoiceRecord(lineno, question, choices, answer))
    return records, bad


def question_prompt(question: str, template: str = DEFAULT_PROMPT, chat: bool = False) -> str:
    """The text each choice continues: ``template`` filled with the question, or a ChatML user turn + reply prompt."""
    if chat:
        return render_text([{"role": "user", "content": question}], add_generation_prompt=True)
    return template.replace("{question}", question)


@torch.no_grad()
def choice_log_likelihoods(model: Llama, context: list[int], choices: list[list[int]]) -> list[float]:
    """``sum log p(choice tokens | context)`` for each choice, teacher-forced, all choices in one batch.

    Rows are ``context + choice``, padded on the right (a causal model's earlier logits ignore what follows); only
    the positions that predict choice tokens go through the output layer.
    """
    longest = max(len(c) for c in choices)
    device = next(model.parameters()).device
    ids = torch.zeros(len(choices), len(context) + longest, dtype=torch.long)
    for row, choice in enumerate(choices):
        ids[row, : len(context) + len(choice)] = torch.tensor(context + choice)
    # the last `longest` inputs are context[-1] and the choice tokens but the last: they predict every choice token
    logits = model(ids[:, :-1].to(device), logits_to_keep=longest).logits.float()
    scores = []
    for row, choice in enumerate(choices):
        log_probs = logits[row, : len(choice)].log_softmax(-1)
        scores.append(float(log_probs.gather(-1, torch.tensor(choice, device=device)[:, None]).sum()))
    return scores


def evaluate_choices(
    model: Llama,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    template: str = DEFAULT_PROMPT,
    chat: bool = False,
    max_bad: float = DEFAULT_MAX_BAD,
) -> ChoiceResult:
    """Multiple-choice accuracy of ``model`` on the jsonl file ``path`` (see the module docstring)."""
    if "{question}" not in template:
        raise ValueError(f"--prompt-template must contain {{question}}, got {template!r}")
    if not 0 <= max_bad <= 1:
        raise ValueError(f"--max-bad is a share of the records, in [0, 1]; got {max_bad}")
    records, bad = read_choice_records(path)
    context_limit = model.config.max_seq_len
    was_training = model.training
    model.eval()
    result = ChoiceResult(str(path), 0, 0, 0)
    try:
        for record in records:
            choice_ids = [tokenizer.encode(choice) for choice in record.choices]
            context = tokenizer.encode(question_prompt(record.question, template, chat))
            room = context_limit + 1 - max(len(c) for c in choice_ids)  # the last choice token is never an input
            if room < 1:
                bad["too_long"] += 1
                log.warning("%s:%d: skipped (too_long): a choice fills the model's context", path, record.line)
                continue
            if len(context) > room:  # keep the end of the question, next to the choices
                context = context[-room:]
                result.cut_questions += 1
            scores = choice_log_likelihoods(model, context, choice_ids)
            normalised = [s / len(c.strip()) for s, c in zip(scores, record.choices)]
            best, best_norm = int(np.argmax(scores)), int(np.argmax(normalised))
            result.predictions.append(best)
            result.predictions_norm.append(best_norm)
            result.scored += 1
            result.correct += best == record.answer
            result.correct_norm += best_norm == record.answer
    finally:
        model.train(was_training)
    result.bad = dict(bad)
    total_bad = sum(bad.values())
    total = total_bad + result.scored
    if total == 0:
        raise ValueError(f"{path} holds no records: expected one JSON object per line with question, choices, answer")
    if total_bad > max_bad * total:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        raise ValueError(
            f"{path}: {total_bad} of {total} records are malformed ({reasons}), more than --max-bad "
            f"{max_bad:.0%}: fix the file or raise --max-bad"
        )
    return result


# ---------------------------------------------------------------- replies: format and loops


@dataclass
class ReplySettings:
    """How --generate makes and judges its replies."""

    options: SamplingOptions = field(default_factory=SamplingOptions)
    num_beams: int = 1
    max_new_tokens: int = DEFAULT_REPLY_TOKENS
    batch_size: int = 8
    chat: bool = False
    system: str | None = None
    check_format: bool = False
    format_note: str = ""  # why the format is not checked
    seed: int = 0
    max_bad: float = DEFAULT_MAX_BAD
    rule: LoopRule = field(default_factory=LoopRule)


def format_check(info: InferenceInfo, chat: bool, force: bool) -> tuple[bool, str]:
    """Whether the think format applies to the replies, and if not, why (the note shown instead of a rate)."""
    if not force and info.task.get("template") != "think":
        return False, "not trained with the think template; --think-format checks it anyway"
    if not chat:
        log.warning("--generate without --chat continues the prompts as text: the think format is not checked")
        return False, "prompts continued as text; add --chat"
    return True, ""


def evaluate_replies(
    model: Llama, tokenizer: Tokenizer, path: str | Path, settings: ReplySettings = ReplySettings()
) -> ReplyQuality:
    """Answer every prompt of ``path``, --batch-size at a time, and judge each reply (see the module docstring)."""
    if not 0 <= settings.max_bad <= 1:
        raise ValueError(f"--max-bad is a share of the lines, in [0, 1]; got {settings.max_bad}")
    found = read_prompts(path)
    found.check(len(found.prompts), settings.max_bad)
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    think_ids = require_think_ids(tokenizer, settings.options.max_think_tokens)
    scores: list[ReplyScore] = []
    size = settings.batch_size
    for index, first in enumerate(range(0, len(found.prompts), size)):
        batch = found.prompts[first : first + size]
        ids = [tokenizer.encode(prompt_text(p, settings.chat, settings.system)) for _, p in batch]
        result = generate(
            model,
            ids,
            settings.max_new_tokens,
            **settings.options.keywords(),
            think_ids=think_ids,
            num_beams=settings.num_beams,
            eos_ids=stops,
            pad_id=pad_id,
            seed=settings.seed + index,
            vocab_limit=tokenizer.vocab_size,
        )
        for (line, prompt), seq, done in zip(batch, result.sequences, result.finished):
            new = seq[:-1] if done else seq
            reply = ReplyScore(line, prompt, tokenizer.decode(new), done, len(new))
            scores.append(score_reply(reply, settings.check_format, settings.rule))
        log.info("replies: %d/%d generated", len(scores), len(found.prompts))
    if skipped := found.describe_skipped():
        log.warning("%s of %s: the first of each kind are logged above", skipped, path)
    return ReplyQuality(str(path), scores, settings.check_format, settings.format_note, dict(found.skipped))


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_checkpoint_arguments(parser)
    task = parser.add_argument_group("perplexity")
    task.add_argument("--ppl", metavar="DATA", help="a packed dataset (data/corpus.val, or its .bin)")
    task.add_argument(
        "--seq-len", type=int, metavar="N", help="predicted tokens per window (default: the model's context)"
    )
    task.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=8,
        help="windows per forward; with --generate, prompts at once (default: %(default)s)",
    )
    task.add_argument(
        "--batches", type=int, metavar="N", help="evaluate this many batches, spread over the file (default: all)"
    )
    task.add_argument(
        "--doc-masking",
        action="store_true",
        help="attend only inside each document, positions restarting after EOS (as training with it)",
    )
    task.add_argument(
        "--bin-dtype",
        choices=("uint16", "uint32"),
        help="read a bare .bin without meta (someone else's) as this token type",
    )
    choice = parser.add_argument_group("multiple choice")
    choice.add_argument("--choices", metavar="JSONL", help="questions {question, choices, answer}, one JSON per line")
    choice.add_argument(
        "--prompt-template",
        metavar="TEXT",
        default=DEFAULT_PROMPT,
        help="text each choice continues, {question} filled in, \\n a newline (default: %(default)r)",
    )
    choice.add_argument(
        "--chat",
        action="store_true",
        help="put the question (--generate: the prompt) in a ChatML user turn, the choices or reply as the "
        "answer (chat models)",
    )
    choice.add_argument(
        "--max-bad",
        type=float,
        metavar="SHARE",
        default=DEFAULT_MAX_BAD,
        help="fail when more than this share of records (--generate: prompt lines) is malformed (default: %(default)s)",
    )
    _add_reply_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the results here as JSON")
    add_runtime_arguments(parser)
    return parser


def _add_reply_arguments(parser: argparse.ArgumentParser) -> None:
    """--generate and its options; the sampling group is the one chat and generate take."""
    replies = parser.add_argument_group("replies: format and repetition")
    replies.add_argument(
        "--generate", metavar="PROMPTS", help="answer each prompt of this file (a line, or a .jsonl {prompt})"
    )
    replies.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"longest reply; one that reaches it is counted as hitting the limit (default: {DEFAULT_REPLY_TOKENS}, "
        "at most half the model's context)",
    )
    replies.add_argument(
        "--think-format",
        action="store_true",
        help="check the <think> format even when the checkpoint does not record the think template (an HF folder)",
    )
    replies.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed (default: %(default)s)")
    add_sampling_arguments(parser)


def _check_reply_arguments(args: argparse.Namespace) -> SamplingOptions:
    """The sampling options, or a one-line ValueError for a value out of range (before the model is loaded)."""
    options = sampling_options(args)
    if args.generate is not None and args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return options


def _reply_settings(
    args: argparse.Namespace, options: SamplingOptions, model: Llama, info: InferenceInfo
) -> ReplySettings:
    """What --generate does, once the model (its context, its training task) is known."""
    context = model.config.max_seq_len
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(DEFAULT_REPLY_TOKENS, context // 2)
    if max_new >= context:
        raise ValueError(
            f"--max-new-tokens {max_new} leaves no room for a prompt in the model's context of {context}: "
            f"ask for at most {context - 1}"
        )
    check, note = format_check(info, args.chat, args.think_format)
    return ReplySettings(
        options=options,
        num_beams=args.num_beams,
        max_new_tokens=max_new,
        batch_size=args.batch_size,
        chat=args.chat,
        system=info.task.get("system") if args.chat else None,
        check_format=check,
        format_note=note,
        seed=args.seed,
        max_bad=args.max_bad,
    )


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.ppl is None and args.choices is None and args.generate is None:
        raise ValueError(
            "nothing to evaluate: give --ppl DATA (perplexity), --choices FILE.jsonl and/or --generate PROMPTS"
        )
    options = _check_reply_arguments(args)
    model, tokenizer, info = load_for_inference(
        args.ckpt, args.tokenizer, args.device, args.dtype, args.kernels, quant=args.quant
    )
    summary: dict[str, Any] = {
        "checkpoint": str(info.path),
        "step": info.saved.get("step"),
        "perplexity": None,
        "choices": None,
        "generation": None,
    }
    if args.ppl is not None:
        ppl = perplexity(
            model,
            args.ppl,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            batches=args.batches,
            tokenizer=tokenizer,
            doc_masking=args.doc_masking,
            bin_dtype=args.bin_dtype,
        )
        summary["perplexity"] = asdict(ppl)
        print(ppl.line(), flush=True)
    if args.choices is not None:
        template = args.prompt_template.replace("\\n", "\n")  # a newline typed in a shell argument
        choices = evaluate_choices(
            model, tokenizer, args.choices, template=template, chat=args.chat, max_bad=args.max_bad
        )
        summary["choices"] = choices.summary()
        print(choices.line(), flush=True)
    if args.generate is not None:
        quality = evaluate_replies(model, tokenizer, args.generate, _reply_settings(args, options, model, info))
        summary["generation"] = quality.summary()
        print(quality.line(), flush=True)
    if args.json:
        write_json_atomic(Path(args.json), summary)
        log.info("wrote %s", args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code: 0, or 2 with a one-line ``error: …`` on stderr."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
