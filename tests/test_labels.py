"""`build --labels FILE.csv`: classes from a CSV, mixed NIfTI and DICOM, bad files, relabelling without reprocessing."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_SHAPE, write_nifti
from common.errors import UserError
from preprocess.__main__ import main
from preprocess.engine.build import BuildOptions, build_cache
from preprocess.cache import CacheReader

pytest.importorskip("pydicom")
from dicom_series import phantom_volume, write_series  # noqa: E402


def build(raw, out, labels, **overrides):
    return build_cache(BuildOptions(raw=raw, out=out, jobs=1, shape=TINY_SHAPE, quiet=True, labels=labels,
                                    **overrides))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Scans in no class layout at all: two NIfTI files, a DICOM series, a folder of two series, a stray file."""
    raw = tmp_path_factory.mktemp("labelled") / "raw"
    hu, spacing = phantom_volume(size=32, slices=8)
    write_nifti(raw / "site-a" / "p1.nii.gz", hu, np.diag([*spacing, 1.0]))
    write_nifti(raw / "site-a" / "p2.nii", hu[::-1].copy(), np.diag([*spacing, 1.0]))
    write_series(raw / "site-b" / "p3" / "ct", hu, spacing, intercept=-1024)
    write_series(raw / "site-b" / "p4", hu, spacing, series_uid="1.2.3.1")
    write_series(raw / "site-b" / "p4", hu, spacing, "feet-first-supine", series_uid="1.2.3.2", suffix="")
    write_nifti(raw / "unlisted" / "p5.nii.gz", hu, np.diag([*spacing, 1.0]))
    return raw


ROWS = "path,class\nsite-a/p1.nii.gz,normal\nsite-a/p2.nii,covid\nsite-b/p3/ct,normal\nsite-b/p4,covid\n"


def test_build_from_a_labels_file_with_mixed_formats_and_free_class_names(archive, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text(ROWS)
    out = tmp_path / "cache.h5"
    assert main(["build", "--raw", str(archive), "--out", str(out), "--labels", str(labels), "--normal-class",
                 "normal", "--shape", *map(str, TINY_SHAPE), "--jobs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "5 scans cached" in printed and "1 scan file(s) under --raw are not in --labels and were ignored" in printed
    with CacheReader(out) as reader:
        assert reader.scan_ids == ["site-a/p1", "site-a/p2", "site-b/p3/ct", "site-b/p4/1.2.3.1", "site-b/p4/1.2.3.2"]
        assert reader.class_names == ["normal", "covid", "normal", "covid", "covid"]
        assert reader.labels.tolist() == [0, 1, 0, 1, 1]
        np.testing.assert_allclose(reader.read_volume(2), reader.read_volume(0), atol=1e-6)  # DICOM == NIfTI
        np.testing.assert_allclose(reader.read_volume(4), reader.read_volume(3), atol=1e-6)
    # the default normal class is CT-0: here every class is then abnormal
    report = build(archive, tmp_path / "default.h5", labels)
    with CacheReader(report.out) as reader:
        assert reader.labels.tolist() == [1] * 5


def test_changing_one_class_relabels_that_row_without_reprocessing(archive, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(ROWS)
    out = tmp_path / "cache.h5"
    assert build(archive, out, labels, normal_class="normal").reprocessed == 5
    with CacheReader(out) as reader:
        fingerprint, volume = reader.fingerprint, reader.read_volume(2)
    assert build(archive, out, labels, normal_class="normal").up_to_date
    labels.write_text(ROWS.replace("site-b/p3/ct,normal", "site-b/p3/ct,covid"))
    report = build(archive, out, labels, normal_class="normal")
    assert (report.reprocessed, report.reused, report.up_to_date) == (0, 5, False)
    with CacheReader(out) as reader:
        assert reader.class_names[2] == "covid" and reader.labels[2] == 1
        np.testing.assert_array_equal(reader.read_volume(2), volume)
        assert reader.fingerprint != fingerprint
        fingerprint = reader.fingerprint
    # the file's content is in the fingerprint: same classes, rows reordered, is another labels file
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    report = build(archive, out, labels, normal_class="normal")
    assert (report.reprocessed, report.up_to_date) == (0, False)
    with CacheReader(out) as reader:
        assert reader.fingerprint != fingerprint


BAD_FILES = {
    "missing column": (b"path,label\nsite-a/p1.nii.gz,normal\n", "row 1: no `class` column"),
    "path twice": (b"path,class\nsite-a/p1.nii.gz,normal\nsite-a/p2.nii,covid\nsite-a/p1.nii.gz,covid\n",
                   "row 4: site-a/p1.nii.gz is listed twice (also row 2)"),
    "path missing": (b"path,class\nsite-a/p1.nii.gz,normal\nsite-a/p9.nii.gz,covid\n",
                     "row 3: site-a/p9.nii.gz does not exist in"),
    "empty": (b"", "empty labels file"),
    "blank lines only": (b"\n  \n", "empty labels file"),
    "header only": (b"path,class\n", "no rows below the header"),
    "not utf-8": ("path,class\nsite-a/p1.nii.gz,normal\nsite-a/p2.nii,pneumonía\n".encode("latin-1"),
                  "row 3: not UTF-8 (byte 0xed)"),
    "outside raw": (b"path,class\n../p1.nii.gz,normal\n", "row 2: ../p1.nii.gz must be a path inside --raw"),
    "not a scan": (b"path,class\nsite-a,normal\n", "row 2: site-a holds no DICOM files"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_each_bad_labels_file_gets_one_line_naming_file_and_row(archive, tmp_path, capsys, kind):
    content, message = BAD_FILES[kind]
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    with pytest.raises(UserError, match=None) as error:
        build(archive, tmp_path / "cache.h5", labels)
    assert str(error.value).startswith(f"{labels}: ") and message in str(error.value)
    assert main(["build", "--raw", str(archive), "--out", str(tmp_path / "cache.h5"), "--labels", str(labels),
                 "--quiet"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "cache.h5").exists()


def test_normal_class_needs_a_labels_file_and_a_name(archive, tmp_path):
    with pytest.raises(UserError, match="--normal-class is for --labels"):
        build(archive, tmp_path / "cache.h5", None, normal_class="normal")
    (tmp_path / "labels.csv").write_text(ROWS)
    with pytest.raises(UserError, match="--normal-class needs a class name"):
        build(archive, tmp_path / "cache.h5", tmp_path / "labels.csv", normal_class=" ")


def test_severity_orders_free_class_names_by_their_grade_number(tmp_path):
    from train.network.tasks import make_task

    class FakeReader:
        path = tmp_path / "cache.h5"
        class_names = ["2-severe", "0-normal", "1-mild", "0-normal"]

    task = make_task("severity", FakeReader())
    assert task.class_names == ("0-normal", "1-mild", "2-severe") and task.grade_numbers == (0, 1, 2)
    FakeReader.class_names = ["CT-0", "CT-23", "CT-1"]
    assert make_task("severity", FakeReader()).class_names == ("CT-0", "CT-1", "CT-23")
    FakeReader.class_names = ["normal", "covid"]
    with pytest.raises(UserError, match="put the grade number in each class name"):
        make_task("severity", FakeReader())
    FakeReader.class_names = ["0-normal", "1-mild", "grade1"]
    with pytest.raises(UserError, match="'1-mild' and 'grade1', both grade 1"):
        make_task("severity", FakeReader())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras model.save
def test_end_to_end_labels_file_mixed_formats_fit_evaluate_and_predict_a_dicom_folder(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from preprocess.phantoms.synth import make_phantom
    from train.__main__ import main as train_main

    raw, rows = tmp_path / "raw", ["path,class"]
    for number in range(12):
        abnormal = number % 2 == 1
        phantom = make_phantom(0, number, abnormal, size=32, slice_range=(12, 12))
        spacing = tuple(float(value) for value in np.diag(phantom.affine)[:3])
        if number < 6:
            write_nifti(raw / f"p{number}.nii.gz", phantom.hu, phantom.affine)
            rows.append(f"p{number}.nii.gz,{'covid' if abnormal else 'normal'}")
        else:
            write_series(raw / f"p{number}" / "ct", phantom.hu, spacing, "feet-first-supine", intercept=-1024,
                         series_uid=f"1.2.826.0.1.3680043.8.498.{number}")
            rows.append(f"p{number},{'covid' if abnormal else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cache, run = tmp_path / "cache.h5", tmp_path / "run"
    assert main(["build", "--raw", str(raw), "--out", str(cache), "--labels", str(tmp_path / "labels.csv"),
                 "--normal-class", "normal", "--shape", *map(str, TINY_SHAPE), "--jobs", "1", "--quiet"]) == 0
    with CacheReader(cache) as reader:
        assert len(reader) == 12 and reader.labels.tolist() == [number % 2 for number in range(12)]
    assert train_main(["fit", str(cache), "--run-dir", str(run), "--epochs", "2", "--padding", "same",
                       "--quiet"]) == 0
    assert train_main(["evaluate", str(run), str(cache), "--split", "test"]) == 0
    capsys.readouterr()
    assert train_main(["predict", str(run), str(raw / "p7" / "ct"), str(raw / "p7")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("percent confident that the CT scan is" in line for line in lines)
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]  # the series, by its folder or its parent
