"""CenterNet training targets and loss of the detector.

Why: the detector (:class:`~workers.models.detection_network.CenterNetDetector`)
predicts, per output voxel, a heatmap logit, a log box size and a centre offset;
training compares them with Gaussian heatmaps around each nodule's centre and the
sizes and offsets at the centre voxels (penalty-reduced focal loss + L1, as in
CenterNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from workers.models.detection_network import HEATMAP_CHANNEL

__all__ = ["Heads", "centernet_loss", "centernet_targets"]


@dataclass
class Heads:
    """Training targets on the output grid (numpy, spatial axes x, y, z)."""

    heatmap: npt.NDArray[np.float32]  # (X, Y, Z) in [0, 1], exactly 1 at centre voxels
    size: npt.NDArray[np.float32]  # (3, X, Y, Z) log size mm at centre voxels
    offset: npt.NDArray[np.float32]  # (3, X, Y, Z) centre - centre voxel (output voxels)
    mask: npt.NDArray[np.float32]  # (X, Y, Z) 1 at centre voxels


def centernet_targets(
    output_shape: Sequence[int],
    centres_vox: npt.ArrayLike,
    sizes_mm: npt.ArrayLike,
    spacing_mm: Sequence[float],
    *,
    output_stride: int = 2,
    sigma_scale: float = 0.5,
    min_sigma: float = 0.8,
) -> Heads:
    """Heatmap, size and offset targets of objects on an output grid.

    ``centres_vox`` (N, 3) are continuous indices of the *input* grid (x, y, z), which
    may lie outside it (then only the Gaussian's tail is drawn); ``sizes_mm`` (N, 3)
    are box sizes in mm; ``spacing_mm`` the input grid's spacing. Each object's
    centre voxel is ``round(centre / output_stride)``; its Gaussian has, per axis,
    ``sigma = max(min_sigma, sigma_scale * size / 2 / (spacing * stride))`` output voxels.
    """
    shape = tuple(int(s) for s in output_shape)
    heat = np.zeros(shape, dtype=np.float32)
    size = np.zeros((3, *shape), dtype=np.float32)
    offset = np.zeros((3, *shape), dtype=np.float32)
    mask = np.zeros(shape, dtype=np.float32)
    centres = np.asarray(centres_vox, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(sizes_mm, dtype=np.float64).reshape(-1, 3)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    for centre, extent in zip(centres, sizes):
        c_out = centre / output_stride
        peak = np.floor(c_out + 0.5).astype(np.int64)
        sigma = np.maximum(min_sigma, sigma_scale * (extent / 2.0) / (spacing * output_stride))
        reach = np.ceil(3.0 * sigma).astype(np.int64)
        lo = np.maximum(peak - reach, 0)
        hi = np.minimum(peak + reach + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [
            np.exp(-0.5 * ((np.arange(lo[a], hi[a]) - peak[a]) / sigma[a]) ** 2).astype(np.float32) for a in range(3)
        ]
        gauss = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        np.maximum(heat[window], gauss, out=heat[window])
        if np.all(peak >= 0) and np.all(peak < shape):
            p = (int(peak[0]), int(peak[1]), int(peak[2]))
            mask[p] = 1.0
            heat[p] = 1.0
            offset[(slice(None), *p)] = (c_out - peak).astype(np.float32)
            size[(slice(None), *p)] = np.log(np.maximum(extent, 1e-3)).astype(np.float32)
    return Heads(heatmap=heat, size=size, offset=offset, mask=mask)


def centernet_loss(
    output: torch.Tensor,
    heatmap: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    *,
    size_weight: float = 1.0,
    offset_weight: float = 1.0,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> dict[str, torch.Tensor]:
    """CenterNet loss of a batch: penalty-reduced focal loss + L1 on size and offset at centres.

    ``output`` (B, 7, X, Y, Z) as from :class:`~workers.models.detection_network.CenterNetDetector`; ``heatmap`` and
    ``mask`` (B, X, Y, Z); ``size``, ``offset`` (B, 3, X, Y, Z). Sums are normalised by
    the number of centre voxels in the batch (at least 1). Computed in float32.
    """
    output = output.float()
    logits = output[:, HEATMAP_CHANNEL]
    pos = mask
    n_pos = pos.sum().clamp(min=1.0)
    prob = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    pos_term = torch.pow(1.0 - prob, alpha) * log_p * pos
    neg_term = torch.pow(1.0 - heatmap, beta) * torch.pow(prob, alpha) * log_not_p * (1.0 - pos)
    heat_loss = -(pos_term.sum() + neg_term.sum()) / n_pos
    m = pos.unsqueeze(1)
    size_loss = (torch.abs(output[:, 1:4] - size) * m).sum() / n_pos
    offset_loss = (torch.abs(output[:, 4:7] - offset) * m).sum() / n_pos
    total = heat_loss + size_weight * size_loss + offset_weight * offset_loss
    return {"loss": total, "heatmap": heat_loss, "size": size_loss, "offset": offset_loss}
