"""Pictures of a run: training curves like the tutorial's figure, and ROC curves of a tested model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.files import replace_atomically

PANELS = (("accuracy", "Accuracy"), ("auc", "AUC"), ("loss", "Loss"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    figure.tight_layout()
    replace_atomically(Path(path), lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)
    return Path(path)


def save_training_curves(history: list[dict], path: Path) -> Path:
    """Write a PNG of accuracy, AUC and loss for training and validation from history rows."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.5))
    for axis, (metric, title) in zip(axes, PANELS):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + metric, float("nan")) for row in history]
            axis.plot(epochs, values, marker="o", markersize=3, label=label)
        axis.set_title(f"Model {title}")
        axis.set_xlabel("epochs")
        axis.set_ylabel(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    return _save(figure, path)


def save_roc_curve(classes: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...], title: str,
                   path: Path, threshold: float | None = None) -> Path:
    """Write a PNG of the ROC curve with its AUC, and the operating point at `threshold` marked.

    Binary (`probabilities` (N,), P(abnormal)): one curve, and a dot where scans at or above
    `threshold` are called abnormal. Severity (`probabilities` (N, grades)): one one-vs-rest
    curve per grade present among the scans.
    """
    from train.network.scores import compute_roc_auc, compute_roc_curve

    plt = _pyplot()
    classes, probabilities = np.asarray(classes).astype(int), np.asarray(probabilities, np.float64)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    if probabilities.ndim == 1:
        curves = [("abnormal vs normal", classes, probabilities)]
    else:
        curves = [(f"{name} vs rest", (classes == index).astype(int), probabilities[:, index])
                  for index, name in enumerate(class_names) if 0 < (classes == index).sum() < len(classes)]
    for label, positives, scores in curves:
        false_positive_rate, true_positive_rate = compute_roc_curve(positives, scores)
        axis.plot(false_positive_rate, true_positive_rate, label=f"{label} (AUC {compute_roc_auc(positives, scores):.3f})")
    if threshold is not None and probabilities.ndim == 1 and 0 < classes.sum() < len(classes):
        called = probabilities >= threshold
        sensitivity = called[classes == 1].mean()
        false_positive_rate = called[classes == 0].mean()
        axis.plot([false_positive_rate], [sensitivity], "o", color="black", markersize=8,
                  label=f"threshold {threshold:g}: sensitivity {sensitivity:.2f}, specificity "
                  f"{1 - false_positive_rate:.2f}")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("false-positive rate (1 - specificity)")
    axis.set_ylabel("true-positive rate (sensitivity)")
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    axis.set_aspect("equal")
    return _save(figure, path)
