"""Facts about processes: is one still running (are its pid-named leftovers stale?), and this one's peak memory."""
from __future__ import annotations

import os
import re
import resource
import sys
from pathlib import Path

PROCESS_STATUS = Path("/proc/self/status")


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (this process is, whatever the OS says)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def peak_rss_bytes(status: Path = PROCESS_STATUS) -> int:
    """This process's peak resident memory so far: its own high-water mark (VmHWM).

    Not getrusage's ru_maxrss: Linux carries that over `exec`, so a process started from a large
    one reports its parent's peak. Where there is no /proc (macOS), ru_maxrss (bytes there) it is.
    """
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
    except OSError:
        match = None
    if match is not None:
        return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
