"""The input pipeline: cache rows -> tf.data batches (data), their augmentation (augment), and which rows a run uses (folds)."""
