"""The "AI analysis not performed" SR: a radiologist learns that AI looked at the study and declined, and why.

Why: when a model is not made for a study (a head CT sent to a chest model) or its
result was held as implausible, silence in the PACS reads like "AI found nothing".
Destinations that ask for it (``not_performed: sr``) receive this short Comprehensive
3D SR instead: a TID 1500 measurement report whose one measurement group (TID 1501)
identifies the model (TID 4019 algorithm identification), states the finding "AI
analysis not performed" with the coded reason as its qualitative evaluation, and the
readable reason as a comment. The codes are this node's own (private coding scheme
``99DCMNODE``: the standard has none for this); their meanings are fixed per code.

Pure: no I/O; patient and study attributes are copied by highdicom from the source
images (the evidence).
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.contracts import AlgorithmInfo
from workers.outputs.common import SeriesIdentity, coded
from workers.outputs.procedure import procedure_reported
from workers.outputs.sr import comprehensive_3d_sr, device_observation_context, sr_algorithm_identification
from workers.volume import Volume

__all__ = ["NOT_PERFORMED", "REASON_CODES", "build_not_performed_sr"]

logger = logging.getLogger(__name__)

SCHEME = "99DCMNODE"
#: The finding of the notice's measurement group.
NOT_PERFORMED = hd.sr.CodedConcept(value="AINP", scheme_designator=SCHEME, meaning="AI analysis not performed")
_REASON = hd.sr.CodedConcept(value="AINPR", scheme_designator=SCHEME, meaning="Reason AI analysis not performed")
#: Reason codes: the applicability check's reason codes, and "implausible" for held results.
REASON_CODES: dict[str, hd.sr.CodedConcept] = {
    code: hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)
    for code, value, meaning in (
        ("modality", "AINP-MOD", "Modality not supported by the model"),
        ("body-region", "AINP-REG", "Body region not supported by the model"),
        ("coverage", "AINP-COV", "Anatomy not wholly in the field of view"),
        ("slices", "AINP-SLC", "Number of slices outside the model's range"),
        ("spacing", "AINP-SPC", "Voxel spacing outside the model's range"),
        ("thickness", "AINP-THK", "Slice thickness outside the model's range"),
        ("orientation", "AINP-ORI", "Image orientation not supported by the model"),
        ("contrast", "AINP-CON", "Contrast phase not supported by the model"),
        ("implausible", "AINP-IMP", "Result implausible, held for review"),
    )
}
_COMMENT = hd.sr.CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")


def build_not_performed_sr(
    volume: Volume, algorithm: AlgorithmInfo, reason_code: str, reason: str, series: SeriesIdentity,
) -> hd.sr.Comprehensive3DSR:
    """The notice for ``volume``'s series: ``algorithm`` did not report on it because of ``reason_code``/``reason``.

    Raises ValueError for an unknown ``reason_code`` (one of :data:`REASON_CODES`).
    """
    if reason_code not in REASON_CODES:
        raise ValueError(f"reason_code {reason_code!r} is not one of {', '.join(REASON_CODES)}")
    sop_instance_uid = series.sop_uid()
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{algorithm.model_id} not performed"[:64]),
        finding_type=NOT_PERFORMED,
        algorithm_id=sr_algorithm_identification(algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_REASON, value=REASON_CODES[reason_code])],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=_COMMENT, value=reason[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(series),
        procedure_reported=coded(procedure_reported(volume)),  # the source study's, as in every report
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = comprehensive_3d_sr(list(volume.datasets), report, series, sop_instance_uid, algorithms=[algorithm])
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "DICOM AI node: reasons AI analysis was not performed"
    scheme.CodingSchemeResponsibleOrganization = series.manufacturer
    sr.CodingSchemeIdentificationSequence = [scheme]  # SOP Common: declares the private coding scheme
    logger.debug("not-performed SR %s for series %s (%s)", sop_instance_uid, volume.series_instance_uid, reason_code)
    return sr

