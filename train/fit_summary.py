"""What `fit` says when it ends: `FitReport`, the summary line, and the line for a model that has not learned."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.network.scores import SEPARATION_ALPHA
from train.network.tasks import HEADLINE_METRICS, METRIC_LABELS
from train.rundir.layout import TrainingState


@dataclass(frozen=True)
class FitReport:
    run_dir: Path
    state: TrainingState
    test_metrics: dict
    is_chief: bool = True
    crop: str = "none"  # the cache's (preprocess.preprocessing.Preprocessing.crop), for format_learned's advice


def format_report(report: FitReport) -> str:
    """What `fit` prints when it is done: where the run is, which epoch's model it kept, and its test result in one
    line."""
    from train.evaluate import format_number as number

    if not report.is_chief:
        return f"worker done: {report.state.completed_epochs} epochs; the chief wrote the run to {report.run_dir}"
    test = report.test_metrics
    names = HEADLINE_METRICS["severity" if test.get("task") == "severity" else "binary"]["summary"]
    result = "test " + ", ".join(f"{METRIC_LABELS.get(name, name)} {number(test.get(name))}" for name in names)
    calibration = test.get("calibration") or {}
    if calibration.get("after"):
        before, after = calibration["before"]["ece"], calibration["after"]["ece"]
        change = f"{after:.3f}" if calibration["temperature"] == 1.0 else f"{before:.3f} -> {after:.3f} calibrated"
        result += f", ECE {change} (temperature {calibration['temperature']:.2f})"
    state = report.state
    best = f"best val AUC {state.best_val_auc:.4f} at epoch {state.best_epoch}"
    if test.get("keep") == "last":
        kept = f"model of the last epoch (val AUC {number(test.get('model_val_auc'))}; {best})"
    else:
        kept = best
    return f"run saved in {report.run_dir}: {state.completed_epochs} epochs, {kept}; {result} on {test.get('scans')} scans"


def format_learned(report: FitReport) -> str | None:
    """The line `fit` ends with when its model's validation AUC is not distinguishable from 0.5, or the validation
    split is too small to tell (`train.network.scores.compute_separation`); else None."""
    test = report.test_metrics
    if not report.is_chief or test.get("learned", True) is True:
        return None
    scans = "{} normal and {} abnormal validation scans".format(*test.get("val_class_counts", ("?", "?")))
    if test["learned"] is None:
        return (f"cannot tell whether the model has learned to separate the classes: {scans} are too few for any "
                "validation AUC to differ significantly from 0.5; rebuild the cache with more scans or a larger "
                "--val-fraction")
    crop = ", or a cache built with `preprocess build --crop lungs`" if report.crop == "none" else ""
    return (f"the model has not learned to separate the classes: its validation AUC {test['val_auc_exact']:.3f} is "
            f"not distinguishable from 0.5 (one-sided Mann-Whitney p = {test['val_auc_p_value']:.2g} on {scans}; "
            f"learned means p < {SEPARATION_ALPHA:g}); try more scans or epochs, a larger --batch-size{crop}")
