"""The run directory: its file names, atomic writes, config, history and the resume state.

Every file is written to a temporary file in the same folder and moved into place with
`os.replace`, so a reader (or a killed run's `--resume`) sees the old file or the new one,
never half of one. `state.json` is written last after each epoch: it is the commit record of
that epoch, and `--resume` trusts nothing later than it.

Layout:
    config.json        options, the cache's attributes and fingerprint, versions, class weights
    history.csv        one row per completed epoch (epoch is 1-based)
    best.keras         the model with the best validation AUC so far (native Keras format)
    last-epoch-NNNN.keras  the model and optimizer after the last completed epoch (for --resume);
                       named by epoch, so the one state.json names is never overwritten in place
    state.json         completed epochs, best epoch and AUC, early-stopping counter, last model
    training_curves.png, metrics.json (test split, best model), tensorboard/
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess.errors import UserError

log = logging.getLogger(__name__)

CONFIG = "config.json"
HISTORY = "history.csv"
BEST_MODEL = "best.keras"
LAST_MODEL_GLOB = "last-epoch-*.keras"
STATE = "state.json"
CURVES = "training_curves.png"
METRICS = "metrics.json"
TENSORBOARD = "tensorboard"
TEMP_MARKER = ".tmp-"


def last_model_name(epoch: int) -> str:
    """The training-state file of a 1-based epoch, e.g. last-epoch-0007.keras."""
    return f"last-epoch-{epoch:04d}.keras"


def remove_other_last_models(run_dir: Path, keep: str) -> None:
    """Delete training-state files other than `keep` (older epochs, or one that was never committed)."""
    for candidate in Path(run_dir).glob(LAST_MODEL_GLOB):
        if candidate.name != keep:
            candidate.unlink(missing_ok=True)


def default_run_dir(now: float | None = None) -> Path:
    """runs/<local timestamp>, e.g. runs/20250131-142501."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


def replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` and move the result to `path` in one rename.

    The temporary file sits in the same folder (a rename is atomic only within a file system)
    and keeps `path`'s suffix, because some writers (Keras, matplotlib) choose the format by it.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}{TEMP_MARKER}{os.getpid()}{path.suffix}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomically(path: Path, text: str) -> Path:
    return replace_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomically(path: Path, document) -> Path:
    """JSON with NaN and infinity written as null, so any JSON reader accepts it."""
    return write_text_atomically(path, json.dumps(_finite(document), indent=2, sort_keys=True) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary files a killed process left in the run directory."""
    for candidate in Path(run_dir).glob(f".*{TEMP_MARKER}*"):
        candidate.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a JSON object")
    return document


# -- history ---------------------------------------------------------------------------------
def read_history(path: Path) -> list[dict]:
    """history.csv as rows of floats (epoch as int); no file means no epochs."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        return [
            {key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
            for row in csv.DictReader(file)
        ]


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
    best_epoch: int = 0  # 1-based; 0 before the first epoch
    best_val_auc: float = -math.inf
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    # states of the model's random generators (dropout): .keras files do not keep them, and a
    # resumed run must draw the same dropout masks as an uninterrupted one
    random_generator_states: tuple = ()
    last_model: str = ""  # file name in the run directory; empty before the first epoch


def read_state(run_dir: Path) -> TrainingState:
    path = Path(run_dir) / STATE
    if not path.exists():
        return TrainingState()
    document = read_json(path)
    if document.get("best_val_auc") is None:
        document["best_val_auc"] = -math.inf
    document["random_generator_states"] = tuple(
        tuple(state) for state in document.get("random_generator_states", ())
    )
    try:
        return TrainingState(**document)
    except TypeError as error:
        raise UserError(f"{path}: not a training state of this tool ({error})") from None


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
    if not (run_dir / BEST_MODEL).is_file():
        raise UserError(f"{run_dir}: the run has no model yet ({BEST_MODEL} is written after its first epoch)")
    return read_json(run_dir / CONFIG)
