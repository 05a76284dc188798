"""Can the network learn a 0.1-1% lesion from 84 scans when the anatomy cannot tell the classes apart?

bench_lesions.py's 84 set draws every phantom's body, lungs, vessels and noise anew, and the
default recipe learns those 84 anatomies by heart (training AUC 0.91-1.00) while unseen phantoms
stay at chance. This probe draws 60 twin pairs instead: each abnormal phantom is its normal twin
plus lesions (`make_phantom` with the same seed and study number; the noise too is the twin's), so
that nothing but the lesion goes with the label and memorising anatomy cannot lower the loss.
Lesions cover 0.1-1% of the lung (log-uniform), 128 x 128, 16-32 slices, synth seed 301, built at
64 x 64 x 32 with the lung crop, trained 30 epochs like bench_lesions.py's `crop-b8` (the default).
Both twins of a pair land in the same split (see `write_twins`), so the validation and test
pairs are anatomies the network never saw; the verdict is the AUC on bench_lesions.py's 100 more
phantoms (synth seed 302, not twins). (A first version let twins fall on both sides of a split:
memorising the anatomy of the 26 pairs split that way gave validation AUCs of 0.04-0.10.)

    python benchmarks/probe_twin_phantoms.py [--seeds 2] [--pairs 60] [--out runs/probe_twins]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_demo_head import predict  # noqa: E402
from bench_lesions import EPOCHS, INVOLVEMENT, SHAPE, SIZE, SLICES, auc, fractions, mean_sd, synth  # noqa: E402
from sets import print_machine, python  # noqa: E402

SEED = 301  # bench_lesions.py's sets


def write_twins(out: Path, pairs: int) -> Path:
    """`pairs` normal phantoms in CT-0 and their abnormal twins in CT-1, named so that each pair
    lands in one split: `build` ranks each class's scan ids by a seeded hash (`make_splits`, seed 0)
    and cuts the ranking at the same counts, so the i-th ranked normal's twin takes the i-th
    ranked abnormal name."""
    from preprocess.engine.splits import scan_rank
    from preprocess.phantoms.synth import make_phantom, write_phantom

    if not out.is_dir():
        partial = out.with_name(out.name + ".partial")
        for folder in ("CT-0", "CT-1"):
            (partial / folder).mkdir(parents=True, exist_ok=True)
        normal_names = sorted((f"study_{number:04d}" for number in range(pairs)),
                              key=lambda name: scan_rank(f"CT-0/{name}", 0))
        twin_names = sorted((f"twin_{number:04d}" for number in range(pairs)),
                            key=lambda name: scan_rank(f"CT-1/{name}", 0))
        for normal_name, twin_name in zip(normal_names, twin_names):
            number = int(normal_name.split("_")[1])
            write_phantom(make_phantom(SEED, number, False, SIZE, SLICES), partial / "CT-0" / f"{normal_name}.nii.gz")
            write_phantom(make_phantom(SEED, number, True, SIZE, SLICES, None, fractions(INVOLVEMENT)),
                          partial / "CT-1" / f"{twin_name}.nii.gz")
        partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="training seeds (0 .. N-1)")
    parser.add_argument("--pairs", type=int, default=60, help="twin pairs (60: 84 training scans, as the 84 set)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "probe_twins", help="runs (kept)")
    arguments = parser.parse_args()
    print_machine()
    arguments.out.mkdir(parents=True, exist_ok=True)
    more = synth(arguments.out / "more100", 50, 50, 302)
    raw = write_twins(arguments.out / f"paired{arguments.pairs}-raw", arguments.pairs)
    cache = arguments.out / f"paired{arguments.pairs}-lungs.h5"
    if not cache.is_file():
        python("preprocess", "build", "--raw", str(raw), "--out", str(cache), "--shape", *map(str, SHAPE), "--quiet")
    print("| seed | fit s | training loss at the end | val AUC (twins) | test AUC (twins) | 100 more AUC |")
    print("|---|---|---|---|---|---|")
    more_aucs = []
    for seed in range(arguments.seeds):
        name = f"paired{arguments.pairs}-seed{seed}"
        run_dir, seconds_file = arguments.out / name, arguments.out / f"{name}.seconds"
        if not (run_dir / "metrics.json").is_file():
            start = time.perf_counter()
            python("train", "fit", str(cache), "--run-dir", str(run_dir), *(["--resume"] if run_dir.exists() else []),
                   "--epochs", str(EPOCHS), "--padding", "same", "--seed", str(seed), "--quiet",
                   log=arguments.out / f"{name}.log")
            seconds_file.write_text(f"{time.perf_counter() - start:.1f}\n")
        seconds = float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
        history = (run_dir / "history.csv").read_text().splitlines()
        header, last = history[0].split(","), history[-1].split(",")
        loss, val_auc = float(last[header.index("loss")]), float(last[header.index("val_auc")])
        test_auc = json.loads((run_dir / "metrics.json").read_text())["auc"]
        more_aucs.append(auc(*predict(run_dir, more)))
        print(f"| {seed} | {seconds:.0f} | {loss:.2f} | {val_auc:.3f} | {test_auc:.3f} | {more_aucs[-1]:.3f} |",
              flush=True)
    print(f"twins, {arguments.pairs} pairs, crop, batch 8, {EPOCHS} epochs: 100 more AUC {mean_sd(more_aucs)} "
          f"over {len(more_aucs)} seeds")


if __name__ == "__main__":
    main()
