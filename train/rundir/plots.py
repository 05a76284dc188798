"""Pictures of a run: training curves like the tutorial's figure, and the ROC curve and reliability diagram of a tested model."""
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


def _decorate(axis, title: str, xlabel: str, ylabel: str, low: float = -0.02) -> None:
    """Limits, labels, legend and grid of a probability plot (ROC curve, reliability diagram)."""
    axis.set_xlim(low, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)


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
    _decorate(axis, title, "false-positive rate (1 - specificity)", "true-positive rate (sensitivity)")
    axis.set_aspect("equal")
    return _save(figure, path)


def save_reliability_diagram(calibration: dict, title: str, path: Path) -> Path:
    """Write a PNG of the reliability diagram: per equal-count bin, how often the predicted class was right
    against how confident the model said it was (calibrated when the run has a calibration), with the ECE
    before and after calibration. `calibration` is `train.trust.calibration.calibration_report`'s dict."""
    plt = _pyplot()
    bins = calibration["reliability"]
    figure, axis = plt.subplots(figsize=(5, 5))
    confidence = [row["confidence"] for row in bins]
    lowest = min([0.5, *confidence])  # a binary prediction is at least 50% sure; a severity one may be less
    axis.plot([lowest, 1], [lowest, 1], linestyle=":", color="grey", label="perfect calibration")
    accuracy = [row["accuracy"] for row in bins]
    calibrated = calibration.get("after") is not None
    label = "calibrated" if calibrated else "raw (no calibration)"
    axis.plot(confidence, accuracy, marker="o", label=f"{label}, {len(bins)} equal-count bins")
    for row in bins:
        axis.annotate(str(row["scans"]), (row["confidence"], row["accuracy"]), textcoords="offset points",
                      xytext=(4, -10), fontsize=7)
    before = calibration["before"]["ece"]
    after = calibration["after"]["ece"] if calibrated else None
    text = f"ECE before {before:.3f}" + (f", after {after:.3f}" if after is not None else "")
    axis.text(lowest + 0.02, 0.97, text, fontsize=9, va="top")
    _decorate(axis, title, "confidence of the predicted class", "fraction right (numbers: scans per bin)",
              low=lowest - 0.02)
    return _save(figure, path)
