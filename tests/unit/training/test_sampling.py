"""Patch centres that give every nodule, whatever its size, the same chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import ClassesToIndicesd, RandCropByLabelClassesd

from training.sampling import BalanceComponentIndicesd, component_balanced_indices


def _two_nodules() -> np.ndarray:
    """A 1x20x20x20 label: a 125-voxel cube of 5 and a single voxel of 5 far from it, 2 elsewhere."""
    label = np.full((1, 20, 20, 20), 2, dtype=np.uint8)
    label[0, 2:7, 2:7, 2:7] = 5
    label[0, 16, 16, 16] = 5
    return label


def test_each_component_gets_the_same_number_of_indices_and_only_its_own_voxels() -> None:
    mask = _two_nodules()[0] == 5
    indices = component_balanced_indices(mask, per_component=40)
    assert indices.shape == (80,)
    assert mask.ravel()[indices].all()
    single = np.ravel_multi_index((16, 16, 16), mask.shape)
    assert (indices == single).sum() == 40
    cube = indices[indices != single]
    assert len(np.unique(cube)) == 40  # evenly spread over the 125 voxels, none repeated


def test_diagonal_neighbours_are_one_component_and_an_empty_mask_gives_nothing() -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    assert component_balanced_indices(mask, per_component=3).shape == (3,)
    assert component_balanced_indices(np.zeros((4, 4, 4), dtype=bool), per_component=3).shape == (0,)
    with pytest.raises(ValueError, match="per_component must be >= 1, got 0"):
        component_balanced_indices(mask, per_component=0)


def test_crops_centre_on_the_small_nodule_as_often_as_on_the_large_one() -> None:
    # The image holds each voxel's flat index, so a 1x1x1 crop says where it was taken.
    data = {"image": torch.arange(8000, dtype=torch.float32).reshape(1, 20, 20, 20),
            "label": torch.from_numpy(_two_nodules())}
    data = ClassesToIndicesd("label", num_classes=6)(data)
    before = data["label_cls_indices"][2]
    data = BalanceComponentIndicesd("label", "label_cls_indices", label_value=5, per_component=50)(data)
    assert data["label_cls_indices"][2] is before  # other classes untouched
    crop = RandCropByLabelClassesd(["image", "label"], "label", spatial_size=[1, 1, 1],
                                   ratios=[0, 0, 0, 0, 0, 1], num_classes=6, num_samples=400,
                                   indices_key="label_cls_indices", warn=False)
    crop.set_random_state(seed=0)
    single = int(np.ravel_multi_index((16, 16, 16), (20, 20, 20)))
    on_single = sum(int(out["image"].item()) == single for out in crop(data))
    # Voxel-uniform sampling would pick the single voxel 1 time in 126; per component, half the time.
    assert 150 <= on_single <= 250


def test_the_transform_names_a_missing_class_and_a_wrong_label_shape() -> None:
    data = ClassesToIndicesd("label", num_classes=3)({"label": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="label value 5 has no entry in 'label_cls_indices' \\(3 classes\\)"):
        BalanceComponentIndicesd("label", "label_cls_indices", label_value=5)(data)
    data["label"] = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match="one channel-first 3D label, got shape \\(2, 4, 4, 4\\)"):
        BalanceComponentIndicesd("label", "label_cls_indices", label_value=1)(data)


def test_offset_moves_each_index_at_most_that_far_from_its_component_and_inside_the_volume() -> None:
    mask = _two_nodules()[0] == 5
    plain = component_balanced_indices(mask, per_component=400)
    moved = component_balanced_indices(mask, per_component=400, offset=(3, 2, 0), seed=7)
    assert moved.shape == plain.shape
    steps = np.stack(np.unravel_index(moved, mask.shape)) - np.stack(np.unravel_index(plain, mask.shape))
    assert np.abs(steps[0]).max() == 3 and np.abs(steps[1]).max() == 2 and not steps[2].any()
    assert set(np.unique(steps[0])) == {-3, -2, -1, 0, 1, 2, 3}  # every offset in the range is drawn
    single = plain == np.ravel_multi_index((16, 16, 16), mask.shape)
    assert (~mask.ravel()[moved[single]]).mean() > 0.5  # most centres drawn for the 1-voxel nodule are off it
    edge = np.zeros((6, 6, 6), dtype=bool)
    edge[0, 0, 0] = True
    corner = np.stack(np.unravel_index(component_balanced_indices(edge, 50, offset=(4, 4, 4)), edge.shape))
    assert corner.min() == 0 and corner.max() <= 4  # clipped into the volume
    again = component_balanced_indices(mask, per_component=400, offset=(3, 2, 0), seed=7)
    assert np.array_equal(moved, again)
    assert not np.array_equal(moved, component_balanced_indices(mask, per_component=400, offset=(3, 2, 0), seed=8))
    with pytest.raises(ValueError, match=r"offset must be 3 voxel counts >= 0, got \(1, -1, 0\)"):
        component_balanced_indices(mask, per_component=4, offset=(1, -1, 0))


def test_with_an_offset_a_one_voxel_nodule_lies_anywhere_in_its_patches_not_only_at_the_centre() -> None:
    # A patch of 9^3 voxels centred up to 3 voxels from the nodule: the nodule is inside every patch,
    # at many positions; without the offset it is always the centre voxel (4, 4, 4).
    label = np.full((1, 20, 20, 20), 2, dtype=np.uint8)
    label[0, 10, 10, 10] = 5
    positions: dict[bool, set[tuple[int, ...]]] = {}
    for offset in (None, (3, 3, 3)):
        data = ClassesToIndicesd("label", num_classes=6)({"label": torch.from_numpy(label)})
        data = BalanceComponentIndicesd("label", "label_cls_indices", label_value=5, offset=offset)(data)
        crop = RandCropByLabelClassesd(["label"], "label", spatial_size=[9, 9, 9], ratios=[0, 0, 0, 0, 0, 1],
                                       num_classes=6, num_samples=200, indices_key="label_cls_indices", warn=False)
        crop.set_random_state(seed=0)
        found = [tuple(int(i) for i in np.argwhere(np.asarray(out["label"][0]) == 5)[0]) for out in crop(data)]
        positions[offset is not None] = set(found)
    assert positions[False] == {(4, 4, 4)}
    assert len(positions[True]) > 100 and all(1 <= v <= 7 for p in positions[True] for v in p)
    with pytest.raises(ValueError, match=r"offset must be 3 voxel counts >= 0 \(x, y, z\), got \(1, 1\)"):
        BalanceComponentIndicesd("label", "label_cls_indices", label_value=5, offset=(1, 1))
