"""The picture of an evaluation's lesions by size: a crop of the CT around each, reference and prediction drawn.

Why: the lesion-wise figures (:func:`training.metrics.lesion_summary`) say which
lesion sizes a model misses; the picture shows a person why - for example a 4 mm
nodule on a 2.2 mm grid is two bright voxels among vessel cross-sections that look
the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LesionCrop", "lesion_crop", "plot_lesion_gallery"]


@dataclass(frozen=True)
class LesionCrop:
    """An axial square around one lesion, RAS (x, y): CT in HU, reference and predicted masks, a caption."""

    caption: str
    ct: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray


def lesion_crop(
    ct: np.ndarray, reference: np.ndarray, prediction: np.ndarray, centre_voxel: Sequence[int],
    caption: str, half_width: int = 16,
) -> LesionCrop:
    """The axial slice through ``centre_voxel`` of RAS (x, y, z) volumes, cut to ``2 * half_width`` voxels square.

    Parts of the square outside the volume are filled with -1024 HU and no mask.
    """
    if not (ct.shape == reference.shape == prediction.shape and ct.ndim == 3):
        raise ValueError(f"ct, reference and prediction must be one (x, y, z) shape, got "
                         f"{ct.shape}, {reference.shape}, {prediction.shape}")
    x, y, z = (int(v) for v in centre_voxel)
    if not 0 <= z < ct.shape[2]:
        raise ValueError(f"centre_voxel {tuple(centre_voxel)} is outside the volume of shape {ct.shape}")
    side = 2 * half_width
    out = [np.full((side, side), -1024.0, dtype=np.float32), np.zeros((side, side), bool), np.zeros((side, side), bool)]
    x0, y0 = x - half_width, y - half_width
    xs, ys = slice(max(x0, 0), min(x0 + side, ct.shape[0])), slice(max(y0, 0), min(y0 + side, ct.shape[1]))
    for target, volume in zip(out, (ct, reference, prediction)):
        target[xs.start - x0 : xs.stop - x0, ys.start - y0 : ys.stop - y0] = volume[xs, ys, z]
    return LesionCrop(caption, *out)


def plot_lesion_gallery(
    rows: Sequence[tuple[str, Sequence[LesionCrop]]], path: Path, *, window: tuple[float, float] = (-600.0, 1500.0),
    color_rgb: Sequence[int] = (255, 230, 0),
) -> None:
    """One row per (title, crops): the CT in a lung window, the prediction filled, the reference outlined."""
    from training.segmentation import _blank_grid, _display, _draw_ct, _label_rgba, _PlotLabel, _plt, _save_figure

    plt = _plt()
    rows = [(title, crops) for title, crops in rows if crops]
    if not rows:
        return
    columns = max(len(crops) for _, crops in rows)
    fill = [_PlotLabel(1, "prediction", color_rgb)]
    fig, axes = _blank_grid(plt, len(rows), columns, (2.4, 2.6))
    for r, (title, crops) in enumerate(rows):
        for c, crop in enumerate(crops):
            ax = axes[r][c]
            _draw_ct(ax, crop.ct, window)
            ax.imshow(_display(_label_rgba(crop.prediction.astype(np.uint8), fill)), interpolation="nearest")
            if crop.reference.any():
                ax.contour(_display(crop.reference.astype(np.float32)), levels=[0.5], colors=["red"],
                           linewidths=1.0)
            ax.set_title(f"{title}\n{crop.caption}" if c == 0 else crop.caption, fontsize=7)
    fig.suptitle("fill: prediction, red line: reference", fontsize=8)
    fig.tight_layout()
    _save_figure(plt, fig, path)
