"""Stratified, seeded train / validation / test splits over the cache's rows."""
from __future__ import annotations

import hashlib

import numpy as np


def scan_rank(scan_id: str, seed: int) -> int:
    """A seeded pseudo-random rank that depends only on the scan id and the seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{scan_id}".encode()).digest()[:8], "big")


def make_splits(
    scan_ids: list[str], labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    """Split rows into sorted train / val / test indices, stratified by label.

    Within each class the rows are ordered by a seeded hash of their scan id, and the first
    round(n * test_fraction) go to test, the next round(n * val_fraction) to val. Ranking by hash
    rather than by a shuffled position keeps a scan's split stable when other scans are added
    or removed, so an incremental rebuild does not reshuffle the whole archive.
    """
    labels = np.asarray(labels)
    assigned = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = sorted(rows, key=lambda row: scan_rank(scan_ids[row], seed))
        test_count = int(round(len(rows) * test_fraction))
        val_count = int(round(len(rows) * val_fraction))
        assigned["test"] += rows[:test_count]
        assigned["val"] += rows[test_count : test_count + val_count]
        assigned["train"] += rows[test_count + val_count :]
    return {name: np.array(sorted(rows), dtype=np.int64) for name, rows in assigned.items()}
