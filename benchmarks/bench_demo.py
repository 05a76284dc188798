"""The demo's configuration: how short `make demo` can be and still learn, over seeds, timed.

Each arm is a cache shape and `fit` flags, trained on the demo's phantoms (data/synthetic, which
`make demo` writes: 360 phantoms, 128 x 128, 8-15 slices) with seeds 0 .. N-1. For each run it
prints the fit's wall-clock seconds (the whole `python -m train fit` process: start-up, every
epoch, the test split), the test AUC (54 scans), degenerate validation epochs (every validation
scan called one class), how many of the demo's four unseen phantoms (data/synthetic-unseen) and
of 40 more (20 of each class, synth seed 2) are called rightly at 0.5, and the AUC on the 40.
The demo's bar (issue 23): test AUC >= 0.95, 4 of 4 unseen right, no degenerate epoch, and all
of `make demo` within 5 minutes on a 2-core AVX2 CPU. Runs are real processes, kept in --out: a
finished run is read, not repeated (its seconds are read from its log).

    make demo   # once: the phantoms and the four unseen ones
    python benchmarks/bench_demo.py [--arms 64x16-e12 64x16-w0.5-e16 ...] [--seeds 3] [--out runs/bench_demo]   # 10-25 min an arm
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_demo_head import predict, score  # noqa: E402
from sets import print_machine, python  # noqa: E402

DEMO_RAW = ROOT / "data" / "synthetic"
DEMO_UNSEEN = ROOT / "data" / "synthetic-unseen"
DEMO_FLAGS = ["--padding", "same", "--pooling", "avgmax"]
ARMS = {  # name: (cache shape, fit flags beyond the demo's)
    "64x16-e16": ((64, 64, 16), ["--epochs", "16"]),  # the demo before issue 23
    "64x16-e7": ((64, 64, 16), ["--epochs", "7"]),
    "64x16-e8": ((64, 64, 16), ["--epochs", "8"]),
    "64x16-e10": ((64, 64, 16), ["--epochs", "10"]),
    "64x16-e12": ((64, 64, 16), ["--epochs", "12"]),  # the demo before --width
    "48x16-e12": ((48, 48, 16), ["--epochs", "12"]),
    "48x16-e10": ((48, 48, 16), ["--epochs", "10"]),
    "64x16-w0.5-e12": ((64, 64, 16), ["--epochs", "12", "--width", "0.5"]),
    "64x16-w0.5-e16": ((64, 64, 16), ["--epochs", "16", "--width", "0.5"]),  # the demo since --width
    "64x16-w0.5-e16-lr6e-4": ((64, 64, 16), ["--epochs", "16", "--width", "0.5", "--lr", "6e-4"]),
    "64x16-w0.5-e20": ((64, 64, 16), ["--epochs", "20", "--width", "0.5"]),
    "64x16-w0.5-e16-b8": ((64, 64, 16), ["--epochs", "16", "--width", "0.5", "--batch-size", "8"]),
    "64x16-w0.5-e16-b4": ((64, 64, 16), ["--epochs", "16", "--width", "0.5", "--batch-size", "4"]),
    "64x16-w0.5-e16-nocrop": ((64, 64, 16), ["--epochs", "16", "--width", "0.5"], ["--crop", "none"]),
    "64x16-w0.5-e16-rms": ((64, 64, 16), ["--epochs", "16", "--width", "0.5", "--augment", "rotate-mirror-shift"]),
    # the demo's phantoms written with their lesion masks (`synth --masks`): `fit` trains the lesion-map model
    "64x16-w0.5-e16-masks": ((64, 64, 16), ["--epochs", "16", "--width", "0.5"], ["--masks"]),
    # the same, its call's offset learned by gradient alone, as before --call-offset refit
    "64x16-w0.5-e16-masks-learned": ((64, 64, 16), ["--epochs", "16", "--width", "0.5", "--call-offset", "learned"],
                                     ["--masks"]),
}


def make_cache(out: Path, shape: tuple[int, int, int], build_flags=()) -> Path:
    """The demo's phantoms cached at `shape`; build flag `--masks` here means: the same phantoms written
    with their lesion masks (the Makefile's synth, plus --masks), cached with them."""
    cache = out / f"demo-{'x'.join(map(str, shape))}{''.join(build_flags)}.h5"
    raw = DEMO_RAW
    if "--masks" in build_flags:
        build_flags, raw = [flag for flag in build_flags if flag != "--masks"], out / "demo-raw-masks"
        if not raw.is_dir():
            python("preprocess", "synth", "--out", str(raw), "--normal", "180", "--abnormal", "180", "--size", "128",
                   "--masks", "--quiet")
    if not cache.is_file():
        python("preprocess", "build", "--raw", str(raw), "--out", str(cache), "--shape", *map(str, shape),
               *build_flags, "--quiet")
    return cache


def degenerate_epochs(run_dir: Path) -> int:
    with open(run_dir / "history.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return sum(1 for row in rows if float(row["val_sensitivity"]) == 0 or float(row["val_specificity"]) == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["64x16-e12", "64x16-w0.5-e16", "64x16-w0.5-e12"],
                        choices=sorted(ARMS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0 .. N-1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_demo", help="runs (kept)")
    arguments = parser.parse_args()
    if not DEMO_RAW.is_dir() or not DEMO_UNSEEN.is_dir():
        sys.exit(f"{DEMO_RAW} or {DEMO_UNSEEN} is missing: run `make demo` first")
    print_machine()
    arguments.out.mkdir(parents=True, exist_ok=True)
    unseen40 = arguments.out / "unseen40"
    if not unseen40.is_dir():
        python("preprocess", "synth", "--out", str(unseen40), "--normal", "20", "--abnormal", "20", "--size", "128",
               "--seed", "2", "--quiet")
    print("| arm | seed | fit seconds | test AUC (54) | degenerate epochs | unseen 4: right "
          "| unseen 40: right at 0.5 | unseen 40: AUC |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, list[tuple]] = {arm: [] for arm in arguments.arms}
    for arm in arguments.arms:
        shape, flags, *build_flags = ARMS[arm]
        cache = make_cache(arguments.out, shape, *build_flags)
        for seed in range(arguments.seeds):
            run_dir = arguments.out / f"{arm}-seed{seed}"
            seconds_file = arguments.out / f"{arm}-seed{seed}.seconds"
            if not (run_dir / "metrics.json").is_file():
                start = time.perf_counter()
                python("train", "fit", str(cache), "--run-dir", str(run_dir), *DEMO_FLAGS, *flags,
                       "--seed", str(seed), log=arguments.out / f"{arm}-seed{seed}.log")
                seconds_file.write_text(f"{time.perf_counter() - start:.1f}\n")
            seconds = float(seconds_file.read_text())
            test_auc = json.loads((run_dir / "metrics.json").read_text())["auc"]
            right4, _ = score(*predict(run_dir, DEMO_UNSEEN))
            right40, auc40 = score(*predict(run_dir, unseen40))
            row = (seconds, test_auc, degenerate_epochs(run_dir), right4, right40, auc40)
            results[arm].append(row)
            print(f"| {arm} | {seed} | {seconds:.0f} | {test_auc:.3f} | {row[2]} | {right4} | {right40} "
                  f"| {auc40:.3f} |", flush=True)
    for arm, rows in results.items():
        columns = list(zip(*rows))
        spread = [f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"
                  for values in columns]
        print(f"{arm}: fit {spread[0]} s, test AUC {spread[1]}, degenerate epochs {spread[2]}, unseen 4 right "
              f"{spread[3]}, unseen 40 right {spread[4]}, unseen 40 AUC {spread[5]} ({len(rows)} seeds; worst "
              f"test AUC {min(columns[1]):.3f}, fewest unseen 4 right {min(columns[3])})")


if __name__ == "__main__":
    main()
