"""Preprocessing throughput on a local Dask cluster against local loky processes, on the same scans.

Starts real clusters on 127.0.0.1 with Dask's own commands (a scheduler, and `dask worker
--nworkers 2 --nthreads 1`: two single-threaded worker processes under nannies), times their
start-up, then times forced builds of the same scans with `--jobs 2` (loky) and `--backend
dask`, in turn, best of `--repeats` each. Two clusters:
  - Dask's defaults. Nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns
    off glibc's adaptive mmap threshold, so every large array is a fresh mmap of zeroed pages;
  - the same with MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ raised (as docs/scaling.md says).
What remains of the difference per scan is what the cluster costs on one machine: each volume
goes from a worker to the parent over TCP instead of through loky's pipe, with the scheduler's
round trips, and the scheduler shares the two cores.

    python benchmarks/bench_dask.py [--raw DIR | --scans 12] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client

from preprocess.engine.build import BuildOptions, build_cache
from preprocess.phantoms.synth import write_synthetic_archive

MALLOC_LEFT_ALONE = {"MALLOC_TRIM_THRESHOLD_": str(128 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}


def start_cluster(folder: Path, workers: int, environment: dict) -> tuple[list[subprocess.Popen], str, float]:
    """A scheduler and `workers` single-threaded worker processes; their address and start-up seconds."""
    folder.mkdir()
    start = time.perf_counter()
    scheduler_file = folder / "scheduler.json"
    command = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([*command, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--scheduler-file", str(scheduler_file), "--no-dashboard"], **quiet)]
    while not scheduler_file.exists():
        time.sleep(0.01)
    processes.append(subprocess.Popen([*command, "worker", "--scheduler-file", str(scheduler_file), "--nworkers",
                                       str(workers), "--nthreads", "1", "--no-dashboard"],
                                      env={**os.environ, **environment}, **quiet))
    address = json.loads(scheduler_file.read_text())["address"]
    with Client(address, set_as_default=False) as client:
        client.wait_for_workers(workers, timeout=120)
    return processes, address, time.perf_counter() - start


def build_seconds(options: BuildOptions) -> float:
    start = time.perf_counter()
    build_cache(options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=None, help="scans to use (default: synthesize --scans)")
    parser.add_argument("--scans", type=int, default=12, help="number of synthetic 512x512 scans, without --raw")
    parser.add_argument("--repeats", type=int, default=3, help="builds per configuration; the best counts")
    arguments = parser.parse_args()
    processes = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        raw = arguments.raw
        if raw is None:
            raw = scratch / "raw"
            half = arguments.scans // 2
            write_synthetic_archive(raw, half, arguments.scans - half, size=512, seed=0, progress=False)
        count = len(list(raw.rglob("*.nii*")))
        out = scratch / "bench.h5"
        configurations = {"preprocess build --jobs 2 (loky)": BuildOptions(raw=raw, out=out, jobs=2, force=True,
                                                                           quiet=True)}
        start_up = {}
        try:
            for name, environment in [("Dask's defaults", {}), ("MALLOC_*_THRESHOLD_ raised", MALLOC_LEFT_ALONE)]:
                started, address, start_up[name] = start_cluster(scratch / f"cluster-{len(start_up)}", 2, environment)
                processes += started
                configurations[f"--backend dask, 2 workers x 1 thread, {name}"] = BuildOptions(
                    raw=raw, out=out, backend="dask", scheduler=address, force=True, quiet=True)
            times = {name: [] for name in configurations}
            for _ in range(arguments.repeats):  # in turn, so drift in the VM's speed hits each alike
                for name, options in configurations.items():
                    times[name].append(build_seconds(options))
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait()
    loky = min(next(iter(times.values()))) / count
    print(f"{count} scans from {raw}, {os.cpu_count()} cores; builds: best of {arguments.repeats}")
    print("| pipeline | s / scan | scans / s | overhead / scan vs loky |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        per_scan = min(seconds) / count
        print(f"| {name} | {per_scan:.3f} | {1 / per_scan:.2f} | {per_scan - loky:+.3f} s ({per_scan / loky - 1:+.0%}) |")
    print("cluster start-up (scheduler + 2 workers registered), once per cluster: "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in start_up.items()))
    print("every build (s): " + "; ".join(f"{name}: {', '.join(f'{t:.2f}' for t in seconds)}"
                                          for name, seconds in times.items()))


if __name__ == "__main__":
    main()
