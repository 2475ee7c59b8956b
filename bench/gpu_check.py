"""The prepared GPU check: every measurement this project still owes a GPU, in one call of about 8 minutes.

    bash bench/gpu_check.sh                     # on the lent machine: the device tool runs it in the repo root
    python bench/gpu_check.py --list            # the plan, anywhere
    python bench/gpu_check.py --budget 480 --out "$OUT"

Stages run in priority order, each a subprocess with its own time box, never longer than what is left
of ``--budget``. At its time box a stage gets SIGINT (pytest then still writes the benchmark results it
finished) and, 20 s later, SIGKILL. Its output goes to ``OUT/stages.log``; ``OUT/gpu_check.json`` is
rewritten after every stage with each stage's status (passed, failed, timed out, not run) and seconds,
so a check cut short (SIGTERM, the device tool's limit) keeps what finished; the benchmark JSON and the
rendered markdown are copied to ``OUT`` as they appear. Exit status 0 when every stage passed, else 1.
Runs on the GPU machine as it is (its Python, PyTorch, Triton and transformers; ``PYTHONPATH=.``, no
install); a missing package skips what needs it, the way the tests and benchmarks skip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / ".results"
GRACE_S = 20.0  # after SIGINT, before SIGKILL
PY = sys.executable


@dataclass
class Stage:
    name: str
    seconds: float  # time box
    argv: list[str]
    why: str
    collects: list[str] = field(default_factory=list)  # files under bench/.results/ this stage writes
    always: bool = False  # runs even when the budget is spent (its box is kept aside for it)


ENVIRONMENT = (
    "import json, torch, triton, numpy; import importlib.util as u; print(json.dumps({"
    "'torch': torch.__version__, 'cuda': torch.version.cuda, 'triton': triton.__version__, "
    "'numpy': numpy.__version__, 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
    "'missing': [m for m in ('transformers', 'liger_kernel', 'pytest_benchmark', 'snownlp', 'opencc') "
    "if u.find_spec(m) is None]}))"
)

PLAN = [
    Stage("environment", 30, [PY, "-c", ENVIRONMENT], "versions, the GPU, which optional packages are missing"),
    Stage(
        "kernel-tests",
        130,
        [
            PY,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/",
            "-m",
            "triton or transformers",
            "-k",
            "not aot",  # ahead-of-time compiling proves nothing more where a GPU compiles
        ],
        "every kernel and HF-interop test on CUDA: fp32/fp16/bf16, CI and large shapes",
    ),
    Stage(
        "cuda-tests",
        30,
        [
            PY,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_model.py::test_bf16_autocast_on_gpu_triton_close_to_torch",
            "tests/test_dataset.py::test_pinned_batches_match_unpinned",
        ],
        "the model and loader tests that run only with CUDA",
    ),
    Stage(
        "profile",
        60,
        [PY, "bench/profile_step.py", "--out", str(RESULTS / "profile_step.json")],
        "a profiler kernel table and the GPU-busy share of one step per preset, ours vs transformers",
        ["profile_step.json", "profile_step.md"],
    ),
    Stage(
        "train-steps",
        150,
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_train_step.py", "--benchmark-only"],
        "training step per preset, ours vs transformers (+ the 6 GiB rehearsal)",
        ["train.json"],
    ),
    Stage(
        "kernel-bench",
        120,
        [
            *(PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("bench/test_kernels.py", "bench/test_distill_step.py", "--benchmark-only"),
        ],
        "each kernel vs eager, torch.compile, SDPA and Liger-Kernel; the fused distillation loss vs eager",
        ["kernels.json"],
    ),
    Stage(
        "quant",
        120,
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_quant.py", "--benchmark-only"],
        "weight-only int8/int4 against fp32 (the Triton dequantising kernels): perplexity, bytes, decode tokens/s",
        ["quant.json"],
    ),
    Stage(
        "finetune-steps",
        120,
        [
            PY,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "bench/test_lora_step.py",
            "bench/test_dpo_step.py",
            "bench/test_grpo_step.py",
            "--benchmark-only",
        ],
        "a LoRA step (ours vs PEFT vs full), a DPO step and a GRPO step's sampling and update (ours vs TRL, when its "
        "wheel is in bench/.wheels)",
        ["finetune.json"],
    ),
    Stage(
        "flash-tiles",
        90,
        [PY, "bench/tune_flash.py", "--docs", "--out", str(RESULTS / "flash_tiles.json")],
        "every candidate flash-attention tile timed at the presets' shapes: where the default table should change",
        ["flash_tiles.json", "flash_tiles.md"],
    ),
    Stage(
        "report",
        30,
        [PY, "bench/report.py", "--out", str(RESULTS / "report.md")],
        "the RESULTS.md sections of everything measured",
        ["report.md"],
        always=True,
    ),
]


_running: subprocess.Popen | None = None  # the stage in flight, for the signal handler


def _interrupt(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT to the stage's whole process group (pytest then writes what it finished), SIGKILL after ``grace``."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def run_stage(stage: Stage, seconds: float, log) -> dict[str, Any]:
    """Run one stage for at most ``seconds``: SIGINT at the time box, SIGKILL GRACE_S later."""
    global _running
    start = time.monotonic()
    log.write(f"\n===== {stage.name} ({seconds:.0f} s box): {' '.join(stage.argv)}\n")
    log.flush()
    proc = _running = subprocess.Popen(
        stage.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    status = "passed"
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        status = "timed out"
        _interrupt(proc, GRACE_S)
    finally:
        _running = None
    if status == "passed" and proc.returncode != 0:
        status = "failed"
    return {
        "stage": stage.name,
        "status": status,
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "why": stage.why,
    }


def _collect(stage: Stage, out: Path) -> None:
    for name in stage.collects:
        if (RESULTS / name).is_file():
            shutil.copy2(RESULTS / name, out / name)


def run_check(plan: list[Stage], budget: float, out: Path) -> dict[str, Any]:
    """Every stage in order within ``budget`` seconds; the summary is rewritten to out/gpu_check.json after each."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "budget_s": budget,
        "commit": os.environ.get("ZHLLM_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "stages": [{"stage": s.name, "status": "not run", "why": s.why} for s in plan],
    }
    reserve = sum(s.seconds for s in plan if s.always)
    deadline = time.monotonic() + budget

    def write() -> None:
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    def stop(signum: int, _frame: Any) -> None:  # the caller's limit: keep what finished, then go
        summary["interrupted"] = signal.Signals(signum).name
        if _running is not None:
            _interrupt(_running, 5.0)
        write()
        raise SystemExit(1)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    write()
    try:
        with open(out / "stages.log", "a", encoding="utf-8") as log:
            for i, stage in enumerate(plan):
                left = stage.seconds if stage.always else deadline - reserve - time.monotonic()
                if left < 5:
                    summary["stages"][i]["status"] = "not run (budget spent)"
                    continue
                summary["stages"][i] = run_stage(stage, min(stage.seconds, left), log)
                _collect(stage, out)
                write()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    summary["ok"] = all(s["status"] == "passed" for s in summary["stages"])
    write()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages together (default 480)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or RESULTS / "gpu_check"),
        help="where the summary, the log and the results go (default $OUT, else bench/.results/gpu_check)",
    )
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (names from --list)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    plan = [s for s in PLAN if not args.only or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in PLAN}
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; --list shows them")
    if args.list:
        for s in plan:
            print(f"{s.name:13} {s.seconds:4.0f} s  {s.why}")
        return 0
    summary = run_check(plan, args.budget, args.out)
    for s in summary["stages"]:
        print(f"{s['stage']:13} {s['status']:22} {s.get('seconds', 0):6.1f} s")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
