"""Weight-only quantisation as a model transform, for inference: ``quantize_model(model, "int4-g64")``.

Schemes (``--quant``): ``int8`` (symmetric, one scale per output channel) and ``int4-g32`` / ``int4-g64`` /
``int4-g128`` (groups of K, symmetric), each int4 also ``-asym`` (a 4-bit zero point per group). The formats and
the quantisers are :mod:`zhkernels.quant`'s. Every attention and MLP projection (q k v o, gate up down) becomes a
:class:`QuantLinear`; the embeddings, the norms and ``lm_head`` keep the model's precision: llama.cpp keeps the
output layer wider for small models too, ``lm_head`` is often tied to the embeddings, and the fused losses and
log-prob kernels (``llama.evaluate``'s perplexity among them) read its weight matrix directly.

Where a quantised matmul runs:

- CUDA: the Triton kernels of :mod:`zhkernels.quant` (with ``kernels="torch"``: dequantise, then matmul).
- CPU, int8: ``torch.ops.aten._weight_int8pack_mm`` (int8 [N, K] weights, scales in x's dtype), except bfloat16
  activations with K not a multiple of 16, where that op crashes or returns garbage in torch 2.13 (seen here):
  those dequantise, then matmul.
- CPU, int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the weight repacked once, at the first call, by
  ``_convert_weight_to_int4pack_for_cpu`` (rows padded to a multiple of 16, activations to the padded K; the
  repacked copy is not saved and is dropped when the layer moves).
- Either op missing, or failing a small probe against the reference: dequantise, then matmul (logged once, with
  the reason).

Quantised layers are inference-only: putting the model in training mode, or calling it on inputs that need
gradients, is refused with a one-line error. Quantise after choosing the device and dtype (the scales are stored
in the weights' dtype and follow later ``.to(dtype)`` casts).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import zhkernels
from zhkernels import quant, reference

log = logging.getLogger("llama.quantize")

#: Every ``--quant`` spelling accepted.
SCHEMES = ("int8",) + tuple(f"int4-g{g}{a}" for g in quant.GROUP_SIZES for a in ("", "-asym"))
#: The projections quantised (module names' last parts); embeddings, norms and lm_head are left alone.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantScheme:
    """``bits`` 8 or 4; ``group_size`` for int4 (0 for int8: per channel); ``asymmetric`` zero points (int4)."""

    bits: int
    group_size: int = 0
    asymmetric: bool = False

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("-asym" if self.asymmetric else "")


def parse_quant(spec: str | QuantScheme) -> QuantScheme:
    """``"int8"``, ``"int4-g64"``, ``"int4-g128-asym"``, … → :class:`QuantScheme`; anything else a one-line error."""
    if isinstance(spec, QuantScheme):
        return spec
    text = str(spec).strip().lower()
    if text not in SCHEMES:
        raise ValueError(f"--quant {spec!r} is not a quantisation scheme: use one of {', '.join(SCHEMES)}")
    if text == "int8":
        return QuantScheme(8)
    parts = text.split("-")
    return QuantScheme(4, int(parts[1][1:]), len(parts) == 3)


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` stored as int8 or int4 codes plus scales (buffers: they are saved in the state dict
    and follow ``.to(device)``; the float scales follow ``.to(dtype)``)."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, use_kernels: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        self.use_kernels = use_kernels  # CUDA: Triton (True) or dequantise-then-matmul (the model's kernels="torch")
        weight = linear.weight.detach()
        if scheme.bits == 8:
            qweight, scales = quant.quantize_int8(weight)
            zeros = None
        else:
            qweight, scales, zeros = quant.quantize_int4(weight, scheme.group_size, scheme.asymmetric)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # None (not in the state dict) unless int4 asymmetric
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self._cpu_int4: tuple[torch.dtype, torch.Tensor, torch.Tensor] | None = None  # aten's repacked weight
        super().train(False)

    def train(self, mode: bool = True) -> "QuantLinear":
        if mode:
            raise ValueError(
                f"{self.scheme.name} quantised layers are inference-only: train the unquantised model and quantise "
                "it for inference (--quant)"
            )
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._cpu_int4 = None  # a move or a cast invalidates the repacked copy
        return super()._apply(fn, *args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight these codes stand for (the spec every path is compared with)."""
        if self.scheme.bits == 8:
            return reference.dequantize_int8(self.qweight, self.scales)
        return reference.dequantize_int4(
            self.qweight, self.scales, self.zeros, self.scheme.group_size, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"{self.scheme.name} quantised layers are inference-only: call the model under torch.no_grad(), "
                "or train the unquantised model"
            )
        if x.device.type == "cpu":
            out = self._forward_cpu(x)
        elif self.use_kernels:
            out = self._forward_kernels(x)
        else:
            out = self._forward_reference(x)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def _forward_kernels(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.bits == 8:
            return zhkernels.int8_matmul(x, self.qweight, self.scales)
        return zhkernels.int4_matmul(x, self.qweight, self.scales, self.zeros, self.scheme.group_size, self.in_features)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.bits == 8:
            return reference.int8_matmul(x, self.qweight, self.scales)
        return reference.int4_matmul(x, self.qweight, self.scales, self.zeros, self.scheme.group_size, self.in_features)

    def cpu_op(self, dtype: torch.dtype) -> str:
        """The op a CPU call with ``dtype`` activations runs: an ``aten`` op's name, or ``"reference"``."""
        kind = "int8" if self.scheme.bits == 8 else "int4"
        problem = _cpu_op_problem(kind, dtype)
        if problem is None and kind == "int8" and dtype == torch.bfloat16 and self.in_features % 16:
            problem = f"bfloat16 with K={self.in_features}, not a multiple of 16, crashes it in this torch"
        if problem is not None:
            _log_fallback(kind, problem)
            return "reference"
        return CPU_OPS[kind]

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_op(x.dtype) == "reference":
            return self._forward_reference(x)
        rows = x.reshape(-1, self.in_features).contiguous()
        if self.scheme.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales.to(x.dtype))
        else:
            if self._cpu_int4 is None or self._cpu_int4[0] != x.dtype:
                self._cpu_int4 = (x.dtype, *_aten_int4_weight(self.qweight, self.scales, self.zeros, x.dtype))
            _, packed, scale_and_zeros = self._cpu_int4
            padded_k = self.qweight.shape[1] * 2
            rows = F.pad(rows, (0, padded_k - self.in_features)) if padded_k > self.in_features else rows
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.scheme.group_size, scale_and_zeros)
            out = out[:, : self.out_features]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}"


#: The aten op each CPU path runs when the probe passes.
CPU_OPS = {"int8": "aten._weight_int8pack_mm", "int4": "aten._weight_int4pack_mm_for_cpu"}


def _aten_int4_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 layout → aten's CPU one: codes repacked by ``_convert_weight_to_int4pack_for_cpu`` (rows padded to a
    multiple of 16 with zero weights) and ``[G, N16, 2]`` (scale, ``(8 - zero) * scale``): aten dequantises
    ``(code - 8) * scale + that``."""
    codes = reference.int4_unpack(qweight).to(torch.int32)
    n = codes.shape[0]
    pad_rows = -n % 16
    scale = scales.float()
    zero = zeros.float() if zeros is not None else torch.full_like(scale, 8)
    offset = (8 - zero) * scale
    if pad_rows:
        codes = F.pad(codes, (0, 0, 0, pad_rows), value=8)
        scale, offset = F.pad(scale, (0, pad_rows)), F.pad(offset, (0, pad_rows))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, torch.stack([scale, offset], dim=-1).to(dtype).contiguous()


@functools.lru_cache(maxsize=None)
def _cpu_op_problem(kind: str, dtype: torch.dtype) -> str | None:
    """Why the aten CPU op for ``kind`` cannot be used with ``dtype`` activations in this torch (None: it can):
    absent, raising, or off the reference on a small probe (sizes where torch 2.13's ops are known good)."""
    name = CPU_OPS[kind].split(".", 1)[1]
    if not hasattr(torch.ops.aten, name):
        return f"this torch {torch.__version__} has no torch.ops.{CPU_OPS[kind]}"
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 128, generator=generator)
    x = torch.randn(3, 128, generator=generator).to(dtype)
    layer = QuantLinear(_with_weight(weight), QuantScheme(8) if kind == "int8" else QuantScheme(4, 32, True))
    with torch.no_grad():
        expected = layer._forward_reference(x).float()
        try:
            if kind == "int8":
                got = torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales.to(dtype))
            else:
                packed, sz = _aten_int4_weight(layer.qweight, layer.scales, layer.zeros, dtype)
                got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            return f"torch.ops.{CPU_OPS[kind]} failed on a probe ({str(e).splitlines()[0][:120]})"
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    error = ((got.float() - expected).abs().max() / expected.abs().max()).item()
    if not error <= tolerance:
        return f"torch.ops.{CPU_OPS[kind]} is off the reference by {error:.2g} (relative) on a probe"
    return None


def _with_weight(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@functools.lru_cache(maxsize=None)
def _log_fallback(kind: str, problem: str) -> None:
    log.warning("%s on CPU: dequantise, then matmul (slower): %s", kind, problem)


def quantize_model(model: nn.Module, scheme: str | QuantScheme) -> nn.Module:
    """Replace the model's attention and MLP projections by :class:`QuantLinear` (in place; returns the model, in
    eval mode). Refused for a model already quantised or without such layers."""
    scheme = parse_quant(scheme)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantised; quantise the unquantised model once")
    options = getattr(model, "options", None)
    use_kernels = getattr(options, "kernels", "auto") != "torch"
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]
    if not targets:
        raise ValueError(f"--quant {scheme.name}: the model has no {'/'.join(TARGETS)} linear layers to quantise")
    model.eval()
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear(linear, scheme, use_kernels))
    log.info("quantised %d linear layers to %s (embeddings, norms and lm_head kept)", len(targets), scheme.name)
    return model


def quantize_transform(scheme: str | QuantScheme) -> Callable[[nn.Module], nn.Module]:
    """A ``ModelTransform`` (``Llama -> Llama``) quantising with ``scheme`` (checked now, applied later)."""
    parsed = parse_quant(scheme)
    return lambda model: quantize_model(model, parsed)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (a tensor shared by two names counted once): what a save writes."""
    seen: dict[tuple, int] = {}
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        seen[key] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
