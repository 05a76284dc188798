"""Test-time augmentation on the kept runs of bench_recipe.py: does averaging over rotations rank better?

Training shows the network every volume turned by one of the tutorial's angles (±5, ±10, ±20
degrees) and never unturned; inference sees it unturned. For every finished run of a set this
prints the validation and test AUC of the run's model (its `--keep`) on unturned volumes and on
the mean probability over sets of turns, and then, per arm, the mean ± sd over seeds. Choose on
the validation columns; the test columns check the choice.

    python benchmarks/probe_tta.py standard standard-30 subtle [--arms precise tutorial] [--out runs/bench_recipe]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# name: the in-plane turns (degrees) whose probabilities are averaged
VARIANTS = {
    "none": (0.0,),
    "0,±5": (0.0, -5.0, 5.0),
    "0,±5,±10": (0.0, -5.0, 5.0, -10.0, 10.0),
    "training 6": (-20.0, -10.0, -5.0, 5.0, 10.0, 20.0),
    "0 + training 6": (0.0, -20.0, -10.0, -5.0, 5.0, 10.0, 20.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+")
    parser.add_argument("--arms", nargs="+", default=["precise", "tutorial"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recipe")
    arguments = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from sets import SHARED_CACHES, kept_runs
    from preprocess.cache import CacheReader
    from train.network.scores import compute_roc_auc
    from train.pipeline.augment import rotate_volume
    from train.rundir.models import load_run_model

    angles = sorted({angle for turns in VARIANTS.values() for angle in turns})
    for name in arguments.sets:
        with CacheReader(arguments.out / f"{SHARED_CACHES.get(name, name)}.h5") as reader:
            labels = reader.labels
            held_out = {split: np.sort(reader.split(split)) for split in ("val", "test")}
            turned = {(split, angle): np.stack([rotate_volume(reader.read_volume(row), angle).numpy()
                                                for row in rows])[..., None]
                      for split, rows in held_out.items() for angle in angles}
        results: dict[str, list[dict]] = {}
        for arm in arguments.arms:
            for run_dir in kept_runs(arguments.out / name, arm):
                model = load_run_model(run_dir)
                probabilities = {key: model.predict(volumes, batch_size=6, verbose=0).ravel().astype(np.float64)
                                 for key, volumes in turned.items()}
                row = {f"{split} {variant}": compute_roc_auc(
                           labels[rows], np.mean([probabilities[split, angle] for angle in turns], axis=0))
                       for split, rows in held_out.items() for variant, turns in VARIANTS.items()}
                results.setdefault(arm, []).append(row)
                print(f"{name} {run_dir.name}: " + "; ".join(
                    f"{split} " + " ".join(f"{row[f'{split} {variant}']:.4f}" for variant in VARIANTS)
                    for split in held_out), flush=True)
                tf.keras.backend.clear_session()
        print(f"\n{name}: AUC mean ± sd over seeds (worst)")
        print("| arm | split | " + " | ".join(VARIANTS) + " |")
        print("|---|---|" + "---|" * len(VARIANTS))
        for arm, rows in results.items():
            for split in held_out:
                cells = []
                for variant in VARIANTS:
                    values = [row[f"{split} {variant}"] for row in rows]
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f} ({min(values):.4f})")
                print(f"| {arm} ({len(rows)}) | {split} | " + " | ".join(cells) + " |")
        print(flush=True)


if __name__ == "__main__":
    main()
