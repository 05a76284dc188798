"""`CacheWriter`: a new cache, written to a temporary file and moved into place only when complete."""
from __future__ import annotations

import gc
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from common.files import move_into_place
from preprocess.cache.schema import (
    FORMAT_NAME, MASKS_GROUP, SCHEMA_VERSION, SPLIT_NAMES, STATS_GROUP, STRING, CacheError, Failure, ScanRecord, SplitOptions, stats_tables,
    compute_fingerprint, estimated_cache_bytes, temp_path_for,
)
from preprocess.preprocessing import Preprocessing, jsonable


class CacheWriter:
    """Write a new cache to a temporary file and move it to `out` only when it is complete.

    Use as a context manager: leaving the block by an exception removes the temporary file and
    leaves whatever stood at `out` untouched. `commit()` makes the file durable and renames it.
    A failed write (disk full, file too large) becomes one `CacheError` line.
    """

    def __init__(self, out: Path, preprocessing: Preprocessing, split_options: SplitOptions,
                 capacity: int, package_version: str, labels_sha256: str | None = None):
        self.out = Path(out)
        self.preprocessing = preprocessing
        self.split_options = split_options
        self.capacity = capacity
        self.package_version = package_version
        self.labels_sha256 = labels_sha256
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
                # most rows have no mask: their chunks are never written, so they cost no bytes
                self.file.create_dataset(
                    f"{MASKS_GROUP}/volumes", shape=(self.capacity, *shape), maxshape=(None, *shape),
                    dtype=np.uint8, chunks=(1, *shape), fillvalue=0, compression="gzip", compression_opts=1,
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

    def append(self, record: ScanRecord, volume: np.ndarray, lesion_mask: np.ndarray | None = None) -> None:
        """Write the next row, with its lesion mask (uint8, the volume's shape) if its record names one;
        rows must come in scan-id order."""
        if self.records and record.scan_id <= self.records[-1].scan_id:
            raise ValueError(f"rows out of order: {record.scan_id} after {self.records[-1].scan_id}")
        if volume.shape != tuple(self.preprocessing.shape) or volume.dtype != np.float32:
            raise ValueError(f"volume {volume.shape} {volume.dtype} does not fit the cache")
        row = len(self.records)
        if row >= self.capacity:
            raise ValueError("more rows than the writer's capacity")
        if (record.lesion_mask is None) != (lesion_mask is None) or (
                lesion_mask is not None and (lesion_mask.shape != volume.shape or lesion_mask.dtype != np.uint8)):
            raise ValueError(f"row {record.scan_id}: a lesion mask needs its record, uint8 at the volume's shape")
        with self._writing():
            self.file["volumes"].write_direct(np.ascontiguousarray(volume), dest_sel=np.s_[row])
            if lesion_mask is not None:
                self.file[f"{MASKS_GROUP}/volumes"].write_direct(np.ascontiguousarray(lesion_mask), dest_sel=np.s_[row])
        self.records.append(record)

    def commit(self, splits: dict[str, np.ndarray], failures: list[Failure]) -> None:
        """Write the per-row tables, splits and attributes, then atomically replace `out`."""
        with self._writing():
            self._write_tables(splits, failures)
            self.file.flush()
            self.file.close()
            self.file = None
            move_into_place(self.temp_path, self.out)

    def _write_tables(self, splits: dict[str, np.ndarray], failures: list[Failure]) -> None:
        file, records = self.file, self.records
        file["volumes"].resize(len(records), axis=0)
        file[f"{MASKS_GROUP}/volumes"].resize(len(records), axis=0)
        masks = [record.lesion_mask for record in records]
        for name, field, dtype in (("paths", "path", STRING), ("sha256", "sha256", STRING),
                                   ("sizes", "size", np.int64), ("mtimes_ns", "mtime_ns", np.int64)):
            empty = "" if dtype is STRING else 0
            values = [empty if mask is None else getattr(mask, field) for mask in masks]
            file.create_dataset(f"{MASKS_GROUP}/{name}", data=np.array(values, dtype=object if dtype is STRING else dtype),
                                dtype=dtype)
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
        if any(record.stats is None for record in records):
            raise ValueError("every row of a new cache needs its scan statistics")
        stats = file.create_group(STATS_GROUP)
        for name, (dtype, row_shape) in stats_tables(SCHEMA_VERSION).items():
            values = np.array([getattr(record.stats, name) for record in records], dtype=dtype)
            stats.create_dataset(name, data=values.reshape(len(records), *row_shape))
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
        for name, value in self.preprocessing.to_json().items():
            attrs[name] = value
        for name, value in jsonable(self.split_options).items():
            attrs[name] = value
        attrs["package_version"] = self.package_version
        attrs["created_utc"] = np.datetime64("now", "s").astype(str) + "Z"
        attrs["fingerprint"] = compute_fingerprint(
            self.preprocessing, column("scan_id"), column("source_sha256"), self.labels_sha256, column("lesion_mask")
        )



def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Fail before any work if the folder's filesystem cannot hold the new cache."""
    free_bytes = shutil.disk_usage(folder).free  # what an unprivileged writer may still use
    if free_bytes < needed_bytes:
        raise CacheError(f"not enough disk space in {folder}: the cache needs about "
                         f"{needed_bytes / 1024**2:.0f} MiB, {free_bytes / 1024**2:.0f} MiB are free")

