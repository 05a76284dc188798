"""`Preprocessing`: the options that decide a cache's volumes, as one object.

Beside the per-scan transform (`preprocess.reading.transform.preprocess_scan`), this is the one owner of
those options: what this version of the code makes of `--shape` and `--hu-window`
(`of_this_code`), how they are written to JSON (a run's config.json; the cache's attributes and
fingerprint), read back (`from_json`), and compared (`differences`). `build` compares the
previous cache's with its own, `evaluate` a run's with a cache's, and `predict` reads a run's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from common.errors import UserError
from preprocess.reading.lungs import CROPS, LUNG_METHOD

MAX_VOLUME_SIDE = 4096  # voxels along one axis of a preprocessed volume; more is a damaged record


@dataclass(frozen=True)
class Preprocessing:
    """The options that decide a cache's arrays; any change means a full rebuild."""

    shape: tuple[int, int, int]
    hu_min: float
    hu_max: float
    resample_method: str
    orientation: str
    crop: str = "none"  # "lungs": each scan cropped to its lungs' box; "none" (and every cache before it): whole
    lung_method: str = ""  # how the lungs were found (`preprocess.reading.lungs`), with crop "lungs"

    @classmethod
    def of_this_code(cls, shape, hu_window, crop: str = "lungs") -> Preprocessing:
        """What this version of `preprocess_scan` makes with these options."""
        return cls(shape=tuple(int(n) for n in shape), hu_min=float(hu_window[0]), hu_max=float(hu_window[1]),
                   **this_code_makes(), crop=crop, lung_method=lung_method_of_this_code(crop))

    def to_json(self) -> dict:
        """Plain JSON values (tuples become lists), as config.json and the cache's fingerprint store them."""
        return jsonable(self)

    @classmethod
    def from_json(cls, document, run_dir: Path) -> Preprocessing:
        """The options a run's config.json records, refused (one line) unless this code makes the same volumes."""
        if not isinstance(document, dict) or not {"shape", "hu_min", "hu_max"} <= document.keys():
            raise UserError(f"{run_dir}: config.json has no preprocessing options")
        crop = document.get("crop", "none")  # a run made before the lung crop was trained on whole scans
        if crop not in CROPS:
            raise UserError(f"{run_dir}: config.json has an unknown crop {crop!r}")
        makes = {**this_code_makes(), "lung_method": lung_method_of_this_code(crop)}
        for name, value in makes.items():
            if document.get(name, "" if name == "lung_method" else None) != value:
                raise UserError(f"{run_dir} was trained on volumes made with {name} {document.get(name)!r}; "
                                f"this version of preprocess makes {value!r}")
        try:
            shape = tuple(int(n) for n in document["shape"])
            hu_min, hu_max = float(document["hu_min"]), float(document["hu_max"])
        except (TypeError, ValueError, OverflowError):
            shape, hu_min, hu_max = (), math.nan, math.nan
        if len(shape) != 3 or not all(1 <= n <= MAX_VOLUME_SIDE for n in shape) or not hu_min < hu_max \
                or not math.isfinite(hu_min + hu_max):
            raise UserError(f"{run_dir}: config.json has damaged preprocessing options (shape, hu_min, hu_max)")
        return cls.of_this_code(shape, (hu_min, hu_max), crop)

    def differences(self, recorded: dict) -> dict[str, tuple]:
        """{option: (recorded value, this object's value)} for every option `recorded` (JSON) gives otherwise."""
        return {name: (recorded.get(name), value) for name, value in self.to_json().items()
                if recorded.get(name) != value}


def this_code_makes() -> dict[str, str]:
    """How this version of `preprocess_scan` resamples and orients: the options no flag sets."""
    from preprocess.reading.canonical import CANONICAL_ORIENTATION
    from preprocess.reading.transform import RESAMPLE_METHOD  # nibabel: not for cache readers

    return {"resample_method": RESAMPLE_METHOD, "orientation": "".join(CANONICAL_ORIENTATION)}


def lung_method_of_this_code(crop: str) -> str:
    """How this version finds the lungs it crops to; "" for crop "none"."""
    return LUNG_METHOD if crop == "lungs" else ""


def plain_value(value):
    """A JSON-able value: tuples and arrays become lists, NumPy scalars Python numbers."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return [plain_value(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def jsonable(options) -> dict:
    """A dataclass's fields as plain JSON values (cache attributes, config.json)."""
    return {field.name: plain_value(getattr(options, field.name)) for field in fields(options)}
