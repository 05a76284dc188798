"""Outcomes of `process_source` for many scans, in scan order, from local processes, threads or Dask."""
from __future__ import annotations

import os
from contextlib import contextmanager

from joblib import Parallel, delayed, parallel_config

from preprocess.preprocessing import Preprocessing
from preprocess.engine.scans import ScanOutcome, cancelled_on_exit, process_source
from preprocess.finding.sources import Source
from preprocess.engine.workers import VolumeHandoff, start_worker


@contextmanager
def preprocessed_in_parallel(sources: list[Source], preprocessing: Preprocessing, jobs: int,
                             timeout_seconds: float, backend: str = "loky", scheduler: str | None = None):
    """Outcomes of `process_source` in the order of `sources`, from `jobs` worker processes.

    At most 2 x jobs scans are in flight or waiting, so memory stays bounded. Leaving the block
    early (an error, --strict, Ctrl-C) cancels the remaining work. With backend "dask" the
    workers are the Dask cluster's at `scheduler`, and its worker threads replace `jobs`.
    """
    if backend == "dask":
        from preprocess.engine.dask_cluster import preprocessed_on_dask  # imports dask, so only for this backend

        with preprocessed_on_dask(sources, preprocessing, timeout_seconds, scheduler) as outcomes:
            yield outcomes
        return
    n_jobs = max(1, min(jobs, len(sources)))
    if backend == "threads" or n_jobs == 1:  # the work runs in this process: nothing to hand over
        outcomes = Parallel(n_jobs=n_jobs, backend="threading", return_as="generator", batch_size=1,
                            pre_dispatch="2*n_jobs")(
            delayed(process_source)(source, preprocessing, timeout_seconds) for source in sources
        )
        with cancelled_on_exit(outcomes):
            yield outcomes
        return
    handoff = VolumeHandoff.open()
    try:
        # the initializer runs in each loky worker as it starts: see preprocess.engine.workers
        with parallel_config(backend="loky", initializer=start_worker, initargs=(os.getpid(),)):
            handed = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=1, pre_dispatch="2*n_jobs")(
                delayed(process_source_for_handoff)(source, preprocessing, timeout_seconds, handoff)
                for source in sources
            )
        with cancelled_on_exit(handed):
            yield (_received(outcome, handoff, preprocessing.shape) for outcome in handed)
    finally:
        handoff.close()


def process_source_for_handoff(source: Source, preprocessing: Preprocessing, timeout_seconds: float,
                               handoff: VolumeHandoff) -> ScanOutcome:
    """`process_source` in a worker process, with the volume left in `handoff` for the parent."""
    outcome = process_source(source, preprocessing, timeout_seconds)
    if outcome.volume is not None:
        outcome.volume = handoff.put(outcome.volume)
    return outcome


def _received(outcome: ScanOutcome, handoff: VolumeHandoff, shape: tuple[int, int, int]) -> ScanOutcome:
    if outcome.volume is not None:
        outcome.volume = handoff.take(outcome.volume, shape)
    return outcome
