"""Plausibility checks of model results: synthetic label maps and surveys built by hand (fast, exact).

The synthetic chest (5 mm voxels, axial, columns running to the patient's left): a body
cylinder, a right and a left lung, the heart between them touching both, a nodule in
the left lung. The survey masks are the truth on a strided grid, as the body-region
survey would give them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest

from dicom_node.contracts import CodedConcept, Detection, SegmentLabel
from dicom_node.plausibility_rules import PlausibilityRules
from workers.body_regions import BodyRegionSurvey
from workers.models.base import DetectionResult, SegmentationResult
from workers.plausibility import check_grid_step, check_plausibility
from workers.volume import FrameRef, Volume

SHAPE = (40, 64, 64)
SPACING = (5.0, 5.0, 5.0)
STEP = (1, 2, 2)
#: Axial: slices superior (+z), rows posterior (+y), columns to the patient's left (+x).
AXIAL_AXES = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ORIGIN = (-160.0, -160.0, -100.0)
BODY, LUNG, HEART, BONE, NODULE = 1, 2, 3, 4, 5
_ANATOMY = CodedConcept(value="123037004", scheme="SCT", meaning="Anatomical Structure")
LABELS = tuple(
    SegmentLabel(value=v, name=n, property_category=_ANATOMY,
                 property_type=CodedConcept(value=str(1000 + v), scheme="99TEST", meaning=n))
    for v, n in ((BODY, "body"), (LUNG, "lung"), (HEART, "heart"), (BONE, "bone"), (NODULE, "nodule"))
)
CHEST_RULES = PlausibilityRules.model_validate({
    "volumes_ml": {"lung": {"min": 1000, "max": 9000}, "heart": {"min": 100, "max": 1500}, "nodule": {"max": 500}},
    "inside_body": ["lung", "heart", "nodule"],
    "adjacent": {"heart": [{"label": "lung", "sides": "both"}], "nodule": ["lung"]},
    "max_low_confidence_fraction": 0.25,
})
DETECTOR_RULES = PlausibilityRules(findings_inside="lungs")


def _volume(axes: npt.NDArray[np.float64] = AXIAL_AXES, origin: tuple[float, float, float] = ORIGIN,
            shape: tuple[int, int, int] = SHAPE, spacing: tuple[float, float, float] = SPACING) -> Volume:
    return Volume(
        array=np.zeros(shape, dtype=np.float32), spacing_mm=spacing, origin_mm=origin, axes=axes,
        series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", frame_of_reference_uid="1.2.3.5",
        modality="CT", frames=tuple(FrameRef(f"1.2.3.4.{k}") for k in range(shape[0])), datasets=(),
    )


def _ellipsoid(centre: tuple[float, float, float], radii: tuple[float, float, float],
               shape: tuple[int, int, int] = SHAPE) -> npt.NDArray[np.bool_]:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
        ((x - centre[2]) / radii[2]) ** 2 <= 1.0


@dataclasses.dataclass
class Chest:
    labels: npt.NDArray[np.uint8]
    body: npt.NDArray[np.bool_]
    lungs: npt.NDArray[np.bool_]
    right_lung: npt.NDArray[np.bool_]
    left_lung: npt.NDArray[np.bool_]


def _chest() -> Chest:
    """Body cylinder (columns 8..56), lungs at columns ~20 (right) and ~44 (left), heart between, a nodule."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = np.broadcast_to(((y - 32) / 22.0) ** 2 + ((x - 32) / 26.0) ** 2 <= 1.0, SHAPE).copy()
    right = _ellipsoid((20, 30, 21), (14, 12, 7))
    left = _ellipsoid((20, 30, 43), (14, 12, 7))
    heart = _ellipsoid((16, 28, 32), (6, 7, 5)) & ~right & ~left
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[body] = BODY
    labels[right | left] = LUNG
    labels[heart] = HEART
    labels[_ellipsoid((24, 30, 45), (1.2, 1.2, 1.2))] = NODULE
    return Chest(labels, body, right | left, right, left)


def _survey(body: npt.NDArray[np.bool_], lungs: npt.NDArray[np.bool_], step: tuple[int, int, int] = STEP,
            available: bool = True, notes: tuple[str, ...] = ()) -> BodyRegionSurvey:
    s0, s1, s2 = step
    return BodyRegionSurvey(available=available, regions=(), step=step, body_mask=body[::s0, ::s1, ::s2].copy(),
                            lung_mask=lungs[::s0, ::s1, ::s2].copy(), seconds=0.0, notes=notes)


def _segmentation(labels: npt.NDArray[np.uint8], low_confidence: float | None = 0.05) -> SegmentationResult:
    return SegmentationResult(label_map=labels, labels=LABELS, low_confidence_fraction=low_confidence)


def _check(name: str, verdict_checks: tuple) -> object:  # type: ignore[type-arg]
    return next(c for c in verdict_checks if c.name == name)


@pytest.fixture(scope="module")
def chest() -> Chest:
    return _chest()


def test_a_plausible_chest_passes_every_rule(chest: Chest) -> None:
    verdict = check_plausibility("chest", CHEST_RULES, _segmentation(chest.labels), _volume(),
                                 _survey(chest.body, chest.lungs))
    assert verdict.plausible, verdict.reasons
    assert verdict.reasons == ()
    names = [c.name for c in verdict.checks]
    assert names == ["volume of lung", "volume of heart", "volume of nodule", "lung inside the body",
                     "heart inside the body", "nodule inside the body", "heart touches lung on both sides",
                     "nodule touches lung", "network confidence"]
    assert all(c.passed is True for c in verdict.checks)
    lung_ml = int(np.count_nonzero(chest.labels == LUNG)) * 125 / 1000
    assert _check("volume of lung", verdict.checks).detail == f"{lung_ml:.0f} mL within 1000-9000 mL"
    assert "on the patient's left" in _check("heart touches lung on both sides", verdict.checks).detail
    assert verdict.summary() == "chest result plausible (9 checks passed)"
    assert verdict.seconds >= 0


def test_a_volume_out_of_range_names_label_value_and_range(chest: Chest) -> None:
    labels = chest.labels.copy()
    labels[(labels == LUNG) & (np.arange(SHAPE[0])[:, None, None] > 12)] = BODY  # keep only the lung bases
    verdict = check_plausibility("chest", CHEST_RULES, _segmentation(labels), _volume(),
                                 _survey(chest.body, chest.lungs))
    lung_ml = np.count_nonzero(labels == LUNG) * 0.125
    assert 0 < lung_ml < 1000
    assert not verdict.plausible
    assert verdict.reasons == (f"lung volume {lung_ml:.0f} mL is outside the allowed 1000-9000 mL",
                               "nodule does not touch lung (within 10 mm)")  # the nodule's lung level is gone
    assert _check("volume of lung", verdict.checks).passed is False


def test_an_absent_label_counts_as_zero_ml(chest: Chest) -> None:
    labels = np.where(chest.labels == HEART, BODY, chest.labels).astype(np.uint8)
    verdict = check_plausibility("chest", CHEST_RULES, _segmentation(labels), _volume(),
                                 _survey(chest.body, chest.lungs))
    assert verdict.reasons == ("heart is absent (0 mL); allowed 100-1500 mL",)
    # the other heart rules have nothing to judge and pass
    assert _check("heart inside the body", verdict.checks).passed is True
    assert _check("heart touches lung on both sides", verdict.checks).detail == "no heart in the result"


def test_lung_painted_outside_the_body_is_held(chest: Chest) -> None:
    labels = chest.labels.copy()
    labels[:, 58:, :] = LUNG  # a slab of "lung" in the air behind the patient
    verdict = check_plausibility("chest", CHEST_RULES, _segmentation(labels), _volume(),
                                 _survey(chest.body, chest.lungs))
    assert not verdict.plausible
    check = _check("lung inside the body", verdict.checks)
    assert check.passed is False
    assert len(verdict.reasons) == 1
    assert verdict.reasons[0].endswith("of lung lies outside the body (allowed at most 2.0%)")
    fraction = float(verdict.reasons[0].split("%")[0]) / 100
    assert 0.3 < fraction < 0.8


def test_a_label_may_have_its_own_outside_fraction(chest: Chest) -> None:
    """A model known to label some air as lung gets a looser lung rule; the heart's stays strict."""
    labels = chest.labels.copy()
    labels[:, 58:, :] = LUNG
    labels[:, 58:, 30:33] = HEART  # a sliver of "heart" in the air as well
    rules = PlausibilityRules(inside_body=("lung", "heart"), outside_fraction_by_label={"lung": 0.8})
    verdict = check_plausibility("chest", rules, _segmentation(labels), _volume(), _survey(chest.body, chest.lungs))
    assert _check("lung inside the body", verdict.checks).passed is True
    assert "(at most 80.0%;" in _check("lung inside the body", verdict.checks).detail
    assert len(verdict.reasons) == 1
    assert verdict.reasons[0].endswith("of heart lies outside the body (allowed at most 2.0%)")


def test_the_heart_must_touch_both_lungs(chest: Chest) -> None:
    labels = np.where(chest.left_lung, BODY, chest.labels).astype(np.uint8)
    labels[chest.right_lung & (np.arange(SHAPE[0])[:, None, None] < 40)] = LUNG
    labels[_ellipsoid((20, 30, 21), (20, 20, 12)) & chest.body & (labels == BODY)] = LUNG  # keep the volume up
    verdict = check_plausibility("chest", CHEST_RULES, _segmentation(labels), _volume(),
                                 _survey(chest.body, chest.lungs))
    assert verdict.reasons == ("heart does not touch lung on the patient's left (within 10 mm)",)


def test_left_and_right_follow_the_patient_not_the_array(chest: Chest) -> None:
    """The same patient stored with columns running to the patient's right: the verdict names the same side."""
    labels = np.where(chest.left_lung, BODY, chest.labels).astype(np.uint8)
    flipped_axes = AXIAL_AXES.copy()
    flipped_axes[2] = (-1.0, 0.0, 0.0)
    origin = (ORIGIN[0] + (SHAPE[2] - 1) * SPACING[2], ORIGIN[1], ORIGIN[2])
    flipped = _volume(axes=flipped_axes, origin=origin)
    rules = PlausibilityRules.model_validate({"adjacent": {"heart": [{"label": "lung", "sides": "both"}]}})
    for volume, mapped in ((_volume(), labels), (flipped, labels[:, :, ::-1].copy())):
        verdict = check_plausibility("chest", rules, _segmentation(mapped), volume, None)
        assert verdict.reasons == ("heart does not touch lung on the patient's left (within 10 mm)",)


def test_a_heart_far_from_the_lungs_is_held(chest: Chest) -> None:
    labels = np.where(chest.labels == HEART, BODY, chest.labels).astype(np.uint8)
    labels[_ellipsoid((36, 52, 32), (2, 2, 2)) & chest.body] = HEART  # 80 mm from the nearest lung
    rules = PlausibilityRules.model_validate({"adjacent": {"heart": ["lung"]}})
    verdict = check_plausibility("chest", rules, _segmentation(labels), _volume(), None)
    assert verdict.reasons == ("heart does not touch lung (within 10 mm)",)
    nearer = PlausibilityRules.model_validate({"adjacent": {"heart": ["lung"]}, "adjacency_mm": 80})
    assert check_plausibility("chest", nearer, _segmentation(labels), _volume(), None).plausible


def test_a_one_voxel_nodule_between_grid_samples_is_still_judged(chest: Chest) -> None:
    """A stride steps over a small label; the checks map its voxels onto the grid instead of losing it."""
    labels = np.where(chest.labels == NODULE, LUNG, chest.labels).astype(np.uint8)
    labels[20, 31, 45] = NODULE  # odd row and column: not on the (1, 2, 2) grid's samples
    ok = check_plausibility("chest", CHEST_RULES, _segmentation(labels), _volume(), _survey(chest.body, chest.lungs))
    assert ok.plausible, ok.reasons
    assert _check("nodule touches lung", ok.checks).detail.endswith("within 10 mm")
    labels[20, 31, 45] = LUNG
    labels[20, 63, 63] = NODULE  # a lone voxel in the corner, outside the body and far from the lungs
    held = check_plausibility("chest", CHEST_RULES, _segmentation(labels), _volume(), _survey(chest.body, chest.lungs))
    assert held.reasons == ("100.0% of nodule lies outside the body (allowed at most 2.0%)",
                            "nodule does not touch lung (within 10 mm)")


def test_without_a_survey_the_body_rules_cannot_be_verified_and_hold(chest: Chest) -> None:
    verdict = check_plausibility("chest", CHEST_RULES, _segmentation(chest.labels), _volume(), None)
    assert not verdict.plausible
    assert verdict.reasons == tuple(
        f"cannot verify that {name} lies inside the body: there is no body-region survey of the image: held"
        for name in ("lung", "heart", "nodule")
    )
    assert [c.passed for c in verdict.checks if "inside the body" in c.name] == [None, None, None]
    assert _check("volume of lung", verdict.checks).passed is True  # what needs no survey is still judged
    assert _check("heart touches lung on both sides", verdict.checks).passed is True


def test_a_survey_that_could_not_judge_the_image_holds_with_its_notes(chest: Chest) -> None:
    survey = _survey(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), available=False, notes=("modality MR is not CT",))
    rules = PlausibilityRules(inside_body=("lung",))
    verdict = check_plausibility("chest", rules, _segmentation(chest.labels), _volume(), survey)
    assert verdict.reasons == ("cannot verify that lung lies inside the body: the body-region survey could not "
                               "judge the image (modality MR is not CT): held",)


@pytest.mark.parametrize(("fraction", "passed"), [(0.1, True), (0.25, True), (0.4, False), (None, None)])
def test_low_confidence_results_are_held(chest: Chest, fraction: float | None, passed: bool | None) -> None:
    rules = PlausibilityRules(max_low_confidence_fraction=0.25)
    verdict = check_plausibility("chest", rules, _segmentation(chest.labels, fraction), _volume(), None)
    assert _check("network confidence", verdict.checks).passed is passed
    assert verdict.plausible is (passed is True)
    if passed is False:
        assert verdict.reasons == ("40.0% of the labelled voxels were labelled with less than 50% probability "
                                   "(allowed at most 25.0%): the image may be unlike what the model was trained on",)
    if passed is None:
        assert verdict.reasons == ("cannot verify the network's confidence: the model reports no low-confidence "
                                   "fraction: held",)


def test_rules_naming_unknown_labels_or_the_wrong_kind_hold(chest: Chest) -> None:
    rules = PlausibilityRules.model_validate({"volumes_ml": {"liver": {"min": 800}}, "findings_inside": "lungs"})
    verdict = check_plausibility("chest", rules, _segmentation(chest.labels), _volume(), None)
    assert verdict.reasons == (
        "cannot verify volume of liver: the model has no label 'liver': held",
        "cannot verify findings_inside: the model returned a segmentation result, which that rule cannot judge: held",
    )
    detection_verdict = check_plausibility("det", PlausibilityRules(inside_body=("lung",)), DetectionResult(()),
                                           _volume(), None)
    assert detection_verdict.reasons == ("cannot verify inside_body: the model returned a detection result, which "
                                         "that rule cannot judge: held",)


def test_no_rules_means_plausible(chest: Chest) -> None:
    verdict = check_plausibility("chest", PlausibilityRules(), _segmentation(chest.labels), _volume(), None)
    assert verdict.plausible and verdict.checks == ()


def test_mismatched_shapes_are_errors_naming_them(chest: Chest) -> None:
    with pytest.raises(ValueError, match=r"label map shape \(40, 64, 32\) differs from volume shape \(40, 64, 64\)"):
        check_plausibility("chest", CHEST_RULES, _segmentation(chest.labels[:, :, :32]), _volume(), None)
    wrong = _survey(chest.body, chest.lungs, step=(2, 2, 2))
    wrong = dataclasses.replace(wrong, step=STEP)
    with pytest.raises(ValueError, match=r"body_mask has shape \(20, 32, 32\).*gives \(40, 32, 32\)"):
        check_plausibility("chest", CHEST_RULES, _segmentation(chest.labels), _volume(), wrong)


# --------------------------------------------------------------------------- detection


def _finding(volume: Volume, index: tuple[float, float, float], diameter: float = 8.0) -> Detection:
    centre = tuple(float(v) for v in volume.index_to_world(index))
    return Detection(centre_mm=centre, size_mm=(diameter,) * 3, diameter_mm=diameter, score=0.9,  # type: ignore[arg-type]
                     label=LABELS[NODULE - 1])


def test_findings_in_the_lungs_pass_and_one_in_the_heart_is_held(chest: Chest) -> None:
    volume = _volume()
    survey = _survey(chest.body, chest.lungs)
    inside = [_finding(volume, (20, 30, 43)), _finding(volume, (20, 30, 21))]
    verdict = check_plausibility("det", DETECTOR_RULES, DetectionResult(tuple(inside)), volume, survey)
    assert verdict.plausible, verdict.reasons
    assert verdict.checks[0].detail == "2 of 2 findings in the lungs (margin 5 mm)"
    in_heart = _finding(volume, (16, 28, 32))
    verdict = check_plausibility("det", DETECTOR_RULES, DetectionResult((*inside, in_heart)), volume, survey)
    assert not verdict.plausible
    where = "(" + ", ".join(f"{v:.0f}" for v in in_heart.centre_mm) + ") mm"
    assert len(verdict.reasons) == 1
    assert verdict.reasons[0].startswith(f"1 of 3 findings lie outside the lungs: finding 3 at {where} lies ")
    assert verdict.reasons[0].endswith(" mm from the lungs (allowed margin 5 mm)")


def test_a_juxtapleural_finding_within_the_margin_passes(chest: Chest) -> None:
    volume = _volume()
    survey = _survey(chest.body, chest.lungs)
    # the left lung ends at column 50; a finding centred 5 mm (one voxel) beyond its edge is on the pleura
    edge = max(int(c) for c in np.nonzero(chest.left_lung[20, 30])[0])
    on_pleura = _finding(volume, (20, 30, edge + 1))
    assert not chest.lungs[20, 30, edge + 1]
    assert check_plausibility("det", DETECTOR_RULES, DetectionResult((on_pleura,)), volume, survey).plausible
    far = _finding(volume, (20, 30, edge + 6))  # 30 mm out, in the chest wall
    verdict = check_plausibility("det", DETECTOR_RULES, DetectionResult((far,)), volume, survey)
    assert not verdict.plausible


def test_findings_outside_the_image_or_without_lungs_are_held(chest: Chest) -> None:
    volume = _volume()
    outside = _finding(volume, (20, 30, 90))
    verdict = check_plausibility("det", DETECTOR_RULES, DetectionResult((outside,)), volume,
                                 _survey(chest.body, chest.lungs))
    assert verdict.reasons[0].endswith("lies outside the image")
    no_lungs = _survey(chest.body, np.zeros(SHAPE, bool))
    inside = _finding(volume, (20, 30, 43))
    verdict = check_plausibility("det", DETECTOR_RULES, DetectionResult((inside,)), volume, no_lungs)
    assert verdict.reasons[0].endswith(": the image shows no lungs")


def test_findings_without_a_survey_hold_and_no_findings_pass(chest: Chest) -> None:
    volume = _volume()
    verdict = check_plausibility("det", DETECTOR_RULES, DetectionResult((_finding(volume, (20, 30, 43)),)), volume,
                                 None)
    assert verdict.reasons == ("cannot verify that the 1 findings lie inside the lungs: there is no body-region "
                               "survey of the image: held",)
    empty = check_plausibility("det", DETECTOR_RULES, DetectionResult(()), volume, None)
    assert empty.plausible and empty.checks[0].detail == "no findings"


def test_the_grid_without_a_survey_aims_at_four_millimetre_voxels() -> None:
    assert check_grid_step((1.0, 0.7, 0.7)) == (4, 6, 6)
    assert check_grid_step((5.0, 5.0, 5.0)) == (1, 1, 1)


# --------------------------------------------------------------------------- with the real image survey


@pytest.fixture(scope="module")
def phantom_case() -> tuple[Volume, npt.NDArray[np.uint8], tuple[float, float, float]]:
    """A chest phantom (48 x 80 x 80 at 5 x 4.4 x 4.4 mm, one nodule): its volume, true label map, nodule centre."""
    from tests.unit.workers.model_fixtures import volume_from_geometry
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom
    from training.phantoms.ct_series import SeriesGeometry

    config = PhantomConfig(shape=(48, 80, 80), spacing_mm=(5.0, 4.4, 4.4), nodule_count=(1, 1),
                           nodule_diameter_mm=(10.0, 14.0), vessel_count=4)
    phantom = generate_chest_phantom(config, seed=11)
    geometry = SeriesGeometry(rows=80, columns=80, slices=48, pixel_spacing=(4.4, 4.4), slice_spacing=5.0,
                              slice_thickness=5.0, origin=phantom.origin_xyz_mm)
    volume = volume_from_geometry(geometry, phantom.volume_hu)
    return volume, phantom.labels.astype(np.uint8), phantom.nodules[0].centre_xyz_mm


def test_with_the_real_survey_a_true_chest_passes_and_lungs_moved_into_the_air_are_held(
    phantom_case: tuple[Volume, npt.NDArray[np.uint8], tuple[float, float, float]],
) -> None:
    from workers.body_regions import survey_body_regions

    volume, truth, nodule_centre = phantom_case
    survey = survey_body_regions(volume)
    assert survey.available and survey.lung_mask.any()
    rules = PlausibilityRules.model_validate({
        "volumes_ml": {"lung": {"min": 1000, "max": 9000}, "heart": {"min": 100, "max": 1500}, "nodule": {"max": 500}},
        "inside_body": ["lung", "heart", "nodule"], "outside_fraction_by_label": {"lung": 0.4},
        "adjacent": {"heart": [{"label": "lung", "sides": "both"}], "nodule": ["lung"]},
    })
    verdict = check_plausibility("chest", rules, _segmentation(truth), volume, survey)
    assert verdict.plausible, verdict.reasons
    assert _check("lung inside the body", verdict.checks).detail.startswith("0.0% outside the body")

    moved = np.where(truth == LUNG, BODY, truth).astype(np.uint8)
    air_behind = (volume.array < -900) & (np.arange(volume.shape[1])[None, :, None] >= 62)
    moved[air_behind] = LUNG
    assert 1000 < np.count_nonzero(moved == LUNG) * float(np.prod(volume.spacing_mm)) / 1000 < 9000
    held = check_plausibility("chest", rules, _segmentation(moved), volume, survey)
    assert not held.plausible
    assert held.reasons[0] == "100.0% of lung lies outside the body (allowed at most 40.0%)"
    assert any(reason.startswith("heart does not touch lung") for reason in held.reasons)

    detector = PlausibilityRules(findings_inside="lungs")
    on_nodule = Detection(centre_mm=nodule_centre, size_mm=(12.0, 12.0, 12.0), diameter_mm=12.0, score=0.9,
                          label=LABELS[NODULE - 1])
    assert check_plausibility("det", detector, DetectionResult((on_nodule,)), volume, survey).plausible
    heart = volume.index_to_world(np.argwhere(truth == HEART).mean(axis=0))
    in_heart = on_nodule.model_copy(update={"centre_mm": tuple(float(v) for v in heart)})
    verdict = check_plausibility("det", detector, DetectionResult((on_nodule, in_heart)), volume, survey)
    assert not verdict.plausible
    assert verdict.reasons[0].startswith("1 of 2 findings lie outside the lungs: finding 2 at ")
