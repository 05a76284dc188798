"""THE cache schema: dataset names, attributes, version, one writer and one reader.

Nothing else in the project spells an HDF5 path. `preprocess.build` writes through
`CacheWriter`; `train` reads through `CacheReader`. Layout (schema version 1):

    /volumes              float32 (N, H, W, D), chunk = one scan, values in [0, 1]
    /labels               int8 (N,): 0 normal, 1 abnormal
    /scan_ids             str (N,), unique, sorted, e.g. "CT-0/study_0001"
    /class_names          str (N,): the MosMedData folder, "CT-0" ... "CT-4" (severity grade)
    /source_paths         str (N,): relative to the build's --raw folder
    /source_sha256        str (N,): of each source file as stored
    /source_sizes         int64 (N,) bytes, /source_mtimes_ns int64 (N,): for up-to-date checks
    /source_shapes        int32 (N, 3), /source_spacing_mm float64 (N, 3): canonical RAS axes
    /splits/train|val|test  int64 sorted row indices; disjoint, together every row
    /failures/source_paths, /failures/reasons, /failures/sizes, /failures/mtimes_ns
    attrs: format, schema_version, shape, hu_min, hu_max, resample_method, orientation,
           seed, val_fraction, test_fraction, package_version, created_utc, fingerprint

`fingerprint` is a sha256 over the preprocessing options and every (scan id, source sha256):
two caches with the same fingerprint hold the same data.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from preprocess.errors import UserError

FORMAT_NAME = "mosmed3d-cache"
SCHEMA_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
ROW_TABLES = ("labels", "scan_ids", "class_names", "source_paths", "source_sha256", "source_sizes",
              "source_mtimes_ns", "source_shapes", "source_spacing_mm")
STRING = h5py.string_dtype("utf-8")
TEMP_MARKER = ".tmp-"
REQUIRED_ATTRIBUTES = ("shape", "hu_min", "hu_max", "resample_method", "orientation", "seed",
                       "val_fraction", "test_fraction", "fingerprint")


class CacheError(UserError):
    """The file is missing, is not a cache of this project, or is inconsistent."""


@dataclass(frozen=True)
class Preprocessing:
    """The options that decide a cache's arrays; any change means a full rebuild."""

    shape: tuple[int, int, int]
    hu_min: float
    hu_max: float
    resample_method: str
    orientation: str


@dataclass(frozen=True)
class SplitOptions:
    seed: int
    val_fraction: float
    test_fraction: float


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


@dataclass(frozen=True)
class Failure:
    source_path: str
    reason: str
    source_size: int
    source_mtime_ns: int


def compute_fingerprint(preprocessing: Preprocessing, scan_ids, source_sha256) -> str:
    """Identify a cache's content: same options and same source files give the same value."""
    digest = hashlib.sha256(json.dumps(_jsonable(preprocessing), sort_keys=True).encode())
    for scan_id, sha in zip(scan_ids, source_sha256):
        digest.update(f"\n{scan_id}\t{sha}".encode())
    return digest.hexdigest()


def _jsonable(options) -> dict:
    return {field.name: _plain(getattr(options, field.name)) for field in fields(options)}


def _plain(value):
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def temp_path_for(out: Path) -> Path:
    """The temporary file a build writes beside `out` (same folder, so the rename is atomic)."""
    return out.with_name(f".{out.name}{TEMP_MARKER}{os.getpid()}")


def stale_temp_files(out: Path) -> list[Path]:
    """Temporary files left beside `out` by builds whose process no longer runs."""
    stale = []
    for candidate in out.parent.glob(f".{out.name}{TEMP_MARKER}*"):
        pid_text = candidate.name.rsplit(TEMP_MARKER, 1)[-1]
        if not pid_text.isdigit() or not _process_alive(int(pid_text)):
            stale.append(candidate)
    return stale


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheWriter:
    """Write a new cache to a temporary file and move it to `out` only when it is complete.

    Use as a context manager: leaving the block by an exception removes the temporary file and
    leaves whatever stood at `out` untouched. `commit()` makes the file durable and renames it.
    A failed write (disk full, file too large) becomes one `CacheError` line.
    """

    def __init__(self, out: Path, preprocessing: Preprocessing, split_options: SplitOptions,
                 capacity: int, package_version: str):
        self.out = Path(out)
        self.preprocessing = preprocessing
        self.split_options = split_options
        self.capacity = capacity
        self.package_version = package_version
        self.temp_path = temp_path_for(self.out)
        self.records: list[ScanRecord] = []
        self.file: h5py.File | None = None

    def __enter__(self) -> CacheWriter:
        check_free_space(self.out.parent, estimated_cache_bytes(self.capacity, self.preprocessing.shape))
        try:
            with self._writing():
                # rdcc_nbytes=0: every chunk goes straight to disk, so a full disk fails the write
                # that hit it, not a flush much later inside HDF5's cache
                self.file = h5py.File(self.temp_path, "w", rdcc_nbytes=0)
                shape = tuple(self.preprocessing.shape)
                self.file.create_dataset(
                    "volumes", shape=(self.capacity, *shape), maxshape=(None, *shape),
                    dtype=np.float32, chunks=(1, *shape),
                )
        except BaseException:  # Ctrl-C can land here, after the file exists: __exit__ would not run
            self._abandon()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._abandon()
        elif self.file is not None:
            self.file.close()
            self.file = None

    @contextmanager
    def _writing(self):
        """Turn the OS's refusal to write (ENOSPC, EFBIG, EACCES) into one line for the user."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            errno_value = getattr(error, "errno", None)
            reason = os.strerror(errno_value) if errno_value else str(error).splitlines()[0]
            self._abandon()
            raise CacheError(f"could not write the cache beside {self.out}: {reason}; "
                             "the previous cache is untouched") from None

    def _abandon(self) -> None:
        """Close and delete the temporary file; a broken file's own errors are not news."""
        hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
        try:
            if self.file is not None:
                try:
                    self.file.close()
                except Exception:
                    pass
                self.file = None
            gc.collect()  # release h5py objects now, while their complaints are silenced
        finally:
            sys.unraisablehook = hook
        self.temp_path.unlink(missing_ok=True)

    def append(self, record: ScanRecord, volume: np.ndarray) -> None:
        """Write the next row; rows must come in scan-id order."""
        if self.records and record.scan_id <= self.records[-1].scan_id:
            raise ValueError(f"rows out of order: {record.scan_id} after {self.records[-1].scan_id}")
        if volume.shape != tuple(self.preprocessing.shape) or volume.dtype != np.float32:
            raise ValueError(f"volume {volume.shape} {volume.dtype} does not fit the cache")
        row = len(self.records)
        if row >= self.capacity:
            raise ValueError("more rows than the writer's capacity")
        with self._writing():
            self.file["volumes"].write_direct(np.ascontiguousarray(volume), dest_sel=np.s_[row])
        self.records.append(record)

    def commit(self, splits: dict[str, np.ndarray], failures: list[Failure]) -> None:
        """Write the per-row tables, splits and attributes, then atomically replace `out`."""
        with self._writing():
            self._write_tables(splits, failures)
            self.file.flush()
            self.file.close()
            self.file = None
            fsync_path(self.temp_path)
            os.replace(self.temp_path, self.out)
        fsync_path(self.out.parent)

    def _write_tables(self, splits: dict[str, np.ndarray], failures: list[Failure]) -> None:
        file, records = self.file, self.records
        file["volumes"].resize(len(records), axis=0)
        column = lambda name: [getattr(record, name) for record in records]  # noqa: E731
        file.create_dataset("labels", data=np.array(column("label"), dtype=np.int8).reshape(-1))
        for name, attribute in (("scan_ids", "scan_id"), ("class_names", "class_name"),
                                ("source_paths", "source_path"), ("source_sha256", "source_sha256")):
            file.create_dataset(name, data=np.array(column(attribute), dtype=object), dtype=STRING)
        file.create_dataset("source_sizes", data=np.array(column("source_size"), dtype=np.int64))
        file.create_dataset("source_mtimes_ns", data=np.array(column("source_mtime_ns"), dtype=np.int64))
        file.create_dataset("source_shapes", data=np.array(column("source_shape"), dtype=np.int32).reshape(-1, 3))
        file.create_dataset(
            "source_spacing_mm", data=np.array(column("source_spacing_mm"), dtype=np.float64).reshape(-1, 3)
        )
        group = file.create_group("splits")
        for name in SPLIT_NAMES:
            group.create_dataset(name, data=np.sort(np.asarray(splits[name], dtype=np.int64)))
        failed = file.create_group("failures")
        failed.create_dataset("source_paths", data=[f.source_path for f in failures], dtype=STRING)
        failed.create_dataset("reasons", data=[f.reason for f in failures], dtype=STRING)
        failed.create_dataset("sizes", data=np.array([f.source_size for f in failures], dtype=np.int64))
        failed.create_dataset("mtimes_ns", data=np.array([f.source_mtime_ns for f in failures], dtype=np.int64))
        attrs = file.attrs
        attrs["format"] = FORMAT_NAME
        attrs["schema_version"] = SCHEMA_VERSION
        for name, value in _jsonable(self.preprocessing).items():
            attrs[name] = value
        for name, value in _jsonable(self.split_options).items():
            attrs[name] = value
        attrs["package_version"] = self.package_version
        attrs["created_utc"] = np.datetime64("now", "s").astype(str) + "Z"
        attrs["fingerprint"] = compute_fingerprint(
            self.preprocessing, column("scan_id"), column("source_sha256")
        )


def estimated_cache_bytes(rows: int, shape) -> int:
    """An upper bound on a cache file's size: the volumes plus generous room for the tables."""
    return rows * int(np.prod(shape)) * 4 + rows * 4096 + 1024**2


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Fail before any work if the folder's filesystem cannot hold the new cache."""
    free_bytes = shutil.disk_usage(folder).free  # what an unprivileged writer may still use
    if free_bytes < needed_bytes:
        raise CacheError(f"not enough disk space in {folder}: the cache needs about "
                         f"{needed_bytes / 1024**2:.0f} MiB, {free_bytes / 1024**2:.0f} MiB are free")


def fsync_path(path: Path) -> None:
    """Make a file's (or a folder's entries') writes durable before anything depends on them."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
        if version != SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: cache schema version {version}, this tool reads version {SCHEMA_VERSION}; "
                "rebuild it with `python -m preprocess build --force`"
            )
        missing_attrs = [name for name in REQUIRED_ATTRIBUTES if name not in attrs]
        if missing_attrs:
            raise CacheError(f"{self.path}: damaged cache, missing attributes {', '.join(missing_attrs)}")
        required = ["volumes", *ROW_TABLES, *(f"splits/{name}" for name in SPLIT_NAMES)]
        missing = [name for name in required if name not in self.file]
        if missing:
            raise CacheError(f"{self.path}: damaged cache, missing {', '.join(missing)}")
        volumes = self.file["volumes"]
        shape = tuple(int(n) for n in attrs["shape"])
        rows = volumes.shape[0]
        if volumes.dtype != np.float32 or volumes.shape[1:] != shape:
            raise CacheError(f"{self.path}: damaged cache, /volumes is {volumes.dtype} {volumes.shape}, "
                             f"expected float32 (N, {', '.join(map(str, shape))})")
        for name in ROW_TABLES:
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
        )

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
        return {name: _plain(value) for name, value in self.file.attrs.items()}

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
        ]
        return [ScanRecord(*row) for row in zip(*columns)]

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
