"""The model files of a run directory, loaded safely: one function opens every .keras file.

A run directory may be damaged or hostile. Models are loaded in Keras's safe mode (a file that
would run stored code is refused), and whatever Keras raises while reading one is the file's
fault, so every failure is one UserError line.
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import keras

from common.errors import UserError
from train.network.keras_metrics import Specificity
from train.network.lesion_training import lesion_cells_loss  # noqa: F401 - registers the loss a resumed run compiles with
from train.network.model import served_model
from train.rundir.layout import model_path, read_state


def load_trained_model(path: Path, compile: bool = False,
                       check: Callable[[keras.Model], None] | None = None) -> keras.Model:
    """A saved .keras model, in safe mode; `compile` also restores the optimizer (to resume training).
    Without `compile`, the model that answers (`served_model`: a lesion-map model's probability alone).

    `check(model)` may refuse the loaded model by raising; that too becomes the one line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise UserError(f"{path}: not a .keras model (not a zip archive); the file is damaged")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=compile,
                                        custom_objects={"Specificity": Specificity})
        if not compile:
            model = served_model(model)
        if check is not None:
            check(model)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "safe_mode" in str(error):  # a Lambda layer or other stored Python code
            raise UserError(f"{path}: refusing to load this model ({message})") from None
        raise UserError(f"{path}: cannot read the model ({type(error).__name__}: {message})") from None
    return model


def load_run_model(run_dir: Path) -> keras.Model:
    """The run's committed model (of the files state.json names, the one its --keep chooses).

    A `fit` still running in that directory may commit another epoch and delete the file we
    were about to open; the new state.json then names its successor.
    """
    attempts_left = 3
    while True:
        committed = read_state(run_dir)
        try:
            return load_trained_model(model_path(run_dir))
        except UserError:
            attempts_left -= 1
            if attempts_left == 0 or read_state(run_dir) == committed:
                raise
