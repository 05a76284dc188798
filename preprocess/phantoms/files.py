"""The phantoms' files: gzipped NIfTI whose bytes depend only on the array, written atomically."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.files import replace_atomically

try:  # ISA-L deflates several times faster than zlib, and compression is most of a write
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a declared dependency
    import gzip as _gzip

GZIP_LEVEL = 1  # 512 x 512 x 60 int16 is 31 MB: the fastest level costs only ~10% more bytes


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header.set_xyzt_units("mm", "sec")
    # mtime=0: gzip headers otherwise carry the time of writing and no two runs would match
    data = _gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return  # unchanged: keep the file's mtime, so an incremental build sees nothing new
    # through a dot-named temporary file, never taken for a scan: a killed run leaves nothing half written
    replace_atomically(path, lambda temporary: temporary.write_bytes(data))
