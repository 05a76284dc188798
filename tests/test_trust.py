"""Calibration and the "is this scan like the training data?" checks, on real files and without TensorFlow.

The end-to-end paths (fit writes calibration.json and reference.json, predict's sentence and JSON,
ensembles) are in test_train_fit.py and test_train_cv.py.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from common.errors import UserError

from preprocess.reading.scan_stats import MIN_SLICES, compute_scan_stats, hard_problems
from preprocess.phantoms.synth import write_synthetic_archive
from preprocess.reading.transform import preprocess_scan
from tests.conftest import write_nifti
from train.trust.calibration import (
    brier_score, expected_calibration_error, fit_temperature, negative_log_likelihood, probabilities_from_logits,
    probability_nll, reliability_bins,
)
from train.trust.ood import build_reference, histogram_cdfs, histogram_distances, mahalanobis, shrunk_precision

SHAPE = (32, 32, 16)


# -- calibration -------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.4, 1.0, 2.5])
def test_binary_logits_scaled_by_a_known_factor_come_back_to_it(factor):
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 3.0, 40_000)
    classes = (rng.random(true_logits.size) < probabilities_from_logits(true_logits)).astype(int)
    temperature, at_bound = fit_temperature(factor * true_logits, classes)
    assert temperature == pytest.approx(factor, rel=0.04) and not at_bound
    # and the fitted temperature gives the NLL of the true probabilities
    assert negative_log_likelihood(factor * true_logits, classes, temperature) == pytest.approx(
        negative_log_likelihood(true_logits, classes), abs=1e-3)


def test_softmax_logits_scaled_by_a_known_factor_come_back_to_it():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0.0, 2.0, (30_000, 4))
    probabilities = probabilities_from_logits(true_logits)
    classes = np.array([rng.choice(4, p=row) for row in probabilities])
    temperature, _ = fit_temperature(3.0 * true_logits, classes)
    assert temperature == pytest.approx(3.0, rel=0.04)


def test_a_perfectly_separated_set_hits_the_lower_bound_and_says_so():
    logits = np.array([-3.0, -2.0, 2.0, 3.0])
    temperature, at_bound = fit_temperature(logits, np.array([0, 0, 1, 1]))
    assert at_bound and temperature < 0.1


def test_ece_of_a_known_case_and_of_calibrated_probabilities():
    # every scan called abnormal at 90%, all right: confidence 0.9, accuracy 1.0, ECE 0.1
    probabilities = np.full(50, 0.9)
    assert expected_calibration_error(probabilities, np.ones(50)) == pytest.approx(0.1)
    # half of them wrong: accuracy 0.5 against confidence 0.9
    classes = np.array([1, 0] * 25)
    assert expected_calibration_error(probabilities, classes) == pytest.approx(0.4)
    # probabilities that are the true frequencies: ECE small with many scans
    rng = np.random.default_rng(2)
    truth = rng.random(50_000)
    outcomes = (rng.random(truth.size) < truth).astype(int)
    assert expected_calibration_error(truth, outcomes) < 0.01
    bins = reliability_bins(truth, outcomes)
    assert len(bins) == 10 and sum(row["scans"] for row in bins) == truth.size
    assert max(row["scans"] for row in bins) - min(row["scans"] for row in bins) <= 1  # equal-count


def test_brier_and_nll_of_known_cases():
    assert brier_score(np.array([1.0, 0.0, 0.5]), np.array([1, 0, 1])) == pytest.approx(0.25 / 3)
    assert brier_score(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0])) == pytest.approx(0.25)
    logits = np.array([-1.0, 0.5, 2.0])
    classes = np.array([0, 1, 0])
    assert probability_nll(probabilities_from_logits(logits), classes) == pytest.approx(
        negative_log_likelihood(logits, classes))


# -- hard checks on real files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    raw = tmp_path_factory.mktemp("trust") / "raw"
    write_synthetic_archive(raw, normal=1, abnormal=0, size=64, seed=3, progress=False)
    return next(raw.rglob("*.nii.gz"))


def problems_of(path):
    _, info = preprocess_scan(path, SHAPE, -1000.0, 400.0)
    return hard_problems(info.stats)


def test_a_phantom_and_real_chest_ct_pass_the_hard_checks_and_the_abdomen_scans_do_not(phantom, real_ct):
    assert problems_of(phantom) == []
    assert problems_of(real_ct / "chest_1p5mm_lps.nii.gz") == []
    for name in ("thorax_abdomen_3mm.nii.gz", "thorax_abdomen_3mm_small.nii.gz"):  # lung bases only: 116 mL
        [problem] = problems_of(real_ct / name)
        assert problem.startswith("only 116 mL of lung over 36 mm head to foot"), name


def phantom_array(path):
    import nibabel as nib

    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


@pytest.mark.parametrize("kind, expected", [
    ("rescaled", "rescaled intensities, not Hounsfield units"),
    ("mr", "no air"),
    ("constant", "constant volume"),
    ("few slices", "too few slices"),
    ("tiny spacing", "absurd voxel spacing"),
    ("huge field", "absurd field of view"),
])
def test_each_hard_check_names_its_reason_on_a_real_file(phantom, tmp_path, kind, expected):
    hu, affine = phantom_array(phantom)
    if kind == "rescaled":
        data = (np.clip(hu, -1000, 400) + 1000) / 1400
    elif kind == "mr":  # no air, positive values with their own histogram
        data = np.where(hu < -500, 20.0, 300.0 + 0.5 * (hu + 1000)).astype(np.float32)
    elif kind == "constant":
        data = np.full_like(hu, -1000.0)
    elif kind == "few slices":
        data = hu[:, :, : MIN_SLICES - 2]
    else:
        data = hu
    if kind == "tiny spacing":
        affine = np.diag([0.01, 0.01, 0.01, 1.0])
    elif kind == "huge field":
        affine = np.diag([30.0, 30.0, affine[2, 2], 1.0])
    path = write_nifti(tmp_path / f"{kind}.nii.gz", data.astype(np.float32), affine)
    problems = problems_of(path)
    assert any(expected in problem for problem in problems), problems


def test_statistics_are_the_same_in_one_piece_and_slab_by_slab(phantom):
    hu, affine = phantom_array(phantom)
    _, info = preprocess_scan(phantom, SHAPE, -1000.0, 400.0)
    whole = compute_scan_stats(hu, tuple(np.diag(affine)[:3]))
    assert np.allclose(info.stats.hu_histogram, whole.hu_histogram)
    assert info.stats.fov_mm == pytest.approx(whole.fov_mm) and info.stats.slices == hu.shape[2]
    assert info.stats.lung_fraction == pytest.approx(whole.lung_fraction)
    assert sum(info.stats.hu_histogram) == pytest.approx(1.0)


# -- distribution checks: held-out phantoms against real CT --------------------------------------------
def test_mahalanobis_and_its_shrinkage():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 60))  # more features than scans: the plain covariance is singular
    precision = shrunk_precision(features - features.mean(axis=0))
    assert np.all(np.isfinite(precision)) and np.all(np.linalg.eigvalsh(precision) > 0)
    means = features.mean(axis=0, keepdims=True)
    near = mahalanobis(rng.normal(size=(20, 60)), means, precision)
    far = mahalanobis(rng.normal(size=(20, 60)) + 3.0, means, precision)
    assert far.min() > near.max()


def test_the_histogram_distance_is_in_hounsfield_units():
    histograms = np.zeros((2, 52))
    histograms[0, 10], histograms[1, 12] = 1.0, 1.0  # all voxels in one bin, two bins (100 HU) apart
    cdfs = histogram_cdfs(histograms)
    assert histogram_distances(cdfs[:1], cdfs[1:]) == pytest.approx([100.0])


@pytest.fixture(scope="module")
def phantom_stats(tmp_path_factory):
    """Statistics of 48 training, 12 validation and 24 held-out phantoms (another seed), from real files."""
    def stats_of(seed, count, name):
        raw = tmp_path_factory.mktemp(name) / "raw"
        write_synthetic_archive(raw, normal=count // 2, abnormal=count - count // 2, size=64, seed=seed, progress=False)
        return [preprocess_scan(path, SHAPE, -1000.0, 400.0)[1].stats for path in sorted(raw.rglob("*.nii.gz"))]

    known = stats_of(11, 60, "known")
    return {"val": known[::5], "train": [item for index, item in enumerate(known) if index % 5],
            "held_out": stats_of(12, 24, "held_out")}


def test_held_out_phantoms_pass_and_real_ct_is_flagged(phantom_stats, real_ct):
    rng = np.random.default_rng(5)
    features = {name: rng.normal(size=(len(items), 8)) for name, items in phantom_stats.items()}
    classes = np.arange(len(phantom_stats["train"])) % 2
    reference = build_reference("model.keras", features["train"], classes, features["val"],
                                phantom_stats["train"], phantom_stats["val"])
    assert reference.val_flag_rate["geometry"] == 0.0 and reference.val_flag_rate["histogram"] <= 0.1
    held_out = [reference.judge(vector, stats) for vector, stats in zip(features["held_out"], phantom_stats["held_out"])]
    flagged = [verdict for verdict in held_out if verdict.flagged["histogram"] or verdict.flagged["geometry"]]
    assert len(flagged) <= 0.1 * len(held_out), [verdict.reasons for verdict in flagged]
    for scan in sorted(real_ct.glob("*.nii.gz")):
        _, info = preprocess_scan(scan, SHAPE, -1000.0, 400.0)
        verdict = reference.judge(rng.normal(size=8), info.stats)
        assert verdict.flagged["geometry"] and verdict.flagged["histogram"], (scan.name, verdict.scores)
        assert any("training" in reason for reason in verdict.reasons_by_check["geometry"])


def test_the_fitted_temperature_is_served_only_when_the_validation_split_supports_it():
    from train.trust.calibration import LIKELIHOOD_RATIO_CRITICAL, calibrate

    rng = np.random.default_rng(6)
    true_logits = rng.normal(0.0, 3.0, 20_000)
    classes = (rng.random(true_logits.size) < probabilities_from_logits(true_logits)).astype(int)
    # an over-confident model (logits x3) on a large split: strong evidence, the fitted T is served
    strong = calibrate(3.0 * true_logits, classes, "m.keras", "val")
    assert strong.temperature == strong.fitted_temperature == pytest.approx(3.0, rel=0.05)
    assert strong.likelihood_ratio > LIKELIHOOD_RATIO_CRITICAL and strong.nll_after < strong.nll_before
    # a calibrated model on 54 scans: the fit moves T by chance, the test does not accept it, T = 1 is served
    weak = calibrate(true_logits[:54], classes[:54], "m.keras", "val")
    assert weak.fitted_temperature != 1.0 and weak.likelihood_ratio < LIKELIHOOD_RATIO_CRITICAL
    assert weak.temperature == 1.0 and weak.nll_after == weak.nll_before


# -- the lungs in the geometry check, and references made before them ---------------------------------
OLD_GEOMETRY = ["fov_0", "fov_1", "fov_2", "spacing_0", "spacing_1", "spacing_2", "slices", "lung_fraction"]


def test_a_scan_whose_lungs_are_far_smaller_than_any_training_scans_is_flagged_naming_lung_volume(phantom_stats):
    rng = np.random.default_rng(7)
    reference = build_reference("model.keras", rng.normal(size=(len(phantom_stats["train"]), 8)),
                                np.arange(len(phantom_stats["train"])) % 2, rng.normal(size=(12, 8)),
                                phantom_stats["train"], phantom_stats["val"])
    assert {"lung_volume", "lung_extent_0", "lung_extent_1", "lung_extent_2"} <= set(reference.geometry_names)
    smallest = min(item.lung_volume_ml for item in phantom_stats["train"] + phantom_stats["val"])
    held_out = next(item for item in phantom_stats["held_out"]
                    if not reference.judge(rng.normal(size=8), item).flagged["geometry"])
    small = replace(held_out, lung_volume_ml=smallest / 4)  # a chest CT's lungs still (over 200 mL), but tiny
    assert hard_problems(small) == []
    verdict = reference.judge(rng.normal(size=8), small)
    [reason] = verdict.reasons_by_check["geometry"]
    assert verdict.flagged["geometry"] and reason.startswith(f"lung volume {smallest / 4:.0f} mL (training ")
    assert verdict.scores["geometry"]["lung_volume"] == pytest.approx(smallest / 4)
    narrow = replace(held_out, lung_extent_mm=(held_out.lung_extent_mm[0] / 3, *held_out.lung_extent_mm[1:]))
    assert reference.judge(rng.normal(size=8), narrow).reasons_by_check["geometry"][0].startswith(
        "lungs' extent left-right")


def test_a_run_made_before_the_lungs_were_measured_still_reads_and_judges_without_them(phantom_stats, tmp_path):
    from train.trust.ood import read_reference, write_reference

    old_stats = [replace(item, lung_volume_ml=None, lung_count=None, lung_extent_mm=None, lung_box=None)
                 for item in phantom_stats["train"] + phantom_stats["val"]]  # as a cache before schema version 3
    rng = np.random.default_rng(8)
    write_reference(tmp_path, build_reference("model.keras", rng.normal(size=(len(old_stats) - 12, 8)),
                                              np.arange(len(old_stats) - 12) % 2, rng.normal(size=(12, 8)),
                                              old_stats[:-12], old_stats[-12:]))
    document = json.loads((tmp_path / "reference.json").read_text())
    assert document["geometry"] == OLD_GEOMETRY and len(document["geometry_low"]) == 8  # what older versions wrote
    reference = read_reference(tmp_path)
    new_scan = replace(phantom_stats["held_out"][0], lung_volume_ml=1.0)  # lungs it cannot judge
    verdict = reference.judge(rng.normal(size=8), new_scan)
    assert set(verdict.scores["geometry"]) == set(OLD_GEOMETRY)
    assert not any("lung volume" in reason for reason in verdict.reasons)
    # a name no version wrote is refused in one line, as before
    (tmp_path / "reference.json").write_text(json.dumps({**document, "geometry": OLD_GEOMETRY[:-1] + ["colour"]}))
    with pytest.raises(UserError, match="made by another version of this tool"):
        read_reference(tmp_path)


def test_the_lesion_maps_calibration_fits_a_bias_where_the_validation_split_supports_it(tmp_path):
    from train.trust.calibration import CALIBRATION, calibrate, read_calibration, write_calibration

    rng = np.random.default_rng(0)
    classes = np.array([0] * 30 + [1] * 30)
    logits = np.where(classes == 1, 8.0, 4.0) + rng.normal(0.0, 1.0, 60)  # ranked right, the threshold at 6 not 0
    assert ((probabilities_from_logits(logits) > 0.5) == classes).mean() == 0.5  # every scan called abnormal
    calibration = calibrate(logits, classes, "m", "val", fit_bias=True)
    assert calibration.bias < -2 and calibration.likelihood_ratio > 5.99
    served = probabilities_from_logits(logits, calibration.temperature, calibration.bias)
    assert ((served > 0.5) == classes).mean() > 0.9
    assert calibration.nll_after < calibration.nll_before
    # every other run: no bias is tried
    assert calibrate(logits, classes, "m", "val").bias == 0.0
    # logits already calibrated: the pair does not pass its test, so the bias stays 0
    z = rng.normal(0.0, 2.0, 60)
    y = (rng.random(60) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    plain = calibrate(z, y, "m", "val", fit_bias=True)
    assert plain.bias == 0.0 and plain.fitted_bias != 0.0
    # it round-trips; a file from before the bias reads as bias 0; a damaged bias is one line
    write_calibration(tmp_path, calibration)
    assert read_calibration(tmp_path) == calibration
    document = json.loads((tmp_path / CALIBRATION).read_text())
    for key in ("bias", "fitted_bias"):
        document.pop(key)
    (tmp_path / CALIBRATION).write_text(json.dumps(document))
    assert read_calibration(tmp_path).bias == 0.0
    (tmp_path / CALIBRATION).write_text(json.dumps({**document, "bias": float("nan")}).replace("NaN", "1e999"))
    with pytest.raises(UserError, match="damaged \\(bias"):
        read_calibration(tmp_path)
