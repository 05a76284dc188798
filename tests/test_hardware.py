"""train/hardware.py: the CPU's kind, oneDNN's instruction set, and oneDNN's kernels on by default."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from train.hardware import (
    ONEDNN_SWITCH, cpu_flags, cpu_kind, cpu_model, float32_flops_per_cycle, onednn_isa, peak_float32_gflops,
    prefer_onednn,
)

AVX2_ONLY = {"sse4_1", "avx", "avx2", "fma"}  # a 2-core AMD EPYC VM, most laptops
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16"}


@pytest.mark.parametrize("flags, kind, isa", [
    (AVX2_ONLY, "AVX2 only", "avx2"),
    (AVX2_ONLY | {"avx512f"}, "AVX-512 (no BF16)", "avx2"),  # avx512f alone is not oneDNN's avx512_core
    (AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "AVX-512 (no BF16)", "avx512_core"),
    (AVX512_BF16, "AVX-512 BF16", "avx512_core_bf16"),
    (AMX, "AMX", "avx512_core_amx"),
    ({"sse4_1", "avx"}, "no AVX2", "avx"),
    (set(), "no AVX2", "sse41"),
])
def test_cpu_kind_and_onednn_instruction_set_follow_the_flags(flags, kind, isa):
    assert cpu_kind(flags) == kind
    assert onednn_isa(flags, environment={}) == isa


def test_onednn_max_cpu_isa_limits_the_instruction_set_as_onednn_does():
    assert onednn_isa(AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "avx2"
    assert onednn_isa(AMX, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}) == "avx512_core"
    assert onednn_isa(AVX2_ONLY, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == "avx2"  # a limit, not a wish
    assert onednn_isa(AVX2_ONLY, {"ONEDNN_MAX_CPU_ISA": "ALL"}) == "avx2"


def test_cpu_model_and_flags_read_the_first_cpu(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t: fpu\n")
    assert cpu_model(info) == "AMD EPYC 7B13" and cpu_flags(info) == {"fpu", "avx2", "fma"}
    assert cpu_model(tmp_path / "missing") == "unknown CPU" and cpu_flags(tmp_path / "missing") == set()


def test_float32_peak_is_cores_times_fma_lanes_times_clock(tmp_path, monkeypatch):
    assert float32_flops_per_cycle(AVX2_ONLY, "AuthenticAMD") == 32  # 2 FMA units x 8 lanes x 2
    assert float32_flops_per_cycle(AVX512_BF16, "GenuineIntel") == 64
    assert float32_flops_per_cycle(AVX512_BF16, "AuthenticAMD") == 32  # Zen 4: AVX-512 on 256-bit units
    assert float32_flops_per_cycle({"avx"}, "GenuineIntel") == 16
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu MHz\t\t: 2450.000\nflags\t\t: avx avx2 fma\n")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    peak, arithmetic = peak_float32_gflops(info)
    assert peak == pytest.approx(156.8) and arithmetic == "2 cores x 32 FLOP/cycle x 2.45 GHz = 157 GFLOP/s"
    info.write_text("processor\t: 0\nflags\t\t: avx2 fma\n")
    assert peak_float32_gflops(info)[1].startswith("unknown")


def test_prefer_onednn_leaves_the_users_choice_alone():
    environment = {}
    prefer_onednn(environment)
    assert environment == {ONEDNN_SWITCH: "1"}
    chosen = {ONEDNN_SWITCH: "0"}
    prefer_onednn(chosen)
    assert chosen == {ONEDNN_SWITCH: "0"}


@pytest.mark.parametrize("switch, expected", [(None, "True"), ("0", "False"), ("1", "True")])
def test_train_runs_tensorflow_on_onednn_unless_the_user_turns_it_off(switch, expected):
    """A real process that imports `train` and then TensorFlow, as every `python -m train` command does."""
    environment = {name: value for name, value in os.environ.items() if name != ONEDNN_SWITCH}
    if switch is not None:
        environment[ONEDNN_SWITCH] = switch
    code = ("import train, tensorflow; from train.hardware import onednn_enabled, kernel_path; "
            "print(onednn_enabled()); print(kernel_path())")
    environment.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stderr
    enabled, path = result.stdout.split("\n")[:2]
    assert enabled == expected
    assert path.startswith("oneDNN ") if expected == "True" else path == "Eigen"

