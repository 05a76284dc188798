"""Peak memory of a training step, by batch size: does a batch fit a 24 GB machine?

For each batch size, a fresh process builds the network (`fit`'s: the default recipe, --padding
valid or same as given, --width), runs three `train_on_batch` steps on random volumes of --shape,
and reports its peak resident memory (`ru_maxrss`: the most the process ever held, TensorFlow
and its workspace included). One process per batch size, so a peak never carries over. It also
prints `train.network.memory.estimated_step_bytes` beside each, the estimate `fit` checks a batch
against before it starts.

    python benchmarks/bench_memory.py [--shape 128 128 64] [--batch-sizes 2 4 8 16] [--precisions float32 mixed_bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def one_step(shape, batch: int, precision: str, padding: str, width: float) -> dict:
    import resource

    import numpy as np

    import train  # noqa: F401  (before Keras: oneDNN's kernels)
    from train.tensorflow_import import load_tensorflow

    load_tensorflow()
    import keras

    from train.network.architecture import scaled
    from train.network.model import build_model

    model = build_model(tuple(shape), padding=padding, precision=precision, architecture=scaled(width))
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    volumes = rng.uniform(0, 1, (batch, *shape, 1)).astype(np.float32)
    labels = rng.integers(0, 2, (batch, 1)).astype(np.float32)
    for _ in range(3):
        model.train_on_batch(volumes, labels)
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["float32"])
    parser.add_argument("--padding", default="valid", choices=("valid", "same"))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        batch, precision = arguments.child.split(",")
        print(json.dumps(one_step(arguments.shape, int(batch), precision, arguments.padding, arguments.width)))
        return
    from sets import print_machine
    from train.network.memory import estimated_step_bytes

    print_machine()
    print(f"shape {' x '.join(map(str, arguments.shape))}, padding {arguments.padding}, width {arguments.width:g}")
    print("| precision | batch | peak resident memory | fit's estimate |")
    print("|---|---|---|---|")
    for precision in arguments.precisions:
        for batch in arguments.batch_sizes:
            command = [sys.executable, __file__, "--shape", *map(str, arguments.shape), "--padding", arguments.padding,
                       "--width", str(arguments.width), "--child", f"{batch},{precision}"]
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                print(f"| {precision} | {batch} | failed: {result.stderr.strip().splitlines()[-1:]} | |", flush=True)
                continue
            peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
            estimate = estimated_step_bytes(tuple(arguments.shape), batch, precision, arguments.padding, arguments.width)
            print(f"| {precision} | {batch} | {peak / 1024**3:.2f} GiB | {estimate / 1024**3:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
