"""Find DICOM series: files grouped by SeriesInstanceUID, with localizers left out.

A file is taken for DICOM if its name ends in `.dcm` or it carries the `DICM` marker after the
128-byte preamble; anything else (a README, a spreadsheet) is not looked at. Only the header
is read here (pydicom, pixels skipped); the worker reads and checks the whole series
(`preprocess.reading.dicom`). A file whose header cannot be read joins the series of its folder when
that folder holds exactly one, so the series fails with the file named rather than being built
one slice short; elsewhere it is refused on its own.
"""
from __future__ import annotations

import importlib.util
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

INSTALL_LINE = 'pip install -e ".[dicom]"'
PREAMBLE_BYTES = 128
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: an index, not an image
HEADER_TAGS = ("SeriesInstanceUID", "ImageType", "SOPClassUID")


@dataclass(frozen=True)
class Series:
    """The files of one DICOM series (sorted), localizers left out."""

    uid: str
    files: tuple[Path, ...]

    @property
    def folders(self) -> set[Path]:
        return {path.parent for path in self.files}


def looks_like_dicom(path: Path) -> bool:
    """A `.dcm` name, or the DICM marker after the preamble (DICOM files often have no extension)."""
    return path.name.lower().endswith(".dcm") or looks_like_marked(path)


def looks_like_marked(path: Path) -> bool:
    """Whether the file carries the DICM marker after the 128-byte preamble."""
    try:
        with path.open("rb") as stream:
            head = stream.read(PREAMBLE_BYTES + 4)
    except OSError:
        return False
    return head[PREAMBLE_BYTES:] == b"DICM"


def dicom_available() -> bool:
    return importlib.util.find_spec("pydicom") is not None


def require_pydicom(example: Path) -> None:
    """One line saying how to install the DICOM reader, when it is missing."""
    if not dicom_available():
        raise UserError(f"{example} is DICOM, and reading DICOM needs pydicom: {INSTALL_LINE}")


def read_header(path: Path) -> tuple[str | None, bool, str | None]:
    """(SeriesInstanceUID, is a localizer or index, why the header is unusable) of one file."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(HEADER_TAGS))
        uid = dataset.get("SeriesInstanceUID")
        image_type = dataset.get("ImageType") or ()
        image_type = [image_type] if isinstance(image_type, str) else list(image_type)
        sop_class = str(dataset.get("SOPClassUID", "") or getattr(dataset, "file_meta", {}).get(
            "MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
            return None, True, None
        if any(str(value).upper() == "LOCALIZER" for value in image_type):
            return None, True, None
        uid = str(uid).strip() if uid is not None else ""
    except Exception as error:  # a truncated or foreign file can break the parser in many ways
        return None, False, f"not a readable DICOM file ({type(error).__name__}: {error})"
    if not uid:
        has_marker = looks_like_marked(path)
        return None, False, ("truncated or incomplete DICOM header" if has_marker else "not a DICOM image") \
            + " (no SeriesInstanceUID)"
    return uid, False, None


def group_series(files: list[Path]) -> tuple[list[Series], list[tuple[Path, str]]]:
    """The series among `files`, sorted by uid, and the files refused on their own, with reasons."""
    by_uid: dict[str, list[Path]] = defaultdict(list)
    unreadable: list[tuple[Path, str]] = []
    for path in sorted(files):
        uid, left_out, problem = read_header(path)
        if left_out:
            continue
        if problem is not None:
            unreadable.append((path, problem))
        else:
            by_uid[uid].append(path)
    uids_in_folder: dict[Path, set[str]] = defaultdict(set)
    for uid, paths in by_uid.items():
        for path in paths:
            uids_in_folder[path.parent].add(uid)
    refused = []
    for path, problem in unreadable:
        owners = uids_in_folder.get(path.parent, set())
        if len(owners) == 1:  # the series fails when it reads this file, naming it
            by_uid[next(iter(owners))].append(path)
        else:
            refused.append((path, problem))
    series = [Series(uid, tuple(sorted(paths))) for uid, paths in sorted(by_uid.items())]
    return series, refused


def series_name(series: Series, others: list[Series], base: Path) -> str | None:
    """The series' folder relative to `base` when the folder is its alone, else None (use the uid)."""
    if len(series.folders) != 1:
        return None
    folder = next(iter(series.folders))
    if folder == base or any(other is not series and folder in other.folders for other in others):
        return None
    return folder.relative_to(base).as_posix()


def find_folder_series(folder: Path) -> tuple[list[Series], list[tuple[Path, str]]]:
    """The series in the files below `folder` (predict's SCAN argument), and the files refused."""
    files = [path for path in sorted(Path(folder).rglob("*"))
             if path.is_file() and not path.name.startswith(".") and looks_like_dicom(path)]
    if files:
        require_pydicom(files[0])
    return group_series(files)
