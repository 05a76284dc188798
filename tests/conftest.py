"""Shared fixtures: tiny synthetic archives and caches, real NIfTI files written by nibabel."""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import train  # noqa: F401  before any test imports TensorFlow: it sets TensorFlow's kernel choice (train/hardware.py)

ROOT = Path(__file__).resolve().parents[1]
# A suite started in the background by a non-interactive shell (`make test &`, a CI runner's job)
# inherits SIGINT ignored, and so would every process it starts: the Ctrl-C tests would see their
# Ctrl-C ignored and the command finish. Handled as an interactive Python handles it, SIGINT reaches
# those processes as a user's Ctrl-C does (a Python handler is reset to the default on exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
REAL_CT = ROOT.parent / "shared" / "realct"
TINY_SHAPE = (32, 32, 16)


def run_python_module(*arguments: str, **kwargs):
    """Run `python -m ...` in a real subprocess (exit codes and what the user sees)."""
    import subprocess

    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    environment.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, "-m", *arguments], capture_output=True, text=True,
                          cwd=kwargs.pop("cwd", ROOT), env=environment, **kwargs)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, slope: float | None = None,
                intercept: float | None = None) -> Path:
    """Write `data` as a NIfTI file with nibabel, optionally with a scl_slope / scl_inter pair."""
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if slope is not None:
        image.header.set_slope_inter(slope, intercept or 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A small synthetic archive: 8 normal and 8 abnormal 48 x 48 phantoms (read-only by convention)."""
    from preprocess.phantoms.synth import write_synthetic_archive

    raw = tmp_path_factory.mktemp("synthetic") / "raw"
    write_synthetic_archive(raw, normal=8, abnormal=8, size=48, seed=0, progress=False)
    return raw


@pytest.fixture(scope="session")
def tiny_cache(synthetic_raw, tmp_path_factory) -> Path:
    """A 32 x 32 x 16 cache of `synthetic_raw` (read-only by convention: copy it to change it)."""
    from preprocess.engine.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    build_cache(BuildOptions(raw=synthetic_raw, out=out, jobs=1, shape=TINY_SHAPE, quiet=True))
    return out


@pytest.fixture
def raw_copy(synthetic_raw, tmp_path) -> Path:
    """A private, writable copy of the synthetic archive."""
    return Path(shutil.copytree(synthetic_raw, tmp_path / "raw"))


@pytest.fixture
def real_ct() -> Path:
    """The folder of real CT volumes beside the project, or a skip with the reason."""
    if not REAL_CT.is_dir() or not list(REAL_CT.glob("*.nii.gz")):
        pytest.skip(f"real CT volumes not found at {REAL_CT}")
    return REAL_CT
