"""The tutorial's 3D CNN: layers, shape checks, precision policies, seeds, safe loading."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from common.errors import UserError  # noqa: E402
from train.network.architecture import (  # noqa: E402
    TUTORIAL, check_input_shape, feature_map_sizes, forward_flops, minimum_axis_size, scaled, training_step_flops,
)
from train.network.model import build_model  # noqa: E402
from train.rundir.models import load_trained_model  # noqa: E402

TINY = (32, 32, 16)


def test_the_tutorials_layers_in_order():
    model = build_model(TINY, padding="same")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer"] + ["Conv3D", "MaxPooling3D", "BatchNormalization"] * 4 + [
        "GlobalAveragePooling3D", "Dense", "Dropout", "Dense"]
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv3D)]
    assert [layer.filters for layer in convolutions] == [64, 64, 128, 256]
    assert all(layer.kernel_size == (3, 3, 3) and layer.activation.__name__ == "relu" for layer in convolutions)
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling3D)]
    assert all(layer.pool_size == (2, 2, 2) for layer in pools)
    dense, dropout, output = model.layers[-3:]
    assert (dense.units, dense.activation.__name__) == (512, "relu")
    assert dropout.rate == 0.3
    assert (output.units, output.activation.__name__) == (1, "sigmoid")
    assert model.input_shape == (None, *TINY, 1) and model.output_shape == (None, 1)


@pytest.mark.parametrize("norm, groups", [("group", [8, 8, 8, 8]), ("instance", [64, 64, 128, 256])])
def test_group_and_instance_norm_replace_batchnorm_in_every_block(norm, groups):
    model = build_model(TINY, padding="same", norm=norm)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert [layer.name for layer in norms] == ["norm1", "norm2", "norm3", "norm4"]
    assert [layer.groups for layer in norms] == groups
    # each scan is normalised by its own statistics: a scan's output does not depend on its batch-mates
    rng = np.random.default_rng(0)
    volumes = rng.uniform(0, 1, (3, *TINY, 1)).astype(np.float32)

    def features(network, batch):  # the last block's output in training mode (no dropout before it)
        return keras.Model(network.input, network.get_layer("norm4").output)(batch, training=True).numpy()

    np.testing.assert_allclose(features(model, volumes[:1]), features(model, volumes)[:1], atol=1e-3)
    batch_model = build_model(TINY, padding="same", norm="batch")  # the negative case: BatchNorm's do
    assert not np.allclose(features(batch_model, volumes[:1]), features(batch_model, volumes)[:1], atol=0.1)


def test_valid_padding_needs_46_voxels_per_axis():
    assert minimum_axis_size("valid") == 46
    assert min(feature_map_sizes(46, "valid")) == 1 and min(feature_map_sizes(45, "valid")) == 0
    build_model((46, 46, 46), padding="valid")  # the smallest volume that fits
    with pytest.raises(UserError, match="--padding same"):
        check_input_shape(TINY, "valid")
    with pytest.raises(UserError, match="larger --shape"):
        check_input_shape((32, 32, 8), "same")


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_the_output_layer_in_float32(precision):
    model = build_model(TINY, padding="same", precision=precision)
    assert model.get_layer("conv1").compute_dtype == precision.split("_")[1]
    assert model.get_layer("conv1").variable_dtype == "float32"
    assert model.get_layer("probability_abnormal").compute_dtype == "float32"
    if precision == "mixed_bfloat16":  # TensorFlow has no float16 MaxPool3D on CPU
        probability = model(np.zeros((1, *TINY, 1), np.float32), training=False)
        assert keras.backend.standardize_dtype(probability.dtype) == "float32"


def test_the_same_seed_gives_the_same_initial_weights():
    def initial_weights(seed):
        keras.utils.set_random_seed(seed)
        return build_model(TINY, padding="same").get_weights()

    first, again, other = initial_weights(1), initial_weights(1), initial_weights(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_a_model_with_stored_python_code_is_refused(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda values: values * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(UserError, match="refusing to load"):
        load_trained_model(path)


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    path = tmp_path / "best.keras"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(UserError):
        load_trained_model(path)
    with pytest.raises(UserError, match="no such model"):
        load_trained_model(tmp_path / "missing.keras")


@pytest.mark.parametrize("shape, padding, pooling", [((32, 32, 16), "same", "avg"), ((48, 50, 46), "valid", "avgmax")])
def test_forward_flops_count_every_multiply_add_of_the_built_model(shape, padding, pooling):
    """Counted from Keras's own output shapes and weights: 2 operations per multiply-add of each kernel weight."""
    model = build_model(shape, padding=padding, pooling=pooling)
    expected = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv3D):
            expected[layer.name] = 2 * int(np.prod(layer.output.shape[1:4])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            expected["output" if layer.name == "probability_abnormal" else layer.name] = 2 * int(np.prod(layer.kernel.shape))
    flops = forward_flops(shape, padding, pooling=pooling)
    assert flops == expected
    assert training_step_flops(shape, padding, 3, pooling=pooling) == 3 * (3 * sum(expected.values()) - expected["conv1"])


def test_width_scales_every_layer_and_the_convolutions_flops_by_its_square():
    assert scaled(1.0) == TUTORIAL
    half = scaled(0.5)
    assert (half.block_filters, half.dense_units) == ((32, 32, 64, 128), 256)
    model = build_model(TINY, padding="same", architecture=half, pooling="avgmax")
    assert [model.get_layer(f"conv{index}").filters for index in range(1, 5)] == [32, 32, 64, 128]
    full, narrow = forward_flops(TINY, "same", pooling="avgmax"), forward_flops(TINY, "same", half, pooling="avgmax")
    assert narrow["conv1"] * 2 == full["conv1"]  # one input channel: only the output halves
    assert all(narrow[name] * 4 == full[name] for name in ("conv2", "conv3", "conv4", "dense"))
    assert scaled(0.125).block_filters == (8, 8, 16, 32)
