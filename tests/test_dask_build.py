"""`build --backend dask`: real `dask scheduler` and `dask worker` processes on 127.0.0.1.

The workers preload a module that makes every scan take 0.1 s longer, so that a test can kill a
worker while it is preprocessing one. Every process a test starts is killed when it ends.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed (pip install -e '.[dask]')")

from distributed import Client  # noqa: E402

from conftest import ROOT, TINY_SHAPE  # noqa: E402
from common.errors import UserError  # noqa: E402
from preprocess.__main__ import main  # noqa: E402
from preprocess.engine.build import BuildOptions, build_cache  # noqa: E402
from preprocess.engine.time_limits import ScanTimeout, time_limit  # noqa: E402
from test_build import add_bad_files, assert_same_content, content  # noqa: E402

ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT)}
SLOW_SCANS = '''"""Dask worker preload (tests only): each scan takes 0.1 s longer."""
import time

import preprocess.engine.scans

if not hasattr(preprocess.engine.scans, "preprocess_scan_at_full_speed"):  # dask may run a preload twice
    preprocess.engine.scans.preprocess_scan_at_full_speed = preprocess.engine.scans.preprocess_scan

    def slow_preprocess_scan(*arguments):
        time.sleep(0.1)
        return preprocess.engine.scans.preprocess_scan_at_full_speed(*arguments)

    preprocess.engine.scans.preprocess_scan = slow_preprocess_scan
'''
pytestmark = pytest.mark.timeout(120, method="signal")  # a hang fails its test, and teardown still kills the cluster


def die_with_the_tests() -> None:
    """In each process a test starts: be killed if pytest itself is killed (Linux PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class DaskCluster:
    """A scheduler and single-threaded workers, each a real process, all killed by `close`."""

    def __init__(self, folder: Path, workers: int, environment: dict | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.environment = {**ENVIRONMENT, **(environment or {})}
        self.preload = folder / "slow_scans.py"
        self.preload.write_text(SLOW_SCANS)
        self.elsewhere = folder / "elsewhere"  # the workers' working folder, not the tests'
        self.elsewhere.mkdir(exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.client = None
        scheduler_file = folder / "scheduler.json"
        self._start("scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(scheduler_file),
                    "--no-dashboard")
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.address = json.loads(scheduler_file.read_text())["address"]
        self.workers = [self._start("worker", self.address, "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                                    "--no-dashboard", "--preload", str(self.preload))
                        for _ in range(workers)]
        self.client = Client(self.address, set_as_default=False)
        if workers:
            self.client.wait_for_workers(workers, timeout=60)

    def _start(self, *arguments: str) -> subprocess.Popen:
        log = open(self.folder / f"{arguments[0]}-{len(self.processes)}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "dask", *arguments], cwd=self.elsewhere,
                                   env=self.environment, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_the_tests)
        log.close()
        self.processes.append(process)
        return process

    def kill_when_busy(self, workers: list[subprocess.Popen], build: subprocess.Popen) -> None:
        """SIGKILL each of `workers` as soon as it has a scan to preprocess, while `build` runs."""
        address_of = {pid: address for address, pid in self.client.run(os.getpid).items()}
        deadline = time.monotonic() + 60
        for worker in workers:
            address = address_of[worker.pid]
            while not self.client.processing(workers=[address]).get(address):
                assert build.poll() is None, "the build ended before a worker could be killed mid-scan"
                assert time.monotonic() < deadline, "no worker got a scan within 60 s"
                time.sleep(0.005)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        assert build.poll() is None, "the build ended before the kill took effect"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        assert all(process.poll() is not None for process in self.processes)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two workers, shared by the tests that don't kill any."""
    with DaskCluster(tmp_path_factory.mktemp("dask"), workers=2) as shared:
        yield shared


@pytest.fixture
def new_cluster(tmp_path):
    """Start a cluster of one's own (to kill its workers): new_cluster(workers=2, environment=...)."""
    clusters = []

    def start(workers: int = 2, environment: dict | None = None) -> DaskCluster:
        clusters.append(DaskCluster(tmp_path / f"dask-{len(clusters)}", workers, environment))
        return clusters[-1]

    yield start
    for started in clusters:
        started.close()


def build(raw, out, **overrides):
    return build_cache(BuildOptions(raw=raw, out=out, shape=TINY_SHAPE, quiet=True, **overrides))


def start_build(raw: Path, out: Path, address: str, *flags: str, environment: dict | None = None) -> subprocess.Popen:
    """A real `build --backend dask` subprocess, once it has begun writing (its temporary file exists)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "preprocess", "build", "--raw", str(raw), "--out", str(out), "--shape",
         *map(str, TINY_SHAPE), "--backend", "dask", "--scheduler", address, "--force", "--quiet", *flags],
        cwd=ROOT, env={**ENVIRONMENT, **(environment or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=die_with_the_tests,
    )
    temp = out.with_name(f".{out.name}.tmp-{process.pid}")
    deadline = time.monotonic() + 60
    while not temp.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return process


def test_a_dask_build_equals_a_loky_build(cluster, raw_copy, tmp_path):
    add_bad_files(raw_copy)
    local = build(raw_copy, tmp_path / "loky.h5", jobs=2)
    distributed = build(raw_copy, tmp_path / "dask.h5", backend="dask", scheduler=cluster.address)
    assert_same_content(content(tmp_path / "loky.h5"), content(tmp_path / "dask.h5"))
    assert (distributed.cached, distributed.reprocessed) == (local.cached, local.reprocessed) == (16, 16)
    assert distributed.failures == local.failures and len(local.failures) == 4
    # nothing to preprocess: up to date without contacting any scheduler
    assert build(raw_copy, tmp_path / "dask.h5", backend="dask", scheduler="tcp://127.0.0.1:1").up_to_date


def test_at_most_two_scans_per_worker_thread_are_in_flight(cluster, synthetic_raw, tmp_path):
    def tasks_on_scheduler(dask_scheduler):
        return len(dask_scheduler.tasks)

    counts = []
    builder = threading.Thread(target=build, args=(synthetic_raw, tmp_path / "c.h5"),
                               kwargs={"backend": "dask", "scheduler": cluster.address})
    builder.start()
    while builder.is_alive():
        counts.append(cluster.client.run_on_scheduler(tasks_on_scheduler))
    builder.join()
    assert (tmp_path / "c.h5").exists()
    # pre_dispatch is 2 x 2 worker threads; the scheduler also keeps the last result until joblib's
    # collector drops it. Unbounded, all 16 scans would be submitted at once.
    assert 4 <= max(counts) <= 2 * 2 + 1, counts


def test_workers_open_a_relative_raw_folder_by_its_absolute_path(cluster, synthetic_raw, tmp_path, monkeypatch):
    (tmp_path / "raw").symlink_to(synthetic_raw)
    monkeypatch.chdir(tmp_path)  # the workers run in another folder
    assert build(Path("raw"), tmp_path / "c.h5", backend="dask", scheduler=cluster.address).cached == 16


def test_scans_the_workers_cannot_see_fail_the_build_with_one_line(cluster, synthetic_raw, tmp_path, monkeypatch):
    (tmp_path / "raw").symlink_to(synthetic_raw)
    monkeypatch.chdir(tmp_path)
    # /proc/self/cwd is each process's own folder: the scans are there for this process, not for the workers
    with pytest.raises(UserError) as error:
        build(Path("/proc/self/cwd/raw"), tmp_path / "c.h5", backend="dask", scheduler=cluster.address)
    message = str(error.value)
    assert message.startswith("scan CT-0/study_0000 is not readable on the Dask workers: FileNotFoundError")
    assert "workers must see --raw at the same path" in message and "\n" not in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]


def test_the_scan_time_limit_applies_on_dask_workers(cluster, raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build(raw_copy, out, backend="dask", scheduler=cluster.address)
    shutil.copy(raw_copy / "CT-0" / "study_0000.nii.gz", raw_copy / "CT-0" / "study_0099.nii.gz")
    report = build(raw_copy, out, backend="dask", scheduler=cluster.address, scan_timeout_seconds=0.05)
    assert report.cached == 16  # the new scan, on a worker thread, took 0.1 s: too long
    assert [(failure.source_path, failure.reason) for failure in report.failures] == [
        ("CT-0/study_0099.nii.gz", "took longer than 0.05 s (--scan-timeout)")]


def test_the_time_limit_interrupts_a_thread_and_nothing_escapes_it():
    events = []

    def run():
        give_up = time.monotonic() + 5
        try:
            with time_limit(0.1):
                while time.monotonic() < give_up:  # Python code, as between a scan's C calls
                    pass
        except ScanTimeout:
            events.append("timed out")
        with time_limit(0.2):
            events.append("in time")
        time.sleep(0.4)  # the cancelled limit must not fire later
        events.append("done")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert events == ["timed out", "in time", "done"]


@pytest.mark.parametrize("flags, message", [
    (["--backend", "dask"], "--backend dask needs --scheduler ADDRESS"),
    (["--scheduler", "tcp://127.0.0.1:8786"], "--scheduler is for --backend dask"),
    (["--backend", "dask", "--scheduler", "nonsense"], "'nonsense' is not a Dask scheduler address"),
    (["--backend", "dask", "--scheduler", "http://127.0.0.1:8786"], "is not a Dask scheduler address"),
    (["--backend", "ray"], "invalid choice: 'ray'"),
])
def test_bad_backend_flags_get_one_line(synthetic_raw, tmp_path, capsys, flags, message):
    try:
        code = main(["build", "--raw", str(synthetic_raw), "--out", str(tmp_path / "c.h5"), *flags])
    except SystemExit as exit:
        code = exit.code
    error = capsys.readouterr().err.strip()
    assert code != 0 and message in error and "\n" not in error, error
    assert not (tmp_path / "c.h5").exists()


def test_dask_not_installed_gets_one_line(synthetic_raw, tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *rest: None)
    with pytest.raises(UserError, match=r'needs dask and distributed: pip install -e "\.\[dask\]"'):
        build(synthetic_raw, tmp_path / "c.h5", backend="dask", scheduler="tcp://127.0.0.1:8786")


def test_a_local_build_never_imports_dask(synthetic_raw, tmp_path):
    code = ("import sys; from preprocess.__main__ import main; "
            f"main(['build', '--raw', {str(synthetic_raw)!r}, '--out', {str(tmp_path / 'c.h5')!r}, "
            "'--shape', '8', '8', '8', '--jobs', '2', '--quiet']); "
            "assert not {'dask', 'distributed'} & set(sys.modules), 'dask imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=ENVIRONMENT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["closed port", "silent port", "no workers", "a worker"])
def test_a_scheduler_out_of_reach_gets_one_line_within_the_connect_timeout(synthetic_raw, tmp_path, new_cluster, kind):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        if kind == "closed port":
            with socket.create_server(("127.0.0.1", 0)) as closed:
                address = f"tcp://127.0.0.1:{closed.getsockname()[1]}"
            expected = "could not connect to the Dask scheduler at"
        elif kind == "silent port":
            address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
            expected = "could not connect to the Dask scheduler at"
        elif kind == "no workers":
            address = new_cluster(workers=0).address
            expected = "has no workers (waited 2 s)"
        else:
            address = next(iter(new_cluster(workers=1).client.nthreads()))
            expected = f"--scheduler {address} is a Dask Worker, not the scheduler"
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "preprocess", "build", "--raw", str(synthetic_raw), "--out", str(tmp_path / "c.h5"),
             "--backend", "dask", "--scheduler", address], cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**ENVIRONMENT, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
        )
    assert time.monotonic() - start < 20
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m preprocess: error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow
def test_the_scans_of_a_killed_worker_are_retried_by_another(new_cluster, raw_copy, tiny_cache, tmp_path):
    cluster = new_cluster(workers=2)
    out = tmp_path / "cache.h5"
    process = start_build(raw_copy, out, cluster.address)
    cluster.kill_when_busy(cluster.workers[:1], process)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert_same_content(content(out), content(tiny_cache))  # every row, as a local build has them


@pytest.mark.slow
def test_a_scan_whose_workers_keep_dying_fails_the_build_with_one_line(new_cluster, raw_copy, tiny_cache, tmp_path):
    cluster = new_cluster(workers=2, environment={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    out = tmp_path / "cache.h5"
    shutil.copy(tiny_cache, out)
    before = out.read_bytes()
    process = start_build(raw_copy, out, cluster.address)
    cluster.kill_when_busy(cluster.workers[:1], process)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("python -m preprocess: error: scan CT-"), stderr
    assert "was lost: 1 Dask worker died while preprocessing it" in last and "allowed-failures (0)" in last
    assert out.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.h5", "dask-0", "raw"]


@pytest.mark.slow
def test_losing_every_worker_ends_the_build_within_its_time_limit(new_cluster, raw_copy, tmp_path):
    cluster = new_cluster(workers=2)
    out = tmp_path / "cache.h5"
    process = start_build(raw_copy, out, cluster.address, "--scan-timeout", "1",
                          environment={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    cluster.kill_when_busy(cluster.workers, process)
    killed = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - killed < 15  # waits 2 x 1 s + 2 s for the scan it is waiting for
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert "python -m preprocess: error: no result for scan CT-" in last and "it has 0 workers" in last, stderr
    assert not out.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["dask-0", "raw"]


@pytest.mark.slow
def test_losing_the_scheduler_fails_the_build_with_one_line(new_cluster, raw_copy, tmp_path):
    cluster = new_cluster(workers=2)
    out = tmp_path / "cache.h5"
    process = start_build(raw_copy, out, cluster.address)
    deadline = time.monotonic() + 60
    while not any(cluster.client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.005)
    cluster.processes[0].send_signal(signal.SIGKILL)  # the scheduler
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"python -m preprocess: error: lost the Dask cluster at {cluster.address} while waiting for scan CT-"), stderr
    assert "(task cancelled: scheduler-connection-lost)" in lines[0]
    assert not out.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["dask-0", "raw"]
