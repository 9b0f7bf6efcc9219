"""A loss that weighs every lesion equally, whatever its size: per-lesion ("blob") Dice.

Why: Dice and cross-entropy over a batch count voxels, so a 7 mm nodule (16
voxels at 2.2 x 2.2 x 2.5 mm) next to a 25 mm one (700 voxels) moves the loss by
about 2 %; the nodule branch learned to leave such nodules out. Blob loss
(Kofler et al., "blob loss: instance imbalance aware loss functions for semantic
segmentation", IPMI 2023) scores each reference lesion on its own: the Dice of
the prediction against that lesion, with the other lesions' voxels masked out, so
predicting them neither helps nor costs. False positives away from every lesion
still cost, in the Dice of each lesion of the patch.

What: :class:`LesionDiceLoss` - mean over the batch's lesions (26-connected
regions of a binary target) of ``1 - Dice``; patches without a lesion do not
contribute, and a batch without any lesion gives 0 (with a gradient of zero).
"""

from __future__ import annotations

import torch

__all__ = ["LesionDiceLoss"]


class LesionDiceLoss(torch.nn.Module):
    """Mean per-lesion soft Dice loss of sigmoid logits ``(B, 1, ...)`` against a binary target of the same shape.

    ``smooth`` keeps the Dice of an empty prediction of a tiny lesion finite. The
    lesions are found in the target on the CPU (``scipy.ndimage.label``); targets
    are the few label patches of one optimiser step, so this is cheap.
    """

    def __init__(self, smooth: float = 1e-3) -> None:
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from workers.models.postprocessing import component_sizes

        if logits.shape != target.shape or logits.ndim < 3 or logits.shape[1] != 1:
            raise ValueError(f"logits and target must both be (batch, 1, ...) of one shape, got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        probability = torch.sigmoid(logits.float())
        terms = []
        for b in range(target.shape[0]):
            lesion_mask = target[b, 0] > 0.5
            if not bool(lesion_mask.any()):
                continue
            regions, sizes = component_sizes(lesion_mask.cpu().numpy())
            regions_t = torch.from_numpy(regions).to(target.device)
            p = probability[b, 0]
            p_outside = (p * ~lesion_mask).sum()  # predicted outside every lesion: a false positive for each
            for number in range(1, len(sizes)):
                lesion = regions_t == number
                hit = (p * lesion).sum()
                dice = (2.0 * hit + self.smooth) / (p_outside + hit + float(sizes[number]) + self.smooth)
                terms.append(1.0 - dice)
        if not terms:
            return logits.sum() * 0.0
        return torch.stack(terms).mean()
