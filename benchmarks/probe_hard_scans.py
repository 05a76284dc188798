"""Which test scans keep the kept runs of bench_recipe.py below a test AUC of 1, and how large their lesions are.

A test AUC counts the (abnormal, normal) pairs of the test split that a model ranks rightly. For
every finished run of the named arms on a set, this finds the pairs it ranks wrongly, and then
lists, for each abnormal test phantom that any run ranks below a normal one, its lesion share of
the lung (recomputed from the set's `synth` flags: a phantom is a pure function of them) and in
how many runs, below how many normals on average, it sits. If the same few phantoms with the
smallest lesions carry the misranked pairs in every run of every recipe, the ceiling is the
data's at this resolution, not a recipe's.

    python benchmarks/probe_hard_scans.py standard-30 [--arms precise tutorial] [--out runs/bench_recipe]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SYNTH_SIZE = 128  # bench_recipe.make_cache's `synth --size`


def synth_flag(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set")
    parser.add_argument("--arms", nargs="+", default=["precise", "tutorial"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recipe")
    arguments = parser.parse_args()

    import numpy as np

    from sets import SETS, SHARED_CACHES, kept_runs
    from preprocess.cache import CacheReader
    from preprocess.phantoms.synth import make_phantom
    from train.rundir.models import load_run_model

    flags = SETS[arguments.set][0]
    seed = int(synth_flag(flags, "--seed") or 0)
    grades = synth_flag(flags, "--grades")
    grade = int(grades) if grades is not None and grades.isdigit() else None  # one grade: every abnormal has it
    with CacheReader(arguments.out / f"{SHARED_CACHES.get(arguments.set, arguments.set)}.h5") as reader:
        rows = np.sort(reader.split("test"))
        labels = reader.labels[rows]
        names = [reader.scan_ids[row] for row in rows]
        volumes = np.stack([reader.read_volume(row) for row in rows])[..., None]
    abnormal, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    involvement = {index: make_phantom(seed, int(re.search(r"study_(\d+)", names[index]).group(1)), True,
                                       SYNTH_SIZE, None, grade).involvement for index in abnormal}
    smallest = min(involvement, key=involvement.get)
    print(f"{arguments.set}: {len(abnormal)} abnormal and {len(normal)} normal test phantoms, "
          f"{len(abnormal) * len(normal)} pairs; lesion shares {min(involvement.values()):.1%} .. "
          f"{max(involvement.values()):.1%} of the lung")
    below: dict[int, list[int]] = {index: [] for index in abnormal}  # normals above it, one entry per run
    above: dict[int, list[int]] = {index: [] for index in normal}
    runs = 0
    for arm in arguments.arms:
        for run_dir in kept_runs(arguments.out / arguments.set, arm):
            probabilities = load_run_model(run_dir).predict(volumes, batch_size=6, verbose=0).ravel()
            # a tie counts whole here (half in an AUC): the AUC printed is then a lower bound
            wrong = probabilities[abnormal][:, None] <= probabilities[normal][None, :]
            for position, index in enumerate(abnormal):
                below[index].append(int(wrong[position].sum()))
            for position, index in enumerate(normal):
                above[index].append(int(wrong[:, position].sum()))
            runs += 1
            by_smallest = int(wrong[list(abnormal).index(smallest)].sum())
            print(f"  {run_dir.name}: {int(wrong.sum())} pairs wrong (AUC ≥ {1 - wrong.mean():.4f}), "
                  f"{by_smallest} of them the smallest lesion's ({involvement[smallest]:.1%})", flush=True)
    print(f"\nabnormal test phantoms ranked below a normal one in any of {runs} runs, by lesion share:")
    print("| phantom | lesion share of the lung | runs | normals above it, mean over runs |")
    print("|---|---|---|---|")
    for index in sorted(abnormal, key=involvement.get):
        if any(below[index]):
            print(f"| {names[index]} | {involvement[index]:.1%} | {sum(1 for count in below[index] if count)} of "
                  f"{runs} | {statistics.mean(below[index]):.1f} |")
    print(f"\nnormal test phantoms ranked above an abnormal one in at least half of the {runs} runs:")
    for index in normal:
        if sum(1 for count in above[index] if count) * 2 >= runs:
            print(f"  {names[index]}: in {sum(1 for count in above[index] if count)} runs, "
                  f"above {statistics.mean(above[index]):.1f} abnormal phantoms on average")
    others = sorted(value for index, value in involvement.items() if not any(below[index]))
    print(f"\nthe other {len(others)} abnormal phantoms, never ranked below a normal one: lesion shares "
          f"{others[0]:.1%} .. {others[-1]:.1%}" if others else "")


if __name__ == "__main__":
    main()
