"""tf.data pipelines that stream volumes from the cache, one row at a time.

The unit of every pipeline is a row index of the cache. A training epoch is a plan of
(row, label, angle) triples, a pure function of (seed, epoch): a stateless seeded shuffle of the
split's rows and one rotation angle per row. Volumes are read only when the pipeline reaches
them, through `CacheReader.read_volume` (one HDF5 chunk each), so memory holds a few batches and
does not grow with the cache. Because an epoch's plan depends only on the seed and the epoch
number, a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import zlib

import numpy as np
import tensorflow as tf

from preprocess.cache import CacheReader
from preprocess.errors import UserError
from train.augment import draw_rotation_angles, rotate_volume

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2
PARALLEL_CALLS = tf.data.AUTOTUNE


def derive_seed(seed: int, stream: str) -> np.ndarray:
    """A [2] seed for stateless random ops: one independent stream per name, all from --seed."""
    words = np.random.SeedSequence([seed, zlib.crc32(stream.encode())]).generate_state(2)
    return words.astype(np.int64)


def make_volume_loader(reader: CacheReader):
    """A graph function row -> float32 (H, W, D) volume that reads one chunk of the cache."""
    shape = reader.shape

    def read(row: np.int64) -> np.ndarray:
        return reader.read_volume(int(row))

    def load(row: tf.Tensor) -> tf.Tensor:
        # stateful=False: the same row always gives the same volume, so tf.data may run reads in
        # parallel under op determinism (h5py serialises the actual reads with its own lock)
        volume = tf.numpy_function(read, [row], tf.float32, stateful=False, name="read_volume")
        volume.set_shape(shape)
        return volume

    return load


def make_epoch_plan(rows: np.ndarray, labels: np.ndarray, seed: int, epoch, augment: bool) -> tf.data.Dataset:
    """One epoch's (row, label, angle) triples: shuffled rows and drawn angles, no volumes yet."""
    count = len(rows)
    epoch_seed = lambda stream: tf.random.experimental.stateless_fold_in(  # noqa: E731
        tf.constant(derive_seed(seed, stream)), tf.cast(epoch, tf.int64)
    )
    order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=epoch_seed("shuffle"))
    if augment:
        angles = draw_rotation_angles(epoch_seed("rotation"), count)
    else:
        angles = tf.zeros([count], tf.float32)
    return tf.data.Dataset.from_tensor_slices((
        tf.gather(tf.constant(rows, tf.int64), order),
        tf.gather(tf.constant(labels, tf.float32), order),
        angles,
    ))


def make_training_dataset(reader: CacheReader, rows: np.ndarray, labels: np.ndarray, batch_size: int,
                          seed: int, first_epoch: int = 0, epochs: int = 1, augment: bool = True) -> tf.data.Dataset:
    """Batches of (volume (B, H, W, D, 1), label (B,)) for epochs first_epoch .. epochs - 1 in a row.

    Every epoch is a new shuffle with new angles and ends with its own (possibly short) batch, so
    Keras can consume it with steps_per_epoch = ceil(len(rows) / batch_size).
    """
    if len(rows) == 0:
        raise UserError("the training split is empty")
    load_volume = make_volume_loader(reader)

    def load(row, label, angle):
        volume = load_volume(row)
        if augment:
            volume = rotate_volume(volume, angle)
        return volume[..., tf.newaxis], label

    def make_epoch(epoch):
        plan = make_epoch_plan(rows, labels, seed, epoch, augment)
        return plan.map(load, num_parallel_calls=PARALLEL_CALLS).batch(batch_size)

    epochs_dataset = tf.data.Dataset.range(first_epoch, epochs)
    return epochs_dataset.flat_map(make_epoch).prefetch(PREFETCH_BATCHES)


def make_evaluation_dataset(reader: CacheReader, rows: np.ndarray, labels: np.ndarray,
                            batch_size: int) -> tf.data.Dataset:
    """Batches of (volume, label) in row order, never augmented (validation, test, evaluate)."""
    load_volume = make_volume_loader(reader)
    plan = tf.data.Dataset.from_tensor_slices((tf.constant(rows, tf.int64), tf.constant(labels, tf.float32)))
    return (
        plan.map(lambda row, label: (load_volume(row)[..., tf.newaxis], label), num_parallel_calls=PARALLEL_CALLS)
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
    )


def steps_per_epoch(row_count: int, batch_size: int) -> int:
    return -(-row_count // batch_size)
