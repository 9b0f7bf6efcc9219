"""Small 3-D classification networks the node serves (and the trainer imports, never the reverse).

Why here: a bundle's ``network_def`` names its class by import path; serving must not
import the ``training`` package, so the network definitions live beside the loaders.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallClassifier3D"]


class SmallClassifier3D(nn.Module):
    """Conv blocks (conv-BatchNorm-ReLU, max-pool by 2) -> global average and max pooling -> linear logits.

    ``channels``: output channels of each block (the spatial size halves after every block
    but the last). The last block's convolution (``features[-1].conv``) is the layer Grad-CAM
    reads (:func:`workers.models.classification.last_conv_layer` finds it). Global max pooling
    beside the average lets a small focal finding (a nodule) decide the class without being
    averaged away over the whole field of view.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, channels: tuple[int, ...] = (8, 16, 32, 48),
                 dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2 or not channels:
            raise ValueError(f"SmallClassifier3D needs num_classes >= 2 and some channels, got {num_classes}, "
                             f"{channels}")
        blocks: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            block = nn.Sequential()
            block.add_module("conv", nn.Conv3d(previous, width, kernel_size=3, padding=1, bias=False))
            block.add_module("norm", nn.BatchNorm3d(width))
            block.add_module("act", nn.ReLU(inplace=False))
            if i < len(channels) - 1:
                block.add_module("pool", nn.MaxPool3d(2))
            blocks.append(block)
            previous = width
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z)`` -> ``(B, num_classes)`` logits."""
        features = self.features(x)
        pooled = torch.cat([features.mean(dim=(2, 3, 4)), features.amax(dim=(2, 3, 4))], dim=1)
        return self.head(self.dropout(pooled))
