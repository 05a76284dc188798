"""One scan through the per-scan transform, in a worker: a volume and its record, or one line saying why not.

`process_source` is what every backend (local processes, threads, a Dask cluster) runs per
scan, and `cancelled_on_exit` how every backend drops the scans still queued when the build
stops early. The line comes from `preprocess.reading.formats.describe_scan_failure`, the one ladder
from an exception to a reason; `predict` uses it too, so a scan that cannot be used is described the
same way everywhere.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from preprocess.cache.schema import LesionMaskRecord, ScanRecord
from preprocess.preprocessing import Preprocessing
from preprocess.finding.sources import Source
from preprocess.engine.time_limits import ScanTimeout, time_limit
from preprocess.reading.formats import describe_scan_failure
from preprocess.reading.scan_stats import hard_problems
from preprocess.reading.transform import preprocess_scan

TIMEOUT_REASON = "took longer than"  # timed-out scans are retried by the next build, not remembered


@dataclass
class ScanOutcome:
    """What a worker sends back for one scan: a volume and its record, or a reason."""

    volume: np.ndarray | None = None
    record: ScanRecord | None = None
    reason: str | None = None
    cannot_open: str | None = None  # the worker could not open the file at all (missing, no permission)
    lesion_mask: np.ndarray | None = None  # uint8, the volume's shape, when the scan has a mask


def process_source(source: Source, preprocessing: Preprocessing, timeout_seconds: float) -> ScanOutcome:
    """Preprocess one scan in a worker; any failure becomes a reason, never an exception."""
    try:
        with time_limit(timeout_seconds):
            volume, info = preprocess_scan(
                source.path, preprocessing.shape, preprocessing.hu_min, preprocessing.hu_max, source.series_files,
                preprocessing.crop, source.mask.path if source.mask else None,
            )
    except ScanTimeout:
        return ScanOutcome(reason=f"{TIMEOUT_REASON} {timeout_seconds:g} s (--scan-timeout)")
    except (FileNotFoundError, PermissionError) as error:  # gone since listed, or not on this worker's storage
        return ScanOutcome(reason=describe_scan_failure(error), cannot_open=f"{type(error).__name__}: {error}")
    except Exception as error:
        return ScanOutcome(reason=describe_scan_failure(error))
    problems = hard_problems(info.stats)  # the rule `predict` applies: a scan it would not judge is not trained on
    if problems:
        return ScanOutcome(reason="; ".join(problems))
    record = ScanRecord(
        scan_id=source.scan_id, label=source.label, class_name=source.class_name,
        source_path=source.relative_path, source_sha256=info.sha256, source_size=source.size,
        source_mtime_ns=source.mtime_ns, source_shape=info.source_shape,
        source_spacing_mm=info.spacing_mm, stats=info.stats,
        lesion_mask=LesionMaskRecord(source.mask.relative_path, source.mask.size, source.mask.mtime_ns,
                                     info.lesion_mask_sha256)
        if source.mask else None,
    )
    return ScanOutcome(volume=volume, record=record, lesion_mask=info.lesion_mask)


@contextmanager
def cancelled_on_exit(outcomes):
    """Around the use of a joblib generator of outcomes: leaving the block cancels the scans not yet done."""
    try:
        yield
    finally:
        with warnings.catch_warnings():  # leaving early is deliberate: no "tasks cancelled" warning
            warnings.filterwarnings("ignore", message=".*have been cancelled", category=UserWarning)
            outcomes.close()

