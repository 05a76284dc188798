"""The Keras tutorial's 3D CNN, built with the functional API from a few parameters."""
from __future__ import annotations

import keras
from keras import layers

from train.network.architecture import (
    LESION_BLOCK, LESION_CONTEXT_FILTERS, TUTORIAL, Architecture, check_input_shape,
)
from train.network.lesions import LESION_OUTPUT, PROBABILITY_OUTPUT

GROUPS = 8  # GroupNorm's groups (Wu and He's 32 is for 2D networks with many more channels)
# How much faster the lesion map's call (`TopLogitCall`) learns than the rest of the network. It
# starts at (1, 0): starting its offset at -log(POSITIVE_WEIGHT), where class weighting lifts the
# cells' logits, fixed the demo's first epochs but cost the 0.1-1% lesions (docs/benchmarks.md,
# "The lesion map's threshold during training").
CALL_RATE = 20.0
TOP_LOGIT = "lesion_top"  # the layer giving the call its input, the largest cell logit (train.loop.call_refit)


@keras.saving.register_keras_serializable(package="mosmed3d", name="TopLogitCall")
class TopLogitCall(layers.Layer):
    """P(abnormal) = sigmoid(slope * top + offset) from the lesion map's largest cell logit `top` (B, 1),
    with slope >= 0 (from 1) and offset from `initial_offset`.

    Both are stored divided by `rate`, so Adam, whose step is the learning rate whatever the
    gradient's size, moves them `rate` times as fast as a plain Dense would. A Dense's bias moves a
    few tenths in a run while the cells' logits drift by units, so its 0.5 was left where training
    began (every demo scan called abnormal). `kernel` and `bias` give the effective pair, as a
    Dense's, so everything that recomputes the logit from the last layer (calibration, Grad-CAM) reads it.
    """

    def __init__(self, rate: float = CALL_RATE, initial_offset: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.initial_offset = float(initial_offset)
        self.activation = keras.activations.sigmoid

    def build(self, input_shape):
        self.slope = self.add_weight(name="slope", shape=(1, 1), dtype="float32",
                                     initializer=keras.initializers.Constant(1.0 / self.rate),
                                     constraint=keras.constraints.NonNeg())
        self.offset = self.add_weight(name="offset", shape=(1,), dtype="float32",
                                      initializer=keras.initializers.Constant(self.initial_offset / self.rate))

    @property
    def kernel(self):
        return self.slope * self.rate

    @property
    def bias(self):
        return self.offset * self.rate

    def call(self, top):
        return keras.ops.sigmoid(keras.ops.matmul(keras.ops.cast(top, "float32"), self.kernel) + self.bias)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "initial_offset": self.initial_offset}


def build_model(input_shape: tuple[int, int, int], padding: str = "valid", precision: str = "float32",
                architecture: Architecture = TUTORIAL, name: str = "3dcnn", classes: int = 1,
                bn_momentum: float = 0.99, pooling: str = "avg", norm: str = "batch",
                lesion_map: bool = False) -> keras.Model:
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

    `lesion_map` (binary only; `fit` with lesion masks) builds another head on the first
    `LESION_BLOCK` blocks: a 3 x 3 x 3 convolution, then a 1 x 1 x 1 one giving each cell of that
    block's grid a lesion logit. The model has two outputs, `lesion_cells` (each cell's
    P(lesion), trained against the masks) and `probability_abnormal`, an affine function of the
    most lesion-like cell's logit (its slope never negative, both learned `CALL_RATE` times as fast as the
    rest: `TopLogitCall`) through a sigmoid: the scan is
    called from its lesion map, so a lesion of a few voxels is not averaged away by global
    pooling. The later blocks are not built.
    """
    check_input_shape(tuple(input_shape), padding, architecture)
    inputs = keras.Input((*input_shape, 1), name="volume")
    features = inputs
    blocks = architecture.block_filters[:LESION_BLOCK] if lesion_map else architecture.block_filters
    for index, filters in enumerate(blocks, start=1):
        features = layers.Conv3D(filters, architecture.kernel_size, padding=padding, activation="relu",
                                 dtype=precision, name=f"conv{index}")(features)
        features = layers.MaxPool3D(architecture.pool_size, dtype=precision, name=f"pool{index}")(features)
        if norm == "batch":
            features = layers.BatchNormalization(momentum=bn_momentum, dtype=precision, name=f"norm{index}")(features)
        else:
            groups = -1 if norm == "instance" else min(GROUPS, filters)
            features = layers.GroupNormalization(groups=groups, dtype=precision, name=f"norm{index}")(features)
    if lesion_map:
        if classes != 1:
            raise ValueError("the lesion map calls one class, abnormal")
        width = architecture.block_filters[0] / TUTORIAL.block_filters[0]
        features = layers.Conv3D(max(1, round(LESION_CONTEXT_FILTERS * width)), 3, padding="same", activation="relu",
                                 dtype=precision, name="lesion_context")(features)
        logits = layers.Conv3D(1, 1, dtype="float32", name="lesion_logits")(features)
        cells = layers.Activation("sigmoid", dtype="float32", name=LESION_OUTPUT)(logits)
        top = layers.GlobalMaxPooling3D(dtype="float32", name=TOP_LOGIT)(logits)
        # increasing in the top cell's logit (slope from 1): a free sign would be a coin flip of the
        # initialisation, and a negative one sets the label's loss against the masks'
        probability = TopLogitCall(CALL_RATE, dtype="float32", name=PROBABILITY_OUTPUT)(top)
        return keras.Model(inputs, {PROBABILITY_OUTPUT: probability, LESION_OUTPUT: cells}, name=name)
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
        outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name=PROBABILITY_OUTPUT)(features)
    else:
        outputs = layers.Dense(classes, activation="softmax", dtype="float32", name="grade_probabilities")(features)
    return keras.Model(inputs, outputs, name=name)


def served_model(model: keras.Model) -> keras.Model:
    """The model that answers: a lesion-map model's `probability_abnormal` alone (sharing its weights),
    any other model itself. Everything after `fit` (evaluate, predict, calibration, Grad-CAM) sees one output."""
    if isinstance(model.output, dict):
        return keras.Model(model.input, model.output[PROBABILITY_OUTPUT], name=model.name)
    return model
