"""THE cache: its schema (`schema`), one writer (`writer`) and one reader (`reader`).

Nothing else in the project spells an HDF5 path. `preprocess.engine.build` writes through
`CacheWriter`; `train` reads through `CacheReader`. The layout (datasets, attributes, schema
versions, the fingerprint) is documented in one place, docs/cache-format.md; `schema.py` holds
the names and the version in code.
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
