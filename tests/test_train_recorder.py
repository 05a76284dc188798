"""RunRecorder's bookkeeping without training: best model, early stopping, commit order, files."""
from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras model.save

from train.loop.recorder import (  # noqa: E402
    RunRecorder, get_random_generator_states, set_random_generator_states,
)
from train.rundir.layout import TrainingState, read_history, read_state  # noqa: E402


def small_model() -> keras.Model:
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dropout(0.5)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def replay(tmp_path, val_aucs: list[float], patience: int | None) -> tuple[RunRecorder, keras.Model]:
    """Feed the recorder one epoch end per validation AUC, until it stops the run."""
    model = small_model()
    recorder = RunRecorder(tmp_path, TrainingState(), [], patience)
    recorder.set_model(model)
    for epoch, val_auc in enumerate(val_aucs):
        recorder.on_epoch_begin(epoch)
        recorder.on_epoch_end(epoch, {"loss": 0.5, "auc": 0.5, "val_auc": val_auc})
        if model.stop_training:
            break
    return recorder, model


def test_early_stopping_after_patience_epochs_without_a_better_val_auc(tmp_path):
    recorder, _ = replay(tmp_path, [0.5, 0.7, 0.6, 0.7, 0.65, 0.9], patience=3)
    state = read_state(tmp_path)
    assert state == recorder.state
    assert (state.completed_epochs, state.best_epoch, state.best_val_auc) == (5, 2, pytest.approx(0.7))
    assert state.stopped_early and state.epochs_without_improvement == 3
    assert [row["epoch"] for row in read_history(tmp_path / "history.csv")] == [1, 2, 3, 4, 5]


def test_patience_zero_stops_at_the_first_epoch_that_does_not_improve(tmp_path):
    replay(tmp_path, [0.5, 0.6, 0.8, 0.7, 0.9], patience=0)
    state = read_state(tmp_path)
    assert (state.completed_epochs, state.best_epoch, state.stopped_early) == (4, 3, True)


def test_no_patience_never_stops_early(tmp_path):
    # --keep last: the run's model is the end of the schedule, so every epoch is trained
    replay(tmp_path, [0.9, 0.6, 0.5, 0.4, 0.3, 0.2], patience=None)
    state = read_state(tmp_path)
    assert (state.completed_epochs, state.best_epoch, state.stopped_early) == (6, 1, False)
    assert state.epochs_without_improvement == 5


def test_only_the_committed_epochs_training_state_is_kept(tmp_path):
    replay(tmp_path, [0.5, 0.6, 0.7], patience=10)
    state = read_state(tmp_path)
    assert state.last_model == "last-epoch-0003.keras"
    assert state.best_model == "best-epoch-0003.keras"
    assert sorted(path.name for path in tmp_path.glob("*.keras")) == ["best-epoch-0003.keras", "last-epoch-0003.keras"]
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_random_generator_states_round_trip():
    model, other = small_model(), small_model()
    model(keras.ops.ones((2, 3)), training=True)  # advances the dropout generator
    states = get_random_generator_states(model)
    assert states and states != get_random_generator_states(other)
    set_random_generator_states(other, states)
    assert get_random_generator_states(other) == states
