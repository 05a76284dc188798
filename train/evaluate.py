"""`evaluate`: a run's model on one split of a cache, and the checks that make that valid."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.errors import UserError
from preprocess.cache import CacheReader
from train.tensorflow_import import load_tensorflow
from train.network.tasks import Task, class_indices, task_from_config
from train.rundir.layout import RELIABILITY, ROC_CURVE

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


def predict_split(model, reader: CacheReader, rows: np.ndarray) -> np.ndarray:
    """A bare model's raw probabilities for each row, in row order, streamed from the cache without augmentation:
    P(abnormal) (N,) for a binary model, grade probabilities (N, classes) for a severity model."""
    from train.trust.calibration import probabilities_from_logits
    from train.trust.served import outputs_for_rows

    _, logits = outputs_for_rows(model, reader, rows)
    return probabilities_from_logits(logits)


def report_from_probabilities(task: Task, classes: np.ndarray, probabilities: np.ndarray) -> dict:
    """The task's report: binary (accuracy, AUC, sensitivity, specificity) or severity (macro AUC, kappa...)."""
    from train.network.scores import compute_classification_report, compute_severity_report

    if task.is_binary:
        return compute_classification_report(classes, probabilities)
    return compute_severity_report(classes, probabilities, task.class_names, task.grade_numbers)


def evaluate_rows(members, reader: CacheReader, rows: np.ndarray, task: Task, name: str,
                  roc_path: Path | None = None, reliability_path: Path | None = None) -> dict:
    """The report (see `train.network.scores`) of served models (`train.trust.served`) on some rows of the cache,
    labelled `name`, from their calibrated probabilities, with ECE, Brier and NLL before and after calibration;
    with `roc_path` and `reliability_path`, also PNGs of the ROC curve and the reliability diagram there (a file
    that cannot be written is a warning).

    `members` is one served model, or several (an ensemble: `cv`'s folds, possibly a generator that loads them
    one at a time) whose probabilities are averaged.
    """
    from common.files import WriteError
    from train.network.scores import DECISION_THRESHOLD
    from train.rundir.plots import save_reliability_diagram, save_roc_curve
    from train.trust.calibration import calibration_report

    if len(rows) == 0:
        log.warning("the %s rows of %s are none; their metrics are undefined", name, reader.path)
    members = [members] if hasattr(members, "outputs_for_rows") else members
    raw, calibrated, temperatures = [], [], []
    for member in members:
        _, logits = member.outputs_for_rows(reader, rows)
        raw.append(member.probabilities(logits, calibrated=False))
        calibrated.append(member.probabilities(logits))
        temperatures.append(member.calibration.temperature if member.calibration is not None else None)
    raw_mean, calibrated_mean = np.mean(raw, axis=0), np.mean(calibrated, axis=0)
    classes = class_indices(task, reader, rows)
    is_calibrated = all(value is not None for value in temperatures)
    temperature = (temperatures[0] if len(temperatures) == 1 else temperatures) if is_calibrated else None
    calibration = calibration_report(raw_mean, calibrated_mean, classes, temperature)
    title = f"{name} split of {Path(reader.path).name}"
    if len(rows):
        try:
            if roc_path is not None:
                save_roc_curve(classes, calibrated_mean, task.class_names, f"ROC, {title}", roc_path,
                               DECISION_THRESHOLD if task.is_binary else None)
            if reliability_path is not None:
                save_reliability_diagram(calibration, f"Reliability, {title}", reliability_path)
        except WriteError as error:
            log.warning("no figure: %s", error)
    report = {"split": name, "task": task.name, **report_from_probabilities(task, classes, calibrated_mean),
              "calibration": calibration}
    if len(calibrated) > 1:
        report["fold_spread_sd_mean"] = float(np.mean(np.std(calibrated, axis=0, ddof=1)))
    return report


def evaluate_run(run_dir: Path, cache: Path, split: str = "test") -> dict:
    """Metrics of the run's model (`--keep`), or of a cross-validation's fold models averaged, on `split` of
    `cache`; refuses a differently preprocessed cache."""
    from train.trust.served import is_cv_dir, open_configs

    dirs, configs = open_configs(run_dir)
    config = configs[0]
    task = task_from_config(config)
    with CacheReader(cache) as reader:
        check_same_preprocessing(config, reader, run_dir)
        rows = reader.split(split)
        class_indices(task, reader, rows)  # a grade the run does not know: refused before the model loads
        load_tensorflow()  # only once the inputs are valid: bad input is refused in a second
        from train.trust.served import load_served

        members = load_served(dirs, configs)
        stem = f"{split}_{Path(cache).stem}"
        roc_path = Path(run_dir) / ROC_CURVE.format(split=stem)
        reliability_path = Path(run_dir) / RELIABILITY.format(split=stem)
        report = evaluate_rows(members, reader, rows, task, split, roc_path, reliability_path)
        for key, path in (("roc_curve", roc_path), ("reliability_diagram", reliability_path)):
            if path.is_file():
                report[key] = str(path)
        model = (f"mean of the {len(members)} fold models' calibrated probabilities" if is_cv_dir(run_dir)
                 else "the run's model")
        return {"run_dir": str(run_dir), "cache": str(cache), "cache_fingerprint": reader.fingerprint,
                "model": model, **report}


def format_number(value) -> str:
    """A metric for the terminal: 4 decimals, or "undefined" (None, NaN: e.g. an AUC with one class)."""
    return "undefined" if value is None or value != value else f"{value:.4f}"


def format_report(report: dict) -> str:
    """The report as a few aligned lines for the terminal: metrics, calibration, and where its figures went."""
    lines = format_severity_report(report) if report.get("task") == "severity" else format_binary_report(report)
    if report.get("calibration"):
        lines += "\n" + format_calibration(report["calibration"])
    for key, label in (("roc_curve", "ROC curve"), ("reliability_diagram", "reliability diagram")):
        if report.get(key):
            lines += f"\n{label}: {report[key]}"
    return lines


def format_calibration(calibration: dict) -> str:
    """ECE, Brier and NLL before and after calibration, with the temperature and the ECE's bins."""
    temperature = calibration.get("temperature")
    if temperature is None:
        told = "no calibration (a run made before it): the raw probabilities"
    elif isinstance(temperature, list):
        told = "temperatures " + ", ".join(f"{value:.3f}" for value in temperature)
    else:
        told = f"temperature {temperature:.3f}"
    lines = [f"calibration ({told}; ECE over {calibration['ece_bins']} equal-count bins of the predicted class's "
             "confidence)",
             f"{'':12}{'ECE':>8}{'Brier':>8}{'NLL':>8}"]
    for label, key in (("before", "before"), ("after", "after")):
        values = calibration.get(key)
        if values is not None:
            lines.append(f"  {label:<10}" + "".join(f"{format_number(values[name]):>8}" for name in ("ece", "brier", "nll")))
    return "\n".join(lines)


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
