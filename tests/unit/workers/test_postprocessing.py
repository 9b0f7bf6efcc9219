"""The bundle postprocessing's nodule size filter: specks go to the next-ranked label, lesions stay."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Activationsd, AsDiscreted, Compose

from workers.models.postprocessing import DropSmallComponentsd, drop_small_components


def _probabilities() -> torch.Tensor:
    """(3, 8, 8, 8): channel 1 everywhere at 0.6, channel 2 wins a 2-voxel speck and a 27-voxel cube."""
    p = torch.zeros(3, 8, 8, 8)
    p[1] = 0.6
    p[0] = 0.4
    for region in ((0, slice(0, 2), 0), (slice(4, 7), slice(4, 7), slice(4, 7))):
        p[(2, *region)] = 0.9
    return p


def test_a_speck_smaller_than_the_minimum_goes_to_the_next_label_and_a_lesion_stays() -> None:
    p = _probabilities()
    cleared = drop_small_components(p, channel=2, min_voxels=3)
    labels = cleared.argmax(0)
    assert int((labels == 2).sum()) == 27
    assert labels[0, 0, 0] == labels[0, 1, 0] == 1  # the speck, now the next-ranked label
    assert int((p.argmax(0) == 2).sum()) == 29  # the input is not changed
    assert torch.equal(drop_small_components(p, channel=2, min_voxels=1), p)
    assert int((drop_small_components(p, channel=2, min_voxels=28).argmax(0) == 2).sum()) == 0


def test_the_filter_keeps_the_metadata_inside_a_bundle_chain_and_names_bad_input() -> None:
    logits = MetaTensor(torch.log(_probabilities() + 1e-6), affine=torch.diag(torch.tensor([2.0, 2.0, 2.5, 1.0])))
    chain = Compose([Activationsd("pred", softmax=True), DropSmallComponentsd("pred", channel=2, min_voxels=3),
                     AsDiscreted("pred", argmax=True)])
    pred = chain({"pred": logits})["pred"]
    assert isinstance(pred, MetaTensor) and float(pred.affine[2, 2]) == 2.5
    assert int((pred == 2).sum()) == 27
    with pytest.raises(ValueError, match="channel 5 is not one of the 3 channels"):
        drop_small_components(_probabilities(), channel=5, min_voxels=3)
    with pytest.raises(ValueError, match=r"must be \(channels, x, y, z\), got shape \(8, 8, 8\)"):
        drop_small_components(torch.zeros(8, 8, 8), channel=0, min_voxels=3)
