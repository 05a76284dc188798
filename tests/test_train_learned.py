"""Has the run's model learned anything? The separation test (one-sided Mann-Whitney on the validation scores),
what `fit` ends with, what metrics.json records, and what `predict` and `runs` say of such a run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from conftest import run_python_module
from test_train_runs import parse_table
from train.fit_summary import FitReport, format_learned
from train.network.scores import SEPARATION_ALPHA, compute_roc_auc, compute_separation
from train.rundir.layout import TrainingState

NOT_LEARNED = "the model has not learned to separate the classes"


# -- the statistic ----------------------------------------------------------------------------------
def test_perfect_separation_of_ten_and_ten_scans_has_learned():
    labels, scores = np.repeat([0, 1], 10), np.arange(20.0)
    separation = compute_separation(labels, scores)
    assert separation.auc == 1.0 and (separation.normal, separation.abnormal) == (10, 10)
    assert separation.p_value < 1e-3 and separation.learned is True
    # the other way round is as far from "learned" as can be: the test is one-sided
    assert compute_separation(labels, -scores).p_value > 0.99 and compute_separation(labels, -scores).learned is False


def test_scores_that_do_not_depend_on_the_class_have_not_learned():
    labels = np.repeat([0, 1], 10)
    everything_tied = compute_separation(labels, np.full(20, 0.3))
    assert everything_tied.auc == 0.5 and everything_tied.p_value == 1.0 and everything_tied.learned is False
    rng = np.random.default_rng(0)  # ties in random order: each class holds five 0s and five 1s
    coin = np.concatenate([rng.permutation(np.repeat([0.0, 1.0], 5)) for _ in range(2)])
    separation = compute_separation(labels, coin)
    assert separation.auc == 0.5 and separation.p_value > SEPARATION_ALPHA and separation.learned is False


def test_the_p_value_is_the_normal_approximation_with_tie_correction_and_auc_is_u_over_n0_n1():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], [14, 11])
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: ties
    positives, negatives = scores[labels == 1], scores[labels == 0]
    u = (positives[:, None] > negatives).sum() + 0.5 * (positives[:, None] == negatives).sum()
    n1, n0, n = len(positives), len(negatives), len(scores)
    _, counts = np.unique(scores, return_counts=True)
    sigma = np.sqrt(n0 * n1 / 12 * ((n + 1) - (counts ** 3 - counts).sum() / (n * (n - 1))))
    expected = norm.sf((u - n0 * n1 / 2 - 0.5) / sigma)  # continuity-corrected, one-sided
    separation = compute_separation(labels, scores)
    assert separation.auc == pytest.approx(u / (n0 * n1)) == pytest.approx(compute_roc_auc(labels, scores))
    assert separation.p_value == pytest.approx(expected, rel=1e-9)


def test_under_chance_about_one_run_in_twenty_is_called_learned():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 12)
    called = [compute_separation(labels, rng.normal(size=24)).learned for _ in range(2000)]
    assert 0.03 <= np.mean(called) <= 0.07  # measured 0.048: the test holds its level


@pytest.mark.parametrize("normal, abnormal, learned", [
    (2, 2, None), (3, 3, None), (2, 4, None), (0, 9, None), (9, 0, None),  # even a perfect ranking: p >= 0.05
    (3, 4, True), (2, 5, True), (4, 4, True),  # a perfect ranking reaches p < 0.05 (exact: 1 / C(n, normal))
])
def test_too_few_scans_per_class_cannot_tell_rather_than_say_learned(normal, abnormal, learned):
    labels = np.repeat([0, 1], [normal, abnormal])
    separation = compute_separation(labels, np.arange(float(len(labels))))  # perfectly separated
    assert separation.learned is learned
    assert (separation.p_value is None) == (learned is None)


# -- what fit says -------------------------------------------------------------------------------
def report_of(metrics: dict, crop: str = "none") -> FitReport:
    return FitReport(Path("run"), TrainingState(), metrics, crop=crop)


def test_fit_says_nothing_when_learned_and_for_runs_without_the_test():
    assert format_learned(report_of({"learned": True, "val_auc_p_value": 0.001})) is None
    assert format_learned(report_of({"auc": 0.9})) is None  # a severity run: not tested
    assert format_learned(FitReport(Path("run"), TrainingState(), {"learned": False}, is_chief=False)) is None


def test_fit_says_what_to_try_and_suggests_the_lung_crop_only_without_it():
    metrics = {"learned": False, "val_auc_p_value": 0.41, "val_auc_exact": 0.52, "val_class_counts": [9, 9]}
    line = format_learned(report_of(metrics, crop="none"))
    assert line.startswith(NOT_LEARNED) and "\n" not in line
    assert "validation AUC 0.520" in line and "p = 0.41 on 9 normal and 9 abnormal validation scans" in line
    assert "more scans or epochs" in line and "--batch-size" in line and "--crop lungs" in line
    assert "--crop lungs" not in format_learned(report_of(metrics, crop="lungs"))
    too_few = format_learned(report_of({"learned": None, "val_auc_p_value": None, "val_class_counts": [2, 1]}))
    assert too_few.startswith("cannot tell whether the model has learned") and "2 normal and 1 abnormal" in too_few


def test_cv_names_the_folds_that_have_not_learned_in_its_summary():
    from train.cv import CrossValidationReport, format_summary

    summary = {"folds": 3, "task": "binary", "validation": {}, "test": {"scans": 0}}
    text = format_summary(CrossValidationReport(Path("cv"), {**summary, "learned": [True, False, None]}))
    assert "fold 2: the model has not learned to separate the classes" in text
    all_learned = {**summary, "learned": [True] * 3}
    assert "has not learned" not in format_summary(CrossValidationReport(Path("cv"), all_learned))
    assert "has not learned" not in format_summary(CrossValidationReport(Path("cv"), summary))  # a cv made before


# -- end to end: a cache whose classes hold the same scan ----------------------------------------------
@pytest.fixture(scope="module")
def unlearnable_run(synthetic_raw, tmp_path_factory) -> tuple[Path, object]:
    """A real `fit` process on a cache whose 24 scans are one phantom, 12 filed as normal and 12 as abnormal:
    nothing separates the classes, and every validation scan scores the same."""
    from preprocess.engine.build import BuildOptions, build_cache

    folder = tmp_path_factory.mktemp("unlearnable")
    phantom = sorted((synthetic_raw / "CT-0").rglob("*.nii.gz"))[0]
    for grade in (0, 1):
        for number in range(12):
            (folder / "raw" / f"CT-{grade}").mkdir(parents=True, exist_ok=True)
            shutil.copy(phantom, folder / "raw" / f"CT-{grade}" / f"study_{100 * grade + number:04d}.nii.gz")
    cache = folder / "same.h5"
    build_cache(BuildOptions(raw=folder / "raw", out=cache, jobs=1, shape=(32, 32, 16), val_fraction=0.35,
                             crop="none", quiet=True))
    run_dir = folder / "run"
    result = run_python_module("train", "fit", str(cache), "--run-dir", str(run_dir), "--epochs", "1",
                               "--padding", "same", "--width", "0.25", "--quiet")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_fit_on_unlearnable_classes_ends_with_one_line_and_records_learned_false(unlearnable_run):
    run_dir, result = unlearnable_run
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(NOT_LEARNED) and "--crop lungs" in lines[-1]  # the cache was built with crop none
    assert (result.stdout + result.stderr).count(NOT_LEARNED) == 1
    assert result.stdout.startswith("run saved in")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    normal, abnormal = metrics["val_class_counts"]
    assert normal >= 4 and abnormal >= 4, "enough validation scans to tell"
    assert metrics["learned"] is False and metrics["val_auc_p_value"] == 1.0 and metrics["val_auc_exact"] == 0.5


def test_predict_says_once_per_invocation_that_the_run_has_not_learned(unlearnable_run, synthetic_raw, capsys):
    from train.__main__ import main

    run_dir, _ = unlearnable_run
    scans = sorted(synthetic_raw.rglob("*.nii.gz"))[:3]
    assert main(["predict", str(run_dir), *map(str, scans)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    [line] = [line for line in captured.err.splitlines() if "not learned" in line]
    assert line.startswith(f"{run_dir}: the model has not learned") and "its probabilities carry no information" in line


def test_predict_is_silent_about_a_run_that_has_learned(unlearnable_run, synthetic_raw, tmp_path, capsys):
    from train.__main__ import main

    run_dir = Path(shutil.copytree(unlearnable_run[0], tmp_path / "run"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "learned": True, "val_auc_p_value": 0.001}))
    assert main(["predict", str(run_dir), str(sorted(synthetic_raw.rglob("*.nii.gz"))[0])]) == 0
    assert "not learned" not in capsys.readouterr().err


def test_predict_on_a_cv_directory_names_the_folds_that_have_not_learned_once(unlearnable_run, synthetic_raw,
                                                                                tmp_path, capsys):
    from train.__main__ import main

    cv_dir = tmp_path / "cv"
    folds = [Path(shutil.copytree(unlearnable_run[0], cv_dir / f"fold-{fold}")) for fold in (1, 2, 3)]
    (cv_dir / "cv_summary.json").write_text("{}")
    metrics = json.loads((folds[1] / "metrics.json").read_text())
    (folds[1] / "metrics.json").write_text(json.dumps({**metrics, "learned": True}))
    scans = sorted(synthetic_raw.rglob("*.nii.gz"))[:2]
    assert main(["predict", str(cv_dir), *map(str, scans)]) == 0
    [line] = [line for line in capsys.readouterr().err.splitlines() if "not learned" in line]
    assert line.startswith(f"{folds[0]}, {folds[2]}: these fold models have not learned to separate the classes")
    assert line.endswith("so their probabilities carry no information")


def test_runs_shows_the_run_as_not_learned(unlearnable_run):
    from train.rundir.listing import list_runs
    from train.rundir.table import format_runs_table

    run_dir, _ = unlearnable_run
    [run] = list_runs(run_dir.parent)
    assert run.learned == "no"
    table = format_runs_table([run], None)
    assert parse_table(table)[run.name]["learned"] == "no"
    assert "learned no: the model's validation AUC is not distinguishable from 0.5" in table
