"""Networks of the shipped segmentation model that MONAI does not have as one class.

Why: a multi-class softmax network trained with Dice+CE on whole-chest patches
learns the large anatomy but not the nodule class: nodules are ~1e-4 of the
voxels, so the nodule logit is pushed down everywhere early and its Dice
gradient never recovers in a CPU-sized training run. A second, binary branch
trained on nodule-rich patches (with its own Dice+BCE) learns them in minutes.
:class:`AnatomyWithNoduleBranch` joins the two into one network with the
ordinary multi-class output, so the bundle's softmax/argmax postprocessing,
the sliding-window inferer, TorchScript export and the node's bundle loader
all stay as they are.

How the two are joined: with anatomy logits ``a`` (one channel per label value,
the nodule channel unused) and the branch's nodule logit ``n``, the nodule
channel becomes ``logsumexp(a_others) + n``. Its softmax is then exactly
``sigmoid(n)``, and every other label ``k`` gets ``(1 - sigmoid(n)) *
softmax(a_others)_k``: P(label) = P(not nodule) x P(label | not nodule).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["AnatomyWithNoduleBranch", "nodule_branch_def"]


def nodule_branch_def(*, channels: tuple[int, ...] = (16, 32, 64, 128)) -> dict[str, Any]:
    """MONAI config of the binary nodule branch: a residual 3D UNet with one output logit.

    Three stride-2 levels: patches and sliding windows must be multiples of 8, as
    for the anatomy network.
    """
    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(channels),
        "strides": [2] * (len(channels) - 1),
        "num_res_units": 1,
    }


class AnatomyWithNoduleBranch(torch.nn.Module):
    """An anatomy network whose nodule channel is replaced by a binary nodule branch.

    ``anatomy`` maps ``(B, 1, X, Y, Z)`` to ``(B, C, X, Y, Z)`` logits, one per
    label value; ``nodule`` maps the same input to ``(B, 1, X, Y, Z)`` nodule
    logits; ``nodule_channel`` is the nodule's label value. ``nodule_threshold``: the
    branch probability at which a voxel becomes nodule (its softmax reaches 0.5),
    chosen on validation data by the trainer. The output has the anatomy network's
    shape, for softmax/argmax postprocessing.
    """

    def __init__(
        self, anatomy: torch.nn.Module, nodule: torch.nn.Module, nodule_channel: int, nodule_threshold: float = 0.5
    ) -> None:
        super().__init__()
        if nodule_channel < 1:
            raise ValueError(f"nodule_channel must be a foreground label value (>= 1), got {nodule_channel}")
        if not 0.0 < nodule_threshold < 1.0:
            raise ValueError(f"nodule_threshold must be a probability in (0, 1), got {nodule_threshold}")
        self.anatomy = anatomy
        self.nodule = nodule
        self.nodule_channel = int(nodule_channel)
        # Shifts the branch's logit so that its probability `nodule_threshold` becomes 0.5 at the softmax.
        self.nodule_offset = float(-math.log(nodule_threshold / (1.0 - nodule_threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.anatomy(x)
        k = self.nodule_channel
        if logits.shape[1] <= k:
            raise ValueError(f"anatomy network gives {logits.shape[1]} channels, nodule channel {k} is missing")
        others = torch.cat([logits[:, :k], logits[:, k + 1:]], dim=1)
        nodule = torch.logsumexp(others, dim=1, keepdim=True) + self.nodule(x) + self.nodule_offset
        return torch.cat([logits[:, :k], nodule, logits[:, k + 1:]], dim=1)
