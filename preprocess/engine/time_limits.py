"""`time_limit`: give up on a scan after a wall-clock limit, in the main thread or any other."""
from __future__ import annotations

import ctypes
import signal
import threading
from contextlib import contextmanager


class ScanTimeout(Exception):
    pass


def time_limit(seconds: float):
    """A context manager that raises ScanTimeout in this thread after `seconds` of wall time.

    The alarm interrupts Python code, not a C call in progress; the header checks in
    `preprocess.reading` keep every C call (inflate, copy, average) bounded in size.
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

