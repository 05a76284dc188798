"""Grad-CAM: where in a volume the 3D CNN looked when it scored a class.

The map is the last Conv3D layer's activations weighted by the class score's mean gradient per
channel (Selvaraju et al., 2017), rectified, upsampled to the volume and scaled to [0, 1].
We use `conv4`'s own output, not the block's `norm4`: pooling halves every axis first, so at
32 x 32 x 16 the block output is 2 x 2 x 1 cells against conv4's 4 x 4 x 2, and the batch norm
after it is a per-channel affine map that the gradient weighting already absorbs.
The score is the output layer's logit, recomputed from its kernel and bias: a saturated sigmoid
or softmax has vanishing gradients, and the logit ranks classes the same way.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.errors import UserError
from common.files import replace_atomically
from preprocess.montage import save_montage
from preprocess.reading.lungs import describe_region as lung_region
from preprocess.reading.resize import resize_volume
from preprocess.reading.scan_stats import ScanStats
from train.network.model import TopLogitCall


def find_last_convolution(model: keras.Model) -> keras.layers.Layer:
    """The model's last Conv3D layer (conv4 in the tutorial's network)."""
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv3D):
            return layer
    raise ValueError(f"model {model.name!r} has no Conv3D layer to explain")


def logit_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The output layer (a Dense, or the lesion map's `TopLogitCall`) if it ends in a sigmoid or softmax
    whose logit we can recompute from its kernel and bias, else None."""
    layer = model.layers[-1]
    activation = getattr(layer, "activation", None)
    if isinstance(layer, (keras.layers.Dense, TopLogitCall)) and activation in (keras.activations.sigmoid,
                                                                                keras.activations.softmax):
        return layer
    return None


def compute_grad_cam(model: keras.Model, volume: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM heat map of one cached (H, W, D) volume: float32, same shape, in [0, 1].

    A binary model (one sigmoid unit) is explained for the abnormal class, or for normal with
    class_index=0; a K-class softmax model for `class_index`, by default its predicted class.
    All zeros if no region raises the score.
    """
    volume = np.asarray(volume, dtype=np.float32)
    expected_shape = tuple(model.inputs[0].shape[1:4])
    if volume.shape != expected_shape:
        raise UserError(f"the volume is {'x'.join(map(str, volume.shape))} but the model takes "
                        f"{'x'.join(map(str, expected_shape))} volumes")
    convolution, output_layer = find_last_convolution(model), logit_layer(model)
    head = output_layer.input if output_layer is not None else model.output
    explainer = keras.Model(model.inputs, [convolution.output, head])
    with tf.GradientTape() as tape:
        features, head_values = explainer([tf.constant(volume[None, ..., None])], training=False)
        if output_layer is not None:
            head_values = tf.cast(head_values, output_layer.kernel.dtype)
            scores = tf.matmul(head_values, output_layer.kernel) + output_layer.bias
        else:
            scores = tf.cast(head_values, tf.float32)  # no recoverable logit: explain the output itself
        score = pick_class_score(scores[0], class_index)
    gradients = tape.gradient(score, features)
    if gradients is None:
        raise ValueError(f"the score does not depend on {convolution.name}")
    channel_weights = tf.reduce_mean(tf.cast(gradients[0], tf.float32), axis=(0, 1, 2))
    coarse_map = tf.nn.relu(tf.reduce_sum(tf.cast(features[0], tf.float32) * channel_weights, axis=-1)).numpy()
    # linear enlarging with half-voxel centres, axis by axis: trilinear, aligned as preprocessing aligns
    heat_map = resize_volume(np.nan_to_num(coarse_map.astype(np.float32)), volume.shape)
    np.clip(heat_map, 0.0, None, out=heat_map)
    peak = float(heat_map.max())
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros(volume.shape, dtype=np.float32)
    return np.clip(heat_map / np.float32(peak), 0.0, 1.0).astype(np.float32)


def pick_class_score(scores: tf.Tensor, class_index: int | None) -> tf.Tensor:
    """One class's score from one volume's scores: a single unit is abnormal's (its negation normal's)."""
    class_count = int(scores.shape[-1])
    if class_count == 1:
        if class_index not in (None, 0, 1):
            raise UserError(f"a binary model has classes 0 (normal) and 1 (abnormal), not {class_index}")
        return -scores[0] if class_index == 0 else scores[0]
    if class_index is None:
        class_index = int(tf.argmax(scores))
    if not 0 <= class_index < class_count:
        raise UserError(f"class index {class_index} is out of range: the model has {class_count} classes")
    return scores[class_index]


def describe_region(crop: str, stats: ScanStats | None) -> str:
    """What an explained volume shows, in one line: the lungs' box in the scan's voxels, or the whole scan.

    Without it, a heat map in a crop could be taken for one over the whole chest.
    """
    box = None if stats is None else stats.lung_box
    return "volume: " + lung_region(crop, box, None if stats is None else stats.scan_shape)


def explanation_title(scan_name: str, explained: str, predicted: str, confidence_percent: float, crop: str,
                      stats: ScanStats | None) -> str:
    """The montage's title: the scan, the class explained, the prediction, and the region the volume shows."""
    return (f"{scan_name}: Grad-CAM for '{explained}' (predicted {predicted}, {confidence_percent:.1f}%)\n"
            f"{describe_region(crop, stats)}")


def save_explanation(volume: np.ndarray, heat_map: np.ndarray, path: Path, title: str) -> Path:
    """Write a PNG montage of the volume's axial slices with the heat map overlaid, atomically."""
    if np.shape(volume) != np.shape(heat_map):
        raise ValueError(f"volume {np.shape(volume)} and heat map {np.shape(heat_map)} differ in shape")
    return replace_atomically(Path(path), lambda temporary: save_montage(volume, temporary, title, overlay=heat_map))
