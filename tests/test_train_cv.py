"""`train cv`: stratified seeded folds over train + val, one run per fold, a summary, the test split once."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from common.errors import UserError
from preprocess.cache import CacheReader
from train.pipeline.folds import make_folds

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FOLDS = 3


def test_folds_partition_the_rows_stratified_and_seeded():
    rows = np.arange(100, 130)
    classes = np.array([0] * 10 + [1] * 20)
    folds = make_folds(rows, classes, 4, seed=7)
    assert sorted(np.concatenate(folds).tolist()) == rows.tolist()
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    for value in (0, 1):  # each class within one scan of its share in every fold
        counts = [int((classes[np.isin(rows, fold)] == value).sum()) for fold in folds]
        assert max(counts) - min(counts) <= 1
    again = make_folds(rows, classes, 4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, make_folds(rows, classes, 4, seed=8)))
    with pytest.raises(UserError, match="at least 2"):
        make_folds(rows, classes, 1, seed=0)


@pytest.fixture(scope="module")
def cv_run(tiny_cache, tmp_path_factory):
    from train.__main__ import main

    run_dir = tmp_path_factory.mktemp("cv") / "cv"
    code = main(["cv", str(tiny_cache), "--folds", str(FOLDS), "--run-dir", str(run_dir), "--epochs", "1",
                 "--padding", "same", "--quiet"])
    assert code == 0
    return run_dir


@pytest.mark.slow
def test_each_fold_is_a_run_validated_on_its_own_fold(cv_run, tiny_cache):
    with CacheReader(tiny_cache) as reader:
        pool = sorted(np.concatenate([reader.split("train"), reader.split("val")]).tolist())
        test_rows = reader.split("test")
    validated = []
    for fold in range(1, FOLDS + 1):
        run_dir = cv_run / f"fold-{fold}"
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["options"]["fold"], config["options"]["folds"]) == (fold, FOLDS)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["split"] == f"val (fold {fold} of {FOLDS})"  # folds never look at the test split
        assert config["split_sizes"]["val"] == metrics["scans"]
        assert config["split_sizes"]["train"] + config["split_sizes"]["val"] == len(pool)
        validated.append(metrics["scans"])
    assert sum(validated) == len(pool)  # every train/val row is validated on exactly once
    summary = json.loads((cv_run / "cv_summary.json").read_text())
    assert summary["folds"] == FOLDS and summary["task"] == "binary"
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        values = summary["validation"][name]
        assert len(values["per_fold"]) == FOLDS
        defined = [value for value in values["per_fold"] if value == value]
        if defined:
            assert values["mean"] == pytest.approx(np.mean(defined))
    assert summary["test"]["split"] == "test" and summary["test"]["scans"] == len(test_rows)
    assert "mean of the 3 fold models" in summary["test"]["model"]


@pytest.mark.slow
def test_cv_prints_its_summary_and_resumes_without_retraining(cv_run, tiny_cache, capsys):
    from train.__main__ import main

    before = {path: path.stat().st_mtime_ns for path in cv_run.glob("fold-*/state.json")}
    assert main(["cv", str(tiny_cache), "--folds", str(FOLDS), "--run-dir", str(cv_run), "--epochs", "1",
                 "--padding", "same", "--quiet", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"{FOLDS}-fold cross-validation (binary)" in out
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "test split (" in out and str(cv_run / "cv_summary.json") in out
    assert {path: path.stat().st_mtime_ns for path in cv_run.glob("fold-*/state.json")} == before


def test_bad_cv_requests_are_one_line(tiny_cache, tmp_path, capsys):
    from train.__main__ import main

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    for argv, message in [
        (["--folds", "1"], "argument --folds: must be from 2 to 100, got 1"),
        (["--folds", "9"], "--folds 9 needs at least 18 train and validation scans"),
        (["--run-dir", str(occupied)], "is not empty (notes.txt)"),
        (["--resume"], "--resume needs --run-dir"),
        (["--strategy", "multiworker", "--run-dir", str(tmp_path / "x")], "cv runs its folds one after another"),
    ]:
        try:
            code = main(["cv", str(tiny_cache), "--padding", "same", *argv])
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        assert code != 0
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
    assert (occupied / "notes.txt").read_text() == "mine" and sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]


def test_runs_lists_the_folds(cv_run, capsys):
    from train.__main__ import main

    assert main(["runs", str(cv_run.parent), "--sort", "run"]) == 0
    table = capsys.readouterr().out
    for fold in range(1, FOLDS + 1):
        line = next(line for line in table.splitlines() if line.startswith(f"cv/fold-{fold} "))
        # a fold never saw the test split: its fold report is not shown as test numbers
        assert "cv fold" in line and line.split()[-2:] == ["-", "-"], line


@pytest.mark.slow
def test_predict_and_evaluate_on_a_cv_directory_average_the_folds_and_report_their_spread(cv_run, tiny_cache,
                                                                                       synthetic_raw, capsys):
    from train.__main__ import main

    scans = sorted(synthetic_raw.rglob("*.nii.gz"))[:2]
    assert main(["predict", str(cv_run), *map(str, scans), "--json"]) == 0
    documents = json.loads(capsys.readouterr().out)
    per_fold = []
    for fold in range(1, FOLDS + 1):
        assert main(["predict", str(cv_run / f"fold-{fold}"), *map(str, scans), "--json"]) == 0
        per_fold.append([document["probability_abnormal"] for document in json.loads(capsys.readouterr().out)])
    per_fold = np.array(per_fold)
    for index, document in enumerate(documents):
        assert document["probability_abnormal"] == pytest.approx(per_fold[:, index].mean(), abs=1e-6)
        spread = document["spread"]
        of_predicted = per_fold[:, index] if document["predicted_class"] == "abnormal" else 1 - per_fold[:, index]
        assert spread["folds"] == FOLDS and spread["sd"] == pytest.approx(np.std(of_predicted, ddof=1), abs=1e-6)
        assert spread["min"] == pytest.approx(of_predicted.min(), abs=1e-6)
        assert len(document["ood_scores"]["features"]["flagged"]) == FOLDS  # each fold's verdict, and the majority
    assert main(["predict", str(cv_run), *map(str, scans)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(f"The {FOLDS} fold models are" in line and "(folds: sd" in line for line in lines)
    assert main(["evaluate", str(cv_run), str(tiny_cache)]) == 0
    output = capsys.readouterr().out
    assert output.startswith("test split: ") and "temperatures" in output
    summary = json.loads((cv_run / "cv_summary.json").read_text())
    assert f"AUC          {summary['test']['auc']:.4f}" in output  # the same ensemble cv reported on the test split


def test_an_unfinished_cv_directory_is_refused_in_one_line(cv_run, tmp_path, capsys):
    from train.__main__ import main

    partial = tmp_path / "partial"
    shutil.copytree(cv_run / "fold-1", partial / "fold-1")
    assert main(["predict", str(partial), "scan.nii.gz"]) != 0
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "has not finished" in line
