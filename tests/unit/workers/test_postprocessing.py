"""The bundle postprocessing: the nodule size filter (specks go to the next-ranked label, lesions stay) and the
body filter (lung, heart and nodule painted outside the body become background; those inside stay)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Activationsd, AsDiscreted, Compose

from training.labels import CHEST_LABELS
from training.segmentation import BODY_TISSUE_LABELS, INSIDE_BODY_LABELS, inference_config
from workers.models.postprocessing import (
    DropSmallComponentsd,
    KeepInsideBodyd,
    drop_small_components,
    keep_inside_body,
    outside_body,
)

REPO = Path(__file__).resolve().parents[3]
BODY, LUNG, HEART, BONE, NODULE = 1, 2, 3, 4, 5


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


def _chest(size: int = 40, slices: int = 8) -> np.ndarray:
    """(1, X, Y, Z) label map: a body ring (with a rib of bone) along the last (axial) axis, two lungs (x < 20 and
    x >= 20), heart and a nodule inside it in slices 2..5; slices 0, 1, 6, 7 hold body and background only."""
    x, y = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(x, y)
    labels = np.zeros((size, size, slices), dtype=np.int64)
    labels[r <= 14] = BODY
    labels[(r > 12) & (r <= 13) & (x > 8)] = BONE  # a rib, part of the ring
    for z in range(2, 6):
        section = labels[:, :, z]
        section[(np.hypot(x + 6, y) <= 5)] = LUNG
        section[(np.hypot(x - 6, y) <= 5)] = LUNG
        section[(np.hypot(x, y - 8) <= 2)] = HEART
    labels[17:19, 18:20, 3] = NODULE  # in the lung at x < 20
    return labels[None]


def test_lung_and_heart_outside_the_body_become_background_and_organs_inside_stay() -> None:
    labels = _chest()
    inside = {value: int((labels == value).sum()) for value in (BODY, LUNG, HEART, BONE, NODULE)}
    painted = labels.copy()
    painted[0, 0:4, 10:30, 1:7] = LUNG  # outside air behind the patient, reaching the image edge
    painted[0, 34:36, 18:20, 3] = LUNG  # a blob in the air, touching neither edge nor body
    painted[0, 35, 35, 2] = HEART
    painted[0, 36:38, 10:12, 4] = NODULE
    painted[0, :, :, 7][painted[0, :, :, 7] == 0] = LUNG  # all the air of a slice around the body
    tensor = torch.from_numpy(painted)
    kept = keep_inside_body(tensor, inside_labels=[LUNG, HEART, NODULE], body_labels=[BODY, BONE]).numpy()
    assert {value: int((kept == value).sum()) for value in (BODY, LUNG, HEART, BONE, NODULE)} == inside
    assert np.array_equal(kept, labels)
    assert int((tensor == LUNG).sum()) > inside[LUNG]  # the input is not changed


def test_axial_slices_are_the_last_axis() -> None:
    # The lungs are holes in the body ring in axial slices (the last axis after Orientationd RAS). Seen along
    # another axis the ring is two walls, and the lungs reach the image edge through the air that the end
    # slices hold inside the ring (a tube open at both ends), so they would be cleared.
    labels = _chest()
    x, y = np.mgrid[:40, :40] - 19.5
    for z in (0, 1, 6, 7):
        labels[0, :, :, z][np.hypot(x, y) <= 11] = 0
    outside = outside_body(labels[0], [BODY, BONE])
    assert not outside[labels[0] == LUNG].any() and not outside[:, :, 0][np.hypot(x, y) <= 11].any()
    assert outside[0, 0, :].all()
    moved = np.ascontiguousarray(np.moveaxis(labels[0], 2, 0))  # axial along the first axis instead
    assert outside_body(moved, [BODY, BONE])[moved == LUNG].any()


def test_a_gap_in_the_body_ring_needs_closing_and_a_lung_the_field_of_view_cuts_stays() -> None:
    labels = _chest()
    gapped = labels.copy()
    gapped[0, 14:16, 24:40, 3] = 0  # a 2-voxel channel from one lung (x < 20) to the outside air, slice 3 only
    gapped[0, 14:16, 24:28, 3] = LUNG
    lungs = int((gapped == LUNG).sum())
    open_ring = keep_inside_body(torch.from_numpy(gapped), [LUNG, HEART, NODULE], [BODY, BONE]).numpy()
    assert not (open_ring[0, :20, :, 3] == LUNG).any()  # that lung leaks out with the outside air ...
    assert np.array_equal(open_ring[0, 20:, :, 3], gapped[0, 20:, :, 3])  # ... the other stays
    assert np.array_equal(np.delete(open_ring, 3, axis=3), np.delete(gapped, 3, axis=3))  # other slices too
    closed = keep_inside_body(torch.from_numpy(gapped), [LUNG, HEART, NODULE], [BODY, BONE], closing_voxels=2)
    assert int((closed.numpy() == LUNG).sum()) == lungs
    # A small field of view: the lung reaches the image edge and no outside air is in the slice; it stays.
    cut = labels[:, 8:32, 8:32, :].copy()
    cut[0, :, :, 2:6][cut[0, :, :, 2:6] == 0] = BODY
    cut[0, 0:6, 9:14, 3] = LUNG
    assert np.array_equal(keep_inside_body(torch.from_numpy(cut), [LUNG, HEART, NODULE], [BODY, BONE]).numpy(), cut)


def test_the_body_filter_keeps_the_metadata_in_a_bundle_chain_and_names_bad_input() -> None:
    labels = _chest()
    labels[0, 0:3, 0:3, 3] = LUNG
    logits = MetaTensor(torch.nn.functional.one_hot(torch.from_numpy(labels[0]), 6).permute(3, 0, 1, 2).float() * 9,
                        affine=torch.diag(torch.tensor([2.2, 2.2, 2.5, 1.0])))
    chain = Compose([Activationsd("pred", softmax=True), AsDiscreted("pred", argmax=True),
                     KeepInsideBodyd("pred", inside_labels=[LUNG, HEART, NODULE], body_labels=[BODY, BONE])])
    pred = chain({"pred": logits})["pred"]
    assert isinstance(pred, MetaTensor) and float(pred.affine[2, 2]) == 2.5
    assert int((pred == LUNG).sum()) == int((_chest() == LUNG).sum())
    with pytest.raises(ValueError, match=r"labels \[3\] are both inside_labels and body_labels"):
        keep_inside_body(torch.from_numpy(labels), [LUNG, HEART], [BODY, HEART])
    with pytest.raises(ValueError, match=r"after AsDiscreted\(argmax=True\) - got shape \(6, 40, 40, 8\)"):
        keep_inside_body(logits, [LUNG], [BODY])
    with pytest.raises(ValueError, match="label 0 is background"):
        keep_inside_body(torch.from_numpy(labels), [0, LUNG], [BODY])
    with pytest.raises(ValueError, match="closing_voxels must be >= 0, got -1"):
        outside_body(labels[0], [BODY], closing_voxels=-1)
    with pytest.raises(ValueError, match="body_labels is empty"):  # when the bundle is loaded, not on a study
        KeepInsideBodyd("pred", inside_labels=[LUNG], body_labels=[])


def test_the_shipped_chest_bundle_and_a_retrained_one_clear_organs_outside_the_body_after_the_argmax() -> None:
    def steps(config: dict) -> list[dict]:
        return config["postprocessing"]["transforms"]

    def targets(config: dict) -> list[str]:
        return [step["_target_"].rsplit(".", 1)[-1] for step in steps(config)]

    shipped = json.loads((REPO / "workers/bundles/chest_ct_segmentation/configs/inference.json").read_text())
    values = {spec.name: spec.value for spec in CHEST_LABELS}
    retrained = inference_config(inside_labels=[values[n] for n in INSIDE_BODY_LABELS],
                                 body_labels=[values[n] for n in BODY_TISSUE_LABELS])
    for config in (shipped, retrained):
        order = targets(config)
        assert order.index("AsDiscreted") + 1 == order.index("KeepInsideBodyd") == order.index("Invertd") - 1
        step = steps(config)[order.index("KeepInsideBodyd")]
        assert step["_target_"] == "workers.models.postprocessing.KeepInsideBodyd"
        assert (sorted(step["inside_labels"]), sorted(step["body_labels"])) == ([LUNG, HEART, NODULE], [BODY, BONE])
    assert "KeepInsideBodyd" not in targets(inference_config())  # other label sets do not get it by default
