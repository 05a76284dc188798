"""`fit`: prepare or reopen a run directory, train, then plot and test the run's model once.

Bad input (options, cache, a run directory that does not match) is refused before TensorFlow is
imported, so the user hears about it in a second rather than after a multi-second import.
The cache is opened once and that handle serves the whole run, test split included: a
`preprocess build --force` that replaces the file meanwhile (by rename) changes nothing for
this run, whose config.json and metrics.json name the fingerprint it really used.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import read_json, write_json_atomically
from preprocess.cache import CacheReader
from train.loop.distribute import ClusterRole, read_cluster_role
from train.tensorflow_import import load_tensorflow
from train.network.architecture import check_input_shape
from train.network.lesions import lesion_map_choices, resolve_call_offset, resolve_lesion_weight
from train.network.memory import check_step_fits
from train.network.precision import PrecisionChoice, check_precision_supported, resolve_precision
from train.network.scores import compute_separation
from train.fit_summary import FitReport
from train.options import FitOptions, changed_options, check_fit_options, resolve_recipe
from train.rundir.config import make_config
from train.rundir.folders import check_new_run_dir, locked_run_dir, prepare_output_dir
from train.rundir.layout import (
    CONFIG, CURVES, HISTORY, METRICS, RELIABILITY, ROC_CURVE, STATE, TrainingState, kept_model_name, read_history, read_state,
    remove_other_models, remove_stale_temporaries, write_history,
)
from train.network.tasks import task_from_config
from train.pipeline.folds import rows_and_classes

log = logging.getLogger(__name__)


def fit_model(options: FitOptions) -> FitReport:
    """Train a model as `options` say (see `FitOptions`) and return where and how it went.

    In a multi-worker run every worker calls this; only the chief prepares, locks and writes the
    run directory, and the others train alongside it with a scratch folder (see `train.loop.distribute`).
    """
    precise_bn_given, rate_given = options.precise_bn_scans is not None, options.learning_rate is not None
    options = resolve_recipe(options)
    check_fit_options(options)
    role = read_cluster_role(options.strategy)
    with CacheReader(options.cache) as reader:
        for split in ("train", "val"):
            if len(reader.split(split)) == 0:
                raise UserError(f"{options.cache}: the {split} split is empty; rebuild the cache with "
                                "more scans or other --val-fraction / --test-fraction")
        check_input_shape(reader.shape, options.padding)
        masked_rows = reader.lesion_mask_rows[np.concatenate([reader.split("train"), reader.split("val")])]
        options = replace(options, lesion_weight=resolve_lesion_weight(
            options.lesion_weight, int(masked_rows.sum()), options.task == "binary"))
        if options.lesion_weight:
            options = replace(options, **lesion_map_choices(precise_bn_given, rate_given))
        options = replace(options, call_offset=resolve_call_offset(options.call_offset, bool(options.lesion_weight)))
        if not reader.has_lungs:
            log.warning("%s has no lung boxes (a version-%d cache, built before the lung crop): training on whole "
                        "scans; `preprocess build --force` crops them to the lungs", options.cache,
                        reader.schema_version)
        if options.strategy != "multiworker":
            # refused before any folder is made; a multi-worker run checks once its strategy exists
            check_precision_supported(options.precision)
        if not role.is_chief:
            return fit_as_worker(options, reader, role)
        run_dir = prepare_run_dir(options)
        options = replace(options, run_dir=run_dir)
        with locked_run_dir(run_dir):
            options, precision = resolve_auto_precision(options)
            check_step_fits(reader.shape, options.batch_size, options.precision, options.padding, options.width)
            if options.resume:
                state, history = reopen_run(run_dir, options, reader)
            else:
                state, history = create_run(run_dir, options, reader)
            strategy = start_strategy(options)  # imports TensorFlow: only once the inputs are valid
            record_distribution(run_dir, strategy, options, precision.reason)
            if state.stopped_early or state.completed_epochs >= options.epochs:
                log.info("%s: nothing left to train (%d epochs done%s)", run_dir, state.completed_epochs,
                         ", stopped early" if state.stopped_early else "")
            else:
                from train.loop.loop import run_training

                state = run_training(reader, run_dir, options, state, history, strategy)
            return finish_run(run_dir, reader, state, options)


def resolve_auto_precision(options: FitOptions) -> tuple[FitOptions, PrecisionChoice]:
    """`--precision auto` decided for this machine (imports TensorFlow), before config.json records it
    and a resume compares it; with the choice, whose reason the strategy line gives."""
    choice = resolve_precision(options.precision)
    return replace(options, precision=choice.policy), choice


def prepare_run_dir(options: FitOptions) -> Path:
    """The run directory to write, created if needed; refuses a folder that cannot take this run."""
    return prepare_output_dir(options.run_dir, options.resume, "run directory", f"run to continue (no {CONFIG})",
                              lambda run_dir: (run_dir / CONFIG).is_file(), check_new_run_dir)


def start_strategy(options: FitOptions):
    """Import TensorFlow and create the --strategy (before any other TensorFlow op, as tf.distribute needs)."""
    load_tensorflow()
    from train.loop.distribute import make_strategy

    strategy = make_strategy(options.strategy)
    check_precision_supported(options.precision)
    return strategy


def record_distribution(run_dir: Path, strategy, options: FitOptions, precision_reason: str = "") -> None:
    """Write the strategy's replicas and global batch into config.json; a resume must keep them. Also
    the machine the run began on (train.hardware): a resume elsewhere is warned that its numbers will differ.
    The strategy line gives the precision and why `auto` chose it (`precision_reason`)."""
    from train.hardware import machine_record
    from train.loop.distribute import describe_strategy

    distribution = describe_strategy(strategy)
    distribution["global_batch_size"] = options.batch_size * distribution["replicas"]
    config = read_json(run_dir / CONFIG)
    recorded = config.get("distribution")
    if recorded is not None and recorded.get("replicas") != distribution["replicas"]:
        raise UserError(f"--resume: the run trained on {recorded.get('replicas')} replicas and this strategy has "
                        f"{distribution['replicas']}: the global batch would change; resume it as it was started")
    machine = machine_record()
    began_on = config.get("machine", machine)  # a run from before this record: unknown, assumed the same
    if began_on.get("kernels") != machine["kernels"]:
        log.warning("--resume: %s began on %s kernels and continues on %s: its numbers will differ in the last "
                    "bits from an uninterrupted run's", run_dir, began_on.get("kernels"), machine["kernels"])
    if recorded != distribution or "machine" not in config:
        config["distribution"] = distribution
        config.setdefault("machine", machine)  # where the run began
        write_json_atomically(run_dir / CONFIG, config)
    log.info("strategy %s: %d replica(s) on %d worker(s), global batch %d, precision %s, CPU kernels %s",
             distribution["strategy"], distribution["replicas"], distribution["workers"],
             distribution["global_batch_size"], PrecisionChoice(options.precision, precision_reason).describe(),
             machine["kernels"])


def fit_as_worker(options: FitOptions, reader: CacheReader, role: ClusterRole) -> FitReport:
    """Train as a non-chief worker: read the run directory (to resume), write nothing there.

    The worker commits its epochs into a scratch folder that is deleted when training ends:
    saving runs the same ops on every worker, and nothing it writes can be mistaken for a result.
    """
    run_dir = Path(options.run_dir)
    options, _ = resolve_auto_precision(options)
    state, history = TrainingState(), []
    if options.resume:
        if not (run_dir / CONFIG).is_file():
            raise UserError(f"--resume: {run_dir} holds no run to continue (no {CONFIG}); workers must see the "
                            "chief's run directory at the same path (shared storage)")
        check_resumable(run_dir, options, reader)
        state = read_state(run_dir)
    strategy = start_strategy(options)
    if state.stopped_early or state.completed_epochs >= options.epochs:
        return FitReport(run_dir, state, {}, is_chief=False)
    from train.loop.loop import run_training

    with tempfile.TemporaryDirectory(prefix=f"mosmed3d-{role.task_type}-{role.task_index}-") as scratch:
        # the model to resume from is read from the shared run directory, and the scratch folder takes the writes
        state = run_training(reader, Path(scratch), replace(options, run_dir=run_dir), state, history, strategy,
                             is_chief=False)
    log.info("%s finished %d epochs; the chief wrote the run directory %s", role.describe(),
             state.completed_epochs, run_dir)
    return FitReport(run_dir, state, {}, is_chief=False)


def create_run(run_dir: Path, options: FitOptions, reader: CacheReader) -> tuple[TrainingState, list[dict]]:
    """Write config.json into a new or empty folder (call with the lock held); refuses any other folder."""
    check_new_run_dir(run_dir)
    remove_stale_temporaries(run_dir)
    write_json_atomically(run_dir / CONFIG, make_config(options, reader))
    return TrainingState(), []


def reopen_run(run_dir: Path, options: FitOptions, reader: CacheReader) -> tuple[TrainingState, list[dict]]:
    """The committed state and history of an interrupted run (call with the lock held), after checking it
    matches `options`; whatever a killed process left beyond the last commit is removed."""
    config = check_resumable(run_dir, options, reader)
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


def check_resumable(run_dir: Path, options: FitOptions, reader: CacheReader) -> dict:
    """The run's config, after checking that `options` and the cache are the ones it was started with."""
    config = read_json(run_dir / CONFIG)
    if not all(isinstance(config.get(section, {}), dict) for section in ("options", "cache")):
        raise UserError(f"{run_dir / CONFIG}: damaged; not a config of this tool")
    changes = changed_options(config.get("options", {}), options)
    if changes:
        raise UserError(f"--resume must repeat the run's options; changed: {'; '.join(changes)}")
    if config.get("cache", {}).get("fingerprint") != reader.fingerprint:
        raise UserError(f"--resume: {options.cache} is not the cache {run_dir} was trained on (fingerprints differ)")
    return config


def finish_run(run_dir: Path, reader: CacheReader, state: TrainingState, options: FitOptions) -> FitReport:
    """Plot the curves; then, once per run model, fit its calibration and the reference of its training scans
    (`train.trust`) and evaluate the model `--keep` chose on the test split, with calibrated probabilities.

    A cross-validation fold is evaluated on its own validation fold instead: `train cv` keeps
    the test split for its final report.
    """
    load_tensorflow()
    from train.evaluate import evaluate_rows
    from train.rundir.models import load_trained_model
    from train.rundir.plots import save_training_curves
    from train.trust.calibration import read_calibration
    from train.trust.ood import read_reference
    from train.trust.served import ServedModel, fit_calibration_and_reference

    history = read_history(run_dir / HISTORY)
    if history:
        save_training_curves(history, run_dir / CURVES)
    model_name = kept_model_name(state, options.keep)
    metrics_path = run_dir / METRICS
    if metrics_path.exists():
        # the test split is looked at once per model: a resumed run that ended with the same model
        # keeps its result (a longer --epochs, or another --keep, that chose another one is re-tested)
        # (a run made before calibration, or before the separation test, gets what it lacks now)
        recorded = read_json(metrics_path)
        calibration, reference = read_calibration(run_dir), read_reference(run_dir)
        if recorded.get("model") == model_name and "calibration" in recorded and calibration is not None \
                and calibration.model == model_name and reference is not None and reference.model == model_name \
                and (options.task != "binary" or "learned" in recorded):
            return FitReport(run_dir, state, recorded, crop=reader.preprocessing.crop)
    model = load_trained_model(run_dir / model_name)
    config = read_json(run_dir / CONFIG)
    task = task_from_config(config)
    train, val = rows_and_classes(reader, options, task)
    calibration, reference, val_logits = fit_calibration_and_reference(run_dir, model, model_name, reader, task,
                                                                       train, val, bool(options.lesion_weight))
    served = ServedModel(run_dir, config, task, model, calibration, reference)
    if options.fold is None:
        report = evaluate_rows(served, reader, reader.split("test"), task, "test",
                               run_dir / ROC_CURVE.format(split="test"), run_dir / RELIABILITY.format(split="test"))
    else:
        report = evaluate_rows(served, reader, val[0], task, f"val (fold {options.fold} of {options.folds})",
                               run_dir / ROC_CURVE.format(split="val"), run_dir / RELIABILITY.format(split="val"))
    model_epoch = state.completed_epochs if options.keep == "last" else state.best_epoch
    model_val_auc = next((row.get("val_auc") for row in history if row["epoch"] == model_epoch), None)
    metrics = {"model": model_name, "keep": options.keep, "model_epoch": model_epoch, "model_val_auc": model_val_auc,
               "best_epoch": state.best_epoch, "best_val_auc": state.best_val_auc,
               "cache_fingerprint": reader.fingerprint, **report}
    if task.is_binary:  # has the run's model learned anything? (its validation logits against chance)
        metrics.update(compute_separation(val[1], val_logits[:, 0]).to_json())
    write_json_atomically(metrics_path, metrics)
    log.info("%s split of %s: %s", report["split"], reader.path,
             json.dumps({name: metrics[name] for name in task.summary_metrics}, sort_keys=True))
    return FitReport(run_dir, state, metrics, crop=reader.preprocessing.crop)
