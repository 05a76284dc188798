"""Build the cache: find scans, preprocess the new or changed ones in parallel, stream into HDF5.

Workers compute and the parent writes, because HDF5 has a single writer. Results come back in
scan-id order through joblib's ordered generator, which keeps at most `2 * jobs` scans in
flight, so memory does not grow with the number of scans. (Finished results wait in the parent
only while the writer is slower than the workers, or behind a scan that is slower than the
rest.) Rows are always sorted by scan id, so the cache's content does not depend on `--jobs`,
on the backend (local processes, or a Dask cluster: `preprocess.backends`) or on the history of
incremental builds.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from preprocess import __version__
from preprocess.cache import (
    CacheError, CacheReader, CacheWriter, Failure, Preprocessing, ScanRecord, SplitOptions,
    stale_temp_files,
)
from preprocess.errors import UserError
from preprocess.sources import Source, find_sources
from preprocess.splits import make_splits
from preprocess.volume import CANONICAL_ORIENTATION, RESAMPLE_METHOD, ScanError, preprocess_scan
from preprocess.workers import VolumeHandoff, remove_orphaned_handoffs, start_worker

log = logging.getLogger(__name__)

MAX_SHAPE = 1024
MAX_JOBS = 256
MAX_SCAN_TIMEOUT_SECONDS = 86_400
TIMEOUT_REASON = "took longer than"  # timed-out scans are retried by the next build, not remembered
# where the per-scan work runs: local processes, local threads, or a Dask cluster
BACKENDS = ("loky", "threads", "dask")


@dataclass(frozen=True)
class BuildOptions:
    raw: Path = Path("data/MosMedData")
    out: Path = Path("data/mosmed.h5")
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    shape: tuple[int, int, int] = (128, 128, 64)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    scan_timeout_seconds: float = 600.0
    backend: str = "loky"
    scheduler: str | None = None  # address of a Dask scheduler, for backend "dask"
    force: bool = False
    strict: bool = False
    quiet: bool = False

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            shape=tuple(int(n) for n in self.shape),
            hu_min=float(self.hu_window[0]),
            hu_max=float(self.hu_window[1]),
            resample_method=RESAMPLE_METHOD,
            orientation="".join(CANONICAL_ORIENTATION),
        )

    @property
    def split_options(self) -> SplitOptions:
        return SplitOptions(int(self.seed), float(self.val_fraction), float(self.test_fraction))


@dataclass(frozen=True)
class BuildReport:
    out: Path
    up_to_date: bool
    cached: int
    reprocessed: int
    reused: int
    failures: list[Failure]


def check_options(options: BuildOptions) -> None:
    """Refuse options that cannot make a cache, with one line naming the problem."""
    if len(options.shape) != 3 or any(not 1 <= int(n) <= MAX_SHAPE for n in options.shape):
        raise UserError(f"--shape needs three sizes from 1 to {MAX_SHAPE}, got {' '.join(map(str, options.shape))}")
    if options.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {options.jobs}")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(options, name)
        if not 0 <= value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if options.val_fraction + options.test_fraction >= 1:
        raise UserError("--val-fraction plus --test-fraction must leave rows for training (sum < 1)")
    low, high = options.hu_window
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise UserError(f"--hu-window needs LOW < HIGH, got {low} {high}")
    if not 0 < options.scan_timeout_seconds <= MAX_SCAN_TIMEOUT_SECONDS:
        raise UserError(f"--scan-timeout must be between 0 and {MAX_SCAN_TIMEOUT_SECONDS} seconds, "
                        f"got {options.scan_timeout_seconds:g}")
    if options.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend}")
    if options.backend == "dask" and not options.scheduler:
        raise UserError("--backend dask needs --scheduler ADDRESS, the Dask scheduler's address (tcp://HOST:8786)")
    if options.scheduler and options.backend != "dask":
        raise UserError(f"--scheduler is for --backend dask; this build uses --backend {options.backend}")
    if options.backend == "dask" and importlib.util.find_spec("distributed") is None:
        raise UserError('--backend dask needs dask and distributed: pip install -e ".[dask]"')
    if options.jobs > MAX_JOBS:
        raise UserError(f"--jobs {options.jobs} is more worker processes than this tool starts (at most {MAX_JOBS})")
    if options.seed < 0:
        raise UserError(f"--seed must be non-negative, got {options.seed}")
    out = Path(options.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / 'mosmed.h5'}")
    if not out.parent.is_dir():
        raise UserError(f"--out folder {out.parent} does not exist or is not a folder")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out folder {out.parent} is not writable")


@dataclass
class _Outcome:
    """What a worker sends back for one scan: a volume and its record, or a reason."""

    volume: np.ndarray | None = None
    record: ScanRecord | None = None
    reason: str | None = None
    cannot_open: str | None = None  # the worker could not open the file at all (missing, no permission)


class ScanTimeout(Exception):
    pass


def time_limit(seconds: float):
    """A context manager that raises ScanTimeout in this thread after `seconds` of wall time.

    The alarm interrupts Python code, not a C call in progress; the header checks in
    `preprocess.volume` keep every C call (inflate, copy, average) bounded in size.
    """
    if threading.current_thread() is threading.main_thread():
        return _alarm(seconds)
    return _ThreadTimeLimit(seconds)


@contextmanager
def _alarm(seconds: float):
    def on_alarm(signal_number, frame):
        raise ScanTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _ThreadTimeLimit:
    """`time_limit` in a thread other than the main one, which SIGALRM cannot reach.

    Dask workers run tasks in a thread pool. A timer thread raises ScanTimeout in this one
    instead (PyThreadState_SetAsyncExc), which, like the signal handler, takes effect between
    two bytecodes of Python code and never inside a C call.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.thread_id = ctypes.c_ulong(threading.get_ident())
        self.lock = threading.Lock()
        self.inside, self.raised = True, False
        self.timer = threading.Timer(self.seconds, self._expire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _expire(self):
        with self.lock:
            if self.inside:
                self.raised = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(self.thread_id, ctypes.py_object(ScanTimeout))

    def __exit__(self, exc_type, exc, traceback):
        with self.lock:
            self.inside = False
        self.timer.cancel()
        if self.raised:  # the block ended before the exception arrived: withdraw it, it must not escape
            ctypes.pythonapi.PyThreadState_SetAsyncExc(self.thread_id, None)
        return False


def process_source(source: Source, preprocessing: Preprocessing, timeout_seconds: float) -> _Outcome:
    """Preprocess one scan in a worker; any failure becomes a reason, never an exception."""
    try:
        with time_limit(timeout_seconds):
            volume, info = preprocess_scan(
                source.path, preprocessing.shape, preprocessing.hu_min, preprocessing.hu_max
            )
    except ScanTimeout:
        return _Outcome(reason=f"{TIMEOUT_REASON} {timeout_seconds:g} s (--scan-timeout)")
    except ScanError as error:
        return _Outcome(reason=str(error))
    except MemoryError:
        return _Outcome(reason="too large to load into memory")
    except (FileNotFoundError, PermissionError) as error:  # gone since listed, or not on this worker's storage
        cannot_open = f"{type(error).__name__}: {error}"
        return _Outcome(reason=f"unreadable ({cannot_open})", cannot_open=cannot_open)
    except Exception as error:  # a corrupt file can break nibabel or numpy in many ways
        return _Outcome(reason=f"unreadable ({type(error).__name__}: {error})")
    record = ScanRecord(
        scan_id=source.scan_id, label=source.label, class_name=source.class_name,
        source_path=source.relative_path, source_sha256=info.sha256, source_size=source.size,
        source_mtime_ns=source.mtime_ns, source_shape=info.source_shape,
        source_spacing_mm=info.spacing_mm,
    )
    return _Outcome(volume=volume, record=record)


@contextmanager
def preprocessed_in_parallel(sources: list[Source], preprocessing: Preprocessing, jobs: int,
                             timeout_seconds: float, backend: str = "loky", scheduler: str | None = None):
    """Outcomes of `process_source` in the order of `sources`, from `jobs` worker processes.

    At most 2 x jobs scans are in flight or waiting, so memory stays bounded. Leaving the block
    early (an error, --strict, Ctrl-C) cancels the remaining work. With backend "dask" the
    workers are the Dask cluster's at `scheduler`, and its worker threads replace `jobs`.
    """
    if backend == "dask":
        from preprocess.backends import preprocessed_on_dask  # imports dask, so only for this backend

        with preprocessed_on_dask(sources, preprocessing, timeout_seconds, scheduler) as outcomes:
            yield outcomes
        return
    n_jobs = max(1, min(jobs, len(sources)))
    if backend == "threads" or n_jobs == 1:  # the work runs in this process: nothing to hand over
        outcomes = Parallel(n_jobs=n_jobs, backend="threading", return_as="generator", batch_size=1,
                            pre_dispatch="2*n_jobs")(
            delayed(process_source)(source, preprocessing, timeout_seconds) for source in sources
        )
        with _cancelled_on_exit(outcomes):
            yield outcomes
        return
    handoff = VolumeHandoff.open()
    try:
        # the initializer runs in each loky worker as it starts: see preprocess.workers
        with parallel_config(backend="loky", initializer=start_worker, initargs=(os.getpid(),)):
            handed = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=1, pre_dispatch="2*n_jobs")(
                delayed(process_source_for_handoff)(source, preprocessing, timeout_seconds, handoff)
                for source in sources
            )
        with _cancelled_on_exit(handed):
            yield (_received(outcome, handoff, preprocessing.shape) for outcome in handed)
    finally:
        handoff.close()


def process_source_for_handoff(source: Source, preprocessing: Preprocessing, timeout_seconds: float,
                               handoff: VolumeHandoff) -> _Outcome:
    """`process_source` in a worker process, with the volume left in `handoff` for the parent."""
    outcome = process_source(source, preprocessing, timeout_seconds)
    if outcome.volume is not None:
        outcome.volume = handoff.put(outcome.volume)
    return outcome


def _received(outcome: _Outcome, handoff: VolumeHandoff, shape: tuple[int, int, int]) -> _Outcome:
    if outcome.volume is not None:
        outcome.volume = handoff.take(outcome.volume, shape)
    return outcome


@contextmanager
def _cancelled_on_exit(outcomes):
    try:
        yield
    finally:
        with warnings.catch_warnings():  # leaving early is deliberate: no "tasks cancelled" warning
            warnings.filterwarnings("ignore", message=".*have been cancelled", category=UserWarning)
            outcomes.close()


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
    for stale in stale_temp_files(out):
        log.info("removing %s left by an interrupted build", stale)
        stale.unlink(missing_ok=True)
    remove_orphaned_handoffs()
    sources, refused = find_sources(options.raw)
    preprocessing = options.preprocessing
    previous = open_previous(options)
    try:
        return _build(options, preprocessing, sources, refused, previous)
    finally:
        if previous is not None:
            previous.close()


def _build(options, preprocessing, sources, refused, previous) -> BuildReport:
    reusable_rows: dict[str, tuple[int, ScanRecord]] = {}
    known_failures: dict[str, Failure] = {}
    if previous is not None and previous.preprocessing == preprocessing:
        for row, record in enumerate(previous.records()):
            reusable_rows[record.source_path] = (row, record)
        known_failures = {failure.source_path: failure for failure in previous.failures()
                          if not failure.reason.startswith(TIMEOUT_REASON)}
    elif previous is not None:
        log.info("preprocessing options changed since the last build: rebuilding every scan")

    def unchanged(source: Source, entry) -> bool:
        return entry is not None and (entry.source_size, entry.source_mtime_ns) == (source.size, source.mtime_ns)

    plan = []  # (source, "reuse" | "failed" | "process")
    for source in sources:
        reused = reusable_rows.get(source.relative_path)
        if reused is not None and unchanged(source, reused[1]) and reused[1].scan_id == source.scan_id:
            plan.append((source, "reuse"))
        elif unchanged(source, known_failures.get(source.relative_path)):
            plan.append((source, "failed"))
        else:
            plan.append((source, "process"))
    refused_failures = [_failure(path, reason, options.raw) for path, reason in refused]
    to_process = [source for source, action in plan if action == "process"]

    if options.strict:
        known = [known_failures[source.relative_path] for source, action in plan if action == "failed"]
        _refuse_if_strict(known + refused_failures)
    if previous is not None and not to_process and _same_contents(previous, plan, refused_failures, options):
        log.info("%s is up to date (%d scans, %d failed)", options.out, len(previous), len(previous.failures()))
        return BuildReport(Path(options.out), True, len(previous), 0, len(previous), previous.failures())
    for failure in refused_failures:
        log.warning("skipped %s: %s", failure.source_path, failure.reason)

    failures = list(refused_failures)
    with (
        preprocessed_in_parallel(to_process, preprocessing, options.jobs, options.scan_timeout_seconds,
                                 options.backend, options.scheduler) as outcomes,
        logging_redirect_tqdm(),
        tqdm(total=len(plan), desc="preprocess", unit="scan", disable=options.quiet) as bar,
        CacheWriter(options.out, preprocessing, options.split_options, len(plan), __version__) as writer,
    ):
        reprocessed, reused = 0, 0
        for source, action in plan:
            if action == "reuse":
                row, record = reusable_rows[source.relative_path]
                writer.append(record, previous.read_volume(row))
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
                    writer.append(outcome.record, outcome.volume)
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
    report = BuildReport(Path(options.out), False, len(writer.records), reprocessed, reused, failures)
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
    previous_failed = {failure.source_path for failure in previous.failures()}
    return (
        reused == previous_rows
        and failed == previous_failed
        and previous.split_options == options.split_options
    )
