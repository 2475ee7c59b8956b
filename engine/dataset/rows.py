"""Loss-masked documents laid into rows: the label rule SFT and DPO share, and per-document mask statistics.

The label rule: ``labels[t] = tokens[t + 1]`` when ``mask[t + 1] == 1`` and ``t + 1`` is still inside the
same (possibly truncated) document, else ``IGNORE_INDEX``. So nothing is predicted across documents
and the last kept position of each document predicts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .base import IGNORE_INDEX


@dataclass
class LabelStats:
    """Per document: where the first loss token is, and how many targets it has whole and after truncation."""

    first_label: np.ndarray  # index inside the document of the first mask-1 token (= its length if none)
    labels_total: np.ndarray  # targets of the whole document: mask-1 tokens at positions 1..n-1
    labels_kept: np.ndarray  # targets left when the document is cut to its first ``keep`` tokens


@numba.njit(cache=True)
def _scan_masks(mask: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_docs = offsets.shape[0] - 1
    first = np.empty(n_docs, dtype=np.int64)
    total = np.zeros(n_docs, dtype=np.int64)
    kept = np.zeros(n_docs, dtype=np.int64)
    for d in range(n_docs):
        start, length = offsets[d], offsets[d + 1] - offsets[d]
        first[d] = length
        for j in range(length):
            if mask[start + j] != 0:
                if first[d] == length:
                    first[d] = j
                if j >= 1:
                    total[d] += 1
                    if j < keep[d]:
                        kept[d] += 1
    return first, total, kept


def scan_label_stats(mask: np.ndarray, offsets: np.ndarray, keep: int | np.ndarray) -> LabelStats:
    """One pass over the mask file: :class:`LabelStats` for every document, cut at ``keep`` tokens.

    ``keep`` is one length for all documents or one per document.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    keep = np.ascontiguousarray(np.broadcast_to(np.asarray(keep, dtype=np.int64), (offsets.shape[0] - 1,)))
    first, total, kept = _scan_masks(np.asarray(mask), offsets, keep)
    return LabelStats(first, total, kept)


def segment_positions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of ``counts`` elements laid end to end: each element's segment and its index inside it."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    within = np.arange(owner.shape[0], dtype=np.int64) - starts[owner]
    return owner, within


@dataclass
class Rows:
    """A grid of rows built from documents: int64 ``input_ids``/``labels``/``position_ids``, int32 ``doc_ids``."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray


@numba.njit(cache=True)
def _fill_rows(tokens, mask, sources, lengths, rows, columns, slots, n_rows, width, pad_id):
    input_ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    labels = np.full((n_rows, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.empty((n_rows, width), dtype=np.int64)
    doc_ids = np.empty((n_rows, width), dtype=np.int32)
    used = np.zeros(n_rows, dtype=np.int64)
    n_docs = np.zeros(n_rows, dtype=np.int32)
    for k in range(sources.shape[0]):
        row, column, source, length = rows[k], columns[k], sources[k], lengths[k]
        for j in range(length):
            input_ids[row, column + j] = tokens[source + j]
            positions[row, column + j] = j
            doc_ids[row, column + j] = slots[k]
            if j + 1 < length and mask[source + j + 1] != 0:  # the next token is inside this document and counts
                labels[row, column + j] = tokens[source + j + 1]
        used[row] = max(used[row], column + length)
        n_docs[row] = max(n_docs[row], slots[k] + 1)
    for row in range(n_rows):  # padding: one more document per row, so ids never decrease
        for c in range(used[row], width):
            positions[row, c] = c - used[row]
            doc_ids[row, c] = n_docs[row]
    return input_ids, labels, positions, doc_ids


def fill_rows(
    tokens: np.ndarray,
    mask: np.ndarray,
    sources: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    slots: np.ndarray,
    shape: tuple[int, int],
    pad_id: int,
) -> Rows:
    """Copy documents into a ``shape`` grid: document ``k`` is ``tokens[sources[k] : sources[k] + lengths[k]]``.

    It lands in row ``rows[k]`` from column ``columns[k]`` as document number ``slots[k]`` of that row
    (documents of a row must be contiguous from column 0). The rest of each row is padding:
    ``pad_id``, label ``IGNORE_INDEX``, positions from 0, and doc id one past the row's last document.
    """
    sources, lengths, rows, columns, slots = (
        np.ascontiguousarray(a, dtype=np.int64) for a in (sources, lengths, rows, columns, slots)
    )
    input_ids, labels, positions, doc_ids = _fill_rows(
        tokens, mask, sources, lengths, rows, columns, slots, int(shape[0]), int(shape[1]), int(pad_id)
    )
    return Rows(input_ids, labels, positions, doc_ids)
