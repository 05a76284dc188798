"""The models `predict` and `evaluate` serve: one run's, or a cross-validation's folds, each with its
calibration and reference; and the step of `fit` that makes those two files.

A `ServedModel` gives, for volumes, the network's penultimate features and its logits (the
output layer's kernel applied in float64 to those features, so a probability that rounds to 1
in float32 still has a finite logit), and from them calibrated probabilities
(`train.trust.calibration`) and a verdict on each scan (`train.trust.ood`).

A cross-validation directory (`train cv`'s RUN_DIR) serves its K fold models as an ensemble: the
mean of their calibrated probabilities, with the spread (sd, min-max) across folds.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import read_json
from train.network.tasks import Task, task_from_config
from train.rundir.layout import CV_SUMMARY, METRICS, fold_dir, fold_dirs, model_path, open_run
from train.trust.calibration import (
    LIKELIHOOD_RATIO_CRITICAL, LIKELIHOOD_RATIO_CRITICAL_2, Calibration, calibrate, probabilities_from_logits,
    read_calibration, write_calibration,
)
from train.trust.ood import Reference, build_reference, read_reference, write_reference

log = logging.getLogger(__name__)

_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its (features, output) model


@dataclass
class ServedModel:
    run_dir: Path
    config: dict
    task: Task
    model: object  # keras.Model
    calibration: Calibration | None
    reference: Reference | None
    learned: bool | None = None  # metrics.json's separation test of this model (None: untested, or too few scans)

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration is not None else 1.0

    def outputs(self, volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate features (N, F), logits (N, units)) of a batch of volumes (N, H, W, D)."""
        return feature_outputs(self.model, np.asarray(volumes)[..., None])

    def outputs_for_rows(self, reader, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return outputs_for_rows(self.model, reader, rows)

    @property
    def bias(self) -> float:
        return self.calibration.bias if self.calibration is not None else 0.0

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        return probabilities_from_logits(logits, self.temperature if calibrated else 1.0,
                                         self.bias if calibrated else 0.0)


# -- features and logits ---------------------------------------------------------------------------
def _head(model):
    """A model from volumes to (penultimate features, output), built once per model."""
    import keras

    head = _HEADS.get(model)
    if head is None:
        head = _HEADS[model] = keras.Model(model.input, [model.layers[-1].input, model.output])
    return head


def logits_of(model, features: np.ndarray) -> np.ndarray:
    """The output layer's logits of its input `features`: a Dense's, or the lesion map's call
    (`train.network.model.TopLogitCall`), which gives its effective kernel and bias the same way."""
    import keras

    layer = model.layers[-1]
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(weight), dtype=np.float64)
                    for weight in (layer.kernel, layer.bias))
    return np.asarray(features, dtype=np.float64) @ kernel + bias


def feature_outputs(model, volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features, _ = _head(model)(volumes, training=False)
    features = np.asarray(features, dtype=np.float64)
    return features, logits_of(model, features)


def outputs_for_rows(model, reader, rows: np.ndarray, batch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of cache rows, in row order, streamed without augmentation."""
    from train.pipeline.data import make_evaluation_dataset, reporting_read_failures

    units = int(model.output_shape[-1])
    features_size = int(model.layers[-1].input.shape[-1])
    if len(rows) == 0:
        return np.zeros((0, features_size)), np.zeros((0, units))
    dataset = make_evaluation_dataset(reader, rows, reader.labels[rows], batch_size).map(lambda volume, label: volume)
    with reporting_read_failures():
        features, _ = _head(model).predict(dataset, verbose=0)
    features = np.asarray(features, dtype=np.float64).reshape(len(rows), features_size)
    return features, logits_of(model, features)


# -- made by fit ------------------------------------------------------------------------------------
def fit_calibration_and_reference(run_dir: Path, model, model_name: str, reader, task: Task,
                                  train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                                  fit_bias: bool = False) -> tuple[Calibration, Reference, np.ndarray]:
    """calibration.json (the temperature, fitted on the validation rows) and reference.json (from the training
    rows, thresholds on the validation rows) for the run's model `model_name`; `train`, `val`: (rows, classes).
    Also returns the validation rows' logits, which `fit` tests for separation (`train.network.scores`)."""
    (train_rows, train_classes), (val_rows, val_classes) = train, val
    train_features, _ = outputs_for_rows(model, reader, train_rows)
    val_features, val_logits = outputs_for_rows(model, reader, val_rows)
    calibration = calibrate(val_logits, val_classes, model_name, f"validation rows ({len(val_rows)} scans)",
                            fit_bias=fit_bias and task.is_binary)
    temperature, at_bound = calibration.fitted_temperature, calibration.at_bound
    if calibration.bias:
        log.info("calibration: the lesion map's threshold moved by a bias of %.3f with temperature %.3f (likelihood "
                 "ratio %.1f > %.2f)", calibration.bias, calibration.temperature, calibration.likelihood_ratio,
                 LIKELIHOOD_RATIO_CRITICAL_2)
    elif calibration.temperature != temperature:
        log.info("calibration: the validation split does not support a temperature other than 1 (fitted %.3f, "
                 "likelihood ratio %.2f < %.2f): the probabilities are served as the network gives them",
                 temperature, calibration.likelihood_ratio, LIKELIHOOD_RATIO_CRITICAL)
    elif at_bound and temperature < 1:
        log.warning("the temperature hit its lower bound (%.3g): the validation scans are separated perfectly, so "
                    "the calibrated probabilities are as sure as the bound allows", temperature)
    elif at_bound:
        log.warning("the temperature hit its upper bound (%.3g): the model's outputs say almost nothing about the "
                    "validation scans' classes, so its calibrated probabilities stay near the base rate", temperature)
    stats = reader.scan_stats()
    if stats is None:
        log.warning("%s is a version-%d cache without scan statistics: predict's histogram and geometry checks are "
                    "unavailable for this run (rebuild the cache with `preprocess build --force` for them)",
                    reader.path, reader.schema_version)
    reference = build_reference(
        model_name, train_features, train_classes, val_features,
        None if stats is None else [stats[row] for row in train_rows],
        None if stats is None else [stats[row] for row in val_rows])
    write_calibration(run_dir, calibration)
    write_reference(run_dir, reference)
    log.info("calibration: temperature %.3f (validation NLL %.4f -> %.4f); reference of %d training scans, "
             "validation scans flagged: %s", calibration.temperature, calibration.nll_before, calibration.nll_after,
             len(train_rows), ", ".join(f"{name} {100 * rate:.1f}%" for name, rate in reference.val_flag_rate.items()))
    return calibration, reference, val_logits


# -- opened by predict and evaluate -------------------------------------------------------------------
def is_cv_dir(path: Path) -> bool:
    return (Path(path) / CV_SUMMARY).is_file() or fold_dir(path, 1).is_dir()


def member_dirs(path: Path) -> list[Path]:
    """The run directories to serve: `path` itself, or a cross-validation's fold-1 ... fold-K."""
    path = Path(path)
    if not is_cv_dir(path):
        return [path]
    folds = fold_dirs(path)
    if not (path / CV_SUMMARY).is_file():
        raise UserError(f"{path}: the cross-validation has not finished (no {CV_SUMMARY}); finish it with "
                        "`train cv --resume`, or give one fold's directory")
    if folds != [fold_dir(path, fold) for fold in range(1, len(folds) + 1)] or len(folds) < 2:
        raise UserError(f"{path}: expected folders fold-1 ... fold-K (K >= 2); the directory was changed by hand")
    return folds


def check_members(configs: list[dict], dirs: list[Path]) -> None:
    """The folds of one ensemble must agree on what they read and what they output."""
    first = configs[0]
    for config, directory in zip(configs[1:], dirs[1:]):
        for key in ("preprocessing", "class_names", "input_shape"):
            if config.get(key) != first.get(key):
                raise UserError(f"{directory}: its {key} differs from {dirs[0]}'s; not folds of one cross-validation")


def open_configs(path: Path) -> tuple[list[Path], list[dict]]:
    """The member run directories of `path` and their configs, checked before any model loads."""
    dirs = member_dirs(path)
    configs = [open_run(directory) for directory in dirs]
    check_members(configs, dirs)
    return dirs, configs


def read_learned(run_dir: Path, model_name: str) -> bool | None:
    """Whether `fit` found the run's model `model_name` to separate the validation split's classes
    (metrics.json's `learned`); None for a run made before that test, another model, or a damaged file."""
    try:
        metrics = read_json(Path(run_dir) / METRICS)
    except UserError:
        return None  # missing or damaged: predict does not need metrics.json, and `runs` reports the damage
    learned = metrics.get("learned") if metrics.get("model") == model_name else None
    return learned if isinstance(learned, bool) else None


def load_served(dirs: list[Path], configs: list[dict]) -> list[ServedModel]:
    """Load each member's model, calibration and reference (TensorFlow must be loaded)."""
    from train.network.precision import check_model_precision
    from train.rundir.models import load_run_model

    for directory, config in zip(dirs, configs):  # before any model loads: one line, not a failed first batch
        check_model_precision(config.get("options", {}).get("precision", "float32"), directory)
    served = []
    for directory, config in zip(dirs, configs):
        model = load_run_model(directory)
        name = model_path(directory).name
        calibration, reference = read_calibration(directory), read_reference(directory)
        if calibration is not None and calibration.model != name:
            calibration = None  # fitted for a model the run no longer serves
        if reference is not None and reference.model != name:
            reference = None
        served.append(ServedModel(directory, config, task_from_config(config), model, calibration, reference,
                                  read_learned(directory, name)))
    not_learned = [str(member.run_dir) for member in served if member.learned is False]
    if not_learned:
        one = len(not_learned) == 1
        log.warning("%s: %s not learned to separate the classes (validation AUC not distinguishable from 0.5), so "
                    "%s probabilities carry no information", ", ".join(not_learned),
                    "the model has" if one else "these fold models have", "its" if one else "their")
    without_calibration = [str(member.run_dir) for member in served if member.calibration is None]
    if without_calibration:
        log.warning("%s: no calibration (made before calibration, or by hand): its probabilities are the raw "
                    "network outputs", ", ".join(without_calibration))
    without_reference = [str(member.run_dir) for member in served if member.reference is None]
    if without_reference:
        log.warning("%s: no reference of the training scans (made before these checks): whether a scan is like the "
                    "training data cannot be checked", ", ".join(without_reference))
    elif any(not member.reference.has_stats for member in served):
        log.warning("%s: trained on a version-1 cache (no scan statistics): only the features check is available, "
                    "not the histogram and geometry checks", served[0].run_dir)
    return served
