"""`--task severity`: the MosMedData grades kept in the cache, softmax, grade metrics, predict per grade."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SHAPE
from common.errors import UserError
from preprocess.engine.build import BuildOptions, build_cache
from preprocess.cache import CacheReader
from train.network.scores import compute_quadratic_weighted_kappa, compute_severity_report
from train.network.tasks import Task, class_indices, make_task, task_from_config, training_targets

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

GRADES = ("CT-0", "CT-1", "CT-2", "CT-3")


@pytest.fixture(scope="module")
def graded_raw(tmp_path_factory) -> Path:
    """12 normal and 18 abnormal phantoms, the abnormal ones dealt into CT-1, CT-2 and CT-3 (6 each)."""
    from preprocess.phantoms.synth import write_synthetic_archive

    raw = tmp_path_factory.mktemp("graded") / "raw"
    write_synthetic_archive(raw, normal=12, abnormal=18, size=32, seed=3, progress=False)
    for index, path in enumerate(sorted((raw / "CT-1").glob("*.nii.gz"))):
        grade = GRADES[1 + index % 3]
        if grade != "CT-1":
            (raw / grade).mkdir(exist_ok=True)
            shutil.move(path, raw / grade / path.name)
    return raw


@pytest.fixture(scope="module")
def graded_cache(graded_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graded-cache") / "graded.h5"
    build_cache(BuildOptions(raw=graded_raw, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    return out


def test_the_cache_keeps_each_scans_grade_and_the_task_uses_the_grades_present(graded_cache, tiny_cache):
    with CacheReader(graded_cache) as reader:
        task = make_task("severity", reader)
        assert task.class_names == GRADES and task.grade_numbers == (0, 1, 2, 3)
        indices = class_indices(task, reader, np.arange(len(reader)))
        assert [GRADES[index] for index in indices] == reader.class_names
        assert (reader.labels == (indices > 0)).all()  # the binary label is "any grade above CT-0"
        targets = training_targets(task, indices)
        assert targets.shape == (len(reader), 4) and (targets.sum(axis=1) == 1).all()
        assert make_task("binary", reader).class_names == ("normal", "abnormal")
    with CacheReader(tiny_cache) as reader:  # only CT-0 and CT-1: severity is then those two grades
        assert make_task("severity", reader).class_names == ("CT-0", "CT-1")


def test_a_run_config_names_its_task():
    assert task_from_config({"options": {}, "class_names": ["normal", "abnormal"]}).is_binary
    task = task_from_config({"options": {"task": "severity"}, "class_names": ["CT-0", "CT-2"]})
    assert task.class_names == ("CT-0", "CT-2") and task.output_units == 2
    with pytest.raises(UserError, match="damaged task"):
        task_from_config({"options": {"task": "severity"}, "class_names": ["normal", "abnormal"]})


def test_quadratic_weighted_kappa_by_hand():
    # O = [[1,0,0],[0,0,1],[0,0,1]], weights (i-j)^2, expected = outer([1,1,1],[1,0,2]) / 3: 1 - 1/5
    assert compute_quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], (0, 1, 2)) == pytest.approx(0.8)
    # with grades CT-0, CT-1, CT-3 the same confusion costs (1-3)^2 = 4: 1 - 4/12
    assert compute_quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], (0, 1, 3)) == pytest.approx(2 / 3)
    assert compute_quadratic_weighted_kappa([0, 1, 2, 2], [0, 1, 2, 2], (0, 1, 2)) == pytest.approx(1.0)
    assert np.isnan(compute_quadratic_weighted_kappa([1, 1], [1, 1], (0, 1, 2)))  # one grade: undefined


def test_severity_report():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.1, 0.6, 0.3]])
    report = compute_severity_report([0, 1, 2, 2], probabilities, ("CT-0", "CT-1", "CT-2"), (0, 1, 2))
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["auc_per_grade"] == {"CT-0": 1.0, "CT-1": 1.0, "CT-2": 1.0}  # every ranking is right
    assert report["macro_auc"] == pytest.approx(1.0)
    assert report["recall_per_grade"] == {"CT-0": 1.0, "CT-1": 1.0, "CT-2": 0.5}
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert report["quadratic_weighted_kappa"] == pytest.approx(compute_quadratic_weighted_kappa(
        [0, 1, 2, 2], [0, 1, 2, 1], (0, 1, 2)))
    missing = compute_severity_report([0, 0], np.array([[0.9, 0.1], [0.6, 0.4]]), ("CT-0", "CT-1"), (0, 1))
    assert np.isnan(missing["recall_per_grade"]["CT-1"]) and np.isnan(missing["macro_auc"])


@pytest.fixture(scope="module")
def severity_run(graded_cache, tmp_path_factory) -> Path:
    from train.fit import fit_model
    from train.options import FitOptions

    run_dir = tmp_path_factory.mktemp("severity") / "run"
    fit_model(FitOptions(cache=graded_cache, run_dir=run_dir, epochs=2, padding="same", task="severity",
                         quiet=True))
    return run_dir


@pytest.mark.slow
def test_severity_fit_reports_grade_metrics(severity_run, graded_cache):
    config = json.loads((severity_run / "config.json").read_text())
    assert config["options"]["task"] == "severity" and config["class_names"] == list(GRADES)
    assert set(config["class_weights"]) == set(GRADES)
    metrics = json.loads((severity_run / "metrics.json").read_text())
    with CacheReader(graded_cache) as reader:
        test_rows = reader.split("test")
        test_grades = [reader.class_names[row] for row in test_rows]
    assert metrics["task"] == "severity" and metrics["split"] == "test" and metrics["scans"] == len(test_rows)
    assert set(metrics["recall_per_grade"]) == set(metrics["auc_per_grade"]) == set(GRADES)
    assert {"macro_auc", "quadratic_weighted_kappa", "accuracy"} <= set(metrics)
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (4, 4) and confusion.sum() == len(test_rows)
    assert confusion.sum(axis=1).tolist() == [test_grades.count(grade) for grade in GRADES]
    history = (severity_run / "history.csv").read_text().splitlines()
    assert "val_auc" in history[0] and len(history) == 3


@pytest.mark.slow
def test_predict_prints_the_most_likely_grade_and_every_grades_probability(severity_run, graded_raw, capsys):
    from train.__main__ import main

    scans = sorted(graded_raw.rglob("*.nii.gz"))[:2]
    assert main(["predict", str(severity_run), *map(str, scans)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, scan in zip(lines, scans):
        match = re.fullmatch(rf"{re.escape(str(scan))}: most likely grade (CT-\d) \((\d+\.\d\d)%\); (.*)", line)
        assert match, line
        shares = dict(re.findall(r"(CT-\d) (\d+\.\d\d)%", match.group(3)))
        assert list(shares) == list(GRADES)
        assert sum(float(value) for value in shares.values()) == pytest.approx(100, abs=0.05)
        assert max(shares, key=lambda grade: float(shares[grade])) == match.group(1)
        assert float(shares[match.group(1)]) == pytest.approx(float(match.group(2)))
    assert main(["predict", str(severity_run), str(scans[0]), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)[0]
    assert set(document["grade_probabilities"]) == set(GRADES) and document["probability_abnormal"] is None


@pytest.mark.slow
def test_evaluate_a_severity_run(severity_run, graded_cache, capsys):
    from train.__main__ import main

    assert main(["evaluate", str(severity_run), str(graded_cache), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "quadratic weighted kappa" in out and "macro one-vs-rest AUC" in out
    assert all(grade in out for grade in GRADES)


def test_severity_needs_two_grades(tmp_path, graded_raw):
    raw = tmp_path / "raw"
    shutil.copytree(graded_raw / "CT-0", raw / "CT-0")
    out = tmp_path / "normal-only.h5"
    build_cache(BuildOptions(raw=raw, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    with CacheReader(out) as reader:
        with pytest.raises(UserError, match="needs at least two grades; .* has only CT-0"):
            make_task("severity", reader)


def test_binary_task_is_the_default(graded_cache):
    from train.options import FitOptions

    assert FitOptions().task == "binary"
    with CacheReader(graded_cache) as reader:
        assert make_task(FitOptions().task, reader) == Task("binary", ("normal", "abnormal"))
