"""Cost of one training step, and of one forward pass, per scan: by batch size, precision and compiler.

Builds the default recipe's network (the tutorial's layers, its BatchNorm momentum and peak
rate), and times `train_on_batch` and `predict_on_batch` on random volumes after a warm-up, so
neither data loading nor tracing is counted. It answers three questions about the recipe
benchmark's epochs: does a larger batch make an epoch cheaper on this hardware (per-scan cost
falling with the batch), what does bfloat16 save over float32, and (`--jit-compile`: every row
timed with and without XLA, `model.compile(jit_compile=True)`) would XLA help. `fit` never asks
for XLA, and Keras's "auto" leaves it off where TensorFlow's op determinism is on, as in `fit`.

It prints the machine (CPU, its kind, TensorFlow's kernels) and each step's share of the CPU's
float32 peak: the step's floating-point operations (`train.network.architecture.training_step_flops`)
per second against cores x FLOP/cycle x clock (`train.hardware.peak_float32_gflops`). bfloat16
rows are measured against the same float32 peak.

`--widths` times the network at other `fit --width` values too (0.5: half the filters and dense units).

    python benchmarks/bench_step.py [--shape 64 64 32] [--batch-sizes 2 4 8] [--widths 1 0.5]
                                    [--precisions mixed_bfloat16 float32] [--jit-compile] [--peak-gflops N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import train  # noqa: E402,F401  (before Keras: oneDNN's kernels unless TF_ENABLE_ONEDNN_OPTS says otherwise)

WARMUP_STEPS = 3
SCANS_TIMED = 48  # per batch size: at least 4 steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 32], metavar=("H", "W", "D"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["mixed_bfloat16", "float32"],
                        choices=("mixed_bfloat16", "float32"))
    parser.add_argument("--padding", default="same", choices=("same", "valid"))
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0], help="fit --width values to time")
    parser.add_argument("--jit-compile", action="store_true", help="also time every row compiled with XLA")
    parser.add_argument("--peak-gflops", type=float, help="the CPU's float32 peak, where the estimate is wrong")
    arguments = parser.parse_args()

    import keras
    import numpy as np

    from train.hardware import describe_machine, peak_float32_gflops
    from train.network.architecture import forward_flops, scaled, training_step_flops
    from train.network.model import build_model
    from train.options import DEFAULT_RECIPE, RECIPES

    recipe = RECIPES[DEFAULT_RECIPE]
    peak, peak_arithmetic = ((arguments.peak_gflops, f"{arguments.peak_gflops:.0f} GFLOP/s (given)")
                             if arguments.peak_gflops else peak_float32_gflops())
    shape = tuple(arguments.shape)
    print(describe_machine())
    print(f"float32 peak: {peak_arithmetic}")
    for width in arguments.widths:
        architecture = scaled(width)
        forward = sum(forward_flops(shape, arguments.padding, architecture, recipe["pooling"]).values())
        step = training_step_flops(shape, arguments.padding, 1, architecture, recipe["pooling"])
        print(f"{'x'.join(map(str, shape))}, padding {arguments.padding}, width {width:g}: {forward / 1e9:.2f} GFLOP "
              f"per scan forward, {step / 1e9:.2f} per scan in a training step")
    print("seconds per scan (per step), and the share of the float32 peak")
    print("| width | precision | batch | XLA | training step | forward pass |")
    print("|---|---|---|---|---|---|")
    random = np.random.default_rng(0)
    rows = [(width, precision, batch_size, jit) for width in arguments.widths for precision in arguments.precisions
            for batch_size in arguments.batch_sizes for jit in ((False, True) if arguments.jit_compile else (False,))]
    for width, precision, batch_size, jit in rows:
        architecture = scaled(width)
        forward = sum(forward_flops(shape, arguments.padding, architecture, recipe["pooling"]).values())
        keras.utils.set_random_seed(0)
        model = build_model(shape, padding=arguments.padding, precision=precision, architecture=architecture,
                            bn_momentum=recipe["bn_momentum"], pooling=recipe["pooling"])
        model.compile(optimizer=keras.optimizers.Adam(recipe["learning_rate"]), loss="binary_crossentropy",
                      jit_compile=jit)
        volumes = random.random((batch_size, *shape, 1), dtype=np.float32)
        labels = random.integers(0, 2, (batch_size, 1)).astype(np.float32)
        for _ in range(WARMUP_STEPS):
            model.train_on_batch(volumes, labels)
            model.predict_on_batch(volumes)
        steps = max(4, SCANS_TIMED // batch_size)
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(volumes, labels)
        train_seconds = (time.perf_counter() - start) / steps
        start = time.perf_counter()
        for _ in range(steps):
            model.predict_on_batch(volumes)
        predict_seconds = (time.perf_counter() - start) / steps
        step_flops = training_step_flops(shape, arguments.padding, batch_size, architecture, recipe["pooling"])
        train_share = step_flops / train_seconds / 1e9 / peak
        predict_share = forward * batch_size / predict_seconds / 1e9 / peak
        print(f"| {width:g} | {precision} | {batch_size} | {'yes' if jit else 'no'} "
              f"| {train_seconds / batch_size:.4f} s ({train_seconds:.3f} s), {train_share:.0%} "
              f"| {predict_seconds / batch_size:.4f} s ({predict_seconds:.3f} s), {predict_share:.0%} |", flush=True)
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
