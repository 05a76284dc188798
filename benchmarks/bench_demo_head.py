"""The demo's head: global average pooling (the tutorial's, the default) against avgmax, over seeds.

On the demo's cache (`make demo` builds it: 360 phantoms, 64 x 64 x 16), each head is trained as
`make demo` trains (16 epochs, --padding same, the default recipe) with seeds 0 .. N-1, and each
run's model predicts the demo's four unseen phantoms (data/synthetic-unseen, synth seed 1) and 40
more (20 of each class, synth seed 2, written into --out). For each run it prints the test AUC
(metrics.json), how many of the 4 and of the 40 are called rightly at 0.5, and the AUC on the 40;
then mean ± sd per head. Runs are real `python -m train fit` processes, kept in --out: a finished
run is read, not repeated.

    make demo   # once: the cache and the four unseen phantoms
    python benchmarks/bench_demo_head.py [--seeds 3] [--out runs/bench_demo_head]   # ~20 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sets import python  # noqa: E402  (a `python -m` subprocess with the repository on its path)

CACHE = ROOT / "data" / "demo.h5"
DEMO_UNSEEN = ROOT / "data" / "synthetic-unseen"
HEADS = ("avg", "avgmax")
EPOCHS = 16


def predict(run_dir: Path, folder: Path) -> tuple[list[int], list[float]]:
    """Labels (CT-0: 0, else 1) and p(abnormal) of every scan in `folder`, from `train predict --json`."""
    scans = sorted(folder.glob("CT-*/*.nii.gz"))
    output = subprocess.run([sys.executable, "-m", "train", "predict", str(run_dir), *map(str, scans), "--json"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
                            check=True, capture_output=True, text=True).stdout
    predictions = json.loads(output)
    return ([0 if Path(prediction["scan"]).parent.name == "CT-0" else 1 for prediction in predictions],
            [prediction["probability_abnormal"] for prediction in predictions])


def score(labels: list[int], probabilities: list[float]) -> tuple[int, float]:
    """Scans called rightly at 0.5, and the AUC (ties count half)."""
    from train.network.scores import compute_roc_auc

    right = sum((probability >= 0.5) == bool(label) for label, probability in zip(labels, probabilities))
    return right, compute_roc_auc(labels, probabilities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per head (0 .. N-1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_demo_head", help="runs (kept)")
    arguments = parser.parse_args()
    if not CACHE.is_file() or not DEMO_UNSEEN.is_dir():
        sys.exit(f"{CACHE} or {DEMO_UNSEEN} is missing: run `make demo` first")
    arguments.out.mkdir(parents=True, exist_ok=True)
    unseen40 = arguments.out / "unseen40"
    if not unseen40.is_dir():
        python("preprocess", "synth", "--out", str(unseen40), "--normal", "20", "--abnormal", "20", "--size", "128",
               "--seed", "2", "--quiet")
    print("| head | seed | test AUC (54) | unseen 4: right | unseen 40: right at 0.5 | unseen 40: AUC |")
    print("|---|---|---|---|---|---|")
    results: dict[str, list[tuple[float, int, int, float]]] = {head: [] for head in HEADS}
    for head in HEADS:
        for seed in range(arguments.seeds):
            run_dir = arguments.out / f"{head}-seed{seed}"
            if not (run_dir / "metrics.json").is_file():
                resume = ["--resume"] if run_dir.exists() else []
                python("train", "fit", str(CACHE), "--run-dir", str(run_dir), *resume, "--epochs", str(EPOCHS),
                       "--padding", "same", "--pooling", head, "--seed", str(seed), "--quiet",
                       log=run_dir.parent / f"{run_dir.name}.log")
            test_auc = json.loads((run_dir / "metrics.json").read_text())["auc"]
            right4, _ = score(*predict(run_dir, DEMO_UNSEEN))
            right40, auc40 = score(*predict(run_dir, unseen40))
            results[head].append((test_auc, right4, right40, auc40))
            print(f"| {head} | {seed} | {test_auc:.3f} | {right4} | {right40} | {auc40:.3f} |", flush=True)
    for head, rows in results.items():
        columns = list(zip(*rows))
        spread = [f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"
                  for values in columns]
        print(f"{head}: test AUC {spread[0]}, unseen 4 right {spread[1]}, unseen 40 right {spread[2]}, "
              f"unseen 40 AUC {spread[3]} ({len(rows)} seeds)")


if __name__ == "__main__":
    main()
