"""train/network/precision.py: what `--precision auto` chooses, and which bfloat16 is refused, for each
combination of CPU flags, ONEDNN_MAX_CPU_ISA, oneDNN on or off and GPUs (pure functions: no TensorFlow)."""
from __future__ import annotations

import pytest

from common.errors import UserError
from train.network.precision import (
    EMULATED, NATIVE, NONE, UNKNOWN, PrecisionChoice, auto_precision, bfloat16_refusal, check_precision_supported,
    cpu_bfloat16, missing_bfloat16, resolve_precision,
)

AVX2_ONLY = {"sse4_1", "avx", "avx2", "fma"}  # a 2-core AMD EPYC VM, most laptops
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}  # no BF16 (Cascade Lake)
AVX512_BF16 = AVX512 | {"avx512_bf16"}  # AMD EPYC (Zen 4)
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16"}  # Intel Xeon (Sapphire Rapids)
LIMIT = "ONEDNN_MAX_CPU_ISA"


@pytest.mark.parametrize("flags, limit, onednn_on, support, policy, reason", [
    (AMX, None, True, NATIVE, "mixed_bfloat16", "auto: oneDNN avx512_core_amx has bfloat16 arithmetic"),
    (AVX512_BF16, None, True, NATIVE, "mixed_bfloat16", "auto: oneDNN avx512_core_bf16 has bfloat16 arithmetic"),
    (AMX, "AVX512_CORE_BF16", True, NATIVE, "mixed_bfloat16",
     "auto: oneDNN limited to avx512_core_bf16 by ONEDNN_MAX_CPU_ISA has bfloat16 arithmetic"),
    (AVX512_BF16, "AVX512_CORE_BF16", True, NATIVE, "mixed_bfloat16",  # a limit at what the CPU has: no limit
     "auto: oneDNN avx512_core_bf16 has bfloat16 arithmetic"),
    (AVX512_BF16, "AVX2", True, NONE, "float32",  # the crash: the CPU's flags say bfloat16, oneDNN can't
     "auto: oneDNN limited to avx2 by ONEDNN_MAX_CPU_ISA has no bfloat16 convolutions"),
    (AMX, "avx2", True, NONE, "float32",
     "auto: oneDNN limited to avx2 by ONEDNN_MAX_CPU_ISA has no bfloat16 convolutions"),
    (AVX512_BF16, "AVX512_CORE", True, EMULATED, "float32",
     "auto: oneDNN limited to avx512_core by ONEDNN_MAX_CPU_ISA only emulates bfloat16 (no AVX512_BF16 or AMX)"),
    (AVX512, None, True, EMULATED, "float32",
     "auto: oneDNN avx512_core_vnni only emulates bfloat16 (no AVX512_BF16 or AMX)"),
    (AVX2_ONLY, None, True, NONE, "float32", "auto: oneDNN avx2 has no bfloat16 convolutions"),
    (AVX2_ONLY, "AVX2", True, NONE, "float32", "auto: oneDNN avx2 has no bfloat16 convolutions"),
    (AVX2_ONLY, "AVX512_CORE_BF16", True, NONE, "float32", "auto: oneDNN avx2 has no bfloat16 convolutions"),
    (AVX512_BF16, None, False, EMULATED, "float32",
     "auto: oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0), and Eigen's kernels only emulate bfloat16"),
    (AMX, "AVX2", False, EMULATED, "float32",
     "auto: oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0), and Eigen's kernels only emulate bfloat16"),
    (AVX2_ONLY, None, False, EMULATED, "float32",
     "auto: oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0), and Eigen's kernels only emulate bfloat16"),
    (set(), None, True, UNKNOWN, "float32",
     "auto: this CPU's instruction sets are unknown (no flags in /proc/cpuinfo)"),
])
def test_auto_follows_the_cpu_kernels_that_will_run(flags, limit, onednn_on, support, policy, reason):
    environment = {} if limit is None else {LIMIT: limit}
    if not onednn_on:
        environment["TF_ENABLE_ONEDNN_OPTS"] = "0"
    assert cpu_bfloat16(flags, onednn_on, environment)[0] == support
    assert auto_precision([], flags, onednn_on, environment) == PrecisionChoice(policy, reason)
    # explicit bfloat16 is refused only where the kernels have no bfloat16 convolution at all
    refusal = bfloat16_refusal([], flags, onednn_on, environment)
    assert (refusal is not None) == (support == NONE)
    assert (missing_bfloat16([], flags, onednn_on, environment) is not None) == (support == NONE)


def test_oneDNN_off_by_another_means_says_so_without_naming_the_variable():
    assert cpu_bfloat16(AMX, False, {})[1] == "oneDNN is off, and Eigen's kernels only emulate bfloat16"


EVERY_GPU = "auto: every GPU has compute capability 8.0 or more, with bfloat16 arithmetic"


@pytest.mark.parametrize("capabilities, policy, reason", [
    ([(8, 0)], "mixed_bfloat16", EVERY_GPU),
    ([(9, 0), (8, 6)], "mixed_bfloat16", EVERY_GPU),
    ([(7, 5)], "float32", "auto: a GPU of compute capability 7.5 has no bfloat16 arithmetic (8.0 or more has)"),
    ([(8, 6), (7, 0)], "float32", "auto: a GPU of compute capability 7.0 has no bfloat16 arithmetic (8.0 or more has)"),
])
@pytest.mark.parametrize("flags, limit", [(AVX2_ONLY, None), (AMX, None), (AMX, "AVX2")])
def test_auto_on_gpus_follows_their_compute_capability_whatever_the_cpu(capabilities, policy, reason, flags, limit):
    environment = {} if limit is None else {LIMIT: limit}
    for onednn_on in (True, False):
        assert auto_precision(capabilities, flags, onednn_on, environment) == PrecisionChoice(policy, reason)
        assert bfloat16_refusal(capabilities, flags, onednn_on, environment) is None  # the GPU computes


def test_the_refusal_is_one_line_naming_float32_and_the_limit_where_one_is_set():
    limited = bfloat16_refusal([], AVX512_BF16, True, {LIMIT: "AVX2"})
    assert limited == ("--precision mixed_bfloat16: oneDNN limited to avx2 by ONEDNN_MAX_CPU_ISA has no bfloat16 "
                       "convolutions, so its first training step would fail; use --precision float32, or unset "
                       "ONEDNN_MAX_CPU_ISA")
    plain = bfloat16_refusal([], AVX2_ONLY, True, {})
    assert plain == ("--precision mixed_bfloat16: oneDNN avx2 has no bfloat16 convolutions, so its first training "
                     "step would fail; use --precision float32")
    served = bfloat16_refusal([], AVX2_ONLY, True, {}, run_dir="runs/a")
    assert served == ("runs/a: its model computes in bfloat16, and oneDNN avx2 has no bfloat16 convolutions; run it "
                      "with TF_ENABLE_ONEDNN_OPTS=0 (Eigen's kernels, which emulate bfloat16)")
    for line in (limited, plain, served):
        assert "\n" not in line


def test_the_strategy_line_names_the_reason_only_for_auto():
    assert PrecisionChoice("float32", "auto: oneDNN avx2 has no bfloat16 convolutions").describe() == \
        "float32 (auto: oneDNN avx2 has no bfloat16 convolutions)"
    assert PrecisionChoice("mixed_bfloat16").describe() == "mixed_bfloat16"
    assert resolve_precision("float32") == PrecisionChoice("float32")  # explicit: unchanged, no TensorFlow


def test_this_machine_refuses_explicit_bfloat16_exactly_where_the_decision_says(monkeypatch):
    """The wrapper reads this process's machine; monkeypatched, it must follow the pure function."""
    import train.network.precision as precision

    for flags, limit in ((AVX512_BF16, "AVX2"), (AVX512_BF16, None), (AVX2_ONLY, None)):
        environment = {} if limit is None else {LIMIT: limit}
        monkeypatch.setattr(precision, "this_machine", lambda: ([], flags, True, environment))
        expected = bfloat16_refusal([], flags, True, environment)
        if expected is None:
            check_precision_supported("mixed_bfloat16")
        else:
            with pytest.raises(UserError, match="use --precision float32"):
                check_precision_supported("mixed_bfloat16")
        check_precision_supported("float32")
