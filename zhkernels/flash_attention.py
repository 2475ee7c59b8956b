"""Flash attention: tiled online-softmax attention that never stores the ``[Tq, Tk]`` score matrix.

Forward keeps a running max and sum per query row while it walks the key blocks, and stores the
log-sum-exp so the backward pass can recompute the probabilities block by block (delta = rowsum(dO * O),
then one kernel for dK/dV looping over query blocks and one for dQ looping over key blocks; no atomics).
GQA maps query head ``h`` to key/value head ``h // (Hq // Hk)`` inside the kernels (K/V are never
repeated), and the dK/dV kernel sums over the query heads of a group itself. Inputs are read through
their strides (``x.view(B, T, H, D).transpose(1, 2)`` is not copied); outputs are allocated in that same
``[B, T, H, D]`` memory layout so the model's ``out.transpose(1, 2).reshape(B, T, H * D)`` is free.

Document masking (``doc_ids [B, T]``, packed rows): documents are contiguous runs of one id (as the
packers write them; an id that reappears later in a row starts a new document). The host turns the ids
into each token's run ``[start, end)`` (:func:`zhkernels.reference.doc_bounds`, torch ops, no sync; a
model passes them as ``doc_bounds``, computed once per step for all layers), so a kernel skips every
key block that ends before its query block's earliest document start.

Masks are evaluated only where they can change something: each program first works out which of its
blocks every one of its rows sees whole (past the latest document start, before the diagonal and the
earliest document end, inside the ragged edge), and a uniform branch skips the compares and the
``where`` on those. One loop with that branch, not separate masked and unmasked loops: ptxas needs
fewer registers for it (the three-loop form spilled in dK/dV at head_dim 128 on sm_90 and took the
forward at head_dim 64 from 128 to 196 registers on sm_86).

GQA's dK/dV: one program per (KV head, key block) sums over every query head of its group. When that
grid is small next to the GPU (``minimind-26m``: ~256 programs on an H100's 132 SMs) the group is
split over several programs (:func:`kv_split`), each writing an fp32 slice that is summed afterwards.

Tiles: ``FORWARD_TILES`` / ``BACKWARD_TILES`` list, per architecture class and head_dim tile (a power of
two; 96 pads to 128 with masked columns), the candidates that ``python -m zhkernels.aot_check`` compiles
without spills inside the class's shared memory (~99 KB per block on RTX 30xx/40xx, 227 KB on sm_90);
the first is the default and ``ZHLLM_FLASH_AUTOTUNE=1`` times them all once per shape class on the GPU
in use. On sm_90 the backward owns 128-row tiles with 8 warps (64 rows per warpgroup, so warpgroup
MMA is used with wide pieces) and head_dim 256 gets a pipelined 64 × 16 tile (32 × 32 with one stage
fell back to ``mma.sync``). "Resident" is the tile a program owns (Q forward and for dQ, K/V for
dK/dV), "streamed" the tile its loop walks. float32 (tests only: ``input_precision="ieee"`` means no
tensor cores) uses small tiles; the interpreter uses small tiles so short test sequences span several
blocks. None of this has been timed on a GPU yet.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from . import _dispatch, reference
from ._dispatch import HAS_TRITON

MAX_HEAD_DIM = 256
log = logging.getLogger(__name__)

#: Tile sizes used under the interpreter (forward M, N; backward resident, streamed): small so a 77-token
#: test spans several blocks and exercises the skipping and the ragged edges. None: use the GPU table.
INTERPRET_BLOCKS: tuple[int, int, int, int] | None = (32, 16, 32, 16)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``tl.dot`` accumulating in fp32; UPCAST (interpreter + bfloat16 only) widens the bf16 values first."""
        if UPCAST:  # the interpreter keeps bf16 as raw uint16 and would multiply the bit patterns (triton#11584)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _query_block_ranges(
        start_m,
        q_len,
        k_len,
        offset,
        DOC_START,
        DOC_END,
        doc_row,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Key blocks a query block needs, ``[lo, hi)``, and the part ``[full_lo, full_hi)`` that every one of its
        rows sees whole (no mask to evaluate there). Doc starts and ends grow with the token index."""
        lo = 0
        hi = k_len
        full_lo = 0
        full_hi = (k_len // BLOCK_N) * BLOCK_N  # a ragged last key block needs its column mask
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M + offset)
            full_hi = tl.minimum(full_hi, ((start_m + offset + 1) // BLOCK_N) * BLOCK_N)
        if HAS_DOCS:  # q_len == k_len here
            last = tl.minimum(start_m + BLOCK_M, q_len) - 1
            lo = (tl.load(DOC_START + doc_row + start_m) // BLOCK_N) * BLOCK_N
            full_lo = tl.cdiv(tl.load(DOC_START + doc_row + last), BLOCK_N) * BLOCK_N
            if not CAUSAL:
                hi = tl.minimum(hi, tl.load(DOC_END + doc_row + last))
                full_hi = tl.minimum(full_hi, (tl.load(DOC_END + doc_row + start_m) // BLOCK_N) * BLOCK_N)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
        return lo, full_lo, full_hi, hi

    @triton.jit
    def _key_block_ranges(
        start_n,
        q_len,
        k_len,
        offset,
        DOC_START,
        DOC_END,
        doc_row,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Query blocks that see a key block, ``[lo, hi)``, and the part ``[full_lo, full_hi)`` seeing all its keys."""
        lo = 0
        hi = q_len
        full_lo = 0
        full_hi = (q_len // BLOCK_M) * BLOCK_M
        if CAUSAL:  # key j is seen by queries i >= j - offset
            lo = tl.maximum(start_n - offset, 0)
            full_lo = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
        if HAS_DOCS:  # key j is seen only by queries of its own run [doc_start_j, doc_end_j)
            last = tl.minimum(start_n + BLOCK_N, k_len) - 1
            lo = tl.maximum(lo, tl.load(DOC_START + doc_row + start_n))
            hi = tl.minimum(hi, tl.load(DOC_END + doc_row + last))
            full_lo = tl.maximum(full_lo, tl.load(DOC_START + doc_row + last))
            full_hi = tl.minimum(full_hi, (tl.load(DOC_END + doc_row + start_n) // BLOCK_M) * BLOCK_M)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
        return lo, full_lo, full_hi, hi

    @triton.jit
    def _row_keep(rows, cols, row_ok, col_ok, doc_start, doc_end, offset, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
        """Which (query row, key column) pairs attend, ``[rows, cols]``; doc bounds are per query row (under
        causal the start alone decides)."""
        keep = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + offset)
        if HAS_DOCS:
            keep = keep & (cols[None, :] >= doc_start[:, None])
            if not CAUSAL:
                keep = keep & (cols[None, :] < doc_end[:, None])
        return keep

    @triton.jit
    def _forward_keys(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        lo,
        hi,
        full_lo,
        full_hi,
        rows,
        cols0,
        dims,
        row_ok,
        dim_ok,
        doc_start,
        doc_end,
        skt,
        svt,
        k_len,
        offset,
        qk_scale,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The online softmax over key blocks ``[lo, hi)``; only blocks outside ``[full_lo, full_hi)`` are masked."""
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + cols0
            col_ok = cols < k_len
            k_ok = dim_ok[:, None] & col_ok[None, :]
            v_ok = dim_ok[None, :] & col_ok[:, None]
            k_t = tl.load(k_base + cols[None, :].to(tl.int64) * skt + dims[:, None], mask=k_ok, other=0.0)
            s = _dot(q, k_t, PRECISION, UPCAST) * qk_scale
            if (start_n < full_lo) | (start_n >= full_hi):
                keep = _row_keep(rows, cols, row_ok, col_ok, doc_start, doc_end, offset, CAUSAL, HAS_DOCS)
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None].to(tl.int64) * svt + dims[None, :], mask=v_ok, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _flash_forward_kernel(
        Q,
        K,
        V,
        O,  # noqa: E741 (the output tensor, named as in the paper)
        LSE,
        DOC_START,
        DOC_END,
        sqb,
        sqh,
        sqt,
        skb,
        skh,
        skt,
        svb,
        svh,
        svt,
        sob,
        soh,
        sot,
        s_doc,
        n_q_heads,
        group,
        q_len,
        k_len,
        head_dim,
        qk_scale,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Heads on axis 0 (axis 1 is capped at 65535); the last query blocks, the most work under causal, start first.
        bh = tl.program_id(0)
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        b = (bh // n_q_heads).to(tl.int64)
        h = (bh % n_q_heads).to(tl.int64)
        kv_h = h // group
        rows = start_m + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        dim_ok = dims < head_dim
        offset = k_len - q_len  # causal is aligned to the end: query i sees keys j <= i + offset

        q = tl.load(
            Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqt + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        k_base = K + b * skb + kv_h * skh
        v_base = V + b * svb + kv_h * svh
        doc_row = b * s_doc
        doc_start = rows  # placeholders unless HAS_DOCS
        doc_end = rows
        if HAS_DOCS:
            doc_start = tl.load(DOC_START + doc_row + rows, mask=row_ok, other=0)
            if not CAUSAL:
                doc_end = tl.load(DOC_END + doc_row + rows, mask=row_ok, other=0)
        lo, full_lo, full_hi, hi = _query_block_ranges(
            start_m, q_len, k_len, offset, DOC_START, DOC_END, doc_row, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
        )

        # Invariant: m_i is the running row max of the log2-scaled scores, l_i = sum exp2(s - m_i) and
        # acc = sum exp2(s - m_i) * v over the key blocks seen so far. m_i starts finite so that a row whose
        # keys are all masked in a block gives exp2(-inf) = 0, never exp2(-inf + inf) = NaN. Only the blocks
        # at a document start, the diagonal and the ragged end evaluate the mask.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, l_i, m_i = _forward_keys(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            lo,
            hi,
            full_lo,
            full_hi,
            rows,
            cols0,
            dims,
            row_ok,
            dim_ok,
            doc_start,
            doc_end,
            skt,
            svt,
            k_len,
            offset,
            qk_scale,
            CAUSAL,
            HAS_DOCS,
            PRECISION,
            UPCAST,
            BLOCK_N,
        )

        has_keys = l_i > 0.0  # false only for a row with no key at all (empty K): output 0, lse +inf
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has_keys, m_i * 0.6931471805599453 + tl.log(l_safe), float("inf"))
        tl.store(
            O + b * sob + h * soh + rows[:, None].to(tl.int64) * sot + dims[None, :],
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
        tl.store(LSE + bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)

    @triton.jit
    def _flash_backward_delta_kernel(
        O,  # noqa: E741 (the output tensor, named as in the paper)
        DO,
        DELTA,
        sob,
        soh,
        sot,
        sdob,
        sdoh,
        sdot,
        n_q_heads,
        q_len,
        head_dim,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = (bh // n_q_heads).to(tl.int64)
        h = (bh % n_q_heads).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        mask = (rows < q_len)[:, None] & (dims < head_dim)[None, :]
        r64 = rows[:, None].to(tl.int64)
        o = tl.load(O + b * sob + h * soh + r64 * sot + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + h * sdoh + r64 * sdot + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * q_len + rows, tl.sum(o * do, 1), mask=rows < q_len)

    @triton.jit
    def _dkdv_queries(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        LSE,
        DELTA,
        stats,
        lo,
        hi,
        full_lo,
        full_hi,
        rows0,
        cols,
        dims,
        col_ok,
        dim_ok,
        doc_start,
        doc_end,
        sqt,
        sdot,
        q_len,
        offset,
        qk_scale,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """dv += P^T dO and dk += dS^T Q over query blocks ``[lo, hi)``, dS = P * (dO V^T - delta) (unscaled); only
        blocks outside ``[full_lo, full_hi)`` are masked."""
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + rows0
            row_ok = rows < q_len
            q_ok = dim_ok[None, :] & row_ok[:, None]
            r64 = rows[:, None].to(tl.int64)
            q = tl.load(q_base + r64 * sqt + dims[None, :], mask=q_ok, other=0.0)
            do = tl.load(do_base + r64 * sdot + dims[None, :], mask=q_ok, other=0.0)
            lse = tl.load(LSE + stats + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + stats + rows, mask=row_ok, other=0.0)
            s_t = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
            if (start_m < full_lo) | (start_m >= full_hi):  # [keys, queries]: a key's doc run bounds its queries
                keep = col_ok[:, None] & row_ok[None, :]
                if CAUSAL:
                    keep = keep & (cols[:, None] <= rows[None, :] + offset)
                if HAS_DOCS:
                    keep = keep & (rows[None, :] >= doc_start[:, None]) & (rows[None, :] < doc_end[:, None])
                s_t = tl.where(keep, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
            dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
            dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)
        return dk, dv

    @triton.jit
    def _flash_backward_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        DOC_START,
        DOC_END,
        sqb,
        sqh,
        sqt,
        skb,
        skh,
        skt,
        svb,
        svh,
        svt,
        sdob,
        sdoh,
        sdot,
        sdkb,
        sdkh,
        sdkt,
        sdvb,
        sdvh,
        sdvt,
        s_doc,
        s_split,
        n_q_heads,
        n_kv_heads,
        group,
        n_split,
        q_len,
        k_len,
        head_dim,
        qk_scale,
        scale,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Axis 0: (batch, KV head, split); a split sums group // n_split of the group's query heads into its own
        # slice of DK/DV (s_split apart; 0 when n_split == 1), so small grids still fill the GPU (no atomics).
        pid = tl.program_id(0)
        split = pid % n_split
        bh = pid // n_split
        start_n = tl.program_id(1) * BLOCK_N  # the first key blocks, the most work under causal, start first
        b = (bh // n_kv_heads).to(tl.int64)
        kv_h = (bh % n_kv_heads).to(tl.int64)
        cols = start_n + tl.arange(0, BLOCK_N)
        rows0 = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        col_ok = cols < k_len
        dim_ok = dims < head_dim
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        c64 = cols[:, None].to(tl.int64)
        k = tl.load(K + b * skb + kv_h * skh + c64 * skt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + kv_h * svh + c64 * svt + dims[None, :], mask=kv_mask, other=0.0)
        offset = k_len - q_len
        doc_row = b * s_doc
        doc_start = cols  # placeholders unless HAS_DOCS
        doc_end = cols
        if HAS_DOCS:
            doc_start = tl.load(DOC_START + doc_row + cols, mask=col_ok, other=0)
            doc_end = tl.load(DOC_END + doc_row + cols, mask=col_ok, other=0)
        lo, full_lo, full_hi, hi = _key_block_ranges(
            start_n, q_len, k_len, offset, DOC_START, DOC_END, doc_row, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
        )

        # Invariant: dk and dv hold the sums over every query of this split's heads seen so far; dk is scaled
        # once at the end. Only query blocks at the diagonal, a document edge or the ragged end are masked.
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        per_split = group // n_split
        for g in range(split * per_split, (split + 1) * per_split):
            h = kv_h * group + g
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdob + h * sdoh
            stats = (b * n_q_heads + h) * q_len
            dk, dv = _dkdv_queries(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                LSE,
                DELTA,
                stats,
                lo,
                hi,
                full_lo,
                full_hi,
                rows0,
                cols,
                dims,
                col_ok,
                dim_ok,
                doc_start,
                doc_end,
                sqt,
                sdot,
                q_len,
                offset,
                qk_scale,
                CAUSAL,
                HAS_DOCS,
                PRECISION,
                UPCAST,
                BLOCK_M,
            )

        part = split.to(tl.int64) * s_split
        tl.store(
            DK + part + b * sdkb + kv_h * sdkh + c64 * sdkt + dims[None, :],
            (dk * scale).to(DK.dtype.element_ty),
            mask=kv_mask,
        )
        tl.store(
            DV + part + b * sdvb + kv_h * sdvh + c64 * sdvt + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask
        )

    @triton.jit
    def _dq_keys(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        lo,
        hi,
        full_lo,
        full_hi,
        rows,
        cols0,
        dims,
        row_ok,
        dim_ok,
        doc_start,
        doc_end,
        skt,
        svt,
        k_len,
        offset,
        qk_scale,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """dq += dS K over key blocks ``[lo, hi)``, dS = P * (dO V^T - delta) (unscaled); only blocks outside
        ``[full_lo, full_hi)`` are masked."""
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + cols0
            col_ok = cols < k_len
            kv_ok = dim_ok[None, :] & col_ok[:, None]
            c64 = cols[:, None].to(tl.int64)
            k = tl.load(k_base + c64 * skt + dims[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + c64 * svt + dims[None, :], mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            if (start_n < full_lo) | (start_n >= full_hi):
                keep = _row_keep(rows, cols, row_ok, col_ok, doc_start, doc_end, offset, CAUSAL, HAS_DOCS)
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        return dq

    @triton.jit
    def _flash_backward_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        DOC_START,
        DOC_END,
        sqb,
        sqh,
        sqt,
        skb,
        skh,
        skt,
        svb,
        svh,
        svt,
        sdob,
        sdoh,
        sdot,
        sdqb,
        sdqh,
        sdqt,
        s_doc,
        n_q_heads,
        group,
        q_len,
        k_len,
        head_dim,
        qk_scale,
        scale,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        b = (bh // n_q_heads).to(tl.int64)
        h = (bh % n_q_heads).to(tl.int64)
        kv_h = h // group
        rows = start_m + tl.arange(0, BLOCK_M)
        cols0 = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        dim_ok = dims < head_dim
        q_mask = row_ok[:, None] & dim_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + r64 * sqt + dims[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + r64 * sdot + dims[None, :], mask=q_mask, other=0.0)
        stats = bh.to(tl.int64) * q_len
        lse = tl.load(LSE + stats + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stats + rows, mask=row_ok, other=0.0)
        k_base = K + b * skb + kv_h * skh
        v_base = V + b * svb + kv_h * svh
        offset = k_len - q_len
        doc_row = b * s_doc
        doc_start = rows  # placeholders unless HAS_DOCS
        doc_end = rows
        if HAS_DOCS:
            doc_start = tl.load(DOC_START + doc_row + rows, mask=row_ok, other=0)
            if not CAUSAL:
                doc_end = tl.load(DOC_END + doc_row + rows, mask=row_ok, other=0)
        lo, full_lo, full_hi, hi = _query_block_ranges(
            start_m, q_len, k_len, offset, DOC_START, DOC_END, doc_row, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N
        )

        # Invariant: dq = sum over the key blocks seen so far of dS K; scaled at the end.
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _dq_keys(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            lo,
            hi,
            full_lo,
            full_hi,
            rows,
            cols0,
            dims,
            row_ok,
            dim_ok,
            doc_start,
            doc_end,
            skt,
            svt,
            k_len,
            offset,
            qk_scale,
            CAUSAL,
            HAS_DOCS,
            PRECISION,
            UPCAST,
            BLOCK_N,
        )

        tl.store(
            DQ + b * sdqb + h * sdqh + rows[:, None].to(tl.int64) * sdqt + dims[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=q_mask,
        )


class Tile(NamedTuple):
    """One kernel's launch: the resident and streamed block sizes (forward: query M × key N; backward: the
    tile a program owns × the tile its loop walks), warps and pipeline stages."""

    resident: int
    streamed: int
    warps: int
    stages: int


class _Blocks(NamedTuple):
    fwd_m: int
    fwd_n: int
    fwd_warps: int
    fwd_stages: int
    bwd_resident: int
    bwd_streamed: int
    bwd_warps: int
    bwd_stages: int

    @classmethod
    def of(cls, forward: Tile, backward: Tile) -> "_Blocks":
        return cls(*forward, *backward)

    @property
    def forward(self) -> Tile:
        return Tile(self.fwd_m, self.fwd_n, self.fwd_warps, self.fwd_stages)

    @property
    def backward(self) -> Tile:
        return Tile(self.bwd_resident, self.bwd_streamed, self.bwd_warps, self.bwd_stages)


#: Candidate tiles per (architecture class, head_dim tile), 16-bit inputs; the first is the default, the rest are
#: what the autotuner (``ZHLLM_FLASH_AUTOTUNE=1``) also times. Each compiles without register spills within
#: the class's shared memory (``python -m zhkernels.aot_check``; bf16, causal + documents, T = 2048):
#: "sm80" (A100, RTX 30xx/40xx: ~99 KB per block on the consumer cards, mma.sync) and "sm90" (H100/H200:
#: 227 KB, warpgroup MMA, which wants 64 rows per 4 warps, so its backward owns 128-row tiles with 8 warps).
FORWARD_TILES: dict[str, dict[int, list[Tile]]] = {
    "sm80": {
        64: [Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(128, 32, 8, 2)],  # 181, 179, 132 registers
        128: [Tile(128, 64, 8, 2), Tile(128, 32, 8, 3), Tile(64, 64, 4, 3)],  # 80 KB, 72 KB, 88 KB shared
        256: [Tile(64, 32, 8, 2), Tile(64, 32, 4, 2)],
    },
    "sm90": {
        64: [Tile(128, 64, 8, 3), Tile(128, 128, 8, 3), Tile(64, 64, 4, 3)],
        128: [Tile(128, 64, 8, 3), Tile(128, 64, 8, 2), Tile(128, 128, 8, 2)],
        256: [Tile(64, 32, 8, 2), Tile(128, 32, 8, 2), Tile(64, 64, 8, 2)],
    },
}
BACKWARD_TILES: dict[str, dict[int, list[Tile]]] = {
    "sm80": {
        64: [Tile(64, 32, 8, 2)],  # 4 warps spill 44 B in dK/dV
        128: [Tile(64, 32, 8, 2), Tile(64, 32, 8, 3), Tile(64, 16, 4, 2)],
        256: [Tile(32, 32, 8, 1), Tile(64, 16, 8, 2)],
    },
    "sm90": {
        64: [Tile(128, 32, 8, 2), Tile(128, 32, 8, 3), Tile(64, 32, 4, 2)],
        128: [Tile(128, 32, 8, 2), Tile(128, 32, 8, 3), Tile(64, 32, 8, 2)],
        256: [Tile(64, 16, 8, 2), Tile(32, 32, 8, 1)],
    },  # 32 × 32 falls back to mma.sync, unpipelined
}
#: float32 (tests): no tensor cores with input_precision="ieee", so the tiles stay small.
_BLOCKS_FP32 = {
    64: _Blocks(32, 32, 4, 2, 32, 16, 4, 2),
    # forward 32 × 32 spills ~700 B/thread on sm_86–90 (zhkernels.aot_check); a 4-warp backward spills ~500 B in dK/dV
    128: _Blocks(32, 16, 4, 2, 32, 16, 8, 2),
    256: _Blocks(32, 16, 8, 2, 16, 16, 8, 1),
}

#: Split the dK/dV grid over a GQA group's query heads until it has this many programs per SM (when it can).
DKDV_PROGRAMS_PER_SM = 2


def head_dim_tile(head_dim: int) -> int:
    """The power-of-two tile covering head_dim (at least 16, tl.dot's minimum); 96 pads to 128."""
    return max(16, _dispatch.next_power_of_2(head_dim))


def arch_class(arch: int) -> str:
    """The tile tables' name for compute capability ``arch`` (×10)."""
    return "sm90" if arch >= 90 else "sm80"


def candidates(kind: str, block_d: int, dtype: torch.dtype, arch: int) -> list[Tile]:
    """The tiles to consider for ``kind`` ("forward" or "backward"), default first."""
    if dtype == torch.float32:
        cfg = _BLOCKS_FP32[max(64, block_d)]
        return [cfg.forward if kind == "forward" else cfg.backward]
    return (FORWARD_TILES if kind == "forward" else BACKWARD_TILES)[arch_class(arch)][max(64, block_d)]


def _blocks(block_d: int, dtype: torch.dtype, device: torch.device, arch: int | None = None) -> _Blocks:
    """The default tiles for this head_dim tile, dtype and GPU (the tables above)."""
    if _dispatch.interpret_mode() and device.type == "cpu" and INTERPRET_BLOCKS is not None:
        fm, fn, br, bs = INTERPRET_BLOCKS
        return _Blocks(fm, fn, 4, 1, br, bs, 4, 1)
    arch = _dispatch.gpu_arch(device) if arch is None else arch
    return _Blocks.of(candidates("forward", block_d, dtype, arch)[0], candidates("backward", block_d, dtype, arch)[0])


def kv_split(programs: int, group: int, n_sms: int) -> int:
    """How many programs share one KV head's key block in the dK/dV kernel: a divisor of the GQA ``group``,
    the smallest that gives ``DKDV_PROGRAMS_PER_SM`` programs per SM (each split sums its share of the
    group's query heads into an fp32 slice; the slices are added after)."""
    split = 1
    for candidate in range(1, group + 1):
        if group % candidate == 0:
            split = candidate
            if programs * candidate >= DKDV_PROGRAMS_PER_SM * n_sms:
                break
    return split


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its last dimension is contiguous (the kernels read the rest through strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


_bthd = _dispatch.empty_bthd  # outputs laid out [B, T, H, D]: what the model reshapes to next


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, doc_bounds: torch.Tensor | None):
    """Launch arguments shared by the kernels: doc bounds (or placeholders), dot precision, D tile, block table."""
    if doc_bounds is not None and doc_bounds.numel():
        doc_start, doc_end = doc_bounds[0], doc_bounds[1]
    else:
        doc_start = doc_end = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    block_d = head_dim_tile(q.shape[-1])
    flags = dict(
        PRECISION="ieee",  # float32 stays exact (no TF32); 16-bit inputs ignore it
        UPCAST=q.dtype == torch.bfloat16 and _dispatch.interpret_mode(),  # the interpreter cannot tl.dot bf16
    )
    return doc_start, doc_end, doc_start.stride(0), flags, block_d, _blocks(block_d, q.dtype, q.device)


#: ``ZHLLM_FLASH_AUTOTUNE=1``: on CUDA, the first call of each (pass, GPU, dtype, head_dim tile, causal,
#: documents, length rounded up to a power of two) times every candidate tile of its architecture and keeps
#: the fastest for the rest of the process (each candidate compiles once: seconds per new key). Off by
#: default: the tables' first tiles are used. What was timed is kept in ``TUNING_LOG``.
AUTOTUNE = os.environ.get("ZHLLM_FLASH_AUTOTUNE", "0") not in ("", "0")
TUNING_LOG: list[dict[str, Any]] = []
_TUNED: dict[tuple, Tile] = {}


def _time_ms(fn: Callable[[], Any]) -> float:
    """Median GPU milliseconds of ``fn`` (Triton's benchmark helper, L2 flushed between calls)."""
    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def _pick(kind: str, default: Tile, q: torch.Tensor, causal: bool, has_docs: bool, run: Callable[[Tile], Any]) -> Tile:
    """The tile for one launch of ``kind``: the default, or with :data:`AUTOTUNE` the fastest candidate."""
    if not AUTOTUNE or q.device.type == "meta" or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return default
    arch = _dispatch.gpu_arch(q.device)
    block_d = head_dim_tile(q.shape[-1])
    key = (kind, arch, q.dtype, block_d, causal, has_docs, _dispatch.next_power_of_2(q.shape[2]))
    if key not in _TUNED:
        timed: dict[Tile, float] = {}
        for tile in candidates(kind, block_d, q.dtype, arch):
            try:
                timed[tile] = _time_ms(lambda: run(tile))
            except Exception as exc:  # e.g. out of shared memory on this card: not a candidate here
                log.warning("flash attention %s tile %s does not run here: %s", kind, tuple(tile), exc)
                continue
            TUNING_LOG.append(
                {
                    "pass": kind,
                    "arch": arch,
                    "dtype": str(q.dtype).removeprefix("torch."),
                    "head_dim_tile": block_d,
                    "causal": causal,
                    "docs": has_docs,
                    "seq_bucket": key[-1],
                    "shape": list(q.shape),
                    "tile": list(tile),
                    "ms": timed[tile],
                }
            )
        _TUNED[key] = min(timed, key=timed.get) if timed else default
        log.info("flash attention %s %s: tile %s", kind, key[1:], tuple(_TUNED[key]))
    return _TUNED[key]


def _launch_forward(
    tile: Tile, q, k, v, out, lse, doc_start, doc_end, s_doc, flags, block_d, causal, has_docs, scale
) -> None:
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    _flash_forward_kernel[(batch * n_q_heads, triton.cdiv(q_len, tile.resident))](
        q,
        k,
        v,
        out,
        lse,
        doc_start,
        doc_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        s_doc,
        n_q_heads,
        n_q_heads // n_kv_heads,
        q_len,
        k_len,
        head_dim,
        scale * 1.4426950408889634,
        CAUSAL=causal,
        HAS_DOCS=has_docs,
        **flags,
        BLOCK_M=tile.resident,
        BLOCK_N=tile.streamed,
        BLOCK_D=block_d,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )


@torch.library.custom_op("zhllm::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_bounds: Optional[torch.Tensor], causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): ``doc_bounds`` is :func:`zhkernels.reference.doc_bounds` of the doc ids, or None."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, n_q_heads, q_len, head_dim = q.shape
    out = _bthd(batch, n_q_heads, q_len, head_dim, q)
    lse = _dispatch.empty((batch, n_q_heads, q_len), torch.float32, q.device)
    if lse.numel() == 0:
        return out, lse
    doc_start, doc_end, s_doc, flags, block_d, cfg = _common(q, doc_bounds)
    has_docs = doc_bounds is not None

    def run(tile: Tile) -> None:
        _launch_forward(tile, q, k, v, out, lse, doc_start, doc_end, s_doc, flags, block_d, causal, has_docs, scale)

    run(_pick("forward", cfg.forward, q, causal, has_docs, run))
    return out, lse


@flash_attention_forward.register_fake
def _(q, k, v, doc_bounds, causal, scale):
    batch, n_q_heads, q_len, head_dim = q.shape
    lse = q.new_empty((batch, n_q_heads, q_len), dtype=torch.float32)
    return _bthd(batch, n_q_heads, q_len, head_dim, q, fake=True), lse


def _dkdv_outputs(k: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """dK, dV for the kernel to write: the outputs themselves (split 1), else the first ``[B, Hk, T, D]`` slice
    of fp32 ``[split, B, T, Hk, D]`` buffers, the slices ``s_split`` elements apart."""
    batch, n_kv_heads, k_len, head_dim = k.shape
    if split == 1:
        return _bthd(batch, n_kv_heads, k_len, head_dim, k), _bthd(batch, n_kv_heads, k_len, head_dim, k), 0
    shape = (split, batch, k_len, n_kv_heads, head_dim)
    dk, dv = (_dispatch.empty(shape, torch.float32, k.device) for _ in range(2))
    return dk[0].transpose(1, 2), dv[0].transpose(1, 2), dk[0].numel()


def _sum_slices(first: torch.Tensor, split: int, dtype: torch.dtype) -> torch.Tensor:
    """The sum of the ``split`` fp32 slices that start at ``first`` (from :func:`_dkdv_outputs`), in ``dtype``."""
    batch, heads, seq, dim = first.shape
    slices = first.transpose(1, 2).as_strided(
        (split, batch, seq, heads, dim), (first.numel(), seq * heads * dim, heads * dim, dim, 1)
    )
    return slices.sum(0).to(dtype).transpose(1, 2)


def _launch_backward(
    tile: Tile, grad_out, q, k, v, out, lse, dq, doc_start, doc_end, s_doc, flags, block_d, causal, has_docs, scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta, then dK/dV (split over the GQA group when the grid is small), then dQ into ``dq``; returns (dk, dv)."""
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    delta = _dispatch.empty((batch, n_q_heads, q_len), torch.float32, q.device)
    _flash_backward_delta_kernel[(batch * n_q_heads, triton.cdiv(q_len, tile.resident))](
        out,
        grad_out,
        delta,
        *_strides(out),
        *_strides(grad_out),
        n_q_heads,
        q_len,
        head_dim,
        BLOCK_M=tile.resident,
        BLOCK_D=block_d,
    )
    shared = dict(
        CAUSAL=causal, HAS_DOCS=has_docs, BLOCK_D=block_d, **flags, num_warps=tile.warps, num_stages=tile.stages
    )
    key_blocks = triton.cdiv(k_len, tile.resident)
    split = kv_split(batch * n_kv_heads * key_blocks, group, _dispatch.sm_count(q.device))
    dk, dv, s_split = _dkdv_outputs(k, split)
    _flash_backward_dkdv_kernel[(batch * n_kv_heads * split, key_blocks)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        doc_start,
        doc_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(grad_out),
        *_strides(dk),
        *_strides(dv),
        s_doc,
        s_split,
        n_q_heads,
        n_kv_heads,
        group,
        split,
        q_len,
        k_len,
        head_dim,
        scale * 1.4426950408889634,
        scale,
        BLOCK_M=tile.streamed,
        BLOCK_N=tile.resident,
        **shared,
    )
    if split > 1:
        dk, dv = _sum_slices(dk, split, k.dtype), _sum_slices(dv, split, v.dtype)
    _flash_backward_dq_kernel[(batch * n_q_heads, triton.cdiv(q_len, tile.resident))](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        doc_start,
        doc_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(grad_out),
        *_strides(dq),
        s_doc,
        n_q_heads,
        group,
        q_len,
        k_len,
        head_dim,
        scale * 1.4426950408889634,
        scale,
        BLOCK_M=tile.resident,
        BLOCK_N=tile.streamed,
        **shared,
    )
    return dk, dv


@torch.library.custom_op("zhllm::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    doc_bounds: Optional[torch.Tensor],
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, q, k, v, out = (_unit_last(t) for t in (grad_out, q, k, v, out))
    lse = lse.contiguous()
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    dq = _bthd(batch, n_q_heads, q_len, head_dim, q)
    if q.numel() == 0 or k.numel() == 0:  # nothing attended: every gradient is zero
        return (
            dq.zero_(),
            _bthd(batch, n_kv_heads, k_len, head_dim, k).zero_(),
            _bthd(batch, n_kv_heads, k_len, head_dim, v).zero_(),
        )
    doc_start, doc_end, s_doc, flags, block_d, cfg = _common(q, doc_bounds)
    has_docs = doc_bounds is not None

    def run(tile: Tile) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_backward(
            tile, grad_out, q, k, v, out, lse, dq, doc_start, doc_end, s_doc, flags, block_d, causal, has_docs, scale
        )

    dk, dv = run(_pick("backward", cfg.backward, q, causal, has_docs, run))
    return dq, dk, dv


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, doc_bounds, causal, scale):
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    return (
        _bthd(batch, n_q_heads, q_len, head_dim, q, fake=True),
        _bthd(batch, n_kv_heads, k_len, head_dim, k, fake=True),
        _bthd(batch, n_kv_heads, k_len, head_dim, v, fake=True),
    )


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd for the fused op: saves the inputs, the output and the log-sum-exp; backward recomputes P."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_bounds: torch.Tensor | None,
        causal: bool,
        scale: float,
    ) -> torch.Tensor:
        out, lse = torch.ops.zhllm.flash_attention_forward(q, k, v, doc_bounds, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, doc_bounds)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse, doc_bounds = ctx.saved_tensors
        dq, dk, dv = torch.ops.zhllm.flash_attention_backward(
            grad_out, q, k, v, out, lse, doc_bounds, ctx.causal, ctx.scale
        )
        return dq, dk, dv, None, None, None


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    doc_ids: torch.Tensor | None,
    doc_bounds: torch.Tensor | None = None,
) -> None:
    """One-line errors for shapes, dtypes and devices the op does not take."""
    name = "flash_attention"
    qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [B, H, T, D], got {qs}, {ks}, {vs}")
    if ks != vs:
        raise ValueError(f"{name}: k {ks} and v {vs} must have the same shape")
    if qs[0] != ks[0] or qs[-1] != ks[-1]:
        raise ValueError(f"{name}: q {qs} and k {ks} need the same batch size and head_dim")
    if ks[1] == 0 or qs[1] % ks[1]:
        raise ValueError(f"{name}: {qs[1]} query heads must be a multiple of {ks[1]} key/value heads (GQA)")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{name}: q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    _dispatch.check_float("q", q)
    _dispatch.check_same_device(q=q, k=k, v=v, doc_ids=doc_ids, doc_bounds=doc_bounds)
    if causal and qs[2] > ks[2]:
        raise ValueError(f"{name}: causal needs Tq <= Tk (got {qs[2]} > {ks[2]}): early queries would see no key")
    if doc_ids is not None:
        if tuple(doc_ids.shape) != (ks[0], ks[2]):
            raise ValueError(f"{name}: doc_ids must be [B, Tk] = {(ks[0], ks[2])}, got {tuple(doc_ids.shape)}")
        if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
            raise TypeError(f"{name}: doc_ids must be an integer tensor, got {doc_ids.dtype}")
        if qs[2] != ks[2]:
            raise ValueError(f"{name}: doc_ids needs Tq == Tk (got {qs[2]} and {ks[2]}); mask a KV cache another way")
    if doc_bounds is not None:
        if doc_ids is not None:
            raise ValueError(f"{name}: pass doc_ids or doc_bounds (reference.doc_bounds of them), not both")
        if tuple(doc_bounds.shape) != (2, ks[0], ks[2]) or doc_bounds.dtype != torch.int32:
            raise ValueError(
                f"{name}: doc_bounds must be int32 [2, B, Tk] = {(2, ks[0], ks[2])} from "
                f"zhkernels.reference.doc_bounds, got {doc_bounds.dtype} {tuple(doc_bounds.shape)}"
            )
        if qs[2] != ks[2]:
            raise ValueError(f"{name}: doc_bounds needs Tq == Tk (got {qs[2]} and {ks[2]})")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    doc_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention, ``q [B, Hq, Tq, D]`` against ``k``/``v`` ``[B, Hk, Tk, D]`` (GQA), in the inputs' dtype.

    Same contract as :func:`zhkernels.reference.flash_attention`: causal aligned to the end when Tq < Tk,
    ``doc_ids [B, T]`` keeps each token inside its document (contiguous runs), ``scale`` defaults to
    ``D ** -0.5``. A model with many layers passes ``doc_bounds = zhkernels.reference.doc_bounds(doc_ids)``
    instead, computed once per step rather than in every layer's forward and backward. The Triton kernels
    take head_dim up to 256.
    """
    _check_inputs(q, k, v, causal, doc_ids, doc_bounds)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not _dispatch.use_triton(q, k, v, doc_ids, doc_bounds):
        return reference.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids, scale=scale, doc_bounds=doc_bounds)
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"flash_attention: head_dim {q.shape[-1]} is outside the kernels' 1..{MAX_HEAD_DIM}; "
            "call zhkernels.reference.flash_attention instead"
        )
    if doc_ids is not None:
        doc_bounds = reference.doc_bounds(doc_ids)
    return FlashAttentionFunction.apply(q, k, v, doc_bounds, causal, scale)


class FlashAttention(nn.Module):
    """Attention core of a transformer block: ``FlashAttention(causal=True)(q, k, v, doc_ids=None)``."""

    def __init__(self, causal: bool = True, scale: float | None = None) -> None:
        super().__init__()
        self.causal = causal
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        doc_bounds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return flash_attention(q, k, v, causal=self.causal, doc_ids=doc_ids, scale=self.scale, doc_bounds=doc_bounds)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}"
