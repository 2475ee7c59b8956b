"""Serve a model over the OpenAI HTTP API (chat and text completions, streamed or whole), with a web chat page.

    python -m llama.serve --ckpt out/sft --port 8000
    python -m llama.serve --ckpt hf/zh-llama --host 0.0.0.0 --served-model-name zh-llama
    python -m llama.serve --ckpt out/sft --max-batch-size 1 --batch-window-ms 0      # one request at a time

Any OpenAI client then talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (max_tokens, temperature (0 =
greedy), top_p, stop, seed, n, stream, stream_options.include_usage; vLLM's top_k and repetition_penalty as extra
fields), GET /health, GET /stats (batching counters), and the chat page at http://HOST:PORT/. Chats are rendered
with the ChatML template the model was fine-tuned on, after its fine-tuning system prompt when the request has
none. A --template think fine-tune answers with reasoning_content (its <think> block) beside content; a request
switches thinking off with chat_template_kwargs={"enable_thinking": false} (as vLLM and SGLang take it for Qwen3)
or a top-level enable_thinking=false. Errors come back in OpenAI's shape with a 4xx status for bad requests.

Concurrent requests with the same sampling settings are generated together: the first waits --batch-window-ms
for others, up to --max-batch-size rows (a request with n choices is n rows). There is no authentication: bind
to 127.0.0.1 (the default) unless the network is yours.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from engine.cli import run_cli, setup_logging

from .generation.load import add_checkpoint_arguments, add_runtime_arguments, load_for_inference

log = logging.getLogger("llama.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.serve",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model id clients pass as model= (default: the checkpoint folder's name)",
    )
    parser.add_argument(
        "--system",
        metavar="TEXT",
        help="system prompt for chats that bring none (default: the one the checkpoint was fine-tuned with)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        default=256,
        help="reply length when a request sets no max_tokens, cut to the room the context leaves "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        metavar="ROWS",
        default=16,
        help="most rows generated together (a request with n choices is n rows; default: %(default)s)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        metavar="MS",
        default=15.0,
        help="how long a request waits for others to batch with; 0 = none (default: %(default)s)",
    )
    add_runtime_arguments(parser)
    return parser


def model_name(args: argparse.Namespace, loaded_from: Path) -> str:
    """``--served-model-name``, or the run's folder name (``out/sft/step_100`` → ``sft``)."""
    if args.served_model_name:
        return args.served_model_name
    path = Path(args.ckpt).resolve()
    return path.parent.name if path.name.startswith("step_") else path.name or loaded_from.name


def check_arguments(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be ≥ 1, got {args.max_tokens}")
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be ≥ 1, got {args.max_batch_size}")
    if args.batch_window_ms < 0:
        raise ValueError(f"--batch-window-ms must be ≥ 0, got {args.batch_window_ms:g}")


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_arguments(args)
    import uvicorn

    from .serving.app import ServedModel, create_app
    from .serving.batcher import Batcher

    model, tokenizer, info = load_for_inference(
        args.ckpt, args.tokenizer, args.device, args.dtype, args.kernels, quant=args.quant
    )
    served = ServedModel.from_checkpoint(model_name(args, info.path), tokenizer, info, args.max_tokens, args.system)
    batcher = Batcher(model, tokenizer, window_s=args.batch_window_ms / 1000, max_rows=args.max_batch_size)
    log.info(
        "serving %s as %r at http://%s:%d/v1 (chat page: http://%s:%d/)%s",
        info.describe(),
        served.name,
        args.host,
        args.port,
        args.host,
        args.port,
        "; reasoning model: <think> becomes reasoning_content" if served.reasoning else "",
    )
    uvicorn.run(create_app(served, batcher), host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code: 0, or 2 with a one-line ``error: …`` on stderr."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
