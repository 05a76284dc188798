"""Temperature scaling (Guo et al. 2017) and the measures of calibration: ECE, Brier, NLL.

One scalar T divides the model's logits: p = sigmoid(z / T) for the binary task, softmax(z / T)
for severity. T is fitted on the validation split by minimising the negative log-likelihood
(scipy's bounded scalar search on log T); it changes no ranking and no predicted class, only how
sure the percentages are. T > 1 softens an over-confident model.

The fitted T is kept only when the validation split supports it: a likelihood-ratio test of
T = 1 against the fitted T, 2 N (NLL(1) - NLL(T)) against the chi-squared(1) 95% point, 3.84.
A validation split of 54 scans is a small sample: on the demo's phantoms the unconditional fit
moved T to 1.07-1.43 on evidence no test would accept (ratios 0.05-2.3) and made the test ECE
worse, not better (docs/trust.md). A model that is really over-confident on a split of that size
passes the test easily.

The lesion-map model (`fit` with lesion masks) is fitted a bias too, Platt's scaling: p =
sigmoid(z / T + bias). Its threshold is where its cells' logits ended, which training does not
place at 0 (docs/benchmarks.md, "Learning where the lesion is"). The pair is kept when the
likelihood-ratio test of (1, 0) against it, with 2 degrees of freedom (5.99), passes; else the
temperature alone is tested as above.

ECE is top-label and uses equal-count (quantile) bins: scans are sorted by the confidence of
their predicted class and dealt into `ece_bins(n)` bins of (nearly) equal size; ECE is the
scan-weighted mean of |accuracy - mean confidence| over the bins. Equal-count bins, because our
sets are small (54 test scans): fixed-width bins would leave most bins empty and the rest noisy.
Top-label, because the number the tool prints is the confidence of its predicted class: an ECE
of 0.03 means that, over scans, those percentages are 3 points off how often the class is right.
Brier is the mean squared error of the probability vector (binary: of P(abnormal)); NLL is the
mean negative log-likelihood of the true class.

No library: the measures are a few lines each, and TensorFlow Probability (its
`expected_calibration_error_quantiles`) or scikit-learn would be a large dependency for them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import read_json, write_json_atomically

CALIBRATION = "calibration.json"
TEMPERATURE_BOUNDS = (0.05, 20.0)
LIKELIHOOD_RATIO_CRITICAL = 3.841  # chi-squared, 1 degree of freedom, 95%
LIKELIHOOD_RATIO_CRITICAL_2 = 5.991  # chi-squared, 2 degrees of freedom, 95%: a temperature and a bias
MAX_BIAS = 100.0  # |bias| in logits; far beyond any threshold a model could need
MAX_ECE_BINS = 10
SCANS_PER_ECE_BIN = 10  # fewer bins for small sets: ~10 scans each, at least 1 bin
EPSILON = 1e-12


@dataclass(frozen=True)
class Calibration:
    """What `fit` stores in calibration.json: the temperature and how it was fitted."""

    temperature: float  # the one served: the fitted one, or 1.0 when the validation split did not support it
    model: str  # the model file it was fitted for; a resumed run that changed model refits it
    fitted_on: str  # e.g. "val (54 scans)"
    scans: int
    nll_before: float  # validation NLL at T = 1
    nll_after: float  # at the served temperature
    at_bound: bool  # the search hit TEMPERATURE_BOUNDS: the validation scans were separated perfectly (or nearly)
    fitted_temperature: float = 1.0  # what the NLL search found
    likelihood_ratio: float = 0.0  # 2 N (NLL(1) - NLL(fitted)); the fitted T is served when it exceeds 3.84
    bias: float = 0.0  # added to the scaled logit (binary lesion-map runs; 0 for every other run and before)
    fitted_bias: float = 0.0  # what the two-parameter fit found (0 when none was tried)

    def to_json(self) -> dict:
        return asdict(self)


def read_calibration(run_dir: Path) -> Calibration | None:
    """The run's calibration, or None for a run made before calibration existed."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return None
    document = read_json(path)
    try:
        calibration = Calibration(**document)
        temperature = float(calibration.temperature)
    except (TypeError, ValueError):
        raise UserError(f"{path}: not a calibration of this tool") from None
    if not TEMPERATURE_BOUNDS[0] <= temperature <= TEMPERATURE_BOUNDS[1]:
        raise UserError(f"{path}: damaged (temperature {temperature!r} outside {TEMPERATURE_BOUNDS})")
    if not isinstance(calibration.bias, (int, float)) or isinstance(calibration.bias, bool) \
            or not abs(calibration.bias) <= MAX_BIAS:
        raise UserError(f"{path}: damaged (bias {calibration.bias!r} not a number within ±{MAX_BIAS:g})")
    return calibration


def write_calibration(run_dir: Path, calibration: Calibration) -> Path:
    return write_json_atomically(Path(run_dir) / CALIBRATION, calibration.to_json())


# -- probabilities -------------------------------------------------------------------------------
def probabilities_from_logits(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """P(abnormal) (N,) from binary logits (N,) or (N, 1), sigmoid(z / T + bias); class probabilities
    (N, C) from (N, C) logits (no bias)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    scaled = logits / temperature + (bias if logits.ndim == 1 else 0.0)
    if logits.ndim == 1:
        return 0.5 * (1.0 + np.tanh(0.5 * scaled))  # the sigmoid without overflow
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, classes: np.ndarray, temperature: float = 1.0,
                            bias: float = 0.0) -> float:
    """Mean NLL of the true classes, computed from logits (stable where probabilities round to 0 or 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    classes = np.asarray(classes).astype(int)
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    scaled = logits / temperature + (bias if logits.ndim == 1 else 0.0)
    if scaled.ndim == 1:
        signed = np.where(classes == 1, scaled, -scaled)
        return float(np.mean(np.logaddexp(0.0, -signed)))
    log_normalizer = np.logaddexp.reduce(scaled, axis=1)
    return float(np.mean(log_normalizer - scaled[np.arange(len(classes)), classes]))


def fit_temperature(logits: np.ndarray, classes: np.ndarray) -> tuple[float, bool]:
    """The temperature minimising the NLL of `classes` under `logits` / T, and whether it hit a bound."""
    from scipy.optimize import minimize_scalar

    classes = np.asarray(classes).astype(int)
    if len(classes) == 0:
        raise ValueError("no scans to fit a temperature on")
    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, classes, math.exp(log_t)),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    log_t = float(result.x)
    at_bound = bool(min(log_t - low, high - log_t) < 1e-3)
    return math.exp(log_t), at_bound


def fit_temperature_and_bias(logits: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """(T, bias) minimising the NLL of `classes` under sigmoid(z / T + bias), within the bounds (binary logits)."""
    from scipy.optimize import minimize

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize(lambda point: negative_log_likelihood(logits, classes, math.exp(point[0]), point[1]),
                      np.zeros(2), method="L-BFGS-B", bounds=[(low, high), (-MAX_BIAS, MAX_BIAS)])
    return math.exp(float(result.x[0])), float(result.x[1])


def calibrate(logits: np.ndarray, classes: np.ndarray, model: str, fitted_on: str,
              fit_bias: bool = False) -> Calibration:
    """Fit T on these (validation) logits and keep it if the likelihood-ratio test supports it; with
    `fit_bias` (binary), first T and a bias, kept if their own test supports them (module docstring)."""
    classes = np.asarray(classes).astype(int)
    fitted, at_bound = fit_temperature(logits, classes)
    before = negative_log_likelihood(logits, classes)
    pair_bias = 0.0
    if fit_bias:
        pair_temperature, pair_bias = fit_temperature_and_bias(logits, classes)
        pair_ratio = 2 * len(classes) * (before - negative_log_likelihood(logits, classes, pair_temperature, pair_bias))
    if fit_bias and pair_ratio > LIKELIHOOD_RATIO_CRITICAL_2:
        served, bias, fitted, ratio = pair_temperature, pair_bias, pair_temperature, pair_ratio
    else:
        ratio = 2 * len(classes) * (before - negative_log_likelihood(logits, classes, fitted))
        served, bias = (fitted if ratio > LIKELIHOOD_RATIO_CRITICAL else 1.0), 0.0
    return Calibration(temperature=served, model=model, fitted_on=fitted_on, scans=int(len(classes)),
                       nll_before=before, nll_after=negative_log_likelihood(logits, classes, served, bias),
                       at_bound=at_bound, fitted_temperature=fitted, likelihood_ratio=float(ratio),
                       bias=bias, fitted_bias=pair_bias)


# -- measures ----------------------------------------------------------------------------------
def top_label(probabilities: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The confidence of each scan's predicted class, and whether that class is right."""
    probabilities, classes = as_arrays(probabilities, classes)
    if probabilities.ndim == 1:
        predicted = (probabilities >= 0.5).astype(int)
        confidence = np.where(predicted == 1, probabilities, 1.0 - probabilities)
    else:
        predicted = probabilities.argmax(axis=1)
        confidence = probabilities.max(axis=1)
    return confidence, (predicted == classes).astype(np.float64)


def ece_bins(scans: int) -> int:
    return int(min(MAX_ECE_BINS, max(1, scans // SCANS_PER_ECE_BIN)))


def reliability_bins(probabilities: np.ndarray, classes: np.ndarray, bins: int | None = None) -> list[dict]:
    """Equal-count bins of top-label confidence: per bin its scans, mean confidence and accuracy."""
    confidence, correct = top_label(probabilities, classes)
    if len(confidence) == 0:
        return []
    bins = ece_bins(len(confidence)) if bins is None else bins
    order = np.argsort(confidence, kind="stable")
    return [{"scans": int(len(part)), "confidence": float(confidence[part].mean()), "accuracy": float(correct[part].mean())}
            for part in np.array_split(order, bins) if len(part)]


def expected_calibration_error(probabilities: np.ndarray, classes: np.ndarray, bins: int | None = None) -> float:
    table = reliability_bins(probabilities, classes, bins)
    total = sum(row["scans"] for row in table)
    if total == 0:
        return float("nan")
    return float(sum(row["scans"] * abs(row["accuracy"] - row["confidence"]) for row in table) / total)


def as_arrays(probabilities, classes) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(probabilities, dtype=np.float64), np.asarray(classes).astype(int)


def brier_score(probabilities: np.ndarray, classes: np.ndarray) -> float:
    probabilities, classes = as_arrays(probabilities, classes)
    if len(classes) == 0:
        return float("nan")
    if probabilities.ndim == 1:
        return float(np.mean((probabilities - classes) ** 2))
    one_hot = np.eye(probabilities.shape[1])[classes]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def calibration_report(raw: np.ndarray, calibrated: np.ndarray, classes: np.ndarray, temperature) -> dict:
    """ECE, Brier and NLL of the raw (T = 1) and the calibrated probabilities (an ensemble's: their means over
    members), the ECE's bin count, and the reliability bins of what is served. `temperature` None: no calibration."""
    classes = np.asarray(classes).astype(int)
    bins = ece_bins(len(classes))

    def measures(probabilities):
        return {"ece": expected_calibration_error(probabilities, classes, bins),
                "brier": brier_score(probabilities, classes), "nll": probability_nll(probabilities, classes)}

    return {"temperature": temperature, "ece_bins": bins, "before": measures(raw),
            "after": measures(calibrated) if temperature is not None else None,
            "reliability": reliability_bins(calibrated if temperature is not None else raw, classes, bins)}


def probability_nll(probabilities: np.ndarray, classes: np.ndarray) -> float:
    """Mean NLL of the true classes from probabilities (an ensemble's mean has no logits), clipped at 1e-12."""
    probabilities, classes = as_arrays(probabilities, classes)
    if len(classes) == 0:
        return float("nan")
    if probabilities.ndim == 1:
        chosen = np.where(classes == 1, probabilities, 1.0 - probabilities)
    else:
        chosen = probabilities[np.arange(len(classes)), classes]
    return float(-np.mean(np.log(np.clip(chosen, EPSILON, 1.0))))
