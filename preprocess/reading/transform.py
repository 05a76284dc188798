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

from preprocess.reading.canonical import ScanInfo
from preprocess.reading.formats import open_any_scan
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
    path: Path, shape: tuple[int, int, int], hu_min: float, hu_max: float, series_files: tuple[Path, ...] = ()
) -> tuple[np.ndarray, ScanInfo]:
    """The whole per-scan transform: load, reorient, window, resize. Returns float32 in [0, 1], and the
    scan's info with its raw-HU statistics (`preprocess.reading.scan_stats`), taken from the same slabs.

    `path` is a NIfTI file or a DICOM series folder; `series_files`, when given, are the series' files.

    Slices are windowed and resized in-plane a slab at a time, so the full-size float32 copy
    of the scan never exists: the working set stays in the CPU cache, which is what lets two
    workers share a memory bus. Each slice is resized on its own, so the result is the same
    as transforming the whole volume at once.
    """
    scan = open_any_scan(path, series_files)
    depth = scan.stored.shape[2]
    stats = StatsAccumulator(scan.stored.shape, scan.info.spacing_mm)
    slabs = []
    for start in range(0, depth, SLAB_SLICES):
        hu = scan.hounsfield(slice(start, start + SLAB_SLICES))
        stats.add(hu)  # before windowing changes it in place
        in_plane = (shape[0], shape[1], hu.shape[2])
        slabs.append(resize_volume(window_volume(hu, hu_min, hu_max), in_plane))
    volume = resize_volume(np.concatenate(slabs, axis=2), shape)
    np.clip(volume, 0.0, 1.0, out=volume)  # float rounding in the averages may step past 1
    return volume, replace(scan.info, stats=stats.result())
