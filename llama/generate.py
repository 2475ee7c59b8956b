"""Complete every prompt of a file with a model and write the completions as JSON lines.

    python -m llama.generate --ckpt out/run --prompts prompts.txt --out completions.jsonl
    python -m llama.generate --ckpt out/sft --prompts questions.jsonl --chat --greedy --max-new-tokens 256
    python -m llama.generate --ckpt hf/zh-llama --prompts prompts.txt          # completions on stdout

--prompts: one prompt per non-blank line, or a ``.jsonl`` file of JSON strings or ``{"prompt": …}`` objects.
Each prompt is continued as text, or with --chat answered as a ChatML user turn (after --system, if given).
Each output line is ``{"line": N, "prompt": …, "completion": …, "finished": true|false, "new_tokens": K}``:
``line`` is the prompt's line in the file, ``finished`` whether the model ended the text itself before
--max-new-tokens. Lines that are not UTF-8, not the JSON expected, or empty are skipped, counted by reason
and reported at the end; nothing is dropped without a word. Prompts are generated --batch-size at a time;
with the same --seed and --batch-size a sampled run is reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from tqdm import tqdm

from engine.chat_template import render_text
from engine.cli import run_cli, setup_logging
from engine.tokenizer import Tokenizer

from .generation.generate import generate, require_think_ids, stop_token_ids
from .generation.load import (
    add_checkpoint_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    load_for_inference,
    sampling_options,
)
from .generation.prompts import read_prompts
from .generation.sampling import SamplingOptions
from .model import Llama

log = logging.getLogger("llama.generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.generate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line (or a .jsonl file)")
    parser.add_argument("--out", metavar="FILE", help="write the completions here (default: stdout)")
    parser.add_argument("--chat", action="store_true", help="answer each prompt as a ChatML user turn")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system prompt before each question")
    parser.add_argument(
        "--max-new-tokens", type=int, metavar="N", default=128, help="longest completion (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, metavar="N", default=8, help="prompts at once (default: 8)")
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed (default: %(default)s)")
    add_sampling_arguments(parser)
    add_runtime_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> SamplingOptions:
    """The sampling options, or a one-line ValueError for a value out of range (before the model is loaded)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.system and not args.chat:
        raise ValueError("--system is used only with --chat: add --chat, or drop --system")
    return sampling_options(args)


def prompt_text(prompt: str, chat: bool, system: str | None) -> str:
    """What the model continues: the prompt itself, or with ``chat`` the ChatML turns ending in the reply's start."""
    if not chat:
        return prompt
    turns = [{"role": "system", "content": system}] if system else []
    return render_text([*turns, {"role": "user", "content": prompt}], add_generation_prompt=True)


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def complete(
    model: Llama,
    tokenizer: Tokenizer,
    prompts: list[tuple[int, str]],
    args: argparse.Namespace,
    options: SamplingOptions,
    out: TextIO,
) -> int:
    """Generate for ``(line, prompt)`` pairs batch by batch, writing one JSON line each; returns how many."""
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    think_ids = require_think_ids(tokenizer, options.max_think_tokens)
    written = 0
    with tqdm(total=len(prompts), unit="prompt", desc="generate", disable=None) as bar:
        for index, batch in enumerate(batches(prompts, args.batch_size)):
            ids = [tokenizer.encode(prompt_text(p, args.chat, args.system)) for _, p in batch]
            result = generate(
                model,
                ids,
                args.max_new_tokens,
                **options.keywords(),
                think_ids=think_ids,
                num_beams=args.num_beams,
                eos_ids=stops,
                pad_id=pad_id,
                seed=args.seed + index,
                vocab_limit=tokenizer.vocab_size,
            )
            for (line, prompt), seq, done in zip(batch, result.sequences, result.finished):
                new = seq[:-1] if done else seq
                record = {"line": line, "prompt": prompt, "completion": tokenizer.decode(new)}
                out.write(json.dumps({**record, "finished": done, "new_tokens": len(new)}, ensure_ascii=False) + "\n")
            out.flush()
            written += len(batch)
            bar.update(len(batch))
    return written


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    options = check_arguments(args)
    if args.out and Path(args.out).resolve() == Path(args.prompts).resolve():
        raise ValueError(f"--out {args.out} is the --prompts file: it would be overwritten; write elsewhere")
    found = read_prompts(args.prompts)
    model, tokenizer, _ = load_for_inference(
        args.ckpt, args.tokenizer, args.device, args.dtype, args.kernels, quant=args.quant
    )
    if args.max_new_tokens >= model.config.max_seq_len:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{model.config.max_seq_len}: ask for at most {model.config.max_seq_len - 1}"
        )
    with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as out:
        written = complete(model, tokenizer, found.prompts, args, options, out)
    log.info("%d completion(s) written to %s", written, args.out or "stdout")
    if skipped := found.describe_skipped():
        log.warning("%s of %s: the first of each kind are logged above", skipped, args.prompts)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code: 0, or 2 with a one-line ``error: …`` on stderr."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
