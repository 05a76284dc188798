"""The per-scan transform: HU scaling, orientation and dtype invariance, anti-aliasing, bad files."""
from __future__ import annotations

import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import write_nifti
from preprocess.reading.canonical import ScanError
from preprocess.reading.nifti import load_scan, read_scan_bytes
from preprocess.reading.resize import resize_axis, resize_volume
from preprocess.reading.transform import preprocess_scan, window_volume

SHAPE = (32, 32, 16)
WINDOW = (-1000.0, 400.0)


def anatomy(shape=(40, 36, 12), seed=0) -> np.ndarray:
    """An asymmetric int16 HU volume, so any wrong flip or transpose changes the output."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1100, 1500, size=shape).astype(np.int16)
    hu[:10, :5, :3] = 1200  # a landmark near one corner
    return hu


def test_window_scales_to_unit_range():
    hu = np.array([-3000, -1000, -300, 400, 3000], dtype=np.float32)
    assert window_volume(hu, *WINDOW).tolist() == pytest.approx([0, 0, 0.5, 1, 1])


def test_output_is_float32_in_unit_range(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", anatomy())
    volume, info = preprocess_scan(path, SHAPE, *WINDOW)
    assert volume.shape == SHAPE and volume.dtype == np.float32
    assert volume.min() >= 0 and volume.max() <= 1
    assert info.source_shape == (40, 36, 12)
    assert len(info.sha256) == 64


def test_checkerboard_does_not_alias_when_shrinking_4x():
    checkerboard = np.where(np.indices((128, 128, 16)).sum(axis=0) % 2 == 0, -1000, 400).astype(np.float32)
    volume = resize_volume(window_volume(checkerboard.copy(), *WINDOW), (32, 32, 16))
    assert np.abs(volume - 0.5).max() < 0.01
    # the tutorial's plain linear zoom fails the same check: that is why the resize is area-averaged
    zoomed = ndimage.zoom(window_volume(checkerboard.copy(), *WINDOW), (0.25, 0.25, 1), order=1)
    assert np.abs(zoomed - 0.5).max() > 0.4


def test_checkerboard_with_a_fractional_factor_stays_near_uniform():
    checkerboard = np.where(np.indices((100, 100, 8)).sum(axis=0) % 2 == 0, 0.0, 1.0).astype(np.float32)
    volume = resize_volume(checkerboard, (32, 32, 8))
    assert abs(volume.mean() - 0.5) < 0.01
    assert np.abs(volume - 0.5).max() < 0.1  # a footprint of 3.125 voxels leaves a small ripple


@pytest.mark.parametrize("length, size", [(512, 128), (100, 32), (45, 64), (12, 16), (30, 30)])
def test_resize_keeps_constants_and_means(length, size):
    rng = np.random.default_rng(1)
    assert np.allclose(resize_axis(np.full((length, 3), 0.25, np.float32), size, 0), 0.25)
    signal = rng.random((length, 2)).astype(np.float32)
    resized = resize_axis(signal, size, 0)
    assert resized.shape == (size, 2)
    if size <= length:  # area averaging preserves the mean exactly
        assert np.allclose(resized.mean(axis=0), signal.mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("length, size", [(410, 128), (100, 32), (7, 3), (300, 128)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fractional_shrink_is_the_exact_footprint_mean_on_every_axis(length, size, axis):
    # reference: repeat each voxel `size` times, then average runs of `length`: every output voxel is
    # the mean over exactly its footprint, partial voxels weighed by the share of them it covers
    rng = np.random.default_rng(2)
    volume = np.moveaxis(rng.uniform(-1000, 3000, (length, 3, 4)).astype(np.float32), 0, axis)
    fine = np.repeat(volume.astype(np.float64), size, axis=axis)
    reference = fine.reshape(*volume.shape[:axis], size, length, *volume.shape[axis + 1:]).mean(axis=axis + 1)
    resized = resize_axis(volume, size, axis)
    assert resized.shape == reference.shape and resized.dtype == np.float32
    assert np.abs(resized - reference).max() < 1e-3  # HU: float32 rounding only
    # a plain linear zoom is not that mean, so the check can tell them apart
    zoomed = ndimage.zoom(volume, [size / length if a == axis else 1 for a in range(3)], order=1)
    assert np.abs(zoomed - reference).max() > 1


def test_a_box_cut_from_any_memory_order_resizes_alike():
    # a lungs' box cut from a NIfTI's Fortran-ordered array is neither C- nor F-contiguous
    rng = np.random.default_rng(3)
    whole = np.asfortranarray(rng.uniform(0, 1, (90, 70, 9)).astype(np.float32))
    box = whole[7:88, 5:61, 1:8]
    assert not box.flags.c_contiguous and not box.flags.f_contiguous
    reference = resize_volume(np.ascontiguousarray(box), (32, 24, 16))
    assert np.allclose(resize_volume(box, (32, 24, 16)), reference, atol=1e-6)
    c_ordered_box = np.ascontiguousarray(whole)[7:88, 5:61, 1:8]
    assert np.allclose(resize_volume(c_ordered_box, (32, 24, 16)), reference, atol=1e-6)


def reoriented_copies(hu: np.ndarray):
    """The same anatomy stored in RAS, LPS, LAS and with the in-plane axes swapped."""
    ras_affine = np.diag([0.7, 0.8, 5.0, 1.0])
    yield "RAS", hu, ras_affine
    lps = np.diag([-0.7, -0.8, 5.0, 1.0])
    yield "LPS", hu[::-1, ::-1, :], lps
    las = np.diag([-0.7, 0.8, 5.0, 1.0])
    yield "LAS", hu[::-1, :, :], las
    swapped = np.zeros((4, 4))
    swapped[0, 1], swapped[1, 0], swapped[2, 2], swapped[3, 3] = 0.7, 0.8, 5.0, 1.0
    yield "ARS", hu.transpose(1, 0, 2), swapped


def test_orientation_invariance(tmp_path):
    hu = anatomy()
    results = {}
    for name, data, affine in reoriented_copies(hu):
        path = write_nifti(tmp_path / f"{name}.nii.gz", np.ascontiguousarray(data), affine)
        results[name] = preprocess_scan(path, SHAPE, *WINDOW)
    reference, reference_info = results.pop("RAS")
    for name, (volume, info) in results.items():
        assert np.array_equal(volume, reference), name
        assert info.spacing_mm == pytest.approx(reference_info.spacing_mm), name


def test_dtype_and_scaling_invariance(tmp_path):
    hu = anatomy()
    affine = np.diag([0.7, 0.8, 5.0, 1.0])
    stored = {
        "int16": write_nifti(tmp_path / "int16.nii.gz", hu, affine),
        "int32": write_nifti(tmp_path / "int32.nii", hu.astype(np.int32), affine),
        "float32": write_nifti(tmp_path / "float32.nii.gz", hu.astype(np.float32), affine),
        "uint16+intercept": write_nifti(tmp_path / "uint16.nii.gz", (hu.astype(np.int32) + 1100).astype(np.uint16),
                                        affine, slope=1.0, intercept=-1100.0),
        "int16*2": write_nifti(tmp_path / "half.nii.gz", (hu // 2).astype(np.int16), affine, slope=2.0,
                               intercept=float(0)),
    }
    reference, _ = preprocess_scan(stored.pop("int16"), SHAPE, *WINDOW)
    for name, path in stored.items():
        volume, _ = preprocess_scan(path, SHAPE, *WINDOW)
        if name == "int16*2":  # odd HU values lose their last bit; scaling must still be applied
            assert np.abs(volume - reference).max() < 1 / 1400 + 1e-6, name
        else:
            assert np.array_equal(volume, reference), name


def test_single_volume_4d_file_equals_3d(tmp_path):
    hu = anatomy()
    three_d, _ = preprocess_scan(write_nifti(tmp_path / "a.nii.gz", hu), SHAPE, *WINDOW)
    four_d, _ = preprocess_scan(write_nifti(tmp_path / "b.nii.gz", hu[..., None]), SHAPE, *WINDOW)
    assert np.array_equal(three_d, four_d)


def test_real_ct_orientation_and_dtype_invariance(real_ct, tmp_path):
    """Real headers: an LPS int16 scan, re-stored by nibabel as RAS int32, gives the same array."""
    original = nib.load(real_ct / "chest_1p5mm_lps.nii.gz")
    assert nib.aff2axcodes(original.affine) == ("L", "P", "S")
    canonical = nib.as_closest_canonical(original)
    restored = nib.Nifti1Image(np.asarray(canonical.dataobj).astype(np.int32), canonical.affine)
    nib.save(restored, tmp_path / "ras_int32.nii.gz")
    from_lps, _ = preprocess_scan(real_ct / "chest_1p5mm_lps.nii.gz", SHAPE, *WINDOW)
    from_ras, _ = preprocess_scan(tmp_path / "ras_int32.nii.gz", SHAPE, *WINDOW)
    assert np.array_equal(from_lps, from_ras)
    hu, info = load_scan(real_ct / "thorax_abdomen_3mm.nii.gz")  # int32 on disk
    assert info.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    assert -1300 < hu.min() < -900 and hu.max() > 1000  # real Hounsfield statistics


def header_only_file(path, shape, dtype=np.int16, body: bytes = b"\0" * 64):
    """A gzipped NIfTI-1 header claiming `shape` (raw dim values, even illegal ones), then `body`."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header["dim"] = [len(shape), *shape, *([1] * (7 - len(shape)))]
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + body))
    return path


def bad_files(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", anatomy()).read_bytes()
    yield "truncated gzip", "truncated gzip", good[: len(good) // 2]
    yield "not NIfTI", "not a NIfTI", gzip.compress(b"hello, I am a text file\n" * 50)
    yield "plain text", "not a NIfTI", b"definitely not a scan\n" * 40
    yield "empty", "empty", b""
    yield "2-D", "2-D", write_nifti(tmp_path / "2d.nii.gz", np.zeros((32, 32), np.int16)).read_bytes()
    yield "several volumes", "several volumes", write_nifti(
        tmp_path / "4d.nii.gz", np.zeros((8, 8, 8, 3), np.int16)).read_bytes()
    nan = anatomy().astype(np.float32)
    nan[3, 3, 3] = np.nan
    yield "NaN", "NaN", write_nifti(tmp_path / "nan.nii.gz", nan).read_bytes()
    inf = anatomy().astype(np.float32)
    inf[1, 2, 3] = np.inf
    yield "inf", "infinite", write_nifti(tmp_path / "inf.nii.gz", inf).read_bytes()
    yield "absurd dims", "absurd dimensions", header_only_file(tmp_path / "huge.nii.gz", (32767,) * 3).read_bytes()
    # 65535 in NIfTI-1's int16 dim field reads back as -1
    yield "dims 0xFFFF", "invalid dimensions", header_only_file(tmp_path / "ffff.nii.gz", (-1,) * 3).read_bytes()
    yield "short body", "truncated voxel data", header_only_file(tmp_path / "short.nii.gz", (64, 64, 64)).read_bytes()


def test_each_kind_of_bad_file_is_refused_with_a_reason(tmp_path):
    kinds = list(bad_files(tmp_path))
    assert len(kinds) == 11
    for kind, expected_reason, payload in kinds:
        path = tmp_path / f"bad_{kind.replace(' ', '_')}.nii.gz"
        path.write_bytes(payload)
        with pytest.raises(ScanError, match=expected_reason):
            preprocess_scan(path, SHAPE, *WINDOW)


def test_absurd_header_is_refused_before_allocating(tmp_path):
    path = header_only_file(tmp_path / "huge.nii.gz", (32767, 32767, 32767))
    tracemalloc.start()
    with pytest.raises(ScanError, match="absurd"):
        load_scan(path)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_bytes < 10 * 1024**2


def test_gzip_bomb_is_never_inflated_beyond_what_the_header_promises(tmp_path):
    """A valid small scan followed by 256 MB of zeros: ~1 MB on disk, read in bounded memory."""
    import zlib

    scan = nib.Nifti1Image(anatomy(), np.eye(4)).to_bytes()
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(16 * 1024**2)
    chunks = [compressor.compress(scan)] + [compressor.compress(zeros) for _ in range(16)] + [compressor.flush()]
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(b"".join(chunks))
    assert path.stat().st_size < 2 * 1024**2  # a 200:1 bomb
    tracemalloc.start()
    raw, _ = read_scan_bytes(path)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(raw) == len(scan)
    assert peak_bytes < 20 * 1024**2


def test_gzip_with_a_bad_checksum_is_refused(tmp_path):
    data = bytearray(gzip.compress(nib.Nifti1Image(anatomy(), np.eye(4)).to_bytes()))
    data[-6] ^= 0xFF  # inside the CRC-32 of the gzip trailer
    path = tmp_path / "crc.nii.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ScanError, match="corrupt or truncated gzip"):
        preprocess_scan(path, SHAPE, *WINDOW)
