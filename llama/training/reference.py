"""The DPO reference model's sequence log-probs, so the reference never needs to sit beside the policy.

By default (``--ref precompute``) one pass before training computes every pair's ``[chosen, rejected]``
log-probs with the reference checkpoint and caches them beside the data, keyed by the dataset's sha256, the
reference's weights sha256, the sequence length and the precision (``NAME.ref-<key>.npy``; a resumed run or a
second run on the same data and reference reuses it); training then holds one model. ``--ref online`` runs a
frozen copy of the reference during training instead, and a LoRA run's online reference is the policy itself
with its adapters switched off (the same weights, no copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.dataset import DPODataset
from engine.format import DatasetPaths
from engine.publish import file_sha256, fsync, temporary_sibling

from ..lora import adapters_disabled, lora_layers
from .dpo import sequence_logps
from .objectives import place_frozen

log = logging.getLogger(__name__)

REF_MODES = ("precompute", "online")


def dataset_sha256(prefix: Path) -> str:
    """One sha256 over a packed dataset's token, offset and mask files (what a reference pass reads)."""
    paths = DatasetPaths.of(prefix)
    digest = hashlib.sha256()
    for path in (paths.bin, paths.idx, paths.mask):
        digest.update(f"{path.name}:{file_sha256(path)};".encode())
    return digest.hexdigest()


def cache_path(prefix: Path, dataset_sha: str, reference_sha: str, seq_len: int, precision: str) -> Path:
    """Where a reference pass over ``prefix`` is cached: beside the data, named by everything its numbers depend on."""
    key = json.dumps([dataset_sha, reference_sha, seq_len, precision]).encode()
    paths = DatasetPaths.of(prefix)
    return paths.bin.with_name(f"{paths.bin.stem}.ref-{hashlib.sha256(key).hexdigest()[:16]}.npy")


@torch.no_grad()
def reference_pass(
    model: nn.Module, dataset: DPODataset, rows: int, autocast: Any = None, progress: bool = True
) -> np.ndarray:
    """Every stored pair's ``[chosen, rejected]`` log-probs under ``model`` (float64 ``[stored pairs, 2]``; NaN
    for the pairs the dataset dropped), ``rows`` packed rows at a time."""
    model.eval()
    device = next(model.parameters()).device
    table = np.full((dataset.stored_pair_count, 2), np.nan, dtype=np.float64)
    with tqdm(total=dataset.n_pairs, desc="reference log-probs", unit="pair", disable=not progress) as bar:
        for batch in dataset.pairs_in_order(rows):
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast or nullcontext():
                logps, _ = sequence_logps(model, batch)
            table[batch["pair_index"].cpu().numpy()] = logps.double().cpu().numpy()
            bar.update(int(batch["pair_index"].shape[0]))
    return table


def save_table(path: Path, table: np.ndarray) -> None:
    """Write the cache atomically (a crash leaves no half file under the final name)."""
    tmp = temporary_sibling(path)
    with open(tmp, "wb") as f:
        np.save(f, table)
    fsync(tmp)
    os.replace(tmp, path)


def load_table(path: Path, stored_pairs: int) -> np.ndarray | None:
    """A cached table, or None when there is none or it does not fit (then it is computed again)."""
    if not path.is_file():
        return None
    try:
        table = np.load(path)
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): computing the reference log-probs again", path, e)
        return None
    if table.shape != (stored_pairs, 2):
        log.warning("%s holds %s values, the data %d pairs: computing them again", path, table.shape, stored_pairs)
        return None
    return table


class CachedReference:
    """Reference log-probs looked up by ``pair_index`` in the tables of the training and validation sets."""

    def __init__(self, train: np.ndarray, val: np.ndarray | None = None) -> None:
        self.tables = {
            False: torch.from_numpy(train).float(),
            True: None if val is None else torch.from_numpy(val).float(),
        }

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], validation: bool) -> torch.Tensor:
        table = self.tables[validation]
        if table is None:
            raise ValueError("no reference log-probs were computed for the validation set")
        index = batch["pair_index"]
        if table.device != index.device:  # once per run: the tables are small ([pairs, 2])
            table = self.tables[validation] = table.to(index.device)
        return table[index]


class OnlineReference:
    """Reference log-probs from a model run now, without gradients: a frozen copy, or (``model=None``) the policy
    with its LoRA adapters switched off."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        if model is not None:
            model.requires_grad_(False).eval()

    def __call__(self, policy: nn.Module, batch: dict[str, torch.Tensor], validation: bool) -> torch.Tensor:
        with torch.no_grad():
            if self.model is not None:  # on the batch's device, in the run's precision, from the first call on
                return sequence_logps(place_frozen(self.model, batch["input_ids"].device), batch)[0]
            if not any(True for _ in lora_layers(policy)):
                raise ValueError("an adapters-off reference needs a LoRA run (--lora)")
            with adapters_disabled(policy):
                return sequence_logps(policy, batch)[0]
