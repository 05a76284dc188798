"""Find a scan's lungs by classical means, and the box that `build` crops each scan to.

A lesion covering 0.1-1% of the lung is a few voxels of a 64 x 64 x 32 volume when the volume
holds the whole field of view: table, air, arms and abdomen. Cropping each scan to its lungs'
box before the resize gives the lungs most of the voxels (docs/your-data.md, "The lung crop").

The method works on a subsampled copy of the raw Hounsfield units (at most `SAMPLES_PER_AXIS`
voxels in-plane, every slice), with scipy.ndimage only:

1. Low density: every voxel below `LOW_DENSITY_HU` (aerated lung, ground glass, airways, gas
   and the air around the body).
2. Its 3D connected components (6-connected).
3. A component is lung when its median HU lies in `LUNG_MEDIAN_HU` and its volume is at least
   `MIN_COMPONENT_ML`. Air, whether outside the body, in the bowel or under the table, is about
   -1000 HU through and through (median below -950); lung parenchyma is -900..-700 (median about
   -850 in a healthy adult, above -950 even in severe emphysema), because every lung voxel holds
   tissue, blood and vessels. A region with most of its voxels within `EDGE_BAND_MM` of an in-plane
   edge is air at the rim of the field of view (partial-volumed, so its median can look like lung)
   and is not lung. The rule does not drop a region because it touches the edge, so a
   heart-centred crop whose lungs run off the edges is still found, and it does not ask for two
   regions, so a scan with one lung is found too.
4. The box is the lung voxels' bounding box. With two lungs, its right-left extent grows to its
   mirror image about the body's midline (`mirrored_sides`): dense consolidation against one lateral
   chest wall is not below the threshold, and the other lung says where that wall is. Each side then
   grows by `MARGIN_FRACTION` of the box's extent on that axis (at least `MIN_MARGIN_MM`), clipped to
   the volume; the margin keeps what both sides lose, up to that share. tests/test_lungs.py checks
   that across graded phantoms of every grade no lesion voxel falls outside.

`chest_problems` is the rule for "a chest CT we can judge" that `build` and `predict` share:
lungs of at least `MIN_LUNG_ML` mL. A scan with less (an abdomen CT showing only the lung bases, a
head CT) is not judged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CROPS = ("lungs", "none")  # what a cached volume shows: its scan's lungs' box, or the whole scan
LOW_DENSITY_HU = -400.0  # below: air, gas, aerated lung and ground glass; above: soft tissue, bone
LUNG_MEDIAN_HU = (-950.0, -500.0)  # a lung component's median HU; air and gas sit below -950
MIN_COMPONENT_ML = 10.0  # smaller low-density regions are gas pockets, airway fragments or noise
MIN_LUNG_ML = 200.0  # a chest CT we can judge shows at least this much lung (adults: 4000-6000 mL)
MARGIN_FRACTION = 0.10  # each side of the box grows by this share of its extent
MIN_MARGIN_MM = 5.0
SAMPLES_PER_AXIS = 128  # in-plane sampling of the search (about 3 mm at a 512 x 512, 400 mm scan)
SIDE_SHARE = 0.15  # a side holding at least this share of the lung voxels counts as a lung
EDGE_BAND_MM = 10.0  # a region with most of its voxels this close to an in-plane edge is air at the edge
# recorded in the cache and a run's config: a change here means a rebuild
LUNG_METHOD = (f"HU < {LOW_DENSITY_HU:g} 3D components, median {LUNG_MEDIAN_HU[0]:g}..{LUNG_MEDIAN_HU[1]:g} HU, "
               f">= {MIN_COMPONENT_ML:g} mL, not within {EDGE_BAND_MM:g} mm of the edge; right-left mirrored; "
               f"margin {MARGIN_FRACTION:.0%} (>= {MIN_MARGIN_MM:g} mm)")


@dataclass(frozen=True)
class Lungs:
    """What the search found, in the canonical voxel grid of the whole scan."""

    box: tuple[int, int, int, int, int, int]  # (start, stop) along R, A, S: x0, x1, y0, y1, z0, z1; margin included
    volume_ml: float  # low-density lung volume (dense lesions inside it are not counted)
    count: int  # 0 (none found), 1 or 2: lungs told apart left and right of the mediastinum
    extent_mm: tuple[float, float, float]  # the lungs' own extent along R, A, S, before the margin

    @property
    def found(self) -> bool:
        return self.count > 0

    @property
    def box_shape(self) -> tuple[int, int, int]:
        x0, x1, y0, y1, z0, z1 = self.box
        return x1 - x0, y1 - y0, z1 - z0

    def slices(self) -> tuple[slice, slice, slice]:
        x0, x1, y0, y1, z0, z1 = self.box
        return slice(x0, x1), slice(y0, y1), slice(z0, z1)


def whole_volume(shape: tuple[int, int, int]) -> tuple[int, int, int, int, int, int]:
    return 0, int(shape[0]), 0, int(shape[1]), 0, int(shape[2])


def in_plane_stride(shape: tuple[int, ...]) -> int:
    return max(1, -(-max(shape[:2]) // SAMPLES_PER_AXIS))


def find_lungs(sampled_hu: np.ndarray, stride: int, shape: tuple[int, int, int],
               spacing_mm: tuple[float, float, float]) -> Lungs:
    """The lungs of a scan of `shape` voxels, from its HU sampled every `stride` voxels in-plane.

    `sampled_hu` is `hu[::stride, ::stride, :]` of the canonical (RAS) volume; the box returned is in
    the whole volume's voxels. No lungs: count 0, volume 0 and the whole volume as the box.
    """
    spacing = np.array([spacing_mm[0] * stride, spacing_mm[1] * stride, spacing_mm[2]], dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # a NIfTI's voxels are in Fortran order: work on their C-ordered transpose (a view, not a copy),
    # whose axes run S, A, R, and turn only the lung mask back
    transposed = sampled_hu.flags.f_contiguous and not sampled_hu.flags.c_contiguous
    ordered = sampled_hu.T if transposed else sampled_hu
    labels, count = ndimage.label(ordered < LOW_DENSITY_HU)
    if count == 0:
        return _none(shape)

    def voxels_per_label(where) -> np.ndarray:
        return np.bincount(labels[where], minlength=count + 1)

    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    band = [max(1, int(round(EDGE_BAND_MM / spacing[axis]))) for axis in range(2)]
    edge = np.ones(sampled_hu.shape[:2], dtype=bool)
    edge[band[0]:-band[0], band[1]:-band[1]] = False
    at_edge = np.bincount(labels[:, edge.T].ravel() if transposed else labels[edge].ravel(), minlength=count + 1)
    # the median is within LUNG_MEDIAN_HU when at most half the voxels lie below its low end and at
    # least half below its high end: two counts per label, no sort
    below_low = voxels_per_label(ordered < LUNG_MEDIAN_HU[0])
    below_high = voxels_per_label(ordered < LUNG_MEDIAN_HU[1])
    lung = ((sizes * voxel_ml >= MIN_COMPONENT_ML) & (at_edge <= 0.5 * sizes)
            & (2 * below_low <= sizes) & (2 * below_high >= sizes))
    lung[0] = False  # label 0: every voxel above the threshold
    if not lung.any():
        return _none(shape)
    mask = lung[labels].T if transposed else lung[labels]  # (R, A, S)
    volume_ml = float(np.count_nonzero(mask)) * voxel_ml
    lows, highs = [], []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
        lows.append(int(present[0]))
        highs.append(int(present[-1]) + 1)
    extent_mm = tuple(float((high - low) * spacing[axis]) for axis, (low, high) in enumerate(zip(lows, highs)))
    count = count_sides(mask)
    if count == 2:  # right and left mirror each other about the body's midline: see `mirrored_sides`
        lows[0], highs[0] = mirrored_sides(sampled_hu[:, :, lows[2]:highs[2]], lows[0], highs[0])
    box = []
    for axis in range(3):
        scale = stride if axis < 2 else 1
        start, stop = lows[axis] * scale, min(highs[axis] * scale, int(shape[axis]))
        margin_mm = max(MARGIN_FRACTION * extent_mm[axis], MIN_MARGIN_MM)
        margin = int(np.ceil(margin_mm / spacing_mm[axis]))
        box += [max(start - margin, 0), min(stop + margin, int(shape[axis]))]
    return Lungs(box=tuple(box), volume_ml=volume_ml, count=count, extent_mm=extent_mm)


def mirrored_sides(sampled_hu: np.ndarray, low: int, high: int) -> tuple[int, int]:
    """The lungs' right-left extent [low, high) widened to its mirror image about the body's midline.

    Consolidation against the lateral chest wall is soft-tissue dense, so the threshold loses it and
    the aerated lung ends short of the wall. The other lung still reaches its wall: mirrored, it says
    where this one's wall is. (The midline is the middle of the tissue's right-left extent in the
    lungs' slices.) The margin then covers what both sides lose.
    """
    tissue = np.flatnonzero((sampled_hu > LOW_DENSITY_HU).any(axis=(1, 2)))
    if tissue.size == 0:
        return low, high
    doubled_centre = int(tissue[0]) + int(tissue[-1]) + 1  # twice the midline, in voxel edges
    return max(min(low, doubled_centre - high), 0), min(max(high, doubled_centre - low), sampled_hu.shape[0])


def count_sides(mask: np.ndarray) -> int:
    """1 or 2: whether the lung voxels lie on one side of the mediastinum or on both.

    In the axial slices where the lungs are largest, a slice with two separate regions, each at
    least `SIDE_SHARE` of that slice's lung, shows two lungs. (Lungs touching in front of the
    heart make one region in some slices, not in all of the largest ones.)
    """
    areas = mask.sum(axis=(0, 1))
    largest = np.argsort(areas)[::-1][:5]
    for z in largest:
        if areas[z] == 0:
            continue
        labels, count = ndimage.label(mask[:, :, z])
        if count >= 2:
            shares = np.sort(ndimage.sum_labels(mask[:, :, z], labels, np.arange(1, count + 1)))[::-1] / areas[z]
            if shares[1] >= SIDE_SHARE:
                return 2
    return 1


def _none(shape) -> Lungs:
    return Lungs(box=whole_volume(shape), volume_ml=0.0, count=0, extent_mm=(0.0, 0.0, 0.0))


def chest_problems(volume_ml: float | None, extent_mm: tuple[float, float, float] | None = None) -> list[str]:
    """Why this scan is not a chest CT we can judge, from its lungs (none: it is). `None`: not searched."""
    if volume_ml is None:
        return []
    if volume_ml <= 0:
        return ["no lungs found (no region of lung density, -950 to -500 HU, of at least "
                f"{MIN_COMPONENT_ML:g} mL): not a chest CT"]
    if volume_ml < MIN_LUNG_ML:
        head_foot = f" over {extent_mm[2]:.0f} mm head to foot" if extent_mm else ""
        return [f"only {volume_ml:.0f} mL of lung{head_foot}; a chest CT we can judge shows at least "
                f"{MIN_LUNG_ML:g} mL (an abdomen CT with the lung bases at its edge?)"]
    return []


def describe_region(crop: str, box: tuple[int, ...] | None, scan_shape: tuple[int, int, int] | None) -> str:
    """What a volume shows, in one line (`show`, Grad-CAM's title): the lungs' box in the scan's voxels,
    (start-stop along each canonical RAS axis of the scan of `scan_shape`, RAS order), or the whole scan."""
    if crop != "lungs" or box is None:
        return "the whole scan (no lung crop)"
    x0, x1, y0, y1, z0, z1 = box
    shape = "" if scan_shape is None else f" of the scan's {' x '.join(map(str, scan_shape))} (RAS)"
    return f"the lungs' box, voxels {x0}-{x1} left-right, {y0}-{y1} front-back, {z0}-{z1} head-foot{shape}"
