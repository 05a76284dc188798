"""Lesion masks: synth writes them, build finds them, cuts and resizes them with their scans, and caches them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.errors import UserError
from conftest import TINY_SHAPE, run_python_module
from preprocess.cache import CacheReader
from preprocess.engine.build import BuildOptions, build_cache
from preprocess.phantoms.synth import make_phantom, write_synthetic_archive
from preprocess.reading.resize import resize_volume
from preprocess.summary import describe_cache

SIZE, SLICES = 48, (16, 20)


@pytest.fixture(scope="module")
def masked_raw(tmp_path_factory) -> Path:
    """4 normal and 4 abnormal 48 x 48 phantoms with their masks in raw/masks (read-only by convention)."""
    raw = tmp_path_factory.mktemp("masked") / "raw"
    write_synthetic_archive(raw, normal=4, abnormal=4, size=SIZE, seed=5, slice_range=SLICES, progress=False,
                            masks=True)
    return raw


def build(raw: Path, out: Path, **overrides):
    return build_cache(BuildOptions(raw=raw, out=out, jobs=1, shape=TINY_SHAPE, quiet=True, **overrides))


def test_synth_writes_each_abnormal_phantoms_mask_on_its_grid_and_none_for_normal_ones(masked_raw):
    names = sorted(path.name for path in (masked_raw / "masks").iterdir())
    assert names == [f"study_{number:04d}_mask.nii.gz" for number in range(4, 8)]
    phantom = make_phantom(5, 6, True, SIZE, SLICES)
    mask = nib.load(masked_raw / "masks" / "study_0006_mask.nii.gz")
    scan = nib.load(masked_raw / "CT-1" / "study_0006.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj) > 0, phantom.lesion_mask) and phantom.lesion_mask.any()
    assert np.array_equal(mask.affine, scan.affine) and mask.get_data_dtype() == np.uint8
    # the negative case: without --masks, no masks folder
    plain = masked_raw.parent / "plain"
    write_synthetic_archive(plain, normal=1, abnormal=1, size=SIZE, seed=5, slice_range=SLICES, progress=False)
    assert not (plain / "masks").exists()


@pytest.mark.parametrize("crop", ["none", "lungs"])
def test_build_caches_each_mask_cut_and_resized_as_its_scan_was(masked_raw, tmp_path, crop):
    out = tmp_path / "masked.h5"
    report = build(masked_raw, out, crop=crop)
    assert report.masks == 4
    with CacheReader(out) as reader:
        assert reader.schema_version == 4
        assert reader.lesion_mask_rows.tolist() == [False] * 4 + [True] * 4
        records, stats = reader.records(), reader.scan_stats()
        for row in range(8):
            cached = reader.read_lesion_mask(row)
            assert cached.dtype == np.uint8 and cached.shape == TINY_SHAPE
            if row < 4:
                assert records[row].lesion_mask is None and not cached.any()
                continue
            assert records[row].lesion_mask.path == f"study_{row:04d}_mask.nii.gz"
            lesion = make_phantom(5, row, True, SIZE, SLICES).lesion_mask
            x0, x1, y0, y1, z0, z1 = stats[row].lung_box if crop == "lungs" else (0, SIZE, 0, SIZE, 0, lesion.shape[2])
            expected = np.rint(np.clip(resize_volume(lesion[x0:x1, y0:y1, z0:z1].astype(np.float32), TINY_SHAPE),
                                       0, 1) * 255).astype(np.uint8)
            assert np.array_equal(cached, expected) and cached.max() == 255
        assert "lesion masks 4 of 8 scans (4 abnormal)" in describe_cache(reader)
    # the negative case: --no-masks caches none, though raw/masks is there
    plain = tmp_path / "plain.h5"
    assert build(masked_raw, plain, crop=crop, use_masks=False).masks == 0
    with CacheReader(plain) as reader:
        assert not reader.lesion_mask_rows.any() and not reader.read_lesion_mask(5).any()
        assert "lesion masks none (`build` found no masks" in describe_cache(reader)


def test_a_mask_changes_the_fingerprint_and_an_incremental_build_redoes_only_its_scan(masked_raw, tmp_path):
    raw = Path(shutil.copytree(masked_raw, tmp_path / "raw"))
    out, plain = tmp_path / "masked.h5", tmp_path / "plain.h5"
    build(raw, out)
    build(raw, plain, use_masks=False)
    with CacheReader(out) as reader, CacheReader(plain) as without:
        assert reader.fingerprint != without.fingerprint
        fingerprint = reader.fingerprint
    assert build(raw, out).up_to_date
    mask_file = raw / "masks" / "study_0005_mask.nii.gz"
    image = nib.load(mask_file)
    data = np.asarray(image.dataobj).copy()
    data[...] = 0
    data[10:14, 10:14, 5:8] = 1
    nib.save(nib.Nifti1Image(data, image.affine), mask_file)
    report = build(raw, out)
    assert (report.reprocessed, report.reused) == (1, 7)
    with CacheReader(out) as reader:
        assert reader.fingerprint != fingerprint
        assert reader.read_lesion_mask(5).sum() < reader.read_lesion_mask(4).sum()
    mask_file.unlink()  # a mask taken away: its row is redone without one
    report = build(raw, out)
    assert (report.reprocessed, report.masks) == (1, 3)
    with CacheReader(out) as reader:
        assert reader.lesion_mask_rows.tolist() == [False] * 4 + [True, False, True, True]


def test_a_mask_that_does_not_fit_its_scan_fails_that_scan_with_one_line(masked_raw, tmp_path):
    raw = Path(shutil.copytree(masked_raw, tmp_path / "raw"))
    image = nib.load(raw / "masks" / "study_0006_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE - 2, 8), np.uint8), image.affine),
             raw / "masks" / "study_0006_mask.nii.gz")
    report = build(raw, tmp_path / "out.h5")
    assert [failure.source_path for failure in report.failures] == ["CT-1/study_0006.nii.gz"]
    reason = report.failures[0].reason
    assert "lesion mask study_0006_mask.nii.gz has 48x46x8 voxels, the scan" in reason and "\n" not in reason
    # a damaged mask file: the reason names the mask, not the scan
    (raw / "masks" / "study_0005_mask.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    report = build(raw, tmp_path / "out.h5")
    reasons = {failure.source_path: failure.reason for failure in report.failures}
    assert reasons["CT-1/study_0005.nii.gz"].startswith("its lesion mask study_0005_mask.nii.gz cannot be used: ")
    shutil.copy(masked_raw / "masks" / "study_0005_mask.nii.gz", raw / "masks" / "study_0005_mask.nii.gz")
    # fixed, the next build tries that scan again (a failed scan with a mask is not taken as known)
    shutil.copy(masked_raw / "masks" / "study_0006_mask.nii.gz", raw / "masks" / "study_0006_mask.nii.gz")
    report = build(raw, tmp_path / "out.h5")
    assert not report.failures and report.masks == 4


def test_mask_folder_problems_are_one_line_each(masked_raw, tmp_path):
    with pytest.raises(UserError, match=r"--masks .*nowhere: no such folder"):
        build(masked_raw, tmp_path / "out.h5", masks=tmp_path / "nowhere")
    with pytest.raises(UserError, match="--masks and --no-masks contradict each other"):
        build(masked_raw, tmp_path / "out.h5", masks=masked_raw / "masks", use_masks=False)
    raw = Path(shutil.copytree(masked_raw, tmp_path / "raw"))
    shutil.copy(raw / "masks" / "study_0004_mask.nii.gz", raw / "masks" / "study_0004.nii.gz")
    with pytest.raises(UserError, match="two lesion masks for scans named study_0004"):
        build(raw, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_masks_from_another_folder_and_the_command_line(masked_raw, tmp_path):
    raw = Path(shutil.copytree(masked_raw, tmp_path / "raw"))
    elsewhere = Path(shutil.move(raw / "masks", tmp_path / "my masks"))
    os.remove(elsewhere / "study_0007_mask.nii.gz")
    out = tmp_path / "out.h5"
    result = run_python_module("preprocess", "build", "--raw", str(raw), "--out", str(out), "--masks", str(elsewhere),
                               "--shape", *map(str, TINY_SHAPE), "--jobs", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("0 failed; 3 with a lesion mask")
    refused = run_python_module("preprocess", "build", "--raw", str(raw), "--out", str(out), "--masks", str(elsewhere),
                                "--no-masks")
    assert refused.returncode != 0 and "not allowed with argument" in refused.stderr


def test_a_version_3_cache_reads_as_one_without_masks_and_a_build_upgrades_it_reusing_its_rows(masked_raw, tmp_path):
    import h5py

    out = tmp_path / "old.h5"
    build(masked_raw, out, use_masks=False)
    with h5py.File(out, "r+") as file:  # what a build before lesion masks wrote
        del file["lesion_masks"]
        file.attrs["schema_version"] = 3
    with CacheReader(out) as reader:
        assert reader.schema_version == 3 and not reader.lesion_mask_rows.any()
        assert not reader.read_lesion_mask(6).any() and all(r.lesion_mask is None for r in reader.records())
        assert "lesion masks none (a version-3 cache, from before lesion masks)" in describe_cache(reader)
    report = build(masked_raw, out)  # the masks are new: only the scans with one are redone
    assert (report.reprocessed, report.reused, report.masks) == (4, 4, 4)
    with CacheReader(out) as reader:
        assert reader.schema_version == 4 and reader.lesion_mask_rows.sum() == 4
