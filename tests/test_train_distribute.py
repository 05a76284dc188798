"""`fit --strategy`: real MultiWorkerMirroredStrategy processes on loopback, and MirroredStrategy over
two logical CPU devices, at 32x32x16 on the CPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT
from common.errors import UserError
from train.loop.distribute import ClusterRole, read_cluster_role
from train.rundir.layout import read_history, read_state

pytest.importorskip("tensorflow")

EPOCHS = 2
FIT_FLAGS = ["--epochs", str(EPOCHS), "--padding", "same", "--batch-size", "2", "--quiet"]
SUBPROCESS_TIMEOUT_SECONDS = 300


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


# -- TF_CONFIG ---------------------------------------------------------------------------------
def test_the_chief_is_worker_0_unless_the_cluster_names_one():
    workers = {"cluster": {"worker": ["a:1", "b:2"]}}
    first = read_cluster_role("multiworker", {"TF_CONFIG": json.dumps({**workers, "task": {"type": "worker",
                                                                                           "index": 0}})})
    second = read_cluster_role("multiworker", {"TF_CONFIG": json.dumps({**workers, "task": {"type": "worker",
                                                                                            "index": 1}})})
    assert first.is_chief and not second.is_chief and first.workers == second.workers == 2
    with_chief = {"cluster": {"chief": ["c:0"], "worker": ["a:1"]}}
    chief = read_cluster_role("multiworker", {"TF_CONFIG": json.dumps({**with_chief, "task": {"type": "chief",
                                                                                              "index": 0}})})
    worker = read_cluster_role("multiworker", {"TF_CONFIG": json.dumps({**with_chief, "task": {"type": "worker",
                                                                                               "index": 0}})})
    assert chief.is_chief and not worker.is_chief and chief.workers == 2


def test_other_strategies_ignore_tf_config():
    assert read_cluster_role("mirrored", {"TF_CONFIG": "not json"}) == ClusterRole()
    assert ClusterRole().is_chief


@pytest.mark.parametrize("value, message", [
    ("", "needs TF_CONFIG"),
    ("{nope", "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', 'needs "cluster" and "task"'),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', 'names no "worker"'),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', '"host:port" addresses'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "task index 1"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief'"),
])
def test_a_bad_tf_config_is_one_line(value, message):
    with pytest.raises(UserError, match=message):
        read_cluster_role("multiworker", {"TF_CONFIG": value})


def test_multiworker_flags_are_checked_before_tensorflow_starts(tiny_cache, tmp_path):
    from conftest import run_python_module

    no_run_dir = run_python_module("train", "fit", str(tiny_cache), "--strategy", "multiworker",
                                   env={"TF_CONFIG": tf_config([1, 2], 0)})
    assert no_run_dir.returncode == 1
    assert no_run_dir.stderr.strip() == ("python -m train: error: --strategy multiworker needs --run-dir: every "
                                         "worker names the same run directory (on storage they all see); only the "
                                         "chief writes it")
    no_config = run_python_module("train", "fit", str(tiny_cache), "--strategy", "multiworker", "--run-dir",
                                  str(tmp_path / "run"), env={"TF_CONFIG": ""})
    assert no_config.returncode == 1 and "needs TF_CONFIG" in no_config.stderr
    assert len(no_config.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    bad_strategy = run_python_module("train", "fit", str(tiny_cache), "--strategy", "horovod")
    assert bad_strategy.returncode == 2 and "invalid choice: 'horovod'" in bad_strategy.stderr


# -- real processes ----------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def scratch_folders() -> set[str]:
    return {path.name for path in Path(tempfile.gettempdir()).glob("mosmed3d-worker-*")}


def run_workers(cache: Path, run_dir: Path, cwd: Path, *flags: str) -> list[subprocess.CompletedProcess]:
    """Two `python -m train fit --strategy multiworker` processes on 127.0.0.1, run to the end."""
    ports = free_ports(2)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "train", "fit", str(cache), "--run-dir", str(run_dir), "--strategy", "multiworker",
             *FIT_FLAGS, *flags],
            cwd=cwd, env={**environment, "TF_CONFIG": tf_config(ports, index)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_SECONDS)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            process.kill()
    return results


def run_mirrored(cache: Path, run_dir: Path, *flags: str) -> None:
    """`fit --strategy mirrored` in one process whose CPU is split into two logical devices."""
    code = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from train.__main__ import main\n"
        f"sys.exit(main(['fit', {str(cache)!r}, '--run-dir', {str(run_dir)!r}, '--strategy', 'mirrored', "
        f"*{[*FIT_FLAGS, *flags]!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
                            timeout=SUBPROCESS_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def mirrored_run(tiny_cache, tmp_path_factory) -> Path:
    """The same training on one process whose CPU is split into two logical devices (MirroredStrategy)."""
    run_dir = tmp_path_factory.mktemp("mirrored") / "run"
    run_mirrored(tiny_cache, run_dir)
    return run_dir


def distribution_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())["distribution"]


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_uses_two_replicas(mirrored_run):
    assert distribution_of(mirrored_run) == {"strategy": "MirroredStrategy", "replicas": 2, "workers": 1,
                                             "global_batch_size": 4}
    assert read_state(mirrored_run).completed_epochs == EPOCHS
    assert (mirrored_run / "metrics.json").is_file()


def assert_same_history(first: Path, second: Path,
                        names=("loss", "auc", "accuracy", "val_loss", "val_auc", "val_accuracy")) -> None:
    rows, other_rows = read_history(first / "history.csv"), read_history(second / "history.csv")
    assert [row["epoch"] for row in rows] == [row["epoch"] for row in other_rows] == list(range(1, EPOCHS + 1))
    for row, other in zip(rows, other_rows):
        for name in names:
            assert row[name] == pytest.approx(other[name], rel=1e-4, abs=1e-5), name


@pytest.mark.slow
def test_two_worker_processes_train_one_run_that_only_the_chief_writes(tiny_cache, tmp_path, mirrored_run):
    run_dir = tmp_path / "run"
    before = scratch_folders()
    chief, worker = run_workers(tiny_cache, run_dir, tmp_path)
    assert chief.returncode == 0, chief.stderr[-3000:]
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert chief.stdout.startswith(f"run saved in {run_dir}: {EPOCHS} epochs")
    assert worker.stdout.strip() == f"worker done: {EPOCHS} epochs; the chief wrote the run to {run_dir}"
    # the chief's run directory is complete and valid
    state = read_state(run_dir)
    assert state.completed_epochs == EPOCHS and (run_dir / state.best_model).is_file()
    assert {"config.json", "history.csv", "state.json", "metrics.json", "training_curves.png"} <= {
        path.name for path in run_dir.iterdir()}
    assert distribution_of(run_dir) == {"strategy": "CollectiveAllReduceStrategy", "replicas": 2, "workers": 2,
                                        "global_batch_size": 4}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["model"], metrics["keep"]) == (state.last_model, "last") and metrics["scans"] > 0
    # the worker wrote nothing: no other folder beside the run, no scratch folder left behind
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert scratch_folders() <= before
    # each worker read its half of every global batch: together, the same training as two local replicas
    assert_same_history(run_dir, mirrored_run)


@pytest.mark.slow
def test_a_multiworker_run_resumes(tiny_cache, tmp_path):
    """Stopped after epoch 1 (by --epochs 1) and resumed to EPOCHS: the same history as a mirrored run stopped
    and resumed the same way. (Not as an uninterrupted run: --epochs plans the cosine schedule, so a run
    started with --epochs 1 learns differently in its first epoch; SIGKILLed runs, which keep their --epochs,
    resume exactly as if uninterrupted: test_faults_train.py.)"""
    run_dir = tmp_path / "run"
    first = run_workers(tiny_cache, run_dir, tmp_path, "--epochs", "1")
    assert [result.returncode for result in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert read_state(run_dir).completed_epochs == 1
    resumed = run_workers(tiny_cache, run_dir, tmp_path, "--resume")
    assert [result.returncode for result in resumed] == [0, 0], resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    assert read_state(run_dir).completed_epochs == EPOCHS
    mirrored = tmp_path / "mirrored"
    run_mirrored(tiny_cache, mirrored, "--epochs", "1")
    run_mirrored(tiny_cache, mirrored, "--resume")
    assert_same_history(run_dir, mirrored)


@pytest.mark.slow
def test_precise_bn_leaves_every_mirrored_replica_with_the_same_statistics(tmp_path):
    """Two replicas on two logical CPU devices: after an epoch and its re-estimation, each BatchNorm's moving
    statistics are the same on both replicas, are the population statistics of the batches, and have moved."""
    code = """
import sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from train.loop.precise_bn import PreciseBatchNorm, batchnorm_layers, estimate_population_statistics
from train.network.architecture import Architecture
from train.network.model import build_model
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy()
assert strategy.num_replicas_in_sync == 2
rng = np.random.default_rng(0)
volumes = rng.uniform(0, 1, (8, 16, 16, 8, 1)).astype(np.float32)
labels = np.array([0, 1] * 4, np.float32)
with strategy.scope():
    model = build_model((16, 16, 8), padding='same', architecture=Architecture(block_filters=(4, 8), dense_units=8))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss='binary_crossentropy')
before = [np.array(layer.moving_mean) for layer in batchnorm_layers(model)]
batches = tf.data.Dataset.from_tensor_slices(volumes[:6]).batch(2)
model.fit(tf.data.Dataset.from_tensor_slices((volumes, labels)).batch(4), epochs=1, verbose=0,
          validation_data=tf.data.Dataset.from_tensor_slices((volumes, labels)).batch(4),
          callbacks=[PreciseBatchNorm(batches)])
expected = estimate_population_statistics(model, batches)
for layer, old, (mean, variance) in zip(batchnorm_layers(model), before, expected):
    for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
        replicas = [np.array(component) for component in variable.value.values]
        assert len(replicas) == 2 and np.array_equal(replicas[0], replicas[1]), layer.name
        np.testing.assert_allclose(replicas[0], value, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.array(layer.moving_mean), old)
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
                            timeout=SUBPROCESS_TIMEOUT_SECONDS)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory) -> Path:
    """8 normal and 8 abnormal 48 x 48 phantoms with lesion masks, cached at 32 x 32 x 16."""
    from conftest import TINY_SHAPE
    from preprocess.engine.build import BuildOptions, build_cache
    from preprocess.phantoms.synth import write_synthetic_archive

    folder = tmp_path_factory.mktemp("masked")
    write_synthetic_archive(folder / "raw", normal=8, abnormal=8, size=48, seed=0, progress=False, masks=True)
    build_cache(BuildOptions(raw=folder / "raw", out=folder / "masked.h5", jobs=1, shape=TINY_SHAPE, quiet=True))
    return folder / "masked.h5"


@pytest.mark.slow
def test_the_lesion_map_trains_on_two_worker_processes_as_on_two_local_replicas(masked_cache, tmp_path):
    """The lesion-map model (a cache with masks) has two outputs, dict targets and a per-cell loss: two
    workers on loopback train it as two replicas in one process do, and log both outputs' losses.

    Keras's own per-output validation losses under MirroredStrategy do not add up to its val_loss on
    these small validation batches (half of it here), so the workers' are checked against their total,
    and the mirrored run's only where they are right: in training (docs/scaling.md).

    The call's offset is refit before each validation, which puts an untrained model's two validation
    scans at P ~ 0.497-0.499, either side of one of Keras's AUC thresholds (k / 199) by a few 1e-5: there
    validation AUC and accuracy are decided by the last bits. So those two are not compared here; every
    weight of the last epoch's model is, the refit offset among them, to 1e-4."""
    import keras
    import numpy as np

    import train.network.model  # noqa: F401  (registers the call's layer for loading)

    run_dir, mirrored = tmp_path / "run", tmp_path / "mirrored"
    chief, worker = run_workers(masked_cache, run_dir, tmp_path)
    assert chief.returncode == 0, chief.stderr[-3000:]
    assert worker.returncode == 0, worker.stderr[-3000:]
    weight = json.loads((run_dir / "config.json").read_text())["options"]["lesion_weight"]
    assert weight == 20.0 and distribution_of(run_dir)["workers"] == 2
    run_mirrored(masked_cache, mirrored)
    assert_same_history(run_dir, mirrored, names=("loss", "auc", "accuracy", "val_loss"))
    models = [keras.saving.load_model(folder / f"last-epoch-{EPOCHS:04d}.keras", compile=False)
              for folder in (run_dir, mirrored)]
    assert json.loads((run_dir / "config.json").read_text())["options"]["call_offset"] == "refit"
    for weights, others in zip(*(model.get_weights() for model in models), strict=True):
        np.testing.assert_allclose(weights, others, rtol=1e-4, atol=1e-6)
    for row, other in zip(read_history(run_dir / "history.csv"), read_history(mirrored / "history.csv")):
        for name in ("label_loss", "lesion_cells_loss"):
            assert row[name] == pytest.approx(other[name], rel=1e-4, abs=1e-5), name
        for prefix in ("", "val_"):
            total = row[f"{prefix}label_loss"] + weight * row[f"{prefix}lesion_cells_loss"]
            assert total == pytest.approx(row[f"{prefix}loss"], rel=1e-4), prefix
