"""Import TensorFlow without its C++ start-up chatter on stderr.

TensorFlow's native libraries log before absl logging is initialised, so TF_CPP_MIN_LOG_LEVEL
does not reach those lines ("oneDNN custom operations are on", "Could not find cuda drivers",
and on machines without a GPU "failed call to cuInit"). Users should see one line per problem,
so the import and the device discovery run with file descriptor 2 captured; captured lines
are then replayed unless they are below TF_CPP_MIN_LOG_LEVEL or are known start-up noise.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

NATIVE_LOG_LINE = re.compile(r"^([IWEF])\d{4} ")
START_UP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "failed call to cuInit",  # expected on a machine without a GPU; TensorFlow falls back to CPU
)
SEVERITIES = "IWEF"  # the levels TF_CPP_MIN_LOG_LEVEL 0, 1, 2, 3 start from


def should_replay(line: str, minimum_level: int) -> bool:
    """Whether a captured stderr line is worth showing at this TF_CPP_MIN_LOG_LEVEL."""
    if minimum_level > 0 and any(noise in line for noise in START_UP_NOISE):
        return False
    match = NATIVE_LOG_LINE.match(line)
    return match is None or SEVERITIES.index(match.group(1)) >= minimum_level


def load_tensorflow() -> None:
    """Import TensorFlow and discover its devices, filtering native start-up logs from stderr."""
    if "tensorflow" in sys.modules:
        return
    try:
        minimum_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        minimum_level = 0
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        captured.seek(0)
        for line in captured.read().decode("utf-8", errors="replace").splitlines():
            if should_replay(line, minimum_level):
                print(line, file=sys.stderr)
