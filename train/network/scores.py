"""Exact classification scores from predicted probabilities, in NumPy: what reports carry.

Reports (metrics.json, `evaluate`, `cv`) are computed once from the predicted probabilities
with exact formulas, and carry the confusion matrix. The per-epoch Keras metrics of training
are in `train.network.keras_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

# P(abnormal) at or above this is called abnormal, as in the tutorial
DECISION_THRESHOLD = 0.5
SEPARATION_ALPHA = 0.05  # a model has learned when its validation AUC is above 0.5 at this level (one-sided)


def compute_roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Exact ROC AUC: the chance a random abnormal scan scores above a random normal one (ties 1/2)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    positives, negatives = probabilities[labels == 1], probabilities[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")  # undefined with one class
    above = (positives[:, None] > negatives[None, :]).sum()
    tied = (positives[:, None] == negatives[None, :]).sum()
    return float((above + 0.5 * tied) / (len(positives) * len(negatives)))


@dataclass(frozen=True)
class Separation:
    """Whether a model ranks abnormal scans above normal ones more often than chance would: its AUC and the
    one-sided Mann-Whitney p-value of "AUC > 0.5" (AUC = U / (normal x abnormal)); `p_value` None: cannot tell."""

    auc: float
    p_value: float | None
    normal: int
    abnormal: int

    @property
    def learned(self) -> bool | None:
        """True: p < SEPARATION_ALPHA; False: not distinguishable from chance; None: too few scans to tell."""
        return None if self.p_value is None else self.p_value < SEPARATION_ALPHA

    def to_json(self) -> dict:
        """The fields metrics.json keeps (`fit`), which `runs` and `predict` read."""
        return {"learned": self.learned, "val_auc_p_value": self.p_value, "val_auc_exact": self.auc,
                "val_class_counts": [self.normal, self.abnormal]}


def compute_separation(labels: np.ndarray, scores: np.ndarray) -> Separation:
    """The one-sided Mann-Whitney test of abnormal scores above normal ones (scipy: exact for small untied
    samples, else the normal approximation with tie and continuity corrections).

    Too few scans to tell: even a perfect ranking, whose exact p-value is 1 / C(n, normal), would
    not reach SEPARATION_ALPHA (3 + 3 scans give 0.05; 3 + 4 give 0.029). Saying "not learned"
    there would blame the model for the split's size.
    """
    from scipy.stats import mannwhitneyu

    labels = np.asarray(labels).astype(int).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    auc = compute_roc_auc(labels, scores)
    if len(positives) == 0 or len(negatives) == 0 or 1 / comb(len(scores), len(negatives)) >= SEPARATION_ALPHA:
        return Separation(auc, None, len(negatives), len(positives))
    p_value = float(mannwhitneyu(positives, negatives, alternative="greater").pvalue)
    return Separation(auc, p_value, len(negatives), len(positives))


def compute_classification_report(labels: np.ndarray, probabilities: np.ndarray,
                                  threshold: float = DECISION_THRESHOLD) -> dict:
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


def compute_quadratic_weighted_kappa(true_grades: np.ndarray, predicted_grades: np.ndarray,
                                     grade_numbers: tuple[int, ...]) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 on the grade numbers: 1 perfect, 0 chance.

    The weights use the grades' own numbers (CT-0 ... CT-4), so with a grade missing from the
    cache, calling CT-3 for CT-1 still costs four times calling CT-2.
    """
    true_grades, predicted_grades = np.asarray(true_grades, int), np.asarray(predicted_grades, int)
    classes = len(grade_numbers)
    observed = np.zeros((classes, classes))
    np.add.at(observed, (true_grades, predicted_grades), 1)
    if observed.sum() == 0:
        return float("nan")
    numbers = np.asarray(grade_numbers, dtype=np.float64)
    weights = (numbers[:, None] - numbers[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    disagreement_by_chance = (weights * expected).sum()
    if disagreement_by_chance == 0:
        return float("nan")  # one grade only: kappa is undefined
    return float(1.0 - (weights * observed).sum() / disagreement_by_chance)


def compute_severity_report(true_grades: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...],
                            grade_numbers: tuple[int, ...]) -> dict:
    """Accuracy, macro one-vs-rest AUC, per-grade AUC and recall, quadratic weighted kappa, confusion matrix.

    The predicted grade is the most probable one. A grade absent from the scans has an undefined
    AUC and recall (NaN) and is left out of the macro AUC.
    """
    true_grades = np.asarray(true_grades).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(true_grades), len(class_names))
    predicted = probabilities.argmax(axis=1) if len(true_grades) else np.zeros(0, int)
    per_grade_auc = {name: compute_roc_auc((true_grades == index).astype(int), probabilities[:, index])
                     for index, name in enumerate(class_names)}
    defined = [value for value in per_grade_auc.values() if value == value]
    recall = {}
    for index, name in enumerate(class_names):
        members = true_grades == index
        recall[name] = float((predicted[members] == index).mean()) if members.any() else float("nan")
    confusion = np.zeros((len(class_names), len(class_names)), dtype=int)
    np.add.at(confusion, (true_grades, predicted), 1)
    return {
        "scans": int(len(true_grades)),
        "class_names": list(class_names),
        "accuracy": float((predicted == true_grades).mean()) if len(true_grades) else float("nan"),
        "macro_auc": float(np.mean(defined)) if defined else float("nan"),
        "auc_per_grade": per_grade_auc,
        "recall_per_grade": recall,
        "quadratic_weighted_kappa": compute_quadratic_weighted_kappa(true_grades, predicted, grade_numbers),
        # rows: true grade; columns: predicted grade (both in class_names order)
        "confusion_matrix": confusion.tolist(),
    }


def compute_roc_curve(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve: false- and true-positive rates as the threshold falls through every distinct score.

    Starts at (0, 0) and ends at (1, 1); tied scores move both rates in one step, so the area
    under it (trapezoids) is `compute_roc_auc`.
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])  # undefined with one class: the chance diagonal
    order = np.argsort(-probabilities, kind="stable")
    scores, positive = probabilities[order], labels[order] == 1
    # the last position of each distinct score: every scan at or above it is called abnormal there
    ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    true_positive_rate = np.r_[0.0, np.cumsum(positive)[ends] / positives]
    false_positive_rate = np.r_[0.0, np.cumsum(~positive)[ends] / negatives]
    return false_positive_rate, true_positive_rate
