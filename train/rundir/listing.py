"""`runs`: every run directory below a folder, side by side, with a mark on runs made on other data.

Only JSON files are read (config.json, state.json, metrics.json), never TensorFlow, so the
listing is instant. A run is any folder holding config.json; its own subfolders (tensorboard/)
are not searched, so the fold-K runs of a cross-validation are found below their parent.
A damaged run is listed as "damaged" with the reason in the footer, never a traceback.
Dates are UTC, as config.json records them.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from common.errors import UserError
from common.files import read_json
from preprocess.cache import CacheReader
from train.network.tasks import HEADLINE_METRICS
from train.rundir.layout import CONFIG, METRICS, kept_model_name, read_state, run_keep

log = logging.getLogger(__name__)

COLUMNS = ("run", "date", "status", "cache", "task", "recipe", "epochs", "batch", "lr", "padding", "width", "norm",
           "seed", "strategy", "val_auc", "learned", "test_auc", "test_acc", "kappa")
DESCENDING_BY_DEFAULT = ("date", "val_auc", "test_auc", "test_acc", "kappa")  # best or newest first
OPTIONAL_COLUMNS = ("strategy", "learned", "kappa")  # left out of the table when no run has a value
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class RunSummary:
    """What one run directory says about itself; None wherever a file is missing or says nothing."""

    path: Path
    name: str  # relative to the listed folder
    status: str  # "finished", "stopped early", "unfinished" or "damaged" (", cv fold" for a fold of `cv`)
    problem: str | None = None  # why the run is damaged
    created_utc: str | None = None  # e.g. "2026-11-22T18:00:00Z"
    cache_path: str | None = None
    cache_fingerprint: str | None = None
    reference_fingerprint: str | None = None  # the cache the listing compares against
    task: str | None = None
    recipe: str | None = None  # "tutorial" for runs made before recipes existed
    completed_epochs: int | None = None
    max_epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    padding: str | None = None
    width: float | None = None  # --width; 1 for runs from before it
    norm: str | None = None  # --norm; batch for runs from before it
    seed: int | None = None
    strategy: str | None = None
    best_epoch: int | None = None
    best_val_auc: float | None = None
    # the run's model against chance on the validation split (metrics.json's `learned`): "yes", "no", or
    # "cannot tell" (too few validation scans); None for a run made before the test, or a severity run
    learned: str | None = None
    test_auc: float | None = None  # macro AUC for severity runs
    test_accuracy: float | None = None
    test_kappa: float | None = None  # quadratic weighted kappa; severity runs only

    @property
    def other_cache(self) -> bool:
        """Trained on another cache than the reference: its numbers are not comparable."""
        return None not in (self.cache_fingerprint, self.reference_fingerprint) \
            and self.cache_fingerprint != self.reference_fingerprint


# -- finding and reading runs -------------------------------------------------------------------
def list_runs(root: Path, reference_cache: Path | None = None) -> list[RunSummary]:
    """Every run at or below `root`, by path, compared against `reference_cache` (None: the most used cache)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    runs = [read_run_summary(run_dir, root) for run_dir in find_run_dirs(root)]
    reference = find_reference_fingerprint(runs, reference_cache)
    return [replace(run, reference_fingerprint=reference) for run in runs]


def find_run_dirs(root: Path) -> list[Path]:
    """Folders at or below `root` holding config.json, sorted; hidden folders and a run's own subfolders are skipped."""
    found = []
    warn = lambda error: log.warning("skipped %s (%s)", error.filename, error.strerror)  # noqa: E731
    for folder, subfolders, files in os.walk(root, onerror=warn):
        if CONFIG in files:
            found.append(Path(folder))
            subfolders.clear()  # tensorboard/ and the like belong to the run
        else:
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    return sorted(found)


def find_reference_fingerprint(runs: list[RunSummary], reference_cache: Path | None = None) -> str | None:
    """The fingerprint of `reference_cache`, else the one most runs share (ties: the newest run's)."""
    if reference_cache is not None:
        with CacheReader(Path(reference_cache)) as reader:
            return reader.fingerprint
    counts = Counter(run.cache_fingerprint for run in runs if run.cache_fingerprint)
    newest = {fingerprint: max(run.created_utc or "" for run in runs if run.cache_fingerprint == fingerprint)
              for fingerprint in counts}
    return max(counts, key=lambda fingerprint: (counts[fingerprint], newest[fingerprint]), default=None)


def read_run_summary(run_dir: Path, root: Path) -> RunSummary:
    """One run's summary; a damaged file makes the status "damaged" and keeps what the other files say."""
    name = run_dir.relative_to(root).as_posix() if run_dir != root else str(root)
    values, problems, keep = {}, [], "best"
    try:
        config = read_json(run_dir / CONFIG)
        values.update(_config_values(config))
        keep = run_keep(config, run_dir)
    except UserError as error:
        problems.append(str(error))
    try:
        state = read_state(run_dir)
        values.update(completed_epochs=state.completed_epochs, best_epoch=state.best_epoch or None,
                      best_val_auc=_real(state.best_val_auc))
    except UserError as error:
        problems.append(str(error))
        state = None
    metrics = None
    if (run_dir / METRICS).exists():
        try:
            metrics = read_json(run_dir / METRICS)
        except UserError as error:
            problems.append(str(error))
    # a run resumed with more epochs keeps the test result of its earlier model until it finishes
    if metrics is not None and state is not None \
            and metrics.get("model", state.best_model) == kept_model_name(state, keep):
        if metrics.get("split", "test") == "test":
            values.update(_test_values(metrics, values.get("task")))
        if "learned" in metrics:  # a fold's too: it is a validation result
            values["learned"] = {True: "yes", False: "no", None: "cannot tell"}.get(metrics["learned"])
        # a cross-validation fold reports on its validation fold and never sees the test split:
        # its numbers are not test numbers (cv_summary.json has the folds' test report)
        status = "stopped early" if state.stopped_early else "finished"
        if str(metrics.get("split", "")).startswith("val (fold"):
            status = f"{status}, cv fold"
    else:
        status = "unfinished"
    if problems:
        status = "damaged"
    return RunSummary(path=run_dir, name=name, status=status, problem="; ".join(problems) or None, **values)


def _config_values(config: dict) -> dict:
    options, cache = config.get("options"), config.get("cache", {})
    if not isinstance(options, dict) or not isinstance(cache, dict):
        raise UserError(f"{CONFIG}: damaged (no 'options' or 'cache' object)")
    created = _text(config.get("created_utc"))
    return {
        "created_utc": created if created and parse_date(created) else None,
        "cache_path": _text(cache.get("path")),
        "cache_fingerprint": _text(cache.get("fingerprint")),
        "task": _text(options.get("task", "binary")),
        "recipe": _text(options.get("recipe", "tutorial")),
        "max_epochs": _whole(options.get("epochs")),
        "batch_size": _whole(options.get("batch_size")),
        "learning_rate": _real(options.get("learning_rate")),
        "padding": _text(options.get("padding")),
        "width": _real(options.get("width", 1.0)),  # a run from before --width trained width 1
        "norm": _text(options.get("norm", "batch")),  # and one from before --norm, BatchNorm
        "seed": _whole(options.get("seed")),
        "strategy": _text(options.get("strategy")),
    }


def _test_values(metrics: dict, task: str | None) -> dict:
    own_auc = HEADLINE_METRICS["severity" if task == "severity" else "binary"]["headline"][0]
    auc_names = sorted(("auc", "macro_auc"), key=lambda name: name != own_auc)  # its own first
    return {
        "test_auc": next((_real(metrics[key]) for key in auc_names if key in metrics), None),
        "test_accuracy": _real(metrics.get("accuracy")),
        "test_kappa": _real(metrics.get("quadratic_weighted_kappa")),
    }


def _whole(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _real(value) -> float | None:
    """A finite number, else None: an undefined AUC (one class only) is shown as missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_date(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, DATE_FORMAT)
    except ValueError:
        return None


# -- sorting ------------------------------------------------------------------------------------
_SORT_KEYS = {
    "run": lambda run: run.name,
    "date": lambda run: run.created_utc,  # one fixed format: text order is time order
    "status": lambda run: run.status,
    "cache": lambda run: run.cache_fingerprint,
    "task": lambda run: run.task,
    "recipe": lambda run: run.recipe,
    "epochs": lambda run: run.completed_epochs,
    "batch": lambda run: run.batch_size,
    "lr": lambda run: run.learning_rate,
    "padding": lambda run: run.padding,
    "width": lambda run: run.width,
    "norm": lambda run: run.norm or "",
    "seed": lambda run: run.seed,
    "strategy": lambda run: run.strategy,
    "val_auc": lambda run: run.best_val_auc,
    "learned": lambda run: {"no": 0, "cannot tell": 1, "yes": 2}.get(run.learned),  # those that learned nothing first
    "test_auc": lambda run: run.test_auc,
    "test_acc": lambda run: run.test_accuracy,
    "kappa": lambda run: run.test_kappa,
}


def sort_runs(runs: list[RunSummary], column: str, descending: bool | None = None) -> list[RunSummary]:
    """Runs ordered by a column of COLUMNS; AUCs, accuracy, kappa and date default to descending. Missing values go last."""
    if column not in _SORT_KEYS:
        raise UserError(f"cannot sort by {column!r}; choose one of {', '.join(COLUMNS)}")
    if descending is None:
        descending = column in DESCENDING_BY_DEFAULT
    key = _SORT_KEYS[column]
    present = [run for run in runs if key(run) is not None]
    missing = [run for run in runs if key(run) is None]
    return sorted(present, key=key, reverse=descending) + missing  # stable: ties keep their order
