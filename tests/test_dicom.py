"""DICOM series in `build`: discovery, geometry, intensities, bad series, fingerprints (real pydicom files)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from conftest import TINY_SHAPE, write_nifti  # noqa: E402
from dicom_series import make_slice, phantom_volume, write_series  # noqa: E402
from common.errors import UserError  # noqa: E402
from preprocess.engine.build import BuildOptions, build_cache  # noqa: E402
from preprocess.cache import CacheReader  # noqa: E402
from preprocess.reading.canonical import ScanError
from preprocess.reading.formats import open_any_scan
from preprocess.reading.transform import preprocess_scan  # noqa: E402

WINDOW = (-1000.0, 400.0)
UID = "1.2.826.0.1.3680043.8.498.100"
OTHER_UID = "1.2.826.0.1.3680043.8.498.200"


def build(raw, out, **overrides):
    overrides = {"jobs": 1, **overrides}
    return build_cache(BuildOptions(raw=raw, out=out, shape=TINY_SHAPE, quiet=True, **overrides))


@pytest.fixture(scope="module")
def chest():
    return phantom_volume(size=32, slices=12)


@pytest.fixture(scope="module")
def nifti_reference(chest, tmp_path_factory):
    """The cached array of the same anatomy written as NIfTI (RAS affine)."""
    hu, spacing = chest
    path = write_nifti(tmp_path_factory.mktemp("nifti") / "chest.nii.gz", hu, np.diag([*spacing, 1.0]))
    return preprocess_scan(path, TINY_SHAPE, *WINDOW, crop="lungs")  # build's default


@pytest.mark.parametrize("orientation", ["head-first-supine", "feet-first-supine"])
@pytest.mark.parametrize("reverse_on_disk", [False, True])
def test_series_gives_the_same_array_as_nifti(chest, nifti_reference, tmp_path, orientation, reverse_on_disk):
    hu, spacing = chest
    write_series(tmp_path / "raw" / "CT-1" / "patient7" / "ct", hu, spacing, orientation, intercept=-1024,
                 reverse_on_disk=reverse_on_disk)
    report = build(tmp_path / "raw", tmp_path / "cache.h5")
    assert (report.cached, report.failures) == (1, [])
    with CacheReader(tmp_path / "cache.h5") as reader:
        assert reader.scan_ids == ["CT-1/patient7/ct"]
        record = reader.records()[0]
        np.testing.assert_allclose(reader.read_volume(0), nifti_reference[0], atol=1e-6)
    assert record.source_path == "CT-1/patient7/ct"
    assert record.source_spacing_mm == pytest.approx(nifti_reference[1].spacing_mm)
    assert record.label == 1 and record.class_name == "CT-1"


@pytest.mark.parametrize("orientation", ["head-first-supine", "feet-first-supine"])
@pytest.mark.parametrize("reverse_on_disk", [False, True])
@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_geometry_agrees_with_nibabels_own_dicom_reader(chest, tmp_path, orientation, reverse_on_disk):
    # an independent implementation of DICOM's pixel-to-patient mapping (nibabel.nicom), not ours
    # and not the test writer's: the in-plane axes and the origin of the first slice along the normal
    from nibabel.nicom import dicomwrappers

    from preprocess.reading.dicom import LPS_TO_RAS, series_affine, slice_geometry

    hu, spacing = chest
    paths = write_series(tmp_path, hu, spacing, orientation, reverse_on_disk=reverse_on_disk)
    slices = [(path.name, pydicom.dcmread(path)) for path in sorted(paths)]
    geometry = slice_geometry(slices)
    order = np.argsort(geometry["positions"], kind="stable")
    ours = series_affine(geometry, order)
    theirs = LPS_TO_RAS @ dicomwrappers.wrapper_from_data(slices[order[0]][1]).affine
    # nibabel indexes (row, column, slice); we index (column, row, slice), as NIfTI stores a slice
    np.testing.assert_allclose(ours[:3, [1, 0]], theirs[:3, :2], atol=1e-6)
    np.testing.assert_allclose(ours[:3, 3], theirs[:3, 3], atol=1e-6)
    # the slice axis steps from the first slice to the next along the normal nibabel uses, up to its sign
    np.testing.assert_allclose(abs(ours[:3, 2] @ theirs[:3, 2]), np.linalg.norm(ours[:3, 2]), rtol=1e-6)


def test_first_pixel_of_a_head_first_series_lands_right_anterior_inferior(tmp_path):
    """DICOM's own convention, independent of the test writer: columns run to the patient's left,
    rows to the back, so pixel (0, 0) of the lowest slice is the right-most, front-most, lowest voxel."""
    pixels = np.zeros((4, 5), np.int16)
    pixels[0, 0] = 1000
    for index in range(3):
        make_slice(pixels if index == 0 else np.zeros_like(pixels), (0, 0, 10.0 * index), (1, 0, 0, 0, 1, 0),
                   (1.0, 1.0), UID, index + 1).save_as(tmp_path / f"{index}.dcm", enforce_file_format=True)
    hu = open_any_scan(tmp_path).hounsfield()
    assert hu.shape == (5, 4, 3)
    assert np.unravel_index(np.argmax(hu), hu.shape) == (4, 3, 0)


def test_shuffled_names_without_extension_localizer_and_two_series_in_one_folder(chest, nifti_reference, tmp_path):
    hu, spacing = chest
    folder = tmp_path / "raw" / "CT-0" / "study"
    rng = np.random.default_rng(0)
    names = [f"{value:08x}" for value in rng.permutation(1000)[: hu.shape[2]]]
    write_series(folder, hu, spacing, names=names)
    write_series(folder, hu, spacing, "feet-first-supine", series_uid=OTHER_UID, suffix="")
    localizer = make_slice(np.zeros((32, 48), np.int16), (0, 0, 0), (1, 0, 0, 0, 0, -1), (1, 1), UID, 99,
                           image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    localizer.save_as(folder / "scout", enforce_file_format=True)
    (folder / "README.txt").write_text("not a scan")
    report = build(tmp_path / "raw", tmp_path / "cache.h5")
    assert (report.cached, report.failures) == (2, [])
    with CacheReader(tmp_path / "cache.h5") as reader:
        assert reader.scan_ids == [f"CT-0/{UID}", f"CT-0/{OTHER_UID}"]
        assert [record.source_path for record in reader.records()] == [f"CT-0/study/{UID}", f"CT-0/study/{OTHER_UID}"]
        for row in range(2):
            np.testing.assert_allclose(reader.read_volume(row), nifti_reference[0], atol=1e-6)


def test_series_split_over_folders_is_one_scan_and_mixes_with_nifti(chest, nifti_reference, tmp_path):
    hu, spacing = chest
    paths = write_series(tmp_path / "all", hu, spacing)
    for index, path in enumerate(paths):
        target = tmp_path / "raw" / "CT-2" / "patient" / ("a" if index % 2 else "b") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    write_nifti(tmp_path / "raw" / "CT-0" / "scan.nii.gz", hu, np.diag([*spacing, 1.0]))
    report = build(tmp_path / "raw", tmp_path / "cache.h5")
    assert (report.cached, report.failures) == (2, [])
    with CacheReader(tmp_path / "cache.h5") as reader:
        assert reader.scan_ids == ["CT-0/scan", f"CT-2/{UID}"]
        assert reader.records()[1].source_path == f"CT-2/patient/{UID}"
        np.testing.assert_allclose(reader.read_volume(1), reader.read_volume(0), atol=1e-6)


def test_changing_adding_or_removing_one_slice_reprocesses_that_series_only(chest, tmp_path):
    hu, spacing = chest
    raw = tmp_path / "raw"
    first = write_series(raw / "CT-0" / "a", hu, spacing)
    write_series(raw / "CT-1" / "b", hu, spacing, series_uid=OTHER_UID)
    assert build(raw, tmp_path / "cache.h5").reprocessed == 2
    again = build(raw, tmp_path / "cache.h5")
    assert again.up_to_date
    with CacheReader(tmp_path / "cache.h5") as reader:
        fingerprint = reader.fingerprint
    dataset = pydicom.dcmread(first[3])
    dataset.PixelData = (dataset.pixel_array + 7).astype(dataset.pixel_array.dtype).tobytes()
    dataset.save_as(first[3])
    changed = build(raw, tmp_path / "cache.h5")
    assert (changed.reprocessed, changed.reused) == (1, 1)
    with CacheReader(tmp_path / "cache.h5") as reader:
        assert reader.fingerprint != fingerprint
    first[-1].unlink()  # one slice fewer, at the end: still a whole series, reprocessed
    removed = build(raw, tmp_path / "cache.h5")
    assert (removed.reprocessed, removed.reused, removed.failures) == (1, 1, [])
    with CacheReader(tmp_path / "cache.h5") as reader:
        assert reader.records()[0].source_shape == (32, 32, 11)


def test_build_is_deterministic_and_strict_refuses_a_bad_series(chest, tmp_path):
    hu, spacing = chest
    raw = tmp_path / "raw"
    write_series(raw / "CT-0" / "a", hu, spacing)
    write_series(raw / "CT-1" / "b", hu, spacing, series_uid=OTHER_UID)
    build(raw, tmp_path / "one.h5")
    build(raw, tmp_path / "two.h5", jobs=2)  # worker processes: the series' files travel with the source
    with CacheReader(tmp_path / "one.h5") as one, CacheReader(tmp_path / "two.h5") as two:
        assert one.fingerprint == two.fingerprint
    before = (tmp_path / "one.h5").read_bytes()
    sorted((raw / "CT-1" / "b").iterdir())[5].unlink()  # a hole in the middle
    with pytest.raises(UserError, match=r"--strict: CT-1/b: missing slices"):
        build(raw, tmp_path / "one.h5", strict=True)
    assert (tmp_path / "one.h5").read_bytes() == before


def _write(folder, hu, spacing, **changes):
    """A series whose slices get `changes` (keyword: value, or a function of the slice index)."""
    paths = write_series(folder, hu, spacing)
    for index, path in enumerate(paths):
        dataset = pydicom.dcmread(path)
        for keyword, value in changes.items():
            value = value(index) if callable(value) else value
            if value is None:
                delattr(dataset, keyword)
            else:
                setattr(dataset, keyword, value)
        dataset.save_as(path)
    return paths


def _position(step_of):
    return lambda index: [-40.0, 25.0, round(-100.0 + step_of(index), 4)]


BAD_SERIES = {
    "duplicate": (dict(ImagePositionPatient=_position(lambda i: 25.0 * min(i, 10))), "duplicate slices"),
    "missing": (dict(ImagePositionPatient=_position(lambda i: 25.0 * (i + (i >= 6)))), "missing slices: 1 missing"),
    "uneven": (dict(ImagePositionPatient=_position(lambda i: 25.0 * i + (3.0 if i == 4 else 0))),
               "uneven slice spacing"),
    "tilt": (dict(ImagePositionPatient=lambda i: [-40.0, 25.0 + 5.0 * i, -100.0 + 25.0 * i]), "gantry tilt of 11.3"),
    "modality": (dict(Modality="MR"), "modality MR, not CT"),
    "no pixel data": (dict(PixelData=None), "no pixel data"),
    "mixed sizes": (None, "mixed image sizes within the series"),  # one slice cut to 16 rows, below
}


@pytest.mark.parametrize("kind", sorted(BAD_SERIES))
def test_each_bad_series_is_skipped_with_one_line_and_recorded(chest, tmp_path, caplog, kind):
    hu, spacing = chest
    changes, reason = BAD_SERIES[kind]
    if kind == "mixed sizes":
        paths = write_series(tmp_path / "raw" / "CT-1" / "bad", hu, spacing)
        dataset = pydicom.dcmread(paths[3])
        dataset.Rows = 16
        dataset.PixelData = dataset.PixelData[: 16 * 32 * 2]
        dataset.save_as(paths[3])
    else:
        _write(tmp_path / "raw" / "CT-1" / "bad", hu, spacing, **changes)
    write_series(tmp_path / "raw" / "CT-0" / "good", hu, spacing, series_uid=OTHER_UID)
    report = build(tmp_path / "raw", tmp_path / "cache.h5")
    assert report.cached == 1
    assert [failure.source_path for failure in report.failures] == ["CT-1/bad"]
    assert reason in report.failures[0].reason
    lines = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert lines == [f"skipped CT-1/bad: {report.failures[0].reason}"]
    with CacheReader(tmp_path / "cache.h5") as reader:
        assert [failure.source_path for failure in reader.failures()] == ["CT-1/bad"]
    assert build(tmp_path / "raw", tmp_path / "cache.h5").up_to_date  # remembered, not retried


def _compress(paths, syntax):
    for path in paths:
        dataset = pydicom.dcmread(path)
        try:
            dataset.compress(syntax)
        except RuntimeError as error:  # no encoder installed here: nothing to test with
            pytest.skip(f"cannot encode {syntax.name}: {error}")
        dataset.save_as(path)


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])
def test_compressed_series_give_the_same_array(chest, tmp_path, syntax):
    hu, spacing = chest
    plain = open_any_scan(write_series(tmp_path / "plain", hu, spacing, intercept=-1024)[0].parent)
    paths = write_series(tmp_path / "packed", hu, spacing, intercept=-1024)
    _compress(paths, getattr(pydicom.uid, syntax))
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(open_any_scan(tmp_path / "packed").hounsfield(), plain.hounsfield())


def test_compressed_series_without_its_decoder_names_the_package(chest, tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    hu, spacing = chest
    paths = write_series(tmp_path / "series", hu, spacing)
    _compress(paths, pydicom.uid.JPEG2000Lossless)
    monkeypatch.setattr(get_decoder(pydicom.uid.JPEG2000Lossless), "_available", {})  # as if not installed
    with pytest.raises(ScanError, match=r"compressed transfer syntax JPEG 2000 .* no decoder for it installed "
                                        r"\(IM0001.dcm\): pip install pylibjpeg pylibjpeg-openjpeg"):
        open_any_scan(tmp_path / "series")


@pytest.mark.parametrize("damage", ["truncated", "header cut", "not dicom"])
def test_truncated_or_foreign_file_posing_as_dicom_fails_its_series(chest, tmp_path, damage):
    hu, spacing = chest
    paths = write_series(tmp_path / "raw" / "CT-1" / "bad", hu, spacing)
    if damage == "truncated":
        paths[4].write_bytes(paths[4].read_bytes()[:-500])
        reason = "IM0005.dcm: truncated or corrupt pixel data"
    elif damage == "header cut":
        paths[4].write_bytes(paths[4].read_bytes()[:300])
        reason = "IM0005.dcm: truncated or incomplete DICOM header (no SeriesInstanceUID)"
    else:
        paths[4].write_bytes(b"this is a text file, not a CT slice\n" * 20)
        reason = "IM0005.dcm: not a"
    (tmp_path / "raw" / "CT-0").mkdir()
    (tmp_path / "raw" / "CT-0" / "lost.dcm").write_bytes(b"\0" * 10)  # alone in its folder: refused by itself
    write_nifti(tmp_path / "raw" / "CT-0" / "scan.nii.gz", hu, np.diag([*spacing, 1.0]))
    report = build(tmp_path / "raw", tmp_path / "cache.h5")
    assert report.cached == 1
    failures = {failure.source_path: failure.reason for failure in report.failures}
    assert set(failures) == {"CT-1/bad", "CT-0/lost.dcm"}
    assert failures["CT-1/bad"].startswith(reason)
    assert "DICOM" in failures["CT-0/lost.dcm"]


def test_without_pydicom_a_dicom_archive_gets_the_install_line(chest, tmp_path, monkeypatch):
    from preprocess.finding import series

    hu, spacing = chest
    write_series(tmp_path / "raw" / "CT-1" / "a", hu, spacing)
    monkeypatch.setattr(series, "dicom_available", lambda: False)
    with pytest.raises(UserError, match=r'IM0001.dcm is DICOM, and reading DICOM needs pydicom: '
                                        r'pip install -e "\.\[dicom\]"'):
        build(tmp_path / "raw", tmp_path / "cache.h5")


@pytest.mark.slow
def test_fuzzed_headers_never_crash_a_build(chest, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    hu, spacing = chest
    small = hu[::4, ::4, :4]
    numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**31, 2**31))
    headers = st.fixed_dictionaries({}, optional={
        "ImagePositionPatient": st.lists(numbers, max_size=4),
        "ImageOrientationPatient": st.lists(numbers, max_size=7),
        "PixelSpacing": st.lists(numbers, max_size=3),
        "RescaleSlope": numbers, "RescaleIntercept": numbers,
        "Rows": st.integers(0, 70000), "Columns": st.integers(0, 70000),
        "BitsAllocated": st.sampled_from([0, 1, 8, 16, 32, 64]), "Modality": st.sampled_from(["CT", "MR", ""]),
        "SeriesInstanceUID": st.sampled_from(["", "1.2.3", UID]), "NumberOfFrames": st.integers(0, 5),
    })

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(headers, min_size=1, max_size=3), st.sampled_from([None, 7, 300]))
    def check(changes_per_slice, truncate_to):
        raw = tmp_path_factory.mktemp("fuzz") / "raw"
        paths = write_series(raw / "CT-1" / "s", small, spacing)
        for path, changes in zip(paths, changes_per_slice):
            dataset = pydicom.dcmread(path)
            for keyword, value in changes.items():
                try:
                    setattr(dataset, keyword, value)
                except Exception:
                    continue  # pydicom refuses this value outright: nothing to write
            try:
                dataset.save_as(path)
            except Exception:
                continue
        if truncate_to is not None:
            paths[0].write_bytes(paths[0].read_bytes()[:truncate_to])
        try:
            report = build(raw, raw.parent / "cache.h5")
        except UserError as error:
            assert "could be read" in str(error) or "no scans" in str(error)
        else:
            assert report.cached + len(report.failures) >= 1

    check()
