"""The cache's schema: dataset names, attributes, version, the row records, and the fingerprint.

The layout is documented in docs/cache-format.md. The writer (`preprocess.cache.writer`) and the reader
(`preprocess.cache.reader`) both follow this module; nothing else spells an HDF5 path.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from common.errors import UserError
from common.files import TEMP_MARKER
from common.processes import process_alive
from preprocess.preprocessing import Preprocessing
from preprocess.reading.scan_stats import HISTOGRAM_BINS, ScanStats

FORMAT_NAME = "mosmed3d-cache"
# 2: /scan_stats (raw-HU statistics per row); 3: the lungs (/scan_stats/lung_*, crop); 4: lesion masks (/lesion_masks)
SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)  # older caches train and evaluate; 1 has no statistics, 1-2 no lungs, 1-3 no masks
MASKS_GROUP = "lesion_masks"
# /lesion_masks/<name>, version 4 on: per row, its mask file ("" and 0 for none) and the mask itself
MASK_TABLES = ("paths", "sizes", "mtimes_ns", "sha256", "volumes")
STATS_GROUP = "scan_stats"
# /scan_stats/<name>: dtype and per-row shape; ScanStats's fields (version 2 on)
STATS_TABLES = {
    "hu_histogram": (np.float32, (HISTOGRAM_BINS,)),
    "spacing_mm": (np.float64, (3,)),
    "fov_mm": (np.float64, (3,)),
    "slices": (np.int32, ()),
    "lung_fraction": (np.float64, ()),
    "air_fraction": (np.float64, ()),
    "hu_min": (np.float64, ()),
    "hu_max": (np.float64, ()),
}
# the lungs (`preprocess.reading.lungs`), version 3 on
LUNG_TABLES = {
    "lung_volume_ml": (np.float64, ()),
    "lung_count": (np.int32, ()),
    "lung_extent_mm": (np.float64, (3,)),
    "lung_box": (np.int32, (6,)),
}

SPLIT_NAMES = ("train", "val", "test")
ROW_TABLES = ("labels", "scan_ids", "class_names", "source_paths", "source_sha256", "source_sizes",
              "source_mtimes_ns", "source_shapes", "source_spacing_mm")
STRING = h5py.string_dtype("utf-8")
REQUIRED_ATTRIBUTES = ("shape", "hu_min", "hu_max", "resample_method", "orientation", "seed",
                       "val_fraction", "test_fraction", "fingerprint")


def stats_tables(version: int) -> dict:
    """The /scan_stats tables a cache of this schema version has."""
    return {} if version < 2 else STATS_TABLES if version < 3 else {**STATS_TABLES, **LUNG_TABLES}


class CacheError(UserError):
    """The file is missing, is not a cache of this project, or is inconsistent."""


@dataclass(frozen=True)
class SplitOptions:
    seed: int
    val_fraction: float
    test_fraction: float


@dataclass(frozen=True)
class LesionMaskRecord:
    """Which mask file a row's lesion mask came from (`preprocess.finding.masks`)."""

    path: str  # to the masks folder
    size: int
    mtime_ns: int
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class ScanRecord:
    """One row's provenance, everything but the volume."""

    scan_id: str
    label: int
    class_name: str
    source_path: str
    source_sha256: str
    source_size: int
    source_mtime_ns: int
    source_shape: tuple[int, int, int]
    source_spacing_mm: tuple[float, float, float]
    stats: ScanStats | None = None  # None only in a version-1 cache
    lesion_mask: LesionMaskRecord | None = None  # the row's mask file; None: no mask


@dataclass(frozen=True)
class Failure:
    source_path: str
    reason: str
    source_size: int
    source_mtime_ns: int


def compute_fingerprint(preprocessing: Preprocessing, scan_ids, source_sha256, labels_sha256: str | None = None,
                        masks=None) -> str:
    """Identify a cache's content: same options and same source files give the same value.

    A build from a labels file (`build --labels`) adds the file's sha256, so a relabelled cache
    never passes for the old one; a build from class folders has its labels in its scan ids. Each
    row's lesion mask (`masks`: a `LesionMaskRecord` or None per row) adds that file's sha256.
    """
    digest = hashlib.sha256(json.dumps(preprocessing.to_json(), sort_keys=True).encode())
    for scan_id, sha in zip(scan_ids, source_sha256):
        digest.update(f"\n{scan_id}\t{sha}".encode())
    if labels_sha256 is not None:
        digest.update(f"\nlabels\t{labels_sha256}".encode())
    for scan_id, mask in zip(scan_ids, masks or ()):
        if mask is not None:
            digest.update(f"\nmask\t{scan_id}\t{mask.sha256}".encode())
    return digest.hexdigest()


def temp_path_for(out: Path) -> Path:
    """The temporary file a build writes beside `out` (same folder, so the rename is atomic)."""
    return out.with_name(f".{out.name}{TEMP_MARKER}{os.getpid()}")


def stale_temp_files(out: Path) -> list[Path]:
    """Temporary files left beside `out` by builds whose process no longer runs."""
    stale = []
    for candidate in out.parent.glob(f".{out.name}{TEMP_MARKER}*"):
        pid_text = candidate.name.rsplit(TEMP_MARKER, 1)[-1]
        if not pid_text.isdigit() or not process_alive(int(pid_text)):
            stale.append(candidate)
    return stale


def estimated_cache_bytes(rows: int, shape) -> int:
    """An upper bound on a cache file's size: the volumes plus generous room for the tables."""
    return rows * int(np.prod(shape)) * 5 + rows * 4096 + 1024**2  # float32 volumes, uint8 masks

