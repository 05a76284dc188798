"""The lesion map's call offset, refit from training scans before each validation.

The lesion-map model calls a scan from its largest cell logit: P(abnormal) = sigmoid(slope * top +
offset) (`train.network.model.TopLogitCall`). Gradient descent learns that offset far more slowly
than the cells' logits drift in the first epochs, and BatchNorm's moving statistics shift every
cell, and so the largest, between training and inference. Either way validation calls every scan
one class while it already ranks them well (docs/benchmarks.md, "The lesion map's threshold during
training").

So before each validation the offset is set where the label's loss is least on a fixed, seeded,
class-balanced choice of training scans, unrotated and in inference mode, as validation sees
scans. The slope is kept; with it fixed, the weighted cross-entropy is strictly convex in the offset
and has one minimum even when the scans are separable: its derivative, the sum of
weight * (P(abnormal) - label), rises from minus the abnormal scans' weight to plus the normal
ones'. Only the offset changes, never a cell: the map is what the rest of training learns.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

# training scans of each class the offset is fitted from (fewer when the split has fewer)
CALL_REFIT_SCANS_PER_CLASS = 64
BISECTION_STEPS = 60  # the bracket's width halves each step: from 2 x 1e4 to far below a float32's step


def call_refit_rows(train_rows: np.ndarray, train_classes: np.ndarray, per_class: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their classes): a seeded choice of up to `per_class` training rows of each class (0 normal,
    1 abnormal), in row order."""
    from train.pipeline.data import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "call_refit"))
    rows, classes = np.asarray(train_rows), np.asarray(train_classes)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(classes == label))[:per_class] for label in (0, 1)])
    chosen = chosen[np.argsort(rows[chosen], kind="stable")]
    return rows[chosen], classes[chosen]


def best_offset(tops: np.ndarray, labels: np.ndarray, slope: float) -> float:
    """The offset b minimising the class-balanced cross-entropy of sigmoid(slope * top + b) against `labels`.

    Each class weighs half, whatever its count. The derivative in b is increasing; bisection finds its zero.
    """
    tops, labels = np.asarray(tops, np.float64), np.asarray(labels, np.float64)
    if not (labels == 0).any() or not (labels == 1).any():
        raise ValueError("the call's offset needs scans of both classes")
    weights = np.where(labels == 1, 0.5 / (labels == 1).sum(), 0.5 / (labels == 0).sum())
    scores = slope * tops

    def slope_of_loss(offset: float) -> float:
        return float(np.sum(weights * (0.5 * (1 + np.tanh(0.5 * (scores + offset))) - labels)))

    low, high = -float(np.max(scores)) - 50.0, -float(np.min(scores)) + 50.0  # derivative < 0 at low, > 0 at high
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if slope_of_loss(middle) < 0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


class RefitCall(keras.callbacks.Callback):
    """Before every validation inside `fit` (after PreciseBN, when it runs), set the lesion map's call offset
    to `best_offset` on fixed training scans. The epoch's checkpoint then holds it too."""

    def __init__(self, batches: tf.data.Dataset, call_layer: str, top_layer: str):
        super().__init__()
        self.batches = batches  # (volume, label) batches, the same ones every time
        self.call_layer, self.top_layer = call_layer, top_layer
        self.tops = None

    def on_test_begin(self, logs=None) -> None:
        if self.tops is None:  # traced once per fit
            top_model = keras.Model(self.model.input, self.model.get_layer(self.top_layer).output)
            self.tops = tf.function(lambda volumes: top_model(volumes, training=False), reduce_retracing=True)
        tops, labels = [], []
        for volumes, batch_labels in self.batches:
            tops.append(np.asarray(self.tops(volumes), np.float64).reshape(-1))
            labels.append(np.asarray(batch_labels, np.float64).reshape(-1))
        call = self.model.get_layer(self.call_layer)
        slope = float(np.asarray(call.kernel).reshape(-1)[0])
        offset = best_offset(np.concatenate(tops), np.concatenate(labels), slope)
        call.offset.assign(np.full(call.offset.shape, offset / call.rate, np.float32))
