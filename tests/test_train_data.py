"""The tf.data pipelines: shapes, range, augmentation only in training, seeds, streaming."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from common.errors import UserError  # noqa: E402
from preprocess.cache import CacheReader  # noqa: E402
from train.pipeline.augment import ROTATION_ANGLES_DEGREES, move_volume, rotate_volume  # noqa: E402
from train.pipeline.data import (  # noqa: E402
    Shard, derive_seed, make_epoch_plan, make_evaluation_dataset, make_training_dataset, make_validation_dataset,
    steps_per_epoch,
)
from train.network.tasks import BINARY_CLASS_NAMES, Task, compute_class_weights  # noqa: E402
from train.pipeline.data import sample_weights_of  # noqa: E402
from train.pipeline.folds import split_rows  # noqa: E402

BINARY = Task("binary", BINARY_CLASS_NAMES)


@pytest.fixture
def reader(tiny_cache):
    with CacheReader(tiny_cache) as opened:
        yield opened


def batches_of(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """(volumes, labels) of every batch; training batches also carry weights, dropped here."""
    return [(batch[0].numpy(), batch[1].numpy()) for batch in dataset]


def weighted_batches_of(dataset) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [tuple(part.numpy() for part in batch) for batch in dataset]


def test_training_batches_have_the_model_input_shape_and_range(reader):
    rows, labels = split_rows(reader, "train")
    batch_size = 5  # does not divide the split: every epoch's last batch is padded with weight-0 samples
    batches = weighted_batches_of(make_training_dataset(reader, rows, labels, batch_size, seed=0, epochs=2))
    steps = steps_per_epoch(len(rows), batch_size)
    assert len(batches) == 2 * steps and {len(volumes) for volumes, _, _ in batches} == {batch_size}
    for volumes, batch_labels, weights in batches:
        assert volumes.shape[1:] == (*reader.shape, 1) and volumes.dtype == np.float32
        assert volumes.min() >= 0.0 and volumes.max() <= 1.0
        assert set(batch_labels.tolist()) <= {0.0, 1.0}
    for epoch in (batches[:steps], batches[steps:]):
        epoch_labels = np.concatenate([b for _, b, _ in epoch])
        epoch_weights = np.concatenate([w for _, _, w in epoch])
        assert (epoch_weights == 1).sum() == len(rows) and (epoch_weights == 0).sum() == steps * batch_size - len(rows)
        assert sorted(epoch_labels[epoch_weights == 1].tolist()) == sorted(labels.tolist())


def test_class_weights_follow_their_rows_through_the_shuffle(reader):
    rows, labels = split_rows(reader, "train")
    class_weights = compute_class_weights(BINARY, labels)
    batches = weighted_batches_of(make_training_dataset(reader, rows, labels, 4, seed=2, epochs=1,
                                                        row_weights=sample_weights_of(labels, class_weights)))
    batch_labels = np.concatenate([b for _, b, _ in batches])
    weights = np.concatenate([w for _, _, w in batches])
    real = weights > 0
    assert real.sum() == len(rows)
    np.testing.assert_allclose(weights[real], [class_weights[int(label)] for label in batch_labels[real]])


@pytest.mark.parametrize("pipelines", [2, 3])
def test_shards_split_each_global_batch_and_every_worker_runs_the_same_steps(reader, pipelines):
    # what multi-worker training needs: disjoint rows, all of them, and equal step counts
    rows, labels = split_rows(reader, "train")
    per_replica = 2
    global_batch = per_replica * pipelines
    whole = weighted_batches_of(make_training_dataset(reader, rows, labels, global_batch, seed=4, epochs=1))
    parts = [
        weighted_batches_of(make_training_dataset(reader, rows, labels, per_replica, seed=4, epochs=1,
                                                  shard=Shard(global_batch, pipelines, index)))
        for index in range(pipelines)
    ]
    steps = steps_per_epoch(len(rows), global_batch)
    assert [len(part) for part in parts] == [steps] * pipelines
    for step in range(steps):  # the workers' batches of one step, side by side, are the global batch
        joined = np.concatenate([part[step][0] for part in parts])
        np.testing.assert_array_equal(joined, whole[step][0])
        np.testing.assert_array_equal(np.concatenate([part[step][2] for part in parts]), whole[step][2])
    assert sum(float((batch[2] > 0).sum()) for part in parts for batch in part) == len(rows)


def test_a_shard_must_divide_the_global_batch():
    with pytest.raises(ValueError):
        Shard(5, pipelines=2)
    with pytest.raises(ValueError):
        Shard(4, pipelines=2, index=2)


def test_validation_batches_keep_row_order_and_weigh_padding_zero(reader):
    rows, labels = split_rows(reader, "val")
    batches = weighted_batches_of(make_validation_dataset(reader, rows, labels, 4))
    volumes = np.concatenate([v for v, _, _ in batches])[..., 0]
    weights = np.concatenate([w for _, _, w in batches])
    assert len(volumes) == steps_per_epoch(len(rows), 4) * 4
    np.testing.assert_array_equal(volumes[:len(rows)], np.stack([reader.read_volume(row) for row in rows]))
    assert weights[:len(rows)].tolist() == [1.0] * len(rows) and not weights[len(rows):].any()


def test_an_epoch_plan_visits_every_row_once_with_the_tutorials_angles(reader):
    rows, labels = split_rows(reader, "train")
    plans = [list(make_epoch_plan(rows, labels, seed=3, epoch=epoch, augment="rotate", shape=reader.shape))
             for epoch in (0, 1)]
    for plan in plans:
        planned_rows = [int(row) for row, _, _, _ in plan]
        assert sorted(planned_rows) == rows.tolist()
        assert {float(angle) for _, _, angle, _ in plan} <= set(ROTATION_ANGLES_DEGREES)
        assert all(float(label) == reader.labels[int(row)] for row, label, _, _ in plan)
        assert not any(np.any(moves) for _, _, _, moves in plan), "rotate alone neither mirrors nor shifts"
    assert [int(r) for r, _, _, _ in plans[0]] != [int(r) for r, _, _, _ in plans[1]], "reshuffled every epoch"


def test_mirror_and_shift_add_moves_but_keep_the_rows_and_angles_of_rotate(reader):
    rows, labels = split_rows(reader, "train")
    rotate = list(make_epoch_plan(rows, labels, seed=3, epoch=0, augment="rotate", shape=reader.shape))
    moved = list(make_epoch_plan(rows, labels, seed=3, epoch=0, augment="rotate-mirror-shift", shape=reader.shape))
    assert [(int(r), float(a)) for r, _, a, _ in moved] == [(int(r), float(a)) for r, _, a, _ in rotate]
    moves = np.stack([m.numpy() for _, _, _, m in moved])
    assert moves.shape == (len(rows), 6) and set(moves[:, :3].ravel()) <= {0, 1}
    assert np.all(np.abs(moves[:, 3:]) <= np.ceil(0.1 * np.array(reader.shape))), "shifts beyond a tenth of an axis"
    assert np.any(moves), "mirror-shift drew nothing"


def test_training_samples_are_the_planned_move_then_rotation_of_the_stored_volume(reader):
    rows, labels = split_rows(reader, "train")
    plan = list(make_epoch_plan(rows, labels, seed=7, epoch=0, augment="rotate-mirror-shift", shape=reader.shape))
    (volumes, _), *_ = batches_of(make_training_dataset(reader, rows, labels, 2, seed=7, epochs=1,
                                                        augment="rotate-mirror-shift"))
    for sample, (row, _, angle, moves) in zip(volumes, plan):
        expected = rotate_volume(move_volume(reader.read_volume(int(row)), moves), angle).numpy()
        np.testing.assert_array_equal(sample[..., 0], expected)


def test_training_samples_are_the_planned_rotation_of_the_stored_volume(reader):
    rows, labels = split_rows(reader, "train")
    plan = list(make_epoch_plan(rows, labels, seed=7, epoch=0, augment="rotate", shape=reader.shape))
    (volumes, _), *_ = batches_of(make_training_dataset(reader, rows, labels, 2, seed=7, epochs=1))
    for sample, (row, _, angle, _) in zip(volumes, plan):
        expected = rotate_volume(reader.read_volume(int(row)), angle).numpy()
        np.testing.assert_array_equal(sample[..., 0], expected)
        assert not np.array_equal(sample[..., 0], reader.read_volume(int(row)))


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_data_is_never_augmented_and_keeps_row_order(reader, split):
    rows, labels = split_rows(reader, split)
    batches = batches_of(make_evaluation_dataset(reader, rows, labels, batch_size=2))
    volumes = np.concatenate([v for v, _ in batches])
    np.testing.assert_array_equal(volumes[..., 0], np.stack([reader.read_volume(row) for row in rows]))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), labels.astype(np.float32))


def test_the_same_seed_gives_the_same_batches_and_another_seed_does_not(reader):
    rows, labels = split_rows(reader, "train")
    first, again, other = (
        batches_of(make_training_dataset(reader, rows, labels, 4, seed=seed, epochs=2)) for seed in (11, 11, 12)
    )
    for (volumes, batch_labels), (volumes_again, labels_again) in zip(first, again):
        np.testing.assert_array_equal(volumes, volumes_again)
        np.testing.assert_array_equal(batch_labels, labels_again)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_a_pipeline_started_at_a_later_epoch_continues_the_same_sequence(reader):
    # what --resume relies on: epoch 2 does not depend on having run epochs 0 and 1 in this process
    rows, labels = split_rows(reader, "train")
    steps = steps_per_epoch(len(rows), 4)
    whole = batches_of(make_training_dataset(reader, rows, labels, 4, seed=5, first_epoch=0, epochs=3))
    resumed = batches_of(make_training_dataset(reader, rows, labels, 4, seed=5, first_epoch=2, epochs=3))
    assert len(resumed) == steps
    for (volumes, _), (resumed_volumes, _) in zip(whole[2 * steps:], resumed):
        np.testing.assert_array_equal(volumes, resumed_volumes)


class CountingReader:
    """A CacheReader stand-in that counts volume reads."""

    def __init__(self, reader: CacheReader):
        self.reader, self.reads = reader, 0
        self.shape = reader.shape

    def read_volume(self, row: int) -> np.ndarray:
        self.reads += 1
        return self.reader.read_volume(row)


def test_volumes_are_streamed_not_loaded_up_front(reader):
    rows, labels = split_rows(reader, "train")
    rows, labels = np.tile(rows, 50), np.tile(labels, 50)  # a "cache" of 600 scans
    counting = CountingReader(reader)
    dataset = make_training_dataset(counting, rows, labels, 1, seed=0, epochs=2)
    assert counting.reads == 0, "building the pipeline must not read volumes"
    next(iter(dataset))
    time.sleep(0.5)  # let the prefetch and parallel-map buffers fill up
    # one batch plus those buffers (a few volumes per core), however many rows the split has
    assert 1 <= counting.reads <= 8 + 2 * (os.cpu_count() or 1) < len(rows)


def test_class_weights_balance_the_classes():
    weights = compute_class_weights(BINARY, np.array([0, 0, 0, 1]))
    assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}
    assert 3 * weights[0] == pytest.approx(1 * weights[1])
    with pytest.raises(UserError, match="no abnormal scans"):
        compute_class_weights(BINARY, np.array([0, 0]))
    grades = Task("severity", ("CT-0", "CT-1", "CT-3"))
    weights = compute_class_weights(grades, np.array([0, 0, 0, 1, 2, 2]))
    assert [3 * weights[0], 1 * weights[1], 2 * weights[2]] == pytest.approx([2.0, 2.0, 2.0])
    with pytest.raises(UserError, match="no CT-3 scans"):
        compute_class_weights(grades, np.array([0, 1]))


def test_each_random_stream_gets_its_own_seed():
    assert not np.array_equal(derive_seed(0, "shuffle"), derive_seed(0, "rotation"))
    assert not np.array_equal(derive_seed(0, "shuffle"), derive_seed(1, "shuffle"))
    np.testing.assert_array_equal(derive_seed(4, "shuffle"), derive_seed(4, "shuffle"))
