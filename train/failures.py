"""An unexpected TensorFlow error at run time, as one line naming what failed and what to try.

TensorFlow reports a kernel it cannot create (oneDNN's "could not create a primitive descriptor
for the convolution forward propagation primitive", an op without a kernel for its dtype) or
memory it cannot get (ResourceExhaustedError) as a `tf.errors.OpError` whose message is many lines
of graph context, under a Keras traceback. `describe_failure` turns those into one line;
`common.cli.run_command` prints it and exits 1, and shows the traceback above it only with
MOSMED3D_DEBUG=1 (`common.cli.DEBUG_VARIABLE`). Any other error is a bug and still raises.

No TensorFlow at module level: `train/__main__.py` imports this, and an error can only be one of
TensorFlow's once TensorFlow has been imported.
"""
from __future__ import annotations

import os
import re
import sys

from common.cli import DEBUG_VARIABLE
from train.hardware import ONEDNN_ISA_LIMIT, ONEDNN_SWITCH

KERNEL_FAILURES = re.compile(r"could not create a primitive descriptor for (?:the |an? )?(?P<what>[\w ]+?) primitive"
                             r"|(?P<unregistered>No OpKernel was registered|Could not find device for node)")
MEMORY_FAILURE = re.compile(r"OOM when allocating|out of memory", re.IGNORECASE)
NODE = re.compile(r"\{\{node (?P<node>[^}\s]+)\}\}|Detected at node (?P<plain>[^\s]+)")
TRAINING_COMMANDS = ("fit", "cv")


def describe_failure(error: BaseException, command: str, environment=os.environ) -> str | None:
    """One line for a kernel that cannot be created or memory that cannot be had, naming what to try
    in `command` ("fit", "evaluate", ...); None for anything else (a bug: it raises)."""
    if isinstance(error, MemoryError):
        return f"out of memory; {memory_advice(command)}"
    tensorflow = sys.modules.get("tensorflow")
    if tensorflow is None or not isinstance(error, tensorflow.errors.OpError):
        return None
    message = error.message or ""
    where = node_of(message)
    at = f" at {where}" if where else ""
    kernel = KERNEL_FAILURES.search(message)
    if kernel is not None:
        from train.hardware import kernel_path

        what = f"oneDNN's {kernel.group('what')} kernel" if kernel.group("what") else "a kernel"
        return (f"TensorFlow could not create {what}{at} on the CPU kernels {kernel_path()} "
                f"({type(error).__name__}); {kernel_advice(command, environment)}")
    if isinstance(error, tensorflow.errors.ResourceExhaustedError) or MEMORY_FAILURE.search(message):
        return f"TensorFlow ran out of memory{at} ({type(error).__name__}); {memory_advice(command)}"
    first = next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)
    return (f"TensorFlow failed{at}: {first[:200]} ({type(error).__name__}); rerun with {DEBUG_VARIABLE}=1 "
            "for the full traceback")


def node_of(message: str) -> str:
    """The graph node an OpError names, without tf.function's wrappers ("3dcnn_1/conv1_1/Relu"); "" if none."""
    match = NODE.search(message)
    if match is None:
        return ""
    node = match.group("node") or match.group("plain")
    return re.sub(r"^(?:StatefulPartitionedCall(?:_\d+)?/)+", "", node)


def kernel_advice(command: str, environment) -> str:
    """What to try when a kernel cannot be created: another precision, or other kernels."""
    others = [f"unset {ONEDNN_ISA_LIMIT}"] if environment.get(ONEDNN_ISA_LIMIT) else []
    if environment.get(ONEDNN_SWITCH, "").strip() != "0":
        others.append(f"{ONEDNN_SWITCH}=0 (Eigen's kernels)")
    if command in TRAINING_COMMANDS:
        return "try --precision float32" + "".join(f", or {other}" for other in others)
    return "try " + " or ".join(others or ["the machine the run was trained on"])


def memory_advice(command: str) -> str:
    if command in TRAINING_COMMANDS:
        return "try a smaller --batch-size (or --width), or free memory that other programs hold"
    return "free memory that other programs hold, or use a machine with more"
