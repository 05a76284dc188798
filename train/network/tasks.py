"""What the model learns: `--task binary` (normal vs abnormal) or `--task severity` (MosMedData grades).

binary    the tutorial's task: one sigmoid, P(abnormal); label 0 for CT-0, 1 for any other grade
severity  one softmax over the grades present in the cache, e.g. CT-0 ... CT-4 (CT-0 normal, then
          <25%, 25-50%, 50-75%, >75% of the lung involved); the cache keeps each scan's grade as its
          class name, so the same cache serves both tasks

A `Task` turns the cache's rows into class indices and training targets, and knows the loss, the
per-epoch Keras metrics and the class weights. The report metrics (exact, from probabilities)
are in `train.network.scores`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from preprocess.cache import CacheReader

TASKS = ("binary", "severity")
# Each task's headline metrics (keys of its report), in one place. `headline`: what `cv` averages
# over folds and reports on the test split, the task's AUC (which `runs` shows) first. `summary`:
# the few in `fit`'s one-line result, in the order it prints them.
HEADLINE_METRICS = {
    "binary": {"headline": ("auc", "accuracy", "sensitivity", "specificity"), "summary": ("auc", "accuracy")},
    "severity": {"headline": ("macro_auc", "accuracy", "quadratic_weighted_kappa"),
                 "summary": ("macro_auc", "quadratic_weighted_kappa", "accuracy")},
}
METRIC_LABELS = {"auc": "AUC", "macro_auc": "macro AUC", "quadratic_weighted_kappa": "quadratic weighted kappa"}
BINARY_CLASS_NAMES = ("normal", "abnormal")
# a class's grade is the first whole number in its name: CT-2 -> 2, and with `build --labels`
# names such as 0-normal, 1-mild, grade3 -> 0, 1, 3; severity needs one distinct grade per class
GRADE_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Task:
    name: str
    class_names: tuple[str, ...]

    @property
    def is_binary(self) -> bool:
        return self.name == "binary"

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def output_units(self) -> int:
        """1 (a sigmoid) for binary, one softmax unit per grade for severity."""
        return 1 if self.is_binary else self.classes

    @property
    def headline_metrics(self) -> tuple[str, ...]:
        return HEADLINE_METRICS[self.name]["headline"]

    @property
    def summary_metrics(self) -> tuple[str, ...]:
        return HEADLINE_METRICS[self.name]["summary"]

    @property
    def grade_numbers(self) -> tuple[int, ...]:
        """The k of each CT-k (severity), used as the ordinal distance in the weighted kappa."""
        return tuple(grade_number(name) for name in self.class_names)


def make_task(name: str, reader: CacheReader) -> Task:
    """The task `--task name` means on this cache (severity: the grades its rows carry)."""
    if name == "binary":
        return Task("binary", BINARY_CLASS_NAMES)
    if name != "severity":
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    grades = sorted(set(reader.class_names), key=_grade_number)
    unknown = [grade for grade in grades if grade_number(grade) is None]
    if unknown:
        raise UserError(f"--task severity needs MosMedData grades (CT-0 ... CT-4) as class names; {reader.path} "
                        f"has {unknown[0]!r} (with --labels, put the grade number in each class name: "
                        "0-normal, 1-mild, 2-severe)")
    for first, second in zip(grades, grades[1:]):
        if grade_number(first) == grade_number(second):
            raise UserError(f"--task severity: {reader.path} has the classes {first!r} and {second!r}, both "
                            f"grade {grade_number(first)}; each class needs its own grade number")
    if len(grades) < 2:
        raise UserError(f"--task severity needs at least two grades; {reader.path} has only {grades[0]}")
    return Task("severity", tuple(grades))


def task_from_config(config: dict) -> Task:
    """The task a run was trained for, from its config.json (runs made before tasks existed are binary)."""
    name = (config.get("options") or {}).get("task", "binary")
    names = config.get("class_names") or list(BINARY_CLASS_NAMES)
    if name not in TASKS or not isinstance(names, list) or not all(isinstance(item, str) for item in names) \
            or (name == "severity" and not all(grade_number(item) is not None for item in names)):
        raise UserError("config.json: damaged task or class names")
    return Task(name, tuple(names))


def grade_number(name: str) -> int | None:
    """A class's grade: the first whole number in its name (CT-3 -> 3, 1-mild -> 1), None if it has none."""
    match = GRADE_NUMBER.search(name)
    return int(match.group()) if match else None


def _grade_number(name: str) -> tuple[int, str]:
    number = grade_number(name)
    return (10**9 if number is None else number, name)


def class_indices(task: Task, reader: CacheReader, rows: np.ndarray) -> np.ndarray:
    """Each row's class: 0/1 for binary, the index of its grade in task.class_names for severity."""
    rows = np.asarray(rows, dtype=np.int64)
    if task.is_binary:
        return reader.labels[rows].astype(np.int64)
    position = {name: index for index, name in enumerate(task.class_names)}
    names = reader.class_names
    try:
        return np.array([position[names[row]] for row in rows], dtype=np.int64)
    except KeyError as error:
        raise UserError(f"{reader.path} holds grade {error.args[0]}, which the run was not trained on "
                        f"({', '.join(task.class_names)})") from None


def training_targets(task: Task, indices: np.ndarray) -> np.ndarray:
    """What the loss compares with: the label (N,) for binary, one-hot (N, classes) for severity."""
    indices = np.asarray(indices, dtype=np.int64)
    if task.is_binary:
        return indices.astype(np.float32)
    return np.eye(task.classes, dtype=np.float32)[indices]


def compute_class_weights(task: Task, indices: np.ndarray) -> dict[int, float]:
    """Balanced weights n / (classes * n_class): each class contributes equally to the loss."""
    indices = np.asarray(indices, dtype=np.int64)
    counts = np.bincount(indices, minlength=task.classes)
    missing = [task.class_names[index] for index in range(task.classes) if counts[index] == 0]
    if missing:
        if task.is_binary:
            raise UserError(f"the training split has no {missing[0]} scans; the cache needs both classes to train")
        raise UserError(f"the training split has no {missing[0]} scans; every grade of the cache needs training "
                        "scans (add scans, or rebuild with other fractions)")
    return {index: float(len(indices) / (task.classes * counts[index])) for index in range(task.classes)}


def make_loss(task: Task):
    import keras

    if task.is_binary:
        return keras.losses.BinaryCrossentropy()
    return keras.losses.CategoricalCrossentropy()


def make_training_metrics(task: Task) -> list:
    """The metrics `fit` logs per epoch; their names are history.csv's columns ("auc" picks the best epoch)."""
    import keras

    from train.network.keras_metrics import make_binary_training_metrics

    if task.is_binary:
        return make_binary_training_metrics()
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        # one-vs-rest AUC of each grade, averaged: the macro AUC
        keras.metrics.AUC(name="auc", multi_label=True, num_labels=task.classes),
    ]
