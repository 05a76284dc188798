"""The geometry check of `train.trust.ood`: what it measures of a scan, and the reasons it gives.

Each entry of GEOMETRY is (name, how it is told, unit, value of a `ScanStats`). A scan is flagged
when a value lies outside the training and validation scans' range widened by GEOMETRY_MARGIN of
its larger end, so the reason can say "lung volume 900 mL (training 3790-5120 mL)".

The lungs' entries (volume, extent per axis: `preprocess.reading.lungs`) exist only for scans of
a cache of schema version 3 on; older caches give None. A reference keeps the names it was built
with, only those every training and validation scan has: a run trained before the lungs were
measured keeps the first eight, reads back as it was written, and never judges a scan's lungs.
"""
from __future__ import annotations

import numpy as np

from preprocess.reading.scan_stats import ScanStats

GEOMETRY_MARGIN = 0.10
AXES = ("left-right", "front-back", "head-foot")


def _lung_extent(stats: ScanStats, axis: int) -> float | None:
    return None if stats.lung_extent_mm is None else stats.lung_extent_mm[axis]


GEOMETRY = (  # name, how it is told, unit, value of a ScanStats (None: not measured)
    *((f"fov_{index}", f"field of view {axis}", "mm", lambda stats, i=index: stats.fov_mm[i])
      for index, axis in enumerate(AXES)),
    *((f"spacing_{index}", f"voxel spacing {axis}", "mm", lambda stats, i=index: stats.spacing_mm[i])
      for index, axis in enumerate(AXES)),
    ("slices", "slices", "", lambda stats: stats.slices),
    ("lung_fraction", "lung-density fraction", "", lambda stats: stats.lung_fraction),
    ("lung_volume", "lung volume", "mL", lambda stats: stats.lung_volume_ml),
    *((f"lung_extent_{index}", f"lungs' extent {axis}", "mm", lambda stats, i=index: _lung_extent(stats, i))
      for index, axis in enumerate(AXES)),
)
GEOMETRY_NAMES = tuple(name for name, *_ in GEOMETRY)
_BY_NAME = {entry[0]: entry for entry in GEOMETRY}


def geometry_values(stats: list[ScanStats], names: tuple[str, ...] = GEOMETRY_NAMES) -> np.ndarray:
    """(scans, names) values; NaN where a scan's cache did not measure one."""
    def value(item: ScanStats, name: str) -> float:
        measured = _BY_NAME[name][3](item)
        return np.nan if measured is None else float(measured)

    return np.array([[value(item, name) for name in names] for item in stats], dtype=np.float64).reshape(
        len(stats), len(names))


def measured_names(values: np.ndarray, names: tuple[str, ...] = GEOMETRY_NAMES) -> tuple[str, ...]:
    """The names whose column every scan has (finite): what a reference built from these scans can check."""
    return tuple(name for name, column in zip(names, np.asarray(values).T) if np.isfinite(column).all())


def allowed_range(seen_low: np.ndarray, seen_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The seen range widened by GEOMETRY_MARGIN of its larger end on both sides."""
    margin = GEOMETRY_MARGIN * np.maximum(np.abs(seen_low), np.abs(seen_high))
    return seen_low - margin, seen_high + margin


def judge_geometry(values: np.ndarray, names: tuple[str, ...], low: np.ndarray, high: np.ndarray,
                   seen_low: np.ndarray, seen_high: np.ndarray) -> tuple[dict, dict, list[str]]:
    """(scores, thresholds, reasons) of one scan's `values` for `names`; a value the scan lacks (NaN) is not judged."""
    scores = {name: float(value) if np.isfinite(value) else None for name, value in zip(names, values)}
    thresholds = {name: [float(lower), float(upper)] for name, lower, upper in zip(names, low, high)}
    reasons = []
    for index, name in enumerate(names):
        value = values[index]
        if np.isfinite(value) and not low[index] <= value <= high[index]:
            _, told, unit, _ = _BY_NAME[name]
            reasons.append(f"{told} {format_value(value, unit)} "
                           f"(training {format_range(seen_low[index], seen_high[index], unit)})")
    return scores, thresholds, reasons


def format_value(value: float, unit: str) -> str:
    if unit == "mm":
        return f"{value:.3g} mm" if value < 10 else f"{value:.0f} mm"
    if unit:
        return f"{value:.0f} {unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def format_range(low: float, high: float, unit: str) -> str:
    low_text, high_text = format_value(low, unit), format_value(high, unit)
    return low_text if low_text == high_text else f"{low_text.removesuffix(f' {unit}')}-{high_text}"
