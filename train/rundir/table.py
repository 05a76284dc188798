"""The `runs` table: run summaries (`train.rundir.listing`) as aligned text or JSON, with the cache marker."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

from train.network.scores import SEPARATION_ALPHA
from train.rundir.listing import COLUMNS, OPTIONAL_COLUMNS, RunSummary, parse_date

SHORT_FINGERPRINT = 8
MARKER = "*"
NO_RUNS = "no runs found (a run is a folder holding config.json, written by `python -m train fit`)"


def format_runs(runs: list[RunSummary], as_json: bool) -> str:
    """What `runs` prints: the table, or (`--json`) every run as a JSON list."""
    return json.dumps(runs_as_json(runs), indent=2) if as_json else format_runs_table(runs, None)


def format_runs_table(runs: list[RunSummary], reference_fingerprint: str | None) -> str:
    """An aligned table, one row per run, and footer lines on the cache marker and damaged runs.

    `reference_fingerprint` None: the reference `list_runs` chose.
    """
    if not runs:
        return NO_RUNS
    if reference_fingerprint is None:
        reference_fingerprint = runs[0].reference_fingerprint
    runs = [replace(run, reference_fingerprint=reference_fingerprint) for run in runs]
    cells = [_row_cells(run) for run in runs]
    columns = [column for column in COLUMNS
               if column not in OPTIONAL_COLUMNS or any(row[column] not in ("", "-") for row in cells)]
    widths = {column: max(len(column), *(len(row[column]) for row in cells)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns).rstrip()]
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns).rstrip() for row in cells]
    lines.append("")
    lines += _footer(runs, reference_fingerprint)
    return "\n".join(lines)


def _row_cells(run: RunSummary) -> dict[str, str]:
    number = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    plain = lambda value: "-" if value is None else str(value)  # noqa: E731
    date = parse_date(run.created_utc) if run.created_utc else None
    epochs = f"{plain(run.completed_epochs)}/{plain(run.max_epochs)}"
    return {
        "run": run.name,
        "date": date.strftime("%Y-%m-%d %H:%M") if date else "-",
        "status": run.status,
        "cache": (run.cache_fingerprint[:SHORT_FINGERPRINT] + (MARKER if run.other_cache else ""))
        if run.cache_fingerprint else "-",
        "task": plain(run.task),
        "recipe": plain(run.recipe),
        "epochs": "-" if epochs == "-/-" else epochs,
        "batch": plain(run.batch_size),
        "lr": "-" if run.learning_rate is None else format_learning_rate(run.learning_rate),
        "padding": plain(run.padding),
        "width": "-" if run.width is None else f"{run.width:g}",
        "norm": run.norm or "-",
        "seed": plain(run.seed),
        "strategy": plain(run.strategy),
        "val_auc": number(run.best_val_auc),
        "learned": {"cannot tell": "?"}.get(run.learned, plain(run.learned)),
        "test_auc": number(run.test_auc),
        "test_acc": number(run.test_accuracy),
        "kappa": "" if run.task == "binary" else number(run.test_kappa),
    }


def format_learning_rate(rate: float) -> str:
    """The shortest exponent form that reads back as the same number: 1e-04, 2.5e-04."""
    for digits in range(4):
        text = f"{rate:.{digits}e}"
        if float(text) == rate:
            return text
    return f"{rate:.3e}"


def _footer(runs: list[RunSummary], reference_fingerprint: str | None) -> list[str]:
    short = (reference_fingerprint or "")[:SHORT_FINGERPRINT]
    if any(run.other_cache for run in runs):
        lines = [f"{MARKER} trained on another cache than the reference ({short}): "
                 "do not compare its numbers with the others"]
    elif reference_fingerprint is not None:
        lines = [f"every run with a known cache was trained on the reference cache ({short})"]
    else:
        lines = ["no run records its cache fingerprint"]
    if any(run.learned == "no" for run in runs):
        lines.append("learned no: the model's validation AUC is not distinguishable from 0.5 (one-sided Mann-Whitney, "
                     f"p >= {SEPARATION_ALPHA:g}): its probabilities carry no information")
    if any(run.learned == "cannot tell" for run in runs):
        lines.append("learned ?: too few validation scans to tell whether the model learned")
    lines += [f"damaged: {run.name}: {run.problem}" for run in runs if run.status == "damaged"]
    return lines


def runs_as_json(runs: list[RunSummary]) -> list[dict]:
    """The runs as JSON-able dicts: every field (full fingerprints) and whether the cache differs."""
    return [{**asdict(run), "path": str(run.path), "other_cache": run.other_cache} for run in runs]
