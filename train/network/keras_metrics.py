"""The per-epoch Keras metrics of training: accuracy, AUC, sensitivity and specificity.

Keras's AUC interpolates over 200 thresholds; the reports (metrics.json, `evaluate`) are
computed once from the predicted probabilities with exact formulas (`train.network.scores`).
"""
from __future__ import annotations

import keras

from train.network.scores import DECISION_THRESHOLD as THRESHOLD


@keras.saving.register_keras_serializable(package="mosmed3d")
class Specificity(keras.metrics.Metric):
    """True-negative rate TN / (TN + FP) at a fixed threshold (Keras has Recall, not this)."""

    def __init__(self, threshold: float = THRESHOLD, name: str = "specificity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.true_negatives = self.add_variable(shape=(), initializer="zeros", name="true_negatives")
        self.false_positives = self.add_variable(shape=(), initializer="zeros", name="false_positives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        negative = ops.reshape(ops.cast(y_true, "float32") < 0.5, (-1,))
        called_positive = ops.reshape(ops.cast(y_pred, "float32") >= self.threshold, (-1,))
        # weighted like Keras's own metrics: padding samples (weight 0) count for nothing
        weight = ops.ones_like(ops.cast(negative, "float32")) if sample_weight is None \
            else ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        self.true_negatives.assign_add(ops.sum(ops.cast(negative & ~called_positive, "float32") * weight))
        self.false_positives.assign_add(ops.sum(ops.cast(negative & called_positive, "float32") * weight))

    def result(self):
        return keras.ops.divide_no_nan(self.true_negatives, self.true_negatives + self.false_positives)

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}


def make_binary_training_metrics() -> list[keras.metrics.Metric]:
    """The binary task's per-epoch metrics; their names are history.csv's columns."""
    return [
        keras.metrics.BinaryAccuracy(name="accuracy", threshold=THRESHOLD),
        keras.metrics.AUC(name="auc"),
        keras.metrics.Recall(name="sensitivity", thresholds=THRESHOLD),
        Specificity(name="specificity"),
    ]

