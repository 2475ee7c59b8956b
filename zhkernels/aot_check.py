"""Compile every Triton kernel in ``zhkernels/`` ahead of time for real GPUs, with no GPU: what the interpreter misses.

Triton's CPU interpreter runs any block size, any amount of shared memory and any register count; a real
compile rejects or spills them. This CLI compiles each kernel for the chosen CUDA architectures (Triton's
bundled ``ptxas``) at the launch configurations the ops themselves pick (their block-size helpers,
``num_warps``, ``num_stages``, constexpr flags, dtypes) for our presets' shapes, and reports registers,
spills and shared memory per kernel × configuration::

    python -m zhkernels.aot_check                          # sm_80, 86, 89, 90; every configuration
    python -m zhkernels.aot_check --arch 86 90 --quick --json aot.json

Exit status 1 when a compile fails, shared memory exceeds the architecture's per-block limit, or a
``@triton.jit`` function in ``zhkernels/`` has no launch configuration here (and with ``--fail-on-spills``,
when ptxas spills); 2 when the check cannot run (no Triton, no ptxas, or ``TRITON_INTERPRET=1``, under
which the kernels are interpreter functions that cannot be compiled). Pointers are taken as 16-byte
aligned, as PyTorch allocates them; integer arguments are specialised as Triton's launcher does (1 becomes
a constant, multiples of 16 are marked divisible), so each shape compiles exactly what a launch would.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

from . import _dispatch

log = logging.getLogger("zhkernels.aot_check")

#: Largest dynamic shared memory one block may use (opt-in), bytes: A100, RTX 30xx/40xx, H100.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: SM count of one card per architecture (A100, RTX 3060, RTX 4090, H100): rms_norm's backward splits rows by it.
SM_COUNT = {80: 108, 86: 28, 89: 128, 90: 132}
DTYPES = ("fp16", "bf16", "fp32")
TOKENS = 16384  # rows of one training micro-step (batch × context of the presets)

# Shapes from the presets in DESIGN.md (seed000-160m, seed002-120m, seed003-92m, minimind-26m) plus the ops' limits.
HIDDEN = (512, 768, 896, 1668, 4096)  # rms_norm widths; 1668 (seed003's ffn) is no multiple of 16; 4096 Llama-7B
FFN = (1408, 1668, 2048, 2560)  # swiglu widths
ATTENTION = ((8, 2, 64, 512), (8, 8, 96, 512), (14, 2, 64, 1024), (8, 8, 64, 512), (32, 8, 128, 2048))  # Hq, Hk, D, T
VOCAB = (6400, 10000, 35023, 65536, 151936)

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of this Triton dtype (``fp16``, ``bf16``, ``fp32``, ``i32``, ``i64``)."""

    dtype: str


@dataclass
class Case:
    """One launch of one kernel as an op makes it: argument values by name and the launch options."""

    module: str
    kernel: str
    label: str
    args: dict[str, Any]
    num_warps: int | None = None  # None: Triton's default, as the op's launch passes nothing
    num_stages: int | None = None


@dataclass
class Result:
    """One compile (one kernel, architecture and specialisation) and the cases (labels) that launch it."""

    kernel: str  # "zhkernels.<module>.<function>"
    arch: int
    labels: list[str]
    constexprs: dict[str, Any]
    signature: dict[str, str]
    num_warps: int | None
    num_stages: int | None
    ok: bool = False
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _op(name: str) -> Any:
    """The op module ``zhkernels.<name>`` (by import: the package attribute ``zhkernels.swiglu`` is the function)."""
    return importlib.import_module(f"zhkernels.{name}")


# ---- launch configurations, derived through the ops' own helpers ------------------------------------------


def _rms_norm_cases(arch: int, quick: bool) -> list[Case]:
    rn = _op("rms_norm")
    widths = (1668,) if quick else HIDDEN + (rn.MAX_HIDDEN,)
    dtypes = [("bf16", "fp32")] if quick else [(d, d) for d in DTYPES] + [("bf16", "fp32"), ("fp16", "fp32")]
    cases = []
    for h in widths:
        block_rows, block_h, num_warps = rn._launch_shape(h)
        rows_per_program, _ = rn.backward_split(TOKENS, h, SM_COUNT[arch])
        for x, w in dtypes:
            for flag in (True,) if quick else (False, True):
                label = f"h={h} x={x} w={w}" + (" residual" if flag else "")
                common = dict(n_rows=TOKENS, n_cols=h, BLOCK_ROWS=block_rows, BLOCK_H=block_h)
                cases.append(
                    Case(
                        "rms_norm",
                        "_rms_norm_forward_kernel",
                        label,
                        dict(
                            common,
                            x_ptr=Ptr(x),
                            res_ptr=Ptr(x),
                            w_ptr=Ptr(w),
                            out_ptr=Ptr(x),
                            new_res_ptr=Ptr(x),
                            rstd_ptr=Ptr("fp32"),
                            x_row_stride=h,
                            res_row_stride=h,
                            eps=1e-6,
                            HAS_RESIDUAL=flag,
                        ),
                        num_warps,
                    )
                )
                cases.append(
                    Case(
                        "rms_norm",
                        "_rms_norm_backward_kernel",
                        label,
                        dict(
                            common,
                            grad_out_ptr=Ptr(x),
                            x_ptr=Ptr(x),
                            w_ptr=Ptr(w),
                            rstd_ptr=Ptr("fp32"),
                            grad_res_ptr=Ptr(x),
                            grad_x_ptr=Ptr(x),
                            grad_w_partial_ptr=Ptr("fp32"),
                            rows_per_program=rows_per_program,
                            grad_out_row_stride=h,
                            x_row_stride=h,
                            grad_res_row_stride=h,
                            HAS_GRAD_RESIDUAL=flag,
                        ),
                        num_warps,
                    )
                )
    return cases


def _rope_cases(arch: int, quick: bool) -> list[Case]:
    shapes = ((8, 2, 128, 1024),) if quick else ATTENTION
    rp = _op("rope")
    cases = []
    for hq, hk, d, t in shapes:
        batch = max(1, TOKENS // t)
        half = d // 2
        block_heads, block_half, num_warps = rp.launch_config(d, hq, hk)
        for dt in ("bf16",) if quick else DTYPES:
            # (cos/sin layout, their dtype, position_ids): a table indexed by positions, a table, HF's per-token rows
            tables = (
                [("table", "fp32", True)]
                if quick
                else [
                    (kind, cdt, pos)
                    for kind, pos in (("table", True), ("table", False), ("per-token", False))
                    for cdt in ("fp32", dt)
                ]
            )
            for kind, cdt, has_pos in tables:
                for backward in (False,) if quick else (False, True):
                    # forward reads the model's [B, T, H, D] views; backward gets contiguous [B, H, T, D] gradients
                    q_s = (hq * t * d, t * d, d) if backward else (t * hq * d, d, hq * d)
                    k_s = (hk * t * d, t * d, d) if backward else (t * hk * d, d, hk * d)
                    cos_sb = t * d if kind == "per-token" else 0
                    label = f"{dt} Hq/Hk={hq}/{hk} D={d} cos {kind} {cdt}" + (" positions" if has_pos else "")
                    label += " backward" if backward else ""
                    cases.append(
                        Case(
                            "rope",
                            "_rope_kernel",
                            label,
                            dict(
                                q_ptr=Ptr(dt),
                                k_ptr=Ptr(dt),
                                cos_ptr=Ptr(cdt),
                                sin_ptr=Ptr(cdt),
                                pos_ptr=Ptr("i64") if has_pos else Ptr(cdt),
                                q_out_ptr=Ptr(dt),
                                k_out_ptr=Ptr(dt),
                                seq_len=t,
                                n_q_heads=hq,
                                n_k_heads=hk,
                                half=half,
                                table_len=t if kind == "table" else batch,
                                q_sb=q_s[0],
                                q_sh=q_s[1],
                                q_st=q_s[2],
                                k_sb=k_s[0],
                                k_sh=k_s[1],
                                k_st=k_s[2],
                                cos_sb=cos_sb,
                                cos_st=d,
                                sin_sb=cos_sb,
                                sin_st=d,
                                pos_sb=t if has_pos else 0,
                                pos_st=1 if has_pos else 0,
                                HAS_POSITIONS=has_pos,
                                BACKWARD=backward,
                                BLOCK_HEADS=block_heads,
                                BLOCK_HALF=block_half,
                            ),
                            num_warps,
                        )
                    )
    return cases


def _swiglu_cases(arch: int, quick: bool) -> list[Case]:
    sw = _op("swiglu")
    cases = []
    for f in (1668,) if quick else FFN:
        _, block = sw._grid(TOKENS, f)
        # the model's contiguous inputs run flat; strided views (e.g. a fused gate/up projection) by rows
        layouts = (
            ((True, TOKENS * f, sw.FLAT_BLOCK),) if quick else ((True, TOKENS * f, sw.FLAT_BLOCK), (False, f, block))
        )
        for dt in ("bf16",) if quick else DTYPES:
            p = Ptr(dt)
            for flat, n, b in layouts:
                what = f"{dt} ffn={f}{' flat' if flat else ' rows'}"
                cases.append(
                    Case(
                        "swiglu",
                        "_swiglu_forward_kernel",
                        what,
                        dict(
                            gate_ptr=p,
                            up_ptr=p,
                            out_ptr=p,
                            n_cols=n,
                            gate_row_stride=n,
                            up_row_stride=n,
                            out_row_stride=n,
                            BLOCK=b,
                            FLAT=flat,
                        ),
                    )
                )
                cases.append(
                    Case(
                        "swiglu",
                        "_swiglu_backward_kernel",
                        what,
                        dict(
                            grad_out_ptr=p,
                            gate_ptr=p,
                            up_ptr=p,
                            grad_gate_ptr=p,
                            grad_up_ptr=p,
                            n_cols=n,
                            grad_out_row_stride=n,
                            gate_row_stride=n,
                            up_row_stride=n,
                            BLOCK=b,
                            FLAT=flat,
                        ),
                    )
                )
    return cases


def _bthd(prefix: str, heads: int, t: int, d: int) -> dict[str, int]:
    """Strides of a ``[B, H, T, D]`` tensor laid out as ``[B, T, H, D]`` (the model's views and the op's outputs)."""
    return {f"{prefix}b": t * heads * d, f"{prefix}h": d, f"{prefix}t": heads * d}


def _flash_attention_cases(arch: int, quick: bool) -> list[Case]:
    import torch

    fa = _op("flash_attention")
    shapes = ((8, 2, 128, 1024),) if quick else ATTENTION + ((8, 8, fa.MAX_HEAD_DIM, 1024),)
    cases = []
    for hq, hk, d, t in shapes:
        block_d = fa.head_dim_tile(d)
        for dt in ("bf16", "fp32") if quick else DTYPES:
            torch_dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}.get(dt, "float32"))
            cfg = fa._blocks(block_d, torch_dtype, torch.device("cuda"), arch)
            p, f32 = Ptr(dt), Ptr("fp32")
            values = dict(
                Q=p,
                K=p,
                V=p,
                O=p,
                DO=p,
                DQ=p,
                DK=p,
                DV=p,
                LSE=f32,
                DELTA=f32,
                DOC_START=Ptr("i32"),
                DOC_END=Ptr("i32"),
                **_bthd("sq", hq, t, d),
                **_bthd("sk", hk, t, d),
                **_bthd("sv", hk, t, d),
                **_bthd("so", hq, t, d),
                **_bthd("sdo", hq, t, d),
                **_bthd("sdq", hq, t, d),
                **_bthd("sdk", hk, t, d),
                **_bthd("sdv", hk, t, d),
                n_q_heads=hq,
                n_kv_heads=hk,
                group=hq // hk,
                n_split=1,
                s_split=0,
                q_len=t,
                k_len=t,
                head_dim=d,
                qk_scale=0.18,
                scale=0.125,
                PRECISION="ieee",
                UPCAST=False,
                BLOCK_D=block_d,
            )
            shape = f"{dt} Hq/Hk={hq}/{hk} D={d} T={t}"
            variants = ((True, True),) if quick else ((True, False), (True, True), (False, False), (False, True))
            for causal, docs in variants:
                # without doc_ids the op passes a [1, 1] placeholder: stride 1, which Triton turns into a constant
                flags = dict(values, CAUSAL=causal, HAS_DOCS=docs, s_doc=t if docs else 1)
                label = shape + (" causal" if causal else " full") + (" docs" if docs else "")
                forward, backward = [cfg.forward], [cfg.backward]
                if causal and docs and not quick:  # the autotuner's other candidates, at the training variant
                    forward, backward = (
                        fa.candidates(kind, block_d, torch_dtype, arch) for kind in ("forward", "backward")
                    )
                for tile in forward:
                    cases.append(
                        Case(
                            "flash_attention",
                            "_flash_forward_kernel",
                            label,
                            dict(flags, BLOCK_M=tile.resident, BLOCK_N=tile.streamed),
                            tile.warps,
                            tile.stages,
                        )
                    )
                for tile in backward:
                    tiles = dict(num_warps=tile.warps, num_stages=tile.stages)
                    cases.append(
                        Case(
                            "flash_attention",
                            "_flash_backward_delta_kernel",
                            shape,
                            dict(values, BLOCK_M=tile.resident),
                        )
                    )
                    cases.append(
                        Case(
                            "flash_attention",
                            "_flash_backward_dkdv_kernel",
                            label,
                            dict(flags, BLOCK_M=tile.streamed, BLOCK_N=tile.resident),
                            **tiles,
                        )
                    )
                    if hq > hk and not quick:  # a small grid splits the GQA group: fp32 dK/dV slices
                        cases.append(
                            Case(
                                "flash_attention",
                                "_flash_backward_dkdv_kernel",
                                label + " split",
                                dict(
                                    flags,
                                    DK=f32,
                                    DV=f32,
                                    n_split=2,
                                    s_split=t * hk * d,
                                    BLOCK_M=tile.streamed,
                                    BLOCK_N=tile.resident,
                                ),
                                **tiles,
                            )
                        )
                    cases.append(
                        Case(
                            "flash_attention",
                            "_flash_backward_dq_kernel",
                            label,
                            dict(flags, BLOCK_M=tile.resident, BLOCK_N=tile.streamed),
                            **tiles,
                        )
                    )
    return cases


def _cross_entropy_cases(arch: int, quick: bool) -> list[Case]:
    ce = _op("cross_entropy")
    cases = []
    for vocab in (35023,) if quick else VOCAB:
        block, num_warps = ce._kernel_config(vocab)
        for dt in ("bf16",) if quick else DTYPES:
            for targets in ("i64",) if quick else ("i64", "i32"):
                for write_grad in (True,) if quick else (False, True):
                    label = f"{dt} V={vocab} targets {targets}" + (" +grad" if write_grad else "")
                    cases.append(
                        Case(
                            "cross_entropy",
                            "_cross_entropy_rows_kernel",
                            label,
                            dict(
                                logits_ptr=Ptr(dt),
                                targets_ptr=Ptr(targets),
                                losses_ptr=Ptr("fp32"),
                                grad_scale_ptr=Ptr("fp32"),
                                row_stride=ce.padded_vocab(vocab),
                                n_vocab=vocab,
                                ignore_index=-100,
                                z_loss=1e-4,
                                WRITE_GRAD=write_grad,
                                BLOCK=block,
                            ),
                            num_warps,
                        )
                    )
    return cases


def _logprobs_cases(arch: int, quick: bool) -> list[Case]:
    ce, lp = _op("cross_entropy"), "logprobs"
    cases = []
    for vocab in (35023,) if quick else VOCAB:
        block, num_warps = ce._kernel_config(vocab)
        for dt in ("bf16",) if quick else DTYPES:
            common = dict(logits_ptr=Ptr(dt), targets_ptr=Ptr("i64"), row_stride=ce.padded_vocab(vocab), n_vocab=vocab)
            flags = dict(ignore_index=-100, inv_t=1.0, BLOCK=block)
            forward = dict(common, logprobs_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), **flags)
            backward = dict(common, lse_ptr=Ptr("fp32"), grad_ptr=Ptr("fp32"), **flags)
            label = f"{dt} V={vocab}"
            cases.append(Case(lp, "_logprobs_forward_kernel", label, forward, num_warps))
            cases.append(Case(lp, "_logprobs_backward_kernel", label, backward, num_warps))
    return cases


def _distill_cases(arch: int, quick: bool) -> list[Case]:
    kd = _op("distill")
    pad = _op("cross_entropy").padded_vocab
    cases = []
    for vocab in (35023,) if quick else VOCAB:
        block, num_warps = kd._kernel_config(vocab)
        for dt in ("bf16",) if quick else DTYPES:
            for kind in ("forward", "jsd") if quick else tuple(kd.KINDS):
                common = dict(s_ptr=Ptr(dt), t_ptr=Ptr(dt), labels_ptr=Ptr("i64"), row_stride=pad(vocab), n_vocab=vocab)
                jsd = dict(beta=0.5, log_beta=-0.69, log_1m_beta=-0.69, KIND=kd.KINDS[kind], BLOCK=block)
                forward = dict(
                    common,
                    ce_ptr=Ptr("fp32"),
                    div_ptr=Ptr("fp32"),
                    stats_ptr=Ptr("fp32"),
                    ignore_index=-100,
                    inv_t=0.5,
                    t_sq=4.0,
                    **jsd,
                )
                backward = dict(
                    common, stats_ptr=Ptr("fp32"), coef_ptr=Ptr("fp32"), ignore_index=-100, inv_t=0.5, **jsd
                )
                label = f"{dt} V={vocab} {kind}"
                cases.append(Case("distill", "_distill_forward_kernel", label, forward, num_warps))
                cases.append(Case("distill", "_distill_backward_kernel", label, backward, num_warps))
    return cases


def _quant_cases(arch: int, quick: bool) -> list[Case]:
    """Weight-only quantised matmuls at decode (M = 1, GEMV) and a small batch (M = 17, tl.dot), fp16/bf16
    activations (fp32 too in the full set), the presets' projection shapes (K = 1668: padded int4 groups)."""
    import torch

    qt = _op("quant")
    shapes = ((896, 1668),) if quick else ((512, 1408), (896, 2560), (1668, 768), (768, 1668), (4096, 4096))  # N, K
    torch_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    cases = []
    for n, k in shapes:
        for dt in ("bf16", "fp16") if quick else DTYPES:
            for m in (1, 17):
                config = qt.launch_config(m, "int8", torch_dtypes[dt])
                num_warps = config.pop("num_warps")
                common = dict(config, PRECISION=config.get("PRECISION", "ieee"), UPCAST=False)
                common.pop("BLOCK_K")
                shape = dict(M=m, N=n, K=k, x_row_stride=k, out_row_stride=n)
                x = dict(x_ptr=Ptr(dt), out_ptr=Ptr(dt))
                label = f"{dt} M={m} N={n} K={k}"
                int8 = dict(common, **shape, **x, w_ptr=Ptr("i8"), s_ptr=Ptr(dt), BLOCK_K=config["BLOCK_K"])
                cases.append(Case("quant", "_int8_matmul_kernel", label, int8, num_warps))
                for group in (64,) if quick else qt.GROUP_SIZES:
                    for zeros in (True,) if quick else (False, True):
                        int4 = dict(
                            common,
                            **shape,
                            **x,
                            n_groups=-(-k // group),
                            w_ptr=Ptr("u8"),
                            s_ptr=Ptr(dt),
                            z_ptr=Ptr("u8") if zeros else Ptr(dt),
                            GROUP=group,
                            HAS_ZEROS=zeros,
                        )
                        what = f"{label} g{group}" + (" asym" if zeros else "")
                        cases.append(Case("quant", "_int4_matmul_kernel", what, int4, num_warps))
    return cases


CASE_BUILDERS = (
    _rms_norm_cases,
    _rope_cases,
    _swiglu_cases,
    _flash_attention_cases,
    _cross_entropy_cases,
    _logprobs_cases,
    _distill_cases,
    _quant_cases,
)


# ---- environment, discovery ---------------------------------------------------------------------------------


def toolchain_problem(archs: tuple[int, ...] = (80, 90)) -> str | None:
    """Why kernels cannot be compiled ahead of time here (no Triton, NVIDIA backend or ptxas; old Triton), or None."""
    if not _dispatch.HAS_TRITON:
        return "triton is not installed (pip install triton)"
    try:
        from triton.compiler import ASTSource

        if "constexprs" not in inspect.signature(ASTSource).parameters:
            return "this Triton's ASTSource predates the constexprs/attrs API (needs Triton >= 3.3)"
        for arch in archs:
            if not os.path.isfile(_ptxas(arch)):
                return f"Triton's bundled ptxas for sm_{arch} is missing ({_ptxas(arch)})"
    except Exception as exc:  # an incomplete install: report it, do not crash
        return f"Triton's NVIDIA backend is unusable: {type(exc).__name__}: {exc}"
    return None


def _ptxas(arch: int) -> str:
    """The ptxas binary Triton itself uses for this architecture (its helper's signature changed across versions)."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        tool = nvidia.get_ptxas(arch)
    except TypeError:
        tool = nvidia.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0] if isinstance(tool, tuple) else str(tool)


def _python_function(obj: Any) -> Any:
    """The decorated Python function under a JITFunction / InterpretedFunction / Autotuner wrapper."""
    while hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def discover_jit_functions() -> dict[str, Any]:
    """Every ``@triton.jit`` object defined in a ``zhkernels.*`` module, keyed ``zhkernels.<module>.<name>``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    import zhkernels

    kinds = (KernelInterface, InterpretedFunction)  # Triton 3.3's InterpretedFunction is no KernelInterface
    found = {}
    for info in pkgutil.iter_modules(zhkernels.__path__):
        module = importlib.import_module(f"zhkernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, kinds) and getattr(_python_function(obj), "__module__", "") == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def _direct_callers(name: str, functions: dict[str, Any]) -> list[str]:
    """The JIT functions whose source calls ``name``."""
    short = name.rsplit(".", 1)[1]
    pattern = re.compile(rf"\b{re.escape(short)}\s*\(")
    calls = []
    for other, obj in functions.items():
        src = getattr(obj, "src", None) or inspect.getsource(_python_function(obj))
        if other != name and pattern.search(src):
            calls.append(other)
    return calls


def _callers(name: str, kernels: set[str], functions: dict[str, Any]) -> list[str]:
    """The checked kernels a device helper is compiled inside: its callers, through other helpers too."""
    found, seen, todo = [], {name}, [name]
    while todo:
        for caller in _direct_callers(todo.pop(), functions):
            if caller in seen:
                continue
            seen.add(caller)
            if caller in kernels:
                found.append(caller)
            else:
                todo.append(caller)
    return sorted(found)


# ---- compiling ----------------------------------------------------------------------------------------------


def _int_specialization(value: int, specialize: bool, align: bool) -> tuple[str, Any]:
    """Triton's launcher rules for an int, written out (used when ``native_specialize_impl`` is not there)."""
    if isinstance(value, bool):
        return "u1", None
    if specialize and value == 1:
        return "constexpr", 1
    kind = "i32" if -(2**31) <= value < 2**31 else "u64" if value >= 2**63 else "i64"
    if not specialize:
        return kind, None
    return kind, "D" if align and value % 16 == 0 else ""


def _specialize(value: Any, param: Any) -> tuple[str, Any]:
    """(signature type, attribute) of one runtime argument, as Triton's launcher computes it."""
    if isinstance(value, Ptr):
        return f"*{value.dtype}", "D"  # torch allocations are 16-byte aligned
    if isinstance(value, float):
        return "fp32", None
    specialize = not getattr(param, "do_not_specialize", False)
    align = not getattr(param, "do_not_specialize_on_alignment", False)
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return native_specialize_impl(BaseBackend, value, False, specialize, align)
    except (ImportError, TypeError):  # another Triton version
        return _int_specialization(value, specialize, align)


def _job(case: Case, arch: int) -> tuple[tuple, dict]:
    """The exact compile request (key for de-duplication) of a case, or a config error naming the mismatch."""
    kernel = getattr(_op(case.module), case.kernel)
    names = list(kernel.arg_names)
    missing = [n for n in names if n not in case.args]
    if missing:
        raise KeyError(
            f"zhkernels.aot_check has no value for {case.kernel}({', '.join(missing)}): "
            "the kernel's signature changed; update its case builder"
        )
    signature, constexprs, attrs = {}, {}, {}
    for param, name in zip(kernel.params, names):
        value = case.args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name], attr = _specialize(value, param)
        if signature[name] == "constexpr":
            constexprs[name] = attr
        elif attr and "D" in attr:
            attrs[name] = True
    options = {k: v for k, v in (("num_warps", case.num_warps), ("num_stages", case.num_stages)) if v is not None}
    spec = dict(
        module=case.module,
        kernel=case.kernel,
        arch=arch,
        signature=signature,
        constexprs=constexprs,
        divisible=sorted(attrs),
        options=options,
    )
    return (case.module, case.kernel, arch, json.dumps(spec, sort_keys=True, default=str)), spec


def _compile(spec: dict) -> Any:
    """``triton.compile`` of one request from :func:`_job` for its architecture (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
    kernel = getattr(_op(spec["module"]), spec["kernel"])
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    constexprs = {(index[n],): v for n, v in spec["constexprs"].items()}
    attrs = {(index[n],): [["tt.divisibility", 16]] for n in spec["divisible"]}
    with contextlib.redirect_stdout(io.StringIO()):  # a failing ptxas prints the whole PTX to stdout
        return triton.compile(
            ASTSource(kernel, spec["signature"], constexprs, attrs),
            target=GPUTarget("cuda", spec["arch"], 32),
            options=spec["options"],
        )


def ptx(case: Case, arch: int) -> str:
    """The PTX of one case for one architecture: what the GPU would run, readable without one."""
    return _compile(_job(case, arch)[1]).asm["ptx"]


def compile_one(spec: dict) -> dict:
    """Compile one kernel for one architecture; registers and spills come from re-running ptxas -v on its PTX."""
    arch, out = spec["arch"], {}
    start = time.perf_counter()
    try:
        compiled = _compile(spec)
        out["shared_bytes"] = int(compiled.metadata.shared)
        out["num_warps"], out["num_stages"] = compiled.metadata.num_warps, compiled.metadata.num_stages
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            report = subprocess.run(
                [
                    _ptxas(arch),
                    "-lineinfo",
                    "-v",
                    "--regAllocOptLevel=2",
                    f"--gpu-name={arch_name}",
                    ptx,
                    "-o",
                    ptx + ".o",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
        used, spill = _PTXAS_USED.search(report), _PTXAS_SPILL.search(report)
        out["registers"] = int(used.group(1)) if used else None
        if spill:
            out["stack_bytes"], out["spill_stores"], out["spill_loads"] = map(int, spill.groups())
        out["ok"] = True
    except Exception as exc:  # the finding itself: keep the message
        message = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__
        while cause is not None:  # Triton 3.3 keeps the reason in the cause (one per nested @triton.jit call)
            if str(cause) not in message:
                message = f"{message.rstrip()}\n{cause}"
            cause = cause.__cause__
        out["ok"], out["error"] = False, message[:4000]
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _summary(error: str) -> str:
    """One line of a compile error: Triton's message with the source line it points at, or ptxas' error lines."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    carets = [i for i, line in enumerate(lines) if i and line == "^"]
    if carets:  # CompilationError: "at L:C:", the source, a caret under the culprit, then the cause; an error
        # inside a @triton.jit helper nests another such block, so the cause follows the last caret
        first, last = carets[0], carets[-1]
        return f"{lines[0].rstrip(':')} `{lines[first - 1]}`: {' '.join(lines[last + 1 :])}"[:300]
    errors = [line for line in lines[1:] if "error" in line.lower() and not line.startswith("Repro")]
    return "; ".join(lines[:1] + errors[:2])[:300]


def _plan(archs: list[int], quick: bool, only: str | None) -> tuple[dict, dict, list[str], set[str]]:
    """Every case of every builder, de-duplicated into compile requests: (results, specs, problems, covered kernels)."""
    results: dict[tuple, Result] = {}
    specs: dict[tuple, dict] = {}
    problems: list[str] = []
    covered: set[str] = set()
    for arch in archs:
        for builder in CASE_BUILDERS:
            for case in builder(arch, quick):
                name = f"zhkernels.{case.module}.{case.kernel}"
                covered.add(name)
                if only and only not in name:
                    continue
                try:
                    key, spec = _job(case, arch)
                except (KeyError, AttributeError) as exc:
                    problems.append(f"{name}: {exc}")
                    continue
                if key not in results:
                    specs[key] = spec
                    results[key] = Result(
                        name,
                        arch,
                        [],
                        spec["constexprs"],
                        spec["signature"],
                        case.num_warps,
                        case.num_stages,
                        shared_limit=SHARED_LIMIT[arch],
                    )
                results[key].labels.append(case.label)
    return results, specs, problems, covered


def run_check(archs: list[int], quick: bool, jobs: int, only: str | None = None, fail_on_spills: bool = False) -> dict:
    """Compile every case; returns the report (``ok``, ``problems``, ``kernels``, ``helpers``, ``results``)."""
    import triton

    functions = discover_jit_functions()
    results, specs, problems, covered = _plan(archs, quick, only)
    log.info(
        "compiling %d kernel configurations for sm_%s with %d job(s)", len(specs), ", sm_".join(map(str, archs)), jobs
    )
    keys = list(specs)
    if jobs > 1 and len(keys) > 1:
        worker = importlib.import_module("zhkernels.aot_check").compile_one  # picklable even when run as __main__
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            outcomes = list(pool.map(worker, [specs[k] for k in keys], chunksize=2))
    else:
        outcomes = [compile_one(specs[k]) for k in keys]
    for key, outcome in zip(keys, outcomes):
        r = results[key]
        for k, v in outcome.items():
            if hasattr(r, k):
                setattr(r, k, v)
        where = f"{r.kernel.rsplit('.', 1)[1]} sm_{r.arch} [{r.labels[0]}]"
        if not r.ok:
            r.problems.append(f"compile failed: {_summary(r.error)}")
        elif r.shared_bytes > r.shared_limit:
            r.problems.append(f"shared memory {r.shared_bytes} B > {r.shared_limit} B per block on sm_{r.arch}")
        elif r.spill_stores and fail_on_spills:
            r.problems.append(f"spills {r.spill_stores} B to local memory")
        problems.extend(f"{where}: {p}" for p in r.problems)

    kernels, helpers = {}, {}
    launched = {name for name in functions if name in covered or any(r.kernel == name for r in results.values())}
    for name in functions:
        mine = [r for r in results.values() if r.kernel == name]
        if name in launched:
            kernels[name] = dict(
                compiles=len(mine),
                failed=sum(not r.ok for r in mine),
                spilling=sum(bool(r.spill_stores) for r in mine),
                max_spill_bytes=max((r.spill_stores or 0 for r in mine), default=0),
                max_shared_bytes=max((r.shared_bytes or 0 for r in mine), default=0),
            )
        elif callers := _callers(name, launched, functions):
            helpers[name] = dict(called_from=callers)
        else:
            problems.append(f"{name}: a @triton.jit function with no launch configuration in zhkernels/aot_check.py")
    return dict(
        ok=not problems,
        problems=problems,
        triton=triton.__version__,
        archs=archs,
        quick=quick,
        kernels=kernels,
        helpers=helpers,
        results=[asdict(r) for r in results.values()],
    )


def _log_table(report: dict) -> None:
    """The readable table: one line per compiled configuration."""
    header = (
        f"{'kernel':<30} {'arch':<6} {'configuration':<44} {'constexpr blocks':<30} {'w/s':<5} "
        f"{'regs':>4} {'spill':>6} {'shared KB':>12}  status"
    )
    log.info(header)
    log.info("-" * len(header))
    for r in sorted(report["results"], key=lambda r: (r["kernel"], r["arch"], r["labels"][0])):
        label = r["labels"][0] + (f" (+{len(r['labels']) - 1})" if len(r["labels"]) > 1 else "")
        blocks = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        ws = f"{r['num_warps'] or 4}/{r['num_stages'] or 3}"
        shared = f"{(r['shared_bytes'] or 0) / 1024:.1f}/{r['shared_limit'] // 1024}"
        status = "OK" if not r["problems"] else "; ".join(r["problems"])
        if r["ok"] and r["spill_stores"] and not r["problems"]:
            status = f"spills {r['spill_stores']} B"
        log.info(
            f"{r['kernel'].rsplit('.', 1)[1]:<30} sm_{r['arch']:<3} {label[:44]:<44} {blocks[:30]:<30} "
            f"{ws:<5} {r['registers'] or '-':>4} {r['spill_stores'] or 0:>6} {shared:>12}  {status}"
        )
    for name, helper in report["helpers"].items():
        log.info("helper %s: compiled inside %s", name, ", ".join(helper["called_from"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zhkernels.aot_check",
        description="Compile every Triton kernel in zhkernels/ for real CUDA GPUs (no GPU needed) at the launch "
        "configurations the ops use; report registers, spills and shared memory. Exit 1 on a failed "
        "compile, shared memory over the limit or an unchecked kernel; 2 when the check cannot run.",
    )
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[80, 86, 89, 90],
        choices=sorted(SHARED_LIMIT),
        help="CUDA compute capabilities ×10 (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one covering configuration per kernel (bf16; fp32 too "
        "for attention) instead of every preset shape, dtype and flag",
    )
    parser.add_argument("--json", metavar="OUT", help="write the full report (every configuration) to this file")
    parser.add_argument(
        "--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compiles (default: %(default)s)"
    )
    parser.add_argument("--only", metavar="TEXT", help="compile only kernels whose name contains TEXT")
    parser.add_argument("--fail-on-spills", action="store_true", help="exit 1 when ptxas spills registers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if _dispatch.interpret_mode_at_import():  # triton.jit built interpreter functions when kernels was imported
        print(
            "zhkernels.aot_check: TRITON_INTERPRET is set, so the kernels are interpreter functions that cannot be "
            "compiled; run it without: env -u TRITON_INTERPRET python -m zhkernels.aot_check",
            file=sys.stderr,
        )
        return 2
    if problem := toolchain_problem(tuple(args.arch)):
        print(f"zhkernels.aot_check: cannot compile ahead of time: {problem}", file=sys.stderr)
        return 2
    report = run_check(sorted(set(args.arch)), args.quick, max(1, args.jobs), args.only, args.fail_on_spills)
    _log_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    spilling = [r for r in report["results"] if r["spill_stores"]]
    for name, entry in report["kernels"].items():
        if entry["spilling"]:
            log.warning(
                "%s: %d of %d configurations spill registers (up to %d B of spill stores per thread)",
                name,
                entry["spilling"],
                entry["compiles"],
                entry["max_spill_bytes"],
            )
    log.info(
        "%d configurations, %d failed, %d spill registers; %s",
        len(report["results"]),
        sum(not r["ok"] for r in report["results"]),
        len(spilling),
        "OK" if report["ok"] else "PROBLEMS:",
    )
    for problem in report["problems"]:
        log.error("  %s", problem)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
