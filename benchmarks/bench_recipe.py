"""Training recipes side by side: the tutorial's, each change on its own, and the default, over seeds.

Synthetic sets the demo and the tests never use (their own phantom seeds), 64 x 64 x 32, split
70/15/15 by the cache:
  standard      `synth` phantoms, normal against ungraded lesions: 360 phantoms (252 training,
                54 validation, 54 test), 20 epochs
  standard-30   the standard set's phantoms and cache, 30 epochs: as long as the issue's test AUC target
  standard-masks  the standard set's phantoms with their lesion masks (`synth --masks`), 20 epochs: `fit`
                trains the lesion-map model on them by default
  standard-120  the same kind, 120 phantoms (84 / 18 / 18), 30 epochs: the first benchmark's set,
                kept to compare with; too few phantoms to learn the lesions from, and too few
                held out to measure an AUC near 1 (one scan moves it by 0.01-0.05)
  subtle        normal against CT-1 only: lesions covering under 25% of the lung, drawn uniformly
                in (0, 25%], as MosMedData's CT-1; 360 phantoms (252 / 54 / 54), 30 epochs
  subtle-120    the same kind, 120 phantoms (84 / 18 / 18), 30 epochs: the first benchmark's set
Every run is a real `python -m train fit` process with --patience equal to --epochs (no early
stop, so every run has the same number of validation epochs). For each arm and set it prints:
  - degenerate validation epochs: every validation scan called one class (val sensitivity or
    val specificity 0), counted over the first 20 epochs, mean and worst seed;
  - epochs and wall-clock seconds until validation AUC first reaches 0.95 (median over seeds;
    seconds are history.csv's epoch_seconds, which include re-estimation and validation; a run
    that never gets there counts as infinite);
  - test AUC of the run's model (`--keep`: the last epoch's for the default, the best validation
    AUC's for the tutorial), mean ± sd and the worst seed;
  - the spread (sd) of validation AUC over the last 5 epochs, mean over seeds.
Runs are kept in --out, and a run already finished there is read, not repeated: an interrupted
benchmark continues where it stopped, and more seeds or arms can be added later.

    python benchmarks/bench_recipe.py [--seeds 5] [--first-seed 0] [--arms tutorial precise ...] [--sets standard subtle standard-30 standard-masks standard-120 subtle-120]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train's own option parsing, to check kept runs against their arms
from sets import SETS, SHAPE, SHARED_CACHES, kept_runs, make_cache, print_machine, python  # noqa: E402,F401
ARMS = {  # name: fit flags
    "tutorial": ["--recipe", "tutorial"],
    # each change of the default recipe on its own, on top of the tutorial's
    "precise-bn": ["--recipe", "tutorial", "--precise-bn-scans", "32"],
    "momentum-0.9": ["--recipe", "tutorial", "--bn-momentum", "0.9"],
    "cosine-3e-4": ["--recipe", "tutorial", "--schedule", "cosine", "--warmup-epochs", "1", "--lr", "3e-4"],
    "cosine-1e-3": ["--recipe", "tutorial", "--schedule", "cosine", "--warmup-epochs", "1", "--lr", "1e-3"],  # the first default's
    "bf16": ["--recipe", "tutorial", "--precision", "mixed_bfloat16"],
    # the default recipe with one choice changed
    "precise-fp32": ["--precision", "float32"],  # does bfloat16 cost AUC?
    "precise-max": ["--pooling", "max"],  # the head: does the maximum find small lesions the mean dilutes?
    "precise-avgmax": ["--pooling", "avgmax"],
    "precise-lr1e-3": ["--lr", "1e-3"],  # the peak rate: the first default, 3e-4 and the tutorial's 1e-4
    "precise-lr1e-4": ["--lr", "1e-4"],
    # the first default (peak rate 1e-3) with one choice changed: the 120-phantom runs of session 4
    "lr1e-3-fp32": ["--lr", "1e-3", "--precision", "float32"],
    "lr1e-3-max": ["--lr", "1e-3", "--pooling", "max"],
    "lr1e-3-avgmax": ["--lr", "1e-3", "--pooling", "avgmax"],
    "precise-best": ["--keep", "best"],  # the default until --keep: the epoch of the best validation AUC
    "precise": [],  # the default recipe
    # a set with masks (the lesion map) only: its call's offset learned by gradient alone, as before refit
    "precise-learned": ["--call-offset", "learned"],
}
DEGENERATE_WINDOW = 20
TARGET_AUC = 0.95
LAST_EPOCHS = 5


def recipe_choices(flags: list[str]) -> dict:
    """The training choices `fit` resolves for these flags: recipe values where no flag overrides them."""
    from train.__main__ import fit_options_of, make_parser  # TensorFlow-free
    from train.options import RECIPES, resolve_recipe

    options = resolve_recipe(fit_options_of(make_parser().parse_args(["fit", "CACHE", *flags])))
    return {"recipe": options.recipe, **{name: getattr(options, name) for name in RECIPES[options.recipe]}}


def check_arm(run_dir: Path, flags: list[str]) -> None:
    """Refuse a kept run that was trained with other choices than its arm names now (a renamed arm, a changed
    default): its numbers would be reported under the wrong name. `keep` may differ: it chooses between the
    two models every run keeps, and `train` re-selects (a resume that trains nothing)."""
    recorded = json.loads((run_dir / "config.json").read_text())["options"]
    wanted = {name: value for name, value in recipe_choices(flags).items() if name != "keep"}
    if recorded.get("lesion_weight"):  # a lesion-map run (a set with masks): its own defaults (train/fit.py)
        from train.network.lesions import CALL_OFFSET_BEFORE, lesion_map_choices, resolve_call_offset

        wanted.update(lesion_map_choices("--precise-bn-scans" in flags, "--lr" in flags))
        recorded.setdefault("call_offset", CALL_OFFSET_BEFORE)  # a run from before the option
        given = flags[flags.index("--call-offset") + 1] if "--call-offset" in flags else None
        wanted["call_offset"] = resolve_call_offset(given, lesion_map=True)
    differing = {name: (recorded.get(name), value) for name, value in wanted.items()
                 if recorded.get(name) != value and not (name == "precision" and value == "auto")}
    if differing:
        sys.exit(f"{run_dir}: trained with other choices than its arm now makes (recorded, wanted): {differing}; "
                 "move it aside")


def tested_keep(run_dir: Path) -> str:
    """Which model a finished run's metrics.json tested ("best" before --keep existed)."""
    return json.loads((run_dir / "metrics.json").read_text()).get("keep", "best")


def train(cache: Path, run_dir: Path, epochs: int, seed: int, flags: list[str]) -> None:
    """One `fit` to the end; a run left unfinished by an interrupted benchmark is resumed, and a finished one
    that tested the other model than its arm keeps now is re-tested (its training is the same: --patience
    equals --epochs, so no run stops early)."""
    if (run_dir / "config.json").is_file():
        check_arm(run_dir, flags)
    if (run_dir / "metrics.json").is_file() and tested_keep(run_dir) == recipe_choices(flags)["keep"]:
        return  # finished in an earlier invocation
    resume = ["--resume"] if run_dir.exists() else []
    python("train", "fit", str(cache), "--run-dir", str(run_dir), *resume, "--epochs", str(epochs), "--patience",
           str(epochs), "--seed", str(seed), "--padding", "same", "--quiet", *flags,
           log=run_dir.parent / f"{run_dir.name}.log")  # not with_suffix: "momentum-0.9-seed0" has a dot


def score_run(run_dir: Path) -> dict:
    history = list(csv.DictReader(open(run_dir / "history.csv")))
    rows = [{name: float(value) for name, value in row.items()} for row in history]
    degenerate = sum(1 for row in rows[:DEGENERATE_WINDOW]
                     if row["val_sensitivity"] == 0.0 or row["val_specificity"] == 0.0)
    seconds, epochs_to_target, seconds_to_target = 0.0, math.inf, math.inf
    for row in rows:
        seconds += row["epoch_seconds"]
        if row["val_auc"] >= TARGET_AUC and math.isinf(epochs_to_target):
            epochs_to_target, seconds_to_target = row["epoch"], seconds
    last = [row["val_auc"] for row in rows[-LAST_EPOCHS:]]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"degenerate_epochs": degenerate, "epochs_to_target": epochs_to_target,
            "seconds_to_target": seconds_to_target, "seconds_total": seconds, "test_auc": metrics["auc"],
            "last_val_auc_sd": statistics.pstdev(last), "seconds_per_epoch": seconds / len(rows) if rows else math.nan,
            "epochs": len(rows)}


def at_least_seconds_to_target(score: dict) -> float:
    """Seconds to the target, or, for a run that never reached it, the whole run: a lower bound."""
    return score["seconds_to_target"] if math.isfinite(score["seconds_to_target"]) else score["seconds_total"]


def summarize(scores: list[dict], baseline: list[dict]) -> dict:
    """One arm's numbers; the speedup is the baseline's median seconds to the target over this arm's. Where
    the baseline's median run never got there, its whole duration stands in and the speedup is a lower bound."""
    aucs = [score["test_auc"] for score in scores]
    seconds = statistics.median(score["seconds_to_target"] for score in scores)
    baseline_seconds = statistics.median(score["seconds_to_target"] for score in baseline) if baseline else math.nan
    lower_bound = math.isinf(baseline_seconds)
    if lower_bound:
        baseline_seconds = statistics.median(at_least_seconds_to_target(score) for score in baseline)
    return {
        "seeds": len(scores),
        "degenerate_mean": statistics.mean(score["degenerate_epochs"] for score in scores),
        "degenerate_worst": max(score["degenerate_epochs"] for score in scores),
        "epochs_to_target_median": statistics.median(score["epochs_to_target"] for score in scores),
        "seconds_to_target_median": seconds,
        "speedup": baseline_seconds / seconds if math.isfinite(seconds) and seconds else math.nan,
        "speedup_is_lower_bound": lower_bound,
        "test_auc_mean": statistics.mean(aucs),
        "test_auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
        "test_auc_worst": min(aucs),
        "last_val_auc_sd_mean": statistics.mean(score["last_val_auc_sd"] for score in scores),
        "seconds_per_epoch": statistics.mean(score["seconds_per_epoch"] for score in scores),
    }


def format_table(name: str, epochs: int, summaries: dict[str, dict]) -> str:
    lines = [f"\n{name} set, {epochs} epochs",
             "| arm | seeds | degenerate val epochs (of first 20): mean, worst | epochs to val AUC 0.95 (median) "
             "| seconds to 0.95 (median) | vs tutorial | test AUC mean ± sd (worst) | val AUC sd, last 5 epochs "
             "| s/epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, summary in summaries.items():
        marked = f"{arm} †" if summary.get("tested_other_model") else arm
        speedup = "" if arm == "tutorial" or math.isnan(summary["speedup"]) \
            else f"{'≥ ' if summary['speedup_is_lower_bound'] else ''}{summary['speedup']:.1f}x"
        epochs_to = summary["epochs_to_target_median"]
        seconds_to = summary["seconds_to_target_median"]
        lines.append(
            f"| {marked} | {summary['seeds']} | {summary['degenerate_mean']:.1f}, {summary['degenerate_worst']} "
            f"| {'never' if math.isinf(epochs_to) else f'{epochs_to:g}'} "
            f"| {'never' if math.isinf(seconds_to) else f'{seconds_to:.0f}'} "
            f"| {speedup} "
            f"| {summary['test_auc_mean']:.3f} ± {summary['test_auc_sd']:.3f} ({summary['test_auc_worst']:.3f}) "
            f"| {summary['last_val_auc_sd_mean']:.3f} | {summary['seconds_per_epoch']:.1f} |")
    if any(summary.get("tested_other_model") for summary in summaries.values()):
        lines.append("\n† test AUC of the best-validation model: runs from before --keep, whose arm now keeps the last "
                     "epoch's (run the benchmark without --report-only to re-test them)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (0 .. N-1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train and report seeds from this one on (FIRST .. N-1): a later machine adding seeds "
                             "whose earlier runs it does not hold")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=["standard", "subtle"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recipe", help="caches and runs (kept)")
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs in --out; train none")
    arguments = parser.parse_args()
    if not 0 <= arguments.first_seed < arguments.seeds:
        parser.error(f"--first-seed {arguments.first_seed}: must be at least 0 and below --seeds {arguments.seeds}")
    seeds = range(arguments.first_seed, arguments.seeds)
    print_machine()
    arguments.out.mkdir(parents=True, exist_ok=True)
    caches = {name: make_cache(arguments.out, name) for name in arguments.sets}
    started = time.perf_counter()
    if not arguments.report_only:
        for seed in seeds:  # seed by seed, so that an interrupted run has balanced arms
            for name in arguments.sets:
                for arm in arguments.arms:
                    run_dir = arguments.out / name / f"{arm}-seed{seed}"
                    run_dir.parent.mkdir(exist_ok=True)
                    train(caches[name], run_dir, SETS[name][2], seed, ARMS[arm])
                    print(f"[{time.perf_counter() - started:6.0f} s] {name} {arm} seed {seed}: "
                          f"{json.dumps(score_run(run_dir))}", flush=True)
    report = {}
    for name in arguments.sets:
        finished = {arm: [run_dir for seed in seeds
                          if ((run_dir := arguments.out / name / f"{arm}-seed{seed}") / "metrics.json").is_file()]
                    for arm in arguments.arms}
        for arm, run_dirs in finished.items():
            for run_dir in run_dirs:
                check_arm(run_dir, ARMS[arm])
        scores = {arm: [score_run(run_dir) for run_dir in run_dirs] for arm, run_dirs in finished.items()}
        scores = {arm: values for arm, values in scores.items() if values}
        report[name] = {arm: summarize(values, scores.get("tutorial", [])) for arm, values in scores.items()}
        for arm, summary in report[name].items():  # runs from before --keep tested their best model
            summary["tested_other_model"] = any(tested_keep(run_dir) != recipe_choices(ARMS[arm])["keep"]
                                                for run_dir in finished[arm])
        print(format_table(name, SETS[name][2], report[name]))
    (arguments.out / "summary.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
