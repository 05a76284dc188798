"""Stage two: train, evaluate and apply the 3D CNN on a cache written by `preprocess` (see `python -m train`)."""
from train.hardware import prefer_onednn

# before any module of this package imports TensorFlow, which reads the switch once (train/hardware.py)
prefer_onednn()
