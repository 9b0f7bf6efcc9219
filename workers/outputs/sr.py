"""A pipeline's findings as a DICOM Comprehensive 3D SR: a TID 1500 Measurement Report.

Why: the SR is the machine- and human-readable account of what the AI found:
how large each segmented structure is, where each detection lies and how sure
the model is, which algorithm (name, version) produced it, and - just as
important - that it looked and found nothing. Viewers (OHIF) show its planar
groups as annotations; downstream systems read its numbers.

Content tree (TID 1500):

* Observation context: a *device* observer, the node (UID derived from its
  manufacturer / model / serial number, so it is stable across reports).
* Procedure reported: the imaging procedure of the source study (its own
  Procedure Code Sequence, else coded from modality and body region, e.g. LOINC
  24627-2 "CT Chest": :mod:`workers.outputs.procedure`).
* Image library (TID 1600), before Imaging Measurements: one group holding
  one bare TID 1601 entry per source instance of the volume - the IMAGE
  reference (SOP class and instance, and the frames used for a multi-frame
  instance), without the optional TID 1602 descriptors (modality, frame of
  reference, spacing, position, orientation...), which made up most of a
  300-slice SR and of the time to write it (:func:`_image_library`). It is
  added after the SR is constructed (:func:`_add_image_library`).
* One measurement group per finding, each with a Tracking Identifier and a
  Tracking Unique Identifier, finding type/category (the label's coded
  property type/category) and TID 4019 Algorithm Identification (name,
  version, AI family, ``model_id=...`` parameter):

  - **SEG segment** -> volumetric ROI group (TID 1411) referencing the segment
    (SEG SOP instance + segment number + source series, read from the SEG
    itself; ``ReferencedSegment.from_segmentation`` fails on highdicom's
    single-segment SEGs). Measurements: Volume (SCT 118565006) in mL by the
    sum-of-segmented-voxels method; for CT also Attenuation Coefficient
    (DCM 112031) mean / minimum / maximum in ``[hnsf'U]``, computed on the
    label map (:mod:`workers.outputs.measurements`). Anatomy segments carry
    their structure as finding site. Before it, under the same tracking UID, a
    planar ROI group (TID 1410) outlining the segment on the slice where it is
    largest (closed SCOORD POLYLINE along the pixel border of its largest
    component, :mod:`workers.outputs.segment_outline`), titled by a Comment
    "<label>: <volume> mL, mean <HU> HU": without it a viewer has no image to
    open the report on (OHIF showed a black viewport) and draws nothing.
  - **Detection** -> two groups sharing one tracking UID, the planar one first:
    a planar ROI group (TID 1410) on the source image (and frame) of the slice
    nearest the centre: an image-region SCOORD POLYLINE, the closed square
    (5 points) of the detection's diameter around the projected centre, and
    a Comment (DCM 121106) TEXT labelling it "<finding>, <diameter> mm,
    <score> %" (e.g. "Lung nodule, 12 mm, 85 %"); and a volumetric ROI group
    (TID 1411) whose volume surface is a SCOORD3D ELLIPSOID in the frame of
    reference - its three axes are the box extents along patient x, y, z
    through the centre, so the centre is the common midpoint of the axes and
    the box is the ellipsoid's bounding box (TID 1411 allows one volume
    surface per group and highdicom forbids coordinates on ROI-group
    measurements, so an ellipsoid is the one SCOORD3D that carries both) -
    holding the measurements: Long Axis in mm and Certainty of Finding
    (DCM 111012, as CAD SR uses it) in percent = score x 100. A detection under
    the model's display threshold is titled "... (low confidence)" and its
    volumetric group carries the Rendering Intent "Presentation Optional"
    (:mod:`workers.outputs.confidence`), which the summary line shows too.

    Why this shape (checked in the real OHIF 3.13.2 viewer, see
    ``tests/browser/test_ohif_results.py``): OHIF lists a finding in its
    measurement panel only when (1) the first SCOORD of the groups sharing
    its tracking UID is an Image Region POLYLINE of 4 or 5 points (its only
    standard-content mapping besides a POINT; a 36-point circle is shown but
    never listed) and (2) the planar group has no NUM, or its first NUM holds
    the SCOORD as INFERRED FROM (not allowed in TID 1410 groups), because the
    Cornerstone adapters look for the coordinates there; the panel's title is
    the group's Comment. No vendor tracking identifier is needed: the Tracking
    Identifier stays human-readable ("Lung nodule 1").
  - **Classification** -> one TID 1501 group (measurements and qualitative
    evaluations, no region: the answer is about the whole series): finding
    type = the question (the classes' shared category, e.g. SCT 27925004
    "Nodule"), a qualitative evaluation with that question as concept name and
    the winning class's coded value (e.g. SCT 52101004 "Present") as value, and
    Certainty of Finding (DCM 111012) = the winner's probability x 100 in ``%``;
    every class's probability follows as a Probability (DCM 122157) measurement
    in ``%`` with a HAS CONCEPT MOD "Finding" (DCM 121071) = that class's coded
    value (:func:`_classification_group`).
  - **Declared label not found** (no voxel, no detection) -> a TID 1501 group
    with finding type = that label and a qualitative evaluation
    "<label type>" = Absent (SCT 272519000, CID 241 "Present-Absent Only"),
    so that an empty result is reported explicitly, never silently omitted.

Tracking: a finding keeps the Tracking Unique Identifier it had in the report
this one replaces (a re-run of the model on the series: the same lung, the same
nodule, see :mod:`workers.outputs.tracking`); a new finding's UID is derived from
the SR's SOP Instance UID and the finding's position, so a build with configured
UIDs is fully deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.contracts import AlgorithmInfo, CodedConcept, Detection, SegmentLabel
from workers.models.base import ClassificationResult, SegmentationResult
from workers.outputs.common import (
    AI_ALGORITHM_FAMILY,
    SeriesIdentity,
    coded,
    contributing_equipment,
    image_point,
    nearest_slice,
    source_image,
)
from workers.outputs.confidence import LOW_CONFIDENCE_TEXT, is_low_confidence, rendering_intent
from workers.outputs.measurements import SegmentMeasurement, measure_segments, slice_label_counts
from workers.outputs.procedure import procedure_reported
from workers.outputs.segment_outline import key_slice_outline
from workers.outputs.sr_summary import add_summary
from workers.outputs.tracking import FindingTracker, finding_key
from workers.volume import Volume

__all__ = [
    "ClassificationFindings",
    "DetectionFindings",
    "Findings",
    "SegmentationFindings",
    "build_sr",
    "comprehensive_3d_sr",
    "device_observation_context",
    "sr_algorithm_identification",
]

logger = logging.getLogger(__name__)


#: Category of normal anatomy labels (SNOMED CT): their structure is also their finding site.
_ANATOMY_CATEGORIES = frozenset({("123037004", "SCT"), ("91723000", "SCT")})
#: UCUM units.
_ML = hd.sr.CodedConcept(value="mL", scheme_designator="UCUM", meaning="milliliter")
_MM = codes.UCUM.Millimeter
_PERCENT = codes.UCUM.Percent
_HU = codes.UCUM.HounsfieldUnit
#: The probability of one class of a classification (DCM 122157 "Probability"; the winner's is Certainty of Finding).
_PROBABILITY = codes.DCM.Probability
#: Absent, from CID 241 "Present-Absent Only".
_ABSENT = codes.SCT.Absent
#: Comment (DCM 121106): the text a viewer shows as a finding's title (OHIF's measurement panel).
_COMMENT = hd.sr.CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")


@dataclass(frozen=True, eq=False)
class SegmentationFindings:
    """A segmentation model's output as the SR reports it.

    ``seg`` is the DICOM SEG built from ``result`` (``build_seg``), None when
    no label is present; its segments are the ones the SR references.
    """

    algorithm: AlgorithmInfo
    result: SegmentationResult
    seg: hd.seg.Segmentation | None


@dataclass(frozen=True)
class DetectionFindings:
    """A detection model's output as the SR reports it.

    ``labels`` are what the detector looks for (``Model.labels``): each one
    without a detection is reported as absent, which is how an empty result is
    stated. Every detection's label must be one of them.
    """

    algorithm: AlgorithmInfo
    detections: tuple[Detection, ...]
    labels: tuple[SegmentLabel, ...]
    #: The model's display threshold: detections under it are reported as low-confidence; None: no threshold.
    display_threshold: float | None = None

    def __post_init__(self) -> None:
        """Reject a findings set that could not say what was looked for."""
        if not self.labels:
            raise ValueError(f"detection findings of {self.algorithm.name}: labels must name what it looks for")
        values = {label.value for label in self.labels}
        stray = sorted({d.label.value for d in self.detections} - values)
        if stray:
            raise ValueError(
                f"detection findings of {self.algorithm.name}: detections with label values {stray} "
                f"not among the declared labels {sorted(values)}"
            )


@dataclass(frozen=True, eq=False)
class ClassificationFindings:
    """A classification model's output as the SR reports it (see the module docstring).

    ``result.labels`` are the classes; they share one category, the question answered.
    """

    algorithm: AlgorithmInfo
    result: ClassificationResult

    def __post_init__(self) -> None:
        """Reject classes that answer different questions: the SR states one answer to one question."""
        questions = {(label.property_category.value, label.property_category.scheme) for label in self.result.labels}
        if len(questions) != 1:
            raise ValueError(f"classification findings of {self.algorithm.name}: the classes name {len(questions)} "
                             "questions (categories); they must share one")


#: One model's output, as :func:`build_sr` takes it.
Findings = SegmentationFindings | DetectionFindings | ClassificationFindings
_Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def build_sr(
    volume: Volume,
    findings: Sequence[Findings],
    series: SeriesIdentity,
    *,
    procedure: CodedConcept | None = None,
    replaces: Sequence[Dataset] = (),
    tracker: FindingTracker | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR (TID 1500) of ``findings`` on ``volume``'s source series; see the module docstring.

    ``procedure``: the procedure reported (default: the source study's, :func:`procedure_reported`).
    ``replaces``: the earlier SRs of the same model on the same series that this one supersedes (a
    re-run), each with StudyInstanceUID, SeriesInstanceUID, SOPClassUID and SOPInstanceUID; they are
    named in the Predecessor Documents Sequence, the standard way for a report to say what it replaces.
    ``tracker``: hands out each finding's Tracking Unique Identifier, keeping those of the findings of the report
    it replaces (:mod:`workers.outputs.tracking`); its records are what the report stated. Default: a fresh
    tracker (every finding new).

    Pure: no I/O. Patient and study attributes are copied by highdicom from the
    source instances (the evidence). Raises ValueError when there is nothing to
    report on, or when a SEG does not belong to ``volume`` / its segmentation.
    """
    if not findings:
        raise ValueError(f"series {volume.series_instance_uid}: no findings set to report")
    sop_instance_uid = series.sop_uid()
    tracker = tracker if tracker is not None else FindingTracker()
    tracker.start(str(sop_instance_uid))
    groups: list[_Group] = []
    evidence: list[Dataset] = list(volume.datasets)
    for findings_set in findings:
        if isinstance(findings_set, SegmentationFindings):
            groups.extend(_segmentation_groups(volume, findings_set, tracker))
            if findings_set.seg is not None:
                evidence.append(findings_set.seg)
        elif isinstance(findings_set, ClassificationFindings):
            groups.append(_classification_group(findings_set, tracker))
        else:
            groups.extend(_detection_groups(volume, findings_set, tracker))

    # The image library is added after construction: see _add_image_library for why.
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(series),
        procedure_reported=coded(procedure if procedure is not None else procedure_reported(volume)),
        imaging_measurements=groups,
    )
    sr = comprehensive_3d_sr(evidence, report, series, sop_instance_uid, replaces=replaces,
                             algorithms=[findings_set.algorithm for findings_set in findings])
    _add_image_library(sr, _image_library(volume))
    add_summary(sr, [group[0] for group in groups])  # each template's first item is its measurement group
    logger.debug("SR %s of series %s: %d measurement groups", sop_instance_uid, volume.series_instance_uid, len(groups))
    return sr


def comprehensive_3d_sr(evidence: Sequence[Dataset], report: hd.sr.MeasurementReport, series: SeriesIdentity,
                        sop_instance_uid: str, *, replaces: Sequence[Dataset] = (),
                        algorithms: Sequence[AlgorithmInfo] = ()) -> hd.sr.Comprehensive3DSR:
    """A complete Comprehensive 3D SR document of ``report`` in ``series``, identified as our results are;
    ``replaces``: the earlier reports it supersedes (Predecessor Documents Sequence); ``algorithms``: the
    models whose findings it reports (Contributing Equipment Sequence)."""
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series.series_uid(),
        series_number=series.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=series.instance_number,
        manufacturer=series.manufacturer,
        manufacturer_model_name=series.manufacturer_model_name,
        software_versions=series.software_versions,
        device_serial_number=series.device_serial_number,
        series_description=series.series_description,
        is_complete=True,
        previous_versions=list(replaces) or None,
        contributing_equipment=contributing_equipment(algorithms, series) or None,
    )


_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
#: Concept name of an image library entry, as highdicom's ``ImageLibrary`` names it.
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")


def _image_library(volume: Volume) -> hd.sr.ContainerContentItem:
    """The TID 1600 Image Library of ``volume``'s source instances: bare image references, no descriptors.

    Structure: Image Library > one Image Library Group (the volume is one
    series: one modality, one frame of reference, checked by ``load_series``)
    > one TID 1601 entry per source instance, in ``volume.datasets`` order: an
    IMAGE item "Source" (SCT 260753009) with the instance's SOP class and
    instance UIDs and, for a multi-frame instance, the numbers of the frames
    the volume uses (ascending).

    Why no descriptors: in PS3.16 TID 1601 the IMAGE reference (row 1) is the
    only mandatory row; row 2, ``HAS ACQ CONTEXT INCLUDE DTID 1602 "Image
    Library Entry Descriptors"``, has Requirement Type U (user option) and no
    condition, as has the group-level inclusion of TID 1602 (TID 1600 row 3);
    TID 1602 (modality, frame of reference, matrix) includes TID 1604 for
    cross-sectional images (spacing, thickness, position, orientation). Those
    descriptors, about 18 content items per image, repeat what the referenced
    images say themselves; with them a 300-slice SR was 1.25 MiB and pydicom
    took 1.5 s to write it, without them 0.16 MiB and 0.13 s (bench/encode.py).
    """
    frames: dict[str, list[int]] = {}
    for frame in volume.frames:
        if frame.frame_number is not None:
            frames.setdefault(frame.sop_instance_uid, []).append(frame.frame_number)
    entries = []
    for dataset in volume.datasets:
        uid = str(dataset.SOPInstanceUID)
        entries.append(
            hd.sr.ImageContentItem(
                name=_SOURCE,
                referenced_sop_class_uid=str(dataset.SOPClassUID),
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=sorted(frames[uid]) if uid in frames else None,
                relationship_type=_CONTAINS,
            )
        )
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS)
    group.ContentSequence = entries  # a ContentItem wraps the list in a ContentSequence
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = [group]
    return library


def _add_image_library(sr: hd.sr.Comprehensive3DSR, library: hd.sr.ContainerContentItem) -> None:
    """Put the Image Library where ``MeasurementReport(referenced_images=...)`` puts it: before Imaging Measurements.

    Why after construction: ``MeasurementReport(referenced_images=...)``
    would build highdicom's own library, with every descriptor, and the SR
    constructor deep-copies the whole content tree and parses the copy back
    (``sr.content``), a cost that grows with the library. The library
    references only the volume's own instances, which are all in the
    evidence, so nothing the constructor checks is skipped. It is inserted in
    the document (``sr.ContentSequence``) and in the parsed view
    (``sr.content``), so both describe the same document.
    """
    for sequence in (sr.ContentSequence, sr.content[0].ContentSequence):
        last = sequence[-1]
        if last.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value:
            raise ValueError(f"SR {sr.SOPInstanceUID}: content does not end with Imaging Measurements")
        sequence.insert(len(sequence) - 1, library)


def device_observation_context(series: SeriesIdentity) -> hd.sr.ObservationContext:
    """Device observer = this node, with a UID that stays the same for the same node configuration."""
    device_uid = generate_uid(
        entropy_srcs=[
            "dicom-ai-node device",
            series.manufacturer,
            series.manufacturer_model_name,
            series.device_serial_number,
        ]
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=series.manufacturer_model_name,
                manufacturer_name=series.manufacturer,
                model_name=series.manufacturer_model_name,
                serial_number=series.device_serial_number,
            ),
        )
    )


def sr_algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version, AI family, and the registry id as a parameter."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"model_id={algorithm.model_id}"],
        family=AI_ALGORITHM_FAMILY,
    )


@dataclass(frozen=True)
class _Tracking:
    """Tracking Identifier (text, 64 characters at most) and Tracking Unique Identifier of one finding."""

    uid: str
    identifier: str

    def item(self) -> hd.sr.TrackingIdentifier:
        """A fresh TID 4108 content item (each group gets its own datasets)."""
        return hd.sr.TrackingIdentifier(uid=self.uid, identifier=self.identifier[:64])


def _tracking(tracker: FindingTracker, identifier: str, kind: str, concept: CodedConcept, name: str = "",
              detection: Detection | None = None) -> _Tracking:
    """Tracking of one finding: ``identifier`` (text) and the UID ``tracker`` hands out for it (the earlier
    report's for the same finding, see :mod:`workers.outputs.tracking`)."""
    key = finding_key(kind, concept, name)
    if detection is None:
        return _Tracking(uid=tracker.uid(key), identifier=identifier)
    return _Tracking(uid=tracker.uid(key, centre_mm=detection.centre_mm, diameter_mm=detection.diameter_mm),
                     identifier=identifier)


def _absent_group(
    label: SegmentLabel, algorithm: AlgorithmInfo, tracking: _Tracking
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that ``label`` was looked for and not found."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking.item(),
        finding_type=coded(label.property_type),
        finding_category=coded(label.property_category),
        algorithm_id=sr_algorithm_identification(algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(label.property_type), value=_ABSENT)],
    )


# --- segmentation --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SegSegment:
    """One segment as the SEG itself describes it."""

    number: int
    label: str
    property_type: hd.sr.CodedConcept
    property_category: hd.sr.CodedConcept
    anatomic_regions: tuple[hd.sr.CodedConcept, ...]


def _seg_segments(seg: Dataset) -> tuple[_SegSegment, ...]:
    """The SEG's Segment Sequence, read from its own attributes."""
    segments = []
    for item in seg.SegmentSequence:
        segments.append(
            _SegSegment(
                number=int(item.SegmentNumber),
                label=str(item.SegmentLabel),
                property_type=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0]),
                property_category=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0]),
                anatomic_regions=tuple(
                    hd.sr.CodedConcept.from_dataset(code) for code in item.get("AnatomicRegionSequence", [])
                ),
            )
        )
    return tuple(segments)


def _matching_label(segment: _SegSegment, labels: Sequence[SegmentLabel], seg_uid: str) -> SegmentLabel:
    """The declared label a SEG segment was built from: same name and same coded property type."""
    matches = [
        label
        for label in labels
        if label.name[:64] == segment.label
        and (label.property_type.value, label.property_type.scheme)
        == (segment.property_type.value, segment.property_type.scheme_designator)
    ]
    if len(matches) != 1:
        raise ValueError(
            f"SEG {seg_uid}: segment {segment.number} ({segment.label!r}, {segment.property_type.meaning}) "
            f"matches {len(matches)} of the segmentation's labels {[label.name for label in labels]}"
        )
    return matches[0]


def _check_seg_source(volume: Volume, seg: Dataset) -> str:
    """The SEG's referenced source series UID; it must be ``volume``'s series in ``volume``'s frame of reference."""
    referenced = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])]
    if referenced != [volume.series_instance_uid]:
        raise ValueError(
            f"SEG {seg.SOPInstanceUID}: references series {referenced}, "
            f"not the volume's series {volume.series_instance_uid}"
        )
    if str(seg.FrameOfReferenceUID) != volume.frame_of_reference_uid:
        raise ValueError(
            f"SEG {seg.SOPInstanceUID}: frame of reference {seg.FrameOfReferenceUID} "
            f"!= volume's {volume.frame_of_reference_uid}"
        )
    return referenced[0]


def _segment_measurements(volume: Volume, measured: SegmentMeasurement) -> list[hd.sr.Measurement]:
    """Volume in mL, and for CT the mean / minimum / maximum attenuation in HU."""
    result = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=measured.volume_ml,
            unit=_ML,
            method=codes.DCM.SumOfSegmentedVoxelMethodForVolume,
        )
    ]
    if volume.modality == "CT":
        statistics = (
            (codes.SCT.Mean, measured.mean),
            (codes.SCT.Minimum, measured.minimum),
            (codes.SCT.Maximum, measured.maximum),
        )
        result.extend(
            hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=value, unit=_HU, derivation=derivation)
            for derivation, value in statistics
            if value is not None  # always, for a segment with voxels
        )
    return result


def _segmentation_groups(volume: Volume, findings: SegmentationFindings, tracker: FindingTracker) -> list[_Group]:
    """One volumetric group per SEG segment, one absent group per declared label without voxels."""
    labels = findings.result.labels
    if not labels:
        raise ValueError(f"segmentation findings of {findings.algorithm.name}: no labels declared")
    measured = {
        m.label_value: m
        for m in measure_segments(volume, findings.result.label_map, [label.value for label in labels])
    }
    present = {value for value, m in measured.items() if m.present}
    seg = findings.seg
    groups: list[_Group] = []
    referenced_values: set[int] = set()
    if seg is not None:
        source_series = _check_seg_source(volume, seg)
        per_slice = slice_label_counts(findings.result.label_map)  # every segment's key slice, in one walk
        for segment in _seg_segments(seg):
            label = _matching_label(segment, labels, str(seg.SOPInstanceUID))
            if label.value not in present:
                raise ValueError(
                    f"SEG {seg.SOPInstanceUID}: segment {segment.number} ({label.name}) has no voxel in the label map"
                )
            referenced_values.add(label.value)
            category = (segment.property_category.value, segment.property_category.scheme_designator)
            sites = (segment.property_type,) if category in _ANATOMY_CATEGORIES else segment.anatomic_regions
            tracking = _tracking(tracker, f"{label.name} (segment {segment.number})", "segment", label.property_type,
                                 label.name)
            outline = _segment_outline_group(volume, findings, label, segment, tracking, measured[label.value],
                                             per_slice)
            if outline is not None:
                groups.append(outline)
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking.item(),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=str(seg.SOPClassUID),
                        sop_instance_uid=str(seg.SOPInstanceUID),
                        segment_number=segment.number,
                        source_series=hd.sr.SourceSeriesForSegmentation(source_series),
                    ),
                    finding_type=segment.property_type,
                    finding_category=segment.property_category,
                    algorithm_id=sr_algorithm_identification(findings.algorithm),
                    finding_sites=[hd.sr.FindingSite(site) for site in sites] or None,
                    measurements=_segment_measurements(volume, measured[label.value]),
                )
            )
    unreferenced = sorted(present - referenced_values)
    if unreferenced:
        where = f"SEG {seg.SOPInstanceUID} has no segment" if seg is not None else "no SEG was given"
        raise ValueError(
            f"segmentation by {findings.algorithm.name}: label values {unreferenced} are present but {where} for them"
        )
    for label in labels:
        if label.value not in present:
            tracking = _tracking(tracker, f"{label.name} (not found)", "absent", label.property_type, label.name)
            groups.append(_absent_group(label, findings.algorithm, tracking))
    return groups


def _segment_title(label: SegmentLabel, measured: SegmentMeasurement, ct: bool) -> str:
    """What a reader sees beside a segment's outline: "<label name>: <volume> mL[, mean <HU> HU]"."""
    name = label.name[:1].upper() + label.name[1:]
    title = f"{name}: {measured.volume_ml:.1f} mL"
    return title + (f", mean {measured.mean:.0f} HU" if ct and measured.mean is not None else "")


def _segment_outline_group(volume: Volume, findings: SegmentationFindings, label: SegmentLabel, segment: _SegSegment,
                           tracking: _Tracking, measured: SegmentMeasurement, per_slice: npt.NDArray[np.int64],
                           ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """A TID 1410 group outlining the segment on the slice where it is largest, titled with its volume (Comment),
    sharing the segment's tracking UID: what a viewer opens the report on and draws (see the module docstring).
    ``per_slice``: the label map's voxels per slice and label (:func:`slice_label_counts`)."""
    outline = key_slice_outline(findings.result.label_map, label.value, per_slice)
    if outline is None:
        return None
    dataset, frame_number = source_image(volume, outline.slice_index)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline.points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(dataset.SOPClassUID),
            referenced_sop_instance_uid=str(dataset.SOPInstanceUID),
            referenced_frame_numbers=[frame_number] if frame_number is not None else None,
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking.item(),
        referenced_region=region,
        finding_type=segment.property_type,
        finding_category=segment.property_category,
        algorithm_id=sr_algorithm_identification(findings.algorithm),
    )
    group[0].ContentSequence.append(_comment(_segment_title(label, measured, volume.modality == "CT")))
    return group


# --- detection -----------------------------------------------------------------------------------------------


def _square(volume: Volume, column: float, row: float, diameter_mm: float) -> npt.NDArray[np.float64]:
    """The closed 5-point polyline of the square of side ``diameter_mm`` around (column, row), in image
    coordinates (column, row): the shape OHIF rehydrates as a rectangle ROI (see the module docstring)."""
    half_columns = diameter_mm / 2.0 / volume.spacing_mm[2]
    half_rows = diameter_mm / 2.0 / volume.spacing_mm[1]
    corners = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0)]
    return np.asarray([(column + dc * half_columns, row + dr * half_rows) for dc, dr in corners], dtype=np.float64)


def _detection_title(detection: Detection) -> str:
    """What a reader sees as a detection's title: "<label name>, <diameter> mm, <score> %", the name's first letter
    in capitals (e.g. "Nodule, 12 mm, 85 %")."""
    name = detection.label.name[:1].upper() + detection.label.name[1:]
    return f"{name}, {detection.diameter_mm:.0f} mm, {detection.score * 100:.0f} %"


def _comment(text: str) -> hd.sr.TextContentItem:
    """A group-level Comment (DCM 121106) TEXT item."""
    return hd.sr.TextContentItem(name=_COMMENT, value=text, relationship_type=_CONTAINS)


def _ellipsoid(detection: Detection) -> npt.NDArray[np.float64]:
    """Six SCOORD3D points: the box's x, y, z extents as axes through the centre, longest axis first."""
    centre = np.asarray(detection.centre_mm, dtype=np.float64)
    order = sorted(range(3), key=lambda axis: -detection.size_mm[axis])
    points = []
    for axis in order:
        half = np.zeros(3)
        half[axis] = detection.size_mm[axis] / 2.0
        points.extend([centre - half, centre + half])
    return np.asarray(points)


def _finding_context(tracking: _Tracking, label: SegmentLabel, algorithm: AlgorithmInfo) -> dict[str, Any]:
    """Keyword arguments every detection group shares; fresh content items for each group (no shared datasets)."""
    return {
        "tracking_identifier": tracking.item(),
        "finding_type": coded(label.property_type),
        "finding_category": coded(label.property_category),
        "algorithm_id": sr_algorithm_identification(algorithm),
    }


def _detection_groups(volume: Volume, findings: DetectionFindings, tracker: FindingTracker) -> list[_Group]:
    """Per detection a planar group (titled square on its centre slice) and a volumetric group (ellipsoid box,
    long axis, certainty)."""
    groups: list[_Group] = []
    for number, detection in enumerate(findings.detections, start=1):
        label = detection.label
        tracking = _tracking(tracker, f"{label.name} {number}", "detection", label.property_type, label.name,
                             detection)
        slice_index = nearest_slice(volume, detection.centre_mm)
        point = image_point(volume, slice_index, detection.centre_mm)
        dataset, frame_number = source_image(volume, slice_index)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_square(volume, point.column, point.row, detection.diameter_mm),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(dataset.SOPClassUID),
                referenced_sop_instance_uid=str(dataset.SOPInstanceUID),
                referenced_frame_numbers=[frame_number] if frame_number is not None else None,
            ),
        )
        planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=region, **_finding_context(tracking, label, findings.algorithm)
        )
        low = is_low_confidence(detection, findings.display_threshold)
        title = _detection_title(detection) + (f" ({LOW_CONFIDENCE_TEXT})" if low else "")
        planar[0].ContentSequence.append(_comment(title))
        intent = rendering_intent(detection, findings.display_threshold)
        groups.append(planar)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_volume_surface=hd.sr.VolumeSurface(
                    graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
                    graphic_data=_ellipsoid(detection),
                    frame_of_reference_uid=volume.frame_of_reference_uid,
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                ),
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.LongAxis, value=detection.diameter_mm, unit=_MM),
                    hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=detection.score * 100.0, unit=_PERCENT),
                ],
                qualitative_evaluations=[intent] if intent is not None else None,
                **_finding_context(tracking, label, findings.algorithm),
            )
        )
    found = {detection.label.value for detection in findings.detections}
    for label in findings.labels:
        if label.value not in found:
            tracking = _tracking(tracker, f"{label.name} (not found)", "absent", label.property_type, label.name)
            groups.append(_absent_group(label, findings.algorithm, tracking))
    return groups


# --- classification ------------------------------------------------------------------------------------------


def _classification_group(
    findings: ClassificationFindings, tracker: FindingTracker
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: question = the winning class, Certainty of Finding in %, each class's probability in %."""
    result = findings.result
    winner = result.winner
    question = coded(winner.property_category)
    tracking = _tracking(tracker, f"{question.meaning}: {winner.name}", "classification", winner.property_category)
    measurements = [hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=result.winner_probability * 100.0,
                                      unit=_PERCENT)]
    for label, probability in zip(result.labels, result.probabilities):
        measurement = hd.sr.Measurement(name=_PROBABILITY, value=probability * 100.0, unit=_PERCENT)
        # Which class the probability is of: a HAS CONCEPT MOD "Finding" = the class's coded value.
        modifier = hd.sr.CodeContentItem(name=codes.DCM.Finding, value=coded(label.property_type),
                                         relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)
        item = measurement[0]  # the template's NUM content item
        if "ContentSequence" not in item:
            item.ContentSequence = []
        item.ContentSequence.append(modifier)
        measurements.append(measurement)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking.item(),
        finding_type=question,
        algorithm_id=sr_algorithm_identification(findings.algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=question, value=coded(winner.property_type))],
        measurements=measurements,
    )
