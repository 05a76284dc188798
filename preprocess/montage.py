"""`show`: a PNG montage of one cached scan's slices, like the tutorial's `plot_slices`."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def radiological_view(axial_slice: np.ndarray) -> np.ndarray:
    """An axial RAS slice [x, y] as an image: anterior up, the patient's right on the left."""
    # x grows to the patient's right and y to the front; images grow right and down
    return axial_slice.T[::-1, ::-1]


def save_montage(volume: np.ndarray, path: Path, title: str, columns: int = 8, rows: int | None = None,
                 overlay: np.ndarray | None = None, box: tuple[int, ...] | None = None) -> Path:
    """Write axial slices of an (H, W, D) volume in RAS order as a grid, optionally with a heat map.

    Slices are shown the radiological way (patient's right on the image's left, anterior up).
    `box` (x0, x1, y0, y1, z0, z1 in the volume's voxels) is outlined in yellow on the slices it
    holds; a slice outside it is titled "outside the box".
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    depth = volume.shape[2]
    rows = rows or max(1, int(np.ceil(min(depth, 64) / columns)))
    picks = np.linspace(0, depth - 1, min(depth, rows * columns)).round().astype(int)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.6 + 0.5), squeeze=False)
    for axis, index in zip(axes.flat, picks):
        axis.imshow(radiological_view(volume[:, :, index]), cmap="gray", vmin=0.0, vmax=1.0)
        if overlay is not None:
            axis.imshow(radiological_view(overlay[:, :, index]), cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
        caption = f"z={index}"
        if box is not None:
            x0, x1, y0, y1, z0, z1 = box
            if z0 <= index < z1:
                width, height = volume.shape[0], volume.shape[1]  # the view flips both axes
                axis.add_patch(Rectangle((width - x1 - 0.5, height - y1 - 0.5), x1 - x0, y1 - y0, fill=False,
                                         edgecolor="yellow", linewidth=1))
            else:
                caption += ", outside the box"
        axis.set_title(caption, fontsize=7)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
