"""Creating and holding a run directory: a new folder (never someone else's), or one to resume, and its lock.

`fit` writes one run directory; `cv` writes a folder of them (fold-1 ... fold-K). Both find or
create theirs with `prepare_output_dir`, and a `fit` holds its run directory with
`locked_run_dir` while it writes.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from common.errors import UserError
from common.files import TEMP_MARKER, make_folder
from train.rundir.layout import CONFIG, LOCK, STATE


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for one `fit`: a second writer is refused instead of interleaving.

    flock is released by the kernel when the process ends, however it ends (SIGKILL included),
    so a killed run never leaves a lock behind.
    """
    path = Path(run_dir) / LOCK
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UserError(f"cannot use --run-dir {run_dir} ({error.strerror})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{run_dir} is in use by another `python -m train fit` (pid {holder}); "
                            "wait for it to finish, or choose another --run-dir") from None
        with suppress(OSError):  # the pid is only for the message above; a full disk may refuse it
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def default_run_dir(now: float | None = None, suffix: str = "") -> Path:
    """runs/<local timestamp><suffix>, e.g. runs/20250131-142501 (or runs/20250131-142501-cv)."""
    return Path("runs") / (time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + suffix)


def create_new_run_dir(base: Path, attempts: int = 1000) -> Path:
    """Create `base`, or base-2, base-3...: two fits started in the same second get two folders."""
    for attempt in range(1, attempts + 1):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create the run directory {candidate} ({error.strerror})") from None
        return candidate
    raise UserError(f"cannot create a new run directory beside {base}: {attempts} exist; pass --run-dir")


def make_run_dir(run_dir: Path) -> None:
    """mkdir -p, as most tools do; a file in the way (the folder itself or a parent) is refused."""
    make_folder(run_dir, "--run-dir")


def is_own_file(name: str) -> bool:
    """The lock, and temporary files of killed processes: what a run directory may hold before config.json."""
    return name == LOCK or (name.startswith(".") and TEMP_MARKER in name)


def prepare_output_dir(requested: Path | None, resume: bool, what: str, nothing_to_resume: str,
                       can_resume: Callable[[Path], bool], check_new: Callable[[Path], None],
                       suffix: str = "") -> Path:
    """The folder to write, created if needed: a new runs/<timestamp><suffix> when none is named; else
    `requested`, which must hold work to resume (`can_resume`) or be a folder `check_new` accepts.

    `what` and `nothing_to_resume` complete the messages: "--resume needs --run-dir: the {what}
    to continue", "--resume: DIR holds no {nothing_to_resume}".
    """
    if requested is None:
        if resume:
            raise UserError(f"--resume needs --run-dir: the {what} to continue")
        return create_new_run_dir(default_run_dir(suffix=suffix))
    run_dir = Path(requested)
    if resume and not can_resume(run_dir):
        raise UserError(f"--resume: {run_dir} holds no {nothing_to_resume}")
    if not resume and run_dir.is_dir():
        check_new(run_dir)  # before the lock file: a folder that is not ours is not touched
    make_run_dir(run_dir)
    return run_dir


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds a run (that needs --resume) or anything else but our own lock and temporaries."""
    if (run_dir / CONFIG).exists() or (run_dir / STATE).exists():
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --run-dir")
    others = sorted(path.name for path in run_dir.iterdir() if not is_own_file(path.name))
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"--run-dir {run_dir} is not empty ({listed}) and holds no run; choose a new or empty folder")
