"""Build the cache: find scans, preprocess the new or changed ones in parallel, stream into HDF5.

Workers compute and the parent writes, because HDF5 has a single writer. Results come back in
scan-id order through joblib's ordered generator, which keeps at most `2 * jobs` scans in
flight, so memory does not grow with the number of scans. (Finished results wait in the parent
only while the writer is slower than the workers, or behind a scan that is slower than the
rest.) Rows are always sorted by scan id, so the cache's content does not depend on `--jobs`,
on the backend (local processes, or a Dask cluster: `preprocess.engine.dask_cluster`) or on the history of
incremental builds.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.errors import UserError
from preprocess import __version__
from preprocess.cache import (
    CacheError, CacheReader, CacheWriter, Failure, ScanRecord, compute_fingerprint, stale_temp_files,
)
from preprocess.engine.options import BuildOptions, check_options
from preprocess.engine.parallel import preprocessed_in_parallel
from preprocess.engine.scans import TIMEOUT_REASON
from preprocess.finding.masks import attach_masks, masks_folder
from preprocess.finding.sources import Source, find_sources
from preprocess.engine.splits import make_splits
from preprocess.engine.workers import remove_orphaned_handoffs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildReport:
    out: Path
    up_to_date: bool
    cached: int
    reprocessed: int
    reused: int
    failures: list[Failure]
    unlisted: int = 0  # with --labels: scan files under --raw that no row lists (ignored)
    masks: int = 0  # rows with a lesion mask


def open_previous(options: BuildOptions) -> CacheReader | None:
    """The cache standing at --out, if any; a file there that is not a cache needs --force."""
    out = Path(options.out)
    if options.force or not out.exists():
        return None
    try:
        return CacheReader(out)
    except CacheError as error:
        raise UserError(f"{error}; refusing to overwrite it without --force") from None


def build_cache(options: BuildOptions) -> BuildReport:
    """Build or update the cache at options.out; see the module docstring."""
    check_options(options)
    out = Path(options.out)
    if options.labels is not None:
        from preprocess.finding.labels import find_labelled_sources

        labelled = find_labelled_sources(options.raw, options.labels, options.normal_class)
        sources, refused, unlisted, labels_sha256 = (labelled.sources, labelled.refused, labelled.unlisted,
                                                     labelled.sha256)
    else:
        (sources, refused), unlisted, labels_sha256 = find_sources(options.raw), 0, None
    if options.use_masks:
        sources = attach_masks(sources, masks_folder(options.raw, options.masks))
    # leftovers of killed builds are cleaned only once this build has scans to work on: a build
    # refused for bad input changes nothing on disk and says one line
    for stale in stale_temp_files(out):
        log.info("removing %s left by an interrupted build", stale)
        stale.unlink(missing_ok=True)
    remove_orphaned_handoffs()
    preprocessing = options.preprocessing
    previous = open_previous(options)
    try:
        report = _build(options, preprocessing, sources, refused, previous, labels_sha256)
        return replace(report, unlisted=unlisted)
    finally:
        if previous is not None:
            previous.close()


def _build(options, preprocessing, sources, refused, previous, labels_sha256) -> BuildReport:
    reusable_rows: dict[str, tuple[int, ScanRecord]] = {}
    known_failures: dict[str, Failure] = {}
    if previous is not None and not previous.has_lungs:
        log.info("%s is a version-%d cache (no %s): rebuilding every scan", previous.path, previous.schema_version,
                 "lungs" if previous.has_scan_stats else "scan statistics")
    elif previous is not None and previous.preprocessing == preprocessing:
        for row, record in enumerate(previous.records()):
            reusable_rows[record.source_path] = (row, record)
        known_failures = {failure.source_path: failure for failure in previous.failures()
                          if not failure.reason.startswith(TIMEOUT_REASON)}
    elif previous is not None:
        log.info("preprocessing options changed since the last build: rebuilding every scan")

    def unchanged(source: Source, entry) -> bool:
        return entry is not None and (entry.source_size, entry.source_mtime_ns) == (source.size, source.mtime_ns)

    def same_mask(source: Source, record: ScanRecord) -> bool:
        mask, kept = source.mask, record.lesion_mask
        if mask is None or kept is None:
            return mask is None and kept is None
        return (mask.relative_path, mask.size, mask.mtime_ns) == (kept.path, kept.size, kept.mtime_ns)

    plan = []  # (source, "reuse" | "failed" | "process")
    for source in sources:
        reused = reusable_rows.get(source.relative_path)
        if reused is not None and unchanged(source, reused[1]) and reused[1].scan_id == source.scan_id \
                and same_mask(source, reused[1]):
            plan.append((source, "reuse"))
        elif source.mask is None and unchanged(source, known_failures.get(source.relative_path)):
            # (a failed scan with a mask is tried again: the mask may be what failed, and it may have changed)
            plan.append((source, "failed"))
        else:
            plan.append((source, "process"))
    refused_failures = [_failure(path, reason, options.raw) for path, reason in refused]
    to_process = [source for source, action in plan if action == "process"]

    if options.strict:
        known = [known_failures[source.relative_path] for source, action in plan if action == "failed"]
        _refuse_if_strict(known + refused_failures)
    if previous is not None and not to_process and _same_contents(previous, plan, refused_failures, options) \
            and previous.fingerprint == _fingerprint_of(preprocessing, plan, reusable_rows, labels_sha256):
        log.info("%s is up to date (%d scans, %d failed)", options.out, len(previous), len(previous.failures()))
        return BuildReport(Path(options.out), True, len(previous), 0, len(previous), previous.failures(),
                           masks=int(previous.lesion_mask_rows.sum()))
    for failure in refused_failures:
        log.warning("skipped %s: %s", failure.source_path, failure.reason)

    failures = list(refused_failures)
    with (
        preprocessed_in_parallel(to_process, preprocessing, options.jobs, options.scan_timeout_seconds,
                                 options.backend, options.scheduler) as outcomes,
        logging_redirect_tqdm(),
        tqdm(total=len(plan), desc="preprocess", unit="scan", disable=options.quiet) as bar,
        CacheWriter(options.out, preprocessing, options.split_options, len(plan), __version__,
                    labels_sha256) as writer,
    ):
        reprocessed, reused = 0, 0
        for source, action in plan:
            if action == "reuse":
                row, record = reusable_rows[source.relative_path]
                # a labels file may have given the row another class: the volume is the same
                record = replace(record, label=source.label, class_name=source.class_name)
                mask = previous.read_lesion_mask(row) if record.lesion_mask else None
                writer.append(record, previous.read_volume(row), mask)
                reused += 1
            elif action == "failed":
                failures.append(known_failures[source.relative_path])
            else:
                outcome = next(outcomes)
                if outcome.cannot_open and os.access(source.path, os.R_OK):
                    # readable here, not there: every scan would be skipped, so stop instead
                    workers = "Dask workers" if options.backend == "dask" else "workers"
                    raise UserError(f"scan {source.scan_id} is not readable on the {workers}: {outcome.cannot_open} "
                                    "(workers must see --raw at the same path as this machine, e.g. on shared "
                                    "storage); previous cache left as it was")
                if outcome.reason is None:
                    writer.append(outcome.record, outcome.volume, outcome.lesion_mask)
                    reprocessed += 1
                else:
                    failure = Failure(source.relative_path, outcome.reason, source.size, source.mtime_ns)
                    log.warning("skipped %s: %s", source.relative_path, outcome.reason)
                    if options.strict:
                        _refuse_if_strict([failure])
                    failures.append(failure)
            bar.update()
        if not writer.records:
            raise UserError(f"none of the {len(plan)} scans in {options.raw} could be read; no cache written")
        splits = make_splits(
            [record.scan_id for record in writer.records],
            np.array([record.label for record in writer.records]),
            options.seed, options.val_fraction, options.test_fraction,
        )
        if previous is not None:
            previous.close()
        failures.sort(key=lambda failure: failure.source_path)
        writer.commit(splits, failures)
    report = BuildReport(Path(options.out), False, len(writer.records), reprocessed, reused, failures,
                         masks=sum(record.lesion_mask is not None for record in writer.records))
    log.info(
        "cached %d scans (%d preprocessed, %d reused from the previous cache), %d failed -> %s",
        report.cached, report.reprocessed, report.reused, len(report.failures), report.out,
    )
    return report


def _failure(path: Path, reason: str, raw: Path) -> Failure:
    stat = path.stat()
    return Failure(path.relative_to(raw).as_posix(), reason, stat.st_size, stat.st_mtime_ns)


def _refuse_if_strict(failures: list[Failure]) -> None:
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise UserError(f"--strict: {first.source_path}: {first.reason}{more}; previous cache left as it was")


def _same_contents(previous: CacheReader, plan, refused_failures, options: BuildOptions) -> bool:
    """Whether the previous cache already holds exactly these rows, failures and splits."""
    reused = {source.relative_path for source, action in plan if action == "reuse"}
    failed = {source.relative_path for source, action in plan if action == "failed"}
    failed |= {failure.source_path for failure in refused_failures}
    previous_rows = {record.source_path for record in previous.records()}
    classes = {(source.relative_path, source.label, source.class_name) for source, action in plan if action == "reuse"}
    previous_classes = {(record.source_path, record.label, record.class_name) for record in previous.records()}
    previous_failed = {failure.source_path for failure in previous.failures()}
    return (
        reused == previous_rows
        and classes == previous_classes
        and failed == previous_failed
        and previous.split_options == options.split_options
    )


def _fingerprint_of(preprocessing, plan, reusable_rows, labels_sha256) -> str:
    """The fingerprint a build of only reused rows would write (it covers a labels file's content)."""
    records = [reusable_rows[source.relative_path][1] for source, action in plan if action == "reuse"]
    return compute_fingerprint(preprocessing, [record.scan_id for record in records],
                               [record.source_sha256 for record in records], labels_sha256,
                               [record.lesion_mask for record in records])
