"""The Keras tutorial's 3D CNN, built with the functional API from a few parameters."""
from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from preprocess.errors import UserError
from train.architecture import TUTORIAL, Architecture, check_input_shape


def build_model(input_shape: tuple[int, int, int], padding: str = "valid", precision: str = "float32",
                architecture: Architecture = TUTORIAL, name: str = "3dcnn") -> keras.Model:
    """Functional 3D CNN for (H, W, D) volumes with a channel axis; returns P(abnormal).

    `precision` is a Keras dtype policy for every layer except the output, which stays float32
    so the sigmoid and the loss are not computed in 16 bits.
    """
    check_input_shape(tuple(input_shape), padding, architecture)
    inputs = keras.Input((*input_shape, 1), name="volume")
    features = inputs
    for index, filters in enumerate(architecture.block_filters, start=1):
        features = layers.Conv3D(filters, architecture.kernel_size, padding=padding, activation="relu",
                                 dtype=precision, name=f"conv{index}")(features)
        features = layers.MaxPool3D(architecture.pool_size, dtype=precision, name=f"pool{index}")(features)
        features = layers.BatchNormalization(dtype=precision, name=f"norm{index}")(features)
    features = layers.GlobalAveragePooling3D(dtype=precision, name="global_pool")(features)
    features = layers.Dense(architecture.dense_units, activation="relu", dtype=precision, name="dense")(features)
    features = layers.Dropout(architecture.dropout_rate, dtype=precision, name="dropout")(features)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability_abnormal")(features)
    return keras.Model(inputs, outputs, name=name)


def load_trained_model(path: Path) -> keras.Model:
    """A saved .keras model for inference, in safe mode: a file that would run stored code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except ValueError as error:
        # safe mode refuses Lambda layers and other stored Python code with a ValueError
        raise UserError(f"{path}: refusing to load this model ({str(error).splitlines()[0]})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the model ({error})") from None
