"""Read one DICOM CT series (pydicom) into the canonical array every reader ends in (`preprocess.reading.canonical`).

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on
the cross product of the ImageOrientationPatient vectors), never by file name or
InstanceNumber. RescaleSlope and RescaleIntercept give Hounsfield units. The series' geometry
gives a RAS affine (DICOM's patient axes are LPS), and from there `volume.canonical_scan`
reorients exactly as it does a NIfTI file, so the same anatomy stored either way gives the same
array. Every way a series can be unusable raises `ScanError` with the reason in one line.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom

from preprocess.finding.series import find_folder_series
from preprocess.reading.canonical import (
    MAX_FILE_BYTES, MAX_VOXELS_PER_AXIS, MAX_VOXELS_TOTAL, MIN_VOXELS_PER_AXIS, OpenedScan, ScanError, canonical_scan,
)

SPACING_TOLERANCE = 0.02  # a step more than 2% off the median slice spacing is uneven (or a gap)
DUPLICATE_MM = 1e-3  # two slices closer than this along the normal hold the same position
TILT_TOLERANCE_DEGREES = 0.1  # slice positions off the normal by more than this: a tilted gantry
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# compressed transfer syntaxes pydicom decodes only with a plugin, and the plugin to install
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}


def open_series_folder(folder: Path) -> OpenedScan:
    """The one DICOM series below `folder` (predict's SCAN), refused if there is none or several."""
    series, refused = find_folder_series(folder)
    if not series:
        if refused:
            path, problem = refused[0]
            raise ScanError(f"{path.name}: {problem}")
        raise ScanError("no DICOM series in this folder (and it is not a NIfTI file)")
    if len(series) > 1:
        raise ScanError(f"{len(series)} DICOM series in this folder ({', '.join(s.uid for s in series)}): "
                        "give the folder of one series")
    return open_series(series[0].files)


def open_series(files) -> OpenedScan:
    """Read, check and stack a series' files; voxels stay in their stored type when the scaling allows."""
    files = sorted(Path(path) for path in files)
    digest = hashlib.sha256()
    slices = []
    for path in files:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ScanError(f"{path.name}: file of {size} bytes is larger than any CT slice")
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        slices.append((path.name, read_dataset(path.name, data)))
    if not slices:
        raise ScanError("no DICOM slices")
    check_series(slices)
    geometry = slice_geometry(slices)
    order = np.argsort(geometry["positions"], kind="stable")
    check_spacing(geometry["positions"][order])
    rows, columns = int(slices[0][1].Rows), int(slices[0][1].Columns)
    check_size(rows, columns, len(slices))
    scalings = [scaling(name, dataset) for name, dataset in slices]
    same_scaling = len(set(scalings)) == 1
    stack = None
    for index, position in enumerate(order):
        name, dataset = slices[position]
        pixels = decode_pixels(name, dataset, rows, columns)
        if not same_scaling:
            pixels = pixels.astype(np.float32) * np.float32(scalings[position][0]) + np.float32(scalings[position][1])
        if stack is None:
            stack = np.empty((len(slices), rows, columns), dtype=pixels.dtype)
        stack[index] = pixels
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise ScanError("NaN or infinite voxel values")
    slope, intercept = scalings[0] if same_scaling else (1.0, 0.0)
    affine = series_affine(geometry, order)
    # (slice, row, column) in memory is (column, row, slice) seen transposed: NIfTI's own layout
    return canonical_scan(stack.transpose(2, 1, 0), affine, slope, intercept, digest.hexdigest())


def read_dataset(name: str, data: bytes):
    """The whole dataset of one file, or one line saying why it is not a DICOM image."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        uid = dataset.get("SeriesInstanceUID")
    except Exception as error:  # truncated or foreign bytes break the parser in many ways
        raise ScanError(f"{name}: not a readable DICOM file ({type(error).__name__}: {error})") from None
    if not uid:
        has_marker = data[128:132] == b"DICM"
        raise ScanError(f"{name}: {'truncated or incomplete DICOM header' if has_marker else 'not a DICOM image'} "
                        "(no SeriesInstanceUID)")
    return dataset


def check_series(slices) -> None:
    """Refuse series that are not one CT volume made of same-sized single-frame images."""
    for name, dataset in slices:
        modality = str(dataset.get("Modality", "") or "").strip()
        if modality != "CT":
            raise ScanError(f"modality {modality or 'missing'}, not CT ({name})")
        if not any(keyword in dataset for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ScanError(f"no pixel data ({name})")
        if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
            raise ScanError(f"multi-frame DICOM ({name}) is not supported: export one file per slice")
    sizes: dict[tuple, int] = {}
    for name, dataset in slices:
        key = (dataset.get("Rows"), dataset.get("Columns"))
        sizes[key] = sizes.get(key, 0) + 1
    if len(sizes) > 1:
        described = ", ".join(f"{count} of {rows}x{columns}" for (rows, columns), count in sizes.items())
        raise ScanError(f"mixed image sizes within the series (slices: {described})")


def slice_geometry(slices) -> dict:
    """Each slice's position along the normal, and the shared in-plane axes and spacing (LPS)."""
    try:
        orientations = np.array([[float(v) for v in dataset.ImageOrientationPatient] for _, dataset in slices])
        origins = np.array([[float(v) for v in dataset.ImagePositionPatient] for _, dataset in slices])
        spacing = np.array([float(v) for v in slices[0][1].PixelSpacing])
    except Exception as error:
        raise ScanError(f"no usable geometry (ImageOrientationPatient, ImagePositionPatient, PixelSpacing: "
                        f"{type(error).__name__}: {error})") from None
    if orientations.shape[1:] != (6,) or origins.shape[1:] != (3,) or spacing.shape != (2,):
        raise ScanError("no usable geometry (wrong number of values in ImageOrientationPatient, "
                        "ImagePositionPatient or PixelSpacing)")
    if not (np.isfinite(orientations).all() and np.isfinite(origins).all() and np.isfinite(spacing).all()):
        raise ScanError("no usable geometry (non-finite values)")
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise ScanError("mixed slice orientations within the series")
    row_axis, column_axis = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_axis, column_axis)
    if not (0.99 < np.linalg.norm(row_axis) < 1.01 and 0.99 < np.linalg.norm(column_axis) < 1.01
            and np.linalg.norm(normal) > 0.99) or (spacing <= 0).any():
        raise ScanError("no usable geometry (ImageOrientationPatient is not two unit vectors at right angles, "
                        "or PixelSpacing is not positive)")
    return {"row_axis": row_axis, "column_axis": column_axis, "normal": normal, "spacing": spacing,
            "origins": origins, "positions": origins @ normal}


def check_spacing(positions: np.ndarray) -> None:
    """Refuse duplicate slices, missing slices and uneven spacing, saying which."""
    if len(positions) < MIN_VOXELS_PER_AXIS:
        raise ScanError(f"{len(positions)} slice(s): too thin to be a CT volume")
    steps = np.diff(positions)
    duplicates = np.flatnonzero(steps < DUPLICATE_MM)
    if duplicates.size:
        raise ScanError(f"duplicate slices: {duplicates.size} slice(s) repeat the position of another "
                        f"(first at {positions[duplicates[0]]:.2f} mm along the normal)")
    spacing = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - spacing) > SPACING_TOLERANCE * spacing)
    if not off.size:
        return
    multiples = steps[off] / spacing
    gaps = off[(np.abs(multiples - np.round(multiples)) < SPACING_TOLERANCE) & (np.round(multiples) >= 2)]
    if gaps.size == off.size:
        missing = int(np.round(steps[gaps] / spacing).sum() - gaps.size)
        raise ScanError(f"missing slices: {missing} missing in {gaps.size} gap(s), the first of "
                        f"{steps[gaps[0]]:.2f} mm after {positions[gaps[0]]:.2f} mm where slices are "
                        f"{spacing:.2f} mm apart")
    raise ScanError(f"uneven slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm "
                    f"(median {spacing:.3g} mm, tolerance {SPACING_TOLERANCE:.0%})")


def check_size(rows: int, columns: int, depth: int) -> None:
    """Refuse absurd image sizes before any pixel is decoded (the NIfTI reader's limits)."""
    shape = (columns, rows, depth)
    if any(not isinstance(n, int) or n < MIN_VOXELS_PER_AXIS for n in shape):
        raise ScanError(f"image {shape} is too thin to be a CT volume")
    if max(shape) > MAX_VOXELS_PER_AXIS or np.prod(shape, dtype=np.int64) > MAX_VOXELS_TOTAL:
        raise ScanError(f"absurd dimensions {shape} (at most {MAX_VOXELS_PER_AXIS} per axis)")


def scaling(name: str, dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept): stored values to Hounsfield units."""
    try:
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as error:
        raise ScanError(f"unusable intensity scaling in {name} ({error})") from None
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise ScanError(f"unusable intensity scaling (RescaleSlope={slope}, RescaleIntercept={intercept}) in {name}")
    return slope, intercept


def decode_pixels(name: str, dataset, rows: int, columns: int) -> np.ndarray:
    """One slice's stored values, (rows, columns); a missing decoder is named with its package."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        if syntax is not None and syntax.is_compressed and not decoder_available(syntax):
            package = DECODER_PACKAGES.get(str(syntax), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
            raise ScanError(f"compressed transfer syntax {syntax.name} and no decoder for it installed "
                                f"({name}): pip install {package}") from None
        raise ScanError(f"{name}: truncated or corrupt pixel data ({type(error).__name__}: {error})") from None
    if pixels.shape != (rows, columns) or pixels.dtype.kind not in "iuf":
        raise ScanError(f"{name}: pixel data of shape {pixels.shape} and type {pixels.dtype}, "
                        f"expected one {rows}x{columns} grey-level image")
    return pixels


def decoder_available(syntax) -> bool:
    """Whether pydicom has a working decoder plugin for this transfer syntax."""
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except Exception:  # no decoder at all for this syntax
        return False


def series_affine(geometry: dict, order: np.ndarray) -> np.ndarray:
    """Voxel (column, row, slice) to RAS millimetres; a tilted gantry (positions off the normal) is refused."""
    origins = geometry["origins"][order]
    step = (origins[-1] - origins[0]) / (len(origins) - 1)
    cosine = abs(float(step @ geometry["normal"])) / max(float(np.linalg.norm(step)), 1e-12)
    tilt_degrees = float(np.degrees(np.arccos(min(cosine, 1.0))))
    if tilt_degrees > TILT_TOLERANCE_DEGREES:
        raise ScanError(f"gantry tilt of {tilt_degrees:.1f} degrees (slices are sheared; resample them "
                        "to an untilted grid first)")
    column_spacing, row_spacing = geometry["spacing"][1], geometry["spacing"][0]  # PixelSpacing is (row, column)
    affine = np.eye(4)
    affine[:3, 0] = geometry["row_axis"] * column_spacing  # along a row: the column index grows
    affine[:3, 1] = geometry["column_axis"] * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = origins[0]
    return LPS_TO_RAS @ affine
