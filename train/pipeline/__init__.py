"""The input pipeline: which rows a run uses (folds), cache rows -> tf.data batches (data), and
their augmentation (augment)."""
