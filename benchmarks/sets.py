"""What the benchmarks share: the synthetic phantom sets, their caches, and running the tool as a user does.

The sets are the recipe benchmark's (`bench_recipe.py`), which the probes and `bench_trust.py` reuse:
their own phantom seeds, never the demo's or the tests'. Every run is a real `python -m ...`
subprocess with the repository on its path.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = (64, 64, 32)
SETS = {  # name: (synth flags, phantoms, epochs)
    "standard": (["--seed", "101"], 360, 20),
    "standard-120": (["--seed", "101"], 120, 30),  # the first benchmark's size: 84 training phantoms
    "subtle": (["--grades", "1", "--seed", "102"], 360, 30),
    "subtle-120": (["--grades", "1", "--seed", "102"], 120, 30),  # the first benchmark's size
}
SETS["standard-30"] = (*SETS["standard"][:2], 30)  # the standard set trained as long as the target
# the standard set's phantoms with their lesion masks (`synth --masks` draws the same volumes), so `fit`
# trains the lesion-map model by default (docs/training.md, "Lesion masks")
SETS["standard-masks"] = (["--seed", "101", "--masks"], 360, 20)
SHARED_CACHES = {"standard-30": "standard"}  # a set trained longer on another's phantoms and cache


def python(*arguments: str, log: Path | None = None) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log or os.devnull, "w") as output:
        subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=environment, check=True,
                       stdout=output, stderr=subprocess.STDOUT)


def print_machine() -> None:
    """The CPU, its kind and TensorFlow's kernels, as the `fit` processes below get them (same environment)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from train.hardware import describe_machine

    print(describe_machine(), flush=True)


def make_cache(out: Path, name: str) -> Path:
    name = SHARED_CACHES.get(name, name)
    flags, scans, _ = SETS[name]
    cache = out / f"{name}.h5"
    if not cache.is_file():
        raw = out / f"{name}-raw"
        python("preprocess", "synth", "--out", str(raw), "--normal", str(scans // 2), "--abnormal",
               str(scans - scans // 2), "--size", "128", "--quiet", *flags)
        python("preprocess", "build", "--raw", str(raw), "--out", str(cache), "--shape", *map(str, SHAPE), "--quiet")
    from preprocess.cache import CacheReader  # the one reader of the cache's layout

    with CacheReader(cache) as kept:
        if len(kept) != scans:
            sys.exit(f"{cache}: holds {len(kept)} phantoms, the {name} set has {scans}; move it aside")
    return cache


def kept_runs(set_dir: Path, arm: str) -> list[Path]:
    """The finished runs of one arm in a set's folder (every seed kept there), in seed order."""
    seeds = {int(seed): path for path in set_dir.glob(f"{arm}-seed*")
             if (seed := path.name.rsplit("-seed", 1)[1]).isdigit() and (path / "metrics.json").is_file()}
    return [seeds[seed] for seed in sorted(seeds)]
