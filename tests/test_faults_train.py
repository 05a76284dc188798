"""Fault injection against the training stage: real kills, real OS limits, hostile caches and runs, load.

Every fault is real: `fit` runs in a subprocess and is killed with SIGKILL, the file-size limit is
`setrlimit(RLIMIT_FSIZE)` in the child, the full disk is a real tmpfs, hostile files are written
byte by byte, and concurrent processes really run at once.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras model.save

from conftest import ROOT, TINY_SHAPE  # noqa: E402
from common.cli import EXIT_INTERRUPTED  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.files import read_json  # noqa: E402
from preprocess.cache import CacheReader  # noqa: E402
from preprocess.preprocessing import Preprocessing  # noqa: E402
from train.__main__ import main  # noqa: E402
from train.fit import fit_model  # noqa: E402
from train.options import FitOptions  # noqa: E402
from train.rundir.models import load_trained_model  # noqa: E402
from train.rundir.layout import (  # noqa: E402
    model_path, open_run, read_history, read_state, run_keep,
)
from train.rundir.folders import create_new_run_dir, locked_run_dir  # noqa: E402

EPOCHS = 4
# the tool's own TensorFlow log level (train/__main__.py sets 2 unless told otherwise): what users see
ENVIRONMENT = {**{name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"},
               "PYTHONPATH": str(ROOT)}
ERROR_PREFIX = re.compile(r"python -m train( [a-z-]+)?: error: ")  # argparse adds the command


def fit_command(cache: Path, run_dir: Path | None, *flags: str, epochs: int = EPOCHS) -> list[str]:
    run_dir_flags = ["--run-dir", str(run_dir)] if run_dir is not None else []
    return [sys.executable, "-m", "train", "fit", str(cache), *run_dir_flags, "--epochs", str(epochs),
            "--padding", "same", "--quiet", *flags]


def run_fit(cache: Path, run_dir: Path, *flags: str, epochs: int = EPOCHS, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(fit_command(cache, run_dir, *flags, epochs=epochs), cwd=kwargs.pop("cwd", ROOT),
                          env=ENVIRONMENT, capture_output=True, text=True, timeout=kwargs.pop("timeout", 600), **kwargs)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    prefix = ERROR_PREFIX.match(lines[0])
    assert prefix, lines[0]
    return lines[0][prefix.end():]


def temporaries(run_dir: Path) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if ".tmp-" in name) if run_dir.exists() else []


def model_files(run_dir: Path) -> list[str]:
    return sorted(path.name for path in run_dir.glob("*.keras") if not path.name.startswith("."))


@pytest.fixture(scope="module")
def reference_run(tiny_cache, tmp_path_factory) -> Path:
    """An uninterrupted EPOCHS-epoch run with the defaults the faults below use (read-only)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    fit_model(FitOptions(cache=tiny_cache, run_dir=run_dir, epochs=EPOCHS, padding="same", quiet=True))
    return run_dir


# -- 1. killed training -----------------------------------------------------------------------------
def start_fit_and_kill_when(command: list[str], run_dir: Path, should_kill, timeout_seconds: float = 300,
                            signal_number: int = signal.SIGKILL) -> tuple[int, list[str], str]:
    """Start `fit`; send it the signal the moment should_kill(names in run_dir, seconds since start) is true.

    Returns (exit code, the temporary files it left: the writes it was in, its stderr).
    """
    process = subprocess.Popen(command, cwd=ROOT, env=ENVIRONMENT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    start, signalled = time.monotonic(), False
    try:
        while process.poll() is None:
            elapsed = time.monotonic() - start
            assert elapsed < timeout_seconds, "fit neither finished nor reached the kill point"
            try:
                names = os.listdir(run_dir)
            except FileNotFoundError:
                names = []
            if should_kill(names, elapsed):
                process.send_signal(signal_number)
                signalled = True
                break
            time.sleep(0.0005)
    finally:
        if not signalled and process.poll() is None:  # the test failed: do not leave fit running
            process.kill()
        _, stderr = process.communicate(timeout=120)
    if process.returncode not in (0, -signal_number, EXIT_INTERRUPTED):
        pytest.fail(f"fit failed on its own (exit {process.returncode}):\n{stderr}")
    return process.returncode, temporaries(run_dir), stderr


def writing(prefix: str):
    """Kill condition: a temporary file of `prefix` exists, e.g. '.state' for state.json."""
    return lambda names, elapsed: any(name.startswith(f"{prefix}.tmp-") for name in names)


def check_run_after_kill(run_dir: Path) -> int:
    """Everything committed is intact: files parse, every model loads, state names existing files.

    Returns the number of committed epochs.
    """
    if not (run_dir / "config.json").exists():  # killed before the run existed: nothing to lose
        assert not run_dir.exists() or not model_files(run_dir)
        return 0
    read_json(run_dir / "config.json")
    state = read_state(run_dir)
    done = state.completed_epochs
    epochs = [row["epoch"] for row in read_history(run_dir / "history.csv")]
    assert epochs in (list(range(1, done + 1)), list(range(1, done + 2))), (epochs, done)
    for name in model_files(run_dir):  # committed or not, no model file is ever half-written
        load_trained_model(run_dir / name)
    if done:
        assert state.last_model == f"last-epoch-{done:04d}.keras" and (run_dir / state.last_model).is_file()
        # evaluate and predict use the committed model --keep names, never one of an uncommitted epoch
        keep = run_keep(read_json(run_dir / "config.json"), run_dir)
        assert model_path(run_dir) == run_dir / (state.last_model if keep == "last" else state.best_model)
        assert int(state.best_model[len("best-epoch-"):-len(".keras")]) <= done
    else:
        with pytest.raises(UserError, match="no model yet"):
            model_path(run_dir)
    return done


def check_finished_like_the_reference(run_dir: Path, reference: Path) -> None:
    """A run that was killed and resumed ends exactly where an uninterrupted one does."""
    history = read_history(run_dir / "history.csv")
    expected = read_history(reference / "history.csv")
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1)), "no gap, no duplicate"
    for row, reference_row in zip(history, expected):
        for metric in ("loss", "val_loss", "val_auc"):
            assert row[metric] == pytest.approx(reference_row[metric], rel=1e-5), (row["epoch"], metric)
    state, reference_state = read_state(run_dir), read_state(reference)
    assert (state.best_epoch, state.best_model) == (reference_state.best_epoch, reference_state.best_model)
    assert not temporaries(run_dir), "leftover temporary files are removed on --resume"
    assert model_files(run_dir) == sorted({state.best_model, state.last_model})
    metrics, reference_metrics = read_json(run_dir / "metrics.json"), read_json(reference / "metrics.json")
    assert run_dir / metrics["model"] == model_path(run_dir) and metrics["best_epoch"] == state.best_epoch
    assert metrics["confusion_matrix"] == reference_metrics["confusion_matrix"]


@pytest.mark.slow
def test_sigkill_during_a_model_write_and_during_the_commit_loses_nothing(tiny_cache, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    # 1: in the middle of writing epoch 2's model (a 16 MB file): epoch 1 stays the committed one
    code, left, _ = start_fit_and_kill_when(fit_command(tiny_cache, run_dir), run_dir, writing(".last-epoch-0002"))
    assert code == -signal.SIGKILL and left and left[0].startswith(".last-epoch-0002.tmp-"), left
    assert check_run_after_kill(run_dir) == 1
    # 2: resumed, then killed while state.json (the commit record) is being written: the epoch's
    # models and history row exist, but it is not committed; up to 12 tries, as that write takes a few
    # milliseconds (5 tries all missed it once in a full `make test` on a 2-core VM)
    resume = fit_command(tiny_cache, run_dir, "--resume")
    for _ in range(12):
        code, left, _ = start_fit_and_kill_when(resume, run_dir, writing(".state"))
        if code == 0:  # every write of state.json was too short for the poll to see, and the run ended:
            shutil.rmtree(run_dir)  # start it again, killed in epoch 2 as above, and try once more
            code, left, _ = start_fit_and_kill_when(fit_command(tiny_cache, run_dir), run_dir,
                                                    writing(".last-epoch-0002"))
            assert code == -signal.SIGKILL and check_run_after_kill(run_dir) == 1
            continue
        assert code == -signal.SIGKILL
        done = check_run_after_kill(run_dir)
        if any(name.startswith(".state.tmp-") for name in left):
            # the uncommitted epoch's model is on disk, and (checked above) nothing uses it
            assert f"last-epoch-{done + 1:04d}.keras" in model_files(run_dir)
            break
    else:
        pytest.fail("no kill landed inside a write of state.json")
    assert main(["evaluate", str(run_dir), str(tiny_cache)]) == 0  # the killed run's committed best model
    finished = run_fit(tiny_cache, run_dir, "--resume")
    assert finished.returncode == 0, finished.stderr
    check_finished_like_the_reference(run_dir, reference_run)


@pytest.mark.slow
def test_ctrl_c_during_a_model_write_exits_130_with_one_line_and_leaves_no_temporary_file(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    code, left, stderr = start_fit_and_kill_when(fit_command(tiny_cache, run_dir), run_dir,
                                                 writing(".last-epoch-0002"), signal_number=signal.SIGINT)
    assert code == EXIT_INTERRUPTED and not left
    assert stderr.strip().splitlines() == [
        "python -m train: interrupted; the run keeps its last completed epoch: continue it with --resume"]
    assert check_run_after_kill(run_dir) == 1


@pytest.mark.veryslow
def test_sigkill_during_every_kind_of_write(tiny_cache, reference_run, tmp_path):
    """One kill inside each file's write, in turn: config, models, history, state, curves, metrics."""
    # (the best model is a hard link to the epoch's model: too quick to kill inside; the kills
    # inside .history and .state land after it, with an uncommitted best-epoch file on disk)
    targets = [".config", ".last-epoch-0001", ".history", ".state", ".last-epoch-0003", ".training_curves",
               ".metrics"]
    run_dir, caught = tmp_path / "run", {}
    for target in targets:
        resume = ["--resume"] if (run_dir / "config.json").exists() else []
        code, left, _ = start_fit_and_kill_when(fit_command(tiny_cache, run_dir, *resume), run_dir, writing(target))
        caught[target] = code == -signal.SIGKILL and any(name.startswith(f"{target}") for name in left)
        check_run_after_kill(run_dir)
        if code == 0:  # finished before the target came up: start the chain again
            shutil.rmtree(run_dir)
    finished = run_fit(tiny_cache, run_dir, *(["--resume"] if (run_dir / "config.json").exists() else []))
    assert finished.returncode == 0, finished.stderr
    check_finished_like_the_reference(run_dir, reference_run)
    print(f"SIGKILL inside the write of: {caught}; 0 runs lost")
    assert sum(caught.values()) >= len(targets) - 1, caught


@pytest.mark.veryslow
def test_ten_random_sigkills_of_fit_lose_no_run(tiny_cache, reference_run, tmp_path):
    start = time.monotonic()
    assert run_fit(tiny_cache, tmp_path / "timing").returncode == 0
    duration = time.monotonic() - start
    delays = np.random.default_rng(10).uniform(0.2, duration * 0.9, size=10).tolist()
    runs, outcomes = [tmp_path / "run-1"], {"before config.json": 0, "inside a write": 0, "between writes": 0,
                                             "after the end": 0}
    for delay in delays:
        run_dir = runs[-1]
        resume = ["--resume"] if (run_dir / "config.json").exists() else []
        code, left, _ = start_fit_and_kill_when(fit_command(tiny_cache, run_dir, *resume), run_dir,
                                             lambda names, elapsed, delay=delay: elapsed >= delay)
        check_run_after_kill(run_dir)
        if code == 0:
            outcomes["after the end"] += 1
            runs.append(tmp_path / f"run-{len(runs) + 1}")
        elif not (run_dir / "config.json").exists():
            outcomes["before config.json"] += 1
        else:
            outcomes["inside a write" if left else "between writes"] += 1
    for run_dir in runs:
        resume = ["--resume"] if (run_dir / "config.json").exists() else []
        finished = run_fit(tiny_cache, run_dir, *resume)
        assert finished.returncode == 0, finished.stderr
        check_finished_like_the_reference(run_dir, reference_run)
    print(f"10 random SIGKILLs of fit: 0 runs lost (kills landed {outcomes}; {len(runs)} run directories)")


# -- 2. file too large, disk full ----------------------------------------------------------------
def limit_file_size(limit_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.slow
def test_file_size_limit_stops_fit_with_one_line_and_resume_finishes_later(tiny_cache, reference_run, tmp_path):
    # the run directory's parents do not exist yet: fit creates them (mkdir -p)
    run_dir = tmp_path / "new" / "parents" / "run"
    limited = run_fit(tiny_cache, run_dir, preexec_fn=limit_file_size(2**20))  # 1 MiB: the first model fails
    assert limited.returncode == 1
    assert one_error_line(limited.stderr) == (
        f"could not write {run_dir}/last-epoch-0001.keras: File too large; no epoch was committed yet; "
        "continue the run with --resume once there is room")
    assert not temporaries(run_dir) and not model_files(run_dir)
    assert read_json(run_dir / "config.json")["options"]["epochs"] == EPOCHS
    finished = run_fit(tiny_cache, run_dir, "--resume")  # the limit is gone
    assert finished.returncode == 0, finished.stderr
    check_finished_like_the_reference(run_dir, reference_run)


@pytest.fixture
def small_filesystem(tmp_path):
    """mount(size) -> a real tmpfs of that many bytes (needs root; otherwise a skip). Unmounted after."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.slow
def test_disk_full_at_a_later_epoch_keeps_the_last_good_checkpoint(tiny_cache, reference_run, small_filesystem):
    model_bytes = (reference_run / read_state(reference_run).last_model).stat().st_size
    # room for epoch 1's model (the best model is a hard link to it) and the small files, not for epoch 2's
    disk = small_filesystem(int(model_bytes * 1.5))
    run_dir = disk / "run"
    full = run_fit(tiny_cache, run_dir)
    assert full.returncode == 1
    assert one_error_line(full.stderr) == (
        f"could not write {run_dir}/last-epoch-0002.keras: No space left on device; the run's last good checkpoint "
        "(epoch 1) is kept; continue it with --resume once there is room")
    assert check_run_after_kill(run_dir) == 1 and not temporaries(run_dir)
    subprocess.run(["mount", "-o", f"remount,size={model_bytes * 4}", str(disk)], check=True)  # room again
    finished = run_fit(tiny_cache, run_dir, "--resume")
    assert finished.returncode == 0, finished.stderr
    check_finished_like_the_reference(run_dir, reference_run)


@pytest.mark.slow
def test_tensorboard_logs_that_cannot_be_written_stop_fit_with_one_line(run_copy, tiny_cache, capsys):
    shutil.rmtree(run_copy / "tensorboard")
    (run_copy / "tensorboard").write_text("a file where the folder should be")
    code = main(["fit", str(tiny_cache), "--run-dir", str(run_copy), "--padding", "same", "--epochs", str(EPOCHS + 1),
                 "--resume", "--quiet"])
    assert code == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"could not write the TensorBoard logs: {run_copy}/tensorboard is not a directory; the run is committed up to "
        f"epoch {EPOCHS + 1}; continue it with --resume once they can be written")
    assert check_run_after_kill(run_copy) == EPOCHS + 1 and not temporaries(run_copy)


# -- 3. unwritable output ------------------------------------------------------------------------
@pytest.mark.parametrize("make_run_dir, message", [
    (lambda tmp: tmp / "a_file" / "run", "a_file is a file, not a folder"),
    (lambda tmp: tmp / "a_file" / "deeper" / "run", "a_file is a file, not a folder"),
    (lambda tmp: tmp / "a_file", "is a file, not a folder"),
    (lambda tmp: tmp / "other", "is not empty (notes.txt) and holds no run"),
])
def test_an_unusable_run_directory_is_one_line_and_nothing_is_written(tiny_cache, tmp_path, capsys, make_run_dir,
                                                                       message):
    (tmp_path / "a_file").write_text("I am a file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone else's folder")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    code = main(["fit", str(tiny_cache), "--run-dir", str(make_run_dir(tmp_path)), "--padding", "same"])
    error = capsys.readouterr().err
    assert code == 1 and message in one_error_line(error)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_default_run_directories_never_collide(tmp_path):
    base = tmp_path / "runs" / "20260101-120000"
    made = [create_new_run_dir(base) for _ in range(3)]
    assert [path.name for path in made] == ["20260101-120000", "20260101-120000-2", "20260101-120000-3"]


LOCK_HOLDER = """
import sys
from pathlib import Path
from train.rundir.folders import locked_run_dir
with locked_run_dir(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_run_directory_in_use_by_another_fit_is_refused(tiny_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], cwd=ROOT, env=ENVIRONMENT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        arguments = ["fit", str(tiny_cache), "--run-dir", str(run_dir), "--padding", "same"]
        assert main(arguments) == 1
        assert f"{run_dir} is in use by another `python -m train fit` (pid {holder.pid})" in \
            one_error_line(capsys.readouterr().err)
        (run_dir / "config.json").write_text("{}")
        assert main([*arguments, "--resume"]) == 1
        assert "is in use by another" in one_error_line(capsys.readouterr().err)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with locked_run_dir(run_dir):  # released when its holder exits
        pass


# -- 4. hostile caches -----------------------------------------------------------------------------
def copy_of(cache: Path, folder: Path, edit=None) -> Path:
    path = Path(shutil.copy(cache, folder / "damaged.h5"))
    if edit is not None:
        with h5py.File(path, "r+") as file:
            edit(file)
    return path


def replace_dataset(name: str, make):
    def edit(file):
        data = file[name][:]
        del file[name]
        file.create_dataset(name, data=make(data))
    return edit


STRUCTURE_DAMAGES = {
    "volumes of another shape": (replace_dataset("volumes", lambda data: data[:, :, :, :8]), "expected float32"),
    "volumes as float64": (replace_dataset("volumes", lambda data: data.astype(np.float64)), "float64"),
    "split index out of range": (lambda file: file["splits/test"].__setitem__(0, 10**6), "outside"),
    "labels outside 0, 1": (lambda file: file["labels"].__setitem__(0, 9), "labels"),
    "a table with fewer rows": (replace_dataset("labels", lambda data: data[:-1]), "rows"),
}


@pytest.mark.parametrize("damage", ["volumes of another shape", "volumes as float64", "split index out of range"])
def test_fit_refuses_a_hostile_cache_in_a_real_process_before_training(tiny_cache, tmp_path, damage):
    edit, fragment = STRUCTURE_DAMAGES[damage]
    cache = copy_of(tiny_cache, tmp_path, edit)
    result = run_fit(cache, tmp_path / "run")
    assert result.returncode == 1 and fragment in one_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", STRUCTURE_DAMAGES)
@pytest.mark.parametrize("command", ["fit", "evaluate", "bench-input"])
def test_every_command_refuses_a_hostile_cache_with_one_line(reference_run, tiny_cache, tmp_path, capsys, command,
                                                            damage):
    edit, fragment = STRUCTURE_DAMAGES[damage]
    cache = copy_of(tiny_cache, tmp_path, edit)
    arguments = {"fit": ["fit", str(cache), "--run-dir", str(tmp_path / "run"), "--padding", "same"],
                 "evaluate": ["evaluate", str(reference_run), str(cache)],
                 "bench-input": ["bench-input", str(cache), "--samples", "4"]}[command]
    assert main(arguments) == 1
    assert fragment in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def overwrite_chunk(path: Path, row: int, values: np.ndarray) -> None:
    """Write float32 values over a row's chunk in the file itself, as a bad disk block would."""
    with h5py.File(path, "r") as file:
        chunk = file["volumes"].id.get_chunk_info(row)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(np.resize(values.astype(np.float32), chunk.size // 4).tobytes())


DATA_DAMAGES = {
    "NaN": np.array([np.nan]),
    "values above 1": np.array([0.5, 3.0]),
    "random bytes": np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint32).view(np.float32),
}


@pytest.fixture
def damaged_train_row(tiny_cache, tmp_path):
    """(a copy of the tiny cache whose first training row holds NaN, that row)."""
    with CacheReader(tiny_cache) as reader:
        row = int(reader.split("train")[0])
    cache = copy_of(tiny_cache, tmp_path)
    overwrite_chunk(cache, row, DATA_DAMAGES["NaN"])
    return cache, row


@pytest.mark.slow
def test_fit_and_evaluate_stop_at_a_damaged_volume_with_one_line_in_a_real_process(damaged_train_row, reference_run,
                                                                                   tmp_path):
    cache, row = damaged_train_row
    expected = f"{cache}: row {row} holds values outside [0, 1] (min nan"
    result = run_fit(cache, tmp_path / "run", timeout=120)
    assert result.returncode == 1 and one_error_line(result.stderr).startswith(expected)
    assert not model_files(tmp_path / "run") and not temporaries(tmp_path / "run")
    # and the process ends: a failed pipeline left for the interpreter's exit would hang it
    result = subprocess.run([sys.executable, "-m", "train", "evaluate", str(reference_run), str(cache), "--split",
                             "train"], cwd=ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and one_error_line(result.stderr).startswith(expected)


@pytest.mark.parametrize("damage", DATA_DAMAGES)
@pytest.mark.parametrize("command", ["evaluate", "bench-input"])
def test_damaged_volume_data_is_never_used_silently(reference_run, tiny_cache, tmp_path, capsys, command, damage):
    with CacheReader(tiny_cache) as reader:
        row = int(reader.split("train")[0])
    cache = copy_of(tiny_cache, tmp_path)
    overwrite_chunk(cache, row, DATA_DAMAGES[damage])
    arguments = {"evaluate": ["evaluate", str(reference_run), str(cache), "--split", "train"],
                 "bench-input": ["bench-input", str(cache), "--samples", "4"]}[command]
    assert main(arguments) == 1
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"{cache}: row {row} holds values outside [0, 1]") and "rebuild" in error


def test_an_unreadable_chunk_is_one_line_naming_the_row(reference_run, tiny_cache, tmp_path, capsys):
    """A gzip-compressed cache (valid to the schema) whose chunk is corrupt: h5py's read fails."""
    cache = tmp_path / "compressed.h5"
    with h5py.File(tiny_cache, "r") as source, h5py.File(cache, "w") as target:
        for name, value in source.attrs.items():
            target.attrs[name] = value
        for name in source:
            if name != "volumes":
                source.copy(source[name], target, name=name)
        target.create_dataset("volumes", data=source["volumes"][:], chunks=source["volumes"].chunks,
                              compression="gzip")
        row = int(source["splits/test"][0])
        chunk = target["volumes"].id.get_chunk_info(row)
    data = bytearray(cache.read_bytes())
    data[chunk.byte_offset + chunk.size // 2: chunk.byte_offset + chunk.size // 2 + 64] = b"\xff" * 64
    cache.write_bytes(bytes(data))
    assert main(["evaluate", str(reference_run), str(cache)]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f"{cache}: row {row} cannot be read (")


# -- 4b. hostile run directories -------------------------------------------------------------------
@pytest.fixture
def run_copy(reference_run, tmp_path) -> Path:
    return Path(shutil.copytree(reference_run, tmp_path / "run"))


def test_a_run_model_with_a_lambda_layer_is_refused_by_evaluate_and_predict(run_copy, tiny_cache, synthetic_raw,
                                                                            capsys):
    inputs = keras.Input((*TINY_SHAPE, 1))
    outputs = keras.layers.Lambda(lambda volume: keras.ops.mean(volume, axis=(1, 2, 3)))(inputs)
    best = model_path(run_copy)
    best.unlink()  # may be a hard link to the other model: replace, do not write through it
    keras.Model(inputs, outputs).save(best)
    scan = next(synthetic_raw.rglob("*.nii.gz"))
    for arguments in (["evaluate", str(run_copy), str(tiny_cache)], ["predict", str(run_copy), str(scan)]):
        assert main(arguments) == 1
        assert f"{best}: refusing to load this model (Requested the deserialization of a `Lambda` layer" in \
            one_error_line(capsys.readouterr().err)


class CreatesAFileWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["config.json", "state.json", "history.csv"])
def test_nothing_in_a_run_directory_is_ever_unpickled(run_copy, tiny_cache, synthetic_raw, tmp_path, capsys, name):
    marker = tmp_path / "unpickled"
    (run_copy / name).write_bytes(pickle.dumps(CreatesAFileWhenUnpickled(str(marker))))
    scan = next(synthetic_raw.rglob("*.nii.gz"))
    commands = [["fit", str(tiny_cache), "--run-dir", str(run_copy), "--padding", "same", "--epochs", str(EPOCHS),
                 "--resume"], ["evaluate", str(run_copy), str(tiny_cache)], ["predict", str(run_copy), str(scan)]]
    refused = 0
    for arguments in commands:
        code = main(arguments)
        captured = capsys.readouterr()
        if code == 1:  # history.csv is not read by evaluate and predict: they succeed
            one_error_line(captured.err)
            refused += 1
    assert refused >= 1 and not marker.exists()


FORBIDDEN_CALLS = [r"\bpickle\b", r"\bjoblib\b", r"np\.load\(", r"numpy\.load\(", r"allow_pickle", r"\bmarshal\b",
                   r"\bshelve\b", r"\bdill\b", r"\beval\(", r"\bexec\(", r"yaml\.load\(", r"torch\.load\(",
                   r"safe_mode\s*=\s*False", r"enable_unsafe_deserialization"]


def test_the_training_code_has_no_way_to_unpickle_or_run_stored_code():
    sources = {path.relative_to(ROOT).as_posix(): path.read_text()
               for folder in ("train", "common") for path in (ROOT / folder).rglob("*.py")}
    assert len(sources) > 30  # the subpackages are searched too
    for name, text in sources.items():
        for pattern in FORBIDDEN_CALLS:
            assert not re.search(pattern, text), f"{name} matches {pattern}"
        for call in re.findall(r"load_model\((.*?)\)", text, re.DOTALL):
            assert "safe_mode=True" in call, f"{name}: load_model({call}) without safe_mode=True"
    # every model file is opened by one function, train.rundir.models.load_trained_model
    assert [name for name, text in sources.items() for _ in range(text.count("keras.saving.load_model("))] \
        == ["train/rundir/models.py"]


@pytest.mark.parametrize("state_changes, fragment", [
    ({"best_model": "../elsewhere/best-epoch-0001.keras"}, "best_model must name a model file"),
    ({"best_model": "/etc/passwd"}, "best_model must name a model file"),
    ({"last_model": "../last-epoch-0004.keras"}, "last_model must be"),
    ({"completed_epochs": "4"}, "completed_epochs must be a whole number"),
    ({"best_epoch": 99}, "best_epoch is after"),
    ({"unexpected": 1}, "unknown field"),
])
def test_a_hostile_state_json_is_refused_before_any_file_it_names_is_opened(run_copy, tiny_cache, capsys,
                                                                           state_changes, fragment):
    state = json.loads((run_copy / "state.json").read_text())
    (run_copy / "state.json").write_text(json.dumps({**state, **state_changes}))
    assert main(["evaluate", str(run_copy), str(tiny_cache)]) == 1
    assert fragment in one_error_line(capsys.readouterr().err)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)
STATE_KEYS = ["completed_epochs", "best_epoch", "best_val_auc", "epochs_without_improvement", "stopped_early",
              "random_generator_states", "last_model", "best_model"]
CONFIG_KEYS = ["options", "preprocessing", "cache", "input_shape"]


def fuzz_settings(examples: int):
    return settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", examples)), deadline=None, database=None,
                    derandomize=not os.environ.get("FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@fuzz_settings(300)
@given(state=st.dictionaries(st.sampled_from(STATE_KEYS), json_values),
       config=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values | st.dictionaries(
           st.sampled_from(["shape", "hu_min", "hu_max", "resample_method", "orientation"]), json_values)),
       history=st.text(max_size=200))
def test_fuzzed_run_files_are_read_or_refused_with_one_line(tmp_path, state, config, history):
    run_dir = tmp_path / "fuzz"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "state.json").write_text(json.dumps(state))
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "history.csv").write_text(history)
    for read in (lambda: read_state(run_dir), lambda: read_history(run_dir / "history.csv"),
                 lambda: open_run(run_dir), lambda: Preprocessing.from_json(config.get("preprocessing"), run_dir)):
        try:
            read()
        except UserError as error:
            assert str(error) and "\n" not in str(error)


@pytest.fixture(scope="module")
def small_model_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("model") / "small.keras"
    inputs = keras.Input((*TINY_SHAPE, 1))
    features = keras.layers.Conv3D(2, 3, padding="same")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling3D()(features))
    keras.Model(inputs, outputs).save(path)
    return path.read_bytes()


@fuzz_settings(60)
@given(data=st.data())
def test_fuzzed_model_files_are_loaded_or_refused_with_one_line(small_model_bytes, tmp_path, data):
    content = bytearray(small_model_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            del content[data.draw(st.integers(0, len(content))):]
        elif content:
            position = data.draw(st.integers(0, len(content) - 1))
            content[position] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.keras"
    path.write_bytes(bytes(content))
    try:
        load_trained_model(path)
    except UserError as error:
        assert str(error) and "\n" not in str(error)


# -- 5. load: several fits and a rebuild of their cache at once ----------------------------------
def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_three_fits_and_a_rebuild_of_their_cache_at_once_all_finish_with_valid_runs(tiny_cache, raw_copy, tmp_path):
    cache = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    with CacheReader(cache) as reader:
        old_fingerprint = reader.fingerprint
    # the rebuild changes the data (another HU window), so a fit that read the new file after
    # training on the old one would show as a fingerprint mismatch
    build = [sys.executable, "-m", "preprocess", "build", "--raw", str(raw_copy), "--out", str(cache), "--jobs", "1",
             "--shape", *map(str, TINY_SHAPE), "--hu-window", "-900", "300", "--force", "--quiet"]
    fit = fit_command(Path("cache.h5"), None, epochs=3)  # default run directories: runs/<timestamp> in tmp_path
    fits = [start(fit, tmp_path), start(fit, tmp_path)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("runs/*/config.json"))) < 2:  # both have opened the old cache
        assert time.monotonic() < deadline and all(process.poll() is None for process in fits)
        time.sleep(0.05)
    # the rebuild replaces the file while those two train, and a third fit opens it meanwhile
    rebuild = start(build, ROOT)
    fits.append(start(fit, tmp_path))
    ended = {}
    while len(ended) < 4:
        for process in (rebuild, *fits):
            if process.pid not in ended and process.poll() is not None:
                ended[process.pid] = time.monotonic()
        time.sleep(0.05)
    for process in (rebuild, *fits):
        assert process.returncode == 0, process.stderr.read()
    assert ended[rebuild.pid] < min(ended[process.pid] for process in fits[:2]), "replaced while they trained"
    with CacheReader(cache) as reader:
        new_fingerprint = reader.fingerprint
    assert new_fingerprint != old_fingerprint
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 3, "fits started in the same second get a run directory each"
    used = []
    for run_dir in run_dirs:
        assert [row["epoch"] for row in read_history(run_dir / "history.csv")] == [1, 2, 3]
        load_trained_model(model_path(run_dir))
        config, metrics = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
        assert run_dir / metrics["model"] == model_path(run_dir)
        # trained, validated and tested on one file: the one config.json names
        assert metrics["cache_fingerprint"] == config["cache"]["fingerprint"]
        used.append(config["cache"]["fingerprint"])
    assert used.count(old_fingerprint) >= 2 and set(used) <= {old_fingerprint, new_fingerprint}


REBUILD_LOOP = """
import sys
from pathlib import Path
from preprocess.engine.build import BuildOptions, build_cache
raw, out = Path(sys.argv[1]), Path(sys.argv[2])
for window in [(-900.0, 300.0), (-1000.0, 400.0)] * 3:
    build_cache(BuildOptions(raw=raw, out=out, jobs=1, shape=(32, 32, 16), hu_window=window, force=True, quiet=True))
"""


@pytest.mark.slow
def test_opening_the_cache_while_it_is_being_replaced_always_gives_one_whole_file(tiny_cache, raw_copy, tmp_path):
    cache = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    seen: dict[str, np.ndarray] = {}
    process = subprocess.Popen([sys.executable, "-c", REBUILD_LOOP, str(raw_copy), str(cache)], cwd=ROOT,
                               env=ENVIRONMENT, stderr=subprocess.PIPE, text=True)
    opens = 0
    while process.poll() is None:
        with CacheReader(cache) as reader:  # validated whole, whichever file the path named at that moment
            volume = reader.read_volume(len(reader) - 1)
            expected = seen.setdefault(reader.fingerprint, volume)
            np.testing.assert_array_equal(volume, expected)
        opens += 1
    assert process.returncode == 0, process.stderr.read()
    assert opens >= 50 and len(seen) == 2, (opens, len(seen))


# -- 6. bad command lines ----------------------------------------------------------------------
NUMERIC_FLAGS = {"fit": ["--epochs", "--batch-size", "--lr", "--patience", "--seed", "--warmup-epochs",
                         "--precise-bn-scans", "--bn-momentum"],
                 "bench-input": ["--samples", "--batch-size", "--seed"]}
VALUES = ["0", "-0", "-1", "1.5", "1e400", "1e300", "1e-300", str(10**30), str(10**12), "abc", "", "nan", "inf",
          "-inf", "0x10"]
ACCEPTED = {("fit", "--patience", "0"), ("fit", "--patience", "-0"), ("fit", "--seed", "0"), ("fit", "--seed", "-0"),
            ("fit", "--warmup-epochs", "0"), ("fit", "--warmup-epochs", "-0"), ("fit", "--precise-bn-scans", "0"),
            ("fit", "--precise-bn-scans", "-0"), ("fit", "--bn-momentum", "0"), ("fit", "--bn-momentum", "-0"),
            ("fit", "--bn-momentum", "1e-300"),
            ("bench-input", "--seed", "0"), ("bench-input", "--seed", "-0")}
CASES = [(command, flag, value) for command, flags in NUMERIC_FLAGS.items() for flag in flags for value in VALUES
         if (command, flag, value) not in ACCEPTED]


def arguments_for(command: str, flag: str, value: str, cache: Path, run_dir: Path) -> list[str]:
    prefix = {"fit": ["fit", str(cache), "--run-dir", str(run_dir), "--padding", "same", "--quiet"],
              "bench-input": ["bench-input", str(cache)]}[command]
    return [*prefix, f"{flag}={value}"]  # "=": a value such as -inf is not mistaken for a flag


@pytest.mark.parametrize("command, flag, value", CASES)
def test_bad_numbers_get_one_line_and_a_nonzero_exit(tiny_cache, tmp_path, capsys, command, flag, value):
    try:
        code = main(arguments_for(command, flag, value, tiny_cache, tmp_path / "run"))
    except SystemExit as exit:
        code = exit.code
    error = capsys.readouterr().err
    assert code != 0, f"{command} {flag} {value} was accepted"
    assert flag in one_error_line(error)
    assert not (tmp_path / "run").exists()


BAD_FLAGS_WITHOUT_TENSORFLOW = """
import contextlib, io, json, sys
from train.__main__ import main
codes = []
for arguments in json.loads(sys.argv[1]):
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(arguments))
        except SystemExit as exit:
            codes.append(exit.code)
print(json.dumps({"codes": codes, "tensorflow imported": "tensorflow" in sys.modules}))
"""


def test_bad_numbers_are_refused_before_tensorflow_is_imported(tiny_cache, tmp_path):
    arguments = [arguments_for(*case, tiny_cache, tmp_path / "run") for case in CASES]
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", BAD_FLAGS_WITHOUT_TENSORFLOW, json.dumps(arguments)], cwd=ROOT,
                            env=ENVIRONMENT, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert report == {"codes": [2] * len(CASES), "tensorflow imported": False}, result.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("changes, fragment", [
    ({"epochs": 10**12}, "--epochs"), ({"epochs": True}, "--epochs"), ({"batch_size": 10**12}, "--batch-size"),
    ({"learning_rate": 1e300}, "--lr"), ({"learning_rate": float("nan")}, "--lr"), ({"seed": 2**32}, "--seed"),
    ({"patience": -1}, "--patience"), ({"patience": 10**12}, "--patience"),
    ({"bn_momentum": float("nan")}, "--bn-momentum"), ({"bn_momentum": 1.0}, "--bn-momentum"),
    ({"precise_bn_scans": 10**12}, "--precise-bn-scans"), ({"warmup_epochs": 10**12}, "--warmup-epochs"),
    ({"recipe": "fastest"}, "--recipe"), ({"precision": "bf16"}, "--precision"),
])
def test_fit_options_from_code_have_the_same_limits(tiny_cache, tmp_path, changes, fragment):
    with pytest.raises(UserError, match=fragment):
        fit_model(FitOptions(cache=tiny_cache, run_dir=tmp_path / "run", padding="same", **changes))
    assert not (tmp_path / "run").exists()


# -- a run's calibration.json and reference.json, damaged or hostile --------------------------------------
REFERENCE_KEYS = ["version", "model", "feature_threshold", "histogram_threshold", "val_flag_rate", "geometry",
                  "histogram_edges", "feature_means", "feature_precision", "histogram_cdfs", "geometry_low",
                  "geometry_high", "geometry_seen_low", "geometry_seen_high"]


@pytest.fixture(scope="module")
def reference_document(tmp_path_factory) -> dict:
    from preprocess.reading.scan_stats import compute_scan_stats
    from train.trust.ood import build_reference, write_reference

    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    stats = [compute_scan_stats(rng.uniform(-1000, 400, (8, 8, 8)), (1.0, 1.0, 2.0)) for _ in range(16)]
    write_reference(folder, build_reference("last-epoch-0001.keras", rng.normal(size=(12, 6)), np.arange(12) % 2,
                                            rng.normal(size=(4, 6)), stats[:12], stats[12:]))
    return json.loads((folder / "reference.json").read_text())


@fuzz_settings(100)
@given(data=st.data(), calibration=st.dictionaries(st.sampled_from(
    ["temperature", "model", "fitted_on", "scans", "nll_before", "nll_after", "at_bound", "bias", "other"]), json_values)
    | json_values)
def test_fuzzed_calibration_and_reference_files_are_read_or_refused_with_one_line(reference_document, tmp_path, data,
                                                                                 calibration):
    from train.trust.calibration import read_calibration
    from train.trust.ood import read_reference

    document = dict(reference_document)
    for key in data.draw(st.lists(st.sampled_from(REFERENCE_KEYS), max_size=3)):  # replaced by a hostile value
        document[key] = data.draw(json_values | st.lists(st.lists(st.floats(), max_size=3), max_size=3))
    run_dir = tmp_path / "fuzz"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "reference.json").write_text(json.dumps(document))
    (run_dir / "calibration.json").write_text(json.dumps(calibration))
    for read in (lambda: read_reference(run_dir), lambda: read_calibration(run_dir)):
        try:
            read()
        except UserError as error:
            assert str(error) and "\n" not in str(error)
