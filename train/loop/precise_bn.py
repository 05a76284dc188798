"""PreciseBN: BatchNorm's population statistics re-estimated from training batches before validation.

Keras's BatchNormalization keeps an exponential moving average of batch statistics (momentum
0.99 by default) and uses it at inference. At a batch of two volumes those batch statistics are
noisy and the average lags the weights by about a hundred steps, so for many epochs validation
normalizes with statistics the network no longer has: every scan is called one class. PreciseBN
(Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021; facebookresearch/pycls,
`compute_precise_bn_stats`) replaces the average, before each evaluation, by the population
statistics of the current weights: the mean over training batches of each layer's batch mean
and batch variance, every BatchNorm normalizing by its own batch's statistics on the way, as
in training. Only the moving statistics change, never a weight.

Variances are Keras's (biased, as `BatchNormalization` tracks them). The batches are a fixed,
seeded choice of training scans, not rotated (inference sees unrotated volumes), read in the
training batch size (the statistics of a batch depend on its size), so the result is a pure
function of the weights: resumed and uninterrupted runs, and every replica and worker of a
distributed run, compute the same statistics.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def layers_through_last_batchnorm(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers from the first after the input up to its last BatchNorm: a chain, as `build_model` makes."""
    norms = batchnorm_layers(model)
    chain = model.layers[1:model.layers.index(norms[-1]) + 1]
    previous = model.layers[0]
    for layer in chain:
        if layer.input._keras_history.operation is not previous:
            raise ValueError(f"PreciseBN needs a chain of layers up to the last BatchNorm; {layer.name} does not "
                             f"take {previous.name}'s output")
        previous = layer
    return chain


def make_batch_moments(model: keras.Model):
    """A graph function volumes -> [(batch mean, batch variance)] of each BatchNorm's input, as in training.

    Each BatchNorm normalizes by the batch's own statistics, as it does in a training step, but
    nothing is assigned: the moving statistics stay as they are, and dropout is off.
    """
    chain = layers_through_last_batchnorm(model)

    @tf.function(reduce_retracing=True)
    def batch_moments(volumes):
        features, moments = volumes, []
        for layer in chain:
            if not isinstance(layer, keras.layers.BatchNormalization):
                features = layer(features, training=False)
                continue
            inputs = keras.ops.cast(features, "float32")  # as BatchNormalization does with 16-bit inputs
            mean, variance = keras.ops.moments(inputs, axes=layer._reduction_axes)
            moments.append((mean, variance))
            normalized = keras.ops.batch_normalization(inputs, mean, variance, axis=layer.axis, offset=layer.beta,
                                                       scale=layer.gamma, epsilon=layer.epsilon)
            features = keras.ops.cast(normalized, layer.compute_dtype)
        return moments

    return batch_moments


def estimate_population_statistics(model: keras.Model, batches,
                                   batch_moments=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per BatchNorm layer, the mean over `batches` (volume tensors) of the batch means and batch variances.

    `batch_moments` is `make_batch_moments(model)`, made once by a caller that re-estimates often.
    """
    batch_moments = batch_moments or make_batch_moments(model)
    sums, count = None, 0
    for volumes in batches:
        moments = [(np.asarray(mean, np.float64), np.asarray(variance, np.float64))
                   for mean, variance in batch_moments(volumes)]
        sums = moments if sums is None else [(mean_sum + mean, variance_sum + variance)
                                             for (mean_sum, variance_sum), (mean, variance) in zip(sums, moments)]
        count += 1
    if count == 0:
        raise ValueError("PreciseBN needs at least one batch")
    return [(mean_sum / count, variance_sum / count) for mean_sum, variance_sum in sums]


def assign_population_statistics(model: keras.Model, statistics: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Set every BatchNorm's moving mean and variance (on every replica, when called outside a replica step)."""
    for layer, (mean, variance) in zip(batchnorm_layers(model), statistics, strict=True):
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))


def precise_bn_rows(train_rows: np.ndarray, scans: int, batch_size: int, seed: int) -> np.ndarray:
    """The training rows PreciseBN reads: a seeded choice of whole batches of `batch_size` (at least one)."""
    from train.pipeline.data import derive_seed

    order = np.random.default_rng(derive_seed(seed, "precise_bn")).permutation(np.asarray(train_rows))
    batch = min(batch_size, len(order))
    count = max(batch, min(scans, len(order)) // batch * batch)
    return np.sort(order[:count])


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before every validation inside `fit`, re-estimate BatchNorm's statistics from fixed training batches.

    Keras runs validation through `evaluate`, whose first callback is `on_test_begin`; the epoch's
    checkpoint (saved in `on_epoch_end`) then holds the re-estimated statistics too.
    """

    def __init__(self, batches: tf.data.Dataset):
        super().__init__()
        self.batches = batches  # volume batches (B, H, W, D, 1), the same ones every time
        self.batch_moments = None

    def on_test_begin(self, logs=None) -> None:
        if not batchnorm_layers(self.model):
            return  # nothing to re-estimate
        if self.batch_moments is None:  # traced once per fit
            self.batch_moments = make_batch_moments(self.model)
        statistics = estimate_population_statistics(self.model, self.batches, self.batch_moments)
        assign_population_statistics(self.model, statistics)
