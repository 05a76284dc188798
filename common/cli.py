"""Command-line plumbing shared by both stages: one-line errors, value checks, logging setup."""
from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable

from common.errors import UserError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run a command function, turning the user's errors and Ctrl-C into one line and an exit code."""
    try:
        return command() or 0
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was replaced", file=sys.stderr)
        return EXIT_INTERRUPTED
