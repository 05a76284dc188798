"""`FitOptions`: every training option with its default; each field is one `fit` flag."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common.errors import UserError
from train.loop.distribute import STRATEGIES
from train.network.architecture import MAX_WIDTH, MIN_WIDTH
from train.network.lesions import CALL_OFFSET_BEFORE, MAX_LESION_WEIGHT
from train.network.precision import PRECISIONS
from train.network.tasks import TASKS
from train.rundir.layout import KEEPS

PADDINGS = ("valid", "same")
SCHEDULES = ("tutorial", "cosine")
POOLINGS = ("avg", "max", "avgmax")
NORMS = ("batch", "group", "instance")  # the normalisation after each block (train.network.model)
AUGMENTS = ("rotate", "rotate-mirror-shift")  # what train.pipeline.augment does to a training volume
# Options a --resume may change: they do not change what the finished run computes (epochs only
# extends or shortens the schedule; keep only chooses between the two models every run keeps;
# quiet and resume are about this invocation).
RESUMABLE_CHANGES = ("epochs", "keep", "quiet", "resume", "run_dir", "cache")
# The range of each whole-number option. The upper bounds are far beyond any real experiment:
# a larger value is a typo or an overflow, refused at once rather than attempted for hours
# (a batch of 10**12 volumes, 10**12 epochs). Seeds must fit NumPy's seed range.
MAX_PRECISE_BN_SCANS = 100_000
MAX_WARMUP_EPOCHS = 1_000
WHOLE_NUMBER_RANGES = {
    "epochs": (1, 100_000),
    "batch_size": (1, 1024),
    "patience": (0, 100_000),
    "seed": (0, 2**32 - 1),
    "warmup_epochs": (0, MAX_WARMUP_EPOCHS),
    "precise_bn_scans": (0, MAX_PRECISE_BN_SCANS),
}
# Adam diverges long before the maximum; below the minimum, float32 weights do not change at all
MIN_LEARNING_RATE, MAX_LEARNING_RATE = 1e-10, 1.0
MAX_BENCH_SAMPLES = 1_000_000

# A recipe names a value for every training choice a flag leaves unset (None). `tutorial` is the
# Keras tutorial's training exactly; `precise` is what benchmarks/bench_recipe.py measured best
# (docs/training.md, "Training recipe"): BatchNorm statistics re-estimated before every validation, so
# validation and checkpoints see population statistics rather than a lagging average of
# batch-of-2 statistics, a warm-up then cosine decay that actually acts within the run, and
# bfloat16 where the hardware runs it natively, and the model at the end of that schedule rather than
# the epoch a small validation split happened to score best (nnU-Net's checkpoint_final habit).
RECIPES = {
    "tutorial": {"batch_size": 2, "learning_rate": 1e-4, "schedule": "tutorial", "warmup_epochs": 0,
                 "bn_momentum": 0.99, "precise_bn_scans": 0, "precision": "float32", "pooling": "avg", "keep": "best",
                 "augment": "rotate"},
    # batch 8: BatchNorm's statistics over 8 scans, not 2 (issue 30, docs/benchmarks.md "Small findings")
    "precise": {"batch_size": 8, "learning_rate": 3e-4, "schedule": "cosine", "warmup_epochs": 1, "bn_momentum": 0.9,
                "precise_bn_scans": 32, "precision": "auto", "pooling": "avg", "keep": "last",
                "augment": "rotate"},
}
DEFAULT_RECIPE = "precise"


@dataclass(frozen=True)
class FitOptions:
    """Options of `python -m train fit`. A training choice left None takes its recipe's value
    (`resolve_recipe`); config.json records the resolved values."""

    cache: Path = Path("data/mosmed.h5")
    run_dir: Path | None = None  # None: runs/<timestamp>
    epochs: int = 100
    batch_size: int | None = None  # per replica; the recipe's: 8 (precise), 2 (the tutorial's)
    recipe: str = DEFAULT_RECIPE
    learning_rate: float | None = None  # peak rate of Adam (after any warm-up)
    schedule: str | None = None  # tutorial: x0.96 per 100k steps; cosine: decays to 0 over --epochs
    warmup_epochs: int | None = None  # linear warm-up from 0 (cosine schedule only)
    bn_momentum: float | None = None  # of BatchNorm's moving statistics (Keras's default: 0.99)
    precise_bn_scans: int | None = None  # training scans to re-estimate BatchNorm's statistics from; 0: never
    pooling: str | None = None  # global pooling before the dense head
    augment: str | None = None  # training augmentation: rotate (the tutorial's) or rotate-mirror-shift
    keep: str | None = None  # the run's model: best (highest val AUC) or last (the end of the schedule)
    patience: int = 15  # early stopping; only with keep "best"
    seed: int = 0
    padding: str = "valid"
    width: float = 1.0  # every layer's width times this; 1: the tutorial's network
    norm: str = "batch"  # BatchNorm (the tutorial's), GroupNorm or InstanceNorm after each block
    precision: str | None = None  # auto: mixed_bfloat16 where the hardware runs bfloat16 natively
    strategy: str = "auto"  # see train.loop.distribute
    task: str = "binary"  # see train.network.tasks
    # the lesion-cell loss's weight (train.network.lesions); None: 20 when training scans have lesion
    # masks, else 0 (the plain classifier); `fit` records the resolved value
    lesion_weight: float | None = None
    # the lesion map's call offset (train.network.lesions.CALL_OFFSETS); None: refit for a lesion-map run,
    # and None recorded for the plain model, which has no such call
    call_offset: str | None = None
    # cross-validation (set by `train cv`, not a `fit` flag): train on every fold of the train and
    # validation rows but `fold` (1-based), validate on that one, and leave the test split alone
    fold: int | None = None
    folds: int | None = None
    resume: bool = False
    quiet: bool = False

    def to_json(self) -> dict:
        """The options as JSON-able values (paths as strings), as written to config.json."""
        return {name: str(value) if isinstance(value, Path) else value for name, value in asdict(self).items()}


def resolve_recipe(options: FitOptions) -> FitOptions:
    """`options` with every training choice left None set from its recipe (precision may stay "auto")."""
    if options.recipe not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {options.recipe!r}")
    unset = {name: value for name, value in RECIPES[options.recipe].items() if getattr(options, name) is None}
    return replace(options, **unset)


def check_fit_options(options: FitOptions) -> None:
    """Refuse options that cannot train, with one line naming the flag (call on resolved options)."""
    for name, (low, high) in WHOLE_NUMBER_RANGES.items():
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UserError(f"--{name.replace('_', '-')} must be a whole number from {low} to {high}, got {value!r}")
    rate = options.learning_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
            or not MIN_LEARNING_RATE <= rate <= MAX_LEARNING_RATE:
        raise UserError(f"--lr must be from {MIN_LEARNING_RATE} to {MAX_LEARNING_RATE}, got {rate!r}")
    momentum = options.bn_momentum
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise UserError(f"--bn-momentum must be at least 0 and below 1, got {momentum!r}")
    if options.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {options.schedule!r}")
    if options.schedule == "tutorial" and options.warmup_epochs:
        raise UserError("--warmup-epochs needs --schedule cosine (the tutorial's schedule has no warm-up)")
    if options.augment not in AUGMENTS:
        raise UserError(f"--augment must be one of {', '.join(AUGMENTS)}, got {options.augment!r}")
    if options.norm not in NORMS:
        raise UserError(f"--norm must be one of {', '.join(NORMS)}, got {options.norm!r}")
    if options.pooling not in POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, got {options.pooling!r}")
    if options.keep not in KEEPS:
        raise UserError(f"--keep must be one of {', '.join(KEEPS)}, got {options.keep!r}")
    width = options.width
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not MIN_WIDTH <= width <= MAX_WIDTH:
        raise UserError(f"--width must be from {MIN_WIDTH:g} to {MAX_WIDTH:g}, got {width!r}")
    if options.padding not in PADDINGS:
        raise UserError(f"--padding must be one of {', '.join(PADDINGS)}, got {options.padding!r}")
    if options.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    if options.task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {options.task!r}")
    weight = options.lesion_weight
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not 0.0 <= weight <= MAX_LESION_WEIGHT):
        raise UserError(f"--lesion-weight must be from 0 to {MAX_LESION_WEIGHT:g}, got {weight!r}")
    if (options.fold is None) != (options.folds is None) or (
            options.folds is not None and not 1 <= options.fold <= options.folds):
        raise UserError(f"fold {options.fold} of {options.folds} is not a fold")
    if options.strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {options.strategy!r}")
    if options.strategy == "multiworker" and options.run_dir is None:
        raise UserError("--strategy multiworker needs --run-dir: every worker names the same run directory "
                        "(on storage they all see); only the chief writes it")
    if options.resume and options.run_dir is None:
        raise UserError("--resume needs --run-dir: the run directory to continue")


def changed_options(recorded: dict, options: FitOptions) -> list[str]:
    """The options (other than RESUMABLE_CHANGES) whose value differs from a run's config.json."""
    current = options.to_json()
    if "recipe" not in recorded:  # a run from before recipes existed trained with the tutorial's
        recorded = {**recorded, "recipe": "tutorial", **RECIPES["tutorial"],
                    "batch_size": recorded.get("batch_size", 2)}
    # a run from before --width, --norm or --augment trained the tutorial's width, BatchNorm and rotations
    # and before lesion masks, no lesion map
    recorded = {"width": 1.0, "norm": "batch", "augment": "rotate", "lesion_weight": 0.0, **recorded}
    # and a lesion-map run from before --call-offset learned its call's offset by gradient alone
    recorded = {"call_offset": CALL_OFFSET_BEFORE if recorded["lesion_weight"] else None, **recorded}
    return [
        f"--{name.replace('_', '-')} {recorded.get(name)!r} in the run, {current[name]!r} now"
        for name in current
        if name not in RESUMABLE_CHANGES and recorded.get(name) != current[name]
    ]
