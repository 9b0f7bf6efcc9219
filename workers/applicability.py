"""The check before a model runs: is this loaded series what the model was made for?

Why here: the worker has the volume, so it can judge both signals - the header (the
series' own attributes, read from the loaded instances) and the image (the body-region
survey of :mod:`workers.body_regions`) - and count slices as the volume has them
(frames of a multi-frame instance count, instances do not). The decision itself is
:func:`dicom_node.model_domain.decide`, the same the node's ``rules test`` shows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.model_domain import Applicability, HeaderFacts, ImageRegions, InputDomain, SynonymTable, decide
from workers.body_regions import BodyRegionSurvey, survey_body_regions
from workers.volume import Volume

__all__ = ["CheckedVolume", "check_applicability", "volume_header_facts"]

logger = logging.getLogger(__name__)

#: A slice normal within this angle of a patient axis names the orientation (else oblique).
_ORIENTATION_TOLERANCE_DEG = 15.0


@dataclass(frozen=True, eq=False)
class CheckedVolume:
    """The decision, and the survey it used (None when the image was not surveyed); plausibility reuses it."""

    applicability: Applicability
    survey: BodyRegionSurvey | None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _thickness(ds: Dataset) -> float | None:
    value = ds.get("SliceThickness")
    if value in (None, "") and ds.get("SharedFunctionalGroupsSequence"):
        measures = ds.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
        value = measures[0].get("SliceThickness") if measures else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _orientation(volume: Volume) -> str:
    normal = np.asarray(volume.axes[0], dtype=float)
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < np.cos(np.radians(_ORIENTATION_TOLERANCE_DEG)) * np.linalg.norm(normal):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]  # LPS: x normal sagittal, y coronal, z axial


def _contrast(ds: Dataset) -> str | None:
    agent = _text(ds, "ContrastBolusAgent")
    if agent:
        return agent
    for item in ds.get("ContrastBolusAgentSequence") or ():
        meaning = _text(item, "CodeMeaning")
        if meaning:
            return meaning
    return None


def volume_header_facts(volume: Volume) -> HeaderFacts:
    """What the loaded series says about itself: header text of its first instance, geometry of the volume."""
    first = volume.datasets[0]
    return HeaderFacts(
        modality=volume.modality or _text(first, "Modality"),
        body_part_examined=_text(first, "BodyPartExamined"),
        study_description=_text(first, "StudyDescription"),
        series_description=_text(first, "SeriesDescription"),
        protocol_name=_text(first, "ProtocolName"),
        slices=volume.shape[0],
        pixel_spacing_mm=round(float(min(volume.spacing_mm[1:])), 4),
        slice_spacing_mm=round(float(volume.spacing_mm[0]), 4),
        slice_thickness_mm=_thickness(first),
        orientation=_orientation(volume),  # type: ignore[arg-type]
        contrast_agent=_contrast(first),
    )


def check_applicability(model_id: str, domain: InputDomain, volume: Volume,
                        synonyms: SynonymTable | None = None) -> CheckedVolume:
    """Decide whether ``model_id`` (made for ``domain``) may run on ``volume``; never raises for a bad image.

    The image is surveyed when the model names body regions (or needs complete coverage);
    a survey that fails is recorded as "image not judged" and the header decides.
    """
    start = time.perf_counter()
    facts = volume_header_facts(volume)
    survey: BodyRegionSurvey | None = None
    image: ImageRegions | None = None
    if domain.body_regions:
        try:
            survey = survey_body_regions(volume)
            image = survey.image_regions()
        except Exception as exc:  # a survey bug must not decide for the model: the header still can
            logger.exception("body-region survey of series %s failed", volume.series_instance_uid)
            image = ImageRegions(available=False, evidence=(f"the image survey failed ({type(exc).__name__}: {exc})",))
    header_seconds = time.perf_counter() - start - (image.seconds if image is not None else 0.0)
    decision = decide(model_id, domain, facts, image=image, synonyms=synonyms, seconds=max(0.0, header_seconds))
    return CheckedVolume(decision, survey)
