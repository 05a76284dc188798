"""Fault injection against the preprocessing stage: real kills, real OS limits, hostile files."""
from __future__ import annotations

import gzip
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, TINY_SHAPE
from preprocess.__main__ import main
from preprocess.engine.build import BuildOptions, build_cache
from preprocess.cache import CacheError, CacheReader
from preprocess.reading.canonical import ScanError
from preprocess.reading.transform import preprocess_scan

ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT)}


def build_command(raw: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "preprocess", "build", "--raw", str(raw), "--out", str(out), "--jobs", "2",
            "--shape", *map(str, TINY_SHAPE), "--quiet", *flags]


def cache_content(path: Path):
    with CacheReader(path) as reader:
        return np.stack([reader.read_volume(row) for row in range(len(reader))]), reader.scan_ids, \
            [reader.split(name).tolist() for name in ("train", "val", "test")]


def kill_builds_at(raw: Path, out: Path, delays_seconds: list[float]) -> dict[str, int]:
    """SIGKILL a forced rebuild after each delay; check the invariants after every kill."""
    before_bytes = out.read_bytes()
    before_content = cache_content(out)
    outcomes = {"before the temporary file": 0, "while writing it": 0, "after the rename": 0}
    for delay in delays_seconds:
        process = subprocess.Popen(build_command(raw, out, "--force"), cwd=ROOT, env=ENVIRONMENT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        temp = out.with_name(f".{out.name}.tmp-{process.pid}")
        if out.read_bytes() == before_bytes:
            outcomes["while writing it" if temp.exists() else "before the temporary file"] += 1
        else:  # killed after os.replace: the new cache is complete and equal in content
            outcomes["after the rename"] += 1
            fresh = cache_content(out)
            assert np.array_equal(fresh[0], before_content[0]) and fresh[1:] == before_content[1:]
            before_bytes = out.read_bytes()
        # nothing but the cache and hidden temporary files of killed builds (cleaned by the next one)
        others = [path.name for path in out.parent.iterdir() if path.name not in (out.name, "raw")]
        assert all(name.startswith(f".{out.name}.tmp-") for name in others), others
    build_cache(BuildOptions(raw=raw, out=out, jobs=2, shape=TINY_SHAPE, quiet=True))
    assert sorted(path.name for path in out.parent.iterdir()) == sorted([out.name, "raw"])
    return outcomes


def measured_build_seconds(raw: Path, out: Path) -> float:
    start = time.monotonic()
    subprocess.run(build_command(raw, out, "--force"), cwd=ROOT, env=ENVIRONMENT, check=True)
    return time.monotonic() - start


@pytest.mark.slow
def test_sigkill_at_points_spanning_the_whole_build(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    duration = measured_build_seconds(raw_copy, out)
    # start-up (imports), the parallel map, and the end (tables, fsync, rename)
    delays = [0.05, 0.3, duration * 0.5, duration * 0.7, duration * 0.85, duration * 0.95, duration * 1.05]
    outcomes = kill_builds_at(raw_copy, out, delays)
    assert sum(outcomes.values()) == len(delays)
    assert outcomes["before the temporary file"] >= 1 and outcomes["while writing it"] >= 1, outcomes


@pytest.mark.veryslow
def test_twenty_random_sigkills_lose_no_cache(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    duration = measured_build_seconds(raw_copy, out)
    delays = np.random.default_rng(20).uniform(0, duration * 1.1, size=20).tolist()
    outcomes = kill_builds_at(raw_copy, out, delays)
    print(f"20 random SIGKILLs of build: {outcomes}, 0 caches lost")


@pytest.mark.slow
def test_reader_sees_consistent_data_while_build_force_replaces_the_file(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    reader = CacheReader(out)
    old_volumes = [reader.read_volume(row) for row in range(len(reader))]
    old_fingerprint = reader.fingerprint
    process = subprocess.Popen(build_command(raw_copy, out, "--force", "--hu-window", "-900", "300"), cwd=ROOT,
                               env=ENVIRONMENT, stderr=subprocess.PIPE, text=True)
    reads = 0
    while process.poll() is None or reads < 50:
        row = reads % len(old_volumes)
        assert np.array_equal(reader.read_volume(row), old_volumes[row])
        reads += 1
    assert process.wait() == 0, process.stderr.read()
    assert reader.fingerprint == old_fingerprint  # the open handle still reads the old file
    reader.close()
    with CacheReader(out) as new_reader:
        assert new_reader.fingerprint != old_fingerprint
        assert not np.array_equal(new_reader.read_volume(0), old_volumes[0])


def limit_file_size(limit_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.parametrize("limit_bytes", [100_000, 700_000])  # the first write fails / a later one does
def test_file_size_limit_fails_with_one_line_and_keeps_the_cache(raw_copy, tmp_path, limit_bytes):
    out = tmp_path / "cache.h5"
    build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=(8, 8, 8), quiet=True))
    before = out.read_bytes()
    result = subprocess.run(build_command(raw_copy, out, "--force"), cwd=ROOT, env=ENVIRONMENT,
                            capture_output=True, text=True, preexec_fn=limit_file_size(limit_bytes))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m preprocess: error: could not write the cache beside {out}: File too large; "
        "the previous cache is untouched"]
    assert out.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.h5", "raw"]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 4 MiB tmpfs, where the machine lets us mount one (root); otherwise a skip."""
    mount_point = tmp_path / "tinyfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_fails_with_one_line_and_keeps_the_cache(raw_copy, tiny_filesystem, monkeypatch):
    out = tiny_filesystem / "cache.h5"
    build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=(8, 8, 8), quiet=True))
    before = out.read_bytes()
    # 16 scans at 64 x 64 x 32 need 8 MiB: refused up front, before any work
    result = subprocess.run(build_command(raw_copy, out, "--force", "--shape", "64", "64", "32"), cwd=ROOT,
                            env=ENVIRONMENT, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not enough disk space" in lines[0], lines
    assert out.read_bytes() == before and [path.name for path in tiny_filesystem.iterdir()] == ["cache.h5"]
    # without the up-front check (space can also run out while a build runs), the real ENOSPC
    monkeypatch.setattr("preprocess.cache.writer.check_free_space", lambda folder, needed_bytes: None)
    with pytest.raises(CacheError, match="No space left on device; the previous cache is untouched"):
        build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=(64, 64, 32), force=True, quiet=True))
    assert out.read_bytes() == before and [path.name for path in tiny_filesystem.iterdir()] == ["cache.h5"]


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: tmp / "a_file" / "cache.h5", "does not exist or is not a folder"),
    (lambda tmp: tmp / "missing" / "cache.h5", "does not exist or is not a folder"),
    (lambda tmp: tmp, "is a folder"),
])
def test_unwritable_output_gets_one_line_and_nothing_written(synthetic_raw, tmp_path, capsys, make_out, message):
    (tmp_path / "a_file").write_text("I am a file")
    before = sorted(path.name for path in tmp_path.rglob("*"))
    code = main(["build", "--raw", str(synthetic_raw), "--out", str(make_out(tmp_path)), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and message in error and "\n" not in error
    assert sorted(path.name for path in tmp_path.rglob("*")) == before


# -- fuzzing the NIfTI reader ----------------------------------------------------------------------
def valid_scan_bytes() -> bytes:
    """A small phantom chest (16 x 16 pixels): a scan `build` caches, before any mutation."""
    from preprocess.phantoms.synth import make_phantom

    phantom = make_phantom(0, 0, False, size=16, slice_range=(6, 6))
    return nib.Nifti1Image(phantom.hu, phantom.affine).to_bytes()


VALID = valid_scan_bytes()
HEADER_FIELDS = [(name, offset, np.dtype(dtype)) for name, (dtype, offset) in
                 nib.Nifti1Header.template_dtype.fields.items()]


@st.composite
def mutated_scans(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "byte", "truncate", "extend"]))
        if kind == "field" and len(data) >= 348:  # a header field set to an arbitrary value of its type
            name, offset, dtype = draw(st.sampled_from(HEADER_FIELDS))
            data[offset:offset + dtype.itemsize] = draw(st.binary(min_size=dtype.itemsize, max_size=dtype.itemsize))
        elif kind == "byte" and data:
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(max_size=64))
    if draw(st.booleans()):
        return gzip.compress(bytes(data), mtime=0)
    return bytes(data)


# CI runs the same 300 examples every time; FUZZ_EXAMPLES=5000 FUZZ_RANDOM=1 explores further
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=5000,
          derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(mutated_scans(), st.binary(max_size=2048)))
def test_fuzzed_files_are_either_cached_or_refused_with_a_reason(tmp_path, payload):
    path = tmp_path / "fuzz.nii.gz"
    path.write_bytes(payload)
    start = time.monotonic()
    try:
        volume, _ = preprocess_scan(path, (8, 8, 4), -1000.0, 400.0)
    except ScanError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert volume.shape == (8, 8, 4) and volume.dtype == np.float32
        assert np.isfinite(volume).all() and volume.min() >= 0 and volume.max() <= 1
    assert time.monotonic() - start < 5


def test_fuzzed_archive_builds_with_every_file_cached_or_recorded(tmp_path):
    """A whole build over hostile files: it finishes, and every file is a row or a failure."""
    raw = tmp_path / "raw" / "CT-1"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for index in range(30):
        data = bytearray(VALID)
        for _ in range(3):
            name, offset, dtype = HEADER_FIELDS[rng.integers(len(HEADER_FIELDS))]
            data[offset:offset + dtype.itemsize] = rng.bytes(dtype.itemsize)
        (raw / f"scan_{index:02d}.nii.gz").write_bytes(gzip.compress(bytes(data)))
    (raw / "scan_valid.nii").write_bytes(VALID)
    report = build_cache(BuildOptions(raw=tmp_path / "raw", out=tmp_path / "c.h5", jobs=2, shape=(8, 8, 4),
                                      scan_timeout_seconds=30, quiet=True))
    assert report.cached + len(report.failures) == 31 and report.cached >= 1
    assert all(failure.reason for failure in report.failures)


# -- every numeric flag: zero, negative, huge, not a number ----------------------------------------
NUMERIC_FLAGS = {
    "build": {"--jobs": 1, "--shape": 3, "--seed": 1, "--val-fraction": 1, "--test-fraction": 1,
              "--hu-window": 2, "--scan-timeout": 1},
    "synth": {"--normal": 1, "--abnormal": 1, "--size": 1, "--slices": 2, "--seed": 1},
    "show": {"--index": 1},
}
VALUES = ["0", "-1", "100000000000000000000000", "1000000000000", "abc", "nan", "inf", "-inf", "1e400"]
ACCEPTED = {("build", "--seed", "0"), ("build", "--val-fraction", "0"), ("build", "--test-fraction", "0"),
            ("synth", "--seed", "0"), ("synth", "--normal", "0"), ("synth", "--abnormal", "0"),
            ("show", "--index", "0"), ("build", "--seed", "1000000000000"), ("synth", "--seed", "1000000000000")}
CASES = [(command, flag, value) for command, flags in NUMERIC_FLAGS.items() for flag in flags for value in VALUES
         if (command, flag, value) not in ACCEPTED]


@pytest.mark.parametrize("command, flag, value", CASES)
def test_bad_numbers_get_one_line_and_a_nonzero_exit(tiny_cache, tmp_path, capsys, command, flag, value):
    arguments = [value] * NUMERIC_FLAGS[command][flag]
    prefix = {"build": ["build", "--raw", str(tmp_path / "none"), "--out", str(tmp_path / "c.h5")],
              "synth": ["synth", "--out", str(tmp_path / "synth"), "--size", "32", "--normal", "1"],
              "show": ["show", str(tiny_cache), "--out", str(tmp_path / "s.png")]}[command]
    try:
        code = main([*prefix, flag, *arguments])
    except SystemExit as exit:
        code = exit.code
    error = capsys.readouterr().err.strip()
    assert code != 0, f"{command} {flag} {value} was accepted"
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "s.png").exists()
    assert not list((tmp_path / "synth").rglob("*.nii.gz")) if (tmp_path / "synth").exists() else True


def test_a_scan_over_the_time_limit_is_recorded_and_retried_next_time(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    shutil.copy(raw_copy / "CT-0" / "study_0000.nii.gz", raw_copy / "CT-0" / "study_0099.nii.gz")
    report = build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=TINY_SHAPE, quiet=True,
                                      scan_timeout_seconds=1e-6))  # only the new scan is processed
    assert report.cached == 16
    assert [(failure.source_path, failure.reason) for failure in report.failures] == [
        ("CT-0/study_0099.nii.gz", "took longer than 1e-06 s (--scan-timeout)")]
    retried = build_cache(BuildOptions(raw=raw_copy, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    assert (retried.cached, retried.reprocessed, retried.failures) == (17, 1, [])
