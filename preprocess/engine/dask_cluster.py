"""`build --backend dask`: the per-scan work on a `dask.distributed` cluster, through joblib.

Imported only for that backend, so other builds never import dask. The parent stays the only
HDF5 writer: workers return volumes, as loky's processes do, in scan-id order, with at most
2 x (the cluster's worker threads) scans in flight. Workers open the raw files at the absolute
paths this machine sees (shared storage); a scan a worker cannot open while this machine can
fails the build with one line (see `build._build`).

joblib's Dask backend leaves three ways to wait forever, closed here:
- a task whose workers all died (KilledWorker) never reaches joblib (1.6 calls a task's
  completion callback only when it returns): `ReportingDaskBackend` passes the error on, and
  the build fails with one line naming the scan;
- with every worker gone, tasks wait on the scheduler for good: the parent gives up on a scan
  after waiting twice --scan-timeout for it, plus Dask's connect timeout;
- `Client()` bounds the TCP connection but not the handshake after it, so a port that accepts
  and never answers (not a Dask scheduler) hangs it: the address is asked what it is, under a
  deadline, first.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
from contextlib import contextmanager
from dataclasses import replace

import dask
from dask.utils import parse_timedelta
from distributed import Client, KilledWorker
from distributed.comm import connect, get_address_host_port
from joblib import Parallel, delayed
from joblib._dask import DaskDistributedBackend  # the class behind joblib's "dask" backend name

from common.errors import UserError
from preprocess.preprocessing import Preprocessing
from preprocess.engine.scans import cancelled_on_exit, process_source
from preprocess.finding.sources import Source

log = logging.getLogger(__name__)


class ScanLost(Exception):
    """A scan's task failed in Dask itself, not in `process_source`: its workers died, or it was cancelled."""

    def __init__(self, scan_ids: list[str], error: BaseException):
        super().__init__(scan_ids, error)
        self.scan_ids, self.error = scan_ids, error


class ReportingDaskBackend(DaskDistributedBackend):
    """joblib's Dask backend, except that a task failing in Dask reaches joblib as an error."""

    def submit(self, func, callback=None):
        future = super().submit(func, callback=callback)
        scan_ids = [arguments[0].scan_id for _, arguments, _ in getattr(func, "items", ())]

        def pass_on_failure(done):
            # joblib ignores a second outcome for the same task, should a later version report it too
            if callback is not None and not done.cancelled() and done.exception() is not None:
                callback(ScanLost(scan_ids, done.exception()))

        future.add_done_callback(pass_on_failure)
        return future


def connect_timeout_seconds() -> float:
    """Dask's own connect timeout (`distributed.comm.timeouts.connect`, 30 s unless configured)."""
    return parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")


def connect_to_scheduler(address: str) -> Client:
    """A client of the scheduler at `address` that has workers; else a UserError within the connect timeout."""
    seconds = connect_timeout_seconds()
    try:
        get_address_host_port(address)
    except ValueError as error:
        raise UserError(f"--scheduler {address!r} is not a Dask scheduler address such as tcp://HOST:8786 "
                        f"({error})") from None
    try:
        kind = asyncio.run(_identify(address, seconds))
    except Exception as error:  # refused, timed out, or something that does not speak Dask's protocol
        reason = " ".join(str(error).split()) or f"no answer within {seconds:g} s"
        raise UserError(f"could not connect to the Dask scheduler at {address}: {type(error).__name__}: {reason}") \
            from None
    if kind != "Scheduler":  # a Client() that fails half-way hangs the exit for 6 s and prints a traceback
        raise UserError(f"--scheduler {address} is a Dask {kind}, not the scheduler")
    client = Client(address, timeout=seconds, set_as_default=False)
    try:
        client.wait_for_workers(1, timeout=seconds)
    except TimeoutError:
        client.close()
        raise UserError(f"the Dask scheduler at {address} has no workers (waited {seconds:g} s); "
                        f"start some with `dask worker {address}`") from None
    return client


async def _identify(address: str, seconds: float) -> str:
    """What answers at `address`: "Scheduler", "Worker", ..., asked under a deadline."""
    comm = await asyncio.wait_for(connect(address, timeout=seconds), seconds)
    try:
        await comm.write({"op": "identity", "reply": True})
        identity = await asyncio.wait_for(comm.read(), seconds)
    finally:
        await comm.close()
    return identity.get("type", "server") if isinstance(identity, dict) else "server"


@contextmanager
def preprocessed_on_dask(sources: list[Source], preprocessing: Preprocessing, timeout_seconds: float,
                         address: str):
    """Outcomes of `process_source` in the order of `sources`, computed on the Dask cluster at `address`."""
    if not sources:  # every scan reused: no need for the cluster to be up
        yield iter(())
        return
    client = connect_to_scheduler(address)
    try:
        threads = client.nthreads()
        log.info("preprocessing %d scans on the Dask cluster at %s (%d workers, %d threads)",
                 len(sources), address, len(threads), sum(threads.values()))
        # by absolute path: a relative --raw would otherwise be resolved in each worker's own folder
        sources = [replace(source, path=source.path.absolute(),
                           series_files=tuple(path.absolute() for path in source.series_files))
                   for source in sources]
        # a scan may queue behind one that runs into the limit, and be handed over to another worker
        wait_seconds = 2 * timeout_seconds + connect_timeout_seconds()
        outcomes = Parallel(backend=ReportingDaskBackend(client=client), return_as="generator",
                            pre_dispatch="2*n_jobs", batch_size=1, timeout=wait_seconds)(
            delayed(process_source)(source, preprocessing, timeout_seconds) for source in sources
        )
        with cancelled_on_exit(outcomes):
            yield _reported(outcomes, sources, client, address, wait_seconds)
    finally:
        # releases the tasks still queued. Transfers and reconnections still under way fail as it
        # closes, and distributed and tornado would log a traceback for each: expected, so unsaid
        silenced = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            client.close()
        finally:
            logging.disable(silenced)


def _reported(outcomes, sources: list[Source], client: Client, address: str, wait_seconds: float):
    """`outcomes`, with the cluster's failures turned into one line naming the scan."""
    position = 0  # of the scan being waited for
    try:
        for outcome in outcomes:
            yield outcome
            position += 1
    except ScanLost as lost:
        scan = lost.scan_ids[0] if lost.scan_ids else "?"
        if isinstance(lost.error, KilledWorker):
            allowed = lost.error.allowed_failures
            workers = "1 Dask worker" if allowed == 0 else f"{allowed + 1} Dask workers"
            raise UserError(f"scan {scan} was lost: {workers} died while preprocessing it, more than "
                            f"distributed.scheduler.allowed-failures ({allowed}) allows; see the workers' logs "
                            "(out of memory?). Previous cache left as it was") from None
        raise UserError(f"scan {scan} was lost on the Dask cluster at {address}: "
                        f"{type(lost.error).__name__}: {lost.error}. Previous cache left as it was") from None
    except concurrent.futures.CancelledError as error:  # the scheduler went away, or cancelled the task
        reason = getattr(error, "reason", type(error).__name__)
        raise UserError(f"lost the Dask cluster at {address} while waiting for scan {sources[position].scan_id} "
                        f"(task cancelled: {reason}). Previous cache left as it was") from None
    except multiprocessing.TimeoutError:  # what joblib raises when a task outlasts Parallel's timeout
        try:
            workers = f"it has {len(client.nthreads())} workers"
        except Exception as error:  # the scheduler itself may be gone
            workers = f"the scheduler does not answer ({type(error).__name__})"
        raise UserError(f"no result for scan {sources[position].scan_id} from the Dask cluster at {address} within "
                        f"{wait_seconds:g} s (twice --scan-timeout, plus distributed.comm.timeouts.connect); "
                        f"{workers}. Previous cache left as it was") from None
