"""Would telling the network where the lesion is let it learn a 0.1-1% lesion from 84 scans?

A probe for a larger change, not a feature: `fit` has no lesion masks. synth knows every
phantom's lesion mask, so this script regenerates the masks of bench_lesions.py's 84 set (synth
seed 301, 0.1-1% of the lung), cuts each to its row's lungs' box (`/scan_stats/lung_box`) and
resizes it as `build` resized the scan. It trains the tutorial network (`build_model`: `--padding
same`, batch 8, BatchNorm momentum 0.9, bfloat16 where the CPU has it, Adam 3e-4 with one warm-up
epoch and a cosine decay, the six rotations) for 30 epochs with a second output: a 1x1x1
convolution on the second block's features (16 x 16 x 8) that predicts which of those cells hold
lesion (positives weighed `POSITIVE_WEIGHT` times). The weight 0 (`--weights 0 ...`) is the same script
with that loss switched off: the baseline, in the same run. The classification output is then
scored on the set's 18 test scans and on bench_lesions.py's 100 more (seed 302), through caches
(no masks needed there). Not the product's training loop: no PreciseBN, no resume.

`--head map` classifies from the lesion map instead: a 3x3x3 convolution (32 filters) and a 1x1x1 one
give each cell a logit, and the scan's probability is a sigmoid of an affine function of the
largest (its slope's sign left free here; `fit`'s lesion-map model holds it non-negative).
`--block 1` reads the first block's features (2x2x2-voxel cells) instead of the second's.

    python benchmarks/probe_lesion_supervision.py [--weights 0 1] [--seeds 2] [--epochs 30]
        [--head aux|map] [--block 2|1] [--out runs/probe_supervision]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_lesions import (  # noqa: E402
    EPOCHS, INVOLVEMENT, SHAPE, SIZE, SLICES, auc, fractions, make_cache, mean_sd, synth,
)
from sets import print_machine, python  # noqa: E402

SEED = 301  # bench_lesions.py's sets
BATCH, PEAK_RATE, BN_MOMENTUM = 8, 3e-4, 0.9
POSITIVE_WEIGHT = 20.0  # a lesion fills a few of the 2,048 cells: unweighted, "no lesion anywhere" costs little


def lesion_masks(cache: Path, cell: int) -> np.ndarray:
    """float32 (N, H/cell, W/cell, D/cell): 1 where a cell of a row's cached volume holds any lesion voxel."""
    import h5py

    from preprocess.phantoms.synth import make_phantom
    from preprocess.reading.resize import resize_volume

    with h5py.File(cache, "r") as file:
        scan_ids, labels = list(file["scan_ids"].asstr()[:]), file["labels"][:]
        boxes = file["scan_stats/lung_box"][:]
    masks = np.zeros((len(scan_ids), *(size // cell for size in SHAPE)), np.float32)
    for row, (scan_id, label, box) in enumerate(zip(scan_ids, labels, boxes)):
        if not label:
            continue
        number = int(scan_id.split("_")[-1])
        lesion = make_phantom(SEED, number, True, SIZE, SLICES, None, fractions(INVOLVEMENT)).lesion_mask
        x0, x1, y0, y1, z0, z1 = box
        resized = resize_volume(lesion[x0:x1, y0:y1, z0:z1].astype(np.float32), SHAPE)
        cells = resized.reshape(SHAPE[0] // cell, cell, SHAPE[1] // cell, cell, SHAPE[2] // cell, cell)
        masks[row] = cells.max(axis=(1, 3, 5)) > 0.25
    return masks


def read_split(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(cache, "r") as file:
        rows = file[f"splits/{split}"][:]
        return rows, file["volumes"][np.sort(rows)], file["labels"][np.sort(rows)].astype(np.float32)


def train_and_score(cache: Path, more_cache: Path, weight: float, seed: int, epochs: int = EPOCHS,
                    head: str = "aux", block: int = 2) -> tuple[float, float, float, float, float]:
    """Train one arm; return its classification loss at the end, the test and 100-more AUCs, the
    lesion-cell AUC on the test scans (cell by cell, against the masks) and the 100-more AUC of
    each scan's most confident cell."""
    import keras
    import tensorflow as tf

    from train.network.model import build_model
    from train.network.precision import resolve_precision
    from train.pipeline.augment import ROTATION_ANGLES_DEGREES, rotate_volume

    keras.utils.set_random_seed(seed)
    cell = 2**block  # each block pools by 2
    all_masks = lesion_masks(cache, cell)
    rows, volumes, labels = read_split(cache, "train")
    masks = all_masks[np.sort(rows)]
    precision = resolve_precision("auto").policy
    base = build_model(SHAPE, padding="same", precision=precision, bn_momentum=BN_MOMENTUM)
    features = base.get_layer(f"norm{block}").output
    if head == "map":  # the scan's logit is its most lesion-like cell's logit, scaled: classify from the map
        hidden = keras.layers.Conv3D(32, 3, padding="same", activation="relu", dtype=precision, name="cell_context")(
            features)
        logits = keras.layers.Conv3D(1, 1, dtype="float32", name="cell_logits")(hidden)
        cells = keras.layers.Activation("sigmoid", dtype="float32", name="lesion_cells")(logits)
        top = keras.layers.GlobalMaxPooling3D(dtype="float32")(logits)
        output = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability_abnormal")(top)
        model = keras.Model(base.input, [output, cells])
    else:
        cells = keras.layers.Conv3D(1, 1, activation="sigmoid", dtype="float32", name="lesion_cells")(features)
        model = keras.Model(base.input, [base.output, cells])

    def weighted_cells_loss(truth, predicted):
        weights = 1.0 + (POSITIVE_WEIGHT - 1.0) * truth
        return weight * tf.reduce_mean(weights * keras.losses.binary_crossentropy(truth, predicted, axis=[]))

    steps = int(np.ceil(len(rows) / BATCH))
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=steps * max(epochs - 1, 1),
                                                      warmup_target=PEAK_RATE, warmup_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=["binary_crossentropy", weighted_cells_loss])
    angles = tf.constant(ROTATION_ANGLES_DEGREES, tf.float32)

    def augment(volume, label, mask):
        angle = tf.gather(angles, tf.random.uniform([], 0, len(ROTATION_ANGLES_DEGREES), tf.int32))
        mask_up = tf.repeat(tf.repeat(tf.repeat(mask, cell, 0), cell, 1), cell, 2)  # rotate at the volume's grid
        both = rotate_volume(tf.concat([volume, mask_up], axis=2), angle)
        volume, mask_up = both[:, :, :SHAPE[2]], both[:, :, SHAPE[2]:]
        mask = tf.nn.max_pool3d(mask_up[None, ..., None], cell, cell, "VALID")[0] > 0.5
        return volume[..., None], (label[None], tf.cast(mask, tf.float32))

    data = (tf.data.Dataset.from_tensor_slices((volumes, labels, masks)).shuffle(len(rows), seed=seed)
            .map(augment).batch(BATCH).prefetch(2))
    history = model.fit(data, epochs=epochs, verbose=0)
    loss = history.history["probability_abnormal_loss"][-1] if "probability_abnormal_loss" in history.history \
        else history.history["loss"][-1]
    scores = []
    for source, split in ((cache, "test"), (more_cache, "test")):
        test_rows, test_volumes, test_labels = read_split(source, split)
        probabilities, cell_probabilities = model.predict(test_volumes[..., None], batch_size=BATCH, verbose=0)
        scores.append(auc(test_labels.astype(int).tolist(), probabilities.ravel().tolist()))
        if source == more_cache:  # the lesion-cell output alone as a classifier: its most confident cell
            cell_max_auc = auc(test_labels.astype(int).tolist(),
                               cell_probabilities.reshape(len(test_labels), -1).max(axis=1).tolist())
        if source == cache:  # where the lesion-cell output puts lesions, against the masks: a cell-level AUC
            test_masks = all_masks[np.sort(test_rows)]
            cell_auc = auc(test_masks.ravel().astype(int).tolist(), cell_probabilities.ravel().tolist())
    return loss, *scores, cell_auc, cell_max_auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0],
                        help="lesion-cell loss weights (0: off)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per weight (0 .. N-1)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs a run (bench_lesions.py's: 30)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "probe_supervision",
                        help="caches (kept; bench_lesions.py's --out reuses its 84 set and 100 more)")
    parser.add_argument("--head", choices=("aux", "map"), default="aux",
                        help="aux: the lesion cells beside the classifier; map: classify from the lesion map")
    parser.add_argument("--block", type=int, choices=(1, 2), default=2, help="the block whose features the cells read")
    arguments = parser.parse_args()
    print_machine()
    arguments.out.mkdir(parents=True, exist_ok=True)
    cache = make_cache(arguments.out, "84", "lungs")
    more = synth(arguments.out / "more100", 50, 50, 302)
    more_cache = arguments.out / "more100-lungs.h5"
    if not more_cache.is_file():
        python("preprocess", "build", "--raw", str(more), "--out", str(more_cache), "--shape", *map(str, SHAPE),
               "--val-fraction", "0", "--test-fraction", "0.99", "--quiet")
    print("| lesion-cell loss weight | seed | seconds | classification loss at the end | test AUC (18) | 100 more AUC "
          "| lesion-cell AUC (test) | 100 more AUC of the top cell |")
    print("|---|---|---|---|---|---|---|---|")
    for weight in arguments.weights:
        results = []
        for seed in range(arguments.seeds):
            start = time.perf_counter()
            loss, test_auc, more_auc, cell_auc, cell_max_auc = train_and_score(
                cache, more_cache, weight, seed, arguments.epochs, arguments.head, arguments.block)
            results.append((test_auc, more_auc))
            print(f"| {weight:g} | {seed} | {time.perf_counter() - start:.0f} | {loss:.2f} | {test_auc:.3f} | "
                  f"{more_auc:.3f} | {cell_auc:.3f} | {cell_max_auc:.3f} |", flush=True)
        print(f"weight {weight:g}: test AUC {mean_sd([r[0] for r in results])}, "
              f"100 more {mean_sd([r[1] for r in results])} over {len(results)} seeds", flush=True)


if __name__ == "__main__":
    main()
