"""`predict`: raw NIfTI scans or DICOM series folders -> P(abnormal), preprocessed exactly as the run's training cache was.

The shape and Hounsfield window come from the run's config.json (copied from the cache), and
the transform is `preprocess.volume.preprocess_scan`, the function that built the cache. A run
made by a version of the code that resampled or oriented differently is refused.

Output: one line per scan. A binary run prints the tutorial's sentence for the predicted class,
e.g. "This model is 97.12 percent confident that the CT scan is abnormal" (the tutorial prints
the sentence for both classes; the second is 100 minus the first, so it says nothing new). A
severity run prints the most likely grade and every grade's probability. With `explain_dir`,
each scan also gets a Grad-CAM montage (see `train.explain`).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import make_folder
from preprocess.preprocessing import Preprocessing
from preprocess.scans import describe_scan_failure
from preprocess.volume import preprocess_scan
from train.loop.native_logs import load_tensorflow
from train.network.scores import DECISION_THRESHOLD as THRESHOLD
from train.network.tasks import task_from_config
from train.rundir.layout import open_run

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "abnormal")


@dataclass(frozen=True)
class Prediction:
    """One scan's result: a probability, or the reason it could not be read."""

    scan: str
    probability_abnormal: float | None = None  # binary runs
    grade_probabilities: dict[str, float] | None = None  # severity runs, by grade
    error: str | None = None
    explanation: str | None = None  # the Grad-CAM montage written for this scan

    @property
    def predicted_class(self) -> str | None:
        if self.grade_probabilities is not None:
            return max(self.grade_probabilities, key=self.grade_probabilities.get)
        if self.probability_abnormal is None:
            return None
        return CLASS_NAMES[int(self.probability_abnormal >= THRESHOLD)]

    @property
    def confidence_percent(self) -> float | None:
        """The probability of the predicted class, in percent."""
        if self.grade_probabilities is not None:
            return 100.0 * max(self.grade_probabilities.values())
        if self.probability_abnormal is None:
            return None
        probability = self.probability_abnormal
        return 100.0 * (probability if probability >= THRESHOLD else 1.0 - probability)


def predict_scans(run_dir: Path, scans: list[Path], explain_dir: Path | None = None) -> list[Prediction]:
    """The model's probabilities for every scan, in order; a scan that cannot be used gets an error instead.

    With `explain_dir`, each scan's Grad-CAM montage is written there as <scan name>_gradcam.png
    (`explanation_names`).
    """
    run_dir = Path(run_dir)
    config = open_run(run_dir)
    task = task_from_config(config)
    preprocessing = Preprocessing.from_json(config.get("preprocessing"), run_dir)
    shape = preprocessing.shape
    if explain_dir is not None:
        make_folder(Path(explain_dir), "--explain")
    load_tensorflow()  # only once the run is valid: bad input is refused in a second
    from train.rundir.models import load_run_model

    model = load_run_model(run_dir)
    if model.input_shape != (None, *shape, 1) or model.output_shape != (None, task.output_units):
        raise UserError(f"{run_dir}: its model maps {model.input_shape} to {model.output_shape}, not volumes of "
                        f"config.json's shape {shape} to {task.output_units} output(s) for its "
                        f"{task.classes} classes; the run directory was changed by hand")
    predictions = []
    image_names = explanation_names(scans)
    for scan, image_name in zip(scans, image_names):
        try:
            volume, _ = preprocess_scan(Path(scan), shape, preprocessing.hu_min, preprocessing.hu_max)
        except Exception as error:  # the scan's fault, said as `build` says it
            predictions.append(Prediction(str(scan), error=describe_scan_failure(error)))
            continue
        probabilities = np.asarray(model(volume[None, ..., None], training=False)).reshape(-1)
        if task.is_binary:
            prediction = Prediction(str(scan), probability_abnormal=float(probabilities[0]))
        else:
            prediction = Prediction(str(scan), grade_probabilities={
                name: float(value) for name, value in zip(task.class_names, probabilities)})
        if explain_dir is not None:
            prediction = replace(prediction, explanation=str(explain_scan(model, volume, prediction, task,
                                                                          Path(explain_dir) / image_name)))
        predictions.append(prediction)
    return predictions


def explanation_names(scans: list[Path]) -> list[str]:
    """`<scan name>_gradcam.png` for each scan; a name that repeats (two DICOM folders both called `ct`,
    study_0001 of two classes) gets -2, -3, ... in order, so no montage overwrites another."""
    names, seen = [], {}
    for scan in scans:
        stem = Path(scan).name.removesuffix(".gz").removesuffix(".nii") or "scan"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}_gradcam.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}_gradcam.png")
    return names


def explain_scan(model, volume: np.ndarray, prediction: Prediction, task, path: Path) -> Path:
    """Write the Grad-CAM montage of one scan for its predicted class (abnormal, for a binary model) to `path`."""
    from train.explain import compute_grad_cam, save_explanation

    class_index = None if task.is_binary else task.class_names.index(prediction.predicted_class)
    heat_map = compute_grad_cam(model, volume, class_index)
    explained = "abnormal" if task.is_binary else prediction.predicted_class
    title = (f"{Path(prediction.scan).name}: Grad-CAM for '{explained}' "
             f"(predicted {prediction.predicted_class}, {prediction.confidence_percent:.1f}%)")
    return save_explanation(volume, heat_map, path, title)


def describe_prediction(prediction: Prediction) -> str:
    """The tutorial's sentence for the predicted class; for a severity run, the grade and every grade's probability."""
    if prediction.grade_probabilities is not None:
        grades = ", ".join(f"{name} {100 * value:.2f}%" for name, value in prediction.grade_probabilities.items())
        return f"most likely grade {prediction.predicted_class} ({prediction.confidence_percent:.2f}%); {grades}"
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
                explained = f" [Grad-CAM: {prediction.explanation}]" if prediction.explanation else ""
                print(f"{prediction.scan}: {describe_prediction(prediction)}{explained}")
    return 1 if any(prediction.error is not None for prediction in predictions) else 0
