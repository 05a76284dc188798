"""THE cache: its schema (`schema`), one writer (`writer`) and one reader (`reader`).

Nothing else in the project spells an HDF5 path. `preprocess.build` writes through
`CacheWriter`; `train` reads through `CacheReader`. Layout (schema version 1):

    /volumes              float32 (N, H, W, D), chunk = one scan, values in [0, 1]
    /labels               int8 (N,): 0 normal, 1 abnormal
    /scan_ids             str (N,), unique, sorted, e.g. "CT-0/study_0001"
    /class_names          str (N,): the MosMedData folder, "CT-0" ... "CT-4" (severity grade),
                          or the class a `--labels` file gives
    /source_paths         str (N,): relative to the build's --raw folder (a DICOM series: its
                          folder, or <folder>/<SeriesInstanceUID>)
    /source_sha256        str (N,): of each source file as stored (a series: of its files' bytes)
    /source_sizes         int64 (N,) bytes, /source_mtimes_ns int64 (N,): for up-to-date checks
                          (a series: its total bytes, and a 63-bit digest of its files' names,
                          sizes and mtimes in place of an mtime)
    /source_shapes        int32 (N, 3), /source_spacing_mm float64 (N, 3): canonical RAS axes
    /splits/train|val|test  int64 sorted row indices; disjoint, together every row
    /failures/source_paths, /failures/reasons, /failures/sizes, /failures/mtimes_ns
    attrs: format, schema_version, shape, hu_min, hu_max, resample_method, orientation,
           seed, val_fraction, test_fraction, package_version, created_utc, fingerprint

`fingerprint` is a sha256 over the preprocessing options and every (scan id, source sha256), plus
the labels file's sha256 for a build from one (`build --labels`):
two caches with the same fingerprint hold the same data.
"""
from preprocess.cache.reader import CacheReader
from preprocess.cache.schema import (
    FORMAT_NAME, SCHEMA_VERSION, SPLIT_NAMES, CacheError, Failure, ScanRecord, SplitOptions, compute_fingerprint,
    estimated_cache_bytes, stale_temp_files, temp_path_for,
)
from preprocess.cache.writer import CacheWriter, check_free_space
from preprocess.preprocessing import Preprocessing

__all__ = [
    "FORMAT_NAME", "SCHEMA_VERSION", "SPLIT_NAMES", "CacheError", "CacheReader", "CacheWriter", "Failure",
    "Preprocessing", "ScanRecord", "SplitOptions", "check_free_space", "compute_fingerprint",
    "estimated_cache_bytes", "stale_temp_files", "temp_path_for",
]
