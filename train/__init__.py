"""Stage two: train, evaluate and apply the 3D CNN on a cache written by `preprocess` (see `python -m train`)."""
