"""`preprocess build`: the cache contract, determinism, incremental rebuilds, bad input, kills."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_SHAPE, run_python_module, write_nifti
from common.errors import UserError
from common.files import TEMP_MARKER
from preprocess.__main__ import main
from preprocess.engine.build import BuildOptions, build_cache
from preprocess.cache import SCHEMA_VERSION, CacheReader
from preprocess.engine.workers import HANDOFF_PREFIX, SHARED_MEMORY_FOLDER, VolumeHandoff, remove_orphaned_handoffs


def build(raw, out, **overrides):
    return build_cache(BuildOptions(raw=raw, out=out, jobs=overrides.pop("jobs", 1), shape=TINY_SHAPE,
                                    quiet=True, **overrides))


def content(path):
    """Everything that must be reproducible: arrays, row order, labels, splits."""
    with CacheReader(path) as reader:
        volumes = np.stack([reader.read_volume(row) for row in range(len(reader))])
        return (volumes, reader.scan_ids, reader.labels.tolist(),
                {name: reader.split(name).tolist() for name in ("train", "val", "test")}, reader.fingerprint)


def assert_same_content(first, second):
    assert np.array_equal(first[0], second[0])
    assert first[1:] == second[1:]


def test_cache_contract(tiny_cache, synthetic_raw):
    with CacheReader(tiny_cache) as reader:
        volumes = reader.file["volumes"]
        assert volumes.dtype == np.float32 and volumes.shape == (16, *TINY_SHAPE)
        assert volumes.chunks == (1, *TINY_SHAPE)
        data = volumes[:]
        assert data.min() >= 0 and data.max() <= 1 and data.std() > 0.05
        scan_ids, labels, classes = reader.scan_ids, reader.labels, reader.class_names
        assert scan_ids == sorted(set(scan_ids))
        assert all(scan_id.startswith(("CT-0/study_", "CT-1/study_")) for scan_id in scan_ids)
        assert [int(name != "CT-0") for name in classes] == labels.tolist()
        assert (labels == 0).sum() == 8 and (labels == 1).sum() == 8
        splits = [reader.split(name) for name in ("train", "val", "test")]
        assert sorted(np.concatenate(splits).tolist()) == list(range(16))
        attrs = reader.attributes
        assert attrs["schema_version"] == SCHEMA_VERSION
        assert attrs["shape"] == list(TINY_SHAPE)
        assert (attrs["hu_min"], attrs["hu_max"]) == (-1000.0, 400.0)
        assert "area" in attrs["resample_method"] and attrs["orientation"] == "RAS"
        assert (attrs["seed"], attrs["val_fraction"], attrs["test_fraction"]) == (0, 0.15, 0.15)
        assert attrs["package_version"]
        for item in reader.records():  # every row traces back to its file
            source = synthetic_raw / item.source_path
            assert hashlib.sha256(source.read_bytes()).hexdigest() == item.source_sha256
            assert source.stat().st_size == item.source_size
            assert item.scan_id == f"{item.class_name}/{source.name.removesuffix('.nii.gz')}"


def test_same_content_whatever_jobs(synthetic_raw, tiny_cache, tmp_path):
    build(synthetic_raw, tmp_path / "two.h5", jobs=2)
    assert_same_content(content(tiny_cache), content(tmp_path / "two.h5"))


def test_same_content_with_worker_threads(synthetic_raw, tiny_cache, tmp_path):
    build(synthetic_raw, tmp_path / "threads.h5", jobs=2, backend="threads")
    assert_same_content(content(tiny_cache), content(tmp_path / "threads.h5"))


def handoff_folders() -> set[Path]:
    return set(SHARED_MEMORY_FOLDER.glob(f"{HANDOFF_PREFIX}*")) if SHARED_MEMORY_FOLDER.is_dir() else set()


@pytest.mark.skipif(not SHARED_MEMORY_FOLDER.is_dir(), reason="volumes take the pipe where there is no /dev/shm")
def test_workers_hand_volumes_over_in_shared_memory_and_leave_nothing(synthetic_raw, tiny_cache, tmp_path,
                                                                      monkeypatch):
    handed, taken = [], []
    original_take = VolumeHandoff.take

    def counting_take(self, volume, shape):
        handed.append(volume)
        taken.append(self.folder)
        return original_take(self, volume, shape)

    monkeypatch.setattr(VolumeHandoff, "take", counting_take)
    before = handoff_folders()
    build(synthetic_raw, tmp_path / "two.h5", jobs=2)
    assert len(handed) == 16 and all(isinstance(name, str) for name in handed), "volumes came through the pipe"
    assert all(folder.parent == SHARED_MEMORY_FOLDER for folder in taken)
    assert handoff_folders() == before, "the build left its handoff folder behind"
    assert_same_content(content(tiny_cache), content(tmp_path / "two.h5"))


def test_handoff_without_shared_memory_returns_the_volume_itself(tmp_path):
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    through_pipe = VolumeHandoff(None)
    assert through_pipe.take(through_pipe.put(volume), volume.shape) is volume
    full = VolumeHandoff(tmp_path / "gone")  # the folder vanished (or is full): the worker sends the array
    assert full.put(volume) is volume
    shared = VolumeHandoff(tmp_path)
    name = shared.put(volume)
    assert isinstance(name, str) and (tmp_path / name).is_file()
    np.testing.assert_array_equal(shared.take(name, volume.shape), volume)
    assert not (tmp_path / name).exists()


def test_handoff_folders_of_killed_builds_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{HANDOFF_PREFIX}{int(dead.stdout)}-abc"
    alive = tmp_path / f"{HANDOFF_PREFIX}{os.getpid()}-def"
    for folder in (orphan, alive):
        folder.mkdir()
        (folder / "volume.f32").write_bytes(b"\0" * 16)
    remove_orphaned_handoffs(tmp_path)
    assert not orphan.exists() and alive.exists()


def test_rebuild_with_unchanged_inputs_is_up_to_date(synthetic_raw, tmp_path):
    out = tmp_path / "cache.h5"
    build(synthetic_raw, out)
    stamp = out.stat().st_mtime_ns
    report = build(synthetic_raw, out)
    assert report.up_to_date and report.cached == 16 and report.reprocessed == 0
    assert out.stat().st_mtime_ns == stamp  # not even rewritten


def test_incremental_rebuild_reprocesses_only_changes(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build(raw_copy, out)
    shutil.copy(raw_copy / "CT-1" / "study_0008.nii.gz", raw_copy / "CT-1" / "study_0100.nii.gz")  # added
    changed = raw_copy / "CT-0" / "study_0001.nii.gz"
    changed.write_bytes((raw_copy / "CT-0" / "study_0002.nii.gz").read_bytes())  # changed
    (raw_copy / "CT-0" / "study_0003.nii.gz").unlink()  # removed
    report = build(raw_copy, out)
    assert (report.cached, report.reprocessed, report.reused) == (16, 2, 14)
    fresh = tmp_path / "fresh.h5"
    build(raw_copy, fresh)
    assert_same_content(content(out), content(fresh))


def test_a_version_1_cache_is_read_and_rebuilt_into_the_current_version_with_one_line(synthetic_raw, tmp_path, capsys):
    import h5py

    out = tmp_path / "cache.h5"
    build(synthetic_raw, out)
    with CacheReader(out) as reader:
        stats = reader.scan_stats()
        assert reader.has_scan_stats and len(stats) == 16 and stats[0].slices >= 8
        assert sum(stats[0].hu_histogram) == pytest.approx(1.0) and 0.0 < stats[0].lung_fraction < 1.0
    with h5py.File(out, "r+") as file:  # what a build before /scan_stats wrote
        del file["scan_stats"]
        file.attrs["schema_version"] = 1
    with CacheReader(out) as reader:
        assert not reader.has_scan_stats and reader.scan_stats() is None and len(reader.records()) == 16
    assert main(["info", str(out)]) == 0
    assert "scan stats   none (a version-1 cache" in capsys.readouterr().out
    assert main(["build", "--raw", str(synthetic_raw), "--out", str(out), "--shape", *map(str, TINY_SHAPE),
                 "--jobs", "1"]) == 0
    assert f"{out} is a version-1 cache (no scan statistics): rebuilding every scan" in capsys.readouterr().err
    with CacheReader(out) as reader:
        assert reader.schema_version == SCHEMA_VERSION == 4 and reader.scan_stats() == stats
        assert len(reader.records()) == 16


def test_changed_option_rebuilds_everything_and_force_always_does(synthetic_raw, tmp_path):
    out = tmp_path / "cache.h5"
    build(synthetic_raw, out)
    assert build(synthetic_raw, out, hu_window=(-1000.0, 300.0)).reprocessed == 16
    assert build(synthetic_raw, out, hu_window=(-1000.0, 300.0), force=True).reprocessed == 16
    report = build(synthetic_raw, out, hu_window=(-1000.0, 300.0), seed=5)  # new splits, same arrays
    assert not report.up_to_date and report.reprocessed == 0 and report.reused == 16


def add_bad_files(raw: Path):
    good = (raw / "CT-0" / "study_0000.nii.gz").read_bytes()
    (raw / "CT-1" / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    (raw / "CT-1" / "notes.nii").write_text("not a scan")
    (raw / "CT-0" / "empty.nii.gz").write_bytes(b"")
    write_nifti(raw / "CT-0" / "flat.nii.gz", np.zeros((16, 16), np.int16))
    (raw / "CT-0" / "readme.txt").write_text("ignored: not a NIfTI name")
    return {"CT-1/truncated.nii.gz", "CT-1/notes.nii", "CT-0/empty.nii.gz", "CT-0/flat.nii.gz"}


def test_bad_files_are_skipped_recorded_and_summarised(raw_copy, tmp_path, caplog):
    bad = add_bad_files(raw_copy)
    out = tmp_path / "cache.h5"
    with caplog.at_level("WARNING"):
        report = build(raw_copy, out)
    assert report.cached == 16 and {failure.source_path for failure in report.failures} == bad
    for path in bad:  # one line each, naming the file
        assert any(path in message and "\n" not in message for message in caplog.messages)
    with CacheReader(out) as reader:
        assert {failure.source_path for failure in reader.failures()} == bad
        assert len(reader) == 16
    assert build(raw_copy, out).up_to_date  # known failures are not retried while unchanged


def test_strict_fails_and_keeps_the_previous_cache(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build(raw_copy, out)
    before = out.read_bytes()
    add_bad_files(raw_copy)
    with pytest.raises(UserError, match="--strict: CT-"):
        build(raw_copy, out, strict=True)
    assert out.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.h5", "raw"]


def test_stale_temporary_files_are_cleaned(synthetic_raw, tmp_path):
    out = tmp_path / "cache.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".cache.h5.tmp-{dead.stdout.strip()}"
    stale.write_bytes(b"half a cache")
    build(synthetic_raw, out)
    assert not stale.exists() and out.exists()


def test_file_that_is_not_a_cache_is_only_replaced_with_force(synthetic_raw, tmp_path):
    out = tmp_path / "precious.h5"
    out.write_text("someone's notes")
    with pytest.raises(UserError, match="without --force"):
        build(synthetic_raw, out)
    assert out.read_text() == "someone's notes"
    assert build(synthetic_raw, out, force=True).cached == 16


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def start_forced_build_and_wait_for_its_temp_file(raw: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A real `build --force` subprocess, returned once its temporary file exists (mid-build)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "preprocess", "build", "--raw", str(raw), "--out", str(out), "--jobs", "2",
         "--shape", *map(str, TINY_SHAPE), "--force", "--quiet"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    temp = out.with_name(f".{out.name}.tmp-{process.pid}")
    deadline = time.monotonic() + 60
    while not temp.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return process, temp


@pytest.mark.slow
def test_sigkill_mid_build_leaves_the_previous_cache(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build(raw_copy, out)
    before = out.read_bytes()
    process, temp = start_forced_build_and_wait_for_its_temp_file(raw_copy, out)
    workers = children_of(process.pid)
    handoff = handoff_folders()
    process.send_signal(signal.SIGKILL)
    process.wait()  # not communicate(): the workers may hold the pipes open a moment longer
    assert temp.exists(), "the build finished before it could be killed mid-way"
    assert out.read_bytes() == before
    assert workers, "no worker processes seen"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "orphaned workers outlived the build"
    report = build(raw_copy, out, force=True)
    assert report.cached == 16 and not temp.exists()
    orphaned = {folder for folder in handoff if folder.name.startswith(f"{HANDOFF_PREFIX}{process.pid}-")}
    assert orphaned or not SHARED_MEMORY_FOLDER.is_dir(), "the killed build had no handoff folder"
    assert not any(folder.exists() for folder in orphaned), "the killed build's handoff folder was not removed"


@pytest.mark.slow
def test_ctrl_c_mid_build_exits_130_and_cleans_up(raw_copy, tmp_path):
    out = tmp_path / "cache.h5"
    build(raw_copy, out)
    before = out.read_bytes()
    process, _ = start_forced_build_and_wait_for_its_temp_file(raw_copy, out)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "python -m preprocess: interrupted; nothing was replaced", stderr
    assert out.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.h5", "raw"]


@pytest.mark.parametrize("flags, message", [
    (["--shape", "0", "32", "16"], "--shape: must be at least 1"),
    (["--shape", "a", "32", "16"], "expected a whole number"),
    (["--shape", "32", "16"], "expected 3 arguments"),
    (["--shape", "4096", "32", "16"], "--shape needs three sizes"),
    (["--jobs", "0"], "--jobs: must be at least 1"),
    (["--jobs", "-2"], "--jobs: must be at least 1"),
    (["--val-fraction", "1.5"], "must be in [0, 1)"),
    (["--val-fraction", "nan"], "finite number"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "sum < 1"),
    (["--seed", "-1"], "must be 0 or more"),
    (["--hu-window", "400", "-1000"], "LOW < HIGH"),
])
def test_bad_flags_get_one_line_and_nonzero_exit(synthetic_raw, tmp_path, capsys, flags, message):
    code = exit_code_of(["build", "--raw", str(synthetic_raw), "--out", str(tmp_path / "c.h5"), *flags])
    error = capsys.readouterr().err.strip()
    assert code != 0
    assert message in error and "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "c.h5").exists()


def exit_code_of(argv: list[str]) -> int:
    """`main`'s exit code, whether it returns one or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("make_raw, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no scans in"),
    (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", "is not a folder"),
])
def test_bad_raw_folder_in_a_real_subprocess(tmp_path, make_raw, message):
    raw = make_raw(tmp_path)
    result = run_python_module("preprocess", "build", "--raw", str(raw), "--out", str(tmp_path / "c.h5"))
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.skipif(not SHARED_MEMORY_FOLDER.is_dir(), reason="needs /dev/shm, where handoff folders live")
def test_a_build_refused_for_bad_input_says_one_line_and_cleans_nothing(tmp_path):
    # another (killed) build's leftovers: a refused build neither touches them nor reports them
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = SHARED_MEMORY_FOLDER / f"{HANDOFF_PREFIX}{int(dead.stdout)}-refused-build-test"
    stale_temp = tmp_path / f".c.h5{TEMP_MARKER}{int(dead.stdout)}"
    orphan.mkdir()
    stale_temp.write_bytes(b"half a cache")
    try:
        (tmp_path / "empty").mkdir()
        result = run_python_module("preprocess", "build", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "c.h5"))
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "no scans in" in result.stderr
        assert orphan.is_dir() and stale_temp.is_file()
    finally:
        shutil.rmtree(orphan, ignore_errors=True)


def test_all_bad_scans_is_an_error_not_an_empty_cache(tmp_path):
    (tmp_path / "raw" / "CT-0").mkdir(parents=True)
    (tmp_path / "raw" / "CT-0" / "a.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 scans"):
        build(tmp_path / "raw", tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()


def test_build_never_imports_tensorflow(synthetic_raw, tmp_path):
    code = ("import sys; from preprocess.__main__ import main; "
            f"main(['build', '--raw', {str(synthetic_raw)!r}, '--out', {str(tmp_path / 'c.h5')!r}, "
            "'--shape', '8', '8', '8', '--jobs', '2', '--quiet']); "
            "main(['info', " + repr(str(tmp_path / "c.h5")) + "]); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'tensorflow imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


def test_info_and_show(tiny_cache, tmp_path, capsys):
    assert main(["info", str(tiny_cache)]) == 0
    printed = capsys.readouterr().out
    for expected in ("scans        16  (normal 8, abnormal 8)", "32 x 32 x 16", "[-1000, 400]", "train", "failures     0"):
        assert expected in printed
    png = tmp_path / "scan.png"
    assert main(["show", str(tiny_cache), "--scan-id", "CT-1/study_0008", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(tiny_cache), "--index", "99"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope.h5")]) == 1


def test_build_and_predict_describe_a_scan_that_cannot_be_used_alike(tmp_path):
    """One failure ladder (`preprocess.engine.scans.describe_scan_failure`) for `build` and `predict`: same file, same words."""
    from preprocess.engine.scans import process_source
    from preprocess.reading.formats import describe_scan_failure
    from preprocess.finding.sources import Source
    from preprocess.reading.canonical import ScanError
    from preprocess.reading.transform import preprocess_scan

    missing = tmp_path / "CT-0" / "gone.nii.gz"
    source = Source(missing, "CT-0/gone.nii.gz", "CT-0/gone", "CT-0", 0, 0, 0)
    outcome = process_source(source, BuildOptions(shape=TINY_SHAPE).preprocessing, 60.0)
    with pytest.raises(FileNotFoundError) as raised:  # what `predict` sees for the same file
        preprocess_scan(missing, TINY_SHAPE, -1000.0, 400.0)
    assert outcome.reason == describe_scan_failure(raised.value) == f"unreadable (FileNotFoundError: {raised.value})"
    assert outcome.cannot_open and outcome.volume is None
    assert describe_scan_failure(ScanError("empty file")) == "empty file"
    assert describe_scan_failure(MemoryError()) == "too large to load into memory"


def make_version_2(out: Path) -> None:
    """Turn a cache into what a build before the lungs wrote: no lung tables, no crop attributes."""
    import h5py

    from preprocess.cache.schema import LUNG_TABLES

    with h5py.File(out, "r+") as file:
        for name in LUNG_TABLES:
            del file["scan_stats"][name]
        for name in ("crop", "lung_method"):
            del file.attrs[name]
        file.attrs["schema_version"] = 2


def test_the_lung_crop_is_the_default_and_recorded_per_scan(synthetic_raw, tmp_path, capsys):
    cropped, whole = tmp_path / "lungs.h5", tmp_path / "whole.h5"
    build(synthetic_raw, cropped)
    build(synthetic_raw, whole, crop="none")
    with CacheReader(cropped) as reader, CacheReader(whole) as plain:
        assert reader.preprocessing.crop == "lungs" and plain.preprocessing.crop == "none"
        assert reader.attributes["lung_method"].startswith("HU < -400") and plain.attributes["lung_method"] == ""
        assert reader.fingerprint != plain.fingerprint  # the crop is part of what the arrays are
        stats, plain_stats = reader.scan_stats(), plain.scan_stats()
        for row, (item, source_shape) in enumerate(zip(stats, (r.source_shape for r in reader.records()))):
            x0, x1, y0, y1, z0, z1 = item.lung_box
            assert item.lung_count == 2 and item.lung_volume_ml > 1000
            assert 0 <= x0 < x1 <= source_shape[0] and (x1 - x0) < source_shape[0]  # a box, not the scan
            assert item.lung_box == plain_stats[row].lung_box  # found either way; cropped only with "lungs"
            assert not np.array_equal(reader.read_volume(row), plain.read_volume(row))
    assert main(["info", str(cropped)]) == 0
    out = capsys.readouterr().out
    assert "crop         each scan's lungs' box (HU < -400" in out
    assert "lungs        found in 16 of 16 scans (two lungs in 16, one in 0)" in out
    assert main(["info", str(whole)]) == 0
    assert "crop         none: whole scans" in capsys.readouterr().out
    # changing the crop rebuilds every scan, as any option that changes the arrays does
    assert build(synthetic_raw, whole).reprocessed == 16
    with pytest.raises(UserError, match="--crop must be one of lungs, none, got heart"):
        build(synthetic_raw, tmp_path / "other.h5", crop="heart")


def test_a_version_2_cache_is_read_said_to_have_no_lungs_and_rebuilt(synthetic_raw, tmp_path, capsys):
    out = tmp_path / "cache.h5"
    build(synthetic_raw, out, crop="none")
    make_version_2(out)
    with CacheReader(out) as reader:
        assert not reader.has_lungs and reader.has_scan_stats and reader.preprocessing.crop == "none"
        assert all(item.lung_box is None and not item.has_lungs for item in reader.scan_stats())
    assert main(["info", str(out)]) == 0
    assert "lungs        not searched (a version-2 cache, built before the lung crop" in capsys.readouterr().out
    report = build(synthetic_raw, out, crop="none")  # same options: still every scan, to add the lungs
    assert report.reprocessed == 16
    assert f"{out} is a version-2 cache (no lungs): rebuilding every scan" in capsys.readouterr().err
    with CacheReader(out) as reader:
        assert reader.has_lungs and reader.schema_version == SCHEMA_VERSION


def test_a_scan_without_enough_lung_fails_the_build_with_the_reason_predict_gives(synthetic_raw, real_ct, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    shutil.copy(real_ct / "thorax_abdomen_3mm_small.nii.gz", raw / "CT-1" / "abdomen.nii.gz")
    report = build(raw, tmp_path / "cache.h5")
    assert report.cached == 16
    [failure] = report.failures
    assert failure.source_path == "CT-1/abdomen.nii.gz"
    assert failure.reason.startswith("only 116 mL of lung over 36 mm head to foot; a chest CT we can judge shows at "
                                     "least 200 mL")
    # --crop none does not lift the rule: a scan we would not judge is not trained on either way
    assert [f.reason for f in build(raw, tmp_path / "whole.h5", crop="none").failures] == [failure.reason]


def test_a_too_short_scan_fails_the_build_with_the_reason_predict_gives(synthetic_raw, tmp_path):
    from preprocess.phantoms.synth import make_phantom, write_phantom

    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    phantom = make_phantom(5, 0, False, size=48, slice_range=(12, 12))
    affine = phantom.affine.copy()
    affine[2, 2] = 1.5  # 12 slices of 1.5 mm: 18 mm head to foot
    write_phantom(type(phantom)(phantom.hu, affine, phantom.lesion_mask, phantom.lung_mask), raw / "CT-0" / "short.nii.gz")
    report = build(raw, tmp_path / "cache.h5")
    [failure] = report.failures
    assert failure.source_path == "CT-0/short.nii.gz"
    assert failure.reason == "covers 18 mm head to foot; a chest CT covers at least 20 mm"


def test_show_draws_the_box_on_the_whole_scan_and_says_which_region_a_volume_is(synthetic_raw, tmp_path, capsys):
    from preprocess.reading.lungs import describe_region

    out = tmp_path / "cache.h5"
    build(synthetic_raw, out)
    with CacheReader(out) as reader:
        stats = reader.scan_stats()[3]
    region = describe_region("lungs", stats.lung_box, stats.scan_shape)
    x0, x1, y0, y1, z0, z1 = stats.lung_box
    assert region == (f"the lungs' box, voxels {x0}-{x1} left-right, {y0}-{y1} front-back, {z0}-{z1} head-foot "
                      f"of the scan's 48 x 48 x {stats.slices} (RAS)")
    assert describe_region("none", stats.lung_box, stats.scan_shape) == "the whole scan (no lung crop)"
    assert main(["show", str(out), "--index", "3", "--out", str(tmp_path / "box.png"), "--raw", str(synthetic_raw)]) == 0
    assert main(["show", str(out), "--index", "3", "--out", str(tmp_path / "volume.png")]) == 0
    assert (tmp_path / "box.png").stat().st_size > 1000 and (tmp_path / "volume.png").stat().st_size > 1000
    capsys.readouterr()
    # the negative case: a --raw that does not hold the scan is one line, and no picture
    assert main(["show", str(out), "--index", "3", "--out", str(tmp_path / "none.png"), "--raw", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert "cannot show" in error and "\n" not in error and not (tmp_path / "none.png").exists()
