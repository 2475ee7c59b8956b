"""Where one training step's GPU time goes: a profiler kernel table per preset, ours vs ``transformers``.

    python bench/profile_step.py --out bench/.results/profile_step.json          # GPU: every preset, ours and hf
    python bench/profile_step.py --preset seed003-92m --batch 8 --seq 512
    python bench/profile_step.py --smoke                                         # CPU: tiny shapes, proves the code

Each case builds :class:`rehearse_6gb.Trainer` (the step ``bench/test_train_step.py`` times), runs two
warm-up steps, then profiles three steps with ``torch.profiler``. It records the ten kernels with the most
device time, the device time per step, the wall time per step, and the *GPU-busy share*: device time over
wall time (well under 1 means the GPU waits on Python or the host). Without CUDA (``--smoke``) the table
holds CPU operators and says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
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
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(BENCH))
from benchlib import environment  # noqa: E402
from rehearse_6gb import StepSpec, Trainer  # noqa: E402

log = logging.getLogger("bench.profile_step")
WARMUP, PROFILED = 2, 3
TOP = 10
#: (preset, micro-batch, sequence length) profiled on a GPU: ~16k tokens per step, as the speed table.
GPU_CASES = (("minimind-26m", 32, 512), ("seed003-92m", 32, 512), ("seed000-160m", 16, 1024))


def _device_us(event: Any) -> float:
    """An event's own device time in µs, under the attribute name this PyTorch uses."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_case(spec: StepSpec, device: torch.device) -> dict[str, Any]:
    """Profile PROFILED steps of ``spec`` after WARMUP: top kernels, device and wall ms per step, GPU-busy share."""
    trainer = Trainer(spec, device)
    try:
        for _ in range(WARMUP):
            trainer.step()
        on_gpu = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(PROFILED):
                trainer.step()
            if on_gpu:
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / PROFILED
    finally:
        trainer.close()
    events = prof.key_averages()
    if on_gpu:
        timed = [(e.key, _device_us(e), e.count) for e in events if _device_us(e) > 0]
    else:
        timed = [(e.key, float(e.self_cpu_time_total), e.count) for e in events if e.self_cpu_time_total > 0]
    timed.sort(key=lambda row: -row[1])
    busy_ms = sum(us for _, us, _ in timed) / 1e3 / PROFILED if on_gpu else None
    return {
        "preset": spec.preset,
        "impl": spec.impl,
        "batch": spec.batch,
        "seq": spec.seq,
        "precision": spec.precision,
        "wall_ms_per_step": round(wall_ms, 3),
        "device_ms_per_step": None if busy_ms is None else round(busy_ms, 3),
        "gpu_busy_share": None if busy_ms is None else round(busy_ms / wall_ms, 3),
        "top": [
            {"name": name[:120], "ms_per_step": round(us / 1e3 / PROFILED, 4), "calls_per_step": count // PROFILED}
            for name, us, count in timed[:TOP]
        ],
        "measures": "CUDA kernels" if on_gpu else "CPU operators (smoke: no GPU speed)",
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per case, ready for bench/RESULTS.md."""
    parts = []
    for r in results:
        busy = (
            ""
            if r["gpu_busy_share"] is None
            else f", device {r['device_ms_per_step']:.2f} ms, GPU busy {r['gpu_busy_share']:.0%}"
        )
        parts += [
            f"#### {r['preset']} {r['impl']} {r['precision']} {r['batch']}×{r['seq']}: wall "
            f"{r['wall_ms_per_step']:.2f} ms/step{busy}",
            "",
            f"| {r['measures']} | ms/step | calls/step |",
            "|---|---|---|",
        ]
        parts += [f"| `{t['name']}` | {t['ms_per_step']:.3f} | {t['calls_per_step']} |" for t in r["top"]]
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/profile_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="one preset (default: the GPU cases, or tiny on --smoke)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (with --preset)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (with --preset)")
    parser.add_argument(
        "--impl",
        nargs="+",
        default=["triton", "hf"],
        choices=["triton", "torch", "hf"],
        help="implementations to profile (default: ours on Triton and transformers)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: proves the code only"
    )
    parser.add_argument("--out", type=Path, help="write the JSON here (and the markdown beside it, .md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        parser.error("no CUDA device: pass --smoke to run the code path on CPU (no speed figures)")
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.preset:
        cases = [(args.preset, args.batch or 8, args.seq or 512)]
    else:
        cases = list(GPU_CASES) if on_gpu else [("minimind-26m", 2, 32)]
    results = []
    for preset, batch, seq in cases:
        for impl in args.impl:
            spec = StepSpec(preset, impl, batch, seq, precision="bf16" if on_gpu else "fp32", smoke=args.smoke)
            log.info("profiling %s %s %d×%d", preset, impl, batch, seq)
            results.append(profile_case(spec, device))
    text = markdown(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"environment": environment(), "runs": results}, indent=2) + "\n", encoding="utf-8"
        )
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
