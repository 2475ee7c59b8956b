"""RoPE cos/sin tables, plain or stretched past the trained context the way Hugging Face's ``rope_type``s do it.

A scaling is a dict in :class:`llama.model.LlamaConfig` (``rope_scaling``), for inference beyond the length
the model was trained on (``original_max_seq_len``):

- ``{"type": "linear", "factor": f}``: every frequency divided by ``f`` (position interpolation,
  kaiokendev / Chen et al. 2023), HF ``rope_type="linear"``.
- ``{"type": "dynamic", "factor": f, "original_max_seq_len": n}`` (alias ``"ntk"``): for a sequence of
  ``T > n`` tokens the base becomes ``theta * (f * T / n - (f - 1)) ** (d / (d - 2))`` (NTK-aware,
  bloc97 / emozilla), HF ``rope_type="dynamic"``; at ``T <= n`` it is plain RoPE. Stateless here: the base
  follows the length of the current input, where HF's module remembers the longest length it has seen.
- ``{"type": "yarn", "factor": f, "original_max_seq_len": n, "beta_fast": 32, "beta_slow": 1,
  "attention_factor": None}``: YaRN (Peng et al. 2023), HF ``rope_type="yarn"``: high frequencies kept,
  low ones interpolated, a linear ramp between (dims from ``beta_fast``/``beta_slow`` rotations, truncated
  to whole dims as HF does by default), and cos/sin multiplied by ``attention_factor``, by default
  ``0.1 * ln(f) + 1``.

Frequencies and angles are computed in float64 and the tables stored in float32; Hugging Face computes
``inv_freq`` in float32, so its values agree with ours to float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Our type names → Hugging Face ``rope_type``.
ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic", "ntk": "dynamic", "yarn": "yarn"}
_KEYS = {
    "linear": {"type", "factor", "original_max_seq_len"},
    "dynamic": {"type", "factor", "original_max_seq_len"},
    "yarn": {"type", "factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor"},
}
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None}


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """A validated copy with the canonical type name and YaRN's defaults filled in; one-line errors."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict) or "type" not in scaling:
        raise ValueError(f"rope_scaling must be a dict with a 'type' ({', '.join(ROPE_TYPES)}), got {scaling!r}")
    kind = ROPE_TYPES.get(scaling["type"])
    if kind is None:
        raise ValueError(f"rope_scaling type {scaling['type']!r} is unknown; use one of {', '.join(ROPE_TYPES)}")
    unknown = set(scaling) - _KEYS[kind]
    if unknown:
        raise ValueError(f"rope_scaling {kind!r} takes keys {sorted(_KEYS[kind])}, not {sorted(unknown)}")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"rope_scaling factor must be a number >= 1 (the context stretch), got {factor!r}")
    out = {**(YARN_DEFAULTS if kind == "yarn" else {}), **scaling, "type": kind, "factor": float(factor)}
    original = out.get("original_max_seq_len")
    if kind != "linear" and original is None:
        raise ValueError(f"rope_scaling {kind!r} needs 'original_max_seq_len' (the context length it was trained at)")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ValueError(f"rope_scaling original_max_seq_len must be a positive int, got {original!r}")
    if kind == "yarn" and out["beta_fast"] < out["beta_slow"]:
        raise ValueError(f"rope_scaling yarn needs beta_fast >= beta_slow, got {out['beta_fast']} < {out['beta_slow']}")
    return out


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: blend of extrapolated (original) and interpolated (÷factor) frequencies along a ramp over the dims."""
    factor, original = scaling["factor"], scaling["original_max_seq_len"]

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times into the context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(scaling["beta_fast"])), 0)
    high = min(math.ceil(dim_of(scaling["beta_slow"])), head_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    attention_factor = scaling["attention_factor"]
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)


def inv_freq_and_attention_factor(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """``([head_dim // 2] float64 inverse frequencies, cos/sin multiplier)``, what HF's ROPE_INIT_FUNCTIONS return.

    ``seq_len`` matters only for ``dynamic``: the length of the sequence being run (at most the trained
    length means plain RoPE).
    """
    scaling = normalize_rope_scaling(scaling)
    if scaling is not None and scaling["type"] == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    base = theta
    if scaling is not None and scaling["type"] == "dynamic":
        original, factor = scaling["original_max_seq_len"], scaling["factor"]
        length = max(seq_len or original, original)
        base = theta * (factor * length / original - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None and scaling["type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq, 1.0


def rope_tables(
    n_positions: int,
    head_dim: int,
    theta: float = 10000.0,
    scaling: dict[str, Any] | None = None,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[n_positions, head_dim]`` cos and sin (HF rotate-half layout), scaled; angles in float64."""
    inv_freq, attention_factor = inv_freq_and_attention_factor(head_dim, theta, scaling, seq_len)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64, device=device), inv_freq.to(device))
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * attention_factor).float(), (emb.sin() * attention_factor).float()


def to_hf_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Our dict as HF's ``rope_scaling`` / ``rope_parameters`` entry (``rope_type``, HF's key names)."""
    scaling = normalize_rope_scaling(scaling)
    if scaling is None:
        return None
    out: dict[str, Any] = {"rope_type": scaling["type"], "factor": scaling["factor"]}
    if scaling["type"] == "yarn":
        out["original_max_position_embeddings"] = scaling["original_max_seq_len"]
        out.update({k: scaling[k] for k in ("beta_fast", "beta_slow", "attention_factor") if scaling[k] is not None})
    return out


def from_hf_rope_scaling(params: dict[str, Any] | None, max_position_embeddings: int) -> dict[str, Any] | None:
    """HF's rope dict (``rope_type`` or the older ``type``) as ours; None for plain RoPE. One-line error otherwise."""
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "dynamic", "yarn"):
        raise ValueError(f"RoPE type {kind!r} from transformers is not supported; use linear, dynamic or yarn")
    out: dict[str, Any] = {"type": kind, "factor": float(params["factor"])}
    if kind == "dynamic":
        out["original_max_seq_len"] = int(max_position_embeddings)  # HF's dynamic treats it as the trained length
    if kind == "yarn":
        out["original_max_seq_len"] = int(params.get("original_max_position_embeddings") or max_position_embeddings)
        out.update({k: params[k] for k in YARN_DEFAULTS if params.get(k) is not None})
    return normalize_rope_scaling(out)
