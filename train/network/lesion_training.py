"""The lesion-map model's training in TensorFlow: cell targets in the pipeline, the loss, the log names.

What they mean, and when `fit` uses them, is `train.network.lesions`.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from train.network.lesions import (
    LESION_OUTPUT, POSITIVE_WEIGHT, PROBABILITY_OUTPUT, history_name, masks_known,
)

# A mark rotated with bilinear interpolation keeps about a quarter of its weight or more at the output
# voxel nearest its new centre (at worst half a voxel off on both in-plane axes: 0.5 x 0.5), so no
# rotation loses a marked voxel at this threshold, which leaves room for rounding.
ROTATED_MARK = 0.2


@keras.saving.register_keras_serializable(package="mosmed3d", name="lesion_cells_loss")
def lesion_cells_loss(truth, predicted):
    """Per scan: the mean over cells of the weighted binary cross-entropy, where the mask is known.

    `truth` is (B, h, w, d, 2): each cell's target and whether it is known; `predicted` (B, h, w, d, 1).
    """
    target, known = truth[..., :1], truth[..., 1:]
    predicted = tf.clip_by_value(tf.cast(predicted, tf.float32), 1e-7, 1 - 1e-7)
    entropy = -(target * tf.math.log(predicted) + (1 - target) * tf.math.log(1 - predicted))
    weights = known * (1.0 + (POSITIVE_WEIGHT - 1.0) * target)
    return tf.reduce_mean(weights * entropy, axis=[1, 2, 3, 4])


def cell_targets(marks: tf.Tensor, known: tf.Tensor, grid: tuple[int, int, tuple[int, int, int]]) -> tf.Tensor:
    """(h, w, d, 2) targets from (H, W, D) lesion marks (`train.pipeline.data.make_marks_loader`, then moved and
    rotated as the volume was) on the model's lesion-cell `grid`
    (`train.network.architecture.lesion_cell_grid`) and the scan's `known` (0 or 1). A cell is a
    lesion cell when a voxel of it holds at least `ROTATED_MARK` of a mark."""
    offset, cell, counts = grid
    window = marks[offset:offset + cell * counts[0], offset:offset + cell * counts[1],
                   offset:offset + cell * counts[2]]
    marked = tf.cast(window >= ROTATED_MARK, tf.float32)[tf.newaxis, ..., tf.newaxis]
    target = tf.nn.max_pool3d(marked, cell, cell, "VALID")[0]
    return tf.concat([target, tf.ones_like(target) * tf.cast(known, tf.float32)], axis=-1)


class LesionTargets:
    """What the pipelines need to give the lesion-map model its targets: each row's `masks_known`, and
    the model's cell grid (`train.network.architecture.lesion_cell_grid`). The marks themselves are
    read by `train.pipeline.data.make_marks_loader`."""

    def __init__(self, reader, grid: tuple[int, int, tuple[int, int, int]]):
        self.grid = grid
        self.known = tf.constant(masks_known(reader.labels, reader.lesion_mask_rows))

    def targets(self, row: tf.Tensor, label: tf.Tensor, marks: tf.Tensor) -> dict:
        return {PROBABILITY_OUTPUT: label, LESION_OUTPUT: cell_targets(marks, tf.gather(self.known, row), self.grid)}


class FlatLogNames(keras.callbacks.Callback):
    """First of `fit`'s callbacks for a lesion-map model: renames its epoch logs in place (`history_name`),
    so the recorder, early stopping and TensorBoard read the names every run has."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            renamed = {history_name(name): value for name, value in logs.items()}
            logs.clear()
            logs.update(renamed)
