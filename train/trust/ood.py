"""Is this scan like the training data? The reference a run keeps of its training scans, and the checks.

`fit` stores in the run (reference.json) what its training scans looked like, and sets each
check's threshold on the validation split, so the share of in-distribution scans it flags is
known when the run is made (`val_flag_rate`):

- **histogram**: the raw-HU intensity histogram (`preprocess.reading.scan_stats`, kept in the cache at
  build time). Score: the mean earth mover's distance, in HU, to the K_NEAREST nearest training
  scans' histograms. Flagged above the validation scans' 99th percentile. Vasiliuk et al. (J.
  Imaging 2023) found this plain histogram a strong detector on 3D CT, often better than
  feature-space methods.
- **features**: the network's penultimate features (the input of its output layer). Score: the
  Mahalanobis distance to the nearest class mean under one shared covariance (Lee et al. 2018),
  the covariance shrunk towards a multiple of the identity (Ledoit-Wolf), because 512 features
  outnumber the training scans. Flagged above the validation scans' 99th percentile.
- **geometry**: field of view, voxel spacing and slice count along each axis, the fraction of
  lung-density voxels, and the lungs' volume and extent along each axis. Flagged outside the range
  of the training and validation scans widened by GEOMETRY_MARGIN of its larger end: the reason can
  then say "field of view head-foot 90 mm; training 300-300 mm" (`train.trust.geometry`; a run
  trained on a cache without the lungs does not check them).

A run from a version-1 cache (no scan statistics) keeps only the features check; a run from
before this module has no reference at all. Both are told in one line by `predict`.

What a flag does not promise: a scan that passes every check can still be misread (the checks
look at the whole volume, not at the finding), and a flagged scan may be read right. A flag says
the model's number comes from outside what it was trained and measured on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import read_json, write_json_atomically
from preprocess.reading.scan_stats import HISTOGRAM_EDGES, ScanStats
from train.trust.geometry import GEOMETRY_NAMES, allowed_range, geometry_values, judge_geometry, measured_names

REFERENCE = "reference.json"
REFERENCE_VERSION = 1
K_NEAREST = 5
THRESHOLD_PERCENTILE = 99.0
CHECKS = ("histogram", "features", "geometry")


@dataclass
class Verdict:
    """One scan against one reference: scores, thresholds, and the reasons it is flagged (none: in distribution)."""

    reasons_by_check: dict = field(default_factory=dict)  # check name -> its reasons, one line each
    scores: dict = field(default_factory=dict)  # check name -> score (None: unavailable)
    thresholds: dict = field(default_factory=dict)
    flagged: dict = field(default_factory=dict)  # check name -> bool

    @property
    def reasons(self) -> list[str]:
        return [reason for check in CHECKS for reason in self.reasons_by_check.get(check, [])]

    def add(self, check: str, reason: str) -> None:
        self.reasons_by_check.setdefault(check, []).append(reason)


def histogram_cdfs(histograms: np.ndarray) -> np.ndarray:
    histograms = np.asarray(histograms, dtype=np.float64)
    return np.cumsum(histograms / np.maximum(histograms.sum(axis=-1, keepdims=True), 1e-12), axis=-1)


def histogram_distances(cdfs: np.ndarray, reference_cdfs: np.ndarray, skip_self: bool = False) -> np.ndarray:
    """Mean earth mover's distance (HU) of each of `cdfs` to its K_NEAREST nearest `reference_cdfs`."""
    width = float(HISTOGRAM_EDGES[1] - HISTOGRAM_EDGES[0])
    distances = np.abs(cdfs[:, None, :] - reference_cdfs[None, :, :]).sum(axis=-1) * width
    if skip_self:  # a training scan against the training scans: not against itself
        np.fill_diagonal(distances, np.inf)
    k = max(1, min(K_NEAREST, reference_cdfs.shape[0] - int(skip_self)))
    return np.sort(distances, axis=1)[:, :k].mean(axis=1)


def shrunk_precision(centered: np.ndarray) -> np.ndarray:
    """The inverse of a Ledoit-Wolf shrunk covariance of centred rows (n, d)."""
    n, d = centered.shape
    sample = centered.T @ centered / max(n, 1)
    mu = np.trace(sample) / d
    target = mu * np.eye(d)
    delta = np.sum((sample - target) ** 2) / d
    # sum over rows of ||x x^T - S||^2 = sum ||x||^4 - n ||S||^2, since S is the mean of the x x^T
    beta = (np.sum(np.sum(centered ** 2, axis=1) ** 2) - n * np.sum(sample ** 2)) / (n * n * d) if n else 0.0
    shrinkage = float(np.clip(beta / delta, 0.0, 1.0)) if delta > 0 else 1.0
    covariance = (1 - shrinkage) * sample + shrinkage * target
    covariance += 1e-9 * max(mu, 1e-12) * np.eye(d)
    return np.linalg.inv(covariance)


def mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of each row of `features` to the nearest of `means` under `precision`."""
    features = np.asarray(features, dtype=np.float64)
    differences = features[:, None, :] - means[None, :, :]
    squared = np.einsum("nkd,de,nke->nk", differences, precision, differences)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def threshold_of(scores: np.ndarray) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.percentile(scores, THRESHOLD_PERCENTILE)) if len(scores) else float("inf")


@dataclass
class Reference:
    """What a run keeps of its training scans for the checks (see the module docstring)."""

    model: str
    feature_means: np.ndarray  # (classes present, F)
    feature_precision: np.ndarray  # (F, F)
    feature_threshold: float
    histogram_cdfs: np.ndarray | None = None  # (training scans, bins); None: a version-1 cache
    histogram_threshold: float | None = None
    geometry_low: np.ndarray | None = None  # allowed range, margin included
    geometry_high: np.ndarray | None = None
    geometry_seen_low: np.ndarray | None = None  # the training and validation scans' own range
    geometry_seen_high: np.ndarray | None = None
    geometry_names: tuple[str, ...] = ()  # what the four arrays above are of (`train.trust.geometry`)
    val_flag_rate: dict = field(default_factory=dict)  # check name -> share of validation scans flagged, "any"

    @property
    def has_stats(self) -> bool:
        return self.histogram_cdfs is not None

    def judge(self, features: np.ndarray, stats: ScanStats | None) -> Verdict:
        """The verdict on one scan: its penultimate features (F,) and its statistics (None: not available)."""
        verdict = Verdict()
        score = float(mahalanobis(features[None], self.feature_means, self.feature_precision)[0])
        verdict.scores["features"], verdict.thresholds["features"] = score, self.feature_threshold
        verdict.flagged["features"] = score > self.feature_threshold
        if verdict.flagged["features"]:
            verdict.add("features", f"the network's features are far from the training scans' (Mahalanobis distance "
                                   f"{score:.1f}; validation scans at most {self.feature_threshold:.1f})")
        if not self.has_stats or stats is None:
            for name in ("histogram", "geometry"):
                verdict.scores[name] = verdict.thresholds[name] = verdict.flagged[name] = None
            return verdict
        distance = float(histogram_distances(histogram_cdfs(np.array([stats.hu_histogram])), self.histogram_cdfs)[0])
        verdict.scores["histogram"], verdict.thresholds["histogram"] = distance, self.histogram_threshold
        verdict.flagged["histogram"] = distance > self.histogram_threshold
        if verdict.flagged["histogram"]:
            verdict.add("histogram", f"its intensity histogram is {distance:.0f} HU from the training scans' "
                                   f"(validation scans at most {self.histogram_threshold:.0f} HU)")
        names = self.geometry_names
        scores, thresholds, reasons = judge_geometry(
            geometry_values([stats], names)[0], names, self.geometry_low, self.geometry_high,
            self.geometry_seen_low, self.geometry_seen_high)
        verdict.scores["geometry"], verdict.thresholds["geometry"] = scores, thresholds
        verdict.flagged["geometry"] = bool(reasons)
        for reason in reasons:
            verdict.add("geometry", reason)
        return verdict


def build_reference(model: str, train_features: np.ndarray, train_classes: np.ndarray, val_features: np.ndarray,
                    train_stats: list[ScanStats] | None, val_stats: list[ScanStats] | None) -> Reference:
    """The reference of a run: from its training scans, with thresholds set on its validation scans."""
    train_features = np.asarray(train_features, dtype=np.float64)
    train_classes = np.asarray(train_classes).astype(int)
    present = np.unique(train_classes)
    means = np.stack([train_features[train_classes == label].mean(axis=0) for label in present])
    centered = train_features - means[np.searchsorted(present, train_classes)]
    means, precision = rounded(means), rounded(shrunk_precision(centered))  # as the file keeps them
    val_scores = mahalanobis(val_features, means, precision)
    reference = Reference(model, means, precision, threshold_of(val_scores))
    flags = {"features": val_scores > reference.feature_threshold}
    if train_stats is not None and val_stats is not None:
        reference.histogram_cdfs = rounded(histogram_cdfs(np.array([item.hu_histogram for item in train_stats])))
        val_distances = histogram_distances(histogram_cdfs(np.array([item.hu_histogram for item in val_stats])),
                                            reference.histogram_cdfs)
        reference.histogram_threshold = threshold_of(val_distances)
        flags["histogram"] = val_distances > reference.histogram_threshold
        seen = geometry_values([*train_stats, *val_stats])
        reference.geometry_names = measured_names(seen)  # a cache without the lungs: not the lungs' entries
        seen = geometry_values([*train_stats, *val_stats], reference.geometry_names)
        reference.geometry_seen_low, reference.geometry_seen_high = seen.min(axis=0), seen.max(axis=0)
        low, high = allowed_range(reference.geometry_seen_low, reference.geometry_seen_high)
        reference.geometry_low, reference.geometry_high = rounded(low), rounded(high)
        flags["geometry"] = np.zeros(len(val_stats), dtype=bool)  # the range includes them
    reference.val_flag_rate = {name: float(np.mean(flag)) for name, flag in flags.items()}
    reference.val_flag_rate["any"] = float(np.mean(np.any(np.stack(list(flags.values())), axis=0)))
    return reference


# -- the file ------------------------------------------------------------------------------------
ARRAYS = ("feature_means", "feature_precision", "histogram_cdfs", "geometry_low", "geometry_high",
          "geometry_seen_low", "geometry_seen_high")
SIGNIFICANT_DIGITS = 7  # the file's numbers: float32's precision, and a file half the size of full repr


def rounded(array: np.ndarray) -> np.ndarray:
    """`array` as the file will hold it (7 significant digits), so thresholds are set on what is read back."""
    return np.vectorize(lambda value: float(f"{value:.{SIGNIFICANT_DIGITS}g}"), otypes=[np.float64])(array)


def write_reference(run_dir: Path, reference: Reference) -> Path:
    """reference.json: plain JSON, like every file of a run (see `common.files`); about 3 MB for 512 features."""
    document = {"version": REFERENCE_VERSION, "model": reference.model,
                "feature_threshold": reference.feature_threshold, "histogram_threshold": reference.histogram_threshold,
                "val_flag_rate": reference.val_flag_rate, "geometry": list(reference.geometry_names),
                "histogram_edges": HISTOGRAM_EDGES.tolist(),
                **{name: rounded(getattr(reference, name)).tolist() for name in ARRAYS
                   if getattr(reference, name) is not None}}
    return write_json_atomically(Path(run_dir) / REFERENCE, document)


def read_reference(run_dir: Path) -> Reference | None:
    """The run's reference, or None for a run made before references existed; a damaged or hostile file is one
    UserError line."""
    path = Path(run_dir) / REFERENCE
    if not path.is_file():
        return None
    document = read_json(path)
    names = document.get("geometry")  # a run made before the lungs were measured lists fewer: still read
    known_names = isinstance(names, list) and all(isinstance(name, str) and name in GEOMETRY_NAMES for name in names) \
        and len(set(names)) == len(names)
    if document.get("version") != REFERENCE_VERSION or document.get("histogram_edges") != HISTOGRAM_EDGES.tolist() \
            or not known_names:
        raise UserError(f"{path}: made by another version of this tool, or damaged; refit the run "
                        "(`fit --resume` on the finished run) to check its inputs")
    arrays = {}
    for name in ARRAYS:
        if document.get(name) is not None:
            try:
                arrays[name] = np.array(document[name], dtype=np.float64)
            except (TypeError, ValueError):
                raise UserError(f"{path}: damaged ({name} is not an array of numbers)") from None
    problem = _reference_problem(document, arrays)
    if problem:
        raise UserError(f"{path}: damaged ({problem})")
    rates = document.get("val_flag_rate")
    return Reference(model=document["model"], feature_threshold=float(document["feature_threshold"]),
                     histogram_threshold=None if document["histogram_threshold"] is None
                     else float(document["histogram_threshold"]),
                     val_flag_rate=rates if isinstance(rates, dict) else {}, geometry_names=tuple(names),
                     **{name: arrays.get(name) for name in ARRAYS})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _reference_problem(document: dict, arrays: dict) -> str | None:
    """What makes these contents not a reference this module wrote, or None."""
    if not isinstance(document.get("model"), str):
        return "no model name"
    if not _is_number(document.get("feature_threshold")):
        return "feature_threshold is not a number"
    means, precision = arrays.get("feature_means"), arrays.get("feature_precision")
    if means is None or precision is None or means.ndim != 2 or not means.size \
            or precision.shape != (means.shape[1], means.shape[1]):
        return "feature arrays of the wrong shape"
    with_stats = arrays.get("histogram_cdfs") is not None
    threshold = document.get("histogram_threshold")
    if (with_stats and not _is_number(threshold)) or (not with_stats and threshold is not None):
        return "histogram threshold and histograms disagree"
    if with_stats:
        cdfs = arrays["histogram_cdfs"]
        if cdfs.ndim != 2 or cdfs.shape[1] != len(HISTOGRAM_EDGES) - 1 or not len(cdfs):
            return "histograms of the wrong shape"
        for name in ARRAYS[3:]:
            if arrays.get(name) is None or arrays[name].shape != (len(document["geometry"]),):
                return f"{name} of the wrong shape"
    if not all(np.isfinite(array).all() for array in arrays.values()):
        return "values that are not finite"
    return None
