"""tf.data pipelines that stream volumes from the cache, one row at a time.

The unit of every pipeline is a row index of the cache. A training epoch is a plan of
(row, label, angle, moves) tuples, a pure function of (seed, epoch): a stateless seeded shuffle of
the split's rows, one rotation angle per row and, with `--augment rotate-mirror-shift`, its mirror
flags and shifts (`train.pipeline.augment`). Volumes are read only when the pipeline reaches
them, through `CacheReader.read_volume` (one HDF5 chunk each), so memory holds a few batches and
does not grow with the cache. Because an epoch's plan depends only on the seed and the epoch
number, a resumed run sees exactly the batches an uninterrupted run would have seen.

Every volume read is checked (finite, within [0, 1]: one pass over data already in memory), so
a damaged cache stops training with one line naming the row instead of training on garbage.
"""
from __future__ import annotations

import gc
import logging
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from common.errors import UserError
from preprocess.cache import CacheError, CacheReader
from train.network.lesions import LESION_OUTPUT, PROBABILITY_OUTPUT, lesion_marks
from train.pipeline.augment import draw_moves, draw_rotation_angles, move_volume, rotate_volume

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2
PARALLEL_CALLS = tf.data.AUTOTUNE


def derive_seed(seed: int, stream: str) -> np.ndarray:
    """A [2] seed for stateless random ops: one independent stream per name, all from --seed."""
    words = np.random.SeedSequence([seed, zlib.crc32(stream.encode())]).generate_state(2)
    return words.astype(np.int64)


def read_checked_volume(reader: CacheReader, row: int) -> np.ndarray:
    """One row's volume, or a CacheError if it cannot be read or is not in [0, 1].

    HDF5 keeps no checksum of raw chunks, so damaged bytes read back as numbers; the schema
    promises [0, 1], and checking costs one pass over a volume already in memory.
    """
    volume = reader.read_volume(row)  # an unreadable chunk is the reader's CacheError
    low, high = volume.min(), volume.max()
    if not (low >= 0.0 and high <= 1.0):  # NaN fails both comparisons
        raise CacheError(f"{reader.path}: row {row} holds values outside [0, 1] (min {low}, max {high}): the cache "
                         "is damaged; rebuild it with `python -m preprocess build --force`")
    return volume


# An exception inside tf.numpy_function reaches the caller as a tf.errors.OpError whose message
# is a formatted Python traceback. The reason travels between these separators (ASCII RS), so
# `reporting_read_failures` can raise it again as the one line it was.
READ_FAILURE = "\x1e"
READ_FAILURE_PATTERN = re.compile(f"{READ_FAILURE}(.*?){READ_FAILURE}", re.DOTALL)


class VolumeReadError(ValueError):
    """A volume that failed inside tf.data; its message carries the CacheError's between separators."""


@contextmanager
def reporting_read_failures() -> Iterator[None]:
    """Around anything that runs a pipeline of this module: a failed read becomes its one-line CacheError."""
    try:
        yield
        return
    except tf.errors.OpError as error:
        match = READ_FAILURE_PATTERN.search(error.message or "")
        if match is None:
            raise
        reason = match.group(1)
    # Keras's traceback filter keeps the failed pipeline in reference cycles; free it now, while the
    # cache is still open and its reader threads can finish the reads they started
    gc.collect()
    raise CacheError(reason)


def graph_reader(read, shape: tuple[int, ...], name: str):
    """A graph function row -> float32 array of `shape`, from `read(row)` in Python; a read's CacheError
    travels between READ_FAILURE separators, so `reporting_read_failures` gives it as its one line."""
    def guarded(row: np.int64) -> np.ndarray:
        try:
            return read(int(row))
        except CacheError as error:
            raise VolumeReadError(f"{READ_FAILURE}{error}{READ_FAILURE}") from None

    def load(row: tf.Tensor) -> tf.Tensor:
        # stateful=False: the same row always gives the same array, so tf.data may run reads in
        # parallel under op determinism (h5py serialises the actual reads with its own lock)
        value = tf.numpy_function(guarded, [row], tf.float32, stateful=False, name=name)
        value.set_shape(shape)
        return value

    return load


def make_volume_loader(reader: CacheReader):
    """A graph function row -> float32 (H, W, D) volume that reads and checks one chunk of the cache."""
    return graph_reader(lambda row: read_checked_volume(reader, row), reader.shape, "read_volume")


def make_marks_loader(reader: CacheReader):
    """A graph function row -> float32 (H, W, D) lesion marks (`train.network.lesions.lesion_marks`) of
    the row's cached mask: one chunk, zeros for a row without a mask."""
    return graph_reader(lambda row: lesion_marks(reader.read_lesion_mask(row)), reader.shape, "read_lesion_mask")


@dataclass(frozen=True)
class Shard:
    """Which part of every global batch this input pipeline feeds (tf.distribute's InputContext).

    A global batch of `global_batch_size` volumes is cut into `pipelines` equal consecutive parts,
    one per worker process; this pipeline reads part `index` of each, so workers share the rows
    of a split (not files) and each reads only its own volumes.
    """

    global_batch_size: int
    pipelines: int = 1
    index: int = 0

    def __post_init__(self):
        if self.global_batch_size % self.pipelines or not 0 <= self.index < self.pipelines:
            raise ValueError(f"cannot cut global batches of {self.global_batch_size} into {self.pipelines} "
                             f"parts and take part {self.index}")

    @classmethod
    def from_input_context(cls, context, per_replica_batch_size: int) -> "Shard":
        global_batch_size = per_replica_batch_size * context.num_replicas_in_sync
        return cls(global_batch_size, context.num_input_pipelines, context.input_pipeline_id)


def plan_epoch(rows: np.ndarray, labels: np.ndarray, seed: int, epoch, augment: str | None,
               shape: tuple[int, int, int] | None = None, shuffle: bool = True, weights: np.ndarray | None = None):
    """One epoch's rows, labels, rotation angles, moves and loss weights (tensors in visiting order), no
    volumes yet. `augment`: None (nothing drawn), or a kind of `train.options.AUGMENTS` for volumes of
    `shape` (needed to shift). The angles come from their own stream, so `rotate` draws the same with or
    without the moves."""
    count = len(rows)
    epoch_seed = lambda stream: tf.random.experimental.stateless_fold_in(  # noqa: E731
        tf.constant(derive_seed(seed, stream)), tf.cast(epoch, tf.int64)
    )
    order = tf.range(count, dtype=tf.int64)
    if shuffle:
        order = tf.random.experimental.stateless_shuffle(order, seed=epoch_seed("shuffle"))
    if augment:
        angles = draw_rotation_angles(epoch_seed("rotation"), count)
    else:
        angles = tf.zeros([count], tf.float32)
    moves = draw_moves(epoch_seed("moves"), count, shape, augment)
    weights = np.ones(count, np.float32) if weights is None else np.asarray(weights, np.float32)
    return (tf.gather(tf.constant(rows, tf.int64), order), tf.gather(tf.constant(labels, tf.float32), order),
            angles, moves, tf.gather(tf.constant(weights), order))


def make_epoch_plan(rows: np.ndarray, labels: np.ndarray, seed: int, epoch, augment: str | None,
                    shape: tuple[int, int, int] | None = None) -> tf.data.Dataset:
    """One epoch's (row, label, angle, moves): shuffled rows and what was drawn, no volumes yet."""
    return tf.data.Dataset.from_tensor_slices(plan_epoch(rows, labels, seed, epoch, augment, shape)[:4])


def shard_plan(planned_rows, planned_labels, angles, moves, weights, shard: Shard):
    """This pipeline's part of an epoch plan, padded so that every pipeline gets the same whole batches.

    The plan is padded to whole global batches by repeating its first rows with weight 0 (they
    count in no loss or metric), then each global batch is cut into `shard.pipelines` parts.
    Every worker so runs the same number of steps, which collective training needs: a worker
    that ran out of data first would leave the others waiting in an all-reduce.
    """
    count = tf.shape(planned_rows, out_type=tf.int64)[0]
    global_batch_size = tf.constant(shard.global_batch_size, tf.int64)
    steps = (count + global_batch_size - 1) // global_batch_size
    positions = tf.range(steps * global_batch_size)
    padded = positions % count  # the padding repeats the plan's first rows...
    weights = tf.where(positions < count, tf.gather(weights, padded), 0.0)  # ...with weight 0
    part = shard.global_batch_size // shard.pipelines

    def take_part(values):  # (steps x global batch, ...) -> this pipeline's (steps x part, ...)
        trailing = tf.shape(values, out_type=tf.int64)[1:]
        values = tf.reshape(values, tf.concat([tf.stack([steps, shard.pipelines, part]), trailing], 0))
        return tf.reshape(values[:, shard.index], tf.concat([[-1], trailing], 0))

    return (take_part(tf.gather(planned_rows, padded)), take_part(tf.gather(planned_labels, padded)),
            take_part(tf.gather(angles, padded)), take_part(tf.gather(moves, padded)), take_part(weights))


def sample_weights_of(classes: np.ndarray, class_weights: dict[int, float]) -> np.ndarray:
    """Each row's loss weight: the weight of its class."""
    return np.array([class_weights[int(value)] for value in np.asarray(classes)], np.float32)


def make_training_dataset(reader: CacheReader, rows: np.ndarray, labels: np.ndarray, batch_size: int,
                          seed: int, first_epoch: int = 0, epochs: int = 1, augment: str | None = "rotate",
                          row_weights: np.ndarray | None = None,
                          shard: Shard | None = None, lesions=None) -> tf.data.Dataset:
    """Batches of (volume (B, H, W, D, 1), target, weight (B,)) for epochs first_epoch .. epochs - 1.

    `labels` are the targets: (N,) labels for the binary task, (N, classes) one-hot grades for
    severity; `row_weights` (default 1) are the rows' loss weights (their class weights).

    `batch_size` is per replica. Every epoch is a new shuffle with new angles, padded to whole
    global batches with weight-0 samples and cut into this pipeline's part (see `shard_plan`),
    so each epoch is steps_per_epoch(len(rows), global batch size) steps on every worker.
    Without `shard`, this pipeline is the only one and feeds one replica. `augment`: a kind of
    `train.options.AUGMENTS`, or None for none. With `lesions`
    (`train.network.lesion_training.LesionTargets`), each row's lesion marks are moved and rotated
    with its volume, and the targets and weights are dicts over the lesion-map model's two outputs.
    """
    if len(rows) == 0:
        raise UserError("the training split is empty")
    shard = shard or Shard(batch_size)
    load_volume, load_marks = make_volume_loader(reader), make_marks_loader(reader)

    def load(row, label, angle, moves, weight):
        volume = load_volume(row)
        if lesions is not None:
            return load_with_mask(volume, row, label, angle, moves, weight)
        if augment == "rotate-mirror-shift":
            volume = move_volume(volume, moves)
        if augment:
            volume = rotate_volume(volume, angle)
        return volume[..., tf.newaxis], label, weight

    def load_with_mask(volume, row, label, angle, moves, weight):
        marks = load_marks(row)
        if augment == "rotate-mirror-shift":
            volume, marks = move_volume(volume, moves), move_volume(marks, moves)
        if augment:  # one rotation of both, stacked along the slices it turns alike
            both = rotate_volume(tf.concat([volume, marks], axis=2), angle)
            volume, marks = both[:, :, :reader.shape[2]], both[:, :, reader.shape[2]:]
        return volume[..., tf.newaxis], lesions.targets(row, label, marks), both_outputs(weight)

    def make_epoch(epoch):
        plan = shard_plan(*plan_epoch(rows, labels, seed, epoch, augment, reader.shape, weights=row_weights), shard)
        return tf.data.Dataset.from_tensor_slices(plan).map(load, num_parallel_calls=PARALLEL_CALLS).batch(batch_size)

    epochs_dataset = tf.data.Dataset.range(first_epoch, epochs)
    return epochs_dataset.flat_map(make_epoch).prefetch(PREFETCH_BATCHES)


def make_validation_dataset(reader: CacheReader, rows: np.ndarray, labels: np.ndarray, batch_size: int,
                            shard: Shard | None = None, lesions=None) -> tf.data.Dataset:
    """Batches of (volume, label, weight) in row order, never augmented, padded and cut as in training
    (with `lesions`, targets and weights for both outputs, as `make_training_dataset`'s)."""
    if len(rows) == 0:
        raise UserError("the validation split is empty")
    shard = shard or Shard(batch_size)
    load_volume, load_marks = make_volume_loader(reader), make_marks_loader(reader)
    plan = shard_plan(*plan_epoch(rows, labels, seed=0, epoch=0, augment=None, shuffle=False), shard)

    def load(row, label, angle, moves, weight):
        if lesions is None:
            return load_volume(row)[..., tf.newaxis], label, weight
        return (load_volume(row)[..., tf.newaxis], lesions.targets(row, label, load_marks(row)),
                both_outputs(weight))

    return (
        tf.data.Dataset.from_tensor_slices(plan)
        .map(load, num_parallel_calls=PARALLEL_CALLS)
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
    )


def make_evaluation_dataset(reader: CacheReader, rows: np.ndarray, labels: np.ndarray,
                            batch_size: int) -> tf.data.Dataset:
    """Batches of (volume, label) in row order, never augmented (test, evaluate, predict; one process)."""
    load_volume = make_volume_loader(reader)
    plan = tf.data.Dataset.from_tensor_slices((tf.constant(rows, tf.int64), tf.constant(labels, tf.float32)))
    return (
        plan.map(lambda row, label: (load_volume(row)[..., tf.newaxis], label), num_parallel_calls=PARALLEL_CALLS)
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
    )


def both_outputs(weight: tf.Tensor) -> dict:
    """A sample's weight for each output of the lesion-map model: the same (its class weight, 0 for padding)."""
    return {PROBABILITY_OUTPUT: weight, LESION_OUTPUT: weight}


def steps_per_epoch(row_count: int, batch_size: int) -> int:
    return -(-row_count // batch_size)
