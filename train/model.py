"""The Keras tutorial's 3D CNN, built with the functional API from a few parameters."""
from __future__ import annotations

import zipfile
from pathlib import Path

import keras
from keras import layers

from preprocess.errors import UserError
from train.architecture import TUTORIAL, Architecture, check_input_shape
from train.run import best_model_path, read_state


def build_model(input_shape: tuple[int, int, int], padding: str = "valid", precision: str = "float32",
                architecture: Architecture = TUTORIAL, name: str = "3dcnn", classes: int = 1,
                bn_momentum: float = 0.99, pooling: str = "avg") -> keras.Model:
    """Functional 3D CNN for (H, W, D) volumes with a channel axis.

    With `classes` 1 it returns P(abnormal) (the tutorial's sigmoid); with more, a softmax over
    that many classes (the severity grades). `precision` is a Keras dtype policy for every layer
    except the output, which stays float32 so the probabilities and the loss are not computed
    in 16 bits. `bn_momentum` is BatchNorm's (Keras's default 0.99, the tutorial's). `pooling`
    is the global pooling before the head: avg (the tutorial's), max, or avgmax (both,
    concatenated: a lesion of a few voxels moves the maximum even where it hardly moves the mean).
    """
    check_input_shape(tuple(input_shape), padding, architecture)
    inputs = keras.Input((*input_shape, 1), name="volume")
    features = inputs
    for index, filters in enumerate(architecture.block_filters, start=1):
        features = layers.Conv3D(filters, architecture.kernel_size, padding=padding, activation="relu",
                                 dtype=precision, name=f"conv{index}")(features)
        features = layers.MaxPool3D(architecture.pool_size, dtype=precision, name=f"pool{index}")(features)
        features = layers.BatchNormalization(momentum=bn_momentum, dtype=precision, name=f"norm{index}")(features)
    if pooling == "avg":
        features = layers.GlobalAveragePooling3D(dtype=precision, name="global_pool")(features)
    elif pooling == "max":
        features = layers.GlobalMaxPooling3D(dtype=precision, name="global_pool")(features)
    else:
        features = layers.Concatenate(dtype=precision, name="global_pool")([
            layers.GlobalAveragePooling3D(dtype=precision, name="global_average_pool")(features),
            layers.GlobalMaxPooling3D(dtype=precision, name="global_max_pool")(features),
        ])
    features = layers.Dense(architecture.dense_units, activation="relu", dtype=precision, name="dense")(features)
    features = layers.Dropout(architecture.dropout_rate, dtype=precision, name="dropout")(features)
    if classes == 1:
        outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability_abnormal")(features)
    else:
        outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="grade_probabilities")(features)
    return keras.Model(inputs, outputs, name=name)


def load_trained_model(path: Path) -> keras.Model:
    """A saved .keras model for inference, in safe mode: a file that would run stored code is refused.

    The file comes from a run directory, which may be damaged or hostile: whatever Keras raises
    while reading it is the file's fault, so every failure is one UserError line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise UserError(f"{path}: not a .keras model (not a zip archive); the file is damaged")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "safe_mode" in str(error):  # a Lambda layer or other stored Python code
            raise UserError(f"{path}: refusing to load this model ({message})") from None
        raise UserError(f"{path}: cannot read the model ({type(error).__name__}: {message})") from None


def load_best_model(run_dir: Path) -> keras.Model:
    """The run's committed best model (the file state.json names).

    A `fit` still running in that directory may commit a better epoch and delete the file we
    were about to open; the new state.json then names its successor.
    """
    attempts_left = 3
    while True:
        committed = read_state(run_dir).best_model
        try:
            return load_trained_model(best_model_path(run_dir))
        except UserError:
            attempts_left -= 1
            if attempts_left == 0 or read_state(run_dir).best_model == committed:
                raise
