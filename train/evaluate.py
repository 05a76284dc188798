"""`evaluate`: a run's model on one split of a cache, and the checks that make that valid."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.errors import UserError
from preprocess.cache import CacheReader
from train.loop.native_logs import load_tensorflow
from train.network.tasks import Task, class_indices, task_from_config
from train.rundir.layout import ROC_CURVE, open_run

log = logging.getLogger(__name__)

EVALUATION_BATCH_SIZE = 2


def check_same_preprocessing(config: dict, reader: CacheReader, run_dir: Path) -> None:
    """Refuse a cache whose volumes were made differently from the run's training cache."""
    recorded = config.get("preprocessing") or {}
    differences = [f"{name} {trained!r} in the run, {value!r} in the cache"
                   for name, (trained, value) in reader.preprocessing.differences(recorded).items()]
    if differences:
        raise UserError(f"{reader.path} was preprocessed differently from the cache {run_dir} was trained on "
                        f"({'; '.join(differences)}); rebuild it with the run's options")


def predict_split(model, reader: CacheReader, rows: np.ndarray, batch_size: int = EVALUATION_BATCH_SIZE) -> np.ndarray:
    """The model's probabilities for each row, in row order, streamed from the cache without augmentation:
    P(abnormal) (N,) for a binary model, grade probabilities (N, classes) for a severity model."""
    from train.pipeline.data import make_evaluation_dataset, reporting_read_failures

    outputs = int(model.output_shape[-1])
    if len(rows) == 0:
        return np.zeros((0,) if outputs == 1 else (0, outputs), dtype=np.float64)
    dataset = make_evaluation_dataset(reader, rows, reader.labels[rows], batch_size)
    volumes_only = dataset.map(lambda volume, label: volume)
    with reporting_read_failures():
        probabilities = np.asarray(model.predict(volumes_only, verbose=0), dtype=np.float64)
    return probabilities.reshape(-1) if outputs == 1 else probabilities.reshape(len(rows), outputs)


def report_from_probabilities(task: Task, classes: np.ndarray, probabilities: np.ndarray) -> dict:
    """The task's report: binary (accuracy, AUC, sensitivity, specificity) or severity (macro AUC, kappa...)."""
    from train.network.scores import compute_classification_report, compute_severity_report

    if task.is_binary:
        return compute_classification_report(classes, probabilities)
    return compute_severity_report(classes, probabilities, task.class_names, task.grade_numbers)


def evaluate_rows(models, reader: CacheReader, rows: np.ndarray, task: Task, name: str,
                  roc_path: Path | None = None) -> dict:
    """The report (see `train.network.scores`) of a model on some rows of the cache, labelled `name`;
    with `roc_path`, also a PNG of the ROC curve there (a file that cannot be written is a warning).

    `models` is one model, or several (an ensemble: `cv`'s fold models) whose probabilities are averaged.
    """
    from common.files import WriteError
    from train.network.scores import DECISION_THRESHOLD
    from train.rundir.plots import save_roc_curve

    if len(rows) == 0:
        log.warning("the %s rows of %s are none; their metrics are undefined", name, reader.path)
    models = [models] if hasattr(models, "predict") else models
    probabilities = np.mean([predict_split(model, reader, rows) for model in models], axis=0)
    classes = class_indices(task, reader, rows)
    if roc_path is not None and len(rows):
        try:
            save_roc_curve(classes, probabilities, task.class_names, f"ROC, {name} split of {Path(reader.path).name}",
                           roc_path, DECISION_THRESHOLD if task.is_binary else None)
        except WriteError as error:
            log.warning("no ROC curve: %s", error)
    return {"split": name, "task": task.name, **report_from_probabilities(task, classes, probabilities)}


def evaluate_model(model, reader: CacheReader, split: str, task: Task, roc_path: Path | None = None) -> dict:
    """The report of `model` on a split of the cache (and its ROC curve, with `roc_path`)."""
    return evaluate_rows(model, reader, reader.split(split), task, split, roc_path)


def evaluate_run(run_dir: Path, cache: Path, split: str = "test") -> dict:
    """Metrics of the run's model (`--keep`) on `split` of `cache`; refuses a differently preprocessed cache."""
    config = open_run(run_dir)
    task = task_from_config(config)
    with CacheReader(cache) as reader:
        check_same_preprocessing(config, reader, run_dir)
        rows = reader.split(split)
        class_indices(task, reader, rows)  # a grade the run does not know: refused before the model loads
        load_tensorflow()  # only once the inputs are valid: bad input is refused in a second
        from train.rundir.models import load_run_model

        model = load_run_model(Path(run_dir))
        roc_path = Path(run_dir) / ROC_CURVE.format(split=f"{split}_{Path(cache).stem}")
        report = evaluate_model(model, reader, split, task, roc_path)
        if roc_path.is_file():
            report["roc_curve"] = str(roc_path)
        return {"run_dir": str(run_dir), "cache": str(cache), "cache_fingerprint": reader.fingerprint, **report}


def format_number(value) -> str:
    """A metric for the terminal: 4 decimals, or "undefined" (None, NaN: e.g. an AUC with one class)."""
    return "undefined" if value is None or value != value else f"{value:.4f}"


def format_report(report: dict) -> str:
    """The report as a few aligned lines for the terminal (and where its ROC curve went)."""
    lines = format_severity_report(report) if report.get("task") == "severity" else format_binary_report(report)
    return lines + (f"\nROC curve: {report['roc_curve']}" if report.get("roc_curve") else "")


def format_binary_report(report: dict) -> str:
    (true_negatives, false_positives), (false_negatives, true_positives) = report["confusion_matrix"]
    return "\n".join([
        f"{report['split']} split: {report['scans']} scans",
        f"accuracy     {format_number(report['accuracy'])}",
        f"AUC          {format_number(report['auc'])}",
        f"sensitivity  {format_number(report['sensitivity'])}",
        f"specificity  {format_number(report['specificity'])}",
        "confusion matrix   predicted normal  predicted abnormal",
        f"  true normal      {true_negatives:16d}  {false_positives:18d}",
        f"  true abnormal    {false_negatives:16d}  {true_positives:18d}",
    ])


def format_severity_report(report: dict) -> str:
    """A severity report: headline metrics, then per grade AUC and recall, then the confusion matrix."""
    names = report["class_names"]
    width = max(len(name) for name in names) + 2
    lines = [
        f"{report['split']} split: {report['scans']} scans, grades {', '.join(names)}",
        f"accuracy                  {format_number(report['accuracy'])}",
        f"macro one-vs-rest AUC     {format_number(report['macro_auc'])}",
        f"quadratic weighted kappa  {format_number(report['quadratic_weighted_kappa'])}",
        f"{'grade':<{width}}{'AUC':>8}{'recall':>9}",
    ]
    lines += [f"{name:<{width}}{format_number(report['auc_per_grade'][name]):>8}{format_number(report['recall_per_grade'][name]):>9}"
              for name in names]
    lines.append("confusion matrix (rows: true grade, columns: predicted)")
    lines.append(" " * width + "".join(f"{name:>{width}}" for name in names))
    lines += [f"{name:<{width}}" + "".join(f"{count:>{width}d}" for count in row)
              for name, row in zip(names, report["confusion_matrix"])]
    return "\n".join(lines)
