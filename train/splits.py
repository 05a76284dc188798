"""The cache's splits as row indices and labels, and the class weights of the training split."""
from __future__ import annotations

import numpy as np

from preprocess.cache import CacheReader
from preprocess.errors import UserError


def split_rows(reader: CacheReader, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's sorted row indices and their labels (0 normal, 1 abnormal)."""
    rows = reader.split(split)
    return rows, reader.labels[rows]


def compute_class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced weights n / (2 n_class): each class contributes half of the loss."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=2)
    if (counts[:2] == 0).any():
        missing = "normal" if counts[0] == 0 else "abnormal"
        raise UserError(f"the training split has no {missing} scans; the cache needs both classes to train")
    return {label: float(len(labels) / (2 * counts[label])) for label in (0, 1)}
