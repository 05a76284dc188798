"""Train / val / test splits: a stratified, seeded partition that is stable as scans are added."""
from __future__ import annotations

import numpy as np
import pytest

from preprocess.engine.splits import make_splits


def archive(normal: int, abnormal: int):
    scan_ids = [f"CT-0/study_{i:04d}" for i in range(normal)] + [f"CT-1/study_{i:04d}" for i in range(abnormal)]
    return scan_ids, np.array([0] * normal + [1] * abnormal)


@pytest.mark.parametrize("normal, abnormal, val, test", [(254, 856, 0.15, 0.15), (10, 7, 0.2, 0.1), (3, 1, 0.15, 0.15),
                                                         (50, 50, 0.0, 0.3)])
def test_splits_partition_rows_and_are_stratified(normal, abnormal, val, test):
    scan_ids, labels = archive(normal, abnormal)
    splits = make_splits(scan_ids, labels, seed=0, val_fraction=val, test_fraction=test)
    every_row = np.concatenate(list(splits.values()))
    assert sorted(every_row.tolist()) == list(range(len(labels)))  # disjoint and covering
    for rows in splits.values():
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    for label, count in ((0, normal), (1, abnormal)):
        assert abs((labels[splits["val"]] == label).sum() - count * val) <= 1
        assert abs((labels[splits["test"]] == label).sum() - count * test) <= 1


def test_splits_depend_on_seed_and_nothing_else():
    scan_ids, labels = archive(40, 60)
    first = make_splits(scan_ids, labels, 7, 0.15, 0.15)
    again = make_splits(list(scan_ids), labels.copy(), 7, 0.15, 0.15)
    other = make_splits(scan_ids, labels, 8, 0.15, 0.15)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["test"], other["test"])


def test_adding_scans_keeps_most_assignments():
    scan_ids, labels = archive(100, 100)
    before = make_splits(scan_ids, labels, 0, 0.15, 0.15)
    more_ids, more_labels = archive(105, 100)
    # the five new normal scans sort between the old ones; compare by scan id, not row
    after = make_splits(more_ids, more_labels, 0, 0.15, 0.15)
    split_of = lambda ids, splits: {ids[row]: name for name, rows in splits.items() for row in rows}  # noqa: E731
    old, new = split_of(scan_ids, before), split_of(more_ids, after)
    moved = sum(old[scan_id] != new[scan_id] for scan_id in old)
    assert moved <= 4, moved
