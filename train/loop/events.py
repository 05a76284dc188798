"""TensorBoard event logs written with TensorFlow alone.

`keras.callbacks.TensorBoard` needs the `tensorboard` package for `tf.summary.scalar`; this
callback writes the same scalar events with TensorFlow's core `tf.summary.write`, so logs exist
even where TensorBoard is not installed. Layout and tags follow Keras's callback:
<log_dir>/train and <log_dir>/validation, tags "epoch_<metric>", step = epoch number - 1.
"""
from __future__ import annotations

import re
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from common.errors import UserError

VALIDATION_PREFIX = "val_"


def scalar_metadata() -> summary_pb2.SummaryMetadata:
    """What TensorBoard's scalars plugin expects on a scalar summary."""
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    return metadata


def describe_op_error(error: tf.errors.OpError) -> str:
    """TensorFlow's message without its graph decorations, e.g. '<file>; No space left on device'."""
    text = (error.message or "").strip()
    text = text.splitlines()[0] if text else type(error).__name__
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)


class ScalarEventLogger(keras.callbacks.Callback):
    """Log every metric Keras reports at the end of an epoch, split into train and validation."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writers: dict[str, tf.summary.SummaryWriter] = {}
        self.metadata = scalar_metadata()

    def _writer(self, name: str) -> tf.summary.SummaryWriter:
        if name not in self.writers:
            self.writers[name] = tf.summary.create_file_writer(str(self.log_dir / name))
        return self.writers[name]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = dict(logs or {})
        values["learning_rate"] = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        try:
            for name, value in values.items():
                folder, metric = ("validation", name[len(VALIDATION_PREFIX):]) \
                    if name.startswith(VALIDATION_PREFIX) else ("train", name)
                with self._writer(folder).as_default():
                    tf.summary.write(f"epoch_{metric}", tf.constant(float(value), tf.float32), step=epoch,
                                     metadata=self.metadata)
            for writer in self.writers.values():
                writer.flush()
        except tf.errors.OpError as error:  # a full disk, a file where the folder should be
            raise UserError(f"could not write the TensorBoard logs: {describe_op_error(error)}; the run is committed "
                            f"up to epoch {epoch + 1}; continue it with --resume once they can be written") from None

    def on_train_end(self, logs: dict | None = None) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
