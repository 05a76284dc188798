"""The network's shape arithmetic, kept free of TensorFlow so bad shapes are refused instantly."""
from __future__ import annotations

from dataclasses import dataclass, replace

from common.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """The tutorial's network: blocks of Conv3D -> MaxPool3D(2) -> BatchNorm, then a dense head."""

    block_filters: tuple[int, ...] = (64, 64, 128, 256)
    kernel_size: int = 3
    pool_size: int = 2
    dense_units: int = 512
    dropout_rate: float = 0.3


TUTORIAL = Architecture()
# The lesion map (`fit` with lesion masks, `train.network.model`) reads the first block's features:
# cells of 2 x 2 x 2 voxels. benchmarks/probe_lesion_supervision.py measured it against the second
# block's 4 x 4 x 4 on 0.1-1% lesions (docs/benchmarks.md, "Learning where the lesion is").
LESION_BLOCK = 1
LESION_CONTEXT_FILTERS = 32  # one 3 x 3 x 3 convolution between those features and the map, times --width
# --width: a multiplier on every layer's width. The range keeps at least 8 filters in the first
# block at the low end; at the high end the network has 24 million weights (width 1: 1.5 million)
# and a step about 16 times the operations.
MIN_WIDTH, MAX_WIDTH = 0.125, 4.0


def scaled(width: float, architecture: Architecture = TUTORIAL) -> Architecture:
    """`architecture` with every block's filters and the dense units times `width` (at least 1 each).

    Every convolution but the first (one input channel) does about width² as many operations; on
    a CPU half the width measured a third of the step (docs/performance.md). Width 1 is the
    tutorial's network exactly.
    """
    if width == 1:
        return architecture
    return replace(architecture, block_filters=tuple(max(1, round(f * width)) for f in architecture.block_filters),
                   dense_units=max(1, round(architecture.dense_units * width)))


def feature_map_sizes(size: int, padding: str, architecture: Architecture = TUTORIAL) -> list[int]:
    """The length of one input axis after each block (valid convolutions trim kernel_size - 1)."""
    sizes = []
    for _ in architecture.block_filters:
        if padding == "valid":
            size -= architecture.kernel_size - 1
        size = size // architecture.pool_size if size > 0 else size
        sizes.append(size)
    return sizes


def lesion_cell_grid(shape: tuple[int, int, int], padding: str, architecture: Architecture = TUTORIAL,
                     block: int = LESION_BLOCK) -> tuple[int, int, tuple[int, int, int]]:
    """Where the lesion map's cells lie in the input: (offset, cell, counts). Cell (i, j, k) of the map
    read from block `block` stands for the input voxels [offset + cell * i, offset + cell * (i + 1)) along
    each axis, and the map has `counts` cells. A valid convolution centres its output one voxel (times
    the stride so far) into its input; a same one does not."""
    cell = architecture.pool_size ** block
    offset = 0
    if padding == "valid":
        offset = sum((architecture.kernel_size - 1) // 2 * architecture.pool_size ** index for index in range(block))
    counts = tuple(feature_map_sizes(size, padding, architecture)[block - 1] for size in shape)
    return offset, cell, counts


def minimum_axis_size(padding: str, architecture: Architecture = TUTORIAL) -> int:
    """The smallest axis length that still leaves one voxel after the last block (46 for valid)."""
    size = 1
    while min(feature_map_sizes(size, padding, architecture)) < 1:
        size += 1
    return size


def check_input_shape(shape: tuple[int, int, int], padding: str, architecture: Architecture = TUTORIAL) -> None:
    """Refuse a volume shape the network cannot shrink through all its blocks, naming a fix."""
    smallest = minimum_axis_size(padding, architecture)
    if min(shape) >= smallest:
        return
    message = (f"the cache's volumes are {'x'.join(map(str, shape))}, but with --padding {padding} "
               f"every axis needs at least {smallest} voxels")
    if padding == "valid" and min(shape) >= minimum_axis_size("same", architecture):
        message += "; use --padding same for this cache"
    else:
        message += "; build a cache with a larger --shape"
    raise UserError(message)


def forward_flops(input_shape: tuple[int, int, int], padding: str, architecture: Architecture = TUTORIAL,
                  pooling: str = "avg") -> dict[str, int]:
    """Floating-point operations of one scan's forward pass, per layer (a multiply-add counts 2).

    The convolutions and dense layers only: pooling, BatchNorm, ReLU and dropout are a few
    operations per value, well under 1% of the total here. A convolution producing V voxels of
    C_out channels from C_in costs 2 V k^3 C_in C_out.
    """
    trim = architecture.kernel_size - 1 if padding == "valid" else 0
    # each block's input length per axis: the volume's, then each earlier block's output
    block_inputs = zip(*([size, *feature_map_sizes(size, padding, architecture)[:-1]] for size in input_shape))
    flops = {}
    channels = 1
    for index, (filters, sizes) in enumerate(zip(architecture.block_filters, block_inputs), start=1):
        voxels = (sizes[0] - trim) * (sizes[1] - trim) * (sizes[2] - trim)
        flops[f"conv{index}"] = 2 * voxels * architecture.kernel_size**3 * channels * filters
        channels = filters
    features = channels * (2 if pooling == "avgmax" else 1)
    flops["dense"] = 2 * features * architecture.dense_units
    flops["output"] = 2 * architecture.dense_units
    return flops


def training_step_flops(input_shape: tuple[int, int, int], padding: str, batch_size: int,
                        architecture: Architecture = TUTORIAL, pooling: str = "avg") -> int:
    """Floating-point operations of one training step: for each scan, the forward pass, the gradient
    of every layer's weights (as many as its forward pass), and the gradient of every layer's input
    but the first's (the volume needs none): 3x the forward pass, less the first convolution once."""
    per_layer = forward_flops(input_shape, padding, architecture, pooling)
    return batch_size * (3 * sum(per_layer.values()) - per_layer["conv1"])
