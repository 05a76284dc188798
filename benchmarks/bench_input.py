"""Side by side: the Keras tutorial's input pipeline vs `python -m train bench-input`, on one cache.

    python benchmarks/bench_input.py CACHE [--samples 200] [--batch-size 2]

Each pipeline runs in its own subprocess, so each peak RSS is that pipeline's alone (TensorFlow
itself is a few hundred MiB of it): the process's own high-water mark (VmHWM), with the same
warm-up and timing loop for both (`train.bench.time_batches`). The tutorial's pipeline, reproduced from keras-io's
3D image classification example: all training volumes in memory, `from_tensor_slices`,
shuffle, a sequential `map` that rotates with `tf.numpy_function` + `scipy.ndimage.rotate`
(reshape=False, angle from [-20, -10, -5, 5, 10, 20]) and clips to [0, 1], batch, prefetch(2).
The tutorial picks the angle with the `random` module; a NumPy generator does the same here.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL_ANGLES_DEGREES = [-20, -10, -5, 5, 10, 20]


def run_tutorial_pipeline(cache: Path, samples: int, batch_size: int, seed: int) -> str:
    """Time the tutorial's pipeline; returns the same last line as `bench-input`."""
    import numpy as np
    import tensorflow as tf
    from scipy import ndimage

    from preprocess.cache import CacheReader
    from train.bench import format_benchmark, time_batches

    with CacheReader(cache) as reader:
        rows = reader.split("train")
        x_train = np.stack([reader.read_volume(row) for row in rows])  # the tutorial keeps arrays in memory
        y_train = reader.labels[rows].astype(np.float32)
    generator = np.random.default_rng(seed)

    def scipy_rotate(volume):
        angle = generator.choice(TUTORIAL_ANGLES_DEGREES)
        volume = ndimage.rotate(volume, angle, reshape=False)
        volume[volume < 0] = 0
        volume[volume > 1] = 1
        return volume

    @tf.function
    def rotate(volume):
        return tf.numpy_function(scipy_rotate, [volume], tf.float32)

    def train_preprocessing(volume, label):
        volume = rotate(volume)
        volume = tf.expand_dims(volume, axis=3)
        return volume, label

    train_loader = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    train_dataset = train_loader.shuffle(len(x_train)).map(train_preprocessing).batch(batch_size).prefetch(2)
    return format_benchmark(time_batches(iter(train_dataset.repeat()), samples))  # the same timing as bench-input


def run_in_subprocess(arguments: list[str]) -> str:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=environment, cwd=ROOT)
    if completed.returncode != 0:
        sys.exit(f"{' '.join(arguments)} failed:\n{completed.stderr[-2000:]}")
    return completed.stdout.strip().splitlines()[-1]


def parse_line(line: str) -> tuple[float, float]:
    """('147.1 samples/s, peak RSS 689 MiB') -> (147.1, 689.0)."""
    rate_text, memory_text = line.split(", peak RSS ")
    return float(rate_text.split()[0]), float(memory_text.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="cache file (e.g. 128x128x64)")
    parser.add_argument("--samples", type=int, default=200, help="samples timed per pipeline, after a warm-up")
    parser.add_argument("--batch-size", type=int, default=2, help="volumes per batch (the tutorial's is 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of order and angles")
    parser.add_argument("--tutorial-only", action="store_true", help="run only the tutorial pipeline, in this process")
    arguments = parser.parse_args()
    common = [str(arguments.cache), "--samples", str(arguments.samples), "--batch-size", str(arguments.batch_size),
              "--seed", str(arguments.seed)]
    if arguments.tutorial_only:
        print(run_tutorial_pipeline(arguments.cache, arguments.samples, arguments.batch_size, arguments.seed))
        return
    results = {
        "tutorial (in memory, numpy_function + scipy)": run_in_subprocess([__file__, *common, "--tutorial-only"]),
        "train bench-input (streaming, TF ops)": run_in_subprocess(["-m", "train", "bench-input", *common]),
    }
    parsed = {name: parse_line(line) for name, line in results.items()}
    width = max(map(len, parsed))
    print(f"{'pipeline':<{width}}  {'samples/s':>10}  {'peak RSS MiB':>12}")
    for name, (rate, memory) in parsed.items():
        print(f"{name:<{width}}  {rate:>10.1f}  {memory:>12.0f}")
    (tutorial_rate, _), (ours_rate, _) = parsed.values()
    print(f"speed-up: {ours_rate / tutorial_rate:.1f}x  ({arguments.cache}, batch {arguments.batch_size}, "
          f"{arguments.samples} samples, {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
