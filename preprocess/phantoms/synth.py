"""Write deterministic synthetic chest-CT phantoms in the MosMedData folder layout.

The demo and the tests run offline on these. A phantom is a normal anatomy (air, scanner table,
body with subcutaneous fat, ribs, a vertebra, two lungs with vessels, scanner noise) drawn from
one random stream; an abnormal phantom is that same anatomy with ground-glass opacities and
consolidations drawn from a second stream and blended into the lungs before the noise is added.
So the lesions are the only thing that tells the classes apart, voxel for voxel.

Abnormal phantoms are ungraded by default: 2-8 lesions of any extent, written to CT-1 (the files the
demo and the tests were built on). Given a severity grade, lesions are instead added one at a time
until the lesion share of the lung falls inside that grade's range, as MosMedData grades CT-1..CT-4.
Given an involvement range instead (`--involvement 0.1 1`, in percent of the lung), the share is
drawn log-uniformly inside it, and the scans go to the grade folder that holds the range: small
findings, like the mild CT-1 scans that are most of MosMedData, down to 0.1% of the lung.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from preprocess.phantoms.lesions import (
    GRADE_INVOLVEMENT_RANGES, HU_LUNG, add_graded_lesions, add_lesions, add_lesions_covering, check_involvement,
)
from preprocess.finding.sources import find_sources
from preprocess.phantoms.files import write_nifti


log = logging.getLogger(__name__)

CLASS_FOLDERS = ("CT-0", "CT-1")  # normal, abnormal, as in MosMedData
FIELD_OF_VIEW_MM = 350.0  # in-plane spacing is FIELD_OF_VIEW_MM / size
THORAX_LENGTH_MM = 300.0  # slice spacing is THORAX_LENGTH_MM / slice count
HU_AIR, HU_FAT, HU_SOFT_TISSUE, HU_VESSEL = -1000.0, -100.0, 40.0, 40.0
STORED_HU_RANGE = (-1024, 3071)  # what a 12-bit scanner stores
MAX_SLICES = 4096  # the loader refuses longer axes
MAX_SCANS = 100_000  # a synthetic archive this large is a typo, not a plan


@dataclass(frozen=True)
class Phantom:
    """One synthetic scan and where its lesions are."""

    hu: np.ndarray  # int16 (X, Y, Z) Hounsfield units in the stored (RAS) orientation
    affine: np.ndarray  # 4x4 float64, voxel index to millimetres
    lesion_mask: np.ndarray  # bool (X, Y, Z): every voxel a lesion changed; all False if normal
    lung_mask: np.ndarray  # bool (X, Y, Z): the lungs, lesions included; involvement is measured on it

    @property
    def involvement(self) -> float:
        """The share of lung voxels a lesion touches (0 for a normal phantom)."""
        return float(np.count_nonzero(self.lesion_mask) / max(np.count_nonzero(self.lung_mask), 1))


def default_slice_range(size: int) -> tuple[int, int]:
    """The inclusive range slice counts are drawn from: 30..60 at 512, scaled down for small sizes."""
    low = max(8, round(30 * size / 512))
    return low, max(low + 4, round(60 * size / 512))


def check_phantom_arguments(size: int, slice_range: tuple[int, int] | None) -> None:
    """Refuse a size or slice range that cannot make a plausible volume, in one line."""
    if not 16 <= size <= 1024:
        raise UserError(f"size must be between 16 and 1024 pixels, got {size}")
    if slice_range is not None:
        low, high = slice_range
        if not 2 <= low <= high <= MAX_SLICES:
            raise UserError(f"slice range must satisfy 2 <= MIN <= MAX <= {MAX_SLICES}, got {low} {high}")


def check_grades(grades: tuple[int, ...]) -> None:
    """Refuse grades outside 1..4 or given twice, in one line."""
    valid = sorted(GRADE_INVOLVEMENT_RANGES)
    if not grades or any(grade not in GRADE_INVOLVEMENT_RANGES for grade in grades) or len(set(grades)) < len(grades):
        raise UserError(f"grades must be distinct numbers from {valid[0]} to {valid[-1]} (CT-1 .. CT-4), "
                        f"got {' '.join(map(str, grades)) or 'none'}")


def make_phantom(seed: int, study_number: int, abnormal: bool, size: int = 512,
                 slice_range: tuple[int, int] | None = None, grade: int | None = None,
                 involvement: tuple[float, float] | None = None) -> Phantom:
    """Draw one phantom. (seed, study_number, abnormal, size, slice_range, grade, involvement) alone fix it.

    `grade` (1-4, abnormal only) puts the lesion share of the lung inside that grade's range;
    `involvement` (low, high), fractions of the lung, draws the share log-uniformly inside that range
    instead; None for both draws the ungraded lesions of the default archive.
    """
    if involvement is not None:
        if grade is not None:
            raise ValueError("give a grade or an involvement range, not both")
        check_involvement(involvement)
        if not abnormal:
            raise ValueError("a normal phantom has no lesions")
    check_phantom_arguments(size, slice_range)
    if grade is not None:
        check_grades((grade,))
        if not abnormal:
            raise ValueError("a normal phantom has no lesions to grade")
    anatomy_seed, lesion_seed = np.random.SeedSequence([seed, study_number]).spawn(2)
    anatomy_rng, lesion_rng = np.random.default_rng(anatomy_seed), np.random.default_rng(lesion_seed)
    low, high = slice_range or default_slice_range(size)
    slice_count = int(anatomy_rng.integers(low, high + 1))
    spacing_mm = np.array([FIELD_OF_VIEW_MM / size, FIELD_OF_VIEW_MM / size, THORAX_LENGTH_MM / slice_count])
    hu, lung, lung_size_mm = draw_anatomy(anatomy_rng, size, slice_count, spacing_mm)
    # noise comes from the anatomy stream after every shape, so lesions cannot shift it
    noise_sigma_hu = anatomy_rng.uniform(15, 25)
    noise = anatomy_rng.standard_normal(hu.shape, dtype=np.float32)
    if abnormal and involvement is not None:
        lesion_mask = add_lesions_covering(hu, lung, lesion_rng, spacing_mm, lung_size_mm, involvement, log_uniform=True)
    elif abnormal and grade is not None:
        lesion_mask = add_graded_lesions(hu, lung, lesion_rng, spacing_mm, lung_size_mm, grade)
    elif abnormal:
        lesion_mask = add_lesions(hu, lung, lesion_rng, spacing_mm, lung_size_mm)
    else:
        lesion_mask = np.zeros(hu.shape, dtype=bool)
    noise *= np.float32(noise_sigma_hu)
    hu += noise
    np.rint(hu, out=hu)
    np.clip(hu, *STORED_HU_RANGE, out=hu)
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = -(np.array(hu.shape) - 1) / 2 * spacing_mm  # the isocentre mid-volume
    return Phantom(hu=hu.astype(np.int16), affine=affine, lesion_mask=lesion_mask, lung_mask=lung)


def ellipse_radius_squared(x_mm, y_mm, center_x_mm, center_y_mm, semi_x_mm, semi_y_mm) -> np.ndarray:
    """((x - cx) / a)^2 + ((y - cy) / b)^2 on the grid: below 1 inside the ellipse."""
    return ((x_mm - center_x_mm) / semi_x_mm) ** 2 + ((y_mm - center_y_mm) / semi_y_mm) ** 2


def draw_anatomy(rng: np.random.Generator, size: int, slice_count: int,
                 spacing_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Noise-free float32 HU of a normal chest, its lung mask and the mean lung diameter in mm.

    x runs to the patient's right, y to anterior, z to superior; the patient lies supine on the table.
    """
    axis_mm = (np.arange(size) - (size - 1) / 2) * spacing_mm[0]
    x_mm, y_mm = axis_mm[:, None], axis_mm[None, :]
    z_fraction = (np.arange(slice_count) + 0.5) / slice_count
    body_semi_x_mm, body_semi_y_mm = rng.uniform(135, 160), rng.uniform(95, 120)
    center_x_mm, center_y_mm = rng.uniform(-8, 8), rng.uniform(10, 20)
    fat_mm = rng.uniform(8, 20)
    inner_semi_x_mm, inner_semi_y_mm = body_semi_x_mm - fat_mm, body_semi_y_mm - fat_mm
    hu = np.full((size, size, slice_count), HU_AIR, dtype=np.float32)

    table_top_mm = center_y_mm - body_semi_y_mm - rng.uniform(15, 30)  # an air gap under the back
    table_bottom_mm = table_top_mm - rng.uniform(15, 25)
    table = (y_mm <= table_top_mm) & (y_mm > table_bottom_mm) & (np.abs(x_mm) < 0.42 * FIELD_OF_VIEW_MM)
    hu[table] = rng.uniform(100, 300)
    hu[ellipse_radius_squared(x_mm, y_mm, center_x_mm, center_y_mm, body_semi_x_mm, body_semi_y_mm) < 1] = HU_FAT
    inner_radius_squared = ellipse_radius_squared(x_mm, y_mm, center_x_mm, center_y_mm,
                                                  inner_semi_x_mm, inner_semi_y_mm)
    hu[inner_radius_squared < 1] = HU_SOFT_TISSUE

    # lungs shrink towards apex and base; the widest slice sits a little below the middle
    peak, width = rng.uniform(0.4, 0.55), rng.uniform(0.55, 0.7)
    lung_scale = np.clip(1 - ((z_fraction - peak) / width) ** 2, 0.3, 1)
    lung = np.zeros(hu.shape, dtype=bool)
    lung_diameters_mm = []
    for side in (-1, 1):
        lung_x_mm = center_x_mm + side * 0.47 * inner_semi_x_mm * rng.uniform(0.97, 1.03)
        lung_y_mm = center_y_mm + rng.uniform(-0.03, 0.03) * inner_semi_y_mm
        semi_x_mm = 0.34 * inner_semi_x_mm * rng.uniform(0.92, 1.06)
        semi_y_mm = 0.64 * inner_semi_y_mm * rng.uniform(0.92, 1.06)
        radius_squared = ellipse_radius_squared(x_mm, y_mm, lung_x_mm, lung_y_mm, semi_x_mm, semi_y_mm)
        this_lung = radius_squared[:, :, None] < lung_scale**2
        hu[this_lung] = HU_LUNG
        lung |= this_lung
        lung_diameters_mm.append(semi_x_mm + semi_y_mm)
        for _ in range(rng.integers(4, 9)):  # vessels: tubes that keep their place in the shrinking lung
            along_radius, angle = 0.6 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            vessel_x_mm = lung_x_mm + along_radius * np.cos(angle) * semi_x_mm * lung_scale
            vessel_y_mm = lung_y_mm + along_radius * np.sin(angle) * semi_y_mm * lung_scale
            paint_tube(hu, lung, axis_mm, vessel_x_mm, vessel_y_mm, rng.uniform(1.5, 4), HU_VESSEL)

    # ribs: a dashed ring just inside the fat whose gaps turn with z, as sloping ribs do
    ring = (inner_radius_squared < 1) & (inner_radius_squared >= 0.93**2)
    ring_x, ring_y = np.nonzero(ring)
    angle = np.arctan2((axis_mm[ring_y] - center_y_mm) / inner_semi_y_mm,
                       (axis_mm[ring_x] - center_x_mm) / inner_semi_x_mm)
    z_mm = np.arange(slice_count) * spacing_mm[2]
    rib_phase = rng.uniform(0, 2 * np.pi) + rng.uniform(0.01, 0.03) * z_mm
    on_rib = np.cos(rng.integers(14, 19) * angle[:, None] + rib_phase[None, :]) > 0.2
    hu[ring_x, ring_y, :] = np.where(on_rib, rng.uniform(500, 900), hu[ring_x, ring_y, :])
    vertebra_radius_mm = rng.uniform(14, 19)
    vertebra_y_mm = center_y_mm - inner_semi_y_mm + 1.3 * vertebra_radius_mm
    vertebra = ellipse_radius_squared(x_mm, y_mm, center_x_mm, vertebra_y_mm,
                                      vertebra_radius_mm, vertebra_radius_mm)
    hu[vertebra < 1] = rng.uniform(800, 1000)  # cortex
    hu[vertebra < 0.75**2] = rng.uniform(300, 450)  # cancellous bone
    lung &= hu < HU_VESSEL + 1  # bone drawn over a lung edge is no longer lung
    return hu, lung, float(np.mean(lung_diameters_mm))


def paint_tube(hu: np.ndarray, lung: np.ndarray, axis_mm: np.ndarray, center_x_mm: np.ndarray,
               center_y_mm: np.ndarray, radius_mm: float, value_hu: float) -> None:
    """Set `value_hu` inside the lung where a tube with per-slice centres passes, on its bounding box only."""
    spacing_mm = axis_mm[1] - axis_mm[0]
    margin_mm = [-radius_mm, radius_mm + spacing_mm]
    low_x, high_x = np.searchsorted(axis_mm, np.array([center_x_mm.min(), center_x_mm.max()]) + margin_mm)
    low_y, high_y = np.searchsorted(axis_mm, np.array([center_y_mm.min(), center_y_mm.max()]) + margin_mm)
    inside = ((axis_mm[low_x:high_x, None, None] - center_x_mm) ** 2
              + (axis_mm[None, low_y:high_y, None] - center_y_mm) ** 2) < radius_mm**2
    box = (slice(low_x, high_x), slice(low_y, high_y))
    hu[box][inside & lung[box]] = value_hu


def write_phantom(phantom: Phantom, path: Path, mask_path: Path | None = None) -> None:
    """Write an int16 .nii.gz whose bytes depend only on the phantom, and its lesion mask (uint8, 1 in
    a lesion, on the same grid) to `mask_path` if given; each file is replaced atomically."""
    write_nifti(phantom.hu, phantom.affine, path)
    if mask_path is not None:
        write_nifti(phantom.lesion_mask.astype(np.uint8), phantom.affine, mask_path)


def class_folder(abnormal: bool, grade: int | None) -> str:
    """CT-0 for a normal study, CT-<grade> for a graded abnormal one, CT-1 for an ungraded one."""
    if not abnormal:
        return CLASS_FOLDERS[0]
    return CLASS_FOLDERS[1] if grade is None else f"CT-{grade}"


def write_synthetic_archive(out_dir: Path, normal: int, abnormal: int, size: int = 512, seed: int = 0,
                            slice_range: tuple[int, int] | None = None, progress: bool = True,
                            grades: tuple[int, ...] | None = None,
                            involvement: tuple[float, float] | None = None, masks: bool = False) -> list[Path]:
    """Write `normal` phantoms to OUT/CT-0 and `abnormal` ones to OUT/CT-1 and return their paths.

    With `grades`, abnormal studies go round robin to OUT/CT-<grade>, their lesions covering that
    grade's share of the lung; with `involvement` (low, high), fractions of the lung, their lesions cover a
    share drawn log-uniformly in that range, and they go to the folder of the grade holding it;
    with neither, they are ungraded and all in CT-1. With `masks`, each abnormal study's lesion mask goes to
    OUT/masks/study_NNNN_mask.nii.gz, as MosMedData ships its masks (`preprocess.finding.masks`).
    Study numbers run across the archive: normal studies are study_0000 .. normal-1 and abnormal
    ones continue from `normal`. Refuses a folder holding other scans, which would mix archives.
    tqdm progress bar unless progress=False.
    """
    if normal < 0 or abnormal < 0 or normal + abnormal == 0:
        raise UserError(f"need at least one scan and no negative counts, got normal={normal} abnormal={abnormal}")
    if normal + abnormal > MAX_SCANS:
        raise UserError(f"at most {MAX_SCANS} synthetic scans at a time, got {normal + abnormal}")
    if seed < 0:
        raise UserError(f"seed must be 0 or more, got {seed}")
    check_phantom_arguments(size, slice_range)
    if grades is not None:
        grades = tuple(grades)
        check_grades(grades)
    if involvement is not None:
        if grades is not None:
            raise UserError("--grades and --involvement both set the lesions' extent: give one")
        grades = (check_involvement(tuple(involvement)),)
    out_dir = Path(out_dir)
    studies = [(number, False, None) for number in range(normal)]
    studies += [(normal + index, True, grades[index % len(grades)] if grades else None) for index in range(abnormal)]
    paths = [out_dir / class_folder(is_abnormal, grade) / f"study_{number:04d}.nii.gz"
             for number, is_abnormal, grade in studies]
    existing = []
    if out_dir.is_dir():
        try:
            sources, refused = find_sources(out_dir)
            existing = [source.path for source in sources] + [path for path, _ in refused]
        except UserError:  # a folder without scans is fine to write into
            pass
    foreign = sorted(set(existing) - set(paths))
    if foreign:
        raise UserError(f"{out_dir} already holds {len(foreign)} scans this archive would not write "
                        f"(e.g. {foreign[0]}); use an empty folder")
    try:
        for folder in sorted({path.parent for path in paths} | ({out_dir / "masks"} if masks else set())):
            folder.mkdir(parents=True, exist_ok=True)
        bar = tqdm(paths, desc="synth", unit="scan", disable=not progress)
        for path, (number, is_abnormal, grade) in zip(bar, studies):
            if involvement is not None and is_abnormal:
                phantom = make_phantom(seed, number, True, size, slice_range, None, tuple(involvement))
            else:
                phantom = make_phantom(seed, number, is_abnormal, size, slice_range, grade)
            write_phantom(phantom, path, out_dir / "masks" / f"study_{number:04d}_mask.nii.gz"
                          if masks and is_abnormal else None)
    except OSError as error:
        raise UserError(f"cannot write into {out_dir}: {error.strerror or error}") from None
    extent = ("ungraded" if grades is None else "grades " + " ".join(map(str, grades))) if involvement is None \
        else f"{100 * involvement[0]:g}-{100 * involvement[1]:g}% of the lung"
    log.info("wrote %d normal and %d abnormal (%s) synthetic scans of %d x %d to %s", normal, abnormal, extent,
             size, size, out_dir)
    return paths
