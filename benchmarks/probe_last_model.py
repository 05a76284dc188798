"""Best-validation model against the last epoch's, on the kept runs of bench_recipe.py.

For every finished run of a set, prints the test AUC of the model `fit` chose (best validation
AUC, metrics.json) and the validation and test AUC of the run's last-epoch model. On a small
validation split the choice of the best epoch can follow noise; this shows whether it does.

    python benchmarks/probe_last_model.py standard-120 subtle-120 [--out runs/bench_recipe]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recipe")
    arguments = parser.parse_args()

    import numpy as np

    from sets import SHARED_CACHES
    from preprocess.cache import CacheReader
    from train.network.scores import compute_roc_auc
    from train.rundir.models import load_trained_model

    for name in arguments.sets:
        with CacheReader(arguments.out / f"{SHARED_CACHES.get(name, name)}.h5") as reader:
            labels = reader.labels
            held_out = {split: np.sort(reader.split(split)) for split in ("val", "test")}
            volumes = {split: np.stack([reader.read_volume(row) for row in rows])[..., None]
                       for split, rows in held_out.items()}
        by_arm: dict[str, list[tuple[float, float]]] = {}
        for run_dir in sorted((arguments.out / name).glob("*-seed*")):
            if not (run_dir / "metrics.json").is_file():
                continue
            best = json.loads((run_dir / "metrics.json").read_text())
            last = load_trained_model(sorted(run_dir.glob("last-epoch-*.keras"))[-1])
            auc = {split: compute_roc_auc(labels[indices],
                                          last.predict(volumes[split], batch_size=6, verbose=0).ravel())
                   for split, indices in held_out.items()}
            print(f"{name} {run_dir.name}: best (epoch {best['best_epoch']}) test AUC {best['auc']:.3f} | "
                  f"last epoch: val AUC {auc['val']:.3f}, test AUC {auc['test']:.3f}", flush=True)
            by_arm.setdefault(run_dir.name.rsplit("-seed", 1)[0], []).append((best["auc"], auc["test"]))
        for arm, pairs in by_arm.items():
            best_aucs, last_aucs = zip(*pairs)
            print(f"{name} {arm} ({len(pairs)} seeds): test AUC best-validation model {statistics.mean(best_aucs):.3f}, "
                  f"last-epoch model {statistics.mean(last_aucs):.3f}")


if __name__ == "__main__":
    main()
