"""Every Triton kernel in zhkernels/ compiles for real GPUs (sm_86, sm_90) at the ops' launch configurations.

The interpreter tests cannot see non-power-of-two blocks, shared-memory overflow or unsupported ops; this
runs ``python -m zhkernels.aot_check --quick`` in a subprocess without ``TRITON_INTERPRET`` (Triton's bundled
ptxas, no GPU needed) and checks that its report names every ``@triton.jit`` function found in ``zhkernels/``.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import zhkernels
from zhkernels import _dispatch

REPO = Path(__file__).resolve().parents[1]


def _toolchain_problem() -> str | None:
    if not _dispatch.HAS_TRITON:
        return "triton is not installed"
    from zhkernels.aot_check import toolchain_problem

    return toolchain_problem()


pytestmark = pytest.mark.skipif(
    _toolchain_problem() is not None, reason=f"no ahead-of-time CUDA compile here: {_toolchain_problem()}"
)


def _jit_functions() -> set[str]:
    """``zhkernels.<module>.<name>`` of every @triton.jit object in zhkernels/ (interpreter functions here)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    found = set()
    for info in pkgutil.iter_modules(zhkernels.__path__):
        module = importlib.import_module(f"zhkernels.{info.name}")
        for name, obj in vars(module).items():
            fn = obj
            while hasattr(fn, "fn"):
                fn = fn.fn
            if (
                isinstance(obj, (KernelInterface, InterpretedFunction))
                and getattr(fn, "__module__", "") == module.__name__
            ):
                found.add(f"{module.__name__}.{name}")
    return found


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "zhkernels.aot_check", *args, "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> dict:
    proc, out = _run(tmp_path_factory.mktemp("aot"), "--arch", "86", "90", "--quick", "--jobs", "2")
    assert proc.returncode == 0, f"aot_check failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm86_and_sm90(quick_report):
    assert quick_report["ok"] and quick_report["problems"] == []
    assert quick_report["archs"] == [86, 90]
    results = quick_report["results"]
    assert results and all(r["ok"] and r["error"] == "" for r in results)
    for r in results:
        assert r["registers"] and 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] is not None and r["shared_bytes"] <= r["shared_limit"], r
    assert {(r["kernel"], r["arch"]) for r in results} == {(k, a) for k in quick_report["kernels"] for a in (86, 90)}


def test_report_lists_every_jit_function_in_kernels(quick_report):
    found = _jit_functions()
    assert len(found) >= 10  # rms_norm 2, rope 1 (+1 helper), swiglu 2, flash_attention 4 (+1 helper), cross_entropy 1
    listed = set(quick_report["kernels"]) | set(quick_report["helpers"])
    assert found == listed, f"not checked ahead of time: {sorted(found - listed)}; unknown: {sorted(listed - found)}"
    for name, entry in quick_report["kernels"].items():
        assert entry["compiles"] >= 2 and entry["failed"] == 0, (name, entry)  # at least one per architecture
    for name, entry in quick_report["helpers"].items():  # device functions are compiled inside their callers
        assert entry["called_from"] and set(entry["called_from"]) <= set(quick_report["kernels"]), name


def test_refuses_to_run_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "zhkernels.aot_check", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRITON_INTERPRET" in lines[0]


_BROKEN_CHECK = """
import json
from zhkernels import aot_check

def broken_swiglu(arch, quick):  # a block that is not a power of two: the interpreter runs it, a GPU compile must not
    cases = aot_check._swiglu_cases(arch, quick)
    for case in cases:
        case.args["BLOCK"] = 1000
    return cases

aot_check.CASE_BUILDERS = (broken_swiglu,)  # and every other kernel is left without a configuration
report = aot_check.run_check([86], quick=True, jobs=1, only="swiglu_forward")
print(json.dumps(report["problems"]))
"""


def _json_from_compiling(code: str) -> Any:
    """Run ``code`` in a subprocess without TRITON_INTERPRET (so kernels compile for GPUs); its last line, as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_compile_error_and_an_unchecked_kernel_fail_the_check():
    problems = _json_from_compiling(_BROKEN_CHECK)
    failed = [p for p in problems if "compile failed" in p]
    assert len(failed) == 1 and "_swiglu_forward_kernel sm_86" in failed[0] and "power of 2" in failed[0], problems
    assert any("_flash_forward_kernel: a @triton.jit function with no launch configuration" in p for p in problems)


def test_int_specialization_fallback_matches_triton():
    """The written-out launcher rules (used when Triton has no native_specialize_impl) agree with Triton's own."""
    native = pytest.importorskip("triton._C.libtriton").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend

    from zhkernels.aot_check import _int_specialization

    for value in (0, 1, 2, 16, 17, -16, -100, 2**31 - 1, 2**31, 2**31 + 16, 2**63, True, False):
        for specialize in (True, False):
            for align in (True, False):
                expected = tuple(native(BaseBackend, value, False, specialize, align))
                assert _int_specialization(value, specialize, align) == expected, (value, specialize, align)


_VECTOR_WIDTHS = """
import json, re
from zhkernels import aot_check
widths = {}
for case in aot_check._swiglu_cases(86, quick=False):
    if case.label.startswith("bf16 ffn=1668"):
        found = re.findall(r"(?:ld|st)\\.global[.a-z0-9]*", aot_check.ptx(case, 86))
        widths[case.kernel + " " + case.label] = sorted(set(found))
print(json.dumps(widths))
"""


def test_swiglu_at_an_odd_width_gets_16_byte_accesses():
    """ffn 1668 is not a multiple of 16: by rows every access is a scalar 2-byte one; the flat path (what the
    model's contiguous inputs take) gets 16-byte vector loads and stores. Read from the PTX, no GPU needed."""
    widths = _json_from_compiling(_VECTOR_WIDTHS)
    for kernel in ("_swiglu_forward_kernel", "_swiglu_backward_kernel"):
        assert widths[f"{kernel} bf16 ffn=1668 flat"] == ["ld.global.v4.b32", "st.global.v4.b32"], widths
        assert widths[f"{kernel} bf16 ffn=1668 rows"] == ["ld.global.b16", "st.global.b16"], widths


_CE_WIDTHS = """
import json, re
from zhkernels import aot_check
(case,) = [c for c in aot_check._cross_entropy_cases(86, quick=True)]
print(json.dumps(sorted(set(re.findall(r"(?:ld|st)\\.global[.a-z0-9]*", aot_check.ptx(case, 86))))))
"""


def test_cross_entropy_rows_at_an_odd_vocabulary_get_16_byte_accesses():
    """V = 35,023: the logits buffer's padded row stride lets the kernel read and write rows in 16-byte vectors."""
    accesses = _json_from_compiling(_CE_WIDTHS)
    assert "ld.global.v4.b32" in accesses and "st.global.v4.b32" in accesses, accesses
