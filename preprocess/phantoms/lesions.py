"""Lesions of the synthetic phantoms: ground-glass opacities and consolidations inside the lungs.

`add_lesions` draws the ungraded lesions of `synth` without `--grades` (2-8 ellipsoids, semi-axes
0.2-0.45 of the lung); `add_graded_lesions` draws lesions until their share of the lung falls in
a MosMedData grade's range. Both draw only from the lesion random stream they are given and
change only lung voxels, so an abnormal phantom is its normal twin plus lesions.
"""
from __future__ import annotations

import numpy as np

from common.errors import UserError

HU_LUNG = -850.0
GROUND_GLASS_HU_RANGE = (-700.0, -300.0)
CONSOLIDATION_HU_RANGE = (-100.0, 50.0)
# MosMedData's grades: lesion voxels / lung voxels in (low, high]; CT-0 is normal
GRADE_INVOLVEMENT_RANGES = {1: (0.0, 0.25), 2: (0.25, 0.5), 3: (0.5, 0.75), 4: (0.75, 1.0)}
MAX_LESION_ATTEMPTS = 10_000  # a graded draw ends after a few hundred at most; more is a bug


def check_involvement(involvement: tuple[float, float]) -> int:
    """Refuse an involvement range (fractions of the lung) that no one grade holds; return that grade."""
    low, high = involvement
    grade = next((grade for grade, (grade_low, grade_high) in sorted(GRADE_INVOLVEMENT_RANGES.items())
                  if grade_low <= low and high <= grade_high), None)
    if not (0 < low < high <= 1) or grade is None:
        raise UserError(f"--involvement needs 0 < LOW < HIGH <= 100 (percent of the lung) inside one grade's range "
                        f"(CT-1 0-25, CT-2 25-50, CT-3 50-75, CT-4 75-100), got {100 * low:g} {100 * high:g}")
    if low * 1e4 < 1:
        raise UserError(f"--involvement LOW must be at least 0.01 (percent of the lung), got {100 * low:g}")
    return grade


def add_lesions(hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator, spacing_mm: np.ndarray,
                lung_size_mm: float) -> np.ndarray:
    """Blend 2-8 soft-edged ellipsoidal lesions into the lungs of `hu` in place; return where they act.

    Lesions only add density (vessels stay visible through ground glass), and every lesion is centred
    on a lung parenchyma voxel, so its core reaches its drawn HU even when it is smaller than a voxel.
    """
    lesion_mask = np.zeros(hu.shape, dtype=bool)
    parenchyma = lung & (hu == HU_LUNG)
    candidate_slices = np.flatnonzero(parenchyma.any(axis=(0, 1)))
    for _ in range(rng.integers(2, 9)):
        center = draw_lesion_center(rng, parenchyma, candidate_slices)
        box, weight, target_hu = draw_lesion(rng, center, hu.shape, spacing_mm, lung_size_mm)
        blend_lesion(hu, lung, lesion_mask, box, weight, target_hu)
    return lesion_mask


def add_graded_lesions(hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator, spacing_mm: np.ndarray,
                       lung_size_mm: float, grade: int) -> np.ndarray:
    """Add lesions like `add_lesions` until the lesion share of the lung is inside `grade`'s range."""
    return add_lesions_covering(hu, lung, rng, spacing_mm, lung_size_mm, GRADE_INVOLVEMENT_RANGES[grade])


def add_lesions_covering(hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator, spacing_mm: np.ndarray,
                         lung_size_mm: float, involvement: tuple[float, float], log_uniform: bool = False) -> np.ndarray:
    """Add lesions like `add_lesions` until the lesion share of the lung is inside (low, high].

    A target share is drawn inside the range first (uniformly, or log-uniformly so that a range over
    decades, 0.1-25%, spreads its scans over each decade), so scans spread over it. Each new lesion is
    centred on parenchyma no lesion covers yet, and one that would overshoot the range is dropped
    and the next ones drawn smaller, so the loop ends after a few hundred lesions at most.
    """
    low, high = involvement
    lung_voxels = np.count_nonzero(lung)
    share = np.exp(rng.uniform(np.log(low), np.log(high))) if log_uniform else rng.uniform(low, high)
    # whole voxels: a target between the last two counts the range allows could never be reached
    target_voxels = min(max(share * lung_voxels, np.floor(low * lung_voxels) + 1), np.floor(high * lung_voxels))
    lesion_mask = np.zeros(hu.shape, dtype=bool)
    parenchyma = lung & (hu == HU_LUNG)
    candidate_slices = np.flatnonzero(parenchyma.any(axis=(0, 1)))
    covered_voxels, scale = 0, 1.0
    for _ in range(MAX_LESION_ATTEMPTS):
        if covered_voxels >= target_voxels:
            return lesion_mask
        for _ in range(100):  # a centre on uncovered parenchyma grows the share; rarely needs many draws
            center = draw_lesion_center(rng, parenchyma, candidate_slices)
            if not lesion_mask[tuple(center)]:
                break
        else:  # the parenchyma left is too rare to hit by chance (a small, vessel-rich phantom): pick from it
            uncovered = np.flatnonzero(parenchyma & ~lesion_mask) if (parenchyma & ~lesion_mask).any() \
                else np.flatnonzero(lung & ~lesion_mask)
            if uncovered.size == 0:
                return lesion_mask
            center = np.array(np.unravel_index(int(uncovered[rng.integers(uncovered.size)]), hu.shape))
        box, weight, target_hu = draw_lesion(rng, center, hu.shape, spacing_mm, lung_size_mm, scale)
        new_voxels = np.count_nonzero((weight > 0) & lung[box] & ~lesion_mask[box])
        # log-uniform draws must land near their target, not anywhere below `high`: a first lesion of
        # 5% would otherwise end a draw aimed at 0.2% (the graded draws keep their original rule)
        ceiling = min(high, 2 * share) if log_uniform else high
        if covered_voxels + new_voxels > max(ceiling * lung_voxels, target_voxels):
            scale *= 0.8
            continue
        covered_voxels += blend_lesion(hu, lung, lesion_mask, box, weight, target_hu)
    raise RuntimeError(f"no lesions covering {low:.2%}-{high:.2%} of the lung after {MAX_LESION_ATTEMPTS} attempts")


def draw_lesion_center(rng: np.random.Generator, parenchyma: np.ndarray, candidate_slices: np.ndarray) -> np.ndarray:
    """A parenchyma voxel (x, y, z): a slice first, then a pixel in it."""
    center_z = int(rng.choice(candidate_slices))
    pixels = np.flatnonzero(parenchyma[:, :, center_z])
    return np.array([*divmod(int(pixels[rng.integers(len(pixels))]), parenchyma.shape[1]), center_z])


def draw_lesion(rng: np.random.Generator, center: np.ndarray, shape: tuple[int, ...], spacing_mm: np.ndarray,
                lung_size_mm: float, scale: float = 1.0) -> tuple[tuple[slice, ...], np.ndarray, float]:
    """Draw one lesion's kind, density and size: its bounding box, blend weight in [0, 1] and peak HU."""
    ground_glass = rng.uniform() < 0.6
    target_hu = rng.uniform(*(GROUND_GLASS_HU_RANGE if ground_glass else CONSOLIDATION_HU_RANGE))
    core_fraction = rng.uniform(0.2, 0.5) if ground_glass else rng.uniform(0.5, 0.8)
    semi_axes_mm = np.maximum(scale * rng.uniform(0.2, 0.45) * lung_size_mm * rng.uniform(0.75, 1.25, size=3),
                              1e-3)  # a lesion shrunk this far is its centre voxel, not a division by zero
    half_width = np.ceil(semi_axes_mm / spacing_mm).astype(int)
    low, high = np.maximum(center - half_width, 0), np.minimum(center + half_width + 1, shape)
    offsets = [(np.arange(low[axis], high[axis]) - center[axis]) * spacing_mm[axis] / semi_axes_mm[axis]
               for axis in range(3)]
    radius = np.sqrt(offsets[0][:, None, None] ** 2 + offsets[1][None, :, None] ** 2
                     + offsets[2][None, None, :] ** 2)
    weight = np.clip((1 - radius) / (1 - core_fraction), 0, 1)
    weight = weight * weight * (3 - 2 * weight)  # smoothstep: no visible rim at the edge
    return tuple(slice(low[axis], high[axis]) for axis in range(3)), weight, target_hu


def blend_lesion(hu: np.ndarray, lung: np.ndarray, lesion_mask: np.ndarray, box: tuple[slice, ...],
                 weight: np.ndarray, target_hu: float) -> int:
    """Raise the lung inside `box` towards `target_hu` by `weight`, in place; return how many voxels it newly covers."""
    inside = (weight > 0) & lung[box]
    region = hu[box]
    region[inside] += (weight[inside] * np.maximum(target_hu - region[inside], 0)).astype(np.float32)
    newly_covered = np.count_nonzero(inside & ~lesion_mask[box])
    lesion_mask[box] |= inside
    return int(newly_covered)
