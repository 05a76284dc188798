"""`CacheReader`: open and validate a cache; every read of a cache in the project goes through it."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from preprocess.cache.schema import (
    FORMAT_NAME, MASK_TABLES, MASKS_GROUP, READABLE_SCHEMA_VERSIONS, REQUIRED_ATTRIBUTES, ROW_TABLES, SCHEMA_VERSION,
    SPLIT_NAMES, STATS_GROUP, STATS_TABLES, CacheError, Failure, LesionMaskRecord, ScanRecord, SplitOptions,
    stats_tables,
)
from preprocess.preprocessing import Preprocessing, plain_value
from preprocess.reading.scan_stats import ScanStats


class CacheReader:
    """Open and validate a cache; every read of a cache in the project goes through here."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache file")
        if self.path.is_dir():
            raise CacheError(f"{self.path}: is a folder, not a cache file")
        try:
            # locking=False: a build replaces the file by rename, never writes into it
            self.file = h5py.File(self.path, "r", locking=False)
        except OSError as error:
            reason = str(error).splitlines()[0].split("(", 1)[-1].rstrip(")")  # e.g. "truncated file: eof = ..."
            raise CacheError(f"{self.path}: not an HDF5 file, or a damaged one ({reason})") from None
        try:
            self._validate()
        except Exception:
            self.file.close()
            raise

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def _validate(self) -> None:
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise CacheError(f"{self.path}: not a {FORMAT_NAME} file (HDF5, but not this project's cache)")
        version = int(attrs.get("schema_version", -1))
        if version not in READABLE_SCHEMA_VERSIONS:
            raise CacheError(
                f"{self.path}: cache schema version {version}, this tool reads version {SCHEMA_VERSION}; "
                "rebuild it with `python -m preprocess build --force`"
            )
        missing_attrs = [name for name in REQUIRED_ATTRIBUTES if name not in attrs]
        if missing_attrs:
            raise CacheError(f"{self.path}: damaged cache, missing attributes {', '.join(missing_attrs)}")
        required = ["volumes", *ROW_TABLES, *(f"splits/{name}" for name in SPLIT_NAMES)]
        masks = [f"{MASKS_GROUP}/{name}" for name in MASK_TABLES] if version >= 4 else []
        required += [f"{STATS_GROUP}/{name}" for name in stats_tables(version)] + masks
        missing = [name for name in required if name not in self.file]
        if missing:
            raise CacheError(f"{self.path}: damaged cache, missing {', '.join(missing)}")
        volumes = self.file["volumes"]
        shape = tuple(int(n) for n in attrs["shape"])
        rows = volumes.shape[0]
        if volumes.dtype != np.float32 or volumes.shape[1:] != shape:
            raise CacheError(f"{self.path}: damaged cache, /volumes is {volumes.dtype} {volumes.shape}, "
                             f"expected float32 (N, {', '.join(map(str, shape))})")
        for name in [*ROW_TABLES, *(f"{STATS_GROUP}/{name}" for name in stats_tables(version)), *masks]:
            if self.file[name].shape[0] != rows:
                raise CacheError(f"{self.path}: damaged cache, /{name} has {self.file[name].shape[0]} rows, "
                                 f"/volumes has {rows}")
        labels = self.file["labels"][:]
        if labels.dtype.kind not in "iu" or not np.isin(labels, (0, 1)).all():
            raise CacheError(f"{self.path}: damaged cache, /labels must be integers 0 or 1")
        seen = np.zeros(rows, dtype=np.int64)
        for name in SPLIT_NAMES:
            indices = self.file[f"splits/{name}"][:]
            if indices.dtype.kind not in "iu" or indices.ndim != 1:
                raise CacheError(f"{self.path}: damaged cache, /splits/{name} must be 1-D integers")
            if indices.size and (indices.min() < 0 or indices.max() >= rows):
                raise CacheError(f"{self.path}: damaged cache, /splits/{name} has indices outside 0..{rows - 1}")
            np.add.at(seen, indices, 1)
        if (seen != 1).any():
            raise CacheError(f"{self.path}: damaged cache, the splits do not partition the rows")

    # -- attributes ------------------------------------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        attrs = self.file.attrs
        return Preprocessing(
            shape=tuple(int(n) for n in attrs["shape"]),
            hu_min=float(attrs["hu_min"]),
            hu_max=float(attrs["hu_max"]),
            resample_method=str(attrs["resample_method"]),
            orientation=str(attrs["orientation"]),
            crop=str(attrs.get("crop", "none")),  # a cache before schema version 3 holds whole scans
            lung_method=str(attrs.get("lung_method", "")),
        )

    @property
    def schema_version(self) -> int:
        return int(self.file.attrs["schema_version"])

    @property
    def has_scan_stats(self) -> bool:
        """Whether the rows carry their raw-HU statistics (schema version 2 on; see `preprocess.reading.scan_stats`)."""
        return self.schema_version >= 2

    def scan_stats(self) -> list[ScanStats] | None:
        """Every row's statistics in row order; None for a version-1 cache, which has none."""
        if not self.has_scan_stats:
            return None
        group = self.file[STATS_GROUP]
        columns = {name: group[name][:] for name in stats_tables(self.schema_version)}

        def lungs(row) -> dict:
            if "lung_box" not in columns:
                return {}
            return dict(lung_volume_ml=float(columns["lung_volume_ml"][row]), lung_count=int(columns["lung_count"][row]),
                        lung_extent_mm=tuple(float(value) for value in columns["lung_extent_mm"][row]),
                        lung_box=tuple(int(value) for value in columns["lung_box"][row]))

        return [
            ScanStats(
                hu_histogram=tuple(float(value) for value in columns["hu_histogram"][row]),
                spacing_mm=tuple(float(value) for value in columns["spacing_mm"][row]),
                fov_mm=tuple(float(value) for value in columns["fov_mm"][row]),
                slices=int(columns["slices"][row]),
                **{name: float(columns[name][row]) for name in ("lung_fraction", "air_fraction", "hu_min", "hu_max")},
                **lungs(row),
            )
            for row in range(len(self))
        ]

    @property
    def has_lungs(self) -> bool:
        """Whether the rows carry their lungs and crop boxes (schema version 3 on)."""
        return self.schema_version >= 3

    @property
    def split_options(self) -> SplitOptions:
        attrs = self.file.attrs
        return SplitOptions(int(attrs["seed"]), float(attrs["val_fraction"]), float(attrs["test_fraction"]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.preprocessing.shape

    @property
    def fingerprint(self) -> str:
        return str(self.file.attrs["fingerprint"])

    @property
    def attributes(self) -> dict:
        """Every file attribute as plain JSON-able values (for run configs and `info`)."""
        return {name: plain_value(value) for name, value in self.file.attrs.items()}

    def __len__(self) -> int:
        return int(self.file["volumes"].shape[0])

    # -- per-row tables --------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        return self.file["labels"][:].astype(np.int64)

    @property
    def scan_ids(self) -> list[str]:
        return list(self.file["scan_ids"].asstr()[:])

    @property
    def class_names(self) -> list[str]:
        return list(self.file["class_names"].asstr()[:])

    def split(self, name: str) -> np.ndarray:
        if name not in SPLIT_NAMES:
            raise CacheError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return self.file[f"splits/{name}"][:].astype(np.int64)

    def records(self) -> list[ScanRecord]:
        file = self.file
        columns = [
            self.scan_ids, self.labels.tolist(), self.class_names,
            list(file["source_paths"].asstr()[:]), list(file["source_sha256"].asstr()[:]),
            file["source_sizes"][:].tolist(), file["source_mtimes_ns"][:].tolist(),
            [tuple(row) for row in file["source_shapes"][:].tolist()],
            [tuple(row) for row in file["source_spacing_mm"][:].tolist()],
            self.scan_stats() or [None] * len(self),
            self._mask_records(),
        ]
        return [ScanRecord(*row) for row in zip(*columns)]

    def _mask_records(self) -> list[LesionMaskRecord | None]:
        if self.schema_version < 4:
            return [None] * len(self)
        group = self.file[MASKS_GROUP]
        columns = zip(group["paths"].asstr()[:], group["sizes"][:].tolist(), group["mtimes_ns"][:].tolist(),
                      group["sha256"].asstr()[:])
        return [LesionMaskRecord(*row) if row[0] else None for row in columns]

    @property
    def lesion_mask_rows(self) -> np.ndarray:
        """bool (N,): which rows carry a lesion mask (none before schema version 4)."""
        if self.schema_version < 4:
            return np.zeros(len(self), bool)
        return self.file[f"{MASKS_GROUP}/paths"].asstr()[:].astype(object) != ""

    def read_lesion_mask(self, row: int) -> np.ndarray:
        """One row's uint8 (H, W, D) lesion mask, 255 x each voxel's lesion share; zeros for a row without one."""
        if self.schema_version < 4:
            return np.zeros(self.shape, np.uint8)
        mask = np.empty(self.shape, dtype=np.uint8)
        try:
            self.file[f"{MASKS_GROUP}/volumes"].read_direct(mask, source_sel=np.s_[int(row)])
        except OSError as error:
            raise CacheError(f"{self.path}: the lesion mask of row {row} cannot be read "
                             f"({str(error).splitlines()[0]}); rebuild the cache with `python -m preprocess "
                             "build --force`") from None
        return mask

    def failures(self) -> list[Failure]:
        if "failures" not in self.file:
            return []
        group = self.file["failures"]
        return [
            Failure(*row) for row in zip(
                group["source_paths"].asstr()[:], group["reasons"].asstr()[:],
                group["sizes"][:].tolist(), group["mtimes_ns"][:].tolist(),
            )
        ]

    def read_volume(self, row: int) -> np.ndarray:
        """One scan's float32 (H, W, D) volume; reads exactly one chunk."""
        volume = np.empty(self.shape, dtype=np.float32)
        try:
            self.file["volumes"].read_direct(volume, source_sel=np.s_[int(row)])
        except OSError as error:  # a damaged chunk, or the file cut short under us
            raise CacheError(f"{self.path}: row {row} cannot be read ({str(error).splitlines()[0]}); "
                             "rebuild the cache with `python -m preprocess build --force`") from None
        return volume
