"""`--precision`: what each value means on this machine; the one home of precision's rules.

- `auto`: bfloat16 where the kernels that will run have bfloat16 arithmetic, float32 elsewhere.
  That is a GPU of compute capability 8.0 or later (Ampere, Hopper), or, on the CPU, oneDNN's
  kernels on `avx512_core_bf16` or `avx512_core_amx`. The CPU's flags are not enough: oneDNN
  may be off (`TF_ENABLE_ONEDNN_OPTS=0`, Eigen's kernels, which only emulate bfloat16) or
  limited by `ONEDNN_MAX_CPU_ISA` to an instruction set without it (`train.hardware.onednn_isa`).
  Emulated bfloat16 is slower than float32, so `auto` keeps float32 there, and says why.
- `mixed_bfloat16` asked for explicitly runs wherever the kernels have bfloat16 convolutions at
  all: natively as above, emulated by oneDNN on AVX-512 without BF16, or by Eigen. oneDNN on AVX2
  or less has none: the first training step fails with "could not create a primitive descriptor
  for the convolution" (measured with ONEDNN_MAX_CPU_ISA=AVX2 on an AMD EPYC with AVX-512 BF16),
  so `check_precision_supported` refuses it up front in one line instead.
- `mixed_bfloat16` has float32's range, so it needs no loss scaling; `mixed_float16` does
  (`needs_loss_scaling`), and needs a GPU (`check_precision_supported`).
- Every value is a Keras dtype policy for every layer but the output, which stays float32
  (`train.network.model`).

The decisions are pure functions of (GPU compute capabilities, CPU flags, oneDNN on or off,
environment), tested for each combination; the wrappers below read those from this machine.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import UserError
from train.hardware import ONEDNN_ISA_LIMIT, ONEDNN_SWITCH, cpu_flags, onednn_enabled, onednn_isa
from train.tensorflow_import import load_tensorflow

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")

MIN_GPU_COMPUTE_CAPABILITY = (8, 0)
# oneDNN's instruction sets (train.hardware.ONEDNN_ISA_LEVELS) with bfloat16 arithmetic in hardware...
NATIVE_BFLOAT16_ISAS = ("avx512_core_bf16", "avx512_core_amx")
# ...and those whose bfloat16 convolutions oneDNN emulates (ONEDNN_MAX_CPU_ISA=AVX512_CORE trained);
# below them (avx2_vnni, avx2, ...) oneDNN has no bfloat16 convolution
EMULATED_BFLOAT16_ISAS = ("avx512_core", "avx512_core_vnni")

NATIVE, EMULATED, NONE, UNKNOWN = "native", "emulated", "none", "unknown"


@dataclass(frozen=True)
class PrecisionChoice:
    """The Keras dtype policy for `--precision`, and why `auto` chose it (empty for an explicit value)."""

    policy: str
    reason: str = ""

    def describe(self) -> str:
        """What fit's strategy line says: "float32 (auto: ...)", or "mixed_bfloat16" for an explicit value."""
        return f"{self.policy} ({self.reason})" if self.reason else self.policy


def cpu_bfloat16(flags: set[str], onednn_on: bool, environment: Mapping[str, str]) -> tuple[str, str]:
    """What TensorFlow's CPU kernels have for bfloat16 here: NATIVE, EMULATED, NONE or UNKNOWN, and why,
    as a phrase ("oneDNN limited to avx2 by ONEDNN_MAX_CPU_ISA has no bfloat16 convolutions")."""
    if not onednn_on:
        off = f" ({ONEDNN_SWITCH}=0)" if environment.get(ONEDNN_SWITCH, "").strip() == "0" else ""
        return EMULATED, f"oneDNN is off{off}, and Eigen's kernels only emulate bfloat16"
    if not flags:  # no /proc/cpuinfo flags (not Linux on x86): oneDNN's instruction set is unknown
        return UNKNOWN, "this CPU's instruction sets are unknown (no flags in /proc/cpuinfo)"
    isa = onednn_isa(flags, environment)
    limited = isa != onednn_isa(flags, {})
    kernels = f"oneDNN limited to {isa} by {ONEDNN_ISA_LIMIT}" if limited else f"oneDNN {isa}"
    if isa in NATIVE_BFLOAT16_ISAS:
        return NATIVE, f"{kernels} has bfloat16 arithmetic"
    if isa in EMULATED_BFLOAT16_ISAS:
        return EMULATED, f"{kernels} only emulates bfloat16 (no AVX512_BF16 or AMX)"
    return NONE, f"{kernels} has no bfloat16 convolutions"


def auto_precision(gpu_compute_capabilities: list[tuple[int, int]], flags: set[str], onednn_on: bool,
                   environment: Mapping[str, str]) -> PrecisionChoice:
    """What `--precision auto` means on the devices that will train: every GPU if there are GPUs, else the CPU."""
    if gpu_compute_capabilities:
        oldest = min(tuple(capability) for capability in gpu_compute_capabilities)
        if oldest >= MIN_GPU_COMPUTE_CAPABILITY:
            return PrecisionChoice("mixed_bfloat16", "auto: every GPU has compute capability 8.0 or more, with "
                                   "bfloat16 arithmetic")
        return PrecisionChoice("float32", f"auto: a GPU of compute capability {oldest[0]}.{oldest[1]} has no "
                               "bfloat16 arithmetic (8.0 or more has)")
    support, why = cpu_bfloat16(flags, onednn_on, environment)
    return PrecisionChoice("mixed_bfloat16" if support == NATIVE else "float32", f"auto: {why}")


def missing_bfloat16(gpu_compute_capabilities: list[tuple[int, int]], flags: set[str], onednn_on: bool,
                     environment: Mapping[str, str]) -> str | None:
    """Why the kernels that will run have no bfloat16 convolution at all, as a phrase; None where they have one."""
    if gpu_compute_capabilities:
        return None
    support, why = cpu_bfloat16(flags, onednn_on, environment)
    return why if support == NONE else None


def bfloat16_refusal(gpu_compute_capabilities: list[tuple[int, int]], flags: set[str], onednn_on: bool,
                     environment: Mapping[str, str], run_dir=None) -> str | None:
    """Why bfloat16 cannot run here, in one line naming the way out; None where it can.

    Without `run_dir`, for `fit --precision mixed_bfloat16`: train in float32. With it, for
    `evaluate` and `predict` of that run's bfloat16 model: Eigen's kernels emulate bfloat16.
    """
    why = missing_bfloat16(gpu_compute_capabilities, flags, onednn_on, environment)
    if why is None:
        return None
    unset = f", or unset {ONEDNN_ISA_LIMIT}" if environment.get(ONEDNN_ISA_LIMIT) else ""
    if run_dir is None:
        return (f"--precision mixed_bfloat16: {why}, so its first training step would fail; use --precision "
                f"float32{unset}")
    return (f"{run_dir}: its model computes in bfloat16, and {why}; run it with {ONEDNN_SWITCH}=0 (Eigen's kernels, "
            f"which emulate bfloat16){unset}")


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU TensorFlow sees (imports TensorFlow)."""
    load_tensorflow()
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def this_machine() -> tuple[list[tuple[int, int]], set[str], bool, Mapping[str, str]]:
    """The arguments of the decisions above, read from this process (imports TensorFlow)."""
    capabilities = gpu_compute_capabilities()  # loads TensorFlow quietly, before onednn_enabled asks it
    return capabilities, cpu_flags(), onednn_enabled(), os.environ


def resolve_precision(precision: str) -> PrecisionChoice:
    """The Keras dtype policy that `precision` means on this machine ("auto" decided, others unchanged);
    imports TensorFlow only for "auto"."""
    if precision != "auto":
        return PrecisionChoice(precision)
    return auto_precision(*this_machine())


def check_precision_supported(precision: str) -> None:
    """Refuse, in one line, a precision this machine's kernels cannot train in: float16 without a GPU
    (TensorFlow's CPU kernels, MaxPool3D among them, lack float16), bfloat16 on oneDNN without
    bfloat16 convolutions (`bfloat16_refusal`). Imports TensorFlow only for those two."""
    if precision == "mixed_bfloat16":
        refusal = bfloat16_refusal(*this_machine())
        if refusal:
            raise UserError(refusal)
    if precision != "mixed_float16":
        return
    load_tensorflow()
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        raise UserError("--precision mixed_float16 needs a GPU (TensorFlow has no float16 MaxPool3D on CPU); "
                        "use mixed_bfloat16 on CPUs")


def check_model_precision(precision: str, run_dir) -> None:
    """Refuse, in one line, to serve a run's bfloat16 model where the kernels have no bfloat16
    convolution (`evaluate`, `predict`); imports TensorFlow only for a bfloat16 model."""
    if precision == "mixed_bfloat16":
        refusal = bfloat16_refusal(*this_machine(), run_dir=run_dir)
        if refusal:
            raise UserError(refusal)


def needs_loss_scaling(precision: str) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
    return precision == "mixed_float16"
