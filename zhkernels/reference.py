"""The plain-PyTorch definition of every op in ``kernels``: the spec the Triton kernels are tested against,
and what runs on CPU tensors (outside the Triton interpreter).

Each function does its arithmetic in float32 and returns the input dtype, which is what the fused
kernels do too. Autograd differentiates these directly; the Triton ops' hand-written backward
passes are tested against those gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension, statistics in float32.

    With ``residual``: ``h = x + residual`` (in the residual's dtype, which may be wider than x's) is
    normalised and ``(norm(h), h)`` is returned, ``h`` being the new residual stream. The output is in
    ``out_dtype``, by default h's dtype. (Hugging Face's LlamaRMSNorm rounds to the input dtype before
    multiplying by the weight; in float32 the two agree exactly.)
    """
    if residual is not None:
        x = (x.float() + residual.float()).to(residual.dtype)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (xf * rstd * weight.float()).to(out_dtype or x.dtype)
    return (out, x) if residual is not None else out


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[seq_len, head_dim]`` cos and sin tables of Llama's RoPE (Hugging Face layout: both halves repeat)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def gather_cos_sin(
    cos: torch.Tensor, sin: torch.Tensor, seq_len: int, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as ``[B or 1, 1, T, D]`` for broadcasting against ``[B, H, T, D]``.

    ``cos``/``sin`` are either a table ``[max_pos, D]`` (indexed by ``position_ids [B, T]``, or by
    ``0..T-1`` when it is None) or already per token, ``[B, T, D]`` (as Hugging Face passes them).
    """
    if cos.dim() == 3:
        if position_ids is not None:
            raise ValueError(
                "cos/sin are already per token ([B, T, D]); pass position_ids only with a [max_pos, D] table"
            )
        return cos[:, None], sin[:, None]
    if position_ids is None:
        return cos[:seq_len][None, None], sin[:seq_len][None, None]
    return cos[position_ids][:, None], sin[position_ids][:, None]


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [B, Hq, T, D]`` and ``k [B, Hk, T, D]`` by RoPE, Hugging Face's rotate-half convention.

    ``position_ids [B, T]`` picks each token's row of the table, so packed documents can restart at 0.
    """
    c, s = gather_cos_sin(cos, sin, q.shape[-2], position_ids)
    c, s = c.float(), s.float()
    qf, kf = q.float(), k.float()
    q_out = qf * c + rotate_half(qf) * s
    k_out = kf * c + rotate_half(kf) * s
    return q_out.to(q.dtype), k_out.to(k.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, computed in float32."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def doc_bounds(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's document as ``[start, end)``: int32 ``[2, B, T]`` (starts, then ends), documents being
    contiguous runs of one id (an id met again later starts a new one)."""
    batch, seq = doc_ids.shape
    idx = torch.arange(seq, device=doc_ids.device).expand(batch, seq)
    edge = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), edge], dim=1)
    last = torch.cat([edge, torch.ones_like(doc_ids[:, :1], dtype=torch.bool)], dim=1)
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
    end = torch.where(last, idx + 1, torch.full_like(idx, seq)).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([start, end]).to(torch.int32)


def attention_mask(
    q_len: int,
    k_len: int,
    causal: bool,
    doc_ids: torch.Tensor | None,
    device: torch.device,
    doc_bounds: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean ``[B or 1, 1, Tq, Tk]`` mask (True = attend). Causal is aligned to the end when Tq < Tk (as with a KV
    cache).
    Documents come as ``doc_ids [B, Tk]`` or as their :func:`doc_bounds` (then Tq == Tk)."""
    mask = None
    if causal:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=device)[:, None] + offset
        mask = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
    if doc_ids is not None:
        # A document is a contiguous run of one id (as packed rows are): an id met again later starts a new one.
        runs = torch.cumsum(torch.cat([torch.zeros_like(doc_ids[:, :1]), doc_ids[:, 1:] != doc_ids[:, :-1]], 1), 1)
        same_doc = (runs[:, -q_len:, None] == runs[:, None, :])[:, None]
        mask = same_doc if mask is None else mask & same_doc
    if doc_bounds is not None:
        keys = torch.arange(k_len, device=device)[None, None, :]
        same_doc = ((keys >= doc_bounds[0][:, :, None]) & (keys < doc_bounds[1][:, :, None]))[:, None]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    doc_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention: ``q [B, Hq, Tq, D]``, ``k``/``v`` ``[B, Hk, Tk, D]`` with ``Hq % Hk == 0`` (GQA).

    ``doc_ids [B, Tk]`` (integers) restricts each token to keys of its own document in a packed row; a
    document is a contiguous run of one id, so an id that comes back later in the row is a new document.
    ``doc_bounds`` (:func:`doc_bounds` of the ids) says the same. ``scale`` defaults to ``D ** -0.5``.
    Scores and softmax in float32.
    """
    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, doc_ids, q.device, doc_bounds)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vf).to(q.dtype)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, logits in float32.

    ``hidden [..., H]``, ``weight [V, H]``, ``targets [...]``. Tokens whose target is ``ignore_index``
    count for nothing; ``"mean"`` divides by the number of counted tokens (0 when there are none);
    ``z_loss`` adds ``z_loss * logsumexp**2`` per counted token (PaLM's auxiliary loss).
    ``reduction="none"`` returns the per-token losses (0 where ignored).
    """
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    t = targets.reshape(-1)
    logits = h @ weight.float().T
    lse = torch.logsumexp(logits, dim=-1)
    counted = t != ignore_index
    safe_t = torch.where(counted, t, torch.zeros_like(t))
    loss = lse - logits.gather(1, safe_t[:, None]).squeeze(1)
    if z_loss:
        loss = loss + z_loss * lse.pow(2)
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(targets.shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / counted.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T / temperature)`` at each target, logits in float32; 0 where ``ignore_index``.

    ``hidden [..., H]``, ``weight [V, H]``, ``targets [...]`` → ``[...]`` float32 log-probabilities.
    """
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    t = targets.reshape(-1)
    logits = (h @ weight.float().T).float() / temperature  # float32 even when autocast ran the matmul in 16 bits
    counted = t != ignore_index
    safe_t = torch.where(counted, t, torch.zeros_like(t))
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, safe_t[:, None]).squeeze(1)
    return torch.where(counted, logprobs, torch.zeros_like(logprobs)).reshape(targets.shape)


DIVERGENCES = ("forward", "reverse", "jsd")


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward", beta: float = 0.5
) -> torch.Tensor:
    """Per-row divergence between the softmaxes of ``teacher_logits`` (t) and ``student_logits`` (s), ``[N, V]``
    float32 → ``[N]``: ``forward`` KL(t‖s), ``reverse`` KL(s‖t), ``jsd`` β·KL(t‖m) + (1−β)·KL(s‖m) with the
    mixture m = β·t + (1−β)·s (TRL's GKD ``generalized_jsd_loss`` convention for 0 < β < 1)."""
    s, t = torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1)
    if kind == "forward":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}")


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "forward",
    beta: float = 0.5,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knowledge distillation ``(loss, ce, divergence)``, fp32 0-d: ``loss = (1−α)·ce + α·divergence``.

    ``student_hidden [..., Hs]`` with ``student_weight [V, Hs]``, ``teacher_hidden [..., Ht]`` with
    ``teacher_weight [V, Ht]`` (the two models share the vocabulary, nothing else), ``labels [...]``. Logits are
    float32; ``ce`` is the student's cross-entropy against ``labels`` at temperature 1; ``divergence`` is
    T²·:func:`token_divergence` of the temperature-T softmaxes (Hinton's scaling, so its gradient keeps its size
    as T changes). Both are means over the counted tokens (labels != ``ignore_index``; 0 when there are none).
    """
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).float()
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).float()
    flat = labels.reshape(-1)
    counted = flat != ignore_index
    s_logits, t_logits = s_hidden @ student_weight.float().T, t_hidden @ teacher_weight.float().T
    safe = torch.where(counted, flat, torch.zeros_like(flat))
    ce = torch.logsumexp(s_logits, -1) - s_logits.gather(1, safe[:, None]).squeeze(1)
    div = token_divergence(s_logits / temperature, t_logits / temperature, kind, beta) * temperature**2
    n = counted.sum().clamp(min=1)
    ce = torch.where(counted, ce, torch.zeros_like(ce)).sum() / n
    div = torch.where(counted, div, torch.zeros_like(div)).sum() / n
    return (1 - alpha) * ce + alpha * div, ce, div


# ---- weight-only quantisation (zhkernels.quant): the storage formats, and dequantise-then-matmul ----------------
#
# int8, per output channel, symmetric: ``qweight`` int8 [N, K] in -127..127, ``scales`` [N]; W = qweight * scales.
# int4, group-wise along K: ``qweight`` uint8 [N, Kp // 2], two 4-bit codes 0..15 a byte (column 2j in the low
# nibble, 2j+1 in the high one), K padded with zero weights to Kp, a multiple of ``group_size``; ``scales`` [G, N]
# and, when asymmetric, ``zeros`` uint8 [G, N] (codes 0..15; symmetric means zero point 8), G = Kp / group_size
# (GPTQ's [groups, N] orientation). W[n, k] = (code[n, k] - zero[k // group_size, n]) * scale[k // group_size, n].


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 (K even) → ``uint8 [N, K // 2]``: column 2j in the low nibble, 2j+1 in the high one."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`int4_pack`: ``uint8 [N, K // 2]`` → ``uint8 [N, K]`` codes 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``float32 [N, K]``: ``qweight * scales[:, None]``."""
    return qweight.float() * scales.float()[:, None]


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, in_features: int
) -> torch.Tensor:
    """``float32 [N, in_features]``: ``(code - zero) * scale`` per group, the padding columns dropped."""
    codes = int4_unpack(qweight).float()  # [N, Kp]
    zero = zeros.float() if zeros is not None else torch.full_like(scales, 8, dtype=torch.float32)
    per_column = lambda t: t.t().repeat_interleave(group_size, dim=1)  # noqa: E731  [G, N] → [N, Kp]
    return ((codes - per_column(zero)) * per_column(scales.float()))[:, :in_features]


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for an int8 weight ``W``: dequantised and multiplied in float32, returned in x's dtype."""
    return (x.float() @ dequantize_int8(qweight, scales).t()).to(x.dtype)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T`` for a group-wise int4 weight ``W``: dequantised and multiplied in float32, returned in x's dtype."""
    weight = dequantize_int4(qweight, scales, zeros, group_size, in_features)
    return (x.float() @ weight.t()).to(x.dtype)
