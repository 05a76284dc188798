"""Rotation augmentation: a deterministic `rotate_volume` checked against references, and seeded angles."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

tf = pytest.importorskip("tensorflow")

from train.pipeline.augment import ROTATION_ANGLES_DEGREES, draw_rotation_angles, rotate_volume  # noqa: E402


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
