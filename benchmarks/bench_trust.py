"""Can the predictions be trusted? Calibration, false flags and detection of unlike scans, over seeds.

For each set and seed it trains the demo's configuration as it was when this was measured (64 x 64
x 16, --padding same, --pooling avgmax, 12 epochs, the full-width network, default recipe; the demo
is now --width 0.5 for 16 epochs) with a real `python -m train fit`, then runs a real
`python -m train predict --json` on scans the model never saw, and prints mean ± sd over seeds:

- ECE (equal-count bins of the predicted class's confidence) on the test split, before and after
  calibration, with Brier and NLL (from the run's metrics.json);
- the false-flag rate on in-distribution held-out phantoms: UNSEEN phantoms of the same kind
  drawn with another synth seed (never in any split);
- the detection rate of each kind of unlike scan (flagged by a hard check or by a distribution
  check), made from UNLIKE of those unseen phantoms, plus the real CT volumes in ../shared/realct:
    realct      the three real CT volumes (a phantom-trained model has never seen real anatomy)
    rescaled    HU linearly rescaled to [0, 1]
    mr-like     no air; tissue at 20-800 in arbitrary units with another histogram (an MR-like volume)
    noise       uniform noise in [-1000, 1000] HU, the phantom's header
    5mm         the phantom resampled to 5 mm voxels (its field of view unchanged)
    crop-third  the middle third of the field of view in-plane, spacing kept
    transposed  the array's first and last axes swapped, the header not updated
    flipped     upside down (front-back flipped) and head-foot flipped, the header not updated
- which check flagged them (histogram, features, geometry, hard), to compare the detectors;
- the cost of the checks per scan in predict (statistics, hard checks, distribution checks)
  against the model's forward pass, timed in this process on one run.

Sets (the bench_recipe sets' phantoms, never the demo's or the tests'):
  standard  `synth --seed 101`, normal against ungraded lesions, 360 phantoms (252 / 54 / 54)
  subtle    `synth --grades 1 --seed 102`, normal against CT-1 only (<25% of the lung), 360 phantoms

Runs are kept in --out; a finished run there is reused, so an interrupted benchmark continues.

    python benchmarks/bench_trust.py [--seeds 3] [--sets standard subtle] [--out runs/bench_trust]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before describe_machine imports TensorFlow
from sets import SETS as RECIPE_SETS, print_machine  # noqa: E402
SHAPE = (64, 64, 16)
EPOCHS = 12
SETS = {name: RECIPE_SETS[name][0] for name in ("standard", "subtle")}  # synth flags: bench_recipe's phantoms
UNSEEN_SEED_OFFSET = 1000  # the unseen phantoms: synth seed = the set's seed + this
PHANTOMS = 360
UNSEEN = 40
UNLIKE = 10
KINDS = ("realct", "rescaled", "mr-like", "noise", "5mm", "crop-third", "transposed", "flipped")
REAL_CT = ROOT.parent / "shared" / "realct"


def python(*arguments: str, log: Path | None = None, capture: bool = False) -> str:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if capture:
        result = subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=environment, capture_output=True,
                                text=True)
        if result.returncode not in (0, 1, 3):
            sys.exit(f"{' '.join(arguments[:2])} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout
    with open(log or os.devnull, "w") as output:
        subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=environment, check=True, stdout=output,
                       stderr=subprocess.STDOUT)
    return ""


def set_seed(name: str) -> int:
    flags = SETS[name]
    return int(flags[flags.index("--seed") + 1])


def make_cache(out: Path, name: str) -> Path:
    cache = out / f"{name}.h5"
    if not cache.is_file():
        raw = out / f"{name}-raw"
        python("preprocess", "synth", "--out", str(raw), "--normal", str(PHANTOMS // 2), "--abnormal",
               str(PHANTOMS - PHANTOMS // 2), "--size", "128", "--quiet", *SETS[name])
        python("preprocess", "build", "--raw", str(raw), "--out", str(cache), "--shape", *map(str, SHAPE), "--quiet")
    return cache


def make_unseen(out: Path, name: str) -> list[Path]:
    """UNSEEN phantoms of the set's kind from another synth seed: in distribution, never in any split."""
    raw = out / f"{name}-unseen"
    if not raw.is_dir():
        flags = list(SETS[name])
        flags[flags.index("--seed") + 1] = str(set_seed(name) + UNSEEN_SEED_OFFSET)
        python("preprocess", "synth", "--out", str(raw), "--normal", str(UNSEEN // 2), "--abnormal",
               str(UNSEEN - UNSEEN // 2), "--size", "128", "--quiet", *flags)
    return sorted(raw.rglob("*.nii.gz"))


def unlike_scans(folder: Path, phantoms: list[Path]) -> dict[str, list[Path]]:
    """Each kind of unlike scan, written as real NIfTI files from the first UNLIKE unseen phantoms."""
    import nibabel as nib
    from scipy import ndimage

    kinds = {"realct": sorted(REAL_CT.glob("*.nii.gz"))}
    rng = np.random.default_rng(0)
    for kind in KINDS[1:]:
        target = folder / kind
        target.mkdir(parents=True, exist_ok=True)
        kinds[kind] = []
        for index, phantom in enumerate(phantoms[:UNLIKE]):
            path = target / f"{kind}-{index:02d}.nii.gz"
            kinds[kind].append(path)
            if path.is_file():
                continue
            image = nib.load(phantom)
            hu = np.asarray(image.dataobj, dtype=np.float32)
            affine = image.affine.copy()
            spacing = np.abs(np.diag(affine)[:3])
            if kind == "rescaled":
                data = (np.clip(hu, -1024, 3071) + 1024) / 4095
            elif kind == "mr-like":
                data = np.where(hu < -500, 20.0, 300.0 + 0.4 * (hu + 1000)).astype(np.float32)
            elif kind == "noise":
                data = rng.uniform(-1000, 1000, hu.shape).astype(np.float32)
            elif kind == "5mm":
                data = ndimage.zoom(hu, spacing / 5.0, order=1).astype(np.float32)
                affine = np.diag([5.0, 5.0, 5.0, 1.0])
            elif kind == "crop-third":
                third = hu.shape[0] // 3
                data = hu[third: 2 * third, third: 2 * third, :]
            elif kind == "transposed":
                data = np.ascontiguousarray(np.swapaxes(hu, 0, 2))
            else:  # flipped
                data = np.ascontiguousarray(hu[:, ::-1, ::-1])
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return kinds


def train(out: Path, name: str, seed: int, cache: Path) -> Path:
    run_dir = out / f"{name}-seed{seed}"
    if not (run_dir / "metrics.json").is_file():
        python("train", "fit", str(cache), "--run-dir", str(run_dir), "--epochs", str(EPOCHS), "--padding", "same",
               "--pooling", "avgmax", "--seed", str(seed), "--quiet", *(["--resume"] if run_dir.exists() else []),
               log=out / f"{name}-seed{seed}.log")
    return run_dir


def predict(run_dir: Path, scans: list[Path]) -> list[dict]:
    return json.loads(python("train", "predict", str(run_dir), *map(str, scans), "--json", capture=True))


def flagged_by(document: dict) -> set[str]:
    """Which checks flagged a scan: "hard" for a scan refused before the model."""
    if document.get("error"):
        return {"hard"} if document.get("in_distribution") is False else {"unreadable"}
    return {check for check, score in document.get("ood_scores", {}).items() if score.get("flagged")}


def mean_sd(values: list[float]) -> str:
    values = [value for value in values if value == value]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def percent(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f}% ± {100 * sd:4.1f}"


def time_checks(run_dir: Path, scans: list[Path], repeats: int = 3) -> dict[str, float]:
    """Milliseconds per scan of each step of predict, in this process: preprocessing with the statistics,
    the hard checks, the model's forward pass, the distribution checks."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import train  # noqa: F401  oneDNN where it helps, as the CLI gets it
    from preprocess.reading.nifti import open_scan
    from preprocess.reading.scan_stats import StatsAccumulator, hard_problems
    from preprocess.reading.transform import SLAB_SLICES, preprocess_scan
    from train.tensorflow_import import load_tensorflow

    load_tensorflow()
    from train.trust.served import load_served, open_configs

    [member] = load_served(*open_configs(run_dir))
    timings = {"preprocess (with statistics)": [], "  of which the statistics": [], "hard checks": [],
               "forward pass": [], "distribution checks": []}
    for _ in range(repeats):
        for scan in scans:
            opened = open_scan(scan)  # the statistics alone, on the slabs preprocess_scan takes them from
            slabs = [opened.hounsfield(slice(start, start + SLAB_SLICES))
                     for start in range(0, opened.stored.shape[2], SLAB_SLICES)]
            start = time.perf_counter()
            accumulator = StatsAccumulator(opened.stored.shape, opened.info.spacing_mm)
            for slab in slabs:
                accumulator.add(slab)
            accumulator.result()
            timings["  of which the statistics"].append(time.perf_counter() - start)
            start = time.perf_counter()
            volume, info = preprocess_scan(scan, SHAPE, -1000.0, 400.0)
            timings["preprocess (with statistics)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            hard_problems(info.stats)
            timings["hard checks"].append(time.perf_counter() - start)
            start = time.perf_counter()
            features, logits = member.outputs(volume[None])
            member.probabilities(logits)
            timings["forward pass"].append(time.perf_counter() - start)
            start = time.perf_counter()
            member.reference.judge(features[0], info.stats)
            timings["distribution checks"].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values[len(scans):] or values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_trust")
    arguments = parser.parse_args()
    out = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    print_machine()
    print(f"configuration: {'x'.join(map(str, SHAPE))}, {EPOCHS} epochs, width 1, avgmax pooling; {arguments.seeds} seeds; "
          f"{UNSEEN} unseen phantoms per set, {UNLIKE} of each kind of unlike scan (realct: 3)", flush=True)
    timed_run = None
    for name in arguments.sets:
        cache = make_cache(out, name)
        unseen = make_unseen(out, name)
        kinds = unlike_scans(out / f"{name}-unlike", unseen)
        rows = []
        for seed in range(arguments.seeds):
            start = time.time()
            run_dir = train(out, name, seed, cache)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            calibration = metrics["calibration"]
            documents = predict(run_dir, unseen + [scan for kind in KINDS for scan in kinds[kind]])
            in_distribution, rest = documents[:len(unseen)], documents[len(unseen):]
            by_kind, position = {}, 0
            for kind in KINDS:
                by_kind[kind] = rest[position: position + len(kinds[kind])]
                position += len(kinds[kind])
            row = {
                "auc": metrics["auc"], "temperature": calibration["temperature"],
                "ece_before": calibration["before"]["ece"], "ece_after": calibration["after"]["ece"],
                "brier_before": calibration["before"]["brier"], "brier_after": calibration["after"]["brier"],
                "nll_before": calibration["before"]["nll"], "nll_after": calibration["after"]["nll"],
                "false_flags": float(np.mean([document["in_distribution"] is False for document in in_distribution])),
                "false_flags_by_check": {check: float(np.mean([check in flagged_by(document)
                                                               for document in in_distribution]))
                                         for check in ("histogram", "features", "geometry")},
                "unseen_accuracy": float(np.mean([
                    document["predicted_class"] == ("abnormal" if "/CT-0/" not in document["scan"] else "normal")
                    for document in in_distribution])),
                "detected": {kind: float(np.mean([document["in_distribution"] is False for document in documents]))
                             for kind, documents in by_kind.items()},
                "detected_by_check": {kind: {check: float(np.mean([check in flagged_by(document) for document in docs]))
                                             for check in ("hard", "histogram", "features", "geometry")}
                                      for kind, docs in by_kind.items()},
            }
            rows.append(row)
            timed_run = timed_run or (run_dir, unseen[:10])
            print(f"{name} seed {seed}: test AUC {row['auc']:.3f}, T {row['temperature']:.2f}, ECE "
                  f"{row['ece_before']:.3f} -> {row['ece_after']:.3f}, false flags {100 * row['false_flags']:.1f}%, "
                  f"detected " + ", ".join(f"{kind} {100 * rate:.0f}%" for kind, rate in row["detected"].items())
                  + f" ({time.time() - start:.0f} s)", flush=True)
        print(f"\n== {name}: {len(rows)} seeds, test split {metrics['scans']} scans, ECE over "
              f"{calibration['ece_bins']} equal-count bins ==")
        print(f"test AUC                 {mean_sd([row['auc'] for row in rows])}")
        print(f"temperature              {mean_sd([row['temperature'] for row in rows])}")
        for measure in ("ece", "brier", "nll"):
            print(f"{measure.upper():<6} before -> after  {mean_sd([row[measure + '_before'] for row in rows])}  ->  "
                  f"{mean_sd([row[measure + '_after'] for row in rows])}")
        print(f"unseen phantoms called right  {percent([row['unseen_accuracy'] for row in rows])}")
        print(f"false flags on {UNSEEN} unseen phantoms  {percent([row['false_flags'] for row in rows])}   by check: "
              + ", ".join(f"{check} {percent([row['false_flags_by_check'][check] for row in rows])}"
                          for check in ("histogram", "features", "geometry")))
        print(f"{'kind':<12}{'detected':>18}   by check (hard, histogram, features, geometry)")
        for kind in KINDS:
            checks = ", ".join(f"{percent([row['detected_by_check'][kind][check] for row in rows])}"
                               for check in ("hard", "histogram", "features", "geometry"))
            print(f"{kind:<12}{percent([row['detected'][kind] for row in rows]):>18}   {checks}")
        (out / f"{name}-summary.json").write_text(json.dumps(rows, indent=1))
    if timed_run is not None:
        print("\ncost per scan in predict (median ms, one run, 10 unseen 128x128 phantoms):")
        for step, milliseconds in time_checks(*timed_run).items():
            print(f"  {step:<30}{milliseconds:8.1f}")


if __name__ == "__main__":
    main()
