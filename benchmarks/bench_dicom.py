"""DICOM against NIfTI, per scan, in one run on the same volumes.

Each synthetic 512 x 512 x (30-60) int16 phantom (the size of MosMedData's scans) is written
twice: as a .nii.gz (the synth command's file) and as a DICOM series of one uncompressed file
per slice (pydicom, head-first supine, RescaleIntercept -1024). Timed, best of --repeats rounds
in which the two take turns (this VM's speed drifts by tens of percent within minutes):
  - the per-scan transform alone (`preprocess_scan`: read, reorient, window, resize);
  - finding the scans (`find_sources`: for DICOM, every file's header is read to group series);
  - `preprocess build --jobs 1 --force` end to end.

    python benchmarks/bench_dicom.py [--scans 6] [--repeats 5] [--keep DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from preprocess.engine.build import BuildOptions, build_cache
from preprocess.finding.sources import find_sources
from preprocess.phantoms.synth import make_phantom, write_phantom
from preprocess.reading.transform import preprocess_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_series import write_series  # noqa: E402  the tests' pydicom series writer, one copy

SHAPE = (128, 128, 64)
WINDOW = (-1000.0, 400.0)


def make_archives(root: Path, count: int) -> tuple[Path, Path]:
    nifti, dicom = root / "nifti", root / "dicom"
    for number in range(count):
        phantom = make_phantom(0, number, bool(number % 2), size=512)
        (nifti / "CT-0").mkdir(parents=True, exist_ok=True)
        write_phantom(phantom, nifti / "CT-0" / f"study_{number:04d}.nii.gz")
        write_series(dicom / "CT-0" / f"study_{number:04d}", phantom.hu, np.diag(phantom.affine)[:3],
                     series_uid=f"1.2.826.0.1.3680043.8.498.{number + 1}", intercept=-1024.0)
    return nifti, dicom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="write the archives here and keep them")
    arguments = parser.parse_args()
    root = arguments.keep or Path(tempfile.mkdtemp(prefix="bench_dicom_"))
    nifti, dicom = make_archives(root, arguments.scans)
    sources = {"nifti": find_sources(nifti)[0], "dicom": find_sources(dicom)[0]}
    for a, b in zip(*(sorted(s, key=lambda source: source.scan_id) for s in sources.values())):
        same = preprocess_scan(a.path, SHAPE, *WINDOW)[0], preprocess_scan(b.path, SHAPE, *WINDOW, b.series_files)[0]
        assert np.abs(same[0] - same[1]).max() < 1e-6, "DICOM and NIfTI volumes differ"
    sizes = {name: sum(source.size for source in found) / len(found) / 1024**2 for name, found in sources.items()}
    timings = {(name, step): [] for name in sources for step in ("transform", "find", "build")}
    for _ in range(arguments.repeats):
        for name, raw in (("nifti", nifti), ("dicom", dicom)):
            start = time.perf_counter()
            for source in sources[name]:
                preprocess_scan(source.path, SHAPE, *WINDOW, source.series_files)
            timings[name, "transform"].append((time.perf_counter() - start) / arguments.scans)
            start = time.perf_counter()
            find_sources(raw)
            timings[name, "find"].append((time.perf_counter() - start) / arguments.scans)
            start = time.perf_counter()
            build_cache(BuildOptions(raw=raw, out=root / f"{name}.h5", jobs=1, force=True, quiet=True))
            timings[name, "build"].append((time.perf_counter() - start) / arguments.scans)
    print(f"{arguments.scans} scans of 512 x 512 x 30-60; NIfTI {sizes['nifti']:.1f} MB (.nii.gz), "
          f"DICOM {sizes['dicom']:.1f} MB ({np.mean([len(s.series_files) for s in sources['dicom']]):.0f} files) "
          f"per scan; best of {arguments.repeats}")
    print(f"{'step':<32}{'NIfTI s/scan':>14}{'DICOM s/scan':>14}{'DICOM / NIfTI':>15}")
    for step, title in (("transform", "preprocess_scan"), ("find", "find_sources"), ("build", "build --jobs 1")):
        best = {name: min(timings[name, step]) for name in sources}
        print(f"{title:<32}{best['nifti']:>14.4f}{best['dicom']:>14.4f}{best['dicom'] / best['nifti']:>14.2f}x")


if __name__ == "__main__":
    main()
