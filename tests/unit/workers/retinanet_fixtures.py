"""A stand-in for a RetinaNet network whose one detection is known: it fires where the image is bright.

Why: with random weights a RetinaNet's boxes say nothing about geometry. This
module has RetinaNet's interface (the attributes ``RetinaNetDetector`` reads and a
forward that returns per-level classification and box-regression maps) but plants
its response: the level-0 anchor nearest the intensity-weighted centre of the
image's bright voxels gets a high score, and its box regression decodes (MONAI's
``BoxCoder``) to a box of ``box_size_voxels`` centred exactly on that centre. So
the detection a loader reports must lie where the bright object was planted in
patient space, with the planted size times the preprocessed voxel spacing,
whatever the series' orientation. Built from a bundle config
(``network_def: {"_target_": "tests.unit.workers.retinanet_fixtures.PlantedResponse",
"anchor_generator": "@anchor_generator", ...}``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Logits of the planted anchor and of every other one.
FIRE_LOGIT = 10.0
QUIET_LOGIT = -20.0


class PlantedResponse(nn.Module):
    """RetinaNet's interface with one planted detection centred on the bright part of the image (values > 0.5)."""

    def __init__(
        self,
        anchor_generator: nn.Module,
        box_size_voxels: Sequence[float],
        num_classes: int = 1,
        num_anchors: int = 3,
        size_divisible: Sequence[int] = (16, 16, 8),
        strides: Sequence[Sequence[int]] = ((4, 4, 2), (8, 8, 4), (16, 16, 8)),
    ) -> None:
        super().__init__()
        self.spatial_dims = 3
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.size_divisible = tuple(size_divisible)
        self.cls_key = "classification"
        self.box_reg_key = "box_regression"
        self.anchor_generator = anchor_generator
        self.box_size = torch.tensor([float(v) for v in box_size_voxels])
        self.strides = [tuple(int(v) for v in s) for s in strides]
        self.unused = nn.Parameter(torch.zeros(1))  # a state dict and a device, like a real network

    def bright_centre(self, image: torch.Tensor) -> torch.Tensor:
        """Intensity-weighted centre (voxel x, y, z) of the values above 0.5 in ``image`` ``(1, X, Y, Z)``."""
        weights = torch.where(image[0] > 0.5, image[0], torch.zeros_like(image[0])).double()
        grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in weights.shape), indexing="ij")
        total = weights.sum()
        if total <= 0:
            raise ValueError("planted response: the image has no value above 0.5")
        return torch.stack([(g * weights).sum() / total for g in grids])

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        from monai.apps.detection.utils.box_coder import BoxCoder

        batch, size = images.shape[0], images.shape[2:]
        classification, regression = [], []
        for stride in self.strides:
            shape = [n // s for n, s in zip(size, stride)]
            classification.append(torch.full((batch, self.num_anchors * self.num_classes, *shape), QUIET_LOGIT))
            regression.append(torch.zeros((batch, self.num_anchors * 6, *shape)))
        anchors = self.anchor_generator(images, classification)
        level0 = int(torch.tensor(classification[0].shape[2:]).prod()) * self.num_anchors
        coder = BoxCoder(weights=(1.0,) * 6)
        for b in range(batch):
            if not bool((images[b] > 0.5).any()):
                continue  # nothing bright (a sliding window's patch beside the object): nothing fires
            centre = self.bright_centre(images[b].float().cpu())
            target = torch.cat([centre - self.box_size / 2, centre + self.box_size / 2])[None].float()
            candidates = anchors[b][:level0].cpu()
            distance = ((candidates[:, :3] + candidates[:, 3:]) / 2 - centre.float()).norm(dim=1)
            index = int(distance.argmin())
            location, anchor = divmod(index, self.num_anchors)
            _, y_size, z_size = classification[0].shape[2:]
            x, rest = divmod(location, y_size * z_size)
            y, z = divmod(rest, z_size)
            classification[0][b, anchor * self.num_classes, x, y, z] = FIRE_LOGIT
            deltas = coder.encode_single(target, candidates[index][None])[0]
            regression[0][b, anchor * 6:(anchor + 1) * 6, x, y, z] = deltas
        device = self.unused.device
        return {self.cls_key: [c.to(device) for c in classification],
                self.box_reg_key: [r.to(device) for r in regression]}
