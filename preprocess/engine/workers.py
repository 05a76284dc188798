"""Local worker processes: they die with the build, keep their memory, and hand volumes back in shared memory.

A build killed with SIGKILL cannot stop its loky workers, and they wait for work forever
(seen: two 60 MB orphans per killed build). On Linux a process can ask to be killed when its
parent dies (PR_SET_PDEATHSIG). The build installs `start_worker` as the initializer of its
loky workers, so each one asks as it starts (and sets its allocator up: `keep_freed_memory`).

A worker's result would otherwise travel as a pickle through loky's pipe: 4 MiB per scan at
128 x 128 x 64, copied four times (pickle, pipe write, pipe read, unpickle), in small pieces,
by the two processes that share the machine's cores with the other worker. Instead the worker
writes the volume once into a file in a RAM-backed folder (/dev/shm), and the parent reads it
once and deletes it (`VolumeHandoff`). If the folder is missing or full, the volume takes the
pipe as before. The folder is per build and named by the build's pid, so a build killed before
it could clean up has its folder removed by the next build (`remove_orphaned_handoffs`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from common.processes import process_alive

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
WORKER_MMAP_THRESHOLD_BYTES = 64 * 2**20
WORKER_TRIM_THRESHOLD_BYTES = 128 * 2**20
SHARED_MEMORY_FOLDER = Path("/dev/shm")
HANDOFF_PREFIX = "mosmed3d-build-"


def start_worker(build_pid: int) -> None:
    """Initializer of the build's workers: die with the build, and keep freed memory for the next scan."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        keep_freed_memory(libc)
    if os.getppid() != build_pid:  # the build died while this worker was still starting
        os.kill(os.getpid(), signal.SIGKILL)


def keep_freed_memory(libc) -> None:
    """Let glibc reuse a scan's freed buffers for the next scan instead of returning them to the OS.

    Each scan allocates tens of MB (inflated bytes, float slabs). By default glibc maps large
    blocks fresh and unmaps them when freed, so every scan page-faults its memory in again, and
    two workers doing that at once contend in the kernel: measured, --jobs 2 went from 0.064 to
    0.053 s/scan with these thresholds (--jobs 1, in the build's own process, did not change).
    The same two thresholds are the advice for Dask workers in docs/scaling.md.
    """
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD_BYTES)


def remove_orphaned_handoffs(folder: Path = SHARED_MEMORY_FOLDER) -> None:
    """Delete the handoff folders of builds that were killed (their pid no longer runs)."""
    if not folder.is_dir():
        return
    for candidate in folder.glob(f"{HANDOFF_PREFIX}*"):
        pid_text = candidate.name[len(HANDOFF_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            log.info("removing %s left by a killed build", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


class VolumeHandoff:
    """A RAM-backed folder through which workers hand volumes to the parent, one file per volume.

    Created by the parent (`open`), used by workers (`put`, inside `process_source`'s caller)
    and drained by the parent (`take`); `close` removes whatever is left.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder

    @classmethod
    def open(cls) -> "VolumeHandoff":
        """A new folder under /dev/shm, or a handoff that uses the pipe if there is no /dev/shm."""
        if not (SHARED_MEMORY_FOLDER.is_dir() and os.access(SHARED_MEMORY_FOLDER, os.W_OK)):
            return cls(None)
        return cls(Path(tempfile.mkdtemp(prefix=f"{HANDOFF_PREFIX}{os.getpid()}-", dir=SHARED_MEMORY_FOLDER)))

    def put(self, volume: np.ndarray) -> str | np.ndarray:
        """In a worker: the name of a file now holding `volume`, or the volume itself if it cannot be written."""
        if self.folder is None:
            return volume
        path = self.folder / f"{uuid.uuid4().hex}.f32"
        try:
            np.ascontiguousarray(volume, dtype=np.float32).tofile(path)
        except OSError:  # /dev/shm full (containers often give it 64 MB): send it the slow way
            path.unlink(missing_ok=True)
            return volume
        return path.name

    def take(self, handed: str | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """In the parent: the volume a worker `put`, with its file deleted."""
        if isinstance(handed, np.ndarray):
            return handed
        path = self.folder / handed
        try:
            # mapped, not read: the HDF5 write copies straight from the shared pages, and the pages
            # stay valid after the unlink until the array is dropped
            return np.memmap(path, dtype=np.float32, mode="r", shape=shape)
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
