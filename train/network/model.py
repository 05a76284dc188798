"""The Keras tutorial's 3D CNN, built with the functional API from a few parameters."""
from __future__ import annotations

import keras
from keras import layers

from train.network.architecture import TUTORIAL, Architecture, check_input_shape

GROUPS = 8  # GroupNorm's groups (Wu and He's 32 is for 2D networks with many more channels)


def build_model(input_shape: tuple[int, int, int], padding: str = "valid", precision: str = "float32",
                architecture: Architecture = TUTORIAL, name: str = "3dcnn", classes: int = 1,
                bn_momentum: float = 0.99, pooling: str = "avg", norm: str = "batch") -> keras.Model:
    """Functional 3D CNN for (H, W, D) volumes with a channel axis.

    With `classes` 1 it returns P(abnormal) (the tutorial's sigmoid); with more, a softmax over
    that many classes (the severity grades). `precision` is a Keras dtype policy for every layer
    except the output, which stays float32 so the probabilities and the loss are not computed
    in 16 bits. `bn_momentum` is BatchNorm's (Keras's default 0.99, the tutorial's). `pooling`
    is the global pooling before the head: avg (the tutorial's), max, or avgmax (both,
    concatenated: a lesion of a few voxels moves the maximum even where it hardly moves the mean).
    `norm` is the normalisation after each block: batch (BatchNorm, the tutorial's), group (GroupNorm,
    `GROUPS` groups) or instance (InstanceNorm: a group per channel); the last two normalise each
    scan by its own statistics, so the batch size does not change what they see.
    """
    check_input_shape(tuple(input_shape), padding, architecture)
    inputs = keras.Input((*input_shape, 1), name="volume")
    features = inputs
    for index, filters in enumerate(architecture.block_filters, start=1):
        features = layers.Conv3D(filters, architecture.kernel_size, padding=padding, activation="relu",
                                 dtype=precision, name=f"conv{index}")(features)
        features = layers.MaxPool3D(architecture.pool_size, dtype=precision, name=f"pool{index}")(features)
        if norm == "batch":
            features = layers.BatchNormalization(momentum=bn_momentum, dtype=precision, name=f"norm{index}")(features)
        else:
            groups = -1 if norm == "instance" else min(GROUPS, filters)
            features = layers.GroupNormalization(groups=groups, dtype=precision, name=f"norm{index}")(features)
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
