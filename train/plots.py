"""Training curves like the tutorial's figure: train vs validation per epoch, one panel per metric."""
from __future__ import annotations

from pathlib import Path

from train.files import replace_atomically

PANELS = (("accuracy", "Accuracy"), ("auc", "AUC"), ("loss", "Loss"))


def save_training_curves(history: list[dict], path: Path) -> Path:
    """Write a PNG of accuracy, AUC and loss for training and validation from history rows."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    replace_atomically(Path(path), lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)
    return Path(path)
