"""Which flash-attention tile wins where: every candidate tile timed at the presets' attention shapes.

    python bench/tune_flash.py --out bench/.results/flash_tiles.json      # GPU: bf16, every preset shape
    python bench/tune_flash.py --dtype bf16 fp16 --docs                   # also fp16, and packed rows
    python bench/tune_flash.py --smoke                                    # CPU interpreter, tiny shape

For each attention shape of ``kernel_shapes.SHAPES`` it runs one forward + backward of
``zhkernels.flash_attention`` with the autotuner on (``zhkernels.flash_attention.AUTOTUNE``): the first
call of each shape class times every candidate tile of this GPU's table with ``triton.testing.do_bench``
(median ms, L2 flushed) and the op records them in ``TUNING_LOG``. The JSON keeps every timing; the
markdown beside it gives per pass and shape the default tile, the fastest, and default ÷ fastest (above 1:
the default table should change there). The results are rewritten after every shape, so a run cut short
keeps what it finished. ``--smoke`` runs the same code in Triton's interpreter on one tiny shape, timing
with the host clock: it proves the script, not any tile.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH.parent) not in sys.path:
    sys.path.insert(0, str(BENCH.parent))
if "--smoke" in sys.argv:  # before the kernels are imported: triton.jit reads it when they are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(BENCH))
from benchlib import environment  # noqa: E402
from kernel_shapes import SHAPES, SMOKE_SHAPES, KernelShape  # noqa: E402

log = logging.getLogger("bench.tune_flash")
fa = importlib.import_module("zhkernels.flash_attention")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_shape(shape: KernelShape, dtype: torch.dtype, docs: bool, device: torch.device) -> None:
    """One forward + backward at ``shape`` (packed into 4 documents per row with ``docs``): tunes both passes."""
    d = shape.dims
    q = torch.randn(d["batch"], d["seq"], d["heads"], d["head_dim"], device=device, dtype=dtype).transpose(1, 2)
    k, v = (
        torch.randn(d["batch"], d["seq"], d["kv_heads"], d["head_dim"], device=device, dtype=dtype).transpose(1, 2)
        for _ in range(2)
    )
    for t in (q, k, v):
        t.requires_grad_()
    bounds = None
    if docs:
        doc_ids = torch.arange(d["seq"], device=device).mul(4).div(d["seq"], rounding_mode="floor")
        bounds = fa.reference.doc_bounds(doc_ids.expand(d["batch"], -1))
    out = fa.flash_attention(q, k, v, causal=True, doc_bounds=bounds)
    out.backward(torch.randn_like(out))


def summarize(log_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (pass, shape class): the default tile's and the fastest tile's ms, and default ÷ fastest."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in log_rows:
        key = (r["pass"], r["arch"], r["dtype"], r["head_dim_tile"], r["causal"], r["docs"], r["seq_bucket"])
        groups.setdefault(key, []).append(r)
    out = []
    for (kind, arch, dtype, block_d, causal, docs, bucket), rows in groups.items():
        default = tuple(fa.candidates(kind, block_d, getattr(torch, dtype), arch)[0])
        by_tile = {tuple(r["tile"]): r["ms"] for r in rows}
        fastest = min(by_tile, key=by_tile.get)
        out.append(
            {
                "pass": kind,
                "arch": arch,
                "dtype": dtype,
                "head_dim_tile": block_d,
                "causal": causal,
                "docs": docs,
                "seq_bucket": bucket,
                "shape": rows[0]["shape"],
                "default": list(default),
                "default_ms": by_tile.get(default),
                "fastest": list(fastest),
                "fastest_ms": by_tile[fastest],
                "default_over_fastest": by_tile[default] / by_tile[fastest] if default in by_tile else None,
                "timed": {"x".join(map(str, t)): ms for t, ms in by_tile.items()},
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"Flash-attention tiles on {result['device']} ({env['date']}, commit {env['commit']}"
        + (", **smoke: CPU interpreter, host clock, no GPU figure**" if result["smoke"] else "")
        + ")",
        "",
        "Tile = resident × streamed × warps × stages. *default ÷ fastest* above 1 means the table's default "
        "is not the fastest candidate at that shape.",
        "",
        "| pass | shape [B, H, T, D] | dtype | docs | default | ms | fastest | ms | default ÷ fastest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        ratio = f"{s['default_over_fastest']:.2f}" if s["default_over_fastest"] else "–"
        default_ms = f"{s['default_ms']:.3f}" if s["default_ms"] is not None else "–"
        lines.append(
            f"| {s['pass']} | {s['shape']} | {s['dtype']} | {'yes' if s['docs'] else 'no'} | "
            f"{'x'.join(map(str, s['default']))} | {default_ms} | {'x'.join(map(str, s['fastest']))} | "
            f"{s['fastest_ms']:.3f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    result["summary"] = summarize(result["timings"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH / ".results" / "flash_tiles.json",
        help="JSON file (the markdown table goes beside it, .md); default bench/.results/flash_tiles.json",
    )
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"], help="dtypes (default bf16)")
    parser.add_argument("--docs", action="store_true", help="also time packed rows (document masking)")
    parser.add_argument("--smoke", action="store_true", help="CPU: Triton's interpreter, one tiny shape, host clock")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.smoke and not torch.cuda.is_available():
        print("error: tune_flash needs a CUDA GPU (or --smoke to prove the script on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    fa.AUTOTUNE = True
    if args.smoke:
        fa.INTERPRET_BLOCKS = None  # the GPU tables' tiles, as the autotuner would try them

        def host_clock_ms(fn: Any) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        fa._time_ms = host_clock_ms
    shapes = SMOKE_SHAPES["flash_attention"] if args.smoke else SHAPES["flash_attention"]
    result: dict[str, Any] = {
        "environment": environment(),
        "smoke": args.smoke,
        "timings": fa.TUNING_LOG,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for shape in shapes:
        for name in args.dtype:
            for docs in (False, True) if args.docs else (False,):
                log.info("%s %s%s", shape.label, name, " docs" if docs else "")
                run_shape(shape, DTYPES[name], docs, device)
                write(result, args.out)
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
