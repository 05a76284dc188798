"""How large a 0.1-1% lesion is next to the vessels of the same lungs, in phantoms of bench_lesions.py's set.

Inside the lungs of a phantom, the two classes differ only by the lesion, and every scan differs
from every other by its vessels (4-8 tubes a lung, 1.5-4 mm across, at random places). This
counts, in the abnormal phantoms of the 84 set's draw (`synth --involvement 0.1 1`, seed 301,
128 x 128, 16-32 slices; phantoms are pure functions of their flags, so nothing is read from
disk), the lung voxels above -200 HU outside any lesion (vessels) and the lesion voxels raised
above -700 HU (the lung is -850, plus noise), and prints the median of each and their ratio.
No training; seconds.

    python benchmarks/probe_lesion_vessels.py [--phantoms 30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_lesions import INVOLVEMENT, SETS, SIZE, SLICES, fractions  # noqa: E402
from preprocess.phantoms.synth import make_phantom  # noqa: E402

SEED = 301  # bench_lesions.py's sets
VESSEL_HU, RAISED_HU = -200.0, -700.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=30, help="abnormal phantoms to count")
    arguments = parser.parse_args()
    first_abnormal = SETS["84"] // 2  # synth numbers the normal phantoms first
    counts = []
    for number in range(first_abnormal, first_abnormal + arguments.phantoms):
        phantom = make_phantom(SEED, number, True, SIZE, SLICES, None, fractions(INVOLVEMENT))
        hu = phantom.hu.astype(np.float32)
        vessels = np.count_nonzero(phantom.lung_mask & ~phantom.lesion_mask & (hu > VESSEL_HU))
        raised = np.count_nonzero(phantom.lesion_mask & (hu > RAISED_HU))
        counts.append((vessels, raised, np.count_nonzero(phantom.lesion_mask), phantom.involvement))
    vessels, raised, masked, shares = map(np.array, zip(*counts))
    ratio = raised / vessels
    print(f"{arguments.phantoms} abnormal phantoms (seed {SEED}, {SIZE} px, {SLICES[0]}-{SLICES[1]} slices, "
          f"lesions {INVOLVEMENT[0]}-{INVOLVEMENT[1]}% of the lung; median share {np.median(shares):.2%})")
    print(f"vessel voxels in the lungs (> {VESSEL_HU:g} HU): median {np.median(vessels):.0f}")
    print(f"lesion voxels raised above {RAISED_HU:g} HU: median {np.median(raised):.0f} "
          f"(of {np.median(masked):.0f} the lesion mask covers)")
    print(f"raised lesion / vessel voxels: median {np.median(ratio):.2f}, range {ratio.min():.2f}-{ratio.max():.2f}")


if __name__ == "__main__":
    main()
