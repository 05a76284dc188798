"""`predict`: raw NIfTI scans or DICOM series folders -> calibrated P(abnormal), and whether each scan is like the
training data, from one run or from a cross-validation's folds.

The shape and Hounsfield window come from the run's config.json (copied from the cache), and
the transform is `preprocess.reading.transform.preprocess_scan`, the function that built the cache. A run
made by a version of the code that resampled or oriented differently is refused.

Each scan, in order:
1. Hard checks on the header and the raw voxels (`preprocess.reading.scan_stats.hard_problems`): a volume
   that is not a CT in Hounsfield units, absurd spacing or field of view, too few slices, a
   constant volume. Such a scan gets its reasons and no probability (an error line, as an
   unreadable scan does).
2. The model: calibrated probabilities (`train.trust.calibration`; a run made before calibration
   gives its raw ones, said once). From a cross-validation directory, the mean over its folds,
   with their spread (sd, min-max).
3. Is it like the training data? (`train.trust.ood`): the intensity histogram, the network's
   features and the geometry against the run's reference. For an ensemble a check flags a scan
   when it does so for most folds; folds that disagree by more than SPREAD_LIMIT (sd of the
   predicted class's probability) flag it too. A flagged scan keeps its probability, and its
   sentence says why not to rely on it.

Output: one line per scan. A binary run prints the tutorial's sentence for the predicted class,
e.g. "This model is 97.12 percent confident that the CT scan is abnormal" (the tutorial prints
the sentence for both classes; the second is 100 minus the first, so it says nothing new). A
severity run prints the most likely grade and every grade's probability. With `explain_dir`,
each scan also gets a Grad-CAM montage (see `train.explain`); for an ensemble, that of the fold
whose probability is nearest the ensemble's mean.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import make_folder
from preprocess.preprocessing import Preprocessing
from preprocess.reading.scan_stats import hard_problems
from preprocess.reading.formats import describe_scan_failure
from preprocess.reading.transform import preprocess_scan
from train.tensorflow_import import load_tensorflow
from train.network.scores import DECISION_THRESHOLD as THRESHOLD
from train.network.tasks import task_from_config
from train.trust.ood import CHECKS

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "abnormal")
SPREAD_LIMIT = 0.15  # sd across folds of the predicted class's probability above which an ensemble's scan is flagged
MAX_REASONS_SHOWN = 3  # in the sentence; --json has every reason
EXIT_FLAGGED = 3  # --strict, when a scan was flagged (and every scan could be read)


@dataclass(frozen=True)
class Prediction:
    """One scan's result: a probability, or the reason it could not be read or assessed."""

    scan: str
    probability_abnormal: float | None = None  # binary runs (calibrated where the run has a calibration)
    grade_probabilities: dict[str, float] | None = None  # severity runs, by grade
    error: str | None = None
    explanation: str | None = None  # the Grad-CAM montage written for this scan
    calibrated: bool | None = None
    in_distribution: bool | None = None  # None: the run keeps no reference to check against
    ood_reasons: list[str] = field(default_factory=list)
    ood_scores: dict = field(default_factory=dict)  # per check: score, threshold, flagged (by fold in an ensemble)
    spread: dict | None = None  # an ensemble's: folds, sd, min, max of the predicted class's probability

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
    """The model's probabilities for every scan, in order, and whether each is like the training data; a scan
    that cannot be used gets an error instead. `run_dir` is a run directory or a cross-validation directory.

    With `explain_dir`, each scan's Grad-CAM montage is written there as <scan name>_gradcam.png
    (`explanation_names`).
    """
    from train.trust.served import open_configs

    run_dir = Path(run_dir)
    dirs, configs = open_configs(run_dir)
    task = task_from_config(configs[0])
    preprocessing = Preprocessing.from_json(configs[0].get("preprocessing"), run_dir)
    shape = preprocessing.shape
    if explain_dir is not None:
        make_folder(Path(explain_dir), "--explain")
    load_tensorflow()  # only once the run is valid: bad input is refused in a second
    from train.trust.served import load_served

    members = load_served(dirs, configs)
    for member in members:
        model = member.model
        if model.input_shape != (None, *shape, 1) or model.output_shape != (None, task.output_units):
            raise UserError(f"{member.run_dir}: its model maps {model.input_shape} to {model.output_shape}, not "
                            f"volumes of config.json's shape {shape} to {task.output_units} output(s) for its "
                            f"{task.classes} classes; the run directory was changed by hand")
    predictions = []
    for scan, image_name in zip(scans, explanation_names(scans)):
        try:
            volume, info = preprocess_scan(Path(scan), shape, preprocessing.hu_min, preprocessing.hu_max,
                                           crop=preprocessing.crop)  # the run's own crop
        except Exception as error:  # the scan's fault, said as `build` says it
            predictions.append(Prediction(str(scan), error=describe_scan_failure(error)))
            continue
        problems = hard_problems(info.stats)
        if problems:
            predictions.append(Prediction(str(scan), error="not assessed: " + "; ".join(problems),
                                          in_distribution=False, ood_reasons=problems))
            continue
        prediction, nearest = assess(members, task, volume, info.stats, str(scan))
        if explain_dir is not None:
            prediction = replace(prediction, explanation=str(explain_scan(
                nearest.model, volume, prediction, task, Path(explain_dir) / image_name, preprocessing.crop,
                info.stats)))
        predictions.append(prediction)
    return predictions


def assess(members, task, volume: np.ndarray, stats, scan: str):
    """One preprocessed scan through every member: the Prediction, and the member nearest the ensemble's mean."""
    probabilities, verdicts = [], []
    for member in members:
        features, logits = member.outputs(volume[None])
        probabilities.append(member.probabilities(logits)[0])
        verdicts.append(member.reference.judge(features[0], stats) if member.reference is not None else None)
    probabilities = np.array(probabilities, dtype=np.float64)
    mean = probabilities.mean(axis=0)
    if task.is_binary:
        fields = {"probability_abnormal": float(mean)}
        predicted = int(mean >= THRESHOLD)
        of_predicted = probabilities if predicted else 1.0 - probabilities
    else:
        fields = {"grade_probabilities": {name: float(value) for name, value in zip(task.class_names, mean)}}
        of_predicted = probabilities[:, int(np.argmax(mean))]
    nearest = members[int(np.argmin(np.abs(of_predicted - of_predicted.mean())))]
    reasons, scores = [], {}
    in_distribution = None
    if all(verdict is not None for verdict in verdicts):
        for check in CHECKS:
            flags = [verdict.flagged[check] for verdict in verdicts]
            scores[check] = {"score": [verdict.scores[check] for verdict in verdicts],
                             "threshold": [verdict.thresholds[check] for verdict in verdicts], "flagged": flags}
            if len(members) == 1:
                scores[check] = {name: values[0] for name, values in scores[check].items()}
            if all(flag is not None for flag in flags) and sum(flags) * 2 > len(flags):  # most members
                first = next(verdict for verdict in verdicts if verdict.flagged[check])
                reasons += first.reasons_by_check.get(check, [])
        in_distribution = True
    spread = None
    if len(members) > 1:
        sd = float(np.std(of_predicted, ddof=1))
        spread = {"folds": len(members), "sd": sd, "min": float(of_predicted.min()), "max": float(of_predicted.max())}
        if sd > SPREAD_LIMIT:
            reasons.append(f"the {len(members)} fold models disagree (sd {100 * sd:.0f} points, "
                           f"{100 * of_predicted.min():.0f}-{100 * of_predicted.max():.0f}%)")
    if reasons:
        in_distribution = False
    prediction = Prediction(scan, calibrated=all(member.calibration is not None for member in members),
                            in_distribution=in_distribution, ood_reasons=reasons, ood_scores=scores, spread=spread,
                            **fields)
    return prediction, nearest


def explanation_names(scans: list[Path]) -> list[str]:
    """`<scan name>_gradcam.png` for each scan; a name that repeats (two DICOM folders both called `ct`,
    study_0001 of two classes) gets -2, -3, ... in order, so no montage overwrites another."""
    names, seen = [], {}
    for scan in scans:
        stem = Path(scan).name.removesuffix(".gz").removesuffix(".nii") or "scan"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}_gradcam.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}_gradcam.png")
    return names


def explain_scan(model, volume: np.ndarray, prediction: Prediction, task, path: Path, crop: str = "none",
                 stats=None) -> Path:
    """Write the Grad-CAM montage of one scan for its predicted class (abnormal, for a binary model) to `path`,
    titled with the region the volume shows (`crop`, and the lungs' box from the scan's `stats`)."""
    from train.explain import compute_grad_cam, explanation_title, save_explanation

    class_index = None if task.is_binary else task.class_names.index(prediction.predicted_class)
    heat_map = compute_grad_cam(model, volume, class_index)
    explained = "abnormal" if task.is_binary else prediction.predicted_class
    title = explanation_title(Path(prediction.scan).name, explained, prediction.predicted_class,
                              prediction.confidence_percent, crop, stats)
    return save_explanation(volume, heat_map, path, title)


def describe_prediction(prediction: Prediction) -> str:
    """The tutorial's sentence for the predicted class (for a severity run, the grade and every grade's
    probability), the folds' spread for an ensemble, and the warning of a scan unlike the training data."""
    spread = prediction.spread
    across = (f" (folds: sd {100 * spread['sd']:.1f} points, {100 * spread['min']:.1f}-{100 * spread['max']:.1f}%)"
              if spread else "")
    if prediction.grade_probabilities is not None:
        grades = ", ".join(f"{name} {100 * value:.2f}%" for name, value in prediction.grade_probabilities.items())
        sentence = (f"most likely grade {prediction.predicted_class} ({prediction.confidence_percent:.2f}%{across}); "
                    f"{grades}")
    else:
        who = f"The {spread['folds']} fold models are" if spread else "This model is"
        sentence = (f"{who} {prediction.confidence_percent:.2f} percent confident{across} that the CT scan is "
                    f"{prediction.predicted_class}")
    if prediction.ood_reasons:
        shown = prediction.ood_reasons[:MAX_REASONS_SHOWN]
        more = len(prediction.ood_reasons) - len(shown)
        told = "; ".join(shown) + (f"; and {more} more (--json lists them)" if more else "")
        sentence += f" -- but this scan is unlike the training data ({told}); do not rely on this result"
    return sentence


def print_predictions(predictions: list[Prediction], as_json: bool, prog: str, strict: bool = False) -> int:
    """Print results (stdout) and one line per failed scan (stderr); returns the exit code: 1 if a scan could not
    be used, else with `strict` EXIT_FLAGGED if a scan is unlike the training data, else 0."""
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
    if any(prediction.error is not None for prediction in predictions):
        return 1
    flagged = [prediction for prediction in predictions if prediction.in_distribution is False]
    if strict and flagged:
        print(f"{prog}: --strict: {len(flagged)} of {len(predictions)} scans are unlike the training data",
              file=sys.stderr)
        return EXIT_FLAGGED
    return 0
