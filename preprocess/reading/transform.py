"""The per-scan transform: any scan -> a normalized, fixed-shape volume, and its raw-HU statistics.

Everything here is a pure function of the file bytes and the options, so a scan gives the same
array in any process, on any worker, in any order. The steps follow the Keras tutorial (clip HU to
a window, scale to [0, 1], resize) with two corrections: the scan is first reoriented to one
canonical orientation (RAS) using its affine, and shrinking uses area averaging, because plain
linear zoom aliases fine lung texture when 512 pixels become 128.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from preprocess.reading.canonical import ScanError, ScanInfo
from preprocess.reading.formats import describe_scan_failure, open_any_scan
from preprocess.reading.lungs import CROPS, find_lungs, in_plane_stride, whole_volume
from preprocess.reading.resize import resize_volume
from preprocess.reading.scan_stats import StatsAccumulator

RESAMPLE_METHOD = "area-average when shrinking, linear (half-voxel centres) when enlarging"
SLAB_SLICES = 4  # 512 x 512 x 4 float32 is 4 MiB: a slab's work stays in the CPU cache


def window_volume(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip to [hu_min, hu_max] and scale to [0, 1], in place on a float32 array."""
    np.clip(hu, hu_min, hu_max, out=hu)
    hu -= np.float32(hu_min)
    hu *= np.float32(1.0 / (hu_max - hu_min))
    return hu


def preprocess_scan(
    path: Path, shape: tuple[int, int, int], hu_min: float, hu_max: float, series_files: tuple[Path, ...] = (),
    crop: str = "none", mask_path: Path | None = None,
) -> tuple[np.ndarray, ScanInfo]:
    """The whole per-scan transform: load, reorient, find the lungs, crop, window, resize. Returns float32
    in [0, 1], and the scan's info with its raw-HU statistics (`preprocess.reading.scan_stats`), taken
    from the same slabs, and its lungs (`preprocess.reading.lungs`).

    `path` is a NIfTI file or a DICOM series folder; `series_files`, when given, are the series' files.
    `crop` "lungs" resizes only the lungs' box (the whole scan when no lungs are found: such a scan
    is refused by `scan_stats.hard_problems` before it is used); "none" the whole scan. `mask_path`, a
    lesion mask on the scan's grid (`preprocess.finding.masks`), is cut and resized as the scan is,
    into the info's `lesion_mask`.

    Slices are windowed and resized in-plane a slab at a time, so the full-size float32 copy
    of the scan never exists: the working set stays in the CPU cache, which is what lets two
    workers share a memory bus. Each slice is resized on its own, so the result is the same
    as transforming the whole volume at once.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    scan = open_any_scan(path, series_files)
    full_shape = scan.stored.shape
    depth = full_shape[2]
    stride = in_plane_stride(full_shape)
    lungs = find_lungs(scan.hounsfield(stride=stride), stride, full_shape, scan.info.spacing_mm)
    x0, x1, y0, y1, z0, z1 = lungs.box if crop == "lungs" else whole_volume(full_shape)
    stats = StatsAccumulator(full_shape, scan.info.spacing_mm)
    slabs = []
    for start in range(0, depth, SLAB_SLICES):
        hu = scan.hounsfield(slice(start, start + SLAB_SLICES))
        stats.add(hu)  # before windowing changes it in place; the statistics describe the whole scan
        kept = hu[x0:x1, y0:y1, max(z0 - start, 0):max(z1 - start, 0)]
        if kept.shape[2]:
            in_plane = (shape[0], shape[1], kept.shape[2])
            slabs.append(resize_volume(window_volume(kept, hu_min, hu_max), in_plane))
    volume = resize_volume(np.concatenate(slabs, axis=2), shape)
    np.clip(volume, 0.0, 1.0, out=volume)  # float rounding in the averages may step past 1
    info = replace(scan.info, stats=stats.result(lungs))
    if mask_path is not None:
        mask, digest = transform_mask(mask_path, full_shape, (x0, x1, y0, y1, z0, z1), shape)
        info = replace(info, lesion_mask=mask, lesion_mask_sha256=digest)
    return volume, info


def transform_mask(path: Path, scan_shape: tuple[int, int, int], box, shape: tuple[int, int, int]
                   ) -> tuple[np.ndarray, str]:
    """A lesion mask (any voxel above 0.5 is lesion) cut to the scan's `box` and resized to `shape`
    as the scan was: uint8, 255 x each voxel's lesion share (area averaging keeps a small lesion's
    share where nearest-neighbour sampling could drop it)."""
    try:
        mask = open_any_scan(Path(path))
    except Exception as error:  # say it is the mask, not the scan, that cannot be used
        raise ScanError(f"its lesion mask {Path(path).name} cannot be used: {describe_scan_failure(error)}") from None
    if mask.stored.shape != tuple(scan_shape):
        raise ScanError(f"its lesion mask {Path(path).name} has {mask.stored.shape[0]}x{mask.stored.shape[1]}x"
                        f"{mask.stored.shape[2]} voxels, the scan {scan_shape[0]}x{scan_shape[1]}x{scan_shape[2]}")
    x0, x1, y0, y1, z0, z1 = box
    lesion = (mask.hounsfield()[x0:x1, y0:y1, z0:z1] > 0.5).astype(np.float32)
    return np.rint(np.clip(resize_volume(lesion, shape), 0.0, 1.0) * 255).astype(np.uint8), mask.info.sha256
