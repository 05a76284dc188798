"""Worker processes must not outlive the build that started them.

A build killed with SIGKILL cannot stop its loky workers, and they wait for work forever
(seen: two 60 MB orphans per killed build). On Linux a process can ask to be killed when its
parent dies (PR_SET_PDEATHSIG). The build installs `die_with_build_process` as the initializer
of its loky workers, so each one asks as it starts.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_build_process(build_pid: int) -> None:
    """Initializer of the build's workers: be killed as soon as the build process dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != build_pid:  # the build died while this worker was still starting
        os.kill(os.getpid(), signal.SIGKILL)
