"""Preprocessing throughput, side by side in one run on the same scans.

Compares, on synthetic 512 x 512 x (30-60) int16 .nii.gz scans (the size of MosMedData's):
  - the Keras tutorial's per-scan algorithm (nibabel get_fdata in float64, clip and scale,
    ndimage.rotate by 90 degrees with its default cubic spline, ndimage.zoom order 1), one process;
  - gzip inflation alone (the floor for any reader of .nii.gz), one process;
  - `preprocess build --jobs 1` and `--jobs 2` end to end (read, preprocess, write HDF5).

    python benchmarks/bench_preprocess.py [--scans 12] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from preprocess.build import BuildOptions, build_cache
from preprocess.synth import write_synthetic_archive
from preprocess.volume import read_scan_bytes


def tutorial_process_scan(path: Path) -> np.ndarray:
    """The tutorial's read_nifti_file + normalize + resize_volume, unchanged in substance."""
    volume = nib.load(path).get_fdata()
    volume[volume < -1000] = -1000
    volume[volume > 400] = 400
    volume = ((volume + 1000) / 1400).astype("float32")
    width, height, depth = volume.shape
    volume = ndimage.rotate(volume, 90, reshape=False)
    return ndimage.zoom(volume, (128 / width, 128 / height, 64 / depth), order=1)


def seconds_per_scan(function, paths) -> float:
    start = time.perf_counter()
    for path in paths:
        function(path)
    return (time.perf_counter() - start) / len(paths)


def build_seconds_per_scan(raw: Path, out: Path, jobs: int, count: int) -> float:
    start = time.perf_counter()
    build_cache(BuildOptions(raw=raw, out=out, jobs=jobs, force=True, quiet=True))
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=12, help="number of synthetic 512x512 scans")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the scans (reused if present)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        raw = arguments.keep or Path(scratch) / "raw"
        paths = sorted(raw.rglob("*.nii.gz")) if raw.exists() else []
        if len(paths) != arguments.scans:
            half = arguments.scans // 2
            paths = write_synthetic_archive(raw, half, arguments.scans - half, size=512, seed=0, progress=False)
        depths = [nib.load(path).shape[2] for path in paths]
        megabytes = sum(path.stat().st_size for path in paths) / len(paths) / 1e6
        print(f"{len(paths)} scans, 512 x 512 x {min(depths)}-{max(depths)} int16, "
              f"{megabytes:.1f} MB .nii.gz each, {os.cpu_count()} cores")
        out = Path(scratch) / "bench.h5"
        rows = [
            ("tutorial algorithm, 1 process", seconds_per_scan(tutorial_process_scan, paths)),
            ("gzip inflate only (ISA-L), 1 process", seconds_per_scan(read_scan_bytes, paths)),
            ("preprocess build --jobs 1", build_seconds_per_scan(raw, out, 1, len(paths))),
            ("preprocess build --jobs 2", build_seconds_per_scan(raw, out, 2, len(paths))),
        ]
    tutorial = rows[0][1]
    jobs_one = rows[2][1]
    print("| pipeline | s / scan | scans / s | vs tutorial | vs --jobs 1 |")
    print("|---|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {1 / seconds:.1f} | {tutorial / seconds:.1f}x | {jobs_one / seconds:.2f}x |")


if __name__ == "__main__":
    main()
