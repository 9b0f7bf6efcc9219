"""Small 3-D classification networks the node serves (and the trainer imports, never the reverse).

Why here: a bundle's ``network_def`` names its class by import path; serving must not
import the ``training`` package, so the network definitions live beside the loaders.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallClassifier3D"]


class SmallClassifier3D(nn.Module):
    """Conv blocks (conv-InstanceNorm-ReLU, max-pool by 2) -> global max pooling -> linear logits.

    ``channels``: output channels of each block (the spatial size halves after every block
    but the last). The last block's convolution (``features[-1].conv``) is the layer Grad-CAM
    reads (:func:`workers.models.classification.last_conv_layer` finds it).

    Why these choices (the demo nodule classifier stayed at chance without them):
    InstanceNorm rather than BatchNorm, because with batches of a few whole volumes
    BatchNorm's running statistics (used at evaluation) do not match the batch statistics
    it trained with; global **max** pooling only, because a small focal finding (one nodule
    in a chest) is diluted by an average over the whole field of view, while the maximum
    lets the strongest local response decide the class.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, channels: tuple[int, ...] = (8, 16, 32, 48),
                 dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2 or not channels:
            raise ValueError(f"SmallClassifier3D needs num_classes >= 2 and some channels, got {num_classes}, "
                             f"{channels}")
        blocks: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            block = nn.Sequential()
            block.add_module("conv", nn.Conv3d(previous, width, kernel_size=3, padding=1, bias=False))
            block.add_module("norm", nn.InstanceNorm3d(width, affine=True))
            block.add_module("act", nn.ReLU(inplace=False))
            if i < len(channels) - 1:
                block.add_module("pool", nn.MaxPool3d(2))
            blocks.append(block)
            previous = width
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z)`` -> ``(B, num_classes)`` logits."""
        pooled = self.features(x).amax(dim=(2, 3, 4))
        return self.head(self.dropout(pooled))
