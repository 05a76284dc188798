"""Synthetic phantoms: layout, header, realistic HU, determinism, and lesions as the only difference."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.errors import UserError
import common.files as files
from preprocess.phantoms import synth
from preprocess.__main__ import main
from preprocess.phantoms.lesions import CONSOLIDATION_HU_RANGE, GRADE_INVOLVEMENT_RANGES, GROUND_GLASS_HU_RANGE
from preprocess.phantoms.synth import default_slice_range, make_phantom, write_phantom, write_synthetic_archive
from conftest import ROOT

MAX_NOISE_SIGMA_HU = 25
SMALL = dict(size=64, slice_range=(16, 24))  # graded phantoms in a few milliseconds each
# sha256 of hu and lesion_mask of make_phantom(0, n, abnormal, size=32) for n < 4, normal then abnormal:
# the ungraded phantoms the demo and the other tests were built on, from before grades existed
DEFAULT_PHANTOMS_SHA256 = "a1bcafd1bd14cf2678b946c31b6e258740c0071a217eb0fbd0977e83393c30bc"


def read_bytes_by_name(paths, root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in paths}


def test_archive_layout_numbering_and_header(tmp_path):
    paths = write_synthetic_archive(tmp_path, normal=2, abnormal=3, size=32, seed=0, progress=False)
    names = [path.relative_to(tmp_path).as_posix() for path in paths]
    assert names == ["CT-0/study_0000.nii.gz", "CT-0/study_0001.nii.gz", "CT-1/study_0002.nii.gz",
                     "CT-1/study_0003.nii.gz", "CT-1/study_0004.nii.gz"]
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()) == names
    low, high = default_slice_range(32)
    for path in paths:
        image = nib.load(path)
        assert image.get_data_dtype() == np.int16
        assert np.asanyarray(image.dataobj).dtype == np.int16  # slope 1, inter 0: stored values are HU
        assert (float(image.dataobj.slope), float(image.dataobj.inter)) == (1.0, 0.0)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        size_x, size_y, slice_count = image.shape
        assert (size_x, size_y) == (32, 32) and low <= slice_count <= high
        spacing_mm = image.header.get_zooms()
        assert spacing_mm[0] == pytest.approx(350 / 32) and spacing_mm[1] == pytest.approx(350 / 32)
        assert spacing_mm[2] * slice_count == pytest.approx(300)
        assert np.allclose(image.affine, image.get_qform()) and np.allclose(image.affine, image.get_sform())


def test_written_file_holds_the_phantom(tmp_path):
    phantom = make_phantom(3, 7, True, size=32)
    write_phantom(phantom, tmp_path / "scan.nii.gz")
    stored = (tmp_path / "scan.nii.gz").read_bytes()
    assert stored[:2] == b"\x1f\x8b" and stored[4:8] == bytes(4)  # gzip with mtime 0: reproducible bytes
    image = nib.load(tmp_path / "scan.nii.gz")
    assert np.array_equal(np.asanyarray(image.dataobj), phantom.hu)
    assert np.allclose(image.affine, phantom.affine)
    assert phantom.hu.dtype == np.int16 and phantom.lesion_mask.dtype == bool
    assert phantom.lesion_mask.shape == phantom.hu.shape
    assert [path.name for path in tmp_path.iterdir()] == ["scan.nii.gz"]  # no temporary left over


def test_default_slice_range_scales_with_size_and_can_be_overridden():
    assert default_slice_range(512) == (30, 60)
    assert default_slice_range(32) == (8, 12)
    counts = {make_phantom(0, number, False, size=16).hu.shape[2] for number in range(30)}
    assert counts <= set(range(8, 13)) and len(counts) > 2
    assert make_phantom(0, 0, False, size=16, slice_range=(5, 5)).hu.shape == (16, 16, 5)


def test_hu_values_are_realistic():
    hu = make_phantom(0, 2, False, size=96, slice_range=(8, 8)).hu
    assert np.median(hu[:, -4:, :]) == pytest.approx(-1000, abs=5)  # air in front of the chest
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert (hu > 300).sum() > 20 and hu.max() < 1200  # bone, but nothing like metal
    # the midline seen from below, averaged over slices: air, table, air gap, then the body's fat
    column_hu = hu[46:51, :, :].mean(axis=(0, 2))
    tissue = np.select([column_hu < -900, (column_hu > 80) & (column_hu < 320),
                        (column_hu > -150) & (column_hu < -50)], ["air", "table", "fat"], "other")
    runs = [name for index, name in enumerate(tissue) if index == 0 or tissue[index - 1] != name]
    assert runs[:4] == ["air", "table", "air", "fat"]
    lung_like = (hu > -850 - 4 * MAX_NOISE_SIGMA_HU) & (hu < -850 + 4 * MAX_NOISE_SIGMA_HU)
    assert lung_like.mean() > 0.05


def test_lesions_lie_in_lung_and_only_they_differ():
    for number in range(6):
        normal = make_phantom(0, number, False, size=48)
        abnormal = make_phantom(0, number, True, size=48)
        assert not normal.lesion_mask.any()
        assert abnormal.lesion_mask.any()
        outside = ~abnormal.lesion_mask
        assert np.array_equal(abnormal.hu[outside], normal.hu[outside])
        assert np.array_equal(abnormal.affine, normal.affine)
        assert not np.array_equal(abnormal.hu, normal.hu)
        # without lesions the lesion voxels are lung: parenchyma around -850, a few vessels
        under_lesions = normal.hu[abnormal.lesion_mask]
        assert np.median(under_lesions) == pytest.approx(-850, abs=15)
        assert (under_lesions < -700).mean() > 0.9


def test_lesions_reach_ground_glass_or_consolidation_density_with_soft_edges():
    kinds = set()
    partial_fractions = []
    for number in range(12):
        normal = make_phantom(5, number, False, size=48)
        abnormal = make_phantom(5, number, True, size=48)
        change_hu = abnormal.hu.astype(np.int32) - normal.hu
        assert (change_hu[abnormal.lesion_mask] >= 0).all()  # lesions only add density
        labels, count = ndimage.label(abnormal.lesion_mask)
        peak_change_hu = np.zeros(count + 1)
        for label in range(1, count + 1):
            peak_change_hu[label] = change_hu[labels == label].max()
            # the noise is shared, so lung HU plus the change is the noise-free lesion peak
            peak_hu = -850 + peak_change_hu[label]
            assert GROUND_GLASS_HU_RANGE[0] - 1 <= peak_hu <= CONSOLIDATION_HU_RANGE[1] + 1
            if peak_hu <= GROUND_GLASS_HU_RANGE[1] + 1:
                kinds.add("ground glass")
            elif peak_hu >= CONSOLIDATION_HU_RANGE[0] - 1:
                kinds.add("consolidation")
        lesion_hu = abnormal.hu[abnormal.lesion_mask]
        assert lesion_hu.max() <= CONSOLIDATION_HU_RANGE[1] + 5 * MAX_NOISE_SIGMA_HU
        # soft edges: over lung parenchyma, many lesion voxels carry only part of their lesion's density
        parenchyma = abnormal.lesion_mask & (normal.hu < -700)
        part = change_hu[parenchyma] / peak_change_hu[labels[parenchyma]]
        partial_fractions.append(((part > 0.02) & (part < 0.98)).mean())
    assert kinds == {"ground glass", "consolidation"}
    assert np.mean(partial_fractions) > 0.25


def test_same_seed_gives_identical_bytes(tmp_path):
    first = write_synthetic_archive(tmp_path / "a", normal=1, abnormal=2, size=32, seed=4, progress=False)
    second = write_synthetic_archive(tmp_path / "b", normal=1, abnormal=2, size=32, seed=4, progress=False)
    assert read_bytes_by_name(first, tmp_path / "a") == read_bytes_by_name(second, tmp_path / "b")
    again = write_synthetic_archive(tmp_path / "a", normal=1, abnormal=2, size=32, seed=4, progress=False)
    assert read_bytes_by_name(again, tmp_path / "a") == read_bytes_by_name(second, tmp_path / "b")


@pytest.mark.parametrize(("fewer", "more"), [((2, 0), (3, 0)), ((2, 1), (2, 2))])
def test_shared_studies_do_not_depend_on_archive_size(tmp_path, fewer, more):
    small = read_bytes_by_name(write_synthetic_archive(tmp_path / "small", *fewer, size=32, progress=False),
                               tmp_path / "small")
    large = read_bytes_by_name(write_synthetic_archive(tmp_path / "large", *more, size=32, progress=False),
                               tmp_path / "large")
    assert set(small) < set(large)
    assert all(large[name] == content for name, content in small.items())


def test_seeds_and_study_numbers_change_the_scan():
    reference = make_phantom(0, 0, True, size=32, slice_range=(8, 8))
    for other in (make_phantom(1, 0, True, size=32, slice_range=(8, 8)),
                  make_phantom(0, 1, True, size=32, slice_range=(8, 8))):
        assert not np.array_equal(other.hu, reference.hu)
        assert not np.array_equal(other.lesion_mask, reference.lesion_mask)


@pytest.mark.parametrize("arguments", [
    dict(normal=-1, abnormal=2), dict(normal=0, abnormal=0), dict(normal=1, abnormal=1, size=15),
    dict(normal=1, abnormal=1, size=1025), dict(normal=1, abnormal=1, slice_range=(1, 4)),
    dict(normal=1, abnormal=1, slice_range=(9, 8)), dict(normal=1, abnormal=1, seed=-1),
])
def test_bad_arguments_raise_user_error(tmp_path, arguments):
    with pytest.raises(UserError) as error:
        write_synthetic_archive(tmp_path / "out", **{"size": 32, "progress": False, **arguments})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_holding_another_archive(tmp_path):
    write_synthetic_archive(tmp_path, normal=3, abnormal=0, size=16, progress=False)
    with pytest.raises(UserError, match="would not write"):
        write_synthetic_archive(tmp_path, normal=1, abnormal=1, size=16, progress=False)
    assert not (tmp_path / "CT-1").exists()


def test_failed_write_leaves_neither_scan_nor_temporary(tmp_path, monkeypatch):
    def fail(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)  # the rename that common.files makes for synth
    # through common.files, the OS's refusal is one line for the user (a WriteError), as for every file the tool writes
    with pytest.raises(files.WriteError, match=r"could not write .*scan\.nii\.gz: disk full"):
        write_phantom(make_phantom(0, 0, False, size=16), tmp_path / "scan.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_module_does_not_import_tensorflow():
    code = "import sys, preprocess.phantoms.synth; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_rewriting_the_same_archive_keeps_files_untouched(tmp_path):
    from preprocess.phantoms.synth import write_synthetic_archive as write_archive

    import os

    paths = write_archive(tmp_path / "raw", 1, 1, size=32, seed=0, progress=False)
    for path in paths:
        os.utime(path, ns=(10**18, 10**18))  # an old stamp that a rewrite could not reproduce
    assert write_archive(tmp_path / "raw", 1, 1, size=32, seed=0, progress=False) == paths
    assert [path.stat().st_mtime_ns for path in paths] == [10**18, 10**18]


def test_default_phantoms_are_unchanged_by_grades():
    digest = hashlib.sha256()
    for number in range(4):
        for abnormal in (False, True):
            phantom = make_phantom(0, number, abnormal, size=32)
            digest.update(phantom.hu.tobytes())
            digest.update(phantom.lesion_mask.tobytes())
    assert digest.hexdigest() == DEFAULT_PHANTOMS_SHA256
    assert make_phantom(0, 0, False, size=32).involvement == 0


def test_graded_archive_deals_abnormal_studies_round_robin_into_grade_folders(tmp_path):
    paths = write_synthetic_archive(tmp_path, normal=1, abnormal=6, size=32, progress=False, grades=(2, 4, 1))
    names = [path.relative_to(tmp_path).as_posix() for path in paths]
    assert names == ["CT-0/study_0000.nii.gz", "CT-2/study_0001.nii.gz", "CT-4/study_0002.nii.gz",
                     "CT-1/study_0003.nii.gz", "CT-2/study_0004.nii.gz", "CT-4/study_0005.nii.gz",
                     "CT-1/study_0006.nii.gz"]
    assert sorted(folder.name for folder in tmp_path.iterdir()) == ["CT-0", "CT-1", "CT-2", "CT-4"]
    for path in paths[1:]:
        grade = int(path.parent.name[3:])
        stored = np.asanyarray(nib.load(path).dataobj)
        assert np.array_equal(stored, make_phantom(0, int(path.name[6:10]), True, size=32, grade=grade).hu)


@pytest.mark.parametrize("grade", sorted(GRADE_INVOLVEMENT_RANGES))
def test_graded_lesions_cover_their_grade_share_of_the_lung(grade):
    low, high = GRADE_INVOLVEMENT_RANGES[grade]
    for number in range(4):
        normal = make_phantom(1, number, False, **SMALL)
        graded = make_phantom(1, number, True, **SMALL, grade=grade)
        assert low < graded.involvement <= high
        assert np.count_nonzero(graded.lesion_mask & ~graded.lung_mask) == 0
        outside = ~graded.lesion_mask  # the lesions are still the only difference from the normal study
        assert np.array_equal(graded.hu[outside], normal.hu[outside])
        assert np.array_equal(graded.lung_mask, normal.lung_mask)
        assert (graded.hu.astype(np.int32) - normal.hu >= 0).all()


def test_graded_involvement_spreads_over_each_range():
    involvement = {grade: [make_phantom(2, number, True, **SMALL, grade=grade).involvement for number in range(8)]
                   for grade in GRADE_INVOLVEMENT_RANGES}
    for grade, values in involvement.items():
        low, high = GRADE_INVOLVEMENT_RANGES[grade]
        assert max(values) - min(values) > 0.25 * (high - low)  # a drawn target, not always the lower edge


def test_graded_phantoms_are_deterministic_and_differ_by_grade():
    first = make_phantom(3, 5, True, **SMALL, grade=3)
    second = make_phantom(3, 5, True, **SMALL, grade=3)
    assert np.array_equal(first.hu, second.hu) and np.array_equal(first.lesion_mask, second.lesion_mask)
    other = make_phantom(3, 5, True, **SMALL, grade=2)
    assert not np.array_equal(other.lesion_mask, first.lesion_mask)
    assert np.array_equal(other.hu[~other.lesion_mask & ~first.lesion_mask],
                          first.hu[~other.lesion_mask & ~first.lesion_mask])


@pytest.mark.parametrize("grades", [(0,), (5,), (1, 2, 2), (), (-1, 3)])
def test_bad_grades_raise_user_error(tmp_path, grades):
    with pytest.raises(UserError, match="grades must be distinct numbers from 1 to 4") as error:
        write_synthetic_archive(tmp_path / "out", 1, 2, size=32, progress=False, grades=grades)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    if len(grades) == 1:
        with pytest.raises(UserError):
            make_phantom(0, 0, True, size=32, grade=grades[0])


def test_a_normal_phantom_cannot_be_graded():
    with pytest.raises(ValueError, match="normal"):
        make_phantom(0, 0, False, size=32, grade=2)


def test_cli_writes_graded_archive(tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["synth", "--out", str(out), "--normal", "1", "--abnormal", "4", "--size", "32",
                 "--grades", "1", "2", "3", "4", "--quiet"]) == 0
    assert "wrote 5 synthetic scans" in capsys.readouterr().out
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*.nii.gz")) == [
        "CT-0/study_0000.nii.gz", "CT-1/study_0001.nii.gz", "CT-2/study_0002.nii.gz", "CT-3/study_0003.nii.gz",
        "CT-4/study_0004.nii.gz"]


@pytest.mark.parametrize(("flags", "exit_code", "message"), [
    (["--grades", "0"], 1, "got 0"), (["--grades", "5"], 1, "got 5"), (["--grades", "2", "2"], 1, "got 2 2"),
    (["--grades", "two"], 2, "invalid int value"), (["--grades"], 2, "expected at least one argument"),
])
def test_cli_refuses_bad_grades_in_one_line(tmp_path, capsys, flags, exit_code, message):
    arguments = ["synth", "--out", str(tmp_path / "raw"), "--size", "32", "--quiet", *flags]
    if exit_code == 2:  # argparse's own refusals exit from inside main
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
    else:
        assert main(arguments) == exit_code
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "raw").exists()


def test_involvement_puts_every_abnormal_phantoms_lesions_inside_the_range_spread_over_its_decades():
    shares = [make_phantom(5, number, True, size=64, slice_range=(16, 24), involvement=(0.001, 0.25)).involvement
              for number in range(30)]
    assert all(0.001 < share <= 0.25 for share in shares)
    bands = np.histogram(shares, [0.001, 0.01, 0.05, 0.25])[0]
    assert all(count >= 5 for count in bands), bands  # log-uniform: every band gets its share, not only the top
    small = [make_phantom(6, number, True, size=64, slice_range=(16, 24), involvement=(0.001, 0.01)).involvement
             for number in range(10)]
    assert all(0.001 < share <= 0.01 for share in small)


def test_involvement_on_the_command_line_writes_the_grade_folder_and_refuses_bad_ranges(tmp_path, capsys):
    out = tmp_path / "mild"
    assert main(["synth", "--out", str(out), "--normal", "1", "--abnormal", "2", "--size", "32",
                 "--involvement", "0.1", "1", "--quiet"]) == 0
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*.nii.gz")) == [
        "CT-0/study_0000.nii.gz", "CT-1/study_0001.nii.gz", "CT-1/study_0002.nii.gz"]
    capsys.readouterr()
    for flags, message in (
        (["--involvement", "1", "0.1"], "--involvement needs 0 < LOW < HIGH <= 100"),
        (["--involvement", "20", "30"], "inside one grade's range"),
        (["--involvement", "0", "1"], "--involvement needs 0 < LOW < HIGH <= 100"),
        (["--involvement", "0.1", "1", "--grades", "1"], "--grades and --involvement both set"),
    ):
        code = main(["synth", "--out", str(tmp_path / "bad"), "--normal", "1", "--abnormal", "1", "--size", "32",
                     "--quiet", *flags])
        error = capsys.readouterr().err.strip()
        assert code == 1 and message in error and "\n" not in error, (flags, error)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.nii.gz"))
