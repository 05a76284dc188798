"""`cv`: K-fold cross-validation over the cache's train and validation rows, then one test report.

The train and validation rows are pooled and dealt into K folds, stratified by class (grade for
`--task severity`) and seeded by `--seed` (`train.pipeline.folds.make_folds`). Fold k trains on the
other K - 1 folds, is validated on fold k (which picks its best epoch under `--keep best`), and
is reported on fold k: each fold is a normal run directory, `RUN_DIR/fold-k`. The test split is
not looked at until all folds are done; then the K fold models, averaged (their probabilities),
are evaluated on it once.

    RUN_DIR/fold-1 ... fold-K   run directories (metrics.json: the fold's validation report)
    RUN_DIR/cv_summary.json     mean and standard deviation over folds, per fold values, test report
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import write_json_atomically
from preprocess.cache import CacheReader
from train.network.precision import check_precision_supported
from train.network.tasks import HEADLINE_METRICS
from train.options import FitOptions, check_fit_options, resolve_recipe
from train.rundir.folders import prepare_output_dir
from train.rundir.layout import CONFIG, CV_SUMMARY as SUMMARY, fold_dir

log = logging.getLogger(__name__)

MAX_FOLDS = 100


@dataclass(frozen=True)
class CrossValidationReport:
    run_dir: Path
    summary: dict


def summarize(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1) of the defined values; NaN when there are none."""
    defined = [value for value in values if value is not None and not math.isnan(value)]
    mean = float(np.mean(defined)) if defined else float("nan")
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else float("nan")
    return {"mean": mean, "std": std, "per_fold": values}


def cross_validate(options: FitOptions, folds: int) -> CrossValidationReport:
    """Train `folds` runs (see the module docstring) and write and return their summary."""
    from train.fit import fit_model

    if not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= MAX_FOLDS:
        raise UserError(f"--folds must be a whole number from 2 to {MAX_FOLDS}, got {folds!r}")
    if options.strategy == "multiworker":
        raise UserError("cv runs its folds one after another in this process; use --strategy mirrored or default")
    check_fit_options(replace(resolve_recipe(options), fold=1, folds=folds))
    with CacheReader(options.cache) as reader:  # refuse a cache with too few rows before any folder is made
        pool = len(reader.split("train")) + len(reader.split("val"))
        if pool < 2 * folds:
            raise UserError(f"--folds {folds} needs at least {2 * folds} train and validation scans "
                            f"(two per fold); {options.cache} has {pool}")
    check_precision_supported(resolve_recipe(options).precision)  # as fit_model does, before any folder
    run_dir = prepare_cv_dir(options)
    reports = []
    for fold in range(1, folds + 1):
        directory = fold_dir(run_dir, fold)
        resume = options.resume and (directory / CONFIG).is_file()
        log.info("fold %d of %d -> %s", fold, folds, directory)
        reports.append(fit_model(replace(options, run_dir=directory, fold=fold, folds=folds, resume=resume)))
    summary = summarize_folds(options, run_dir, [report.test_metrics for report in reports])
    summary["test"] = evaluate_ensemble_on_test(options, [report.run_dir for report in reports])
    write_json_atomically(run_dir / SUMMARY, summary)
    return CrossValidationReport(run_dir, summary)


def prepare_cv_dir(options: FitOptions) -> Path:
    """The folder for the folds: new, or (with --resume) one a cv started."""
    return prepare_output_dir(options.run_dir, options.resume, "cross-validation folder",
                              "cross-validation to continue", Path.is_dir, check_new_cv_dir, suffix="-cv")


def check_new_cv_dir(run_dir: Path) -> None:
    others = sorted(path.name for path in run_dir.iterdir())
    if others:
        raise UserError(f"--run-dir {run_dir} is not empty ({', '.join(others[:3])}); choose a new folder, "
                        "or add --resume to continue a cross-validation")


def summarize_folds(options: FitOptions, run_dir: Path, fold_reports: list[dict]) -> dict:
    """Mean ± standard deviation over the folds' validation reports."""
    names = HEADLINE_METRICS[options.task]["headline"]
    return {
        "folds": len(fold_reports),
        "task": options.task,
        "seed": options.seed,
        "cache": str(options.cache),
        "cache_fingerprint": fold_reports[0].get("cache_fingerprint") if fold_reports else None,
        "fold_run_dirs": [str(fold_dir(run_dir, fold)) for fold in range(1, len(fold_reports) + 1)],
        "validation": {name: summarize([report.get(name) for report in fold_reports]) for name in names},
        # each fold's separation test on its validation fold (train.network.scores); None: cannot tell or untested
        "learned": [report.get("learned") for report in fold_reports],
    }


def evaluate_ensemble_on_test(options: FitOptions, run_dirs: list[Path]) -> dict:
    """The test report of the fold models, their probabilities averaged: the one look at the test split."""
    from train.evaluate import evaluate_rows
    from train.network.tasks import make_task
    from train.trust.served import load_served, open_configs

    with CacheReader(options.cache) as reader:
        task = make_task(options.task, reader)
        rows = reader.split("test")
        if len(rows) == 0:
            log.warning("the test split of %s is empty: no test report", options.cache)
            return {"split": "test", "scans": 0}
        members = (load_served(*open_configs(run_dir))[0] for run_dir in run_dirs)  # loaded one at a time
        report = evaluate_rows(members, reader, rows, task, "test")
    return {**report, "model": f"mean of the {len(run_dirs)} fold models' calibrated probabilities"}


def format_summary(report: CrossValidationReport) -> str:
    """The summary as aligned lines: mean ± std per metric with the per-fold values, then the test report."""
    from train.evaluate import format_number as number

    summary = report.summary
    lines = [f"{summary['folds']}-fold cross-validation ({summary['task']}) in {report.run_dir}: validation folds",
             f"{'metric':<26}{'mean':>8}  {'± std':>7}   per fold"]
    for name, values in summary["validation"].items():
        per_fold = " ".join(number(value) for value in values["per_fold"])
        lines.append(f"{name:<26}{number(values['mean']):>8}  {number(values['std']):>7}   {per_fold}")
    not_learned = [str(fold) for fold, learned in enumerate(summary.get("learned", []), 1) if learned is False]
    if not_learned:
        lines.append(f"fold{'s' if len(not_learned) > 1 else ''} {', '.join(not_learned)}: the model has not learned "
                     "to separate the classes (validation AUC not distinguishable from 0.5; see its metrics.json)")
    test = summary["test"]
    if test.get("scans"):
        headline = HEADLINE_METRICS[summary["task"]]["headline"]
        lines.append(f"test split ({test['scans']} scans), {test['model']}: "
                     + ", ".join(f"{name} {number(test[name])}" for name in headline))
        calibration = test.get("calibration") or {}
        if calibration.get("after"):
            lines.append(f"  calibration: ECE {number(calibration['before']['ece'])} -> "
                         f"{number(calibration['after']['ece'])} ({calibration['ece_bins']} equal-count bins), spread "
                         f"across folds (mean sd) {number(test.get('fold_spread_sd_mean'))}")
    lines.append(f"written to {report.run_dir / SUMMARY}")
    return "\n".join(lines)
