"""Load one NIfTI scan and turn it into a normalized, fixed-shape volume.

Everything here is a pure function of the file bytes and the options, so a scan gives the same
array in any process, on any worker, in any order. The steps follow the Keras tutorial (clip HU to
a window, scale to [0, 1], resize) with two corrections: the scan is first reoriented to one
canonical orientation (RAS) using its affine, and shrinking uses area averaging, because plain
linear zoom aliases fine lung texture when 512 pixels become 128.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from preprocess.resize import resize_axis, resize_volume  # noqa: F401 (resize_axis: part of this module's API)
from preprocess.scan_stats import ScanStats, StatsAccumulator

try:  # ISA-L inflates gzip about 2x faster than zlib, and inflating is most of a scan's cost.
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _zlib = zlib

CANONICAL_ORIENTATION = ("R", "A", "S")
RESAMPLE_METHOD = "area-average when shrinking, linear (half-voxel centres) when enlarging"

# A header is checked against these before any voxel is inflated or read, so a hostile header
# that claims 32767^3 voxels, or a gzip bomb, costs nothing. Real chest CT is at most about
# 1024 x 1024 x 2000 voxels; the total allows 512 x 512 x 2048.
MIN_VOXELS_PER_AXIS = 2
MAX_VOXELS_PER_AXIS = 4096
MAX_VOXELS_TOTAL = 512 * 512 * 2048
MAX_FILE_BYTES = 4 * 1024**3
HEADER_BYTES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # sizeof_hdr -> image class
GZIP_TRAILER_SLACK_BYTES = 1024 * 1024  # inflated past the voxels to reach the CRC check
SLAB_SLICES = 4  # 512 x 512 x 4 float32 is 4 MiB: a slab's work stays in the CPU cache


class ScanError(ValueError):
    """A file that cannot be read or is not a usable CT volume; the message is the reason."""


@dataclass(frozen=True)
class ScanInfo:
    """What the cache keeps about a scan's source besides its volume."""

    source_shape: tuple[int, int, int]  # as stored on disk
    spacing_mm: tuple[float, float, float]  # along the canonical axes
    sha256: str  # of the file bytes as stored (compressed or not)
    stats: ScanStats | None = None  # raw-HU statistics (`preprocess.scan_stats`), filled by `preprocess_scan`


def read_scan_bytes(path: Path) -> tuple[bytes, str]:
    """Return the uncompressed NIfTI bytes of `path` and the sha256 of the file as stored.

    A .nii.gz is inflated in two steps: the header first, which is checked, then no more than
    the voxel bytes that header promises, so a gzip bomb never gets to allocate its payload.
    """
    size = path.stat().st_size
    if size == 0:
        raise ScanError("empty file")
    if size > MAX_FILE_BYTES:
        raise ScanError(f"file of {size} bytes is larger than any CT volume")
    stored = path.read_bytes()
    digest = hashlib.sha256(stored).hexdigest()
    if stored[:2] != b"\x1f\x8b":
        return stored, digest
    inflater = _zlib.decompressobj(31)  # 31: a gzip header and trailer around deflate data
    try:
        head = inflater.decompress(stored, max(HEADER_BYTES))
        needed = check_header(read_header(head))
        body = inflater.decompress(inflater.unconsumed_tail, max(needed - len(head), 0))
        # a little further, to reach the end of the stream, where the CRC is checked
        inflater.decompress(inflater.unconsumed_tail, GZIP_TRAILER_SLACK_BYTES)
    except (OSError, EOFError, zlib.error, _zlib.error, ValueError) as error:
        if isinstance(error, ScanError):
            raise
        raise ScanError(f"corrupt or truncated gzip ({error})") from None
    if len(head) + len(body) < needed:
        what = "truncated voxel data" if inflater.eof else "truncated gzip"  # file or stream ended early
        raise ScanError(f"{what} ({len(head) + len(body)} of {needed} bytes)")
    return head + body, digest


def read_header(raw: bytes):
    """Parse the NIfTI-1 or NIfTI-2 header at the start of `raw` (no voxel is touched)."""
    if len(raw) < min(HEADER_BYTES):
        raise ScanError("not a NIfTI file (shorter than a NIfTI header)")
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    image_class = next((HEADER_BYTES[size] for size in sizes if size in HEADER_BYTES), None)
    if image_class is None or len(raw) < next(size for size in sizes if size in HEADER_BYTES):
        raise ScanError("not a NIfTI file (bad header size field)")
    try:
        return image_class.header_class.from_fileobj(_BytesReader(raw))
    except Exception as error:  # nibabel raises several types for broken headers
        raise ScanError(f"unreadable NIfTI header ({error})") from None


def parse_nifti(raw: bytes) -> nib.Nifti1Image:
    """Parse NIfTI-1 or NIfTI-2 bytes, refusing unusable headers before reading any voxel."""
    header = read_header(raw)
    needed = check_header(header)
    if needed > len(raw):
        raise ScanError(f"truncated voxel data ({len(raw)} of {needed} bytes)")
    image_class = HEADER_BYTES[int(header["sizeof_hdr"])]
    try:
        return image_class.from_bytes(raw)
    except Exception as error:
        raise ScanError(f"unreadable NIfTI data ({error})") from None


class _BytesReader:
    """The least file object nibabel's header parser needs, without copying `raw`."""

    def __init__(self, raw: bytes):
        self._view = memoryview(raw)
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._position + size
        chunk = bytes(self._view[self._position : end])
        self._position += len(chunk)
        return chunk


def check_header(header) -> int:
    """Refuse shapes that are not one 3-D volume of plausible size; return the bytes the file needs."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
    except Exception as error:
        raise ScanError(f"unreadable NIfTI dimensions ({error})") from None
    if len(shape) < 3:
        raise ScanError(f"{len(shape)}-D image {shape}, expected a 3-D CT volume")
    if any(n != 1 for n in shape[3:]):
        raise ScanError(f"{len(shape)}-D image {shape} holds several volumes, expected one")
    spatial = shape[:3]
    if any(n < 1 for n in spatial):
        raise ScanError(f"invalid dimensions {spatial} in the header")
    if any(n < MIN_VOXELS_PER_AXIS for n in spatial):
        raise ScanError(f"image {spatial} is too thin to be a CT volume")
    if any(n > MAX_VOXELS_PER_AXIS for n in spatial) or np.prod(spatial, dtype=np.int64) > MAX_VOXELS_TOTAL:
        raise ScanError(f"absurd dimensions {spatial} (at most {MAX_VOXELS_PER_AXIS} per axis)")
    try:
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as error:
        raise ScanError(f"unsupported voxel type ({error})") from None
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise ScanError(f"unsupported voxel type {dtype}")
    if not 0 <= offset <= MAX_FILE_BYTES:
        raise ScanError(f"invalid voxel offset {offset} in the header")
    return offset + int(np.prod(spatial, dtype=np.int64)) * dtype.itemsize


@dataclass(frozen=True)
class OpenedScan:
    """A scan's stored voxels seen in canonical RAS order (a view: nothing copied yet)."""

    stored: np.ndarray  # stored dtype, flipped / transposed view of the file's array
    slope: float
    intercept: float
    info: ScanInfo

    def hounsfield(self, depth: slice = slice(None)) -> np.ndarray:
        """float32 HU of the slices `depth` (all by default), as a new array."""
        # order="K" keeps the file's (Fortran) memory order: forcing C order here would be a
        # transposing copy that costs more than the whole resize
        hu = np.array(self.stored[:, :, depth], dtype=np.float32, order="K")
        if self.slope != 1:
            hu *= np.float32(self.slope)
        if self.intercept != 0:
            hu += np.float32(self.intercept)
        return hu


def open_scan(path: Path) -> OpenedScan:
    """Read and check a NIfTI file; its voxels stay in their stored type until asked for."""
    raw, digest = read_scan_bytes(path)
    image = parse_nifti(raw)
    stored = np.asanyarray(image.dataobj.get_unscaled())
    stored = stored.reshape(stored.shape[:3])
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():
        raise ScanError("NaN or infinite voxel values")
    slope, intercept = image.dataobj.slope, image.dataobj.inter
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise ScanError(f"unusable intensity scaling (scl_slope={slope}, scl_inter={intercept})")
    return canonical_scan(stored, image.affine, slope, intercept, digest)


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


def load_scan(path: Path) -> tuple[np.ndarray, ScanInfo]:
    """Read a NIfTI file as float32 Hounsfield units in canonical RAS orientation."""
    scan = open_scan(path)
    return scan.hounsfield(), scan.info


def window_volume(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip to [hu_min, hu_max] and scale to [0, 1], in place on a float32 array."""
    np.clip(hu, hu_min, hu_max, out=hu)
    hu -= np.float32(hu_min)
    hu *= np.float32(1.0 / (hu_max - hu_min))
    return hu


def open_any_scan(path: Path, series_files: tuple[Path, ...] = ()) -> OpenedScan:
    """A NIfTI file, or a DICOM series: its files if given, else the one series in folder `path`."""
    if not series_files and not Path(path).is_dir():
        return open_scan(Path(path))
    from preprocess.dicom import open_series, open_series_folder  # pydicom: only for DICOM

    return open_series(series_files) if series_files else open_series_folder(Path(path))


def preprocess_scan(
    path: Path, shape: tuple[int, int, int], hu_min: float, hu_max: float, series_files: tuple[Path, ...] = ()
) -> tuple[np.ndarray, ScanInfo]:
    """The whole per-scan transform: load, reorient, window, resize. Returns float32 in [0, 1], and the
    scan's info with its raw-HU statistics (`preprocess.scan_stats`), taken from the same slabs.

    `path` is a NIfTI file or a DICOM series folder; `series_files`, when given, are the series' files.

    Slices are windowed and resized in-plane a slab at a time, so the full-size float32 copy
    of the scan never exists: the working set stays in the CPU cache, which is what lets two
    workers share a memory bus. Each slice is resized on its own, so the result is the same
    as transforming the whole volume at once.
    """
    scan = open_any_scan(path, series_files)
    depth = scan.stored.shape[2]
    stats = StatsAccumulator(scan.stored.shape, scan.info.spacing_mm)
    slabs = []
    for start in range(0, depth, SLAB_SLICES):
        hu = scan.hounsfield(slice(start, start + SLAB_SLICES))
        stats.add(hu)  # before windowing changes it in place
        in_plane = (shape[0], shape[1], hu.shape[2])
        slabs.append(resize_volume(window_volume(hu, hu_min, hu_max), in_plane))
    volume = resize_volume(np.concatenate(slabs, axis=2), shape)
    np.clip(volume, 0.0, 1.0, out=volume)  # float rounding in the averages may step past 1
    return volume, replace(scan.info, stats=stats.result())
