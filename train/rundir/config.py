"""config.json's contents for a new run: what it was trained on, and how (`fit` writes it once, `--resume` checks it)."""
from __future__ import annotations

import platform
import time
from importlib import metadata

from preprocess.cache import CacheReader
from train.network.tasks import compute_class_weights, make_task
from train.options import FitOptions
from train.pipeline.folds import rows_and_classes


def make_config(options: FitOptions, reader: CacheReader) -> dict:
    """config.json: options, the cache's preprocessing, attributes and fingerprint, task, sizes, versions."""
    task = make_task(options.task, reader)
    (train_rows, train_classes), (val_rows, _) = rows_and_classes(reader, options, task)
    class_weights = compute_class_weights(task, train_classes)  # refuses a class without training scans
    splits = {name: int(len(reader.split(name))) for name in ("train", "val", "test")}
    if options.fold is not None:
        splits.update(train=int(len(train_rows)), val=int(len(val_rows)), test=0)
    return {
        "options": options.to_json(),
        "preprocessing": reader.preprocessing.to_json(),
        "cache": {"path": str(options.cache), "fingerprint": reader.fingerprint, "attributes": reader.attributes},
        "input_shape": list(reader.shape),
        "class_names": list(task.class_names),
        "split_sizes": splits,
        "class_weights": {task.class_names[index]: weight for index, weight in class_weights.items()},
        "versions": {name: _version(name) for name in ("mosmed3d", "tensorflow", "keras", "h5py", "numpy")}
        | {"python": platform.python_version()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
