"""The NIfTI reader: a .nii or .nii.gz file, checked before any voxel is read, as a canonical scan.

The header is parsed and checked first (`check_header`): a hostile header that claims 32767^3
voxels, or a gzip bomb, costs nothing, because a .nii.gz is inflated no further than the voxel
bytes its header promises.
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocess.reading.canonical import (
    MAX_FILE_BYTES, MAX_VOXELS_PER_AXIS, MAX_VOXELS_TOTAL, MIN_VOXELS_PER_AXIS, OpenedScan, ScanError, ScanInfo,
    canonical_scan,
)

try:  # ISA-L inflates gzip about 2x faster than zlib, and inflating is most of a scan's cost.
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _zlib = zlib

HEADER_BYTES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # sizeof_hdr -> image class
GZIP_TRAILER_SLACK_BYTES = 1024 * 1024  # inflated past the voxels to reach the CRC check


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


def load_scan(path: Path) -> tuple[np.ndarray, ScanInfo]:
    """Read a NIfTI file as float32 Hounsfield units in canonical RAS orientation."""
    scan = open_scan(path)
    return scan.hounsfield(), scan.info
