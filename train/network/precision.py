"""`--precision`: what each value means on this machine; the one home of precision's rules.

- `auto`: bfloat16 where the hardware runs it natively, float32 elsewhere. bfloat16 only pays
  where the hardware has bfloat16 arithmetic: a GPU of compute capability 8.0 or later (Ampere,
  Hopper), or a CPU with AVX512_BF16 or AMX, whose bfloat16 kernels TensorFlow reaches through
  oneDNN. Elsewhere bfloat16 is emulated and slower than float32, so `auto` keeps float32 there.
- `mixed_bfloat16` has float32's range, so it needs no loss scaling; `mixed_float16` does
  (`needs_loss_scaling`), and needs a GPU (`check_precision_supported`).
- Every value is a Keras dtype policy for every layer but the output, which stays float32
  (`train.network.model`).
"""
from __future__ import annotations

from common.errors import UserError
from train.hardware import cpu_flags
from train.tensorflow_import import load_tensorflow

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")

NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_GPU_COMPUTE_CAPABILITY = (8, 0)


def native_bfloat16(gpu_compute_capabilities: list[tuple[int, int]], flags: set[str]) -> bool:
    """Whether the devices that will train run bfloat16 natively: every GPU if there are GPUs, else the CPU."""
    if gpu_compute_capabilities:
        return all(tuple(capability) >= MIN_GPU_COMPUTE_CAPABILITY for capability in gpu_compute_capabilities)
    return any(flag in flags for flag in NATIVE_CPU_FLAGS)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU TensorFlow sees (imports TensorFlow)."""
    load_tensorflow()
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


def check_precision_supported(precision: str) -> None:
    """Refuse float16 without a GPU: TensorFlow's CPU kernels (MaxPool3D among them) lack float16.
    Imports TensorFlow only for mixed_float16."""
    if precision != "mixed_float16":
        return
    load_tensorflow()
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        raise UserError("--precision mixed_float16 needs a GPU (TensorFlow has no float16 MaxPool3D on CPU); "
                        "use mixed_bfloat16 on CPUs")


def needs_loss_scaling(precision: str) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
    return precision == "mixed_float16"
