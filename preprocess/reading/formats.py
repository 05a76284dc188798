"""The formats a scan can come in, and the one place that picks a reader: `open_any_scan`.

A reader is a function from a path (and, for a DICOM series found by `build`, its files) to a
`preprocess.reading.canonical.OpenedScan`. `FORMATS` lists them in the order they are asked;
the first whose `reads` accepts the path opens it. A new format is one new reader module and
one entry here. `describe_scan_failure` turns whatever a reader raised into the one line that
`build` and `predict` both print.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preprocess.reading.canonical import OpenedScan, ScanError


@dataclass(frozen=True)
class ScanFormat:
    name: str
    reads: Callable[[Path, tuple[Path, ...]], bool]  # (path, series files) -> whether this format opens it
    open: Callable[[Path, tuple[Path, ...]], OpenedScan]


def _open_dicom(path: Path, series_files: tuple[Path, ...]) -> OpenedScan:
    from preprocess.reading.dicom import open_series, open_series_folder  # pydicom: only for DICOM

    return open_series(series_files) if series_files else open_series_folder(Path(path))


def _open_nifti(path: Path, series_files: tuple[Path, ...]) -> OpenedScan:
    from preprocess.reading.nifti import open_scan

    return open_scan(Path(path))


FORMATS = (
    ScanFormat("DICOM series", lambda path, files: bool(files) or Path(path).is_dir(), _open_dicom),
    ScanFormat("NIfTI", lambda path, files: True, _open_nifti),
)


def open_any_scan(path: Path, series_files: tuple[Path, ...] = ()) -> OpenedScan:
    """A NIfTI file, or a DICOM series: its files if given, else the one series in folder `path`."""
    reader = next(scan_format for scan_format in FORMATS if scan_format.reads(path, series_files))
    return reader.open(path, series_files)


def describe_scan_failure(error: Exception) -> str:
    """Why a scan could not be used, in one line: the failure ladder of `build` and `predict`."""
    if isinstance(error, ScanError):
        return str(error)
    if isinstance(error, MemoryError):
        return "too large to load into memory"
    return f"unreadable ({type(error).__name__}: {error})"  # a corrupt file can break nibabel or numpy in many ways
