"""Command-line plumbing shared by both stages: one-line errors (tracebacks with MOSMED3D_DEBUG=1), value checks,
logging setup."""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import NoReturn

from common.errors import UserError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# set to 1 to see the traceback above any one-line error
DEBUG_VARIABLE = "MOSMED3D_DEBUG"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in --help, except the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = _parse(int, text, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = _parse(float, text, "a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def finite_float(text: str) -> float:
    return _parse(float, text, "a number")


def within(parse, minimum, maximum):
    """An argparse type: `parse`, then refuse values outside [minimum, maximum] (before any heavy import)."""
    def parse_within(text: str):
        value = parse(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}, got {text}")
        return value

    return parse_within


def _parse(kind, text: str, description: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if kind is int and abs(value) > 2**62:
        raise argparse.ArgumentTypeError(f"{text} is out of range")
    return value


class CurrentStderrHandler(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is when a message is logged.

    A plain StreamHandler keeps the stream it was given. When `main()` runs in-process (tests,
    notebooks) that can be a stream replaced and closed since, and every later message becomes a
    "--- Logging error --- ValueError: I/O operation on closed file" report instead of a line.
    """

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; the current stderr wins
        pass


def configure_logging(quiet: bool) -> None:
    """Messages as plain lines on stderr; --quiet keeps only warnings and errors."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", handlers=[CurrentStderrHandler()],
        force=True,
    )


def debugging(environment: Mapping[str, str] = os.environ) -> bool:
    """Whether MOSMED3D_DEBUG asks for tracebacks above the one-line errors (any value but "" and "0")."""
    return environment.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def report_error(prog: str, error: BaseException, line: str) -> int:
    """Print an error as one line on stderr (its traceback above it with MOSMED3D_DEBUG=1); the exit code."""
    if debugging():
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prog}: error: {line}", file=sys.stderr)
    return EXIT_FAILED


def run_command(prog: str, command: Callable[[], int | None],
                describe_failure: Callable[[BaseException], str | None] | None = None) -> int:
    """Run a command function, turning the user's errors, the failures `describe_failure` puts in one line
    (TensorFlow's, for `train`) and Ctrl-C into one line and an exit code. Anything else is a bug and raises.

    Whatever the command left behind is freed before this returns: a failed `train` command leaves
    its tf.data pipelines in reference cycles (the exception's traceback holds their frames). Freed
    at interpreter exit instead, a pipeline waits for the reads its threads had started in
    `tf.numpy_function`, but Python ends any thread that asks for the GIL once it is finalizing: the
    wait never ends, and the process hangs on a futex (seen in gdb: the main thread in
    MapAndBatchDatasetOp's iterator destructor under Py_FinalizeEx's last garbage collection).
    """
    try:
        code = command() or 0
    except UserError as error:
        code = report_error(prog, error, str(error))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was replaced", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as error:
        line = describe_failure(error) if describe_failure is not None else None
        if line is None:
            raise
        code = report_error(prog, error, line)
    gc.collect()  # the error, and with it the traceback's frames, is gone: free their cycles now
    return code


def exit_with(main: Callable[[], int]) -> NoReturn:
    """`sys.exit(main())` for a `__main__` block, where a bug's traceback is printed here rather than by
    the interpreter at exit, so that what it holds is freed while threads can still finish (`run_command`)."""
    try:
        code = main()
    except Exception:  # a bug: the traceback Python would print, and its exit code
        traceback.print_exc()
        code = EXIT_FAILED
    gc.collect()
    sys.exit(code)
