"""`python -m train`: argument parsing only; the work happens in the modules it calls."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# before TensorFlow is imported anywhere: its C++ log level is read once, at import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from common.cli import (  # noqa: E402
    EXIT_INTERRUPTED, ArgumentParser, configure_logging, exit_with, finite_float, non_negative_int, positive_float,
    positive_int, run_command, within,
)
from preprocess.cache.schema import SPLIT_NAMES  # noqa: E402
from train.failures import describe_failure  # noqa: E402
from train.loop.distribute import STRATEGIES  # noqa: E402
from train.network.architecture import MAX_WIDTH, MIN_WIDTH  # noqa: E402
from train.network.lesions import CALL_OFFSETS, DEFAULT_LESION_WEIGHT, MAX_LESION_WEIGHT  # noqa: E402
from train.network.precision import PRECISIONS  # noqa: E402
from train.network.tasks import TASKS  # noqa: E402
from train.rundir.listing import COLUMNS as RUN_COLUMNS  # noqa: E402
from train.options import (  # noqa: E402
    AUGMENTS, KEEPS, MAX_BENCH_SAMPLES, MAX_LEARNING_RATE, MIN_LEARNING_RATE, NORMS, PADDINGS, POOLINGS, RECIPES,
    SCHEDULES, WHOLE_NUMBER_RANGES, FitOptions,
)

PROG = "python -m train"
DEFAULTS = FitOptions()
FLAG_NAMES = {"learning_rate": "lr"}  # FitOptions fields whose flag is not their name


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
        description="Train the Keras tutorial's 3D CNN on the cache's train split, keep the model of the last epoch "
        "(--keep last) or of the best validation AUC (--keep best), and test it once on the test split. Everything "
        "goes into the run directory.",
    )
    add_fit_arguments(fit, "run directory (default: a new runs/<timestamp>)%(default).0s",
                      "continue the interrupted run in --run-dir after its last completed epoch "
                      "(repeat the run's options; --epochs may change)")

    cv = commands.add_parser(
        "cv", help="K-fold cross-validation over the train and validation rows", formatter_class=defaults,
        description="Pool the cache's train and validation rows, deal them into K folds (stratified by class, "
        "seeded by --seed) and train one run per fold (RUN_DIR/fold-k), validated on its fold. Then report "
        "mean ± standard deviation over the folds, and evaluate the mean of the K fold models once on the "
        "test split. Everything is written to RUN_DIR/cv_summary.json.",
    )
    cv.add_argument("--folds", type=within(positive_int, 2, 100), default=5, metavar="K", help="number of folds")
    add_fit_arguments(cv, "folder for the fold runs (default: a new runs/<timestamp>-cv)%(default).0s",
                      "continue an interrupted cross-validation in --run-dir (finished folds are kept)")

    evaluate = commands.add_parser(
        "evaluate", help="metrics of a run's model on a split of a cache", formatter_class=defaults,
        description="Accuracy, AUC, sensitivity, specificity and the confusion matrix of a run's model "
        "on one split of a cache preprocessed like the run's training cache, from its calibrated probabilities; ECE, "
        "Brier and NLL before and after calibration; and the ROC curve and reliability diagram as PNGs in the run.",
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                          help="run directory written by `fit`, or a `cv` directory (its folds' mean)")
    evaluate.add_argument("cache", type=Path, metavar="CACHE", help="cache file with the same preprocessing")
    evaluate.add_argument("--split", choices=SPLIT_NAMES, default="test", help="which split of the cache to evaluate")

    predict = commands.add_parser(
        "predict", help="classify raw NIfTI scans or DICOM series with a run's model", formatter_class=defaults,
        description="Preprocess .nii/.nii.gz scans or DICOM series folders exactly like the run's training cache and "
        "print, per scan, how confident the model is in its predicted class (calibrated on the run's validation split), "
        "and a warning naming the reason when the scan is unlike the training data. Unreadable scans, and volumes "
        "that are not a CT in Hounsfield units at all, get an error line each (stderr) and no probability; the "
        "others are still predicted, and the exit code is 1 if any failed.",
    )
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="run directory written by `fit`, or a `cv` directory (its folds, as an ensemble)")
    predict.add_argument("scans", type=Path, nargs="+", metavar="SCAN",
                         help=".nii or .nii.gz CT scan, or a folder holding one DICOM series")
    predict.add_argument("--json", action="store_true", help="print a JSON list instead of sentences")
    predict.add_argument("--strict", action="store_true",
                         help="exit with code 3 when any scan is unlike the training data (the others are still "
                         "predicted and printed)")
    predict.add_argument("--explain", type=Path, default=None, metavar="OUT_DIR",
                         help="also write a Grad-CAM montage per scan into OUT_DIR (<scan>_gradcam.png): where the "
                         "last convolutional block looked for the predicted class%(default).0s")

    runs = commands.add_parser(
        "runs", help="compare run directories in a table", formatter_class=defaults,
        description="List every run directory under DIR (cross-validation folds included) with its date, cache "
        "fingerprint, key options and validation and test AUC. Runs trained on another cache than the reference "
        "are marked with *, so numbers from different data are not compared by mistake.",
    )
    runs.add_argument("root", type=Path, nargs="?", default=Path("runs"), metavar="DIR", help="folder of runs")
    runs.add_argument("--sort", choices=RUN_COLUMNS, default="date",
                      help="column to sort by (AUCs, accuracy, kappa and date: highest first)")
    runs.add_argument("--reverse", action="store_true", help="reverse the default order of --sort")
    runs.add_argument("--cache", type=Path, default=None, metavar="CACHE",
                      help="mark runs not trained on this cache (default: the cache most runs used)%(default).0s")
    runs.add_argument("--json", action="store_true", help="a JSON list instead of a table")

    bench = commands.add_parser(
        "bench-input", help="time the training input pipeline alone (no model)", formatter_class=defaults,
        description="Read, rotate and batch training samples from the cache as `fit` does, without a model. "
        "The last line is '<number> samples/s, peak RSS <n> MiB'.",
    )
    bench.add_argument("cache", type=Path, metavar="CACHE", help="cache file")
    bench.add_argument("--samples", type=within(positive_int, 1, MAX_BENCH_SAMPLES), default=200, help="samples to time")
    bench.add_argument("--batch-size", type=whole_number("batch_size"), default=2, help="volumes per batch")
    bench.add_argument("--seed", type=whole_number("seed"), default=DEFAULTS.seed, help="seed of order and angles")
    return parser


def describe_recipe(values: dict) -> str:
    """A recipe as the flags it stands for: "--lr 0.001, --schedule cosine, ..."."""
    return ", ".join(f"--{FLAG_NAMES.get(name, name.replace('_', '-'))} "
                     + (f"{value:g}" if isinstance(value, float) else str(value)) for name, value in values.items())


def add_fit_arguments(parser, run_dir_help: str, resume_help: str) -> None:
    """The options `fit` and `cv` share, one flag per FitOptions field, grouped as timm groups its
    training flags: data, model, optimisation, execution. The recipe fills in those marked so."""
    recipes = "; ".join(f"{name}: {describe_recipe(values)}" for name, values in RECIPES.items())
    parser.add_argument("cache", type=Path, metavar="CACHE", help="cache file from `python -m preprocess build`")

    data = parser.add_argument_group("data")
    data.add_argument("--task", choices=TASKS, default=DEFAULTS.task,
                      help="binary: normal vs abnormal (the tutorial's); severity: softmax over the MosMedData "
                      "grades CT-0 ... CT-4 present in the cache")
    data.add_argument("--batch-size", type=whole_number("batch_size"), default=DEFAULTS.batch_size,
                      help="volumes per batch and replica (the global batch is this times the replicas); "
                      "from the recipe%(default).0s")
    data.add_argument("--augment", choices=AUGMENTS, default=DEFAULTS.augment,
                      help="training augmentation: rotate (the tutorial's six in-plane angles) or rotate-mirror-shift "
                      "(each axis mirrored at random, a shift of up to a tenth of each axis, then the rotation); "
                      "from the recipe%(default).0s")
    data.add_argument("--seed", type=whole_number("seed"), default=DEFAULTS.seed,
                      help="seed of the initial weights, the data order and the augmentation (and of the folds)")

    model = parser.add_argument_group("model")
    model.add_argument("--padding", choices=PADDINGS, default=DEFAULTS.padding,
                       help="convolution padding: 'valid' (the tutorial's) needs >= 46 voxels per axis")
    model.add_argument("--width", type=within(positive_float, MIN_WIDTH, MAX_WIDTH), default=DEFAULTS.width,
                       metavar="W", help="every layer's width (filters, dense units) times W: 1 is the tutorial's "
                       "network (64, 64, 128, 256 filters); a training step at 0.5 costs about a third of one "
                       "at 1 on a CPU")
    model.add_argument("--pooling", choices=POOLINGS, default=DEFAULTS.pooling,
                       help="global pooling before the dense head (avgmax: both, concatenated); "
                       "from the recipe%(default).0s")
    model.add_argument("--norm", choices=NORMS, default=DEFAULTS.norm, help="after each block: BatchNorm (the "
                       "tutorial's), GroupNorm (8 groups) or InstanceNorm: the last two, each scan's own statistics")
    model.add_argument("--lesion-weight", type=within(finite_float, 0.0, MAX_LESION_WEIGHT),
                       default=DEFAULTS.lesion_weight, metavar="W",
                       help="the lesion-map model, trained on the cache's lesion masks with their loss weighed W "
                       f"(default {DEFAULT_LESION_WEIGHT:g} when training scans have masks; 0: the plain "
                       "classifier)%(default).0s")
    model.add_argument("--call-offset", choices=CALL_OFFSETS, default=DEFAULTS.call_offset,
                       help="the lesion map's call offset: refit (its default) before each validation from training "
                       "scans, or learned by gradient alone (runs before it)%(default).0s")
    model.add_argument("--bn-momentum", type=within(float, 0.0, 0.999999), default=DEFAULTS.bn_momentum,
                       metavar="M", help="momentum of BatchNorm's moving statistics; from the recipe%(default).0s")

    optimisation = parser.add_argument_group(
        "optimisation", "A recipe sets every option marked 'from the recipe' that is not given: " + recipes
        + ". config.json records the resolved values.")
    optimisation.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULTS.recipe,
                              help="precise: BatchNorm statistics re-estimated before every validation, warm-up and "
                              "cosine decay, bfloat16 where native, the last epoch's model; tutorial: the Keras tutorial's training exactly")
    optimisation.add_argument("--epochs", type=whole_number("epochs"), default=DEFAULTS.epochs, help="maximum epochs")
    optimisation.add_argument("--patience", type=whole_number("patience"), default=DEFAULTS.patience,
                              help="with --keep best: stop after this many epochs without a better validation AUC "
                              "(--keep last always trains every epoch)")
    optimisation.add_argument("--keep", choices=KEEPS, default=DEFAULTS.keep,
                              help="the run's model, used by evaluate, predict, cv and Grad-CAM: last (the weights at "
                              "the end of the schedule) or best (the epoch of the best validation AUC); a --resume may "
                              "change it; from the recipe%(default).0s")
    optimisation.add_argument("--lr", "--learning-rate", dest="learning_rate",
                              type=within(positive_float, MIN_LEARNING_RATE, MAX_LEARNING_RATE),
                              default=DEFAULTS.learning_rate, metavar="RATE",
                              help="peak learning rate of Adam; from the recipe (a lesion-map run: 1e-3)%(default).0s")
    optimisation.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                              help="learning-rate schedule: tutorial (x0.96 per 100k steps, which never acts in a run "
                              "of this size), cosine (decays to 0 over --epochs); from the recipe%(default).0s")
    optimisation.add_argument("--warmup-epochs", type=whole_number("warmup_epochs"), default=DEFAULTS.warmup_epochs,
                              metavar="N", help="epochs of linear warm-up from 0 (cosine only; at most --epochs - 1); "
                              "from the recipe%(default).0s")
    optimisation.add_argument("--precise-bn-scans", type=whole_number("precise_bn_scans"),
                              default=DEFAULTS.precise_bn_scans, metavar="N",
                              help="before every validation, re-estimate BatchNorm's statistics from this many "
                              "training scans (PreciseBN); 0: never; from the recipe (a lesion-map run: 0)%(default).0s")

    execution = parser.add_argument_group("execution")
    # "%(default).0s" prints nothing; it only stops the formatter from appending "(default: None)"
    execution.add_argument("--run-dir", type=Path, default=DEFAULTS.run_dir, metavar="DIR", help=run_dir_help)
    execution.add_argument("--resume", action="store_true", help=resume_help)
    execution.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                           help="Keras dtype policy (the output layer always computes in float32); auto: "
                           "mixed_bfloat16 on a GPU of compute capability >= 8.0, or where oneDNN's CPU kernels may "
                           "use AVX512_BF16 or AMX (not with TF_ENABLE_ONEDNN_OPTS=0 or a lower ONEDNN_MAX_CPU_ISA), "
                           "else float32; the strategy line says why; from the recipe%(default).0s")
    execution.add_argument("--strategy", choices=STRATEGIES, default=DEFAULTS.strategy,
                           help="tf.distribute strategy: mirrored (one replica per local GPU), multiworker (processes "
                           "or machines named by TF_CONFIG; needs --run-dir), default (one device), auto (mirrored "
                           "with more than one GPU, else default)")
    execution.add_argument("--quiet", action="store_true", help="no per-epoch lines; only warnings and errors")


def fit_options_of(arguments) -> FitOptions:
    """The FitOptions of `fit`'s (or `cv`'s) flags: every field a flag of the same name sets (`cv`'s
    --folds is its own, not the fold a run trains on)."""
    return FitOptions(**{field.name: getattr(arguments, field.name) for field in dataclasses.fields(FitOptions)
                         if hasattr(arguments, field.name) and field.name not in ("fold", "folds")})


def main(argv: list[str] | None = None) -> int:
    arguments = make_parser().parse_args(argv)
    configure_logging(getattr(arguments, "quiet", False))
    command = {"fit": run_fit, "cv": run_cv, "evaluate": run_evaluate, "predict": run_predict, "runs": run_runs,
               "bench-input": run_bench}
    # run_command frees what a failed command left (its tf.data pipelines) before the interpreter exits
    return run_command(PROG, lambda: command[arguments.command](arguments),
                       lambda error: describe_failure(error, arguments.command))


def run_fit(arguments) -> int | None:
    from train.fit import fit_model
    from train.fit_summary import format_learned, format_report

    try:
        report = fit_model(fit_options_of(arguments))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the run keeps its last completed epoch: continue it with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_report(report))
    warning = format_learned(report)
    if warning:
        print(warning, file=sys.stderr)  # the last line: a run that has learned nothing says so


def run_cv(arguments) -> int | None:
    from train.cv import cross_validate, format_summary

    try:
        report = cross_validate(fit_options_of(arguments), arguments.folds)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished folds and the last completed epoch are kept: continue with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(report))


def run_runs(arguments) -> None:
    from train.rundir.listing import DESCENDING_BY_DEFAULT, list_runs, sort_runs
    from train.rundir.table import format_runs

    descending = arguments.sort in DESCENDING_BY_DEFAULT
    runs = sort_runs(list_runs(arguments.root, arguments.cache), arguments.sort,
                     descending=not descending if arguments.reverse else descending)
    print(format_runs(runs, arguments.json))


def run_evaluate(arguments) -> None:
    from train.evaluate import evaluate_run, format_report
    print(format_report(evaluate_run(arguments.run_dir, arguments.cache, arguments.split)))


def run_predict(arguments) -> int:
    from train.predict import predict_scans, print_predictions

    return print_predictions(predict_scans(arguments.run_dir, arguments.scans, arguments.explain), arguments.json,
                             PROG, arguments.strict)


def run_bench(arguments) -> None:
    from train.bench import benchmark_input, format_benchmark
    print(format_benchmark(benchmark_input(arguments.cache, arguments.samples, arguments.batch_size, arguments.seed)))


if __name__ == "__main__":
    exit_with(main)
