"""Chat with a model in the terminal, streaming its replies; or get one answer with --prompt.

    python -m llama.chat --ckpt out/sft                                  # interactive, replies streamed
    python -m llama.chat --ckpt hf/zh-llama --system "你是一个乐于助人的助手。"
    python -m llama.chat --ckpt out/sft --prompt "介绍一下长城" --greedy   # one answer, then exit
    echo "你好" | python -m llama.chat --ckpt out/sft                    # reads stdin when it is piped

The conversation is rendered with the ChatML template the model was fine-tuned on (system turn optional,
then ``<|im_start|>assistant\\n``), and a reply stops at ``<|im_end|>`` or EOS. The history is kept as
messages; when it and ``--max-new-tokens`` no longer fit the context, the oldest turns are dropped, with a
warning. Replies are streamed as they are generated, never showing a broken character: a character split
over byte-fallback pieces is held back until its last byte arrives.

Reasoning models (``llama.sft --template think``, seed 001's format) open a reply with ``<think>…</think>``.
``--think`` (the default) shows it; ``--no-think`` hides it and keeps only the answer in the history, and,
for a checkpoint fine-tuned with the think template, asks the model to skip reasoning (the empty block).

Commands inside the chat: /reset (forget the conversation), /system TEXT (new system prompt, forget the
conversation; /system alone removes it), /help, /exit (or end of input, Ctrl-D).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass
from typing import Sequence, TextIO

from engine.chat_template import IM_START, render_text
from engine.cli import run_cli, setup_logging
from engine.tokenizer import Tokenizer

from .generation.generate import generate, require_think_ids, stop_token_ids
from .generation.load import (
    InferenceInfo,
    add_checkpoint_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    load_for_inference,
    sampling_options,
)
from .generation.prompts import require_utf8, tolerant
from .generation.sampling import SamplingOptions
from .model import Llama

log = logging.getLogger("llama.chat")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that do not (yet) form a character
HELP = (
    "commands: /reset forgets the conversation; /system TEXT sets the system prompt and forgets the "
    "conversation (/system alone removes it); /help; /exit or Ctrl-D quits"
)


class IncrementalDecoder:
    """Text of a growing id list, handed out in pieces that never end in a broken character.

    Each :meth:`push` decodes the ids since the last stable point and returns only what was added, held back
    while the text ends in U+FFFD (a byte-fallback character still missing bytes). Decoding from a recent
    stable point rather than from the start keeps each step short, and gives the same text as decoding every
    id at once: the pieces concatenated (with :meth:`flush`) equal ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_start = 0  # ids[prefix_start:read_start] decode to text already handed out
        self.read_start = 0  # ids from here on have not been handed out

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is now complete ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        # Invariant: decode(ids[:read_start]) has been returned in full, and read_start ends a whole character.
        shown = self.tokenizer.decode(self.ids[self.prefix_start : self.read_start])
        text = self.tokenizer.decode(self.ids[self.prefix_start :])
        if len(text) <= len(shown) or text.endswith(REPLACEMENT):
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """The text still held back (a truly broken byte sequence shows as U+FFFD here, at the end)."""
        shown = self.tokenizer.decode(self.ids[self.prefix_start : self.read_start])
        text = self.tokenizer.decode(self.ids[self.prefix_start :])
        self.prefix_start = self.read_start = len(self.ids)
        return text[len(shown) :]


class ThinkFilter:
    """Streamed reply text with its leading ``<think>…</think>`` block (and the blank lines after it) removed.

    Only a block that opens the reply counts as reasoning (as ``llama.sft --template think`` trains it);
    markers split across pieces are recognised, text that merely starts like ``<think>`` is passed on.
    """

    def __init__(self) -> None:
        self.state = "start"  # start → inside → after → answer; or start → answer when there is no block
        self.pending = ""
        self.unclosed = False  # the reply ended inside its think block

    def feed(self, text: str) -> str:
        """The part of ``text`` to show."""
        if self.state == "answer":
            return text
        self.pending += text
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.pending = "inside", head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head):  # whitespace, or a prefix of the marker: wait for more
                return ""
            else:
                self.state, shown, self.pending = "answer", self.pending, ""
                return shown
        if self.state == "inside":
            end = self.pending.find(THINK_CLOSE)
            if end < 0:  # keep only what could be the start of a split closing marker
                self.pending = self.pending[-(len(THINK_CLOSE) - 1) :]
                return ""
            self.state, self.pending = "after", self.pending[end + len(THINK_CLOSE) :]
        shown = self.pending.lstrip()  # state "after": the blank lines between the block and the answer
        self.pending = ""
        if shown:
            self.state = "answer"
        return shown

    def finish(self) -> str:
        """What is still held at the end of the reply (a lone ``<thi`` that never became a marker)."""
        held, self.pending = (self.pending if self.state == "start" else ""), ""
        self.unclosed = self.state == "inside"
        return held


@dataclass
class ChatOptions:
    """How replies are generated (see ``python -m llama.chat --help``)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_think_tokens: int | None = None
    num_beams: int = 1
    greedy: bool = False
    think: bool = True
    seed: int = 0


class ChatSession:
    """A conversation with a model: the system prompt and the turns as messages, streamed replies written to ``out``.

    ``think_off_prefix``: the reply prefix a ``--template think`` fine-tune was trained to answer directly after
    (``InferenceInfo.think_off_prefix``); with it, past replies without reasoning are rendered after the empty
    block, as in training, and ``think=False`` puts it in the generation prompt.
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        options: ChatOptions,
        system: str | None = None,
        think_off_prefix: str = "",
        out: TextIO | None = None,
    ) -> None:
        context = model.config.max_seq_len
        if not 1 <= options.max_new_tokens < context:
            raise ValueError(
                f"--max-new-tokens must be in 1..{context - 1} (the model's context is {context} "
                f"tokens and the prompt needs some), got {options.max_new_tokens}"
            )
        if options.num_beams < 1:
            raise ValueError(f"--num-beams must be ≥ 1, got {options.num_beams}")
        SamplingOptions(
            not options.greedy,
            options.temperature,
            options.top_k,
            options.top_p,
            options.repetition_penalty,
            options.no_repeat_ngram_size,
            options.max_think_tokens,
        )  # refuses a bad option now, not at the first message
        if tokenizer.token_to_id(IM_START) is None:
            log.warning(
                "tokenizer %s has no %s token: this model was not trained on ChatML chats and will "
                "likely not follow the conversation",
                tokenizer.path,
                IM_START,
            )
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.system = system or None
        self.think_off_prefix = think_off_prefix
        self.out = out if out is not None else sys.stdout
        self.messages: list[dict[str, str]] = []  # user and assistant turns, oldest first
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.think_ids = require_think_ids(tokenizer, options.max_think_tokens)
        self.turns = 0  # replies generated, for a different sampling seed per turn

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None or "" removes it); the conversation starts over."""
        self.system = require_utf8(text, "this system prompt") if text else None
        self.reset()

    def _rendered_reply(self, content: str) -> str:
        """A past reply as the model saw replies in training: after the empty think block for a think fine-tune."""
        if self.think_off_prefix and not content.lstrip().startswith(THINK_OPEN):
            return self.think_off_prefix + content
        return content

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of the conversation plus ``user_text`` and the generation prompt; the oldest turns are
        dropped from the history (with a warning) until it and ``max_new_tokens`` fit the context."""
        room = self.model.config.max_seq_len - self.options.max_new_tokens
        kept = self.messages
        while True:
            turns = [
                {
                    "role": m["role"],
                    "content": self._rendered_reply(m["content"]) if m["role"] == "assistant" else m["content"],
                }
                for m in kept
            ]
            system = [{"role": "system", "content": self.system}] if self.system else []
            text = render_text([*system, *turns, {"role": "user", "content": user_text}], add_generation_prompt=True)
            if not self.options.think:
                text += self.think_off_prefix
            ids = self.tokenizer.encode(text)
            if len(ids) <= room or not kept:
                break
            kept = kept[2:]  # one user turn and its reply
        if len(ids) > room:  # the history stays as it was: the next message may fit with it
            raise ValueError(
                f"this message needs {len(ids)} tokens with the chat template and system prompt, more "
                f"than the {room} the context of {self.model.config.max_seq_len} leaves beside "
                f"--max-new-tokens {self.options.max_new_tokens}: shorten it or lower --max-new-tokens"
            )
        if len(kept) < len(self.messages):
            log.warning(
                "the conversation no longer fit the context of %d tokens with --max-new-tokens %d: "
                "dropped its %d oldest turn(s)",
                self.model.config.max_seq_len,
                self.options.max_new_tokens,
                (len(self.messages) - len(kept)) // 2,
            )
            self.messages = kept
        return ids

    def reply(self, user_text: str) -> str:
        """Answer ``user_text``: stream the reply to ``out``, keep both turns in the history, return what was shown.

        A message the context cannot hold, or one holding bytes that are not UTF-8, is a ValueError that leaves
        the conversation as it was."""
        prompt = self.prompt_ids(require_utf8(user_text, "this message"))
        decoder = IncrementalDecoder(self.tokenizer)
        hide = None if self.options.think else ThinkFilter()
        shown: list[str] = []

        def emit(text: str) -> None:
            if text:
                shown.append(text)
                self.out.write(text)
                self.out.flush()

        def show(text: str) -> None:
            emit(hide.feed(text) if hide is not None and text else text)

        def on_token(row: int, token: int) -> None:
            if token not in self.stop_ids:  # <|im_end|> would decode as text; EOS as nothing
                show(decoder.push(token))

        o = self.options
        sample = not o.greedy and o.num_beams == 1
        result = generate(
            self.model,
            [prompt],
            o.max_new_tokens,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            repetition_penalty=o.repetition_penalty,
            no_repeat_ngram_size=o.no_repeat_ngram_size,
            max_think_tokens=o.max_think_tokens,
            think_ids=self.think_ids,
            do_sample=sample,
            num_beams=o.num_beams,
            eos_ids=self.stop_ids,
            pad_id=self.pad_id,
            stream=on_token,
            seed=o.seed + self.turns,
            vocab_limit=getattr(self.tokenizer, "vocab_size", None),
        )
        show(decoder.flush())
        if hide is not None:
            emit(hide.finish())
            if hide.unclosed:
                log.warning(
                    "the reply ended inside its <think> block, before any answer: raise --max-new-tokens "
                    "or use --think to see the reasoning"
                )
        self.out.write("\n")
        self.out.flush()
        self.turns += 1
        if not result.finished[0]:
            log.info("the reply reached --max-new-tokens %d before the model ended it", o.max_new_tokens)
        answer = "".join(shown)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


def run_repl(session: ChatSession, stdin: TextIO, notices: TextIO) -> None:
    """Read messages and commands from ``stdin`` line by line until /exit or the end of input."""
    interactive = stdin.isatty()
    if interactive:
        notices.write(f"{HELP}\n")
    while True:
        if interactive:
            notices.write(">>> ")
            notices.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits, like Ctrl-D
            notices.write("\n")
            break
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if command in ("/exit", "/quit"):
            break
        try:
            _dispatch(session, command, argument, text, notices)
        except ValueError as e:  # too long for the context, or not UTF-8: say so, keep the conversation
            notices.write(f"error: {e} (the conversation is kept)\n")
        except KeyboardInterrupt:
            session.out.write("\n")
            notices.write("[reply interrupted; it is not kept in the history]\n")
        notices.flush()


def _dispatch(session: ChatSession, command: str, argument: str, text: str, notices: TextIO) -> None:
    """Carry out one line of input: a command, or a message to answer."""
    if command == "/reset":
        session.reset()
        notices.write("[conversation cleared]\n")
    elif command == "/system":
        session.set_system(argument.strip())
        notices.write(f"[system prompt {'set' if session.system else 'removed'}; conversation cleared]\n")
    elif command == "/help":
        notices.write(f"{HELP}\n")
    elif command.startswith("/") and command[1:].isalpha():
        notices.write(f"[unknown command {command}] {HELP}\n")
    else:
        session.reply(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.chat",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", metavar="TEXT", help="answer this one message, print the answer and exit")
    parser.add_argument(
        "--system", metavar="TEXT", help="system prompt (default: the one the checkpoint was fine-tuned with, if any)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        default=None,
        help="longest reply in tokens (default: half the model's context, at most 512)",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--think",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a reasoning model's <think>…</think> block (default); --no-think hides it, keeps "
        "it out of the history, and asks a think-template fine-tune to answer directly",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", default=None, help="sampling seed, for reproducible replies (default: random)"
    )
    add_runtime_arguments(parser)
    return parser


def options_from(args: argparse.Namespace, context: int) -> ChatOptions:
    """The generation options the command line asks for, with defaults that depend on the model."""
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(512, context // 2)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    sampling_options(args)  # a value out of range is refused naming its flag
    if args.num_beams > 1 and not args.greedy:
        log.info("--num-beams %d: beam search is deterministic, sampling options are not used", args.num_beams)
    return ChatOptions(
        max_new_tokens=max_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        max_think_tokens=args.max_think_tokens,
        num_beams=args.num_beams,
        greedy=args.greedy,
        think=args.think,
        seed=seed,
    )


def warn_if_not_chat_tuned(info: InferenceInfo, tokenizer: Tokenizer) -> None:
    """One warning when a checkpoint was trained without conversations (pretraining only): it continues text
    rather than answering. HF folders say nothing about their training and are trusted."""
    if info.kind != "checkpoint" or tokenizer.token_to_id(IM_START) is None:
        return  # no ChatML marker: ChatSession warns about that instead
    objective = info.saved.get("objective") or (info.task or {}).get("name") or "pretrain"
    if objective == "pretrain":
        log.warning(
            "%s was pretrained, never fine-tuned on conversations: it will continue your text rather than "
            "answer it; fine-tune it with python -m llama.sft, or use python -m llama.generate for continuations",
            info.path,
        )


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    model, tokenizer, info = load_for_inference(
        args.ckpt, args.tokenizer, args.device, args.dtype, args.kernels, quant=args.quant
    )
    warn_if_not_chat_tuned(info, tokenizer)
    options = options_from(args, model.config.max_seq_len)
    system = args.system if args.system is not None else info.task.get("system")
    if args.system is None and system:
        log.info("system prompt (the one %s was fine-tuned with; --system replaces it): %s", info.path, system)
    session = ChatSession(
        model, tokenizer, options, system=system, think_off_prefix=info.think_off_prefix, out=sys.stdout
    )
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty: give the message to answer")
        session.reply(require_utf8(args.prompt, "--prompt"))
    else:
        run_repl(session, tolerant(sys.stdin), sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code: 0, or 2 with a one-line ``error: …`` on stderr."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
