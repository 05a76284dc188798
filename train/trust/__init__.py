"""Predictions you can trust: calibrated probabilities (`calibration`), a check that a scan is like the
training data (`ood`), and the models that serve both, one run's or a cross-validation's folds (`served`)."""
