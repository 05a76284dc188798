"""Write real DICOM CT series with pydicom from a volume in canonical RAS order (tests only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from nibabel import orientations

# patient orientations: (row axis, column axis) in DICOM's LPS patient coordinates
ORIENTATIONS = {
    "head-first-supine": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "feet-first-supine": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def phantom_volume(size: int = 32, slices: int = 12, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A synthetic chest (int16 HU, RAS) with a corner landmark, so any wrong flip shows; and its spacing."""
    from preprocess.phantoms.synth import make_phantom

    phantom = make_phantom(seed, 1, True, size=size, slice_range=(slices, slices))
    hu = phantom.hu.copy()
    hu[:6, :4, :3] = 1200
    return hu, tuple(float(value) for value in np.diag(phantom.affine)[:3])


def series_layout(hu: np.ndarray, spacing, orientation: str):
    """The stored (column, row, slice) array, the LPS origin and the LPS slice normal for `orientation`."""
    row_axis, column_axis = (np.array(axis) for axis in ORIENTATIONS[orientation])
    normal = np.cross(row_axis, column_axis)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_axis * spacing[0], column_axis * spacing[1], normal * spacing[2]
    affine[:3, 3] = (-40.0, 25.0, -100.0)
    ras = LPS_TO_RAS @ affine
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.io_orientation(ras))
    stored = orientations.apply_orientation(hu, transform)
    return stored, affine


def make_slice(pixels: np.ndarray, position, orientation_values, pixel_spacing, series_uid: str, instance: int,
               intercept: float = 0.0, slope: float = 1.0, modality: str = "CT", image_type=None, **extra):
    """One CT image dataset (explicit VR little endian) holding `pixels` (rows, columns)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = modality
    dataset.ImageType = list(image_type or ("ORIGINAL", "PRIMARY", "AXIAL"))
    dataset.InstanceNumber = instance
    dataset.ImagePositionPatient = [round(float(value), 4) for value in position]
    dataset.ImageOrientationPatient = [round(float(value), 6) for value in orientation_values]
    dataset.PixelSpacing = [round(float(value), 6) for value in pixel_spacing]
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    dataset.RescaleSlope = slope
    dataset.RescaleIntercept = intercept
    for keyword, value in extra.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    return dataset


def write_series(folder: Path, hu: np.ndarray, spacing, orientation: str = "head-first-supine",
                 series_uid: str = "1.2.826.0.1.3680043.8.498.100", intercept: float = 0.0,
                 reverse_on_disk: bool = False, names=None, suffix: str = ".dcm") -> list[Path]:
    """Write `hu` (int16, RAS) as one file per slice; returns the paths in slice order along the normal."""
    stored, affine = series_layout(hu, spacing, orientation)
    folder.mkdir(parents=True, exist_ok=True)
    orientation_values = [*affine[:3, 0] / spacing[0], *affine[:3, 1] / spacing[1]]
    values = stored.astype(np.int32) - int(intercept)
    pixels_type = np.uint16 if values.min() >= 0 else np.int16
    depth = stored.shape[2]
    paths = []
    for index in range(depth):
        instance = depth - index if reverse_on_disk else index + 1
        name = names[index] if names is not None else f"IM{instance:04d}{suffix}"
        position = affine[:3, 3] + index * affine[:3, 2]
        dataset = make_slice(values[:, :, index].T.astype(pixels_type), position, orientation_values,
                             (spacing[1], spacing[0]), series_uid, instance, intercept=intercept)
        dataset.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths
