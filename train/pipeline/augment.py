"""Training augmentation as TensorFlow graph ops: functions that draw, and functions that apply.

Two kinds (`fit --augment`, `train.options.AUGMENTS`):
- `rotate`, the Keras tutorial's: one in-plane rotation per volume, from six angles.
- `rotate-mirror-shift`: first each axis mirrored with probability 1/2 and the volume shifted by a
  whole number of voxels, up to `SHIFT_FRACTION` of each axis (air coming in at the far side), then
  the same rotation. Eight mirror images times some thousand shifts times six angles leave the
  network no few views of a scan to memorise, as nnU-Net's mirroring does for its segmentations.

`draw_rotation_angles` and `draw_moves` are the only random parts; `rotate_volume` and
`move_volume` are deterministic functions of the volume and what was drawn, so tests can check
that 0 degrees is the identity and that 90 degrees equals `np.rot90`. Everything runs inside the
tf.data graph, in parallel, without the GIL.
"""
from __future__ import annotations

import math

import tensorflow as tf

# The Keras tutorial's angles: it picks one of these for every training volume.
ROTATION_ANGLES_DEGREES = (-20.0, -10.0, -5.0, 5.0, 10.0, 20.0)
SHIFT_FRACTION = 0.1  # the largest shift, as a share of each axis (6 voxels of 64)
MOVE_FIELDS = 6  # per volume: 3 mirror flags (0 or 1), then 3 shifts in voxels, along H, W, D
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


def draw_moves(seed: tf.Tensor, count, shape, augment: str | None) -> tf.Tensor:
    """(count, 6) int32: each volume's mirror flags and shifts (all 0 unless `augment` mirrors and shifts).

    A pure function of the [2] seed; `shape` is the volumes' (H, W, D), needed only to shift.
    """
    if augment != "rotate-mirror-shift":
        return tf.zeros([count, MOVE_FIELDS], tf.int32)
    if shape is None:
        raise ValueError("mirror-and-shift moves need the volumes' shape")
    flips_seed, shifts_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    flips = tf.random.stateless_uniform([count, 3], seed=flips_seed, minval=0, maxval=2, dtype=tf.int32)
    largest = [int(round(SHIFT_FRACTION * side)) for side in shape]
    unit = tf.random.stateless_uniform([count, 3], seed=shifts_seed)  # [0, 1)
    span = tf.constant([2 * value + 1 for value in largest], tf.float32)
    shifts = tf.cast(tf.floor(unit * span), tf.int32) - tf.constant(largest, tf.int32)
    return tf.concat([flips, shifts], axis=1)


def move_volume(volume, moves) -> tf.Tensor:
    """Mirror an (H, W, D) volume along the axes flagged in moves[:3], then shift it by moves[3:] voxels.

    A shift of +k along an axis puts input voxel i at i + k; the k voxels it uncovers are air (0).
    """
    volume = tf.convert_to_tensor(volume, dtype=tf.float32)
    for axis in range(3):
        volume = tf.cond(moves[axis] > 0, lambda v=volume, a=axis: tf.reverse(v, [a]), lambda v=volume: v)
    shifts = moves[3:]
    before, after = tf.maximum(shifts, 0), tf.maximum(-shifts, 0)
    padded = tf.pad(volume, tf.stack([before, after], axis=1))
    return tf.slice(padded, after, tf.shape(volume))
