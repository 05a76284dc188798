"""A scan's cheap statistics, taken from its raw Hounsfield units, and the hard checks they allow.

`preprocess.reading.transform.preprocess_scan` fills a `StatsAccumulator` slab by slab, before windowing,
so building the cache and `predict` describe a scan with the same function. The cache keeps
these statistics per row (schema version 2); `train.trust.ood` compares a new scan's with the
training scans'. The hard checks (`hard_problems`) refuse what is not a CT volume at all, before
any model runs: a volume that is not in Hounsfield units, absurd spacing or field of view, too
few slices, a constant volume.

Definitions (canonical RAS axes, as the cache's volumes):
    hu_histogram   fraction of sampled voxels in each HISTOGRAM_EDGES bin; values below the first
                   edge count in the first bin, above the last in the last. In-plane, every
                   `sample_stride`-th voxel of every slice is sampled (at most ~128 x 128 a slice).
    spacing_mm     voxel size along R, A, S
    fov_mm         field of view along R, A, S: voxels x spacing
    slices         voxels along S
    lung_fraction  fraction of sampled voxels in LUNG_HU (aerated lung parenchyma)
    air_fraction   fraction below AIR_HU (air: outside the body, airways, lungs)
    hu_min, hu_max the extreme voxel values (every voxel, not sampled)
    lung_volume_ml the lungs' volume (`preprocess.reading.lungs`: low-density lung, dense lesions not
                   counted); 0 when no lungs were found. None (this and the three below) in a cache
                   made before schema version 3, which did not look for the lungs
    lung_count     0 (none found), 1 or 2
    lung_extent_mm the lungs' extent along R, A, S (no margin)
    lung_box       the box the volume was cropped to, with its margin, in voxels of the canonical scan:
                   (start, stop) along R, then A, then S; the whole scan when no lungs were found
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from preprocess.reading.lungs import Lungs, chest_problems, find_lungs, in_plane_stride

HISTOGRAM_EDGES = np.arange(-1100.0, 1501.0, 50.0)  # 52 bins of 50 HU
HISTOGRAM_BINS = len(HISTOGRAM_EDGES) - 1
LUNG_HU = (-950.0, -500.0)
AIR_HU = -800.0
SAMPLES_PER_AXIS = 128  # in-plane sampling: at most this many voxels per axis and slice

# hard limits: beyond them a volume is not a chest CT whatever the model was trained on
MIN_AIR_FRACTION = 0.001  # every chest CT has air: outside the body, in the airways and lungs
MIN_SLICES = 6
SPACING_LIMITS_MM = (0.1, 50.0)
IN_PLANE_FOV_LIMITS_MM = (50.0, 1000.0)
MIN_CRANIOCAUDAL_MM = 20.0
MIN_HU_RANGE = 1.0  # max - min below this: a constant volume


@dataclass(frozen=True)
class ScanStats:
    hu_histogram: tuple[float, ...]
    spacing_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    slices: int
    lung_fraction: float
    air_fraction: float
    hu_min: float
    hu_max: float
    lung_volume_ml: float | None = None
    lung_count: int | None = None
    lung_extent_mm: tuple[float, float, float] | None = None
    lung_box: tuple[int, int, int, int, int, int] | None = None

    @property
    def scan_shape(self) -> tuple[int, int, int]:
        """The scan's voxels along R, A, S (the grid `lung_box` is in)."""
        return tuple(int(round(fov / spacing)) for fov, spacing in zip(self.fov_mm, self.spacing_mm))

    @property
    def has_lungs(self) -> bool:
        """Whether the lungs were searched for (schema version 3 on)."""
        return self.lung_volume_ml is not None

    def to_json(self) -> dict:
        return asdict(self)


def sample_stride(in_plane_shape: tuple[int, int]) -> int:
    return max(1, max(in_plane_shape) // SAMPLES_PER_AXIS)


class StatsAccumulator:
    """Collects a scan's statistics from its HU slabs (canonical axes, float32) in any number of calls."""

    def __init__(self, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]):
        self.shape = tuple(int(n) for n in shape)
        self.spacing_mm = tuple(float(value) for value in spacing_mm)
        self.stride = sample_stride(self.shape[:2])
        self.counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        self.lung = 0
        self.air = 0
        self.hu_min = np.inf
        self.hu_max = -np.inf

    def add(self, hu: np.ndarray) -> None:
        """One slab of Hounsfield units, before windowing (not modified)."""
        if hu.size == 0:
            return
        self.hu_min = min(self.hu_min, float(hu.min()))
        self.hu_max = max(self.hu_max, float(hu.max()))
        sampled = hu[:: self.stride, :: self.stride, :]
        bins = np.floor((sampled - HISTOGRAM_EDGES[0]) / (HISTOGRAM_EDGES[1] - HISTOGRAM_EDGES[0]))
        np.clip(bins, 0, HISTOGRAM_BINS - 1, out=bins)
        self.counts += np.bincount(bins.astype(np.int64).ravel(), minlength=HISTOGRAM_BINS)
        self.lung += int(np.count_nonzero((sampled >= LUNG_HU[0]) & (sampled < LUNG_HU[1])))
        self.air += int(np.count_nonzero(sampled < AIR_HU))

    def result(self, lungs: Lungs | None = None) -> ScanStats:
        total = max(int(self.counts.sum()), 1)
        fov = tuple(float(n * spacing) for n, spacing in zip(self.shape, self.spacing_mm))
        found = {} if lungs is None else dict(
            lung_volume_ml=float(lungs.volume_ml), lung_count=int(lungs.count),
            lung_extent_mm=tuple(float(value) for value in lungs.extent_mm),
            lung_box=tuple(int(value) for value in lungs.box))
        return ScanStats(
            hu_histogram=tuple(float(count) / total for count in self.counts),
            spacing_mm=self.spacing_mm, fov_mm=fov, slices=self.shape[2],
            lung_fraction=self.lung / total, air_fraction=self.air / total,
            hu_min=float(self.hu_min), hu_max=float(self.hu_max), **found,
        )


def compute_scan_stats(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> ScanStats:
    """The statistics of a whole HU volume at once (tests, benchmarks; the build goes slab by slab)."""
    hu = np.asarray(hu, dtype=np.float32)
    accumulator = StatsAccumulator(hu.shape, spacing_mm)
    accumulator.add(hu)
    stride = in_plane_stride(hu.shape)
    return accumulator.result(find_lungs(hu[::stride, ::stride, :], stride, hu.shape, accumulator.spacing_mm))


def hard_problems(stats: ScanStats) -> list[str]:
    """Why this volume is not a chest CT we can judge, one line per reason (none: it may be).

    The one rule of `build` (a failed scan, with these reasons) and `predict` (not assessed): a CT in
    Hounsfield units with plausible geometry, and lungs (`preprocess.reading.lungs.chest_problems`).
    """
    problems = []
    if stats.hu_max - stats.hu_min < MIN_HU_RANGE:
        problems.append(f"constant volume (every voxel {stats.hu_min:g})")
    elif stats.air_fraction < MIN_AIR_FRACTION:
        if -10.0 <= stats.hu_min and stats.hu_max <= 10.0:
            problems.append(f"values {stats.hu_min:.3g}..{stats.hu_max:.3g}: rescaled intensities, not Hounsfield "
                            "units (a CT has air near -1000 HU)")
        else:
            problems.append(f"no air (no voxel below {AIR_HU:g} HU; values {stats.hu_min:.0f}..{stats.hu_max:.0f}): "
                            "not a CT in Hounsfield units (MR, or rescaled?)")
    low, high = SPACING_LIMITS_MM
    spacing = ", ".join(f"{value:.3g}" for value in stats.spacing_mm)
    if any(not low <= value <= high for value in stats.spacing_mm):
        problems.append(f"absurd voxel spacing ({spacing} mm; a CT's is {low:g}-{high:g} mm)")
    low, high = IN_PLANE_FOV_LIMITS_MM
    if any(not low <= value <= high for value in stats.fov_mm[:2]):
        problems.append(f"absurd field of view ({stats.fov_mm[0]:.0f} x {stats.fov_mm[1]:.0f} mm in-plane; "
                        f"a CT's is {low:g}-{high:g} mm)")
    if stats.slices < MIN_SLICES:
        problems.append(f"too few slices ({stats.slices}; a CT volume has at least {MIN_SLICES})")
    elif stats.fov_mm[2] < MIN_CRANIOCAUDAL_MM:
        problems.append(f"covers {stats.fov_mm[2]:.0f} mm head to foot; a chest CT covers at least "
                        f"{MIN_CRANIOCAUDAL_MM:g} mm")
    if not problems:  # a volume that is no CT at all has no lungs either: one reason is enough
        problems += chest_problems(stats.lung_volume_ml, stats.lung_extent_mm)
    return problems
