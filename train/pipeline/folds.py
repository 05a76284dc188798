"""Which cache rows a run trains and validates on: the cache's splits, or one fold of cross-validation."""
from __future__ import annotations

import numpy as np

from common.errors import UserError
from preprocess.cache import CacheReader


def split_rows(reader: CacheReader, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's sorted row indices and their labels (0 normal, 1 abnormal)."""
    rows = reader.split(split)
    return rows, reader.labels[rows]


def make_folds(rows: np.ndarray, classes: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint sorted row sets covering `rows`, stratified by class and seeded.

    Each class's rows are shuffled with the seed and dealt round-robin, starting where the
    previous class stopped, so every fold gets each class within one scan of its share and the
    fold sizes differ by at most one.
    """
    rows, classes = np.asarray(rows, dtype=np.int64), np.asarray(classes)
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if len(rows) < folds:
        raise UserError(f"--folds {folds} needs at least {folds} train and validation scans; the cache has {len(rows)}")
    generator = np.random.default_rng(np.random.SeedSequence([seed, 0xF01D]))
    members: list[list[int]] = [[] for _ in range(folds)]
    position = 0
    for value in np.unique(classes):
        for row in generator.permutation(rows[classes == value]):
            members[position % folds].append(int(row))
            position += 1
    return [np.sort(np.array(fold, dtype=np.int64)) for fold in members]


def training_and_validation_rows(reader: CacheReader, classes_of, fold: int | None, folds: int | None,
                                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): the cache's splits, or fold `fold` (1-based) of `folds` over both.

    `classes_of(rows)` gives the class of each row (what the folds are stratified by).
    """
    if fold is None:
        return reader.split("train"), reader.split("val")
    pool = np.sort(np.concatenate([reader.split("train"), reader.split("val")]))
    parts = make_folds(pool, classes_of(pool), folds, seed)
    validation = parts[fold - 1]
    training = np.sort(np.concatenate([part for index, part in enumerate(parts) if index != fold - 1]))
    return training, validation


def rows_and_classes(reader: CacheReader, options, task):
    """((train rows, their classes), (validation rows, their classes)) of a run: its splits, or its fold."""
    from train.network.tasks import class_indices

    train_rows, val_rows = training_and_validation_rows(
        reader, lambda rows: class_indices(task, reader, rows), options.fold, options.folds, options.seed)
    return (train_rows, class_indices(task, reader, train_rows)), (val_rows, class_indices(task, reader, val_rows))
