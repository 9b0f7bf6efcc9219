"""Per-lesion Dice loss: every lesion weighs the same, whatever its size; false positives still cost."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from training.losses import LesionDiceLoss

BIG = (slice(2, 12), slice(2, 12), slice(2, 12))  # 1000 voxels
SMALL = (slice(20, 22), slice(20, 22), slice(20, 22))  # 8 voxels


def _target() -> torch.Tensor:
    target = torch.zeros(1, 1, 24, 24, 24)
    target[(0, 0, *BIG)] = 1
    target[(0, 0, *SMALL)] = 1
    return target


def _logits(*regions: tuple[slice, ...]) -> torch.Tensor:
    """Confident logits: +20 inside ``regions``, -20 elsewhere."""
    logits = torch.full((1, 1, 24, 24, 24), -20.0)
    for region in regions:
        logits[(0, 0, *region)] = 20.0
    return logits


def test_missing_the_small_lesion_costs_half_not_a_few_percent() -> None:
    target, loss = _target(), LesionDiceLoss()
    assert float(loss(_logits(BIG, SMALL), target)) == pytest.approx(0.0, abs=1e-6)
    missed_small = float(loss(_logits(BIG), target))
    assert missed_small == pytest.approx(0.5, abs=1e-3)  # one of two lesions scores 0
    # Voxel Dice over the batch barely notices: 8 of 1008 voxels.
    assert float(DiceLoss(sigmoid=True, batch=True)(_logits(BIG), target)) < 0.01
    # Missing the big lesion costs the same as missing the small one.
    assert float(loss(_logits(SMALL), target)) == pytest.approx(missed_small, abs=1e-3)


def test_false_positives_cost_and_the_other_lesion_is_not_one() -> None:
    target, loss = _target(), LesionDiceLoss()
    stray = (slice(14, 18), slice(0, 4), slice(0, 4))  # 64 voxels away from both lesions
    with_stray = float(loss(_logits(BIG, SMALL, stray), target))
    # The small lesion's Dice: 2*8 / (8 + 64 + 8); the big one's: 2000 / (1000 + 64 + 1000).
    assert with_stray == pytest.approx(1 - (16 / 80 + 2000 / 2064) / 2, abs=1e-3)


def test_batches_without_lesions_and_gradients() -> None:
    loss = LesionDiceLoss()
    empty = loss(_logits(BIG).requires_grad_(), torch.zeros(1, 1, 24, 24, 24))
    assert float(empty.detach()) == 0.0
    logits = torch.zeros(2, 1, 24, 24, 24, requires_grad=True)
    target = torch.cat([_target(), torch.zeros(1, 1, 24, 24, 24)])
    loss(logits, target).backward()
    assert logits.grad is not None
    assert float(logits.grad[0, 0][SMALL].mean()) < 0  # raising the small lesion's logits lowers the loss
    assert float(logits.grad[0, 0][BIG].mean()) < 0
    assert float(logits.grad[1].abs().sum()) == 0.0  # a patch without lesions gives no gradient of its own


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"got \(1, 2, 4, 4, 4\) and \(1, 1, 4, 4, 4\)"):
        LesionDiceLoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="smooth must be > 0, got 0"):
        LesionDiceLoss(smooth=0)
