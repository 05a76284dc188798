"""`RunRecorder`: the Keras callback that commits every finished epoch to the run directory.

After each epoch, in this order: the epoch's model and optimizer (a new file named by epoch),
the best model if validation AUC improved (also a new file named by epoch: a hard link to the
first one where the file system allows, else a copy), history.csv, and finally state.json,
which names both files; only then are the previous epoch's files deleted. A run killed
anywhere in between resumes from the previous state.json and the files it names, and redoes
only the epoch that was not committed; files and rows of history.csv beyond state.json are
dropped on resume, so no epoch is repeated or skipped, and `evaluate`, `predict` and
metrics.json only ever see a model of a committed epoch (the best or the last: `--keep`).
A write the OS refuses stops training with one line; the last committed epoch stays intact.
Early stopping lives here too, because its counter must survive a resume.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import keras

from common.errors import UserError
from common.files import WriteError, link_or_copy_atomically, replace_atomically
from train.rundir.layout import (
    HISTORY, TrainingState, best_model_name, last_model_name, remove_other_models, write_history, write_state,
)

log = logging.getLogger(__name__)

MONITOR = "val_auc"


def get_random_generator_states(model: keras.Model) -> tuple:
    """The values of the model's seed-generator variables (in `model.variables` but not its weights)."""
    weights = {id(weight) for weight in model.weights}
    return tuple(
        tuple(int(number) for number in keras.ops.convert_to_numpy(variable.value).reshape(-1))
        for variable in model.variables if id(variable) not in weights
    )


def set_random_generator_states(model: keras.Model, states: tuple) -> None:
    """Put back states saved by `get_random_generator_states` into the same architecture."""
    weights = {id(weight) for weight in model.weights}
    variables = [variable for variable in model.variables if id(variable) not in weights]
    if len(variables) != len(states):
        raise ValueError(f"the model has {len(variables)} random generators, the state has {len(states)}")
    for variable, state in zip(variables, states):
        variable.assign(keras.ops.reshape(keras.ops.convert_to_tensor(state, dtype=variable.dtype), variable.shape))


def save_model_atomically(model: keras.Model, path: Path) -> Path:
    """model.save in the native .keras format, moved into place only when complete."""
    return replace_atomically(Path(path), lambda temporary: model.save(temporary))


class RunRecorder(keras.callbacks.Callback):
    """Commit each epoch (models, history, state) and stop after `patience` epochs without a better val AUC
    (patience None: never stop early)."""

    def __init__(self, run_dir: Path, state: TrainingState, history: list[dict], patience: int | None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.state = state
        self.history = list(history)
        self.patience = patience

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        if MONITOR not in logs:
            raise RuntimeError(f"Keras logged no {MONITOR}; fit needs validation data and an AUC metric named 'auc'")
        epoch_number = epoch + 1  # Keras counts from 0, history.csv from 1
        row = {"epoch": epoch_number, **{name: float(value) for name, value in logs.items()}}
        row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["epoch_seconds"] = time.perf_counter() - self.epoch_start  # training and validation
        val_auc = row[MONITOR]
        state = self.state
        improved = math.isfinite(val_auc) and val_auc > state.best_val_auc
        if improved:
            state = replace(state, best_epoch=epoch_number, best_val_auc=val_auc, epochs_without_improvement=0)
        else:
            state = replace(state, epochs_without_improvement=state.epochs_without_improvement + 1)
        # as keras.callbacks.EarlyStopping: an epoch that improves never stops the run
        stop = (self.patience is not None and not improved and state.best_epoch > 0
                and state.epochs_without_improvement >= self.patience)
        last_model = last_model_name(epoch_number)
        # no finite val AUC yet (best_epoch 0): keep the latest model as the best, so the run has one
        best_model = best_model_name(epoch_number) if state.best_epoch in (0, epoch_number) else state.best_model
        state = replace(state, completed_epochs=epoch_number, stopped_early=stop, last_model=last_model,
                        best_model=best_model, random_generator_states=get_random_generator_states(self.model))
        try:
            save_model_atomically(self.model, self.run_dir / last_model)
            if best_model != self.state.best_model:
                link_or_copy_atomically(self.run_dir / last_model, self.run_dir / best_model)
            self.history.append(row)
            write_history(self.run_dir / HISTORY, self.history)
            write_state(self.run_dir, state)  # the commit point of this epoch
        except WriteError as error:
            raise UserError(f"{error}; {self._what_is_kept()}") from None
        remove_other_models(self.run_dir, keep={last_model, best_model})
        self.state = state
        if improved:
            log.debug("epoch %d: val AUC improved to %.4f, saved %s", epoch_number, val_auc, best_model)
        if stop:
            log.info("early stop: no better val AUC for %d epochs (best %.4f at epoch %d)",
                     state.epochs_without_improvement, state.best_val_auc, state.best_epoch)
            self.model.stop_training = True

    def _what_is_kept(self) -> str:
        committed = self.state.completed_epochs
        if committed == 0:
            return "no epoch was committed yet; continue the run with --resume once there is room"
        return (f"the run's last good checkpoint (epoch {committed}) is kept; continue it with --resume "
                "once there is room")
