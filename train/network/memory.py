"""How much memory a training step needs, estimated before TensorFlow starts, and the check `fit` makes.

A 3D CNN's training step holds every layer's activations for the backward pass, and their
gradients: at 128 x 128 x 64 the first convolution alone is 64 channels x 126 x 126 x 62 voxels
per scan. `estimated_step_bytes` counts the elements of each block's convolution output, its
pooled output and the BatchNorm output, per scan, times the batch, times the bytes per element and
`ACTIVATION_COPIES` (the forward value, its gradient, oneDNN's reordered copies), plus the runtime
`BASE_BYTES`. The two constants were fitted to `benchmarks/bench_memory.py`'s measured peaks
(docs/performance.md, "Memory"). `check_step_fits` refuses a batch whose estimate exceeds the
memory this machine has free, in one line, before any epoch is spent.
"""
from __future__ import annotations

import os

from common.errors import UserError
from train.network.architecture import TUTORIAL, Architecture, feature_map_sizes, scaled

# fitted to bench_memory.py's peaks at 128 x 128 x 64, width 1, float32, on 2 AVX-512 BF16 cores (oneDNN):
# batch 2, 4, 8 measured 2.15, 3.65, 6.60 GiB: 0.74 GiB a scan over 0.67 GiB (docs/performance.md, "Memory")
BASE_BYTES = 0.7 * 1024**3  # TensorFlow, Keras, the model and its optimizer state
ACTIVATION_COPIES = 2.25  # peak bytes per byte of the activations counted by `activation_elements`


def activation_elements(shape: tuple[int, int, int], padding: str, architecture: Architecture = TUTORIAL) -> int:
    """Per scan: the elements of every block's convolution, pooling and BatchNorm outputs."""
    total = 0
    convolved = list(shape)
    for filters in architecture.block_filters:
        if padding == "valid":
            convolved = [size - (architecture.kernel_size - 1) for size in convolved]
        pooled = [size // architecture.pool_size for size in convolved]
        total += filters * (convolved[0] * convolved[1] * convolved[2] + 2 * pooled[0] * pooled[1] * pooled[2])
        convolved = pooled
    return total


def estimated_step_bytes(shape: tuple[int, int, int], batch_size: int, precision: str, padding: str,
                         width: float = 1.0) -> float:
    """The estimated peak resident memory of `fit` training with this batch (see the module docstring)."""
    element_bytes = 2 if "bfloat16" in precision else 4
    elements = activation_elements(tuple(shape), padding, scaled(width))
    return BASE_BYTES + ACTIVATION_COPIES * batch_size * elements * element_bytes


def available_bytes() -> int | None:
    """Memory the kernel can give this process now (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_step_fits(shape: tuple[int, int, int], batch_size: int, precision: str, padding: str, width: float,
                    free: int | None = None) -> None:
    """Refuse, in one line, a batch whose training step would not fit in `free` bytes (default: free now)."""
    free = available_bytes() if free is None else free
    needed = estimated_step_bytes(shape, batch_size, precision, padding, width)
    if free is not None and needed > free:
        largest = max((batch for batch in range(1, batch_size)
                       if estimated_step_bytes(shape, batch, precision, padding, width) <= free), default=0)
        hint = f"--batch-size {largest}" if largest else "a smaller --shape at build time, or a smaller --width"
        raise UserError(f"a training step of {batch_size} scans of {' x '.join(map(str, shape))} needs about "
                        f"{needed / 1024**3:.1f} GiB, and {free / 1024**3:.1f} GiB of memory are free: "
                        f"try {hint}")
