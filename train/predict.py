"""`predict`: raw NIfTI scans -> P(abnormal), preprocessed exactly as the run's training cache was.

The shape and Hounsfield window come from the run's config.json (copied from the cache), and
the transform is `preprocess.volume.preprocess_scan`, the function that built the cache. A run
made by a version of the code that resampled or oriented differently is refused.

Output: one line per scan with the tutorial's sentence for the predicted class, e.g.
"This model is 97.12 percent confident that the CT scan is abnormal". (The tutorial prints
the sentence for both classes; the second is 100 minus the first, so it says nothing new.)
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess.errors import UserError
from preprocess.volume import CANONICAL_ORIENTATION, RESAMPLE_METHOD, ScanError, preprocess_scan
from train.native_logs import load_tensorflow
from train.options import DECISION_THRESHOLD as THRESHOLD
from train.run import open_run

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "abnormal")
MAX_VOLUME_SIDE = 4096  # voxels along one axis of a preprocessed volume; more is a damaged config


@dataclass(frozen=True)
class Prediction:
    """One scan's result: a probability, or the reason it could not be read."""

    scan: str
    probability_abnormal: float | None = None
    error: str | None = None

    @property
    def predicted_class(self) -> str | None:
        if self.probability_abnormal is None:
            return None
        return CLASS_NAMES[int(self.probability_abnormal >= THRESHOLD)]

    @property
    def confidence_percent(self) -> float | None:
        """The probability of the predicted class, in percent."""
        if self.probability_abnormal is None:
            return None
        probability = self.probability_abnormal
        return 100.0 * (probability if probability >= THRESHOLD else 1.0 - probability)


def run_preprocessing(config: dict, run_dir: Path) -> tuple[tuple[int, int, int], float, float]:
    """The (shape, hu_min, hu_max) the run was trained with, after checking this code makes the same volumes."""
    preprocessing = config.get("preprocessing")
    if not isinstance(preprocessing, dict) or not {"shape", "hu_min", "hu_max"} <= preprocessing.keys():
        raise UserError(f"{run_dir}: config.json has no preprocessing options")
    current = {"resample_method": RESAMPLE_METHOD, "orientation": "".join(CANONICAL_ORIENTATION)}
    for name, value in current.items():
        if preprocessing.get(name) != value:
            raise UserError(f"{run_dir} was trained on volumes made with {name} {preprocessing.get(name)!r}; "
                            f"this version of preprocess makes {value!r}")
    try:
        shape = tuple(int(n) for n in preprocessing["shape"])
        hu_min, hu_max = float(preprocessing["hu_min"]), float(preprocessing["hu_max"])
    except (TypeError, ValueError, OverflowError):
        shape, hu_min, hu_max = (), math.nan, math.nan
    if len(shape) != 3 or not all(1 <= n <= MAX_VOLUME_SIDE for n in shape) or not hu_min < hu_max \
            or not math.isfinite(hu_min + hu_max):
        raise UserError(f"{run_dir}: config.json has damaged preprocessing options (shape, hu_min, hu_max)")
    return shape, hu_min, hu_max


def predict_scans(run_dir: Path, scans: list[Path]) -> list[Prediction]:
    """P(abnormal) for every scan, in order; a scan that cannot be used gets an error instead."""
    run_dir = Path(run_dir)
    config = open_run(run_dir)
    shape, hu_min, hu_max = run_preprocessing(config, run_dir)
    load_tensorflow()  # only once the run is valid: bad input is refused in a second
    from train.model import load_best_model

    model = load_best_model(run_dir)
    if model.input_shape != (None, *shape, 1) or model.output_shape != (None, 1):
        raise UserError(f"{run_dir}: its model maps {model.input_shape} to {model.output_shape}, not volumes of "
                        f"config.json's shape {shape} to one probability; the run directory was changed by hand")
    predictions = []
    for scan in scans:
        try:
            volume, _ = preprocess_scan(Path(scan), shape, hu_min, hu_max)
        except (ScanError, OSError) as error:
            predictions.append(Prediction(str(scan), error=_describe(error)))
            continue
        except MemoryError:
            predictions.append(Prediction(str(scan), error="too large to load into memory"))
            continue
        except Exception as error:  # a corrupt file can break nibabel or numpy in many ways
            predictions.append(Prediction(str(scan), error=f"unreadable ({type(error).__name__}: {error})"))
            continue
        probability = model(volume[None, ..., None], training=False)
        predictions.append(Prediction(str(scan), probability_abnormal=float(probability.numpy().reshape(-1)[0])))
    return predictions


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error)


def describe_prediction(prediction: Prediction) -> str:
    """The tutorial's sentence for the predicted class."""
    return (f"This model is {prediction.confidence_percent:.2f} percent confident that the CT scan is "
            f"{prediction.predicted_class}")


def print_predictions(predictions: list[Prediction], as_json: bool, prog: str) -> int:
    """Print results (stdout) and one line per failed scan (stderr); returns the exit code."""
    for prediction in predictions:
        if prediction.error is not None:
            print(f"{prog}: error: {prediction.scan}: {prediction.error}", file=sys.stderr)
    if as_json:
        documents = [
            {**asdict(prediction), "predicted_class": prediction.predicted_class,
             "confidence_percent": prediction.confidence_percent}
            for prediction in predictions
        ]
        print(json.dumps(documents, indent=2))
    else:
        for prediction in predictions:
            if prediction.error is None:
                print(f"{prediction.scan}: {describe_prediction(prediction)}")
    return 1 if any(prediction.error is not None for prediction in predictions) else 0
