"""The Keras part of `fit`: seeds, datasets, model (new or resumed), compile, `model.fit`."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.errors import UserError
from preprocess.cache import CacheReader
from train.pipeline.data import (
    Shard, both_outputs, make_evaluation_dataset, make_training_dataset, make_validation_dataset, reporting_read_failures,
    sample_weights_of, steps_per_epoch,
)
from train.loop.events import ScalarEventLogger
from train.loop.call_refit import CALL_REFIT_SCANS_PER_CLASS, RefitCall, call_refit_rows
from train.loop.precise_bn import PreciseBatchNorm, precise_bn_rows
from train.loop.recorder import RunRecorder, set_random_generator_states
from train.network.architecture import lesion_cell_grid, scaled
from train.network.lesion_training import FlatLogNames, LesionTargets, lesion_cells_loss
from train.network.lesions import LESION_OUTPUT, PROBABILITY_OUTPUT
from train.network.model import TOP_LOGIT, build_model
from train.network.precision import needs_loss_scaling
from train.options import FitOptions
from train.pipeline.folds import rows_and_classes
from train.rundir.layout import TENSORBOARD, TrainingState
from train.rundir.models import load_trained_model
from train.network.tasks import (
    Task, compute_class_weights, make_loss, make_task, make_training_metrics, training_targets,
)

log = logging.getLogger(__name__)

# the tutorial's schedule; --lr replaces only the initial rate
DECAY_STEPS = 100_000
DECAY_RATE = 0.96
# where --schedule cosine ends, as a share of the peak rate
COSINE_FINAL_FRACTION = 0.0


def configure_determinism(seed: int) -> None:
    """Seed Keras, NumPy and TensorFlow from --seed and ask TensorFlow for deterministic kernels.

    Initial weights and dropout follow from the seed; the data order and the rotation angles use
    stateless ops seeded from it (see `train.pipeline.data`), so they do not depend on this global state.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_schedule(options: FitOptions, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate per step: the tutorial's staircase decay (x0.96 every 100,000 steps, which a run
    of a few thousand steps never reaches), or a linear warm-up then a cosine decay over --epochs.

    A resumed run plans it again over its --epochs (see `run_training`).
    """
    if options.schedule == "tutorial":
        return keras.optimizers.schedules.ExponentialDecay(
            options.learning_rate, decay_steps=DECAY_STEPS, decay_rate=DECAY_RATE, staircase=True
        )
    total_steps = options.epochs * steps_per_epoch
    warmup_steps = min(options.warmup_epochs, options.epochs - 1) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else options.learning_rate, decay_steps=total_steps - warmup_steps,
        alpha=COSINE_FINAL_FRACTION, warmup_target=options.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def make_optimizer(options: FitOptions, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam on `make_schedule`'s rates, with loss scaling for float16."""
    optimizer = keras.optimizers.Adam(learning_rate=make_schedule(options, steps_per_epoch))
    if needs_loss_scaling(options.precision):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_compiled_model(input_shape, options: FitOptions, task: Task, steps_per_epoch: int) -> keras.Model:
    """The network, compiled; with a lesion weight, the lesion-map model with its two losses
    (`train.network.lesions`), the label's metrics under the names every run logs (`FlatLogNames`)."""
    lesion_map = bool(options.lesion_weight)
    model = build_model(tuple(input_shape), padding=options.padding, precision=options.precision,
                        architecture=scaled(options.width), classes=task.output_units,
                        bn_momentum=options.bn_momentum, pooling=options.pooling, norm=options.norm,
                        lesion_map=lesion_map)
    if not lesion_map:
        model.compile(optimizer=make_optimizer(options, steps_per_epoch), loss=make_loss(task),
                      metrics=make_training_metrics(task))
        return model
    model.compile(
        optimizer=make_optimizer(options, steps_per_epoch),
        loss={PROBABILITY_OUTPUT: make_loss(task), LESION_OUTPUT: lesion_cells_loss},
        loss_weights={PROBABILITY_OUTPUT: 1.0, LESION_OUTPUT: float(options.lesion_weight)},
        metrics={PROBABILITY_OUTPUT: make_training_metrics(task)},
    )
    return model


def load_training_state_model(path: Path, input_shape: tuple[int, int, int], random_generator_states: tuple):
    """The last epoch's model with its optimizer state, loaded without running any stored code."""
    def check(model: keras.Model) -> None:
        if model.input_shape != (None, *input_shape, 1):
            raise ValueError(f"it takes {model.input_shape}, the cache holds {input_shape} volumes")
        set_random_generator_states(model, random_generator_states)

    try:
        return load_trained_model(path, compile=True, check=check)
    except UserError as error:
        raise UserError(f"cannot load the training state to resume: {error}") from None


def build_before_fit(model: keras.Model, strategy, input_shape, task: Task, lesions: LesionTargets | None) -> None:
    """Create the model's metric and optimizer variables from the input's shapes, in the strategy's scope.

    Keras 3's `fit` creates them from its first batch, which under MultiWorkerMirroredStrategy it
    first all-reduces across workers, and that fails for an (x, y, weight) batch
    (keras-team/keras#20585, open). Built here from shapes alone, that step has nothing left to
    do, so it is skipped (with `multi_worker_step_logs`, one of the two workarounds for that issue).
    """
    target = tf.TensorSpec([None] if task.is_binary else [None, task.classes], tf.float32)
    weight = tf.TensorSpec([None], tf.float32)
    if lesions is not None:
        cells = tf.TensorSpec([None, *lesions.grid[2], 2], tf.float32)
        target = {PROBABILITY_OUTPUT: target, LESION_OUTPUT: cells}
        weight = both_outputs(weight)
    batch = (tf.TensorSpec([None, *input_shape, 1], tf.float32), target, weight)
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


@contextmanager
def multi_worker_step_logs(strategy) -> Iterator[None]:
    """Around `model.fit` under MultiWorkerMirroredStrategy: reduce each step's logs as on one worker.

    Keras 3 averages a multi-worker step's logs with strategy.reduce(MEAN, axis=0), which fails on
    their scalar values (keras-team/keras#20585, open). Reduced like a single worker's instead,
    a step's logs are this worker's; the epoch's logs, which early stopping and history.csv
    use, are still read from the metric variables, all-reduced over every worker.
    """
    from keras.src.backend.tensorflow import trainer

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    original = trainer._collective_all_reduce_multi_worker
    trainer._collective_all_reduce_multi_worker = lambda strategy: False
    try:
        yield
    finally:
        trainer._collective_all_reduce_multi_worker = original


def make_precise_bn_batches(reader: CacheReader, train_rows: np.ndarray, options: FitOptions) -> tf.data.Dataset:
    """The volume batches PreciseBN reads: `precise_bn_rows`, unrotated, in the per-replica batch size.

    Every worker of a distributed run reads all of them and so computes the same statistics.
    """
    rows = precise_bn_rows(train_rows, options.precise_bn_scans, options.batch_size, options.seed)
    batch_size = min(options.batch_size, len(rows))
    return make_evaluation_dataset(reader, rows, np.zeros(len(rows), np.float32), batch_size).map(
        lambda volume, label: volume)


def make_call_refit_batches(reader: CacheReader, train_rows: np.ndarray, train_classes: np.ndarray,
                            options: FitOptions) -> tf.data.Dataset:
    """The (volume, label) batches the lesion map's call offset is fitted from: `call_refit_rows`, unrotated."""
    rows, classes = call_refit_rows(train_rows, train_classes, CALL_REFIT_SCANS_PER_CLASS, options.seed)
    return make_evaluation_dataset(reader, rows, classes.astype(np.float32), options.batch_size)


def run_training(reader: CacheReader, run_dir: Path, options: FitOptions, state: TrainingState,
                 history: list[dict], strategy, is_chief: bool = True) -> TrainingState:
    """Train from state.completed_epochs to options.epochs (or an early stop); returns the final state.

    `run_dir` is where this process commits its epochs: the run directory on the chief, a
    scratch folder on the other workers of a multi-worker run (they save exactly what the chief
    saves, so that every collective op is run by every worker, and nobody reads it).
    """
    configure_determinism(options.seed)
    task = make_task(options.task, reader)
    (train_rows, train_classes), (val_rows, val_classes) = rows_and_classes(reader, options, task)
    class_weights = compute_class_weights(task, train_classes)
    train_targets, val_targets = training_targets(task, train_classes), training_targets(task, val_classes)
    row_weights = sample_weights_of(train_classes, class_weights)
    per_replica = options.batch_size
    global_batch_size = per_replica * strategy.num_replicas_in_sync
    first_epoch = state.completed_epochs
    steps = steps_per_epoch(len(train_rows), global_batch_size)
    with strategy.scope():
        if first_epoch > 0:
            model = load_training_state_model(options.run_dir / state.last_model, reader.shape,
                                              state.random_generator_states)
            # the schedule is planned over this invocation's --epochs: the same plan as before when
            # --epochs is unchanged (an exact resume), re-planned from the step reached when it changed
            optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # under loss scaling
            optimizer.learning_rate = make_schedule(options, steps)
            log.info("resuming %s after epoch %d of %d", options.run_dir, first_epoch, options.epochs)
        else:
            model = make_compiled_model(reader.shape, options, task, steps)
    lesions = LesionTargets(reader, lesion_cell_grid(reader.shape, options.padding, scaled(options.width))) \
        if options.lesion_weight else None
    build_before_fit(model, strategy, reader.shape, task, lesions)

    def training_pipeline(context):  # called once per worker, with that worker's part of each batch
        return make_training_dataset(reader, train_rows, train_targets, per_replica, options.seed,
                                     first_epoch=first_epoch, epochs=options.epochs, augment=options.augment,
                                     row_weights=row_weights, lesions=lesions,
                                     shard=Shard.from_input_context(context, per_replica))

    def validation_pipeline(context):
        return make_validation_dataset(reader, val_rows, val_targets, per_replica, lesions=lesions,
                                       shard=Shard.from_input_context(context, per_replica))

    training_data = strategy.distribute_datasets_from_function(training_pipeline)
    validation_data = strategy.distribute_datasets_from_function(validation_pipeline)
    # with --keep last the run's model is the end of the schedule: it trains every epoch, no early stop
    recorder = RunRecorder(run_dir, state, history, options.patience if options.keep == "best" else None)
    callbacks = [recorder, ScalarEventLogger(run_dir / TENSORBOARD)] if is_chief else [recorder]
    if options.precise_bn_scans:
        # first: the statistics are re-estimated before any other callback sees the validation
        callbacks.insert(0, PreciseBatchNorm(make_precise_bn_batches(reader, train_rows, options)))
    if options.call_offset == "refit":  # after PreciseBN: the offset is fitted to the statistics validation uses
        callbacks.insert(1 if options.precise_bn_scans else 0,
                         RefitCall(make_call_refit_batches(reader, train_rows, train_classes, options),
                                   PROBABILITY_OUTPUT, TOP_LOGIT))
    if lesions is not None:
        callbacks.insert(0, FlatLogNames())
    counts = ", ".join(f"{int(np.sum(train_classes == index))} {name}" for index, name in enumerate(task.class_names))
    if lesions is not None:
        masked = int(reader.lesion_mask_rows[train_rows].sum())
        log.info("learning where lesions are from %d lesion masks (and %d normal scans), lesion-cell loss weight %g",
                 masked, int(np.sum(train_classes == 0)), options.lesion_weight)
    log.info("training on %d scans (%s), validating on %d; class weights %s; %d replica(s) x %d = global batch %d",
             len(train_rows), counts, len(val_rows),
             {task.class_names[index]: round(weight, 3) for index, weight in class_weights.items()},
             strategy.num_replicas_in_sync, per_replica, global_batch_size)
    # a damaged volume: one line naming the row, not a TensorFlow traceback
    with reporting_read_failures(), multi_worker_step_logs(strategy):
        model.fit(
            training_data,
            epochs=options.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=0 if options.quiet else 2,
            shuffle=False,  # the dataset shuffles, seeded, per epoch
        )
    return recorder.state
