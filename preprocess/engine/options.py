"""`BuildOptions`: every option of `python -m preprocess build` with its default, and their checks."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError
from preprocess.cache.schema import SplitOptions
from preprocess.finding.sources import NORMAL_CLASS
from preprocess.preprocessing import CROPS, Preprocessing

MAX_SHAPE = 1024
MAX_JOBS = 256
MAX_SCAN_TIMEOUT_SECONDS = 86_400
# where the per-scan work runs: local processes, local threads, or a Dask cluster
BACKENDS = ("loky", "threads", "dask")


@dataclass(frozen=True)
class BuildOptions:
    raw: Path = Path("data/MosMedData")
    out: Path = Path("data/mosmed.h5")
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    shape: tuple[int, int, int] = (128, 128, 64)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    scan_timeout_seconds: float = 600.0
    backend: str = "loky"
    scheduler: str | None = None  # address of a Dask scheduler, for backend "dask"
    force: bool = False
    strict: bool = False
    quiet: bool = False
    labels: Path | None = None  # a `path,class` CSV instead of class folders (preprocess.finding.labels)
    normal_class: str = NORMAL_CLASS  # the class whose scans get label 0
    crop: str = "lungs"  # "lungs": each volume is its scan's lungs' box (preprocess.reading.lungs); "none": the whole scan
    masks: Path | None = None  # lesion masks' folder (preprocess.finding.masks); None: <raw>/masks if it exists
    use_masks: bool = True  # False (--no-masks): cache no masks

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.of_this_code(self.shape, self.hu_window, self.crop)

    @property
    def split_options(self) -> SplitOptions:
        return SplitOptions(int(self.seed), float(self.val_fraction), float(self.test_fraction))


def check_options(options: BuildOptions) -> None:
    """Refuse options that cannot make a cache, with one line naming the problem."""
    if len(options.shape) != 3 or any(not 1 <= int(n) <= MAX_SHAPE for n in options.shape):
        raise UserError(f"--shape needs three sizes from 1 to {MAX_SHAPE}, got {' '.join(map(str, options.shape))}")
    if options.crop not in CROPS:
        raise UserError(f"--crop must be one of {', '.join(CROPS)}, got {options.crop}")
    if options.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {options.jobs}")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(options, name)
        if not 0 <= value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if options.val_fraction + options.test_fraction >= 1:
        raise UserError("--val-fraction plus --test-fraction must leave rows for training (sum < 1)")
    low, high = options.hu_window
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise UserError(f"--hu-window needs LOW < HIGH, got {low} {high}")
    if not 0 < options.scan_timeout_seconds <= MAX_SCAN_TIMEOUT_SECONDS:
        raise UserError(f"--scan-timeout must be between 0 and {MAX_SCAN_TIMEOUT_SECONDS} seconds, "
                        f"got {options.scan_timeout_seconds:g}")
    if options.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend}")
    if options.backend == "dask" and not options.scheduler:
        raise UserError("--backend dask needs --scheduler ADDRESS, the Dask scheduler's address (tcp://HOST:8786)")
    if options.scheduler and options.backend != "dask":
        raise UserError(f"--scheduler is for --backend dask; this build uses --backend {options.backend}")
    if options.backend == "dask" and importlib.util.find_spec("distributed") is None:
        raise UserError('--backend dask needs dask and distributed: pip install -e ".[dask]"')
    if options.jobs > MAX_JOBS:
        raise UserError(f"--jobs {options.jobs} is more worker processes than this tool starts (at most {MAX_JOBS})")
    if options.seed < 0:
        raise UserError(f"--seed must be non-negative, got {options.seed}")
    if not options.normal_class.strip():
        raise UserError("--normal-class needs a class name, e.g. CT-0 or normal")
    if options.labels is None and options.normal_class != BuildOptions.normal_class:
        raise UserError("--normal-class is for --labels FILE.csv; class folders are CT-k, and CT-0 is normal")
    if options.masks is not None and not options.use_masks:
        raise UserError("--masks and --no-masks contradict each other: give one")
    out = Path(options.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / 'mosmed.h5'}")
    if not out.parent.is_dir():
        raise UserError(f"--out folder {out.parent} does not exist or is not a folder")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out folder {out.parent} is not writable")
