"""Find the scans under a raw folder and read their labels from the MosMedData layout; the one
home of what a scan file is and how a path becomes a `Source` (`preprocess.finding.labels` finds
them from a labels file instead, with the same functions).

MosMedData keeps one folder per severity grade, `CT-0` (normal) to `CT-4`; the full release
nests them under `studies/`, and the tutorial's subsets use `CT-0` with `CT-1` or `CT-23`.
Label 0 is `CT-0`, label 1 any other `CT-k`. The grade folder name is kept for severity work.

A scan is a NIfTI file or a DICOM series (`preprocess.finding.series`) anywhere below a class folder.
A series' id is `<class>/<its folder below the class folder>`, or `<class>/<SeriesInstanceUID>`
when that folder is not the series' alone (several series in it, one series over several
folders, files directly in the class folder).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from preprocess.finding.series import Series, group_series, looks_like_dicom, require_pydicom, series_name

CLASS_FOLDER = re.compile(r"^CT-(\d+)$")
SCAN_SUFFIXES = (".nii.gz", ".nii")
NORMAL_CLASS = "CT-0"


@dataclass(frozen=True)
class Source:
    """One scan file found under the raw folder."""

    path: Path
    relative_path: str  # to the raw folder, with forward slashes
    scan_id: str  # "<class folder>/<file name without .nii[.gz]>"
    class_name: str
    label: int
    size: int  # a series: the bytes of all its files
    mtime_ns: int  # a series: a digest of its files' names, sizes and mtimes, so any change shows
    series_files: tuple[Path, ...] = ()  # a DICOM series' files, sorted; empty for a NIfTI file
    mask: "MaskFile | None" = None  # its lesion mask, if one was found (`preprocess.finding.masks`)


@dataclass(frozen=True)
class MaskFile:
    """A scan's lesion mask file: where it is, and its size and mtime, which its row remembers."""

    path: Path
    relative_path: str  # to the masks folder, with forward slashes
    size: int
    mtime_ns: int


def scan_stem(name: str) -> str | None:
    """The file name without its NIfTI suffix, or None if it is not a NIfTI file name."""
    lowered = name.lower()
    for suffix in SCAN_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def visible_files(folder: Path):
    """Every file below `folder`, sorted, but hidden ones (a name starting with a dot)."""
    return (path for path in sorted(folder.rglob("*")) if not path.name.startswith(".") and path.is_file())


def is_scan_file(path: Path) -> bool:
    """Whether a visible file is a scan or part of one: a NIfTI file name, or a DICOM file."""
    return scan_stem(path.name) is not None or looks_like_dicom(path)


def label_for_class(class_name: str, normal_class: str = NORMAL_CLASS) -> int:
    """0 for the normal class (`CT-0` unless a labels file names another), 1 for any other: a
    finding of viral pneumonia (`CT-1` ... `CT-4`, `CT-23`)."""
    return 0 if class_name == normal_class else 1


def nifti_source(raw: Path, path: Path, scan_id: str, class_name: str, label: int) -> Source:
    """A NIfTI file under `raw` as a scan, fingerprinted by its size and mtime."""
    stat = path.stat()
    return Source(path=path, relative_path=path.relative_to(raw).as_posix(), scan_id=scan_id, class_name=class_name,
                  label=label, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def series_source(raw: Path, folder: Path, relative_path: str, scan_id: str, class_name: str, label: int,
                  series: Series) -> Source:
    """A DICOM series under `raw` as a scan, fingerprinted by all its files."""
    size, stamp = series_fingerprint(series.files, raw)
    return Source(path=folder, relative_path=relative_path, scan_id=scan_id, class_name=class_name, label=label,
                  size=size, mtime_ns=stamp, series_files=series.files)


def find_sources(raw: Path) -> tuple[list[Source], list[tuple[Path, str]]]:
    """Every NIfTI file inside a `CT-k` folder under `raw`, sorted by scan id.

    Returns the sources and the files refused at this stage (duplicate scan ids), with reasons.
    """
    raw = Path(raw)
    if not raw.exists():
        raise UserError(f"raw folder {raw} does not exist (run `python -m preprocess synth` or `download` first)")
    if not raw.is_dir():
        raise UserError(f"raw folder {raw} is not a folder")
    found: dict[str, Source] = {}
    refused: list[tuple[Path, str]] = []
    dicom_files: dict[Path, list[Path]] = {}  # class folder -> candidate DICOM files below it
    for path in visible_files(raw):
        parts = path.relative_to(raw).parts[:-1]
        depth = next((index for index in range(len(parts) - 1, -1, -1) if CLASS_FOLDER.match(parts[index])), None)
        if depth is None:
            continue
        class_folder = parts[depth]
        stem = scan_stem(path.name)
        if stem is None:
            if looks_like_dicom(path):
                dicom_files.setdefault(raw.joinpath(*parts[: depth + 1]), []).append(path)
            continue
        scan_id = f"{class_folder}/{stem}"
        if scan_id in found:
            refused.append((path, f"duplicate scan id {scan_id} (also {found[scan_id].relative_path})"))
            continue
        found[scan_id] = nifti_source(raw, path, scan_id, class_folder, label_for_class(class_folder))
    for class_path, files in sorted(dicom_files.items()):
        require_pydicom(files[0])
        series, refused_files = group_series(files)
        refused.extend(refused_files)
        for one in series:
            source = class_series_source(raw, class_path, one, series)
            if source.scan_id in found:
                refused.append((one.files[0], f"duplicate scan id {source.scan_id} (also "
                                              f"{found[source.scan_id].relative_path})"))
            else:
                found[source.scan_id] = source
    if not found and not refused:
        raise UserError(f"no scans in {raw}: expected .nii or .nii.gz files inside CT-0, CT-1, ... folders")
    return sorted(found.values(), key=lambda source: source.scan_id), refused


def class_series_source(raw: Path, class_path: Path, series: Series, neighbours: list[Series]) -> Source:
    """A DICOM series in a class folder as a scan: its id (see the module's docstring) and its path."""
    class_name = class_path.name
    folder_name = series_name(series, neighbours, class_path)
    if folder_name is not None:
        scan_id = f"{class_name}/{folder_name}"
        folder = next(iter(series.folders))
        relative_path = folder.relative_to(raw).as_posix()
    else:
        scan_id = f"{class_name}/{series.uid}"
        folder = Path(os.path.commonpath([str(path.parent) for path in series.files]))
        relative_path = f"{folder.relative_to(raw).as_posix()}/{series.uid}"
    return series_source(raw, folder, relative_path, scan_id, class_name, label_for_class(class_name), series)


def series_fingerprint(files: tuple[Path, ...], raw: Path) -> tuple[int, int]:
    """(total bytes, a 63-bit digest of every file's name, size and mtime): adding, removing or
    changing one slice changes it, as a NIfTI file's (size, mtime) does."""
    digest = hashlib.sha256()
    total = 0
    for path in sorted(files):
        stat = path.stat()
        total += stat.st_size
        digest.update(f"{path.relative_to(raw).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return total, int.from_bytes(digest.digest()[:8], "big") >> 1
