"""Augmentation: deterministic `rotate_volume` and `move_volume` checked against references, seeded draws."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

tf = pytest.importorskip("tensorflow")

from train.pipeline.augment import (  # noqa: E402
    ROTATION_ANGLES_DEGREES, SHIFT_FRACTION, draw_moves, draw_rotation_angles, move_volume, rotate_volume,
)


def random_volume(shape=(32, 32, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_zero_degrees_is_the_identity():
    volume = random_volume()
    np.testing.assert_array_equal(rotate_volume(volume, 0.0).numpy(), volume)


@pytest.mark.parametrize("quarter_turns", [1, 2, 3, -1])
def test_multiples_of_90_degrees_equal_np_rot90(quarter_turns):
    volume = random_volume()
    rotated = rotate_volume(volume, 90.0 * quarter_turns).numpy()
    np.testing.assert_array_equal(rotated, np.rot90(volume, quarter_turns, axes=(0, 1)))


def test_half_turn_of_a_non_square_volume_equals_np_rot90():
    volume = random_volume((32, 24, 8))
    np.testing.assert_array_equal(rotate_volume(volume, 180.0).numpy(), np.rot90(volume, 2, axes=(0, 1)))


@pytest.mark.parametrize("angle_degrees", [-20.0, -5.0, 10.0, 33.0])
def test_matches_scipy_linear_rotation_away_from_the_border(angle_degrees):
    # scipy's constant mode treats the outermost half voxel differently; the interior must agree
    volume = random_volume()
    expected = ndimage.rotate(volume, angle_degrees, axes=(1, 0), reshape=False, order=1, mode="constant")
    rotated = rotate_volume(volume, angle_degrees).numpy()
    np.testing.assert_allclose(rotated[6:-6, 6:-6], expected[6:-6, 6:-6], atol=1e-5)


def test_corners_rotated_in_from_outside_are_air():
    rotated = rotate_volume(np.ones((32, 32, 4), np.float32), 45.0).numpy()
    assert (rotated[0, 0] == 0).all() and (rotated[-1, -1] == 0).all()
    assert (rotated[16, 16] == 1).all()


def test_every_slice_gets_the_same_in_plane_rotation():
    slice_ = random_volume((32, 32, 1))
    volume = np.repeat(slice_, 5, axis=2)
    rotated = rotate_volume(volume, 17.0).numpy()
    for depth in range(5):
        np.testing.assert_array_equal(rotated[..., depth], rotated[..., 0])


@settings(max_examples=25, deadline=None)
@given(angle_degrees=st.floats(-180, 180), seed=st.integers(0, 2**16))
def test_values_stay_in_the_unit_interval(angle_degrees, seed):
    volume = random_volume((16, 20, 3), seed)
    rotated = rotate_volume(volume, angle_degrees).numpy()
    assert rotated.shape == volume.shape and rotated.dtype == np.float32
    assert rotated.min() >= 0.0 and rotated.max() <= 1.0


def test_angles_are_the_tutorials_and_repeat_under_a_seed():
    seed = tf.constant([1, 2], tf.int64)
    angles = draw_rotation_angles(seed, 500).numpy()
    assert set(angles.tolist()) == set(ROTATION_ANGLES_DEGREES)
    np.testing.assert_array_equal(draw_rotation_angles(seed, 500).numpy(), angles)
    assert not np.array_equal(draw_rotation_angles(tf.constant([1, 3], tf.int64), 500).numpy(), angles)


def test_no_moves_is_the_identity_and_mirrors_are_numpys_flips():
    volume = random_volume((6, 5, 4))
    np.testing.assert_array_equal(move_volume(volume, tf.zeros([6], tf.int32)).numpy(), volume)
    for axes in ((0,), (1,), (2,), (0, 2), (0, 1, 2)):
        moves = tf.constant([int(axis in axes) for axis in range(3)] + [0, 0, 0], tf.int32)
        np.testing.assert_array_equal(move_volume(volume, moves).numpy(), np.flip(volume, axes))


@given(shifts=st.tuples(st.integers(-4, 4), st.integers(-4, 4), st.integers(-3, 3)), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=30)
def test_a_shift_moves_every_voxel_by_it_and_lets_air_in(shifts, seed):
    volume = random_volume((9, 8, 5), seed) + 0.5  # no voxel is air, so air in the output came in by the shift
    moved = move_volume(volume, tf.constant([0, 0, 0, *shifts], tf.int32)).numpy()
    expected = np.zeros_like(volume)
    source = tuple(slice(max(-k, 0), n - max(k, 0)) for k, n in zip(shifts, volume.shape))
    target = tuple(slice(max(k, 0), n - max(-k, 0)) for k, n in zip(shifts, volume.shape))
    expected[target] = volume[source]
    np.testing.assert_array_equal(moved, expected)
    assert np.count_nonzero(moved == 0) == volume.size - np.prod([n - abs(k) for k, n in zip(shifts, volume.shape)])


def test_moves_repeat_under_a_seed_stay_within_a_tenth_of_each_axis_and_are_none_for_rotate():
    seed, shape = tf.constant([1, 2], tf.int64), (64, 40, 16)
    moves = draw_moves(seed, 2000, shape, "rotate-mirror-shift").numpy()
    np.testing.assert_array_equal(draw_moves(seed, 2000, shape, "rotate-mirror-shift").numpy(), moves)
    assert not np.array_equal(draw_moves(tf.constant([1, 3], tf.int64), 2000, shape, "rotate-mirror-shift").numpy(),
                              moves)
    largest = [round(SHIFT_FRACTION * side) for side in shape]
    assert moves[:, :3].min() == 0 and moves[:, :3].max() == 1 and abs(moves[:, :3].mean() - 0.5) < 0.05
    for axis in range(3):  # every shift from -largest to +largest is drawn, none beyond
        assert set(moves[:, 3 + axis].tolist()) == set(range(-largest[axis], largest[axis] + 1))
    assert not draw_moves(seed, 50, shape, "rotate").numpy().any()
