"""`fit`'s check that a training step fits in memory, before any epoch is spent."""
from __future__ import annotations

import pytest

from common.errors import UserError
from train.network.memory import available_bytes, check_step_fits, estimated_step_bytes

GIB = 1024**3
TUTORIAL_SHAPE = (128, 128, 64)


def test_the_estimate_grows_with_the_batch_and_the_shape_and_shrinks_with_bfloat16():
    two, eight = (estimated_step_bytes(TUTORIAL_SHAPE, batch, "float32", "valid") for batch in (2, 8))
    assert 1.5 * GIB < two < 3 * GIB and 5.5 * GIB < eight < 8 * GIB  # bench_memory.py measured 2.15 and 6.60 GiB
    assert estimated_step_bytes((64, 64, 32), 8, "float32", "same") < eight / 4
    assert estimated_step_bytes(TUTORIAL_SHAPE, 8, "mixed_bfloat16", "valid") < eight
    assert estimated_step_bytes(TUTORIAL_SHAPE, 8, "float32", "valid", width=0.5) < eight


def test_a_batch_that_does_not_fit_is_refused_in_one_line_naming_the_largest_that_does():
    with pytest.raises(UserError) as error:
        check_step_fits(TUTORIAL_SHAPE, 8, "float32", "valid", 1.0, free=4 * GIB)
    message = str(error.value)
    assert "\n" not in message
    assert "a training step of 8 scans of 128 x 128 x 64 needs about 6.7 GiB" in message
    assert "4.0 GiB of memory are free: try --batch-size 4" in message
    with pytest.raises(UserError, match="try a smaller --shape at build time, or a smaller --width"):
        check_step_fits(TUTORIAL_SHAPE, 8, "float32", "valid", 1.0, free=GIB // 2)


def test_a_batch_that_fits_passes():
    check_step_fits(TUTORIAL_SHAPE, 8, "float32", "valid", 1.0, free=24 * GIB)
    check_step_fits((32, 32, 16), 2, "float32", "same", 1.0)  # what this machine has free now
    assert available_bytes() > 0
