"""`evaluate`: a run's best model on one split of a cache, and the checks that make that valid."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from preprocess.cache import CacheReader, Preprocessing
from preprocess.errors import UserError
from train.native_logs import load_tensorflow
from train.run import open_run

log = logging.getLogger(__name__)

EVALUATION_BATCH_SIZE = 2


def preprocessing_as_json(preprocessing: Preprocessing) -> dict:
    """Plain JSON values (tuples become lists), as config.json stores them."""
    return json.loads(json.dumps(asdict(preprocessing)))


def check_same_preprocessing(config: dict, reader: CacheReader, run_dir: Path) -> None:
    """Refuse a cache whose volumes were made differently from the run's training cache."""
    trained = config.get("preprocessing") or {}
    current = preprocessing_as_json(reader.preprocessing)
    differences = [f"{name} {trained.get(name)!r} in the run, {value!r} in the cache"
                   for name, value in current.items() if trained.get(name) != value]
    if differences:
        raise UserError(f"{reader.path} was preprocessed differently from the cache {run_dir} was trained on "
                        f"({'; '.join(differences)}); rebuild it with the run's options")


def predict_split(model, reader: CacheReader, rows: np.ndarray, batch_size: int = EVALUATION_BATCH_SIZE) -> np.ndarray:
    """P(abnormal) for each row, in row order, streamed from the cache without augmentation."""
    from train.data import make_evaluation_dataset, reporting_read_failures

    if len(rows) == 0:
        return np.zeros(0, dtype=np.float64)
    dataset = make_evaluation_dataset(reader, rows, reader.labels[rows], batch_size)
    volumes_only = dataset.map(lambda volume, label: volume)
    with reporting_read_failures():
        probabilities = model.predict(volumes_only, verbose=0)
    return np.asarray(probabilities, dtype=np.float64).reshape(-1)


def evaluate_model(model, reader: CacheReader, split: str) -> dict:
    """The classification report (see `train.metrics`) of `model` on a split of the cache."""
    from train.metrics import compute_classification_report

    rows = reader.split(split)
    if len(rows) == 0:
        log.warning("the %s split of %s is empty; its metrics are undefined", split, reader.path)
    probabilities = predict_split(model, reader, rows)
    return {"split": split, **compute_classification_report(reader.labels[rows], probabilities)}


def evaluate_run(run_dir: Path, cache: Path, split: str = "test") -> dict:
    """Metrics of the run's best model on `split` of `cache`; refuses a differently preprocessed cache."""
    config = open_run(run_dir)
    with CacheReader(cache) as reader:
        check_same_preprocessing(config, reader, run_dir)
        load_tensorflow()  # only once the inputs are valid: bad input is refused in a second
        from train.model import load_best_model

        model = load_best_model(Path(run_dir))
        report = evaluate_model(model, reader, split)
        return {"run_dir": str(run_dir), "cache": str(cache), "cache_fingerprint": reader.fingerprint, **report}


def format_report(report: dict) -> str:
    """The report as a few aligned lines for the terminal."""
    number = lambda value: "undefined" if value is None or value != value else f"{value:.4f}"  # noqa: E731
    (true_negatives, false_positives), (false_negatives, true_positives) = report["confusion_matrix"]
    return "\n".join([
        f"{report['split']} split: {report['scans']} scans",
        f"accuracy     {number(report['accuracy'])}",
        f"AUC          {number(report['auc'])}",
        f"sensitivity  {number(report['sensitivity'])}",
        f"specificity  {number(report['specificity'])}",
        "confusion matrix   predicted normal  predicted abnormal",
        f"  true normal      {true_negatives:16d}  {false_positives:18d}",
        f"  true abnormal    {false_negatives:16d}  {true_positives:18d}",
    ])
