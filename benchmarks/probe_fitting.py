"""Can the network fit, and does fitting generalize? A quick in-process probe, not a benchmark arm.

Trains the tutorial's network (or a GroupNorm variant) on a cache's train split WITHOUT rotation,
with PreciseBN before every validation, warm-up and cosine decay, float32, and prints the training
loss and validation AUC per epoch and the last model's test AUC as one JSON line. docs/benchmarks.md's
recipe benchmark quotes it for "the network memorizes 84 phantoms but does not generalize".

    python benchmarks/probe_fitting.py runs/bench_recipe/standard.h5 pool=max,b=8,lr=3e-3 --seed 0 --epochs 20
    python benchmarks/probe_fitting.py runs/bench_recipe/standard.h5 norm=gn --seed 0 --epochs 20

VARIANT is comma-separated key=value: b (batch, 2), lr (peak rate, 1e-3), pool (avg|max, avg),
norm (bn|gn, bn), groups (GroupNorm groups, 8), mom (BatchNorm momentum, 0.9).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_groupnorm_model(input_shape, pooling: str, groups: int):
    import keras
    from keras import layers

    inputs = keras.Input((*input_shape, 1))
    features = inputs
    for filters in (64, 64, 128, 256):
        features = layers.Conv3D(filters, 3, padding="same", activation="relu")(features)
        features = layers.MaxPool3D(2)(features)
        features = layers.GroupNormalization(groups)(features)
    pool = layers.GlobalAveragePooling3D() if pooling == "avg" else layers.GlobalMaxPooling3D()
    features = layers.Dropout(0.3)(layers.Dense(512, activation="relu")(pool(features)))
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("variant", help="comma-separated key=value (see the module docstring); 'base' for none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20, help="at least 2: one of warm-up, then cosine decay")
    arguments = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from preprocess.cache import CacheReader
    from train.loop.precise_bn import PreciseBatchNorm
    from train.network.model import build_model
    from train.network.scores import compute_roc_auc

    choices = dict(item.split("=", 1) for item in arguments.variant.split(",") if "=" in item)
    batch, learning_rate = int(choices.get("b", 2)), float(choices.get("lr", 1e-3))
    pooling, norm = choices.get("pool", "avg"), choices.get("norm", "bn")
    keras.utils.set_random_seed(arguments.seed)
    with CacheReader(arguments.cache) as reader:
        volumes = np.stack([reader.read_volume(row) for row in range(len(reader))])[..., None]
        labels = reader.labels.astype("float32")
        train_rows, val_rows, test_rows = (reader.split(name) for name in ("train", "val", "test"))
        shape = reader.shape
    if norm == "gn":
        model = make_groupnorm_model(shape, pooling, int(choices.get("groups", 8)))
    else:
        model = build_model(shape, padding="same", bn_momentum=float(choices.get("mom", 0.9)), pooling=pooling)
    steps_per_epoch = -(-len(train_rows) // batch)  # one epoch of warm-up, then cosine decay to 0
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps_per_epoch * max(arguments.epochs - 1, 1), warmup_target=learning_rate,
        warmup_steps=steps_per_epoch)
    model.compile(keras.optimizers.Adam(schedule), "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    training = (tf.data.Dataset.from_tensor_slices((volumes[train_rows], labels[train_rows]))
                .shuffle(len(train_rows), seed=arguments.seed).batch(batch))
    callbacks = []
    if norm == "bn":
        chosen = np.random.default_rng(arguments.seed).choice(train_rows, min(32, len(train_rows)), replace=False)
        callbacks.append(PreciseBatchNorm(tf.data.Dataset.from_tensor_slices(volumes[chosen]).batch(batch)))
    history = model.fit(training, validation_data=(volumes[val_rows], labels[val_rows]), epochs=arguments.epochs,
                        verbose=0, callbacks=callbacks).history
    for callback in callbacks:
        callback.on_test_begin()  # the statistics of the last weights, as fit's checkpoints hold them
    probabilities = model.predict(volumes[test_rows], verbose=0)[:, 0]
    print(json.dumps({"variant": arguments.variant, "seed": arguments.seed,
                      "loss": [round(value, 2) for value in history["loss"]],
                      "val_auc": [round(value, 2) for value in history["val_auc"]],
                      "test_auc_last": round(float(compute_roc_auc(labels[test_rows], probabilities)), 3)}))


if __name__ == "__main__":
    main()
