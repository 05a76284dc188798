"""`python -m train`: bad input gets one line and a non-zero exit; every command has --help."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_python_module
from train.__main__ import main, make_parser

COMMANDS = {
    "fit": ["--run-dir", "--epochs", "--batch-size", "--lr", "--patience", "--seed", "--padding", "--precision",
            "--recipe", "--schedule", "--warmup-epochs", "--bn-momentum", "--precise-bn-scans", "--pooling",
            "--width", "--norm", "--augment", "--resume", "--quiet"],
    "evaluate": ["--split"],
    "predict": ["--json"],
    "bench-input": ["--samples", "--batch-size"],
}


def assert_one_error_line(text: str, *fragments: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def not_hdf5(tmp_path) -> Path:
    path = tmp_path / "notes.h5"
    path.write_text("just text\n")
    return path


@pytest.fixture
def foreign_hdf5(tmp_path) -> Path:
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as file:
        file["data"] = np.zeros(3)
    return path


@pytest.fixture
def other_version_cache(tiny_cache, tmp_path) -> Path:
    path = Path(shutil.copy(tiny_cache, tmp_path / "v99.h5"))
    with h5py.File(path, "r+") as file:
        file.attrs["schema_version"] = 99
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_and_flag_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for flag in COMMANDS[command]:
        assert flag in output, flag
    parser = make_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]  # every action documents itself
    assert all(action.help for action in subparser._actions)


def test_a_missing_cache_is_one_line_and_exit_1_in_a_real_process(tmp_path):
    result = run_python_module("train", "fit", str(tmp_path / "missing.h5"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "python -m train: error:", "no such cache file")
    assert not (tmp_path / "run").exists()


def test_a_non_positive_epoch_count_is_a_usage_error_in_a_real_process(tiny_cache):
    result = run_python_module("train", "fit", str(tiny_cache), "--epochs", "0")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--epochs", "at least 1")


def test_a_run_directory_without_a_model_in_a_real_process(tmp_path, tiny_cache):
    (tmp_path / "config.json").write_text("{}")
    result = run_python_module("train", "evaluate", str(tmp_path), str(tiny_cache))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "no model")


@pytest.mark.parametrize("arguments, fragment", [
    (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "two"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--padding", "full"], "--padding"),
    (["--width", "0"], "--width"),
    (["--width", "8"], "--width"),
    (["--norm", "layer"], "--norm"),
])
def test_bad_fit_flags_exit_2_with_one_line(tiny_cache, arguments, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(tiny_cache), *arguments])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


@pytest.mark.parametrize("cache_fixture, fragment", [
    ("not_hdf5", "not an HDF5 file"),
    ("foreign_hdf5", "not this project's cache"),
    ("other_version_cache", "schema version 99"),
])
@pytest.mark.parametrize("command", ["fit", "evaluate", "bench-input"])
def test_a_bad_cache_is_refused_by_every_command(command, cache_fixture, fragment, request, tmp_path, capsys):
    cache = request.getfixturevalue(cache_fixture)
    if command == "evaluate":
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps({"preprocessing": {}}))
        (run_dir / "best.keras").write_bytes(b"")
        arguments = ["evaluate", str(run_dir), str(cache)]
    else:
        arguments = [command, str(cache)]
    assert main(arguments) == 1
    assert_one_error_line(capsys.readouterr().err, "python -m train: error:", fragment)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_run_directory_without_a_model_is_refused(command, tmp_path, tiny_cache, capsys):
    target = str(tiny_cache) if command == "evaluate" else "scan.nii.gz"
    assert main([command, str(tmp_path / "nowhere"), target]) == 1
    assert_one_error_line(capsys.readouterr().err, "no such run directory")
    assert main([command, str(tmp_path), target]) == 1
    assert_one_error_line(capsys.readouterr().err, "not a run directory")
    (tmp_path / "config.json").write_text("{}")
    assert main([command, str(tmp_path), target]) == 1
    assert_one_error_line(capsys.readouterr().err, "no model")


def test_valid_padding_on_a_small_cache_suggests_same(tiny_cache, tmp_path, capsys):
    assert main(["fit", str(tiny_cache), "--run-dir", str(tmp_path / "run"), "--padding", "valid"]) == 1
    assert_one_error_line(capsys.readouterr().err, "at least 46 voxels", "--padding same")
    assert not (tmp_path / "run").exists()


def test_resume_needs_a_run_directory_with_a_run(tiny_cache, tmp_path, capsys):
    assert main(["fit", str(tiny_cache), "--resume"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--resume needs --run-dir")
    assert main(["fit", str(tiny_cache), "--resume", "--run-dir", str(tmp_path), "--padding", "same"]) == 1
    assert_one_error_line(capsys.readouterr().err, "no run to continue")


def test_mixed_float16_without_a_gpu_is_refused(tiny_cache, tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert main(["fit", str(tiny_cache), "--run-dir", str(tmp_path / "run"), "--padding", "same",
                 "--precision", "mixed_float16"]) == 1
    assert_one_error_line(capsys.readouterr().err, "mixed_bfloat16")


def test_bench_input_ends_with_samples_per_second_and_peak_memory(tiny_cache, capsys):
    assert main(["bench-input", str(tiny_cache), "--samples", "8"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+(\.\d+)? samples/s, peak RSS \d+ MiB", last_line), last_line


@pytest.mark.parametrize("changes, fragment", [
    ({"epochs": 0}, "--epochs"), ({"batch_size": -1}, "--batch-size"), ({"learning_rate": 0.0}, "--lr"),
    ({"precision": "float64"}, "--precision"),
])
def test_fit_options_are_checked_when_called_without_the_command_line(tiny_cache, tmp_path, changes, fragment):
    from common.errors import UserError
    from train.fit import fit_model
    from train.options import FitOptions

    with pytest.raises(UserError, match=fragment):
        fit_model(FitOptions(cache=tiny_cache, run_dir=tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()
