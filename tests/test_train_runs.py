"""`train.rundir.listing`: run directories written with the real writers, listed, sorted, marked and printed."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from common.files import write_json_atomically
from preprocess.cache import CacheReader
from train.rundir.layout import TrainingState, best_model_name, last_model_name, write_state
from train.rundir.listing import COLUMNS, list_runs, sort_runs
from train.rundir.table import format_runs_table, runs_as_json

ROOT = Path(__file__).resolve().parents[1]
CACHE_A = "a" * 64
CACHE_B = "b" * 64


def make_run(run_dir: Path, *, fingerprint: str = CACHE_A, created: str = "2026-11-22T18:00:00Z",
             epochs: int = 15, completed: int = 15, best_epoch: int | None = None, best_val_auc: float = 0.8889,
             batch_size: int = 2, learning_rate: float = 1e-4, seed: int = 0, padding: str = "valid",
             stopped_early: bool = False, metrics: dict | None = None, **extra_options) -> Path:
    """A run directory as `train fit` leaves it; `metrics` None: not finished (no metrics.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    best_epoch = completed if best_epoch is None else best_epoch
    options = {"cache": "data/x.h5", "run_dir": str(run_dir), "epochs": epochs, "batch_size": batch_size,
               "learning_rate": learning_rate, "patience": 15, "seed": seed, "padding": padding,
               "precision": "float32", "resume": False, "quiet": True, **extra_options}
    write_json_atomically(run_dir / "config.json", {
        "options": options, "preprocessing": {"shape": [64, 64, 32]},
        "cache": {"path": "data/x.h5", "fingerprint": fingerprint, "attributes": {"fingerprint": fingerprint}},
        "input_shape": [64, 64, 32], "class_names": ["normal", "abnormal"],
        "split_sizes": {"train": 80, "val": 18, "test": 18}, "created_utc": created,
    })
    write_state(run_dir, TrainingState(
        completed_epochs=completed, best_epoch=best_epoch if completed else 0,
        best_val_auc=best_val_auc if completed else float("-inf"), stopped_early=stopped_early,
        last_model=last_model_name(completed) if completed else "",
        best_model=best_model_name(best_epoch) if completed else ""))
    if metrics is not None:
        write_json_atomically(run_dir / "metrics.json", {
            "model": best_model_name(best_epoch), "best_epoch": best_epoch, "best_val_auc": best_val_auc,
            "cache_fingerprint": fingerprint, "split": "test", "scans": 18, **metrics})
    (run_dir / "tensorboard" / "train").mkdir(parents=True, exist_ok=True)
    return run_dir


def finished(auc: float, accuracy: float = 0.5) -> dict:
    return {"auc": auc, "accuracy": accuracy, "sensitivity": 0.5, "specificity": 1.0}


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the table by run name, cut at the header's column starts (cells may be blank)."""
    header, *lines = text.splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    names = header.split()
    rows = {}
    for line in lines:
        if not line.strip():
            break  # the footer follows the blank line
        cells = [line[start:end].strip() for start, end in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def by_name(runs) -> dict:
    return {run.name: run for run in runs}


# -- listing --------------------------------------------------------------------------------------
def test_the_table_lists_every_run_with_its_values(tmp_path):
    make_run(tmp_path / "20261122-180000", metrics=finished(0.7530864197530864, 0.6666666666666666),
             best_val_auc=0.8888888955116272)
    make_run(tmp_path / "20261123-090000", created="2026-11-23T09:00:00Z", epochs=100, completed=40,
             best_epoch=25, best_val_auc=0.75, stopped_early=True, batch_size=4, learning_rate=2.5e-4, seed=7,
             padding="same", width=0.5, metrics=finished(0.6, 0.55))

    runs = list_runs(tmp_path)
    rows = parse_table(format_runs_table(runs, None))

    assert list(rows) == ["20261122-180000", "20261123-090000"]
    assert rows["20261122-180000"] == {
        "run": "20261122-180000", "date": "2026-11-22 18:00", "status": "finished", "cache": "aaaaaaaa",
        "task": "binary", "recipe": "tutorial", "epochs": "15/15", "batch": "2", "lr": "1e-04", "padding": "valid",
        "width": "1", "norm": "batch", "seed": "0",
        "val_auc": "0.8889", "test_auc": "0.7531", "test_acc": "0.6667"}
    second = rows["20261123-090000"]
    assert (second["status"], second["epochs"], second["batch"], second["lr"], second["padding"], second["width"],
            second["seed"]) == ("stopped early", "40/100", "4", "2.5e-04", "same", "0.5", "7")
    assert (second["val_auc"], second["test_auc"], second["test_acc"]) == ("0.7500", "0.6000", "0.5500")
    assert "strategy" not in rows["20261122-180000"] and "kappa" not in rows["20261122-180000"]


def test_json_keeps_full_values(tmp_path):
    make_run(tmp_path / "one", metrics=finished(0.75, 0.625), strategy="mirrored", learning_rate=3e-5, seed=3)
    (document,) = runs_as_json(list_runs(tmp_path))
    assert document["path"] == str(tmp_path / "one")
    assert (document["name"], document["status"], document["cache_fingerprint"]) == ("one", "finished", CACHE_A)
    assert (document["test_auc"], document["test_accuracy"], document["test_kappa"]) == (0.75, 0.625, None)
    assert (document["learning_rate"], document["seed"], document["strategy"]) == (3e-5, 3, "mirrored")
    assert (document["completed_epochs"], document["max_epochs"], document["other_cache"]) == (15, 15, False)


def test_strategy_and_severity_columns_appear_when_a_run_has_them(tmp_path):
    make_run(tmp_path / "binary", metrics=finished(0.8), strategy="auto")
    make_run(tmp_path / "severity", task="severity", strategy="mirrored",
             metrics={"macro_auc": 0.71, "auc": 0.5, "accuracy": 0.4, "quadratic_weighted_kappa": 0.33})
    rows = parse_table(format_runs_table(list_runs(tmp_path), None))
    assert (rows["severity"]["task"], rows["severity"]["test_auc"], rows["severity"]["kappa"]) \
        == ("severity", "0.7100", "0.3300")
    assert (rows["binary"]["task"], rows["binary"]["kappa"]) == ("binary", "")
    assert (rows["binary"]["strategy"], rows["severity"]["strategy"]) == ("auto", "mirrored")


def test_the_learned_column_says_yes_no_cannot_tell_or_dash_for_runs_made_before_the_test(tmp_path):
    make_run(tmp_path / "learned", metrics={**finished(0.9), "learned": True, "val_auc_p_value": 0.001})
    make_run(tmp_path / "chance", metrics={**finished(0.5), "learned": False, "val_auc_p_value": 0.6})
    make_run(tmp_path / "too-few", metrics={**finished(0.7), "learned": None, "val_auc_p_value": None})
    make_run(tmp_path / "older", metrics=finished(0.8))
    make_run(tmp_path / "fold", metrics={**finished(0.5), "split": "val (fold 1 of 3)", "learned": False})
    runs = list_runs(tmp_path)
    assert {run.name: run.learned for run in runs} == {
        "learned": "yes", "chance": "no", "too-few": "cannot tell", "older": None, "fold": "no"}
    text = format_runs_table(runs, None)
    assert {name: row["learned"] for name, row in parse_table(text).items()} == {
        "learned": "yes", "chance": "no", "too-few": "?", "older": "-", "fold": "no"}
    assert "learned no: the model's validation AUC is not distinguishable from 0.5" in text
    assert "learned ?: too few validation scans" in text
    assert [run.name for run in sort_runs(runs, "learned")] == ["chance", "fold", "too-few", "learned", "older"]
    # without any run that has the test, the table is as it was
    assert "learned" not in format_runs_table([run for run in runs if run.name == "older"], None)


def test_unfinished_runs_show_their_progress_and_no_test_values(tmp_path):
    make_run(tmp_path / "running", epochs=100, completed=3, best_val_auc=0.6)
    make_run(tmp_path / "just-started", epochs=100, completed=0)
    # resumed with more epochs: metrics.json belongs to an earlier best model, not to this one
    make_run(tmp_path / "resumed", epochs=30, completed=20, best_epoch=18, metrics=finished(0.9))
    write_json_atomically(tmp_path / "resumed" / "metrics.json",
                          {"model": best_model_name(10), "auc": 0.9, "accuracy": 0.9})

    rows = parse_table(format_runs_table(list_runs(tmp_path), None))
    assert (rows["running"]["status"], rows["running"]["epochs"], rows["running"]["val_auc"]) \
        == ("unfinished", "3/100", "0.6000")
    assert (rows["running"]["test_auc"], rows["running"]["test_acc"]) == ("-", "-")
    assert (rows["just-started"]["epochs"], rows["just-started"]["val_auc"]) == ("0/100", "-")
    assert (rows["resumed"]["status"], rows["resumed"]["epochs"], rows["resumed"]["test_auc"]) \
        == ("unfinished", "20/30", "-")


def test_a_run_that_keeps_its_last_epoch_is_finished_once_that_model_is_tested(tmp_path):
    for name in ("last", "switched", "bad-keep"):
        make_run(tmp_path / name, epochs=20, completed=20, best_epoch=12, keep="last", metrics=finished(0.9))
    for name in ("last", "bad-keep"):
        write_json_atomically(tmp_path / name / "metrics.json", {"model": last_model_name(20), "auc": 0.95,
                                                                 "accuracy": 0.9, "keep": "last"})
    # switched to --keep last by a resume that was stopped before it tested the last epoch's model
    config = tmp_path / "bad-keep" / "config.json"
    config.write_text(config.read_text().replace('"keep": "last"', '"keep": "sideways"'))

    runs = by_name(list_runs(tmp_path))
    assert (runs["last"].status, runs["last"].test_auc, runs["last"].best_epoch) == ("finished", 0.95, 12)
    assert (runs["switched"].status, runs["switched"].test_auc) == ("unfinished", None)
    assert runs["bad-keep"].status == "damaged" and "keep must be 'best' or 'last'" in runs["bad-keep"].problem


def test_damaged_runs_are_listed_with_the_reason_not_raised(tmp_path):
    make_run(tmp_path / "good", metrics=finished(0.8))
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text("{not json")
    make_run(tmp_path / "bad-state", metrics=finished(0.7))
    (tmp_path / "bad-state" / "state.json").write_text('{"completed_epochs": -4}')
    make_run(tmp_path / "bad-metrics", metrics=finished(0.7))
    (tmp_path / "bad-metrics" / "metrics.json").write_text("[1, 2]")

    runs = by_name(list_runs(tmp_path))
    assert {name: run.status for name, run in runs.items()} == {
        "good": "finished", "bad-config": "damaged", "bad-state": "damaged", "bad-metrics": "damaged"}
    assert runs["bad-state"].max_epochs == 15  # what the readable files say is kept
    text = format_runs_table(list(runs.values()), None)
    rows = parse_table(text)
    assert (rows["bad-config"]["status"], rows["bad-config"]["epochs"], rows["bad-config"]["cache"]) \
        == ("damaged", "0/-", "-")
    assert re.search(r"^damaged: bad-config: .*config\.json: unreadable", text, re.MULTILINE)
    assert re.search(r"^damaged: bad-state: .*completed_epochs must be a whole number", text, re.MULTILINE)
    assert re.search(r"^damaged: bad-metrics: .*expected a JSON object", text, re.MULTILINE)


def test_cross_validation_folds_are_found_and_run_subfolders_are_not_searched(tmp_path):
    for fold in (1, 2, 3):
        make_run(tmp_path / "cv" / f"fold-{fold}", metrics=finished(0.5 + fold / 10))
    write_json_atomically(tmp_path / "cv" / "cv_summary.json", {"folds": 3})
    make_run(tmp_path / "single", metrics=finished(0.8))
    write_json_atomically(tmp_path / "single" / "tensorboard" / "config.json", {"options": {}})  # not a run
    make_run(tmp_path / ".hidden" / "run", metrics=finished(0.8))

    runs = list_runs(tmp_path)
    assert [run.name for run in runs] == ["cv/fold-1", "cv/fold-2", "cv/fold-3", "single"]
    assert [run.test_auc for run in runs] == pytest.approx([0.6, 0.7, 0.8, 0.8])


def test_a_run_directory_itself_can_be_listed(tmp_path):
    run_dir = make_run(tmp_path / "runs" / "demo", metrics=finished(0.8))
    (run,) = list_runs(run_dir)
    assert (run.name, run.path, run.status) == (str(run_dir), run_dir, "finished")


def test_a_missing_root_or_a_file_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: no such folder"):
        list_runs(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match=r"file\.txt: not a folder"):
        list_runs(tmp_path / "file.txt")


def test_no_runs_is_an_empty_list_and_a_clear_message(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    assert list_runs(tmp_path) == []
    assert format_runs_table([], None).startswith("no runs found")


# -- sorting --------------------------------------------------------------------------------------
@pytest.fixture
def three_runs(tmp_path):
    make_run(tmp_path / "b-mid", created="2026-11-21T10:00:00Z", learning_rate=1e-3, seed=2, metrics=finished(0.7))
    make_run(tmp_path / "a-unfinished", created="2026-11-23T10:00:00Z", learning_rate=1e-5, seed=9,
             epochs=100, completed=2)
    make_run(tmp_path / "c-best", created="2026-11-22T10:00:00Z", learning_rate=1e-4, seed=1, metrics=finished(0.9))
    return list_runs(tmp_path)


def names(runs) -> list[str]:
    return [run.name for run in runs]


def test_auc_sorts_best_first_with_missing_values_last(three_runs):
    assert names(sort_runs(three_runs, "test_auc")) == ["c-best", "b-mid", "a-unfinished"]
    assert names(sort_runs(three_runs, "test_auc", descending=False)) == ["b-mid", "c-best", "a-unfinished"]


def test_date_sorts_newest_first_and_options_ascending(three_runs):
    assert names(sort_runs(three_runs, "date")) == ["a-unfinished", "c-best", "b-mid"]
    assert names(sort_runs(three_runs, "lr")) == ["a-unfinished", "c-best", "b-mid"]
    assert names(sort_runs(three_runs, "seed")) == ["c-best", "b-mid", "a-unfinished"]
    assert names(sort_runs(three_runs, "run")) == ["a-unfinished", "b-mid", "c-best"]
    assert names(sort_runs(three_runs, "epochs", descending=True)) == ["b-mid", "c-best", "a-unfinished"]


def test_every_column_sorts_and_an_unknown_one_is_refused(three_runs):
    for column in COLUMNS:
        assert sorted(names(sort_runs(three_runs, column))) == sorted(names(three_runs))
    with pytest.raises(UserError, match="cannot sort by 'auc'"):
        sort_runs(three_runs, "auc")


# -- the cache marker -----------------------------------------------------------------------------
def test_runs_on_a_minority_cache_are_marked(tmp_path):
    make_run(tmp_path / "one", fingerprint=CACHE_A, metrics=finished(0.7))
    make_run(tmp_path / "two", fingerprint=CACHE_A, metrics=finished(0.7))
    make_run(tmp_path / "three", fingerprint=CACHE_B, created="2026-12-01T00:00:00Z", metrics=finished(0.99))

    runs = list_runs(tmp_path)
    assert {run.name: run.other_cache for run in runs} == {"one": False, "two": False, "three": True}
    text = format_runs_table(runs, None)
    rows = parse_table(text)
    assert [rows[name]["cache"] for name in ("one", "two", "three")] == ["aaaaaaaa", "aaaaaaaa", "bbbbbbbb*"]
    assert "* trained on another cache than the reference (aaaaaaaa): do not compare its numbers" in text
    # an explicit reference wins over the one list_runs chose
    rows = parse_table(format_runs_table(runs, CACHE_B))
    assert [rows[name]["cache"] for name in ("one", "two", "three")] == ["aaaaaaaa*", "aaaaaaaa*", "bbbbbbbb"]


def test_a_tie_takes_the_newest_runs_cache_and_one_cache_marks_nothing(tmp_path):
    make_run(tmp_path / "a-old", fingerprint=CACHE_A, created="2026-01-01T00:00:00Z")
    make_run(tmp_path / "b-new", fingerprint=CACHE_B, created="2026-06-01T00:00:00Z")  # listed last
    assert {run.name: run.other_cache for run in list_runs(tmp_path)} == {"a-old": True, "b-new": False}

    (tmp_path / "b-new" / "config.json").unlink()
    (tmp_path / "b-new" / "state.json").unlink()
    text = format_runs_table(list_runs(tmp_path), None)
    assert "*" not in text and "reference cache (aaaaaaaa)" in text


def test_a_reference_cache_is_the_reference_even_for_a_minority(tmp_path, tiny_cache):
    with CacheReader(tiny_cache) as reader:
        tiny = reader.fingerprint
    make_run(tmp_path / "on-tiny", fingerprint=tiny, metrics=finished(0.6))
    make_run(tmp_path / "other-1", fingerprint=CACHE_A, metrics=finished(0.9))
    make_run(tmp_path / "other-2", fingerprint=CACHE_A, metrics=finished(0.9))

    runs = list_runs(tmp_path, reference_cache=tiny_cache)
    assert {run.name: run.other_cache for run in runs} == {"on-tiny": False, "other-1": True, "other-2": True}
    text = format_runs_table(runs, None)
    assert parse_table(text)["on-tiny"]["cache"] == tiny[:8]
    assert f"reference ({tiny[:8]})" in text
    with pytest.raises(UserError, match="no such cache file"):
        list_runs(tmp_path, reference_cache=tmp_path / "missing.h5")


def test_listing_runs_does_not_import_tensorflow():
    code = "import sys, train.rundir.listing; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_recipe_column_names_each_run_s_recipe_and_tutorial_for_runs_from_before_recipes(tmp_path):
    make_run(tmp_path / "old", metrics=finished(0.8))
    make_run(tmp_path / "new", metrics=finished(0.9), recipe="precise")
    make_run(tmp_path / "tut", metrics=finished(0.7), recipe="tutorial")
    rows = parse_table(format_runs_table(list_runs(tmp_path), None))
    assert {name: row["recipe"] for name, row in rows.items()} == {"old": "tutorial", "new": "precise",
                                                                     "tut": "tutorial"}
    ordered = sort_runs(list_runs(tmp_path), "recipe")
    assert [run.recipe for run in ordered] == ["precise", "tutorial", "tutorial"]
