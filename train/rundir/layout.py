"""The run directory: its file names, history, the resume state, its lock, and finding its model.

Every file is written atomically (see `common.files`). `state.json` is written last after each
epoch: it is the commit record of that epoch, it names the model files that belong to it, and
`--resume`, `evaluate` and `predict` trust nothing else. A hand-edited or hostile state.json is
refused before any file it names is opened.

Layout:
    config.json        options, the cache's attributes and fingerprint, versions, class weights, the machine
                       (CPU, kernels) the run began on
    history.csv        one row per completed epoch (epoch is 1-based)
    best-epoch-NNNN.keras  the model with the best validation AUC among the committed epochs
    last-epoch-NNNN.keras  the model and optimizer after the last completed epoch (for --resume)
    state.json         completed epochs, best epoch and AUC, early-stopping counter, and the
                       names of the two model files above (named by epoch, so a file that
                       state.json names is never overwritten in place)
    training_curves.png, metrics.json (test split, the run's model), tensorboard/
    roc_test.png, reliability_test.png  the test split's ROC curve and reliability diagram
    calibration.json   the temperature of the run's model, fitted on the validation split (`train.trust.calibration`)
    reference.json      what the training scans looked like, and the thresholds set on the validation split, for
                       predict's "is this scan like the training data?" (`train.trust.ood`)
    .lock              held by the `fit` that is writing the run (`train.rundir.folders`)
A cross-validation directory holds fold-1 ... fold-K, each a run directory, and cv_summary.json.
The run's model, the one `evaluate`, `predict`, `cv` and Grad-CAM use, is one of the two model
files: config.json's `keep` says which (`model_path`).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.errors import UserError, first_line
from common.files import (
    MAX_RUN_FILE_BYTES, TEMP_MARKER, read_json, write_json_atomically, write_text_atomically,
)

log = logging.getLogger(__name__)

CONFIG = "config.json"
HISTORY = "history.csv"
STATE = "state.json"
CURVES = "training_curves.png"
ROC_CURVE = "roc_{split}.png"  # fit: the test split (a cv fold: its validation fold); evaluate adds the cache's name
RELIABILITY = "reliability_{split}.png"  # the reliability diagram beside each ROC curve
METRICS = "metrics.json"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
LEGACY_BEST_MODEL = "best.keras"  # runs written before best models were named by epoch
MODEL_NAME = re.compile(r"(?:last|best)-epoch-\d{4,}\.keras")
MODEL_GLOBS = ("last-epoch-*.keras", "best-epoch-*.keras", LEGACY_BEST_MODEL)
KEEPS = ("best", "last")  # which of the two model files is the run's model (`fit --keep`)
# a cross-validation directory (`train cv`): its folds are run directories, its summary beside them
CV_SUMMARY = "cv_summary.json"
FOLD_DIR = re.compile(r"fold-(\d+)")


def fold_dir(run_dir: Path, fold: int) -> Path:
    """The run directory of fold `fold` (1-based) of a cross-validation directory."""
    return Path(run_dir) / f"fold-{fold}"


def fold_dirs(cv_dir: Path) -> list[Path]:
    """The fold run directories of a cross-validation directory, in fold order."""
    folds = [(int(match[1]), path) for path in Path(cv_dir).glob("fold-*") if (match := FOLD_DIR.fullmatch(path.name))]
    return [path for _, path in sorted(folds)]


def last_model_name(epoch: int) -> str:
    """The training-state file of a 1-based epoch, e.g. last-epoch-0007.keras."""
    return f"last-epoch-{epoch:04d}.keras"


def best_model_name(epoch: int) -> str:
    """The best-model file of a 1-based epoch, e.g. best-epoch-0005.keras."""
    return f"best-epoch-{epoch:04d}.keras"


def remove_other_models(run_dir: Path, keep: set[str]) -> None:
    """Delete model files other than `keep`: older epochs, or an epoch that was never committed."""
    for pattern in MODEL_GLOBS:
        for candidate in Path(run_dir).glob(pattern):
            if candidate.name not in keep:
                candidate.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary files a killed process left in the run directory (call with the lock held)."""
    for candidate in Path(run_dir).glob(f".*{TEMP_MARKER}*"):
        candidate.unlink(missing_ok=True)


# -- history ---------------------------------------------------------------------------------
def read_history(path: Path) -> list[dict]:
    """history.csv as rows of floats (epoch as int); no file means no epochs."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        if path.stat().st_size > MAX_RUN_FILE_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes")
        with path.open(newline="", encoding="utf-8") as file:
            rows = [
                {key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
                for row in csv.DictReader(file)
            ]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as error:
        raise UserError(f"{path}: not a history of this tool ({first_line(error)})") from None
    if not all("epoch" in row for row in rows):
        raise UserError(f"{path}: not a history of this tool (no epoch column)")
    return rows


def write_history(path: Path, rows: list[dict]) -> Path:
    """Rewrite the whole history (a few hundred short rows at most) atomically."""
    columns = ["epoch"] + sorted({key for row in rows for key in row} - {"epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in columns})
    return write_text_atomically(path, buffer.getvalue())


# -- resume state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingState:
    """What `--resume` needs besides the model: how far the run got and the early-stop counter."""

    completed_epochs: int = 0
    best_epoch: int = 0  # 1-based; 0 before the first epoch with a finite val AUC
    best_val_auc: float = -math.inf
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    # states of the model's random generators (dropout): .keras files do not keep them, and a
    # resumed run must draw the same dropout masks as an uninterrupted one
    random_generator_states: tuple = ()
    last_model: str = ""  # file names in the run directory; empty before the first epoch
    best_model: str = ""


def read_state(run_dir: Path) -> TrainingState:
    """The committed state of a run (none yet: the initial state); a hand-edited or hostile file is refused."""
    path = Path(run_dir) / STATE
    if not path.exists():
        return TrainingState()
    document = read_json(path)
    problem = _state_problem(document)
    if problem:
        raise UserError(f"{path}: not a training state of this tool ({problem})")
    if document.get("best_val_auc") is None:
        document["best_val_auc"] = -math.inf
    document["random_generator_states"] = tuple(tuple(state) for state in document.get("random_generator_states", ()))
    if "best_model" not in document and document.get("completed_epochs"):
        document["best_model"] = LEGACY_BEST_MODEL
    return TrainingState(**document)


def _is_whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _state_problem(document: dict) -> str | None:
    """What makes `document` not a state.json this tool wrote, or None."""
    unknown = sorted(set(document) - {field.name for field in fields(TrainingState)})
    if unknown:
        return f"unknown field {unknown[0][:50]!r}"
    for name in ("completed_epochs", "best_epoch", "epochs_without_improvement"):
        if not _is_whole(document.get(name, 0), 0, 2**31):
            return f"{name} must be a whole number >= 0"
    auc = document.get("best_val_auc")
    if auc is not None and (isinstance(auc, bool) or not isinstance(auc, (int, float))):
        return "best_val_auc must be a number"
    if not isinstance(document.get("stopped_early", False), bool):
        return "stopped_early must be true or false"
    states = document.get("random_generator_states", [])
    if not isinstance(states, list) or not all(
        isinstance(state, list) and all(_is_whole(number, -2**63, 2**64) for number in state) for state in states
    ):
        return "random_generator_states must be lists of integers"
    completed = document.get("completed_epochs", 0)
    if document.get("best_epoch", 0) > completed:
        return "best_epoch is after the last completed epoch"
    expected_last = last_model_name(completed) if completed else ""
    if document.get("last_model", "") != expected_last:
        return f"last_model must be {expected_last!r}"
    best_model = document.get("best_model", "")
    if not isinstance(best_model, str) or (best_model and not (MODEL_NAME.fullmatch(best_model)
                                                               or best_model == LEGACY_BEST_MODEL)):
        return "best_model must name a model file in the run directory"
    if bool(best_model) != bool(completed) and "best_model" in document:
        return "best_model must be named exactly when an epoch is completed"
    return None


def write_state(run_dir: Path, state: TrainingState) -> Path:
    return write_json_atomically(Path(run_dir) / STATE, asdict(state))


# -- finished runs ---------------------------------------------------------------------------
def open_run(run_dir: Path) -> dict:
    """The config of a run directory that holds a trained model, or a one-line UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir}: not a run directory of `python -m train fit` (no {CONFIG})")
    config = read_json(run_dir / CONFIG)
    for section in ("options", "preprocessing", "cache"):
        if not isinstance(config.get(section, {}), dict):
            raise UserError(f"{run_dir / CONFIG}: damaged ({section!r} is not an object)")
    model_path(run_dir)  # refuse a run without a model before anything slow happens
    return config


def run_keep(config: dict, run_dir: Path) -> str:
    """Which of its two models a run serves: config.json's --keep ("best" for a run from before the option)."""
    options = config.get("options")
    keep = options.get("keep", "best") if isinstance(options, dict) else "best"
    if keep not in KEEPS:
        raise UserError(f"{Path(run_dir) / CONFIG}: damaged (keep must be 'best' or 'last', got {str(keep)[:50]!r})")
    return keep


def kept_model_name(state: TrainingState, keep: str) -> str:
    """The file of the run's model in `state`: its last epoch's (keep "last") or its best validation AUC's."""
    return state.last_model if keep == "last" else state.best_model


def model_path(run_dir: Path) -> Path:
    """The run's model: of the two files state.json names, the one config.json's --keep chooses."""
    run_dir = Path(run_dir)
    keep = run_keep(read_json(run_dir / CONFIG), run_dir) if (run_dir / CONFIG).is_file() else "best"
    name = kept_model_name(read_state(run_dir), keep)
    if not name and (run_dir / LEGACY_BEST_MODEL).is_file() and not (run_dir / STATE).exists():
        name = LEGACY_BEST_MODEL
    if not name:
        raise UserError(f"{run_dir}: the run has no model yet (its first epoch has not finished)")
    if not (run_dir / name).is_file():
        what = "the last epoch's model" if keep == "last" else "the best model"
        raise UserError(f"{run_dir}: {name}, {what} {STATE} names, is missing; the run directory was "
                        "changed by hand")
    return run_dir / name
