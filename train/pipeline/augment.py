"""Random in-plane rotation as TensorFlow graph ops: one function draws angles, another applies one.

`draw_rotation_angles` is the only random part; `rotate_volume` is a deterministic function of
the volume and the angle, so tests can check that 0 degrees is the identity and that 90 degrees
equals `np.rot90`. Everything runs inside the tf.data graph, in parallel, without the GIL.
"""
from __future__ import annotations

import math

import tensorflow as tf

# The Keras tutorial's angles: it picks one of these for every training volume.
ROTATION_ANGLES_DEGREES = (-20.0, -10.0, -5.0, 5.0, 10.0, 20.0)
# Sample positions are rounded to this fraction of a voxel, so that multiples of 90 degrees land
# exactly on voxel centres instead of 1e-16 beside them (far below any interpolation effect).
POSITION_SNAP = 2.0**20


def draw_rotation_angles(seed: tf.Tensor, count, angles_degrees=ROTATION_ANGLES_DEGREES) -> tf.Tensor:
    """`count` angles picked uniformly from `angles_degrees`; a pure function of the [2] seed."""
    choices = tf.constant(angles_degrees, dtype=tf.float32)
    picks = tf.random.stateless_uniform(
        [count], seed=seed, minval=0, maxval=len(angles_degrees), dtype=tf.int32
    )
    return tf.gather(choices, picks)


def rotate_volume(volume, angle_degrees) -> tf.Tensor:
    """Rotate an (H, W, D) volume in the H-W plane about its centre, the same for every slice.

    Positive angles turn the way `np.rot90` does (and `scipy.ndimage.rotate`); bilinear
    interpolation; voxels rotated in from outside the volume are air (0); values stay in [0, 1].
    """
    volume = tf.convert_to_tensor(volume, dtype=tf.float32)
    shape = tf.shape(volume)
    height, width, depth = shape[0], shape[1], shape[2]
    # positions in float64: at 128 voxels float32 would be off by ~1e-5 of a voxel
    radians = tf.cast(angle_degrees, tf.float64) * (math.pi / 180.0)
    cosine, sine = tf.cos(radians), tf.sin(radians)
    height_float, width_float = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    row_offset = tf.range(height_float, dtype=tf.float64)[:, None] - (height_float - 1) / 2
    column_offset = tf.range(width_float, dtype=tf.float64)[None, :] - (width_float - 1) / 2
    # where each output voxel comes from (the inverse rotation of its position)
    source_column = cosine * column_offset - sine * row_offset + (width_float - 1) / 2
    source_row = sine * column_offset + cosine * row_offset + (height_float - 1) / 2
    source_column = tf.round(source_column * POSITION_SNAP) / POSITION_SNAP
    source_row = tf.round(source_row * POSITION_SNAP) / POSITION_SNAP
    row_below, column_left = tf.floor(source_row), tf.floor(source_column)
    row_fraction = tf.cast(tf.reshape(source_row - row_below, [-1, 1]), tf.float32)
    column_fraction = tf.cast(tf.reshape(source_column - column_left, [-1, 1]), tf.float32)
    row_below, column_left = tf.cast(row_below, tf.int32), tf.cast(column_left, tf.int32)

    # Gather whole depth columns: one index per (row, column) moves D contiguous floats, about
    # 4x faster than ImageProjectiveTransformV3, which redoes the geometry for every channel.
    columns = tf.reshape(volume, [height * width, depth])
    columns = tf.concat([columns, tf.zeros([1, depth], tf.float32)], axis=0)  # last row: air
    outside = height * width

    def gather_corner(row, column):
        inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
        return tf.gather(columns, tf.reshape(tf.where(inside, row * width + column, outside), [-1]))

    rotated = (
        gather_corner(row_below, column_left) * ((1 - row_fraction) * (1 - column_fraction))
        + gather_corner(row_below, column_left + 1) * ((1 - row_fraction) * column_fraction)
        + gather_corner(row_below + 1, column_left) * (row_fraction * (1 - column_fraction))
        + gather_corner(row_below + 1, column_left + 1) * (row_fraction * column_fraction)
    )
    # weights sum to 1, but float rounding can step a hair past the ends
    return tf.clip_by_value(tf.reshape(rotated, shape), 0.0, 1.0)
