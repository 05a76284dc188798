"""`--precision auto`: bfloat16 where the hardware runs it natively, float32 elsewhere.

bfloat16 has float32's range, so mixed_bfloat16 needs no loss scaling; it only pays where the
hardware has bfloat16 arithmetic: a GPU of compute capability 8.0 or later (Ampere, Hopper), or a
CPU with AVX512_BF16 or AMX, whose bfloat16 kernels TensorFlow reaches through oneDNN. Elsewhere
bfloat16 is emulated and slower than float32, so `auto` keeps float32 there.
"""
from __future__ import annotations

from train.hardware import cpu_flags

NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_GPU_COMPUTE_CAPABILITY = (8, 0)


def native_bfloat16(gpu_compute_capabilities: list[tuple[int, int]], flags: set[str]) -> bool:
    """Whether the devices that will train run bfloat16 natively: every GPU if there are GPUs, else the CPU."""
    if gpu_compute_capabilities:
        return all(tuple(capability) >= MIN_GPU_COMPUTE_CAPABILITY for capability in gpu_compute_capabilities)
    return any(flag in flags for flag in NATIVE_CPU_FLAGS)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU TensorFlow sees (imports TensorFlow)."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy that `precision` means on this machine ("auto" decided, others unchanged)."""
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if native_bfloat16(gpu_compute_capabilities(), cpu_flags()) else "float32"
