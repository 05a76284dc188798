"""`python -m train`: argument parsing only; the work happens in the modules it calls."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

# before TensorFlow is imported anywhere: its C++ log level is read once, at import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from preprocess.arguments import (  # noqa: E402
    EXIT_INTERRUPTED, ArgumentParser, configure_logging, non_negative_int, positive_float, positive_int, run_command,
)
from train.options import (  # noqa: E402
    MAX_BENCH_SAMPLES, MAX_LEARNING_RATE, MIN_LEARNING_RATE, PADDINGS, PRECISIONS, WHOLE_NUMBER_RANGES, FitOptions,
)

PROG = "python -m train"
DEFAULTS = FitOptions()
SPLITS = ("train", "val", "test")


def within(parse, minimum, maximum):
    """An argparse type: `parse`, then refuse values outside [minimum, maximum] (before TensorFlow is imported)."""
    def parse_within(text: str):
        value = parse(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}, got {text}")
        return value

    return parse_within


def whole_number(name: str):
    low, high = WHOLE_NUMBER_RANGES[name]
    return within(positive_int if low == 1 else non_negative_int, low, high)


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Train, evaluate and apply the 3D CNN that tells normal chest "
                            "CT scans from viral pneumonia, on a cache made by `python -m preprocess build`.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    fit = commands.add_parser(
        "fit", help="train a model on a cache into a run directory", formatter_class=defaults,
        description="Train the Keras tutorial's 3D CNN on the cache's train split, keep the model with the best "
        "validation AUC, and test it once on the test split. Everything goes into the run directory.",
    )
    fit.add_argument("cache", type=Path, metavar="CACHE", help="cache file from `python -m preprocess build`")
    # "%(default).0s" prints nothing; it only stops the formatter from appending "(default: None)"
    fit.add_argument("--run-dir", type=Path, default=DEFAULTS.run_dir, metavar="DIR",
                     help="run directory (default: a new runs/<timestamp>)%(default).0s")
    fit.add_argument("--epochs", type=whole_number("epochs"), default=DEFAULTS.epochs, help="maximum number of epochs")
    fit.add_argument("--batch-size", type=whole_number("batch_size"), default=DEFAULTS.batch_size,
                     help="volumes per batch")
    fit.add_argument("--lr", "--learning-rate", dest="learning_rate",
                     type=within(positive_float, MIN_LEARNING_RATE, MAX_LEARNING_RATE),
                     default=DEFAULTS.learning_rate, help="initial learning rate of Adam (decays x0.96 per 100k steps)")
    fit.add_argument("--patience", type=whole_number("patience"), default=DEFAULTS.patience,
                     help="stop after this many epochs without a better validation AUC")
    fit.add_argument("--seed", type=whole_number("seed"), default=DEFAULTS.seed,
                     help="seed of the initial weights, the data order and the augmentation")
    fit.add_argument("--padding", choices=PADDINGS, default=DEFAULTS.padding,
                     help="convolution padding: 'valid' (the tutorial's) needs >= 46 voxels per axis")
    fit.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                     help="Keras dtype policy (the output layer always computes in float32)")
    fit.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --run-dir after its last completed epoch "
                     "(repeat the run's options; --epochs may change)")
    fit.add_argument("--quiet", action="store_true", help="no per-epoch lines; only warnings and errors")

    evaluate = commands.add_parser(
        "evaluate", help="metrics of a run's best model on a split of a cache", formatter_class=defaults,
        description="Accuracy, AUC, sensitivity, specificity and the confusion matrix of a run's best model "
        "on one split of a cache preprocessed like the run's training cache.",
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory written by `fit`")
    evaluate.add_argument("cache", type=Path, metavar="CACHE", help="cache file with the same preprocessing")
    evaluate.add_argument("--split", choices=SPLITS, default="test", help="which split of the cache to evaluate")

    predict = commands.add_parser(
        "predict", help="classify raw NIfTI scans with a run's best model", formatter_class=defaults,
        description="Preprocess .nii/.nii.gz scans exactly like the run's training cache and print, per scan, "
        "how confident the model is in its predicted class. Unreadable scans get an error line each "
        "(stderr); the others are still predicted, and the exit code is 1 if any failed.",
    )
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory written by `fit`")
    predict.add_argument("scans", type=Path, nargs="+", metavar="SCAN", help=".nii or .nii.gz CT scan")
    predict.add_argument("--json", action="store_true", help="print a JSON list instead of sentences")

    bench = commands.add_parser(
        "bench-input", help="time the training input pipeline alone (no model)", formatter_class=defaults,
        description="Read, rotate and batch training samples from the cache as `fit` does, without a model. "
        "The last line is '<number> samples/s, peak RSS <n> MiB'.",
    )
    bench.add_argument("cache", type=Path, metavar="CACHE", help="cache file")
    bench.add_argument("--samples", type=within(positive_int, 1, MAX_BENCH_SAMPLES), default=200,
                       help="samples to time (after a warm-up)")
    bench.add_argument("--batch-size", type=whole_number("batch_size"), default=DEFAULTS.batch_size,
                       help="volumes per batch")
    bench.add_argument("--seed", type=whole_number("seed"), default=DEFAULTS.seed, help="seed of order and angles")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = make_parser().parse_args(argv)
    configure_logging(getattr(arguments, "quiet", False))
    command = {"fit": run_fit, "evaluate": run_evaluate, "predict": run_predict, "bench-input": run_bench}
    code = run_command(PROG, lambda: command[arguments.command](arguments))
    # A failed command leaves a tf.data pipeline in reference cycles (Keras's traceback filter
    # makes them), and its reader threads may still want the GIL. Free it now: collected at
    # interpreter exit instead, it waits for threads that can never run again, and hangs.
    gc.collect()
    return code


def run_fit(arguments) -> int | None:
    from train.fit import fit_model

    options = FitOptions(
        cache=arguments.cache, run_dir=arguments.run_dir, epochs=arguments.epochs, batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate, patience=arguments.patience, seed=arguments.seed,
        padding=arguments.padding, precision=arguments.precision, resume=arguments.resume, quiet=arguments.quiet,
    )
    try:
        report = fit_model(options)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the run keeps its last completed epoch: continue it with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    test = report.test_metrics
    print(f"run saved in {report.run_dir}: {report.state.completed_epochs} epochs, best val AUC "
          f"{report.state.best_val_auc:.4f} at epoch {report.state.best_epoch}; test AUC {_number(test.get('auc'))}, "
          f"accuracy {_number(test.get('accuracy'))} on {test.get('scans')} scans")


def run_evaluate(arguments) -> None:
    from train.evaluate import evaluate_run, format_report

    print(format_report(evaluate_run(arguments.run_dir, arguments.cache, arguments.split)))


def run_predict(arguments) -> int:
    from train.predict import predict_scans, print_predictions

    return print_predictions(predict_scans(arguments.run_dir, arguments.scans), arguments.json, PROG)


def run_bench(arguments) -> None:
    from train.bench import benchmark_input, format_benchmark

    print(format_benchmark(benchmark_input(arguments.cache, arguments.samples, arguments.batch_size, arguments.seed)))


def _number(value) -> str:
    return "undefined" if value is None or value != value else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
