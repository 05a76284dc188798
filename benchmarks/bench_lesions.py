"""Small findings: how many scans and epochs the network needs to learn a lesion of 0.1-1% of the lung.

Issue 30's benchmark. Phantoms whose abnormal scans carry lesions covering 0.1-1% of the lung
(`synth --involvement 0.1 1`, log-uniform: mild CT-1), 128 x 128 pixels, 16-32 slices, built into
64 x 64 x 32 caches with and without the lung crop, trained 30 epochs with `--padding same` and
the default recipe. Arms (each a lever alone, then together):

    today     --crop none,  --batch-size 2   (the defaults before issue 30)
    crop      --crop lungs, --batch-size 2
    batch8    --crop none,  --batch-size 8
    crop-b4   --crop lungs, --batch-size 4
    crop-b8   --crop lungs, --batch-size 8
    and more levers on top of crop-b4/b8 or crop (b2): avgmax pooling, rates, GroupNorm and
    InstanceNorm, a lung window (`-lungwin`: build --hu-window -1000 -300), mirror-and-shift
    augmentation (`-rms`: fit --augment rotate-mirror-shift), float32 (`-fp32`: fit --precision
    float32, where `auto` picks bfloat16); see ARMS
    crop-b8-masks: crop-b8 on a cache with the phantoms' lesion masks (`synth --masks`, found by
    `build`), so `fit` trains the lesion-map model by default (docs/training.md, "Lesion masks");
    crop-b8-masks25: the same with masks for only every fourth abnormal scan (as MosMedData has masks
    for some of its CT-1 scans); crop-b8-masks-lr1e-3 and -lr3e-4: crop-b8-masks at a named peak rate
    (a lesion-map run's default is 1e-3, the default recipe's 3e-4); every other arm's cache is built
    `--no-masks`

Sets: `84` (120 phantoms: 84 train, 18 val, 18 test) and `252` (360 phantoms), synth seed 301.
For every run it prints the first epoch whose validation AUC reached 0.95 (history.csv; "-" if
none), the test AUC at the last epoch (metrics.json), the AUC on 100 more 0.1-1% phantoms (synth
seed 302, 50 of each class) and the AUC per involvement band (0.1-1%, 1-5%, 5-25%) on 40 normal
and 80 abnormal phantoms drawn 0.1-25% (synth seed 303): each band's abnormal scans against all 40
normal ones. Then mean ± sd per arm over seeds. Runs are real `python -m train fit` processes,
kept in --out: a finished run is read, not repeated.

    python benchmarks/bench_lesions.py [--sets 84 252] [--arms today crop crop-b8 ...] [--seeds 3] [--epochs 30]
        [--size 128] [--involvement 0.1 1] [--out runs/bench_lesions]

`--size` and `--involvement` draw other phantoms: give each its own `--out`.

A 30-epoch run on the 84 set takes 5-15 minutes on 2 CPU cores; see docs/benchmarks.md.
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
from bench_demo_head import predict  # noqa: E402
from sets import print_machine, python  # noqa: E402

SHAPE = (64, 64, 32)
SIZE, SLICES = 128, (16, 32)
EPOCHS = 30
INVOLVEMENT = ("0.1", "1")  # percent of the lung
SETS = {"84": 120, "252": 360}  # training scans: phantoms (70% train)
LUNG_WINDOW = ("-1000", "-300")  # aerated lung to the densest ground glass: no ground-glass voxel clipped
ARMS = {  # name: (build --crop, fit --batch-size, more fit flags[, build --hu-window])
    "today": ("none", 2, []),
    "crop": ("lungs", 2, []),
    "batch8": ("none", 8, []),
    "crop-b4": ("lungs", 4, []),
    "crop-b8": ("lungs", 8, []),
    "crop-b8-avgmax": ("lungs", 8, ["--pooling", "avgmax"]),
    "crop-b8-lr1e-3": ("lungs", 8, ["--lr", "1e-3"]),
    "crop-b8-avgmax-lr1e-3": ("lungs", 8, ["--pooling", "avgmax", "--lr", "1e-3"]),
    "crop-b2-group": ("lungs", 2, ["--norm", "group"]),
    "crop-b2-instance": ("lungs", 2, ["--norm", "instance"]),
    "crop-b4-lr6e-4": ("lungs", 4, ["--lr", "6e-4"]),
    "crop-b8-lungwin": ("lungs", 8, [], LUNG_WINDOW),
    "crop-b2-lungwin": ("lungs", 2, [], LUNG_WINDOW),
    "crop-b8-rms": ("lungs", 8, ["--augment", "rotate-mirror-shift"]),
    "crop-b2-rms": ("lungs", 2, ["--augment", "rotate-mirror-shift"]),
    "crop-b8-fp32": ("lungs", 8, ["--precision", "float32"]),
    "crop-b8-masks": ("lungs", 8, []),
    "crop-b8-masks25": ("lungs", 8, []),
    "crop-b8-masks-lr1e-3": ("lungs", 8, ["--lr", "1e-3"]),  # the lesion map's default rate since it was measured
    "crop-b8-masks-lr3e-4": ("lungs", 8, ["--lr", "3e-4"]),  # the default recipe's rate, the lesion map's before
    "crop-b8-masks-learned": ("lungs", 8, ["--call-offset", "learned"]),  # the call's offset as before refit
}
MASK_ARMS = {"crop-b8-masks": 1, "crop-b8-masks25": 4, "crop-b8-masks-lr1e-3": 1, "crop-b8-masks-lr3e-4": 1,
             "crop-b8-masks-learned": 1}  # their caches hold the masks of every Nth abnormal scan
BANDS = ((0.001, 0.01), (0.01, 0.05), (0.05, 0.25))
BAND_SET = (303, ("0.1", "25"))  # synth seed and --involvement of the phantoms the bands are measured on


def synth(out: Path, normal: int, abnormal: int, seed: int, involvement=None, masks: bool = False) -> Path:
    involvement = involvement or INVOLVEMENT  # read at call time: --involvement sets it
    if not out.is_dir():
        python("preprocess", "synth", "--out", str(out), "--normal", str(normal), "--abnormal", str(abnormal),
               "--size", str(SIZE), "--slices", *map(str, SLICES), "--involvement", *involvement,
               "--seed", str(seed), "--quiet", *(["--masks"] if masks else []))
    return out


def make_cache(out: Path, set_name: str, crop: str, window: tuple[str, str] | None = None, masks: int = 0) -> Path:
    """The set's cache; with `masks` N, from the same phantoms with the lesion masks of every Nth abnormal one."""
    scans = SETS[set_name]
    with_masks = "" if not masks else "-masks" if masks == 1 else f"-masks{100 // masks}"
    raw = out / f"set{set_name}-raw{with_masks}"
    if not raw.is_dir():
        synth(raw, scans // 2, scans - scans // 2, 301, masks=bool(masks))
        for index, mask in enumerate(sorted((raw / "masks").glob("*.nii.gz")) if masks else []):
            if index % masks:
                mask.unlink()
    windowed = "" if window is None else f"-hu{window[0]}_{window[1]}"
    cache = out / f"set{set_name}-{crop}{windowed}{with_masks}.h5"
    if not cache.is_file():
        python("preprocess", "build", "--raw", str(raw), "--out", str(cache), "--shape", *map(str, SHAPE),
               "--crop", crop, *(["--hu-window", *window] if window else []), *([] if masks else ["--no-masks"]),
               "--quiet")
    return cache


def fractions(involvement: tuple[str, str]) -> tuple[float, float]:
    """`--involvement` (percent of the lung, as strings) as fractions, as `make_phantom` takes them."""
    low, high = (float(value) / 100 for value in involvement)
    return low, high


def involvement_of(path: Path, seed: int, involvement: tuple[str, str]) -> float:
    """The lesion share of an abnormal phantom, redrawn from its seed (phantoms are deterministic)."""
    from preprocess.phantoms.synth import make_phantom

    number = int(path.name.split("_")[1].split(".")[0])
    return make_phantom(seed, number, True, SIZE, SLICES, None, fractions(involvement)).involvement


def auc(labels, scores) -> float:
    from train.network.scores import compute_roc_auc

    return compute_roc_auc(labels, scores)


def first_epoch_at(run_dir: Path, target: float = 0.95) -> int | None:
    with open(run_dir / "history.csv", newline="") as file:
        for number, row in enumerate(csv.DictReader(file), start=1):
            if float(row["val_auc"]) >= target:
                return number
    return None


def mean_sd(values) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    global SIZE, INVOLVEMENT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["84"], choices=sorted(SETS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0 .. N-1)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs a run (the issue's target: 30)")
    parser.add_argument("--size", type=int, default=128, help="phantoms' in-plane pixels (another size: another --out)")
    parser.add_argument("--involvement", nargs=2, default=INVOLVEMENT, metavar=("LOW", "HIGH"),
                        help="lesions' share of the lung, percent, of the sets and the 100 more "
                             "(another: another --out)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (another machine adds seeds)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_lesions", help="runs (kept)")
    arguments = parser.parse_args()
    SIZE, INVOLVEMENT = arguments.size, tuple(arguments.involvement)
    print_machine()
    arguments.out.mkdir(parents=True, exist_ok=True)
    more = synth(arguments.out / "more100", 50, 50, 302)
    band_seed, band_involvement = BAND_SET
    bands = synth(arguments.out / "bands", 40, 80, band_seed, band_involvement)
    band_share = {path.name: involvement_of(path, band_seed, band_involvement)
                  for path in sorted(bands.glob("CT-1/*.nii.gz"))}
    print("| set | arm | seed | fit s | epoch val AUC >= 0.95 | test AUC | 100 more AUC | "
          "0.1-1% AUC | 1-5% AUC | 5-25% AUC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for set_name in arguments.sets:
        for arm in arguments.arms:
            crop, batch, flags, *window = ARMS[arm]
            cache = make_cache(arguments.out, set_name, crop, *(window or [None]), masks=MASK_ARMS.get(arm, 0))
            rows = []
            for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
                longer = "" if arguments.epochs == EPOCHS else f"-e{arguments.epochs}"
                name = f"set{set_name}-{arm}-seed{seed}{longer}"
                run_dir = arguments.out / name
                seconds_file = arguments.out / f"{name}.seconds"
                if not (run_dir / "metrics.json").is_file():
                    start = time.perf_counter()
                    resume = ["--resume"] if run_dir.exists() else []
                    python("train", "fit", str(cache), "--run-dir", str(run_dir), *resume,
                           "--epochs", str(arguments.epochs), "--padding", "same", "--batch-size", str(batch),
                           *flags, "--seed", str(seed), "--quiet",
                           log=arguments.out / f"{name}.log")
                    seconds_file.write_text(f"{time.perf_counter() - start:.1f}\n")
                seconds = float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
                test_auc = json.loads((run_dir / "metrics.json").read_text())["auc"]
                more_auc = auc(*predict(run_dir, more))
                labels, scores = predict(run_dir, bands)
                paths = sorted(bands.glob("CT-*/*.nii.gz"))
                normal_scores = [score for label, score in zip(labels, scores) if not label]
                per_band = []
                for low, high in BANDS:
                    band_scores = [score for path, label, score in zip(paths, labels, scores)
                                   if label and low < band_share[path.name] <= high]
                    per_band.append(auc([0] * len(normal_scores) + [1] * len(band_scores), normal_scores + band_scores)
                                    if band_scores else None)
                epoch = first_epoch_at(run_dir)
                rows.append((seconds, epoch, test_auc, more_auc, *per_band))
                print(f"| {set_name} | {arm} | {seed} | {seconds:.0f} | {epoch or '-'} | {test_auc:.3f} | "
                      f"{more_auc:.3f} | " + " | ".join("-" if value is None else f"{value:.3f}" for value in per_band)
                      + " |", flush=True)
            columns = list(zip(*rows))
            reached = [epoch for epoch in columns[1] if epoch is not None]
            print(f"set {set_name}, {arm}: val AUC 0.95 reached in {len(reached)} of {len(rows)} seeds "
                  f"(epochs {', '.join(map(str, columns[1]))}), test AUC {mean_sd(columns[2])} "
                  f"(worst {min(columns[2]):.3f}), 100 more {mean_sd(columns[3])}, bands "
                  + ", ".join(mean_sd(column) for column in columns[4:]), flush=True)


if __name__ == "__main__":
    main()
