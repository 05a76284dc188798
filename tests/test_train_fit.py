"""fit, evaluate and predict end to end on the tiny cache (32x32x16, --padding same)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras model.save

from common.errors import UserError  # noqa: E402
from preprocess.engine.build import BuildOptions, build_cache  # noqa: E402
from preprocess.cache import CacheReader  # noqa: E402
from train.__main__ import main  # noqa: E402
from train.evaluate import evaluate_run  # noqa: E402
from train.fit import fit_model  # noqa: E402
from conftest import run_python_module  # noqa: E402
from train.options import DEFAULT_RECIPE, RECIPES, FitOptions  # noqa: E402
from train.predict import predict_scans  # noqa: E402
from train.rundir.layout import model_path, read_history, read_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
SENTENCE = re.compile(r"^(?P<scan>.+): This model is (?P<percent>\d+\.\d\d) percent confident that the CT scan is "
                      r"(?P<name>normal|abnormal)"
                      r"(?: -- but this scan is unlike the training data \((?P<reasons>.+)\); do not rely on this result)?$")


def tiny_options(cache: Path, run_dir: Path, **changes) -> FitOptions:
    return FitOptions(**{"cache": cache, "run_dir": run_dir, "epochs": EPOCHS, "padding": "same", "quiet": True,
                         **changes})


@pytest.fixture(scope="module")
def trained_run(tiny_cache, tmp_path_factory) -> Path:
    """A finished 3-epoch run on the tiny cache (read-only: copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    fit_model(tiny_options(tiny_cache, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def other_window_cache(synthetic_raw, tmp_path_factory) -> Path:
    """The tiny cache's scans with another Hounsfield window: same shape, different preprocessing."""
    out = tmp_path_factory.mktemp("other") / "other_window.h5"
    build_cache(BuildOptions(raw=synthetic_raw, out=out, jobs=1, shape=(32, 32, 16), hu_window=(-900.0, 300.0),
                             quiet=True))
    return out


def test_fit_writes_every_artifact(trained_run, tiny_cache):
    names = {path.name for path in trained_run.iterdir()}
    state = read_state(trained_run)
    assert {"config.json", "history.csv", f"best-epoch-{state.best_epoch:04d}.keras", f"last-epoch-{EPOCHS:04d}.keras",
            "state.json", "training_curves.png", "metrics.json", "tensorboard", "roc_test.png", "reliability_test.png",
            "calibration.json", "reference.json"} <= names
    assert (trained_run / "reliability_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert state.best_model == f"best-epoch-{state.best_epoch:04d}.keras"
    assert len([name for name in names if name.startswith("last-epoch-")]) == 1, "older training states deleted"
    assert len([name for name in names if name.startswith("best-epoch-")]) == 1, "older best models deleted"
    assert not [name for name in names if ".tmp-" in name], "no temporary files left behind"
    assert (trained_run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("train", "validation"):
        assert list((trained_run / "tensorboard" / folder).glob("events.out.tfevents.*"))
    assert state.completed_epochs == EPOCHS and 1 <= state.best_epoch <= EPOCHS


def test_config_records_every_option_and_the_caches_preprocessing(trained_run, tiny_cache):
    config = json.loads((trained_run / "config.json").read_text())
    assert set(config["options"]) == set(FitOptions().to_json())
    assert config["options"]["epochs"] == EPOCHS and config["options"]["padding"] == "same"
    with CacheReader(tiny_cache) as reader:
        assert config["cache"]["fingerprint"] == reader.fingerprint
        assert config["preprocessing"]["shape"] == list(reader.shape)
        assert config["preprocessing"]["hu_min"] == reader.preprocessing.hu_min
        assert config["cache"]["attributes"]["resample_method"] == reader.preprocessing.resample_method


def test_history_has_one_row_per_epoch_with_train_and_validation_metrics(trained_run):
    history = read_history(trained_run / "history.csv")
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    for metric in ("loss", "accuracy", "auc", "sensitivity", "specificity"):
        assert metric in history[0] and f"val_{metric}" in history[0]
    # the default recipe: one epoch of warm-up to the peak rate, then a cosine decay that acts every epoch
    rates = [row["learning_rate"] for row in history]
    assert rates[0] == pytest.approx(RECIPES[DEFAULT_RECIPE]["learning_rate"])
    assert rates[0] > rates[1] > rates[2] >= 0.0


def test_metrics_json_is_the_kept_model_on_the_test_split(trained_run, tiny_cache):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    with CacheReader(tiny_cache) as reader:
        test_size = len(reader.split("test"))
    assert metrics["split"] == "test" and metrics["scans"] == test_size
    assert np.array(metrics["confusion_matrix"]).sum() == test_size
    for name in ("accuracy", "sensitivity", "specificity"):
        assert 0.0 <= metrics[name] <= 1.0
    state = read_state(trained_run)
    assert metrics["best_epoch"] == state.best_epoch
    # the default recipe keeps the last epoch's model, whatever epoch validated best
    assert (metrics["keep"], metrics["model"], metrics["model_epoch"]) == ("last", state.last_model, EPOCHS)
    assert metrics["model_val_auc"] == pytest.approx(read_history(trained_run / "history.csv")[-1]["val_auc"])
    assert model_path(trained_run) == trained_run / state.last_model
    # `evaluate` on the same split reproduces it: the same model, the same unaugmented data
    report = evaluate_run(trained_run, tiny_cache, "test")
    for name in ("accuracy", "sensitivity", "specificity", "confusion_matrix", "calibration"):
        assert report[name] == metrics[name]
    calibration = metrics["calibration"]
    assert calibration["temperature"] == json.loads((trained_run / "calibration.json").read_text())["temperature"]
    assert calibration["ece_bins"] == 1 and sum(row["scans"] for row in calibration["reliability"]) == test_size
    for when in ("before", "after"):
        assert set(calibration[when]) == {"ece", "brier", "nll"}


def test_evaluate_prints_the_metrics_of_a_split(trained_run, tiny_cache, capsys):
    assert main(["evaluate", str(trained_run), str(tiny_cache), "--split", "val"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("val split: ") and "AUC" in output and "specificity" in output
    assert "ECE over 1 equal-count bins" in output and "before" in output and "after" in output
    assert f"reliability diagram: {trained_run / 'reliability_val_tiny.png'}" in output


def test_evaluate_refuses_a_cache_preprocessed_differently(trained_run, other_window_cache):
    with pytest.raises(UserError, match="preprocessed differently.*hu_min"):
        evaluate_run(trained_run, other_window_cache, "test")


def test_predict_prints_the_tutorials_sentence_for_real_ct_with_the_warning(trained_run, real_ct, capsys):
    # a model trained on phantoms has never seen real CT: each real chest scan keeps its probability, and its
    # sentence says why not to rely on it (field of view, spacing, slices: real CT is not 350 x 350 x 300 mm)
    scans = [real_ct / "chest_1p5mm_lps.nii.gz"]
    abdomen = [real_ct / "thorax_abdomen_3mm.nii.gz", real_ct / "thorax_abdomen_3mm_small.nii.gz"]
    assert main(["predict", str(trained_run), *map(str, abdomen)]) == 1  # no lungs to judge: no probability
    captured = capsys.readouterr()
    assert captured.out == ""
    reason = ("not assessed: only 116 mL of lung over 36 mm head to foot; a chest CT we can judge shows at least "
              "200 mL (an abdomen CT with the lung bases at its edge?)")
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(f"{scan}: {reason}") for line, scan in zip(lines, abdomen))
    assert main(["predict", str(trained_run), *map(str, scans)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(scans)
    for line, scan in zip(lines, scans):
        match = SENTENCE.match(line)
        assert match and match["scan"] == str(scan) and 50.0 <= float(match["percent"]) <= 100.0
        assert match["reasons"] and "training" in match["reasons"]
    assert main(["predict", str(trained_run), *map(str, scans), "--json"]) == 0
    documents = json.loads(capsys.readouterr().out)
    assert [document["scan"] for document in documents] == list(map(str, scans))
    assert all(0.0 <= document["probability_abnormal"] <= 1.0 for document in documents)
    assert all(document["in_distribution"] is False and document["ood_reasons"] for document in documents)
    assert all(document["calibrated"] is True for document in documents)
    assert all(set(document["ood_scores"]) == {"histogram", "features", "geometry"} for document in documents)
    # --strict: the same output, and a non-zero exit because scans were flagged
    assert main(["predict", str(trained_run), *map(str, scans), "--strict"]) == 3
    assert len(capsys.readouterr().out.splitlines()) == len(scans)


def test_predict_preprocesses_like_the_training_cache(trained_run, tiny_cache, synthetic_raw):
    # a raw scan that is in the cache gets the probability of its cached volume
    from train.rundir.models import load_trained_model

    with CacheReader(tiny_cache) as reader:
        row = 0
        record = reader.records()[row]
        cached_volume = reader.read_volume(row)
    model = load_trained_model(model_path(trained_run))
    raw = float(model(cached_volume[None, ..., None], training=False).numpy().reshape(-1)[0])
    temperature = json.loads((trained_run / "calibration.json").read_text())["temperature"]
    expected = 1.0 / (1.0 + np.exp(-np.log(raw / (1.0 - raw)) / temperature))  # calibrated: sigmoid(logit / T)
    [prediction] = predict_scans(trained_run, [synthetic_raw / record.source_path])
    assert prediction.error is None and prediction.calibrated
    assert prediction.probability_abnormal == pytest.approx(expected, abs=1e-5)


def test_an_unreadable_scan_gets_one_error_line_and_the_others_are_predicted(trained_run, real_ct, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    good = sorted(real_ct.glob("*.nii.gz"))[0]
    assert main(["predict", str(trained_run), str(broken), str(good)]) == 1
    captured = capsys.readouterr()
    [error_line] = captured.err.strip().splitlines()
    assert error_line.startswith(f"python -m train: error: {broken}: ") and "gzip" in error_line
    assert [SENTENCE.match(line)["scan"] for line in captured.out.splitlines()] == [str(good)]


def test_a_second_fit_into_a_run_directory_is_refused(trained_run, tiny_cache):
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        fit_model(tiny_options(tiny_cache, trained_run))


def test_resume_refuses_changed_options_and_another_cache(trained_run, tiny_cache, other_window_cache, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    with pytest.raises(UserError, match="--seed"):
        fit_model(tiny_options(tiny_cache, run_dir, resume=True, seed=1))
    with pytest.raises(UserError, match="not the cache"):
        fit_model(tiny_options(other_window_cache, run_dir, resume=True))


def test_width_trains_a_narrower_network_that_the_run_records_and_a_resume_keeps(tiny_cache, tmp_path):
    from train.rundir.models import load_trained_model

    run_dir = tmp_path / "narrow"
    fit_model(tiny_options(tiny_cache, run_dir, epochs=1, width=0.25))
    model = load_trained_model(model_path(run_dir))
    assert [model.get_layer(f"conv{index}").filters for index in range(1, 5)] == [16, 16, 32, 64]
    assert model.get_layer("dense").units == 128
    assert json.loads((run_dir / "config.json").read_text())["options"]["width"] == 0.25
    with pytest.raises(UserError, match="--width 0.25 in the run, 1.0 now"):
        fit_model(tiny_options(tiny_cache, run_dir, epochs=2, resume=True))


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_test_metrics(trained_run, tiny_cache, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    before = (run_dir / "metrics.json").read_bytes(), (run_dir / "history.csv").read_bytes()
    report = fit_model(tiny_options(tiny_cache, run_dir, resume=True))
    assert report.state.completed_epochs == EPOCHS
    assert ((run_dir / "metrics.json").read_bytes(), (run_dir / "history.csv").read_bytes()) == before


def test_a_resume_with_another_keep_switches_the_model_and_retests_without_training(trained_run, tiny_cache,
                                                                                    tmp_path, capsys):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    history = (run_dir / "history.csv").read_bytes()
    state = read_state(run_dir)
    last = evaluate_run(run_dir, tiny_cache, "test")
    assert main(["fit", str(tiny_cache), "--run-dir", str(run_dir), "--resume", "--keep", "best", "--epochs",
                 str(EPOCHS), "--padding", "same", "--quiet"]) == 0
    assert f"best val AUC {state.best_val_auc:.4f} at epoch {state.best_epoch};" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["keep"], metrics["model"], metrics["model_epoch"]) == ("best", state.best_model, state.best_epoch)
    assert model_path(run_dir) == run_dir / state.best_model
    assert evaluate_run(run_dir, tiny_cache, "test")["confusion_matrix"] == metrics["confusion_matrix"]
    assert (run_dir / "history.csv").read_bytes() == history and read_state(run_dir) == state, "nothing trained"
    assert main(["fit", str(tiny_cache), "--run-dir", str(run_dir), "--resume", "--epochs", str(EPOCHS),
                 "--padding", "same", "--quiet"]) == 0
    assert "model of the last epoch (val AUC" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["keep"], metrics["model"]) == ("last", state.last_model)
    assert evaluate_run(run_dir, tiny_cache, "test")["confusion_matrix"] == last["confusion_matrix"]


def wait_for_epochs(history: Path, process: subprocess.Popen, epochs: int, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if history.exists() and len(history.read_text().splitlines()) > epochs:
            return
        if process.poll() is not None:
            pytest.fail(f"fit ended before it could be killed:\n{process.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no epoch finished within {timeout_seconds} s")


@pytest.mark.slow
def test_a_killed_run_resumes_without_repeating_or_skipping_epochs(trained_run, tiny_cache, tmp_path):
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "train", "fit", str(tiny_cache), "--run-dir", str(run_dir),
               "--epochs", str(EPOCHS), "--padding", "same", "--quiet"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_epochs(run_dir / "history.csv", process, 1, timeout_seconds=180)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    done = read_state(run_dir).completed_epochs
    assert 1 <= done < EPOCHS, "killed after at least one epoch and before the end"
    assert not (run_dir / "metrics.json").exists()

    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    history = read_history(run_dir / "history.csv")
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    assert (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob(".*.tmp-*"))
    # the interrupted run ends where an uninterrupted one does: same seed, same batches, same dropout
    reference = read_history(trained_run / "history.csv")
    for row, expected in zip(history, reference):
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert row["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_run_records_its_kernels_and_a_resume_on_other_kernels_is_warned(tiny_cache, tmp_path):
    """Eigen's and oneDNN's kernels sum in different orders (train/hardware.py): a run begun on one and resumed
    on the other still finishes, with one line saying its numbers will not match an uninterrupted run's."""
    run_dir = tmp_path / "moved"
    command = [sys.executable, "-m", "train", "fit", str(tiny_cache), "--run-dir", str(run_dir), "--padding", "same",
               "--precision", "float32"]
    environment = {name: value for name, value in os.environ.items() if name != "TF_ENABLE_ONEDNN_OPTS"}
    environment.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.run(command + ["--epochs", "1"], cwd=ROOT, env={**environment, "TF_ENABLE_ONEDNN_OPTS": "0"},
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    machine = json.loads((run_dir / "config.json").read_text())["machine"]
    assert machine["kernels"] == "Eigen" and machine["cpus"] == os.cpu_count() and machine["cpu_kind"]
    assert "precision float32, CPU kernels Eigen" in first.stderr
    assert "began on" not in first.stderr
    resumed = subprocess.run(command + ["--epochs", "2", "--resume"], cwd=ROOT, env=environment, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "began on Eigen kernels" in line]
    assert len(warnings) == 1 and "continues on oneDNN" in warnings[0], resumed.stderr
    assert json.loads((run_dir / "config.json").read_text())["machine"] == machine  # where it began
    assert [row["epoch"] for row in read_history(run_dir / "history.csv")] == [1, 2]


def test_the_schema_version_is_checked_before_training(tiny_cache, tmp_path):
    cache = Path(shutil.copy(tiny_cache, tmp_path / "future.h5"))
    with h5py.File(cache, "r+") as file:
        file.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        fit_model(tiny_options(cache, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_predict_reads_a_dicom_series_folder_like_the_same_scan_as_nifti(trained_run, tiny_cache, synthetic_raw,
                                                                         tmp_path, capsys):
    pytest.importorskip("pydicom")
    import nibabel as nib

    from dicom_series import write_series

    with CacheReader(tiny_cache) as reader:
        nifti = synthetic_raw / reader.records()[0].source_path
    image = nib.load(nifti)
    spacing = tuple(float(value) for value in np.diag(image.affine)[:3])
    folder = tmp_path / "patient" / "series"
    write_series(folder, np.asarray(image.dataobj).astype(np.int16), spacing, "feet-first-supine", intercept=-1024,
                 reverse_on_disk=True)
    as_nifti, as_dicom = predict_scans(trained_run, [nifti, folder])
    assert as_dicom.error is None
    assert as_dicom.probability_abnormal == pytest.approx(as_nifti.probability_abnormal, abs=1e-6)
    # a folder that is not one usable series gets one line, in build's words
    write_series(tmp_path / "two", np.asarray(image.dataobj).astype(np.int16), spacing)
    write_series(tmp_path / "two", np.asarray(image.dataobj).astype(np.int16), spacing, series_uid="1.2.3.4", suffix="")
    sorted(folder.iterdir())[3].unlink()
    assert main(["predict", str(trained_run), str(tmp_path / "two"), str(folder)]) == 1
    errors = sorted(capsys.readouterr().err.strip().splitlines(), key=lambda line: "two" not in line)
    assert len(errors) == 2
    assert errors[0].startswith(f"python -m train: error: {tmp_path / 'two'}: 2 DICOM series in this folder")
    assert errors[1].startswith(f"python -m train: error: {folder}: missing slices: 1 missing")


def test_a_scan_that_fails_a_hard_check_gets_its_reason_and_no_probability(trained_run, synthetic_raw, tmp_path,
                                                                          capsys):
    import nibabel as nib

    good = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    image = nib.load(good)
    rescaled = tmp_path / "rescaled.nii.gz"  # the same phantom, its HU scaled to [0, 1]: not a CT in HU any more
    hu = np.asarray(image.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image((np.clip(hu, -1000, 400) + 1000) / 1400, image.affine), rescaled)
    assert main(["predict", str(trained_run), str(rescaled), str(good)]) == 1
    captured = capsys.readouterr()
    [error_line] = captured.err.strip().splitlines()
    assert error_line.startswith(f"python -m train: error: {rescaled}: not assessed: ")
    assert "not Hounsfield units" in error_line
    [line] = captured.out.splitlines()
    assert SENTENCE.match(line)["scan"] == str(good)
    assert main(["predict", str(trained_run), str(rescaled), "--json"]) == 1
    [document] = json.loads(capsys.readouterr().out)
    assert document["probability_abnormal"] is None and document["in_distribution"] is False
    assert "not Hounsfield units" in document["ood_reasons"][0]


def test_a_run_made_before_calibration_predicts_raw_with_one_line_each(trained_run, synthetic_raw, tmp_path, capsys):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "old-run"))
    (run_dir / "calibration.json").unlink()
    (run_dir / "reference.json").unlink()
    scan = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    assert main(["predict", str(run_dir), str(scan), "--json"]) == 0
    captured = capsys.readouterr()
    [document] = json.loads(captured.out)
    assert document["calibrated"] is False and document["in_distribution"] is None
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and "Traceback" not in captured.err
    assert "no calibration" in warnings[0] and "raw network outputs" in warnings[0]
    assert "no reference of the training scans" in warnings[1]
    # and its raw probability is the model's own output
    from preprocess.reading.transform import preprocess_scan
    from train.rundir.models import load_trained_model

    model = load_trained_model(model_path(run_dir))
    volume, _ = preprocess_scan(scan, (32, 32, 16), -1000.0, 400.0, crop="lungs")  # the tiny cache's crop
    raw = float(model(volume[None, ..., None], training=False).numpy().reshape(-1)[0])
    assert document["probability_abnormal"] == pytest.approx(raw, abs=1e-6)
    # `fit --resume` on such a finished run adds its calibration and reference without training
    fit_model(tiny_options(Path(json.loads((run_dir / "config.json").read_text())["cache"]["path"]), run_dir,
                           resume=True))
    assert (run_dir / "calibration.json").is_file() and (run_dir / "reference.json").is_file()


def test_a_run_on_a_version_1_cache_checks_features_only_and_says_so(tiny_cache, synthetic_raw, tmp_path, capsys):
    import h5py

    old_cache = Path(shutil.copy(tiny_cache, tmp_path / "v1.h5"))
    with h5py.File(old_cache, "r+") as file:  # a cache written before scan statistics
        del file["scan_stats"]
        file.attrs["schema_version"] = 1
    run_dir = tmp_path / "run"
    fit_model(tiny_options(old_cache, run_dir, epochs=1))
    scan = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(scan), "--json"]) == 0
    captured = capsys.readouterr()
    [document] = json.loads(captured.out)
    assert document["calibrated"] is True and document["ood_scores"]["histogram"]["score"] is None
    assert document["ood_scores"]["features"]["score"] is not None
    [warning] = captured.err.strip().splitlines()
    assert "version-1 cache" in warning and "only the features check" in warning


def test_a_run_whose_reference_predates_the_lungs_still_predicts(trained_run, synthetic_raw, tmp_path, capsys):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "before-lungs"))
    document = json.loads((run_dir / "reference.json").read_text())
    old = [index for index, name in enumerate(document["geometry"]) if not name.startswith("lung_") or
           name == "lung_fraction"]
    assert len(old) == 8 < len(document["geometry"]), "this run's reference checks the lungs"
    for key in ("geometry", "geometry_low", "geometry_high", "geometry_seen_low", "geometry_seen_high"):
        document[key] = [document[key][index] for index in old]  # as a version before the lungs wrote it
    (run_dir / "reference.json").write_text(json.dumps(document))
    scan = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    assert main(["predict", str(run_dir), str(scan), "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["in_distribution"] is not None and result["probability_abnormal"] is not None
    assert set(result["ood_scores"]["geometry"]["score"]) == {"fov_0", "fov_1", "fov_2", "spacing_0", "spacing_1",
                                                              "spacing_2", "slices", "lung_fraction"}


def test_a_cache_from_before_the_lung_crop_still_trains_with_one_line(tiny_cache, tmp_path):
    from test_build import make_version_2

    old = tmp_path / "old.h5"
    shutil.copy(tiny_cache, old)
    make_version_2(old)
    result = run_python_module("train", "fit", str(old), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                               "--padding", "same", "--precision", "float32", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "lung boxes" in line]
    assert len(lines) == 1 and f"{old} has no lung boxes (a version-2 cache, built before the lung crop)" in lines[0]
    assert (tmp_path / "run" / "metrics.json").is_file()
    # the negative case: a current cache trains without the line
    current = run_python_module("train", "fit", str(tiny_cache), "--run-dir", str(tmp_path / "run2"), "--epochs", "1",
                                "--padding", "same", "--precision", "float32", "--quiet")
    assert current.returncode == 0 and "lung boxes" not in current.stderr


def test_build_and_predict_say_the_same_of_a_too_short_scan(trained_run, synthetic_raw, tmp_path, capsys):
    from preprocess.phantoms.synth import make_phantom, write_phantom

    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    phantom = make_phantom(5, 0, False, size=48, slice_range=(12, 12))
    affine = phantom.affine.copy()
    affine[2, 2] = 1.5  # 12 slices of 1.5 mm: 18 mm head to foot, under the 20 mm a chest CT covers
    short = raw / "CT-0" / "short.nii.gz"
    write_phantom(type(phantom)(phantom.hu, affine, phantom.lesion_mask, phantom.lung_mask), short)
    report = build_cache(BuildOptions(raw=raw, out=tmp_path / "cache.h5", jobs=1, shape=(32, 32, 16), quiet=True))
    [failure] = report.failures
    assert failure.source_path == "CT-0/short.nii.gz" and report.cached == 16
    assert main(["predict", str(trained_run), str(short)]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if str(short) in line]
    assert line.endswith(f"{short}: not assessed: {failure.reason}")
    # the negative case: a scan of the archive that build cached gets a probability
    assert main(["predict", str(trained_run), str(next(raw.glob("CT-0/study_*.nii.gz")))]) == 0
