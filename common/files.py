"""Files written atomically and read defensively: the heart of the project's crash safety.

Every file (a cache, every file of a run directory) is written to a temporary file in the same
folder, made durable (fsync) and moved into place with `os.replace`, so a reader (a training
run, or a killed run's `--resume`) sees the old file or the new one, never half of one. A
write the OS refuses (disk full, file too large, not a folder) is one `WriteError` line, and
its temporary file is removed. Reads accept JSON only: nothing a run
directory holds is ever unpickled or executed.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from common.errors import UserError, first_line

TEMP_MARKER = ".tmp-"  # in the name of every temporary file: what a cleanup after a kill looks for
MAX_RUN_FILE_BYTES = 64 * 2**20  # config, state, history: a few KB; more is not a file of this tool


class WriteError(UserError):
    """The OS refused to write a file of the run (disk full, file too large, not a folder...)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason = Path(path), reason


def replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` and move the result to `path` in one rename.

    The temporary file sits in the same folder (a rename is atomic only within a file system)
    and keeps `path`'s suffix, because some writers (Keras, matplotlib) choose the format by it.
    Whatever happens, the temporary file does not outlive the call (short of SIGKILL, which
    `remove_stale_temporaries` answers on the next `--resume`); an OSError becomes a WriteError.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}{TEMP_MARKER}{os.getpid()}{path.suffix}")
    try:
        write(temporary)
        move_into_place(temporary, path)
    except BaseException as error:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        reason = describe_os_error(error)
        if reason is None:
            raise
        raise WriteError(path, reason) from None
    return path


def move_into_place(temporary: Path, path: Path) -> None:
    """Make a finished temporary file durable, rename it to `path`, and make the rename durable."""
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(Path(path).parent)


def fsync_path(path: Path) -> None:
    """Make a file's (or a folder's entries') writes durable before anything depends on them."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def describe_os_error(error: BaseException) -> str | None:
    """"File too large", "No space left on device"...: the OS's reason a write failed, or None if it was not the OS.

    Only the error itself and what it was raised `from` count: an OSError a writer handled on the
    way (its `__context__`) says nothing about why it failed in the end.
    """
    for candidate in (error, error.__cause__):
        if isinstance(candidate, OSError):
            if candidate.errno:
                return os.strerror(candidate.errno)
            return first_line(candidate)
    return None


def link_or_copy_atomically(source: Path, path: Path) -> Path:
    """`path` with `source`'s bytes: a hard link (no copy, no space) where the file system allows, else a copy.

    Sharing the inode is safe because no file of a run is ever written in place.
    """
    def write(temporary: Path) -> None:
        temporary.unlink(missing_ok=True)
        try:
            os.link(source, temporary)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
            shutil.copyfile(source, temporary)

    return replace_atomically(path, write)


def make_folder(folder: Path, flag: str) -> Path:
    """mkdir -p for a folder the user named with `flag`; a file in the way (the folder itself or a parent) is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((parent for parent in folder.parents if parent.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UserError(f"cannot create {flag} {folder}: {blocker} is a file, not a folder") from None
        raise UserError(f"cannot create {flag} {folder} ({error.strerror})") from None
    return folder


def write_text_atomically(path: Path, text: str) -> Path:
    return replace_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomically(path: Path, document) -> Path:
    """JSON with NaN and infinity written as null, so any JSON reader accepts it."""
    return write_text_atomically(path, json.dumps(_finite(document), indent=2, sort_keys=True) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_json(path: Path) -> dict:
    """A JSON object from a run file; anything else is a one-line UserError. Only ever JSON: nothing
    in a run directory is unpickled or executed."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RUN_FILE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, too large to be a file of this tool")
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UserError(f"{path}: unreadable ({first_line(error)})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a JSON object")
    return document
