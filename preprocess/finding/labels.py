"""`build --labels FILE.csv`: the scans under --raw and their classes from a CSV instead of class folders.

The file has a header and the columns `path,class` (others are ignored). `path` is a NIfTI file
or a DICOM series folder, relative to --raw; `class` is any name. Label 0 is the class named by
`--normal-class` (default CT-0), label 1 any other; the names are kept for `--task severity`.
A scan's id is its path (without .nii/.nii.gz), or `<folder>/<SeriesInstanceUID>` for a folder
holding several series: the class is not part of it, so changing a row's class relabels the
cached row without reprocessing its volume. Files under --raw that no row lists are ignored
and counted. Every problem with the file itself is one line naming the file and the row.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.errors import UserError
from preprocess.finding.series import group_series, looks_like_dicom, require_pydicom
from preprocess.finding.sources import (
    Source, is_scan_file, label_for_class, nifti_source, scan_stem, series_source, visible_files,
)

COLUMNS = ("path", "class")


@dataclass(frozen=True)
class LabelRow:
    line: int  # line of the file the row starts on (the header is line 1)
    path: str  # relative to --raw, with forward slashes
    class_name: str


@dataclass(frozen=True)
class LabelledSources:
    sources: list[Source]
    refused: list[tuple[Path, str]]
    unlisted: int  # scan files under --raw that no row lists (ignored)
    sha256: str  # of the labels file's bytes: part of the cache fingerprint


def read_labels(labels: Path, raw: Path) -> tuple[list[LabelRow], str]:
    """The rows of a labels file and the sha256 of its bytes; anything wrong is one line."""
    labels = Path(labels)
    try:
        data = labels.read_bytes()
    except OSError as error:
        raise UserError(f"--labels {labels}: cannot read it ({error.strerror or error})") from None
    if not data.strip():
        raise UserError(f"{labels}: empty labels file; expected a header `path,class` and one row per scan")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write one, is fine
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(f"{labels}: row {line}: not UTF-8 (byte {data[error.start]:#04x}); "
                        "save the file as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(reader)]
        missing = [name for name in COLUMNS if name not in header]
        if missing:
            raise UserError(f"{labels}: row 1: no `{missing[0]}` column (header: {','.join(header)}); "
                            "expected the columns `path,class`")
        path_column, class_column = (header.index(name) for name in COLUMNS)
        rows: list[LabelRow] = []
        seen: dict[str, int] = {}
        for fields in reader:
            line = reader.line_num
            if not any(field.strip() for field in fields):
                continue  # a blank line
            if len(fields) <= max(path_column, class_column):
                raise UserError(f"{labels}: row {line}: {len(fields)} field(s), expected `path,class`")
            written, class_name = fields[path_column].strip(), fields[class_column].strip()
            if not written or not class_name:
                raise UserError(f"{labels}: row {line}: empty {'path' if not written else 'class'}")
            relative = PurePosixPath(written.replace("\\", "/"))
            if relative.is_absolute() or ".." in relative.parts:
                raise UserError(f"{labels}: row {line}: {written} must be a path inside --raw, relative to it")
            key = relative.as_posix()
            if key in seen:
                raise UserError(f"{labels}: row {line}: {written} is listed twice (also row {seen[key]})")
            seen[key] = line
            target = Path(raw) / key
            if not target.exists():
                raise UserError(f"{labels}: row {line}: {written} does not exist in {raw}")
            if not (target.is_dir() or (target.is_file() and scan_stem(target.name))):
                raise UserError(f"{labels}: row {line}: {written} is neither a NIfTI file (.nii, .nii.gz) "
                                "nor a folder of DICOM files")
            rows.append(LabelRow(line, key, class_name))
    except csv.Error as error:
        raise UserError(f"{labels}: row {reader.line_num}: not a valid CSV ({error})") from None
    if not rows:
        raise UserError(f"{labels}: no rows below the header; expected one row per scan")
    return rows, hashlib.sha256(data).hexdigest()


def find_labelled_sources(raw: Path, labels: Path, normal_class: str) -> LabelledSources:
    """The scans a labels file lists, sorted by scan id, with its classes."""
    raw = Path(raw)
    if not raw.is_dir():
        raise UserError(f"raw folder {raw} does not exist or is not a folder")
    rows, sha256 = read_labels(labels, raw)
    sources: dict[str, Source] = {}
    refused: list[tuple[Path, str]] = []
    for row in rows:
        label = label_for_class(row.class_name, normal_class)
        target = raw / row.path
        if target.is_file():
            scan_id = row.path[: len(row.path) - len(target.name)] + scan_stem(target.name)
            made = [nifti_source(raw, target, scan_id, row.class_name, label)]
        else:
            made, refused_files = _folder_sources(raw, target, row, label, labels)
            refused.extend(refused_files)
        for source in made:
            if source.scan_id in sources:
                raise UserError(f"{labels}: row {row.line}: scan id {source.scan_id} is also that of "
                                f"{sources[source.scan_id].relative_path}")
            sources[source.scan_id] = source
    listed = {row.path for row in rows}
    unlisted = sum(1 for path in visible_files(raw) if is_scan_file(path) and not _covered(path, raw, listed))
    return LabelledSources(sorted(sources.values(), key=lambda source: source.scan_id), refused, unlisted, sha256)


def _folder_sources(raw: Path, folder: Path, row: LabelRow, label: int, labels: Path):
    files = [path for path in visible_files(folder) if looks_like_dicom(path)]
    if not files:
        raise UserError(f"{labels}: row {row.line}: {row.path} holds no DICOM files")
    require_pydicom(files[0])
    series, refused = group_series(files)
    if not series and not refused:
        raise UserError(f"{labels}: row {row.line}: {row.path} holds no DICOM series (only localizers or an index)")
    made = []
    for one in series:
        name = row.path if len(series) == 1 else f"{row.path}/{one.uid}"
        made.append(series_source(raw, folder, name, name, row.class_name, label, one))
    return made, refused


def _covered(path: Path, raw: Path, listed: set[str]) -> bool:
    relative = path.relative_to(raw)
    return relative.as_posix() in listed or any(parent.as_posix() in listed for parent in relative.parents)
