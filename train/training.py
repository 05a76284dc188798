"""The Keras part of `fit`: seeds, datasets, model (new or resumed), compile, `model.fit`."""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from preprocess.cache import CacheReader
from preprocess.errors import UserError
from train.data import make_evaluation_dataset, make_training_dataset, reporting_read_failures, steps_per_epoch
from train.events import ScalarEventLogger
from train.metrics import Specificity, make_training_metrics
from train.model import build_model
from train.options import FitOptions
from train.recorder import RunRecorder, set_random_generator_states
from train.run import TENSORBOARD, TrainingState
from train.splits import compute_class_weights, split_rows

log = logging.getLogger(__name__)

# the tutorial's schedule; --lr replaces only the initial rate
DECAY_STEPS = 100_000
DECAY_RATE = 0.96


def configure_determinism(seed: int) -> None:
    """Seed Keras, NumPy and TensorFlow from --seed and ask TensorFlow for deterministic kernels.

    Initial weights and dropout follow from the seed; the data order and the rotation angles use
    stateless ops seeded from it (see `train.data`), so they do not depend on this global state.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def check_precision_supported(precision: str) -> None:
    """Refuse float16 without a GPU: TensorFlow's CPU kernels (MaxPool3D among them) lack float16."""
    if precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise UserError("--precision mixed_float16 needs a GPU (TensorFlow has no float16 MaxPool3D on CPU); "
                        "use mixed_bfloat16 on CPUs")


def make_optimizer(learning_rate: float, precision: str) -> keras.optimizers.Optimizer:
    """Adam with the tutorial's staircase exponential decay (x0.96 every 100,000 steps)."""
    schedule = keras.optimizers.schedules.ExponentialDecay(
        learning_rate, decay_steps=DECAY_STEPS, decay_rate=DECAY_RATE, staircase=True
    )
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    if precision == "mixed_float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_compiled_model(input_shape, options: FitOptions) -> keras.Model:
    model = build_model(tuple(input_shape), padding=options.padding, precision=options.precision)
    model.compile(
        optimizer=make_optimizer(options.learning_rate, options.precision),
        loss="binary_crossentropy",
        metrics=make_training_metrics(),
    )
    return model


def load_training_state_model(path: Path, input_shape: tuple[int, int, int], random_generator_states: tuple):
    """The last epoch's model with its optimizer state, loaded without running any stored code."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: cannot load the training state to resume (not a .keras zip archive)")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=True,
                                        custom_objects={"Specificity": Specificity})
        if model.input_shape != (None, *input_shape, 1):
            raise ValueError(f"it takes {model.input_shape}, the cache holds {input_shape} volumes")
        set_random_generator_states(model, random_generator_states)
    except Exception as error:  # the file is the run's, not ours: whatever is wrong with it, one line
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path}: cannot load the training state to resume ({message})") from None
    return model


def run_training(reader: CacheReader, run_dir: Path, options: FitOptions, state: TrainingState,
                 history: list[dict]) -> TrainingState:
    """Train from state.completed_epochs to options.epochs (or an early stop); returns the final state."""
    configure_determinism(options.seed)
    train_rows, train_labels = split_rows(reader, "train")
    val_rows, val_labels = split_rows(reader, "val")
    class_weights = compute_class_weights(train_labels)
    first_epoch = state.completed_epochs
    if first_epoch > 0:
        model = load_training_state_model(run_dir / state.last_model, reader.shape, state.random_generator_states)
        log.info("resuming %s after epoch %d of %d", run_dir, first_epoch, options.epochs)
    else:
        model = make_compiled_model(reader.shape, options)
    training_data = make_training_dataset(reader, train_rows, train_labels, options.batch_size, options.seed,
                                          first_epoch=first_epoch, epochs=options.epochs)
    validation_data = make_evaluation_dataset(reader, val_rows, val_labels, options.batch_size)
    recorder = RunRecorder(run_dir, state, history, options.patience)
    tensorboard = ScalarEventLogger(run_dir / TENSORBOARD)
    log.info("training on %d scans (%d normal, %d abnormal), validating on %d; class weights %s",
             len(train_rows), int(np.sum(train_labels == 0)), int(np.sum(train_labels == 1)), len(val_rows),
             {label: round(weight, 3) for label, weight in class_weights.items()})
    with reporting_read_failures():  # a damaged volume: one line naming the row, not a TensorFlow traceback
        model.fit(
            training_data,
            epochs=options.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch(len(train_rows), options.batch_size),
            validation_data=validation_data,
            class_weight=class_weights,
            callbacks=[recorder, tensorboard],
            verbose=0 if options.quiet else 2,
            shuffle=False,  # the dataset shuffles, seeded, per epoch
        )
    return recorder.state
