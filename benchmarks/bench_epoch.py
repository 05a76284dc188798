"""Where a training epoch's time goes: the step, the input pipeline, PreciseBN, validation, checkpoints.

On a cache (`make demo` builds data/demo.h5), with the default recipe's network and `fit`'s own
pipelines, it times each part of an epoch on its own, then a real epoch of `fit` (the second of
a 2-epoch run: the first also traces the graphs):
  - step, in memory: `train_on_batch` on one batch held in memory (no data loading), times the
    steps of an epoch; its floating-point operations (train.network.architecture) against the
    CPU's float32 peak (train.hardware) give the fraction of the hardware the step reaches;
  - input pipeline alone: one epoch of `make_training_dataset` (read, check, rotate, batch), no model;
  - training pass: `model.fit` over that pipeline for one epoch, no validation: the step and the
    pipeline sharing the CPU;
  - PreciseBN: re-estimating the BatchNorm statistics from the recipe's --precise-bn-scans;
  - validation: `evaluate` over the validation split;
  - checkpoint: saving the model once (`fit` saves the last epoch's each epoch).

    python benchmarks/bench_epoch.py [data/demo.h5] [--padding same] [--pooling avgmax] [--precision float32]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import train  # noqa: E402,F401  (oneDNN's kernels unless TF_ENABLE_ONEDNN_OPTS says otherwise)

TIMED_STEPS = 20


def timed(function, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, nargs="?", default=ROOT / "data" / "demo.h5")
    parser.add_argument("--padding", default="same", choices=("same", "valid"))
    parser.add_argument("--pooling", default="avgmax", choices=("avg", "max", "avgmax"))
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "mixed_bfloat16"))
    parser.add_argument("--peak-gflops", type=float, help="the CPU's float32 peak, where the estimate is wrong")
    arguments = parser.parse_args()

    import keras
    import numpy as np

    from preprocess.cache import CacheReader
    from train.fit import fit_model
    from train.hardware import describe_machine, peak_float32_gflops
    from train.loop.loop import configure_determinism, make_compiled_model, make_precise_bn_batches
    from train.loop.precise_bn import assign_population_statistics, estimate_population_statistics
    from train.loop.recorder import save_model_atomically
    from train.network.architecture import training_step_flops
    from train.network.precision import resolve_precision
    from train.network.tasks import make_task, training_targets
    from train.options import FitOptions, resolve_recipe
    from train.pipeline.data import make_training_dataset, make_validation_dataset, steps_per_epoch
    from train.pipeline.folds import rows_and_classes
    from train.rundir.layout import read_history

    options = resolve_recipe(FitOptions(cache=arguments.cache, padding=arguments.padding, pooling=arguments.pooling,
                                        precision=arguments.precision, epochs=2, quiet=True))
    options = FitOptions(**{**options.__dict__, "precision": resolve_precision(options.precision).policy})
    peak, peak_arithmetic = ((arguments.peak_gflops, f"{arguments.peak_gflops:.0f} GFLOP/s (given)")
                             if arguments.peak_gflops else peak_float32_gflops())
    print(describe_machine())
    print(f"float32 peak: {peak_arithmetic}")
    configure_determinism(0)
    with CacheReader(arguments.cache) as reader:
        task = make_task("binary", reader)
        (train_rows, train_classes), (val_rows, val_classes) = rows_and_classes(reader, options, task)
        steps = steps_per_epoch(len(train_rows), options.batch_size)
        shape = tuple(reader.shape)
        print(f"{arguments.cache}: {'x'.join(map(str, shape))}, {len(train_rows)} training scans ({steps} steps "
              f"of {options.batch_size}), {len(val_rows)} validation; padding {options.padding}, pooling "
              f"{options.pooling}, {options.precision}")
        model = make_compiled_model(shape, options, task, steps)
        volumes = np.random.default_rng(0).random((options.batch_size, *shape, 1), dtype=np.float32)
        labels = np.array([0.0, 1.0] * options.batch_size, np.float32)[:options.batch_size]
        for _ in range(3):
            model.train_on_batch(volumes, labels)
        step_seconds = timed(lambda: model.train_on_batch(volumes, labels), TIMED_STEPS)
        flops = training_step_flops(shape, options.padding, options.batch_size, pooling=options.pooling)
        achieved = flops / step_seconds / 1e9
        parts = [("step, in memory (x steps)", step_seconds * steps,
                  f"{step_seconds * 1000:.0f} ms/step; {flops / 1e9:.1f} GFLOP/step = {achieved:.0f} GFLOP/s, "
                  f"{achieved / peak:.0%} of peak")]

        targets = training_targets(task, train_classes)
        dataset = make_training_dataset(reader, train_rows, targets, options.batch_size, options.seed, epochs=2)
        iterator = iter(dataset)
        for _ in range(steps):  # the first epoch traces and fills buffers
            next(iterator)
        parts.append(("input pipeline alone", timed(lambda: [next(iterator) for _ in range(steps)]),
                      "read, check, rotate and batch one epoch, no model"))

        training = make_training_dataset(reader, train_rows, targets, options.batch_size, options.seed, epochs=2)
        model.fit(training, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        parts.append(("training pass (model.fit, no validation)",
                      timed(lambda: model.fit(training, epochs=2, initial_epoch=1, steps_per_epoch=steps, verbose=0,
                                              shuffle=False)), "the step and the pipeline sharing the CPU"))

        batches = make_precise_bn_batches(reader, train_rows, options)
        estimate_population_statistics(model, batches)
        parts.append(("PreciseBN", timed(lambda: assign_population_statistics(
            model, estimate_population_statistics(model, batches))), f"{options.precise_bn_scans} scans"))

        validation = make_validation_dataset(reader, val_rows, training_targets(task, val_classes), options.batch_size)
        model.evaluate(validation, verbose=0)
        parts.append(("validation", timed(lambda: model.evaluate(validation, verbose=0)), f"{len(val_rows)} scans"))

        with tempfile.TemporaryDirectory() as folder:
            save_model_atomically(model, Path(folder) / "warm.keras")
            parts.append(("checkpoint", timed(lambda: save_model_atomically(model, Path(folder) / "model.keras")),
                          "one .keras file"))
    keras.backend.clear_session()

    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        fit_model(FitOptions(**{**options.__dict__, "run_dir": run_dir}))
        fit_epoch = read_history(run_dir / "history.csv")[-1]["epoch_seconds"]

    print("| part of an epoch | seconds | |")
    print("|---|---|---|")
    for name, seconds, note in parts:
        print(f"| {name} | {seconds:.1f} | {note} |")
    accounted = parts[2][1] + parts[3][1] + parts[4][1] + parts[5][1]
    print(f"| training pass + PreciseBN + validation + checkpoint | {accounted:.1f} | |")
    print(f"| a real `fit` epoch (the second of 2, history.csv) | {fit_epoch:.1f} | |")


if __name__ == "__main__":
    main()
