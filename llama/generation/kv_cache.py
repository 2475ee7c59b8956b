"""A preallocated key/value cache for generation: every layer's K and V, written in place, one step at a time.

Keys and values are stored per key/value head (``[layers, B, n_kv_heads, max_len, head_dim]``), so a
grouped-query model keeps ``n_heads / n_kv_heads`` times less than a repeated cache would. All rows share
one write position (``length``): batched prompts are padded on the left so that they end together, and
``key_mask`` marks the padding slots that no query may attend to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import Llama


class KVCache:
    """Keys and values of ``length`` tokens for every layer; a forward with ``cache=`` appends its tokens."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # slots 0..length-1 hold keys and values, the same count in every row
        self.key_mask: torch.Tensor | None = None  # [B, max_len] bool, False at left padding; None = no padding

    @classmethod
    def for_model(
        cls, model: "Llama", batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> "KVCache":
        """An empty cache shaped for ``model`` on its device, in the dtype its keys will have; ``max_len`` ≤
        max_seq_len."""
        config = model.config
        max_len = config.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= config.max_seq_len:
            raise ValueError(f"KVCache: max_len {max_len} must be in 1..max_seq_len {config.max_seq_len}")
        weight = next(model.parameters())
        if dtype is None:  # the dtype the keys will have: autocast's when it is on, else the weights'
            on = torch.is_autocast_enabled(weight.device.type)
            dtype = torch.get_autocast_dtype(weight.device.type) if on else weight.dtype
        return cls(
            config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim, dtype=dtype, device=weight.device
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def mask_padding(self, prompt_mask: torch.Tensor) -> None:
        """Mark the prompt's padding (``prompt_mask [B, T]``, False at pads) so attention skips those slots."""
        batch, seq = prompt_mask.shape
        if batch != self.batch_size or seq > self.max_len:
            raise ValueError(
                f"KVCache: prompt mask {tuple(prompt_mask.shape)} does not fit a cache of "
                f"{self.batch_size} rows × {self.max_len} slots"
            )
        mask = torch.ones(batch, self.max_len, dtype=torch.bool, device=self.k.device)
        mask[:, :seq] = prompt_mask.to(device=mask.device, dtype=torch.bool)
        self.key_mask = mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v [B, n_kv_heads, T, D]`` after the cached tokens; return all of them (views, no copy)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} tokens do not fit its {self.max_len} slots; build a longer cache")
        if k.dtype != self.k.dtype:
            raise TypeError(
                f"KVCache: keys are {k.dtype} but the cache holds {self.k.dtype}; "
                "build it with dtype= the model's compute dtype"
            )
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` more as cached (the model calls it once every layer has written them)."""
        self.length += n_tokens

    def attention_mask(self, q_len: int) -> torch.Tensor | None:
        """``[B, 1, Tq, Tk]`` bool (True = attend) for the newest ``q_len`` tokens, or None when nothing is padded.

        Causal, aligned to the end, and blind to padding. A padding query that would see no key at all sees
        the keys causal allows instead: its output is never used, but an all-masked softmax would be NaN, and a
        NaN value behind a masked key still poisons the real rows (0 * NaN).
        """
        if self.key_mask is None:
            return None
        k_len = self.length + q_len
        rows = torch.arange(q_len, device=self.k.device)[:, None] + self.length
        causal = torch.arange(k_len, device=self.k.device)[None, :] <= rows  # [Tq, Tk]
        mask = causal[None] & self.key_mask[:, None, :k_len]
        mask = torch.where(mask.any(-1, keepdim=True), mask, causal[None])
        return mask[:, None]

    def reorder(self, index: torch.Tensor) -> None:
        """Rows become the rows at ``index`` (beam search picks and repeats beams; the batch size may change)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
