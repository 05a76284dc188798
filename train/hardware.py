"""The CPU this process runs on, and which of TensorFlow's CPU kernels it gets there.

TensorFlow has two sets of CPU kernels for convolution, pooling and matrix products: oneDNN's,
which pick the widest instruction set the CPU has at run time (AVX2, AVX-512, AMX), and Eigen's.
TensorFlow 2.21 turns oneDNN on by itself only on CPUs with AVX-512 VNNI or BF16 or AMX. On every
other x86-64 CPU (AVX2 laptops, older servers, many cloud VMs) its 3D convolutions run through
Eigen, as hundreds of thousands of small matrix products, at about a quarter of the speed: a
float32 training step of the default network on 2 scans at 64x64x32 took 1,236 ms through Eigen
and 328 ms through oneDNN on a 2-core AVX2 CPU (docs and `benchmarks/bench_step.py`).

`prefer_onednn` sets TF_ENABLE_ONEDNN_OPTS=1 unless the user set it, and `train/__init__.py`
calls it, so it runs before any module of `train` imports TensorFlow (TensorFlow reads the
variable once, when it is imported). `TF_ENABLE_ONEDNN_OPTS=0` still gives Eigen's kernels, and
`ONEDNN_MAX_CPU_ISA=AVX2` limits oneDNN to AVX2 on a CPU that has more.

The two sets of kernels sum in different orders, so training results differ in the last bits
between them, and between oneDNN on different instruction sets. `numerics_key` names the
combination, for anything that compares floating-point results recorded on another machine.
Nothing here imports TensorFlow at module level: `train/__init__.py` imports this, and the
commands that answer bad input in a second must not load TensorFlow.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

ONEDNN_SWITCH = "TF_ENABLE_ONEDNN_OPTS"
ONEDNN_ISA_LIMIT = "ONEDNN_MAX_CPU_ISA"
CPU_INFO = Path("/proc/cpuinfo")
# oneDNN's CPU instruction-set levels that matter here, narrowest first, with the /proc/cpuinfo
# flags each needs (oneDNN's own names; ONEDNN_MAX_CPU_ISA takes them in upper case)
ONEDNN_ISA_LEVELS = (
    ("sse41", ("sse4_1",)),
    ("avx", ("avx",)),
    ("avx2", ("avx2", "fma")),
    ("avx2_vnni", ("avx2", "fma", "avx_vnni")),
    ("avx512_core", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("avx512_core_vnni", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")),
    ("avx512_core_bf16", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")),
    ("avx512_core_amx", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                         "amx_tile", "amx_bf16")),
)


def prefer_onednn(environment: MutableMapping[str, str] = os.environ) -> None:
    """Ask TensorFlow for oneDNN's CPU kernels on every CPU, unless the user chose with TF_ENABLE_ONEDNN_OPTS."""
    environment.setdefault(ONEDNN_SWITCH, "1")


def cpu_flags(cpu_info: Path = CPU_INFO) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is none: not Linux)."""
    return set(_first_cpu_field(cpu_info, "flags").split())


def cpu_model(cpu_info: Path = CPU_INFO) -> str:
    """The first CPU's model name ("unknown CPU" where /proc/cpuinfo does not say)."""
    return _first_cpu_field(cpu_info, "model name").strip() or "unknown CPU"


def _first_cpu_field(cpu_info: Path, field: str) -> str:
    try:
        text = cpu_info.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value
    return ""


def cpu_kind(flags: set[str]) -> str:
    """The CPU's kind as our time figures name it: what it has for bfloat16 and wide vectors."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    if "avx512f" in flags:
        return "AVX-512 (no BF16)"
    if "avx2" in flags:
        return "AVX2 only"
    return "no AVX2"


def onednn_isa(flags: set[str], environment: MutableMapping[str, str] = os.environ) -> str:
    """The widest oneDNN instruction set this CPU has, within ONEDNN_MAX_CPU_ISA if that is set."""
    names = [name for name, _ in ONEDNN_ISA_LEVELS]
    best = 0
    for index, (_, needed) in enumerate(ONEDNN_ISA_LEVELS):
        if all(flag in flags for flag in needed):
            best = index
    limit = environment.get(ONEDNN_ISA_LIMIT, "").strip().lower()
    if limit in names:
        best = min(best, names.index(limit))
    return names[best]


def onednn_enabled() -> bool:
    """Whether TensorFlow runs oneDNN's CPU kernels in this process (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def kernel_path(flags: set[str] | None = None) -> str:
    """Which kernels TensorFlow's CPU convolutions use here: "oneDNN avx2", "Eigen", ... (imports TensorFlow)."""
    if not onednn_enabled():
        return "Eigen"
    return f"oneDNN {onednn_isa(cpu_flags() if flags is None else flags)}"


def numerics_key() -> str:
    """What training's float results depend on besides the code and the seed: the kernels and the thread count.

    Two processes with the same key compute the same numbers bit for bit (imports TensorFlow).
    """
    return f"{kernel_path()}, {os.cpu_count()} CPUs"


def float32_flops_per_cycle(flags: set[str], vendor: str) -> int:
    """Peak float32 operations per cycle of one core: two fused multiply-add units, each doing
    2 operations on every lane (8 lanes with AVX2, 16 with AVX-512).

    AMD's AVX-512 (Zen 4) runs on 256-bit units, so it peaks as AVX2 does; some Intel parts
    have only one 512-bit unit, for which this figure is twice the truth (pass --peak-gflops).
    """
    if "avx512f" in flags and vendor == "GenuineIntel":
        return 64
    if "avx2" in flags and "fma" in flags:
        return 32
    return 16 if "avx" in flags else 8


def peak_float32_gflops(cpu_info: Path = CPU_INFO) -> tuple[float, str]:
    """The CPU's float32 peak in GFLOP/s, and the arithmetic behind it (cores x FLOP/cycle x clock).

    The clock is /proc/cpuinfo's "cpu MHz" of the first CPU: the current clock, not a turbo one.
    """
    flags = cpu_flags(cpu_info)
    per_cycle = float32_flops_per_cycle(flags, _first_cpu_field(cpu_info, "vendor_id").strip())
    try:
        gigahertz = float(_first_cpu_field(cpu_info, "cpu MHz")) / 1000
    except ValueError:
        return float("nan"), "unknown (no clock in /proc/cpuinfo)"
    cores = os.cpu_count() or 1
    peak = cores * per_cycle * gigahertz
    return peak, f"{cores} cores x {per_cycle} FLOP/cycle x {gigahertz:.2f} GHz = {peak:.0f} GFLOP/s"


def machine_record() -> dict:
    """What a run's config.json records of the machine it trained on (imports TensorFlow)."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpu_kind": cpu_kind(flags), "cpus": os.cpu_count(), "kernels": kernel_path(flags)}


def describe_machine() -> str:
    """One line for benchmark output: the CPU, its kind, its core count, and TensorFlow's kernels."""
    flags = cpu_flags()
    return f"{cpu_model()} ({cpu_kind(flags)}), {os.cpu_count()} CPUs; TensorFlow kernels: {kernel_path(flags)}"
