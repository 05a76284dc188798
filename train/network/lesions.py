"""Learning where the lesion is: `fit`'s lesion-cell targets, their loss, and when it uses them.

A cache with lesion masks (`build --masks`, docs/your-data.md) lets `fit` train the lesion-map model
(`train.network.model.build_model(lesion_map=True)`) with two losses: the scan's label, and which
cells of the map hold lesion. A cell's target is 1 when it holds a voxel that is at least
`LESION_SHARE` lesion in the cache (marked before the augmentation moves marks and volume
together). A cell counts in the loss when its scan's mask is known: the scan has a mask, or it is
normal (no lesion anywhere). An abnormal scan without a mask teaches only through its label. Positive cells weigh
`POSITIVE_WEIGHT` times: a lesion of 0.1% of the lung fills a handful of the map's cells, and
"nothing anywhere" would otherwise cost almost nothing.

This module is what `fit` decides before TensorFlow loads; `train.network.lesion_training` is the
TensorFlow side (targets in the pipeline, the loss, the log names).
"""
from __future__ import annotations

import numpy as np

from common.errors import UserError

# the two outputs of the lesion-map model (`train.network.model`); the plain model's one is PROBABILITY_OUTPUT too
PROBABILITY_OUTPUT, LESION_OUTPUT = "probability_abnormal", "lesion_cells"
POSITIVE_WEIGHT = 20.0
LESION_SHARE = 0.25  # a voxel this much lesion (the mask's area-averaged share) marks its cell
DEFAULT_LESION_WEIGHT = 20.0  # the lesion-cell loss's weight against the label's (the probe's: 5-20 alike)
MAX_LESION_WEIGHT = 1000.0
# BatchNorm statistics re-estimated before each validation (PreciseBN, the default recipe's) cost the
# lesion map 0.02-0.10 of AUC on unseen 0.1-1% phantoms in each of 3 seeds (docs/benchmarks.md,
# "Learning where the lesion is"). Our guess, not measured apart: the map calls a scan from its largest
# cell, which any shift of the statistics moves, and PreciseBN estimates them from unrotated scans
# where training saw rotated ones. So a lesion-map run keeps Keras's moving averages unless
# --precise-bn-scans is given.
LESION_MAP_PRECISE_BN_SCANS = 0
# A lesion-map run's peak rate unless --lr is given (the default recipe's is 3e-4). On 0.1-1% phantoms,
# 84 training scans, 30 epochs, 3 seeds: AUC on 100 unseen 0.876 -> 0.918 (each seed >= 0.907)
# at 1e-3, validation AUC 0.95 reached in 2 of 3 seeds (0 at 3e-4), its 18-scan test split 0.963 -> 0.942;
# docs/benchmarks.md, "The lesion map's rate".
LESION_MAP_LEARNING_RATE = 1e-3
# How the lesion map's call sets its offset (where P(abnormal) crosses 0.5 on the largest cell logit):
# refit before each validation from training scans (`train.loop.call_refit`), or learned by gradient
# alone, as runs before it did. On the demo's phantoms, 5 seeds, refit took the degenerate validation
# epochs from 2-4 a run to 0, and on 0.1-1% lesions the two were level within 5 seeds' spread
# (docs/benchmarks.md, "The call's offset refit before each validation").
CALL_OFFSETS = ("refit", "learned")
LESION_MAP_CALL_OFFSET = "refit"
CALL_OFFSET_BEFORE = "learned"  # what a lesion-map run from before --call-offset did (its config lacks it)


def masks_known(labels: np.ndarray, has_mask: np.ndarray) -> np.ndarray:
    """float32 (N,): 1 where a row's lesions are known: it has a mask, or it is normal."""
    return ((np.asarray(labels) == 0) | np.asarray(has_mask, bool)).astype(np.float32)


def lesion_marks(mask: np.ndarray) -> np.ndarray:
    """float32: 1 where a cached mask's voxel (uint8, 255 x its lesion share) is at least `LESION_SHARE`
    lesion, else 0. Marked before any rotation: a rotation's interpolation would spread a small
    lesion's shares below the threshold and lose it."""
    return (mask >= np.uint8(np.ceil(LESION_SHARE * 255))).astype(np.float32)


def resolve_lesion_weight(requested: float | None, masked_training_rows: int, task_is_binary: bool) -> float:
    """The lesion-cell loss's weight for this run: --lesion-weight, or by default
    `DEFAULT_LESION_WEIGHT` when training rows have masks (0, the plain classifier, when none do)."""
    if requested is None:
        return DEFAULT_LESION_WEIGHT if masked_training_rows and task_is_binary else 0.0
    if requested and not task_is_binary:
        raise UserError("--lesion-weight is for --task binary: the lesion map calls a scan abnormal, not its grade")
    if requested and not masked_training_rows:
        raise UserError(f"--lesion-weight {requested:g} needs lesion masks, and no training scan of this cache has "
                        "one (build it with masks: docs/your-data.md)")
    return float(requested)


def lesion_map_choices(precise_bn_given: bool, rate_given: bool) -> dict:
    """The training choices a lesion-map run makes where no flag set them, instead of its recipe's
    (docs/training.md): no PreciseBN, peak rate 1e-3."""
    return {**({} if precise_bn_given else {"precise_bn_scans": LESION_MAP_PRECISE_BN_SCANS}),
            **({} if rate_given else {"learning_rate": LESION_MAP_LEARNING_RATE})}


def resolve_call_offset(requested: str | None, lesion_map: bool) -> str | None:
    """The run's --call-offset: `LESION_MAP_CALL_OFFSET` unless given for a lesion-map run; None for the plain
    model, which has no such call."""
    if requested is not None and requested not in CALL_OFFSETS:
        raise UserError(f"--call-offset must be one of {', '.join(CALL_OFFSETS)}, got {requested!r}")
    if not lesion_map:
        if requested is not None:
            raise UserError("--call-offset is the lesion map's (a cache with lesion masks and a lesion weight above 0); "
                            "the plain classifier has no such call")
        return None
    return requested or LESION_MAP_CALL_OFFSET


def history_name(name: str) -> str:
    """A two-output model's log name as history.csv names it: `probability_abnormal_auc` is `auc`,
    as the one-output model logs it, `probability_abnormal_loss` is `label_loss`; `loss` is the total."""
    for prefix in ("", "val_"):
        if name == f"{prefix}{PROBABILITY_OUTPUT}_loss":
            return f"{prefix}label_loss"
        if name.startswith(f"{prefix}{PROBABILITY_OUTPUT}_"):
            return prefix + name[len(f"{prefix}{PROBABILITY_OUTPUT}_"):]
    return name
