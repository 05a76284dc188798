"""`fit`: prepare or reopen a run directory, train, then plot and test the best model once.

Bad input (options, cache, a run directory that does not match) is refused before TensorFlow is
imported, so the user hears about it in a second rather than after a multi-second import.
The cache is opened once and that handle serves the whole run, test split included: a
`preprocess build --force` that replaces the file meanwhile (by rename) changes nothing for
this run, whose config.json and metrics.json name the fingerprint it really used.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from preprocess.cache import CacheReader
from preprocess.errors import UserError
from train.architecture import check_input_shape
from train.evaluate import preprocessing_as_json
from train.native_logs import load_tensorflow
from train.options import FitOptions, changed_options, check_fit_options
from train.files import read_json, write_json_atomically
from train.run import (
    CONFIG, CURVES, HISTORY, METRICS, STATE, TrainingState, create_new_run_dir, default_run_dir, is_own_file,
    locked_run_dir, make_run_dir, read_history, read_state, remove_other_models, remove_stale_temporaries,
    write_history,
)
from train.splits import compute_class_weights, split_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitReport:
    run_dir: Path
    state: TrainingState
    test_metrics: dict


def fit_model(options: FitOptions) -> FitReport:
    """Train a model as `options` say (see `FitOptions`) and return where and how it went."""
    check_fit_options(options)
    with CacheReader(options.cache) as reader:
        for split in ("train", "val"):
            if len(reader.split(split)) == 0:
                raise UserError(f"{options.cache}: the {split} split is empty; rebuild the cache with "
                                "more scans or other --val-fraction / --test-fraction")
        check_input_shape(reader.shape, options.padding)
        if options.precision == "mixed_float16":
            load_tensorflow()
            from train.training import check_precision_supported

            check_precision_supported(options.precision)
        if options.run_dir is None:
            run_dir = create_new_run_dir(default_run_dir())
        else:
            run_dir = Path(options.run_dir)
            if options.resume and not (run_dir / CONFIG).is_file():
                raise UserError(f"--resume: {run_dir} holds no run to continue (no {CONFIG})")
            if not options.resume and run_dir.is_dir():
                check_new_run_dir(run_dir)  # before the lock file: a folder that is not ours is not touched
            make_run_dir(run_dir)
        options = replace(options, run_dir=run_dir)
        with locked_run_dir(run_dir):
            if options.resume:
                state, history = reopen_run(run_dir, options, reader)
            else:
                state, history = create_run(run_dir, options, reader)
            if state.stopped_early or state.completed_epochs >= options.epochs:
                log.info("%s: nothing left to train (%d epochs done%s)", run_dir, state.completed_epochs,
                         ", stopped early" if state.stopped_early else "")
            else:
                load_tensorflow()  # only once the inputs are valid: bad input is refused in a second
                from train.training import run_training

                state = run_training(reader, run_dir, options, state, history)
            return finish_run(run_dir, reader, state)


def create_run(run_dir: Path, options: FitOptions, reader: CacheReader) -> tuple[TrainingState, list[dict]]:
    """Write config.json into a new or empty folder (call with the lock held); refuses any other folder."""
    check_new_run_dir(run_dir)
    remove_stale_temporaries(run_dir)
    write_json_atomically(run_dir / CONFIG, make_config(options, reader))
    return TrainingState(), []


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds a run (that needs --resume) or anything else but our own lock and temporaries."""
    if (run_dir / CONFIG).exists() or (run_dir / STATE).exists():
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --run-dir")
    others = sorted(path.name for path in run_dir.iterdir() if not is_own_file(path.name))
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"--run-dir {run_dir} is not empty ({listed}) and holds no run; choose a new or empty folder")


def reopen_run(run_dir: Path, options: FitOptions, reader: CacheReader) -> tuple[TrainingState, list[dict]]:
    """The committed state and history of an interrupted run (call with the lock held), after checking it
    matches `options`; whatever a killed process left beyond the last commit is removed."""
    config = read_json(run_dir / CONFIG)
    if not all(isinstance(config.get(section, {}), dict) for section in ("options", "cache")):
        raise UserError(f"{run_dir / CONFIG}: damaged; not a config of this tool")
    changes = changed_options(config.get("options", {}), options)
    if changes:
        raise UserError(f"--resume must repeat the run's options; changed: {'; '.join(changes)}")
    if config.get("cache", {}).get("fingerprint") != reader.fingerprint:
        raise UserError(f"--resume: {options.cache} is not the cache {run_dir} was trained on (fingerprints differ)")
    remove_stale_temporaries(run_dir)
    state = read_state(run_dir)
    for name in (state.last_model, state.best_model):
        if name and not (run_dir / name).is_file():
            raise UserError(f"--resume: {run_dir / name}, named by {STATE}, is missing; the run cannot continue")
    remove_other_models(run_dir, keep={state.last_model, state.best_model})  # files of an uncommitted epoch
    # rows after state.json's last epoch belong to an epoch that was not committed: it is redone
    history = [row for row in read_history(run_dir / HISTORY) if row["epoch"] <= state.completed_epochs]
    if [row["epoch"] for row in history] != list(range(1, state.completed_epochs + 1)):
        raise UserError(f"{run_dir / HISTORY} does not match {STATE}; the run directory was changed by hand")
    write_history(run_dir / HISTORY, history)
    config["options"] = options.to_json()  # --epochs may have changed
    write_json_atomically(run_dir / CONFIG, config)
    return state, history


def make_config(options: FitOptions, reader: CacheReader) -> dict:
    """config.json: options, the cache's preprocessing, attributes and fingerprint, sizes, versions."""
    splits = {name: int(len(reader.split(name))) for name in ("train", "val", "test")}
    _, train_labels = split_rows(reader, "train")
    return {
        "options": options.to_json(),
        "preprocessing": preprocessing_as_json(reader.preprocessing),
        "cache": {"path": str(options.cache), "fingerprint": reader.fingerprint, "attributes": reader.attributes},
        "input_shape": list(reader.shape),
        "class_names": ["normal", "abnormal"],
        "split_sizes": splits,
        "class_weights": {str(label): weight for label, weight in compute_class_weights(train_labels).items()},
        "versions": {name: _version(name) for name in ("mosmed3d", "tensorflow", "keras", "h5py", "numpy")}
        | {"python": platform.python_version()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def finish_run(run_dir: Path, reader: CacheReader, state: TrainingState) -> FitReport:
    """Plot the curves and, once per run, evaluate the best model on the test split."""
    load_tensorflow()
    from train.evaluate import evaluate_model
    from train.model import load_trained_model
    from train.plots import save_training_curves

    history = read_history(run_dir / HISTORY)
    if history:
        save_training_curves(history, run_dir / CURVES)
    metrics_path = run_dir / METRICS
    if metrics_path.exists():
        # the test split is looked at once per best model: a resumed run that ended with the same
        # best model keeps its result (a longer --epochs that found a better model is re-tested)
        recorded = read_json(metrics_path)
        if recorded.get("model") == state.best_model:
            return FitReport(run_dir, state, recorded)
    model = load_trained_model(run_dir / state.best_model)
    report = evaluate_model(model, reader, "test")
    metrics = {"model": state.best_model, "best_epoch": state.best_epoch, "best_val_auc": state.best_val_auc,
               "cache_fingerprint": reader.fingerprint, **report}
    write_json_atomically(metrics_path, metrics)
    log.info("test split of %s: %s", reader.path, json.dumps({k: metrics[k] for k in ("accuracy", "auc")}))
    return FitReport(run_dir, state, metrics)
