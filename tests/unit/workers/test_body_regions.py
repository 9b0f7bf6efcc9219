"""The image side of the applicability check: which body regions a CT volume covers (workers.body_regions).

Issue 21: a chest model ran on a real head CT. What must hold here: chest phantoms at several
fields of view are chest (complete only when both lungs are wholly in view), the real head CT
is head and never chest, the answer does not depend on how the volume is oriented or how much
air surrounds the patient, and nothing the node may receive (not a CT, tiny, constant) makes
the survey raise. Timing lives in ``bench/body_regions.py``, not here.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dicom_node.model_domain import HeaderFacts, InputDomain, decide
from tests.unit.workers.body_region_volumes import (
    chest_phantom,
    chest_volume,
    cropped,
    head_neck_chest_volume,
    head_volume,
    legs_volume,
    padded_with_air,
    reoriented,
    volume_from_array,
    whole_body_volume,
    with_modality,
)
from training.phantoms.chest import LUNG, NODULE, ChestPhantom, PhantomConfig, generate_chest_phantom
from workers.body_regions import BodyRegionSurvey, survey_body_regions
from workers.volume import Volume

FEET_FIRST = ((0, 1, 2), (True, False, False))
SAGITTAL = ((2, 0, 1), (False, False, False))
CORONAL_REVERSED = ((1, 0, 2), (True, True, False))


@pytest.fixture(scope="module")
def phantoms() -> dict[str, ChestPhantom]:
    """Chest phantoms at three fields of view (grids, spacings, matrix shapes)."""
    return {
        "coarse": chest_phantom((24, 64, 64), (10.0, 5.5, 5.5), seed=11),
        "medium": chest_phantom((40, 96, 96), (6.0, 3.7, 3.7), seed=12),
        "wide": chest_phantom((30, 72, 88), (8.0, 4.9, 4.0), seed=13),
    }


@pytest.fixture(scope="module")
def chests(phantoms: dict[str, ChestPhantom], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Volume]:
    """The phantoms as DICOM series, loaded as the workers load them."""
    return {name: chest_volume(phantom, tmp_path_factory.mktemp(name), seed=i)
            for i, (name, phantom) in enumerate(phantoms.items())}


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """The real InVesalius head CT (rows run anterior, slices superior)."""
    return head_volume(tmp_path_factory.mktemp("head_ct"))


@pytest.fixture(scope="module")
def head_survey(head: Volume) -> BodyRegionSurvey:
    return survey_body_regions(head)


def _names(survey: BodyRegionSurvey) -> list[str]:
    return [r.region for r in survey.regions]


@pytest.mark.parametrize("name", ["coarse", "medium", "wide"])
def test_chest_phantoms_at_three_fields_of_view_are_complete_chests(chests: dict[str, Volume], name: str) -> None:
    survey = survey_body_regions(chests[name])
    assert survey.available and _names(survey) == ["chest"], survey.image_regions()
    chest = survey.region("chest")
    assert chest is not None and chest.complete is True, chest
    assert re.fullmatch(r"lungs \d+\.\d L \(left \d+\.\d L, right \d+\.\d L\) at z -?\d+\.\.-?\d+ mm, "
                        r"wholly in the field of view", chest.evidence), chest.evidence
    assert 1500 < survey.measurements["lung_ml"] < 4500
    assert survey.image_regions().complete == ("chest",)
    json.dumps(survey.measurements)  # goes into the job record as it is


def test_lung_mask_is_the_phantoms_lungs_with_vessels_and_nodules_inside(
        phantoms: dict[str, ChestPhantom], chests: dict[str, Volume]) -> None:
    survey = survey_body_regions(chests["medium"])
    s0, s1, s2 = survey.step
    labels = phantoms["medium"].labels[::s0, ::s1, ::s2]
    truth = (labels == LUNG) | (labels == NODULE)
    assert survey.lung_mask.shape == labels.shape == survey.body_mask.shape
    dice = 2 * float((truth & survey.lung_mask).sum()) / float(truth.sum() + survey.lung_mask.sum())
    assert dice > 0.9, dice
    nodules = labels == NODULE
    assert nodules.any()
    assert float((nodules & survey.lung_mask).sum() / nodules.sum()) > 0.9
    assert not (survey.lung_mask & ~survey.body_mask).any()


def test_nodule_against_the_chest_wall_counts_as_lung(phantoms: dict[str, ChestPhantom]) -> None:
    phantom = phantoms["medium"]
    hu = phantom.volume_hu.astype(np.float32)
    lung = phantom.labels == LUNG
    z = hu.shape[0] // 2
    columns = np.nonzero(lung[z].any(axis=0))[0]
    x_wall = int(columns[0])  # the lateral edge of the (image-left) lung at mid-height
    row = int(np.nonzero(lung[z, :, x_wall])[0].mean())
    sz, sy, sx = phantom.spacing_mm
    zz, yy, xx = np.ogrid[:hu.shape[0], :hu.shape[1], :hu.shape[2]]
    radius = 7.5  # a 15 mm solid nodule touching the chest wall
    nodule = ((zz - z) * sz) ** 2 + ((yy - row) * sy) ** 2 + ((xx - x_wall) * sx - radius) ** 2 <= radius**2
    nodule &= lung
    hu[nodule] = 30.0
    survey = survey_body_regions(volume_from_array(hu, phantom.spacing_mm))
    s0, s1, s2 = survey.step
    cells = nodule[::s0, ::s1, ::s2]
    assert cells.sum() >= 3
    assert float((cells & survey.lung_mask).sum() / cells.sum()) >= 0.9


def test_a_short_scan_range_that_cuts_the_lungs_is_an_incomplete_chest(chests: dict[str, Volume]) -> None:
    middle = cropped(chests["medium"], (slice(12, 28), slice(None), slice(None)))
    survey = survey_body_regions(middle)
    chest = survey.region("chest")
    assert chest is not None and chest.complete is False
    assert "cut by the first level" in chest.evidence and "cut by the last level" in chest.evidence
    assert survey.image_regions().complete == ()
    top_cut = cropped(chests["coarse"], (slice(0, 16), slice(None), slice(None)))
    chest = survey_body_regions(top_cut).region("chest")
    assert chest is not None and chest.complete is False and "cut by the last level" in chest.evidence


def test_an_in_plane_field_of_view_that_cuts_a_lung_is_an_incomplete_chest(chests: dict[str, Volume]) -> None:
    narrow = cropped(chests["medium"], (slice(None), slice(None), slice(24, 96)))
    survey = survey_body_regions(narrow)
    chest = survey.region("chest")
    assert chest is not None and chest.complete is False
    assert "cut by the in-plane field of view" in chest.evidence
    # The cut lung still counts: both lungs are in the mask, not only the enclosed one.
    assert survey.measurements["lung_right_ml"] > 0.5 * survey.measurements["lung_left_ml"]


def test_the_default_training_phantom_shows_both_lungs_wholly_in_the_field_of_view() -> None:
    """The shipped chest models were trained on this grid: they may demand complete coverage."""
    phantom = generate_chest_phantom(PhantomConfig(), seed=0)
    survey = survey_body_regions(volume_from_array(phantom.volume_hu, phantom.spacing_mm))
    chest = survey.region("chest")
    assert _names(survey) == ["chest"] and chest is not None and chest.complete is True, chest


def test_air_around_the_patient_changes_nothing(chests: dict[str, Volume]) -> None:
    original = survey_body_regions(chests["coarse"])
    padded = survey_body_regions(padded_with_air(chests["coarse"], 40, levels=4))
    assert _names(padded) == ["chest"]
    chest = padded.region("chest")
    assert chest is not None and chest.complete is True
    assert padded.measurements["lung_ml"] == pytest.approx(original.measurements["lung_ml"], rel=0.1)


@pytest.mark.parametrize("orientation", [FEET_FIRST, SAGITTAL, CORONAL_REVERSED],
                         ids=["feet-first", "sagittal", "coronal-reversed"])
def test_the_answer_does_not_depend_on_orientation(chests: dict[str, Volume], head: Volume,
                                                   orientation: tuple[tuple[int, ...], tuple[bool, ...]]) -> None:
    order, flip = orientation
    for volume, region in ((chests["medium"], "chest"), (head, "head")):
        original = survey_body_regions(volume)
        turned = survey_body_regions(reoriented(volume, order, flip))
        assert _names(turned) == _names(original) == [region]
        assert turned.region(region).complete is original.region(region).complete is True  # type: ignore[union-attr]
        assert turned.body_mask.shape == turned.lung_mask.shape == tuple(
            len(range(0, n, s)) for n, s in zip(reoriented(volume, order, flip).shape, turned.step))
        assert turned.measurements["lung_ml"] == pytest.approx(original.measurements["lung_ml"], rel=0.1, abs=1.0)
    turned = survey_body_regions(reoriented(chests["medium"], order, flip))
    chest = turned.region("chest")
    assert chest is not None and chest.axis == int(np.argmax(np.abs(reoriented(chests["medium"], order, flip)
                                                                     .axes[:, 2])))


def test_feet_first_slice_indices_point_at_the_same_anatomy(chests: dict[str, Volume]) -> None:
    volume = chests["coarse"]
    flipped = reoriented(volume, *FEET_FIRST)
    a = survey_body_regions(volume).region("chest")
    b = survey_body_regions(flipped).region("chest")
    assert a is not None and b is not None
    last = volume.shape[0] - 1
    assert (b.first_slice, b.last_slice) == (last - a.last_slice, last - a.first_slice)
    assert b.z_mm == pytest.approx(a.z_mm, abs=0.1)


def test_real_head_ct_is_a_complete_head_and_never_chest(head_survey: BodyRegionSurvey) -> None:
    assert head_survey.available and _names(head_survey) == ["head"], head_survey.image_regions()
    region = head_survey.region("head")
    assert region is not None and region.complete is True
    assert re.match(r"skull ring on \d+ of \d+ levels \(z -?\d+\.\.-?\d+ mm\)", region.evidence), region.evidence
    # Neither the air around the head nor the sinuses are lungs.
    assert not head_survey.lung_mask.any()
    assert head_survey.measurements["lung_ml"] == 0.0
    assert head_survey.body_mask.any()


def test_head_cut_at_either_end_is_an_incomplete_head(head: Volume) -> None:
    no_vertex = survey_body_regions(cropped(head, (slice(0, 78), slice(None), slice(None)))).region("head")
    no_base = survey_body_regions(cropped(head, (slice(25, head.shape[0]), slice(None), slice(None)))).region("head")
    assert no_vertex is not None and no_vertex.complete is False and "vertex cut" in no_vertex.evidence
    assert no_base is not None and no_base.complete is False and "skull base cut" in no_base.evidence


def test_chest_model_is_declined_on_the_real_head_ct(head_survey: BodyRegionSurvey) -> None:
    """Issue 21 end to end at the decision: even with a header that says CHEST, the image wins."""
    chest_model = InputDomain(modalities=("CT",), body_regions=("chest",))
    facts = HeaderFacts(modality="CT", body_part_examined="CHEST", slices=108)
    decision = decide("chest-ct-segmentation", chest_model, facts, image=head_survey.image_regions())
    assert not decision.applies and decision.reason_code == "body-region"
    assert "the image shows head" in (decision.reason or "")


def test_head_neck_and_chest_are_reported_head_to_feet(head: Volume, phantoms: dict[str, ChestPhantom]) -> None:
    survey = survey_body_regions(head_neck_chest_volume(head, phantoms["coarse"]))
    assert _names(survey) == ["head", "neck", "chest"], survey.image_regions()
    z_tops = [r.z_mm[1] for r in survey.regions]
    assert z_tops == sorted(z_tops, reverse=True)


def test_a_crude_whole_body_shows_every_region_in_order(head: Volume, phantoms: dict[str, ChestPhantom]) -> None:
    """Synthetic abdomen, pelvis and thighs below the phantom's chest: shows the best-effort rules run
    together, not that they are right on real anatomy (see docs/applicability.md)."""
    survey = survey_body_regions(whole_body_volume(head, phantoms["coarse"]))
    assert _names(survey) == ["head", "neck", "chest", "abdomen", "pelvis", "extremities", "whole_body"], \
        survey.image_regions()
    pelvis, abdomen = survey.region("pelvis"), survey.region("abdomen")
    assert pelvis is not None and abdomen is not None and pelvis.z_mm[1] < abdomen.z_mm[0]
    # The bowel gas in the abdomen is not lung.
    chest_alone = volume_from_array(phantoms["coarse"].volume_hu, phantoms["coarse"].spacing_mm)
    assert survey.measurements["lung_ml"] == pytest.approx(
        survey_body_regions(chest_alone).measurements["lung_ml"], rel=0.05)


def test_two_limbs_without_a_trunk_are_extremities() -> None:
    survey = survey_body_regions(legs_volume(slices=20, spacing_mm=5.0, size=64, pixel_mm=6.0))
    assert _names(survey) == ["extremities"]
    assert not survey.lung_mask.any()


def test_not_a_ct_is_not_judged(chests: dict[str, Volume]) -> None:
    survey = survey_body_regions(with_modality(chests["coarse"], "MR"))
    assert not survey.available and survey.regions == ()
    assert "not a CT (modality MR)" in survey.notes[0]
    s0, s1, s2 = survey.step
    assert survey.body_mask.shape == chests["coarse"].array[::s0, ::s1, ::s2].shape
    assert not survey.body_mask.any() and not survey.lung_mask.any()
    image = survey.image_regions()
    assert not image.available and image.evidence == survey.notes


@pytest.mark.parametrize("shape", [(3, 64, 64), (40, 4, 4), (1, 1, 1)])
def test_too_small_volumes_are_not_judged(shape: tuple[int, int, int]) -> None:
    survey = survey_body_regions(volume_from_array(np.zeros(shape), (5.0, 5.0, 5.0)))
    assert not survey.available and "too small to judge" in survey.notes[0]
    assert survey.body_mask.shape == tuple(len(range(0, n, s)) for n, s in zip(shape, survey.step))


@pytest.mark.parametrize("value", [0.0, -1000.0, 3071.0, -3024.0])
def test_constant_volumes_show_no_region(value: float) -> None:
    survey = survey_body_regions(volume_from_array(np.full((30, 48, 48), value), (5.0, 5.0, 5.0)))
    assert survey.available and survey.regions == ()
    assert not survey.lung_mask.any()


def test_noise_and_extreme_spacing_do_not_break_the_survey() -> None:
    rng = np.random.default_rng(0)
    noise = volume_from_array(rng.normal(-200.0, 800.0, (20, 40, 40)), (0.1, 100.0, 0.3))
    survey = survey_body_regions(noise)
    assert isinstance(survey.available, bool)
    s0, s1, s2 = survey.step
    assert survey.lung_mask.shape == noise.array[::s0, ::s1, ::s2].shape
    json.dumps(survey.measurements)


def test_survey_reads_the_volume_without_changing_it(chests: dict[str, Volume]) -> None:
    volume = chests["coarse"]
    before = volume.array.copy()
    survey_body_regions(volume)
    assert np.array_equal(volume.array, before)


def test_regions_feed_the_shared_decision_type(chests: dict[str, Volume]) -> None:
    image = survey_body_regions(chests["wide"]).image_regions()
    assert image.regions == ("chest",) and image.complete == ("chest",)
    assert image.evidence and image.evidence[0].startswith("lungs ")
    assert 0 < image.seconds < 5
