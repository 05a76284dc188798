"""fit with lesion masks: the lesion-map model, its targets in the pipeline, its loss, and a run serving one output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras model.save

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from common.errors import UserError  # noqa: E402
from conftest import TINY_SHAPE, run_python_module  # noqa: E402
from preprocess.cache import CacheReader  # noqa: E402
from preprocess.engine.build import BuildOptions, build_cache  # noqa: E402
from preprocess.phantoms.synth import write_synthetic_archive  # noqa: E402
from train.fit import fit_model  # noqa: E402
from train.network.architecture import lesion_cell_grid  # noqa: E402
from train.network.lesion_training import ROTATED_MARK, LesionTargets, cell_targets, lesion_cells_loss  # noqa: E402
from train.network.lesions import POSITIVE_WEIGHT, history_name, resolve_lesion_weight  # noqa: E402
from train.options import FitOptions  # noqa: E402
from train.pipeline.augment import move_volume, rotate_volume  # noqa: E402
from train.pipeline.data import make_epoch_plan, make_training_dataset  # noqa: E402
from train.predict import predict_scans  # noqa: E402
from train.rundir.layout import model_path, read_history  # noqa: E402
from train.rundir.models import load_run_model, load_trained_model  # noqa: E402


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> tuple[Path, Path]:
    """(raw, cache): 8 normal and 8 abnormal 48 x 48 phantoms with masks, cached at 32 x 32 x 16."""
    folder = tmp_path_factory.mktemp("masked")
    raw = folder / "raw"
    write_synthetic_archive(raw, normal=8, abnormal=8, size=48, seed=0, progress=False, masks=True)
    out = folder / "masked.h5"
    build_cache(BuildOptions(raw=raw, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    return raw, out


def options(cache: Path, run_dir: Path, **changes) -> FitOptions:
    return FitOptions(**{"cache": cache, "run_dir": run_dir, "epochs": 2, "padding": "same", "quiet": True,
                         "precision": "float32", **changes})


def test_a_cache_with_masks_trains_the_lesion_map_model_and_the_run_serves_one_output(masked, tmp_path):
    raw, cache = masked
    run_dir = tmp_path / "run"
    fit_model(options(cache, run_dir))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["lesion_weight"] == 20.0
    assert config["options"]["precise_bn_scans"] == 0  # the lesion map's default, not the recipe's 32
    assert config["options"]["learning_rate"] == 1e-3  # the lesion map's default, not the recipe's 3e-4
    history = read_history(run_dir / "history.csv")
    assert len(history) == 2
    for name in ("auc", "val_auc", "accuracy", "label_loss", "val_label_loss", "lesion_cells_loss", "loss"):
        assert name in history[0], name
    assert not any(name.startswith("probability_abnormal") for name in history[0])
    saved = keras.saving.load_model(model_path(run_dir), compile=False)
    assert sorted(saved.output) == ["lesion_cells", "probability_abnormal"]
    assert saved.get_layer("lesion_cells").output.shape[1:] == (16, 16, 8, 1)
    assert "global_pool" not in [layer.name for layer in saved.layers]  # the later blocks are not built
    served = load_run_model(run_dir)
    assert served.output.shape == (None, 1)
    results = predict_scans(run_dir, [raw / "CT-1" / "study_0008.nii.gz"], explain_dir=tmp_path / "explained")
    assert results[0].probability_abnormal is not None
    assert (tmp_path / "explained" / "study_0008_gradcam.png").stat().st_size > 0  # explained from the call's logit
    # a resume reloads the two-output model with its loss (registered, safe mode) and trains on
    fit_model(options(cache, run_dir, epochs=3, resume=True))
    assert len(read_history(run_dir / "history.csv")) == 3
    assert load_trained_model(model_path(run_dir), compile=True).loss is not None


def test_lesion_weight_0_trains_the_plain_classifier_on_the_same_cache(masked, tmp_path):
    _, cache = masked
    run_dir = tmp_path / "plain"
    fit_model(options(cache, run_dir, epochs=1, lesion_weight=0.0))
    recorded = json.loads((run_dir / "config.json").read_text())["options"]
    assert (recorded["precise_bn_scans"], recorded["learning_rate"]) == (32, 3e-4)  # the recipe's
    saved = keras.saving.load_model(model_path(run_dir), compile=False)
    assert not isinstance(saved.output, dict) and "global_pool" in [layer.name for layer in saved.layers]
    assert "label_loss" not in read_history(run_dir / "history.csv")[0]


def test_an_explicit_precise_bn_or_rate_is_kept_for_the_lesion_map(masked, tmp_path):
    _, cache = masked
    fit_model(options(cache, tmp_path / "run", epochs=1, precise_bn_scans=4, learning_rate=2e-4))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert recorded["precise_bn_scans"] == 4 and recorded["learning_rate"] == 2e-4
    assert recorded["lesion_weight"] == 20.0


def test_a_lesion_weight_without_masks_or_for_grades_is_one_line(masked, tiny_cache, tmp_path):
    with pytest.raises(UserError, match=r"--lesion-weight 5 needs lesion masks, and no training scan of .* has one"):
        fit_model(options(tiny_cache, tmp_path / "a", lesion_weight=5.0))
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="--lesion-weight is for --task binary"):
        resolve_lesion_weight(5.0, 3, task_is_binary=False)
    assert resolve_lesion_weight(None, 3, task_is_binary=False) == 0.0  # grades: the plain classifier
    assert resolve_lesion_weight(None, 0, task_is_binary=True) == 0.0  # no masks: today's model
    assert resolve_lesion_weight(None, 3, task_is_binary=True) == 20.0
    result = run_python_module("train", "fit", str(tiny_cache), "--lesion-weight", "-1")
    assert result.returncode == 2 and "--lesion-weight" in result.stderr


def test_cell_targets_mark_the_cells_holding_lesion_on_the_models_grid():
    share = np.zeros((8, 8, 4), np.float32)
    share[5, 2, 1] = 0.3  # a rotated mark's remains: its 2 x 2 x 2 cell (2, 1, 0)
    share[0, 0, 0] = 0.1  # below ROTATED_MARK: marks nothing
    targets = cell_targets(tf.constant(share), tf.constant(1.0), lesion_cell_grid((8, 8, 4), "same", block=1)).numpy()
    assert targets.shape == (4, 4, 2, 2) and (targets[..., 1] == 1).all()
    assert list(zip(*np.nonzero(targets[..., 0]))) == [(2, 1, 0)]
    unknown = cell_targets(tf.constant(share), tf.constant(0.0), lesion_cell_grid((8, 8, 4), "same")).numpy()
    assert (unknown[..., 1] == 0).all()
    # a valid convolution's grid starts one voxel in: the voxel falls in cell (2, 0, 0)
    assert lesion_cell_grid((64, 64, 32), "valid") == (1, 2, (31, 31, 15))
    valid = cell_targets(tf.constant(share), tf.constant(1.0), lesion_cell_grid((8, 8, 4), "valid")).numpy()
    assert valid.shape == (3, 3, 1, 2) and list(zip(*np.nonzero(valid[..., 0]))) == [(2, 0, 0)]


def test_the_lesion_loss_counts_known_cells_and_weighs_positives():
    predicted = tf.fill([1, 2, 2, 2, 1], 0.5)
    target = np.zeros((1, 2, 2, 2, 2), np.float32)
    target[..., 1] = 1.0
    negatives_only = float(lesion_cells_loss(tf.constant(target), predicted)[0])
    assert negatives_only == pytest.approx(np.log(2), rel=1e-5)
    target[0, 0, 0, 0, 0] = 1.0  # one positive cell of eight weighs POSITIVE_WEIGHT
    one_positive = float(lesion_cells_loss(tf.constant(target), predicted)[0])
    assert one_positive == pytest.approx(np.log(2) * (7 + POSITIVE_WEIGHT) / 8, rel=1e-5)
    target[..., 1] = 0.0  # nothing known: nothing to learn
    assert float(lesion_cells_loss(tf.constant(target), predicted)[0]) == 0.0


@pytest.mark.parametrize("augment", ["rotate", "rotate-mirror-shift"])
def test_masks_move_with_their_volumes_and_leave_the_volumes_as_they_were(masked, augment):
    _, cache = masked
    with CacheReader(cache) as reader:
        rows = reader.split("train")
        labels = reader.labels[rows].astype(np.float32)
        grid = lesion_cell_grid(reader.shape, "same")
        plain = list(make_training_dataset(reader, rows, labels, 4, seed=3, augment=augment))
        with_masks = list(make_training_dataset(reader, rows, labels, 4, seed=3, augment=augment,
                                                lesions=LesionTargets(reader, grid)))
        plan = list(make_epoch_plan(rows, labels, seed=3, epoch=0, augment=augment, shape=reader.shape))
        samples = [sample for (_, targets, _) in with_masks for sample in targets["lesion_cells"].numpy()]
        for (volumes, batch_labels, batch_weights), (masked_volumes, targets, weights) in zip(plain, with_masks):
            np.testing.assert_array_equal(volumes.numpy(), masked_volumes.numpy())
            np.testing.assert_array_equal(targets["probability_abnormal"].numpy(), batch_labels.numpy())
            np.testing.assert_array_equal(weights["lesion_cells"].numpy(), batch_weights.numpy())
        marked = 0
        for sample, (row, label, angle, moves) in zip(samples, plan):
            marks = (reader.read_lesion_mask(int(row)) >= 64).astype(np.float32)  # a quarter of 255, rounded up
            if augment == "rotate-mirror-shift":
                marks = move_volume(marks, moves)
            expected = cell_targets(rotate_volume(marks, angle), tf.constant(1.0), grid).numpy()
            np.testing.assert_array_equal(sample[..., 0], expected[..., 0])
            assert sample[..., 1].min() == sample[..., 1].max() == 1.0  # normal, or abnormal with a mask
            marked += int(sample[..., 0].any())
        assert marked == int(labels.sum())  # every abnormal training scan's lesion is somewhere in its map


def test_no_rotation_loses_a_marked_voxel():
    for angle in (-20.0, -10.0, -5.0, 5.0, 10.0, 20.0, 33.0, 45.0):
        for x, y in ((7, 9), (8, 8), (10, 6), (3, 12)):
            marks = np.zeros((16, 16, 1), np.float32)
            marks[x, y, 0] = 1.0
            assert rotate_volume(marks, angle).numpy().max() >= ROTATED_MARK, (angle, x, y)


def test_log_names_are_those_every_run_has():
    assert history_name("probability_abnormal_auc") == "auc"
    assert history_name("val_probability_abnormal_specificity") == "val_specificity"
    assert history_name("probability_abnormal_loss") == "label_loss"
    assert history_name("val_probability_abnormal_loss") == "val_label_loss"
    assert history_name("lesion_cells_loss") == "lesion_cells_loss" and history_name("loss") == "loss"


def test_an_unreadable_mask_chunk_stops_fit_with_one_line_naming_the_row(masked, tmp_path, capsys):
    import h5py

    from train.__main__ import main

    _, source = masked
    cache = Path(shutil.copy(source, tmp_path / "masked.h5"))
    with h5py.File(cache, "r") as file:  # the masks are gzip-compressed: a damaged chunk fails to inflate
        row = int(next(row for row in file["splits/train"][:] if file["lesion_masks/paths"][row]))
        chunk = file["lesion_masks/volumes"].id.get_chunk_info_by_coord((row, 0, 0, 0))
    data = bytearray(cache.read_bytes())
    data[chunk.byte_offset + chunk.size // 2: chunk.byte_offset + chunk.size // 2 + 32] = b"\xff" * 32
    cache.write_bytes(bytes(data))
    assert main(["fit", str(cache), "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--padding", "same",
                 "--precision", "float32", "--quiet"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"python -m train: error: {cache}: the lesion mask of row {row} "
                                                   "cannot be read (")


def test_the_call_learns_rate_times_as_fast_as_a_dense_and_gives_its_logit_as_a_dense_does(tmp_path):
    """TopLogitCall stores slope and offset divided by its rate, so one Adam step moves the effective
    pair `rate` times as far as a Dense's (Adam's step is the rate whatever the gradient's size); its
    `kernel` and `bias` are that pair, from which calibration recomputes the logit; it saves and loads."""
    from train.network.model import TopLogitCall
    from train.trust.served import logits_of

    tops = np.array([[-1.0], [0.5], [2.0], [3.0]], np.float32)
    labels = np.array([[0.0], [0.0], [1.0], [1.0]], np.float32)
    moved = {}
    for rate in (1.0, 50.0):
        inputs = keras.Input((1,))
        model = keras.Model(inputs, TopLogitCall(rate, initial_offset=-0.5, name="probability_abnormal")(inputs))
        layer = model.layers[-1]
        assert float(layer.kernel[0, 0]) == pytest.approx(1.0) and float(layer.bias[0]) == pytest.approx(-0.5)
        np.testing.assert_allclose(model(tops).numpy(), 1 / (1 + np.exp(-(tops - 0.5))), rtol=1e-6)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        model.train_on_batch(tops, labels)
        moved[rate] = (float(layer.kernel[0, 0]) - 1.0, float(layer.bias[0]) + 0.5)
        logits = logits_of(model, tops)
        np.testing.assert_allclose(1 / (1 + np.exp(-logits)), model(tops).numpy(), rtol=1e-5)
    for slow, fast in zip(moved[1.0], moved[50.0]):
        assert abs(slow) == pytest.approx(1e-3, rel=0.01) and fast == pytest.approx(50 * slow, rel=0.01)
    model.save(tmp_path / "call.keras")
    loaded = keras.saving.load_model(tmp_path / "call.keras")
    assert loaded.layers[-1].rate == 50.0
    np.testing.assert_allclose(loaded(tops).numpy(), model(tops).numpy(), rtol=1e-6)


def test_a_negative_slope_is_held_at_zero():
    from train.network.model import TopLogitCall

    inputs = keras.Input((1,))
    model = keras.Model(inputs, TopLogitCall(100.0)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(10.0), loss="binary_crossentropy")
    # labels against the input: the gradient pushes the slope below zero, the constraint holds it there
    model.train_on_batch(np.array([[5.0], [-5.0]], np.float32), np.array([[0.0], [1.0]], np.float32))
    assert float(model.layers[-1].kernel[0, 0]) == 0.0


def test_the_call_offset_is_the_balanced_cross_entropys_minimum_even_on_separable_scans():
    from scipy.optimize import minimize_scalar

    from train.loop.call_refit import best_offset

    def balanced_loss(offset, tops, labels, slope):
        logits = slope * tops + offset
        per_scan = np.logaddexp(0, -logits) * labels + np.logaddexp(0, logits) * (1 - labels)
        return 0.5 * per_scan[labels == 1].mean() + 0.5 * per_scan[labels == 0].mean()

    rng = np.random.default_rng(0)
    cases = [  # overlapping; separable (every normal below every abnormal); far from 0; unequal counts
        (np.r_[rng.normal(0, 1, 30), rng.normal(1, 1, 30)], np.r_[np.zeros(30), np.ones(30)], 1.0),
        (np.r_[rng.uniform(2, 4, 20), rng.uniform(6, 9, 20)], np.r_[np.zeros(20), np.ones(20)], 1.5),
        (np.r_[rng.normal(40, 2, 50), rng.normal(45, 2, 7)], np.r_[np.zeros(50), np.ones(7)], 0.3),
    ]
    for tops, labels, slope in cases:
        offset = best_offset(tops, labels, slope)
        reference = minimize_scalar(balanced_loss, args=(tops, labels, slope), bracket=(-100, 100), tol=1e-12).x
        assert offset == pytest.approx(reference, abs=1e-4)
        for step in (-0.01, 0.01):
            assert balanced_loss(offset, tops, labels, slope) < balanced_loss(offset + step, tops, labels, slope)
    # separable scans: the offset puts the 0.5 between the classes, where a learned 0 left every scan abnormal
    tops, labels, slope = cases[1]
    assert -slope * 4 > best_offset(tops, labels, slope) > -slope * 6
    with pytest.raises(ValueError, match="both classes"):
        best_offset(np.array([1.0, 2.0]), np.array([1.0, 1.0]), 1.0)


def test_the_call_is_refit_from_a_balanced_seeded_choice_of_training_scans():
    from train.loop.call_refit import call_refit_rows

    rows = np.arange(100, 160)
    classes = (np.arange(60) % 3 == 0).astype(int)  # 20 abnormal, 40 normal
    chosen, chosen_classes = call_refit_rows(rows, classes, 16, seed=3)
    assert np.all(np.diff(chosen) > 0) and set(chosen) <= set(rows)
    np.testing.assert_array_equal(chosen_classes, classes[chosen - 100])
    assert (chosen_classes == 0).sum() == 16 and (chosen_classes == 1).sum() == 16
    again, _ = call_refit_rows(rows, classes, 16, seed=3)
    np.testing.assert_array_equal(chosen, again)  # every worker and a resume read the same scans
    assert not np.array_equal(chosen, call_refit_rows(rows, classes, 16, seed=4)[0])
    few, few_classes = call_refit_rows(rows, classes, 30, seed=3)  # fewer abnormal than asked: all of them
    assert (few_classes == 1).sum() == 20 and (few_classes == 0).sum() == 30


def test_each_validation_sees_the_call_offset_refit_from_training_scans_and_learned_keeps_it(masked, tmp_path):
    """The checkpoint of an epoch holds the offset set before its validation: `best_offset` of its own
    largest cell logits on the training scans (here all of them: fewer than 64 a class), unrotated,
    in inference mode. With --call-offset learned the offset is gradient descent's, which is not that."""
    from train.loop.call_refit import best_offset
    from train.network.model import TOP_LOGIT
    from train.pipeline.data import make_evaluation_dataset

    _, cache = masked
    offsets = {}
    for choice in ("refit", "learned"):
        run_dir = tmp_path / choice
        fit_model(options(cache, run_dir, call_offset=None if choice == "refit" else choice))
        assert json.loads((run_dir / "config.json").read_text())["options"]["call_offset"] == choice
        model = keras.saving.load_model(run_dir / "last-epoch-0002.keras", compile=False)
        with CacheReader(cache) as reader:
            rows = reader.split("train")
            labels = reader.labels[rows].astype(np.float32)
            volumes = make_evaluation_dataset(reader, rows, labels, 8).map(lambda volume, label: volume)
            top_model = keras.Model(model.input, model.get_layer(TOP_LOGIT).output)
            tops = np.concatenate([top_model(batch, training=False).numpy().reshape(-1) for batch in volumes])
        call = model.get_layer("probability_abnormal")
        slope, offset = float(call.kernel[0, 0]), float(call.bias[0])
        offsets[choice] = (offset, best_offset(tops, labels, slope))
    assert offsets["refit"][0] == pytest.approx(offsets["refit"][1], abs=1e-4)
    assert abs(offsets["learned"][0] - offsets["learned"][1]) > 1e-3  # 0.011 here after 2 epochs


def test_the_call_offset_is_the_lesion_maps_and_an_older_lesion_run_resumes_with_learned(masked, tiny_cache, tmp_path):
    _, cache = masked
    with pytest.raises(UserError, match="--call-offset is the lesion map's"):
        fit_model(options(tiny_cache, tmp_path / "plain", call_offset="refit"))
    assert not (tmp_path / "plain").exists()
    fit_model(options(cache, tmp_path / "plain-on-masks", epochs=1, lesion_weight=0.0))
    assert json.loads((tmp_path / "plain-on-masks" / "config.json").read_text())["options"]["call_offset"] is None
    result = run_python_module("train", "fit", str(cache), "--call-offset", "sometimes")
    assert result.returncode == 2 and "--call-offset" in result.stderr
    # a lesion-map run from before the option learned its offset: a plain --resume would change that, and is refused
    run_dir = tmp_path / "older"
    fit_model(options(cache, run_dir, epochs=1, call_offset="learned"))
    config = json.loads((run_dir / "config.json").read_text())
    del config["options"]["call_offset"]
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"changed: --call-offset 'learned' in the run, 'refit' now"):
        fit_model(options(cache, run_dir, epochs=2, resume=True))
    assert len(read_history(run_dir / "history.csv")) == 1 and "call_offset" not in json.loads(
        (run_dir / "config.json").read_text())["options"]  # left as it was
    fit_model(options(cache, run_dir, epochs=2, resume=True, call_offset="learned"))
    assert len(read_history(run_dir / "history.csv")) == 2
