"""Classification metrics: Keras metrics for training and exact numpy metrics for reports.

Training shows accuracy, AUC, sensitivity and specificity per epoch (Keras's AUC interpolates
over 200 thresholds). Reports (metrics.json, `evaluate`) are computed once from the predicted
probabilities with exact formulas, and carry the confusion matrix.
"""
from __future__ import annotations

import keras
import numpy as np

from train.options import DECISION_THRESHOLD as THRESHOLD


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
        self.true_negatives.assign_add(ops.sum(ops.cast(negative & ~called_positive, "float32")))
        self.false_positives.assign_add(ops.sum(ops.cast(negative & called_positive, "float32")))

    def result(self):
        return keras.ops.divide_no_nan(self.true_negatives, self.true_negatives + self.false_positives)

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}


def make_training_metrics() -> list[keras.metrics.Metric]:
    """The metrics `fit` logs per epoch; their names are history.csv's columns."""
    return [
        keras.metrics.BinaryAccuracy(name="accuracy", threshold=THRESHOLD),
        keras.metrics.AUC(name="auc"),
        keras.metrics.Recall(name="sensitivity", thresholds=THRESHOLD),
        Specificity(name="specificity"),
    ]


def compute_roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Exact ROC AUC: the chance a random abnormal scan scores above a random normal one (ties 1/2)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    positives, negatives = probabilities[labels == 1], probabilities[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")  # undefined with one class
    above = (positives[:, None] > negatives[None, :]).sum()
    tied = (positives[:, None] == negatives[None, :]).sum()
    return float((above + 0.5 * tied) / (len(positives) * len(negatives)))


def compute_classification_report(labels: np.ndarray, probabilities: np.ndarray,
                                  threshold: float = THRESHOLD) -> dict:
    """Accuracy, AUC, sensitivity, specificity and the confusion matrix; undefined values are NaN."""
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    predicted = (probabilities >= threshold).astype(int)
    true_negatives = int(((labels == 0) & (predicted == 0)).sum())
    false_positives = int(((labels == 0) & (predicted == 1)).sum())
    false_negatives = int(((labels == 1) & (predicted == 0)).sum())
    true_positives = int(((labels == 1) & (predicted == 1)).sum())
    ratio = lambda part, whole: part / whole if whole else float("nan")  # noqa: E731
    return {
        "scans": int(len(labels)),
        "threshold": threshold,
        "accuracy": ratio(true_negatives + true_positives, len(labels)),
        "auc": compute_roc_auc(labels, probabilities),
        "sensitivity": ratio(true_positives, true_positives + false_negatives),
        "specificity": ratio(true_negatives, true_negatives + false_positives),
        # rows: true class (normal, abnormal); columns: predicted class (normal, abnormal)
        "confusion_matrix": [[true_negatives, false_positives], [false_negatives, true_positives]],
    }
