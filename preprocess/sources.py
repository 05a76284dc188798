"""Find the scans under a raw folder and read their labels from the MosMedData layout.

MosMedData keeps one folder per severity grade, `CT-0` (normal) to `CT-4`; the full release
nests them under `studies/`, and the tutorial's subsets use `CT-0` with `CT-1` or `CT-23`.
Label 0 is `CT-0`, label 1 any other `CT-k`. The grade folder name is kept for severity work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

CLASS_FOLDER = re.compile(r"^CT-(\d+)$")
SCAN_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Source:
    """One scan file found under the raw folder."""

    path: Path
    relative_path: str  # to the raw folder, with forward slashes
    scan_id: str  # "<class folder>/<file name without .nii[.gz]>"
    class_name: str
    label: int
    size: int
    mtime_ns: int


def scan_stem(name: str) -> str | None:
    """The file name without its NIfTI suffix, or None if it is not a NIfTI file name."""
    lowered = name.lower()
    for suffix in SCAN_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def label_for_class(class_name: str) -> int:
    """0 for normal (`CT-0`), 1 for any finding of viral pneumonia (`CT-1` ... `CT-4`, `CT-23`)."""
    return 0 if class_name == "CT-0" else 1


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
    for path in sorted(raw.rglob("*")):
        stem = scan_stem(path.name)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        class_folder = next((part for part in reversed(path.relative_to(raw).parts[:-1])
                             if CLASS_FOLDER.match(part)), None)
        if class_folder is None:
            continue
        scan_id = f"{class_folder}/{stem}"
        if scan_id in found:
            refused.append((path, f"duplicate scan id {scan_id} (also {found[scan_id].relative_path})"))
            continue
        stat = path.stat()
        found[scan_id] = Source(
            path=path, relative_path=path.relative_to(raw).as_posix(), scan_id=scan_id,
            class_name=class_folder, label=label_for_class(class_folder),
            size=stat.st_size, mtime_ns=stat.st_mtime_ns,
        )
    if not found and not refused:
        raise UserError(f"no scans in {raw}: expected .nii or .nii.gz files inside CT-0, CT-1, ... folders")
    return sorted(found.values(), key=lambda source: source.scan_id), refused
