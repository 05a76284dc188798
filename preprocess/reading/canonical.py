"""A scan in the one form every reader ends in: its stored voxels seen in canonical RAS order.

Each format's reader (`preprocess.reading.nifti`, `preprocess.reading.dicom`) checks its file,
then hands its stored array and its RAS affine to `canonical_scan`, so the same anatomy stored
either way gives the same array. `ScanError` is the one exception a reader raises for a file
that cannot be used; its message is the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations

from preprocess.reading.scan_stats import ScanStats

CANONICAL_ORIENTATION = ("R", "A", "S")

# A header is checked against these before any voxel is inflated or read, so a hostile header
# that claims 32767^3 voxels, or a gzip bomb, costs nothing. Real chest CT is at most about
# 1024 x 1024 x 2000 voxels; the total allows 512 x 512 x 2048.
MIN_VOXELS_PER_AXIS = 2
MAX_VOXELS_PER_AXIS = 4096
MAX_VOXELS_TOTAL = 512 * 512 * 2048
MAX_FILE_BYTES = 4 * 1024**3


class ScanError(ValueError):
    """A file that cannot be read or is not a usable CT volume; the message is the reason."""


@dataclass(frozen=True)
class ScanInfo:
    """What the cache keeps about a scan's source besides its volume."""

    source_shape: tuple[int, int, int]  # as stored on disk
    spacing_mm: tuple[float, float, float]  # along the canonical axes
    sha256: str  # of the file bytes as stored (compressed or not)
    stats: ScanStats | None = None  # raw-HU statistics (`preprocess.reading.scan_stats`), filled by `preprocess.reading.transform.preprocess_scan`
    lesion_mask: np.ndarray | None = None  # uint8 at the volume's shape: 255 x the lesion share of each voxel, given a mask
    lesion_mask_sha256: str = ""  # of that mask file's bytes


@dataclass(frozen=True)
class OpenedScan:
    """A scan's stored voxels seen in canonical RAS order (a view: nothing copied yet)."""

    stored: np.ndarray  # stored dtype, flipped / transposed view of the file's array
    slope: float
    intercept: float
    info: ScanInfo

    def hounsfield(self, depth: slice = slice(None), stride: int = 1) -> np.ndarray:
        """float32 HU of the slices `depth` (all by default), every `stride`-th voxel in-plane, as a new array."""
        # order="K" keeps the file's (Fortran) memory order: forcing C order here would be a
        # transposing copy that costs more than the whole resize
        hu = np.array(self.stored[::stride, ::stride, depth], dtype=np.float32, order="K")
        if self.slope != 1:
            hu *= np.float32(self.slope)
        if self.intercept != 0:
            hu += np.float32(self.intercept)
        return hu


def canonical_scan(stored: np.ndarray, affine: np.ndarray, slope: float, intercept: float,
                   digest: str) -> OpenedScan:
    """A stored (i, j, k) array and its RAS affine, seen in canonical RAS order: NIfTI and DICOM alike."""
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError("degenerate affine (orientation cannot be determined)")
    stored_orientation = orientations.io_orientation(affine)
    if np.isnan(stored_orientation).any():  # columns too oblique or too alike to name an axis each
        raise ScanError("degenerate affine (orientation cannot be determined)")
    transform = orientations.ornt_transform(stored_orientation, orientations.axcodes2ornt(CANONICAL_ORIENTATION))
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    spacing[transform[:, 0].astype(int)] = voxel_sizes
    info = ScanInfo(
        source_shape=tuple(int(n) for n in stored.shape),
        spacing_mm=tuple(float(value) for value in spacing),
        sha256=digest,
    )
    return OpenedScan(orientations.apply_orientation(stored, transform), float(slope), float(intercept), info)
