"""Finding the lungs and the box `build` crops to: phantoms of every grade, the hard cases, real CT.

The box, not the mask, is what must be right: no lesion voxel and no lung voxel of a phantom may
fall outside it. Each hard case of issue 30 is a phantom changed by hand (a lung removed, gas in
the bowel, a trachea, lungs cut by the volume's edge, dense consolidation against the chest wall),
and the three real CT volumes in ../shared/realct are each hard in their own way.
"""
from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from preprocess.phantoms.synth import make_phantom
from preprocess.reading.lungs import MIN_LUNG_ML, chest_problems, find_lungs, in_plane_stride
from preprocess.reading.scan_stats import compute_scan_stats, hard_problems
from preprocess.reading.transform import preprocess_scan, window_volume
from preprocess.reading.resize import resize_volume
from conftest import write_nifti


def lungs_of(hu: np.ndarray, spacing_mm) -> "Lungs":  # noqa: F821
    hu = np.asarray(hu, dtype=np.float32)
    stride = in_plane_stride(hu.shape)
    return find_lungs(hu[::stride, ::stride, :], stride, hu.shape, tuple(float(value) for value in spacing_mm))


def spacing_of(phantom) -> tuple[float, float, float]:
    return tuple(float(value) for value in np.abs(np.diag(phantom.affine)[:3]))


def outside(mask: np.ndarray, lungs) -> int:
    inside = np.zeros(mask.shape, dtype=bool)
    inside[lungs.slices()] = True
    return int(np.count_nonzero(mask & ~inside))


@pytest.mark.parametrize("grade", [1, 2, 3, 4])
def test_no_lesion_voxel_falls_outside_the_box_in_50_phantoms_of_each_grade(grade):
    for number in range(50):
        phantom = make_phantom(11, 1000 * grade + number, True, size=32, grade=grade)
        lungs = lungs_of(phantom.hu, spacing_of(phantom))
        assert lungs.count == 2, (grade, number)
        assert outside(phantom.lesion_mask, lungs) == 0, (grade, number)
        assert outside(phantom.lung_mask, lungs) == 0, (grade, number)


def test_the_box_is_the_lungs_not_the_field_of_view():
    phantom = make_phantom(0, 0, False, size=128)
    lungs = lungs_of(phantom.hu, spacing_of(phantom))
    x0, x1, y0, y1, _, _ = lungs.box
    # the table lies under the back, posterior of every lung voxel: the box ends before it
    table = (phantom.hu[:, :, 0] >= 100) & ~phantom.lung_mask[:, :, 0]
    table_y = np.flatnonzero(table[64])
    assert table_y.size and table_y.min() < y0 - 2
    assert (x1 - x0) * (y1 - y0) < 0.6 * 128 * 128  # far less than the field of view
    assert outside(phantom.lung_mask, lungs) == 0


def test_one_lung_is_found_as_one():
    phantom = make_phantom(0, 1, False, size=64)
    hu = phantom.hu.astype(np.float32)
    left = phantom.lung_mask & (np.arange(64)[:, None, None] < 32)
    hu[left] = 40.0  # collapsed or removed: soft tissue
    lungs = lungs_of(hu, spacing_of(phantom))
    assert lungs.count == 1
    assert outside(phantom.lung_mask & ~left, lungs) == 0
    assert lungs.box[1] - lungs.box[0] < 40  # the box holds the remaining lung, not both sides


def test_bowel_gas_and_the_trachea_do_not_count_as_lung():
    phantom = make_phantom(0, 2, False, size=64, slice_range=(30, 30))
    hu = phantom.hu.astype(np.float32)
    spacing = spacing_of(phantom)
    # an abdomen below the lungs: the lowest slices become soft tissue
    body = ndimage.binary_fill_holes(hu[:, :, 0] > -500)  # the body, lungs included
    hu[:, :, :6] = np.where(body[:, :, None], 40.0, hu[:, :, :6])
    without = lungs_of(hu, spacing)
    for x, y in ((24, 30), (40, 34), (32, 26)):  # pockets of bowel gas, 50 mL each
        hu[x - 3:x + 3, y - 3:y + 3, 0:5] = -1000.0
    hu[31:34, 34:37, 20:] = -1000.0  # a trachea: an air tube in the mediastinum through the top slices
    lungs = lungs_of(hu, spacing)
    assert lungs.box[4:] == without.box[4:]  # the gas below does not pull the box down
    assert lungs.volume_ml == pytest.approx(without.volume_ml, rel=0.02)  # nor counts as lung
    remaining = phantom.lung_mask.copy()
    remaining[:, :, :6] = False
    assert outside(remaining, lungs) == 0


def test_a_scan_of_gas_and_air_only_has_no_lungs():
    hu = np.full((48, 48, 20), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:48, :48]
    abdomen = (xx - 24) ** 2 / 20**2 + (yy - 24) ** 2 / 16**2 < 1
    hu[abdomen] = 40.0
    hu[18:24, 20:26, 4:16] = -1000.0  # bowel gas, as large as a lung lobe of a phantom
    lungs = lungs_of(hu, (6.0, 6.0, 6.0))
    assert lungs.count == 0 and lungs.volume_ml == 0
    assert lungs.box == (0, 48, 0, 48, 0, 20)
    assert "no lungs found" in chest_problems(lungs.volume_ml)[0]


def test_lungs_that_run_off_the_edges_are_found():
    phantom = make_phantom(0, 3, False, size=128)
    lungs_whole = lungs_of(phantom.hu, spacing_of(phantom))
    x0, x1, y0, y1, _, _ = lungs_whole.box
    # a heart-centred crop: the volume's edges cut through both lungs
    cut = (slice(x0 + 12, x1 - 12), slice(y0 + 8, y1 - 8), slice(None))
    lungs = lungs_of(phantom.hu[cut], spacing_of(phantom))
    assert lungs.count == 2
    assert lungs.box[:4] == (0, phantom.hu[cut].shape[0], 0, phantom.hu[cut].shape[1])
    assert outside(phantom.lung_mask[cut], lungs) == 0


@pytest.mark.parametrize("kept", [slice(0, 8), slice(-8, None), slice(4, 12)], ids=["base", "apex", "middle"])
def test_a_scan_cut_through_the_apex_or_the_base_keeps_every_lung_voxel(kept):
    phantom = make_phantom(0, 4, True, size=64, slice_range=(24, 24), grade=2)
    lungs = lungs_of(phantom.hu[:, :, kept], spacing_of(phantom))
    assert lungs.count == 2
    assert outside(phantom.lung_mask[:, :, kept], lungs) == 0
    assert outside(phantom.lesion_mask[:, :, kept], lungs) == 0


def test_dense_consolidation_against_the_chest_wall_stays_in_the_box():
    phantom = make_phantom(0, 5, False, size=128, slice_range=(30, 30))
    hu = phantom.hu.astype(np.float32)
    lung = phantom.lung_mask
    xs = np.flatnonzero(lung.any(axis=(1, 2)))
    one_lung = lung & (np.arange(128)[:, None, None] > (xs[0] + xs[-1]) // 2)
    one_xs = np.flatnonzero(one_lung.any(axis=(1, 2)))
    # the outer third of one lung consolidated (0 HU) from apex to base: a threshold loses all of it
    band = one_lung & (np.arange(128)[:, None, None] >= one_xs[-1] - (one_xs[-1] - one_xs[0]) // 3)
    hu[band] = 0.0
    lungs = lungs_of(hu, spacing_of(phantom))
    assert outside(band, lungs) == 0
    assert outside(lung, lungs) == 0
    # the threshold mask did lose it: the aerated lung ends more than the margin short of the wall
    aerated_end = np.flatnonzero((lung & ~band).any(axis=(1, 2)))[-1]
    assert np.flatnonzero(band.any(axis=(1, 2)))[-1] - aerated_end > 0.1 * lungs.extent_mm[0] / spacing_of(phantom)[0]


def test_cropped_volume_is_the_box_resized(tmp_path):
    phantom = make_phantom(0, 6, True, size=64, slice_range=(20, 20))
    path = write_nifti(tmp_path / "p.nii.gz", phantom.hu, phantom.affine)
    cropped, info = preprocess_scan(path, (32, 32, 16), -1000.0, 400.0, crop="lungs")
    whole, whole_info = preprocess_scan(path, (32, 32, 16), -1000.0, 400.0, crop="none")
    box = info.stats.lung_box
    assert box == whole_info.stats.lung_box and box != (0, 64, 0, 64, 0, 20)
    x0, x1, y0, y1, z0, z1 = box
    expected = resize_volume(window_volume(phantom.hu[x0:x1, y0:y1, z0:z1].astype(np.float32), -1000.0, 400.0),
                             (32, 32, 16))
    np.testing.assert_allclose(cropped, np.clip(expected, 0, 1), atol=1e-5)
    assert not np.allclose(cropped, whole)
    # the lungs take a larger share of the cropped volume than of the whole one
    def lung_share(volume):  # lung density, -950 to -500 HU, not the air around the body
        return float(np.mean((volume > 50 / 1400) & (volume < 500 / 1400)))

    assert lung_share(cropped) > lung_share(whole) + 0.1
    assert info.stats.lung_count == 2 and info.stats.lung_volume_ml > MIN_LUNG_ML
    with pytest.raises(ValueError, match="crop"):
        preprocess_scan(path, (32, 32, 16), -1000.0, 400.0, crop="heart")


def test_real_chest_crop_is_found_and_the_abdomen_scans_are_not_judged(real_ct):
    results = {}
    for name in ("chest_1p5mm_lps", "thorax_abdomen_3mm", "thorax_abdomen_3mm_small"):
        image = nib.as_closest_canonical(nib.load(real_ct / f"{name}.nii.gz"))
        hu = np.asarray(image.dataobj, dtype=np.float32)
        results[name] = lungs_of(hu, image.header.get_zooms()[:3])
    chest = results["chest_1p5mm_lps"]
    # heart-centred: the lungs run off the edges, and are found all the same
    assert chest.count == 2 and chest.volume_ml > 1000
    assert chest_problems(chest.volume_ml, chest.extent_mm) == []
    # lung bases only, more bowel gas than lung: the gas is not counted, and so little lung is not judged
    for name in ("thorax_abdomen_3mm", "thorax_abdomen_3mm_small"):
        lungs = results[name]
        assert 50 < lungs.volume_ml < MIN_LUNG_ML, name
        assert "mL of lung" in chest_problems(lungs.volume_ml, lungs.extent_mm)[0]
    assert results["thorax_abdomen_3mm"].box[4] >= 90  # the top slices only: not the abdomen's gas


def test_hard_problems_apply_the_lung_rule_only_to_scans_searched():
    phantom = make_phantom(0, 7, False, size=32)
    stats = compute_scan_stats(phantom.hu, spacing_of(phantom))
    assert stats.lung_count == 2 and hard_problems(stats) == []
    not_searched = replace(stats, lung_volume_ml=None, lung_count=None, lung_extent_mm=None, lung_box=None)
    assert hard_problems(not_searched) == []  # a cache made before the lungs: its rows are not refused
    no_lungs = replace(stats, lung_volume_ml=0.0, lung_count=0, lung_extent_mm=(0.0, 0.0, 0.0))
    assert hard_problems(no_lungs) == chest_problems(0.0)
    too_little = replace(stats, lung_volume_ml=150.0, lung_extent_mm=(200.0, 100.0, 30.0))
    assert hard_problems(too_little) == chest_problems(150.0, (200.0, 100.0, 30.0)) != []
