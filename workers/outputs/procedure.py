"""The imaging procedure a report is about: TID 1500 "Procedure reported" from the source study.

Why: the SR's root says which imaging procedure it reports on (IHE AIR: the
procedure of the source study). A lung-nodule report on a CT head, or on an MR,
must not say "CT Chest". In order of trust:

1. the source's own coded procedure: Procedure Code Sequence (0008,1032), else
   the Requested Procedure Code Sequence (0032,1064) at top level or in the
   Request Attributes Sequence (0040,0275) - what the RIS ordered and the modality
   performed, copied, never retyped;
2. else the modality and the body region the header names (BodyPartExamined,
   descriptions: :func:`dicom_node.model_domain.header_regions`), coded from LOINC
   (CID 100 "Quantitative Diagnostic Imaging Procedures", the codes of the LOINC/RSNA
   Radiology Playbook): CT Chest, CT Head, MR Brain;
3. else the modality with an unspecified body region (LOINC "CT unspecified body
   region", "MR unspecified body region"), or SNOMED CT "Imaging" for any other
   modality.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicom_node.contracts import CodedConcept
from dicom_node.model_domain import SynonymTable, header_regions
from workers.applicability import volume_header_facts
from workers.volume import Volume

__all__ = ["CT_CHEST", "procedure_reported", "source_procedure"]

logger = logging.getLogger(__name__)

#: LOINC 24627-2 "CT Chest".
CT_CHEST = CodedConcept(value="24627-2", scheme="LN", meaning="CT Chest")
#: Procedure by modality and the one body region the header names.
_BY_REGION: dict[tuple[str, str], CodedConcept] = {
    ("CT", "chest"): CT_CHEST,
    ("CT", "head"): CodedConcept(value="24725-4", scheme="LN", meaning="CT Head"),
    ("MR", "head"): CodedConcept(value="24590-2", scheme="LN", meaning="MR Brain"),
}
#: Procedure by modality when the region is unknown or several.
_BY_MODALITY: dict[str, CodedConcept] = {
    "CT": CodedConcept(value="25045-6", scheme="LN", meaning="CT unspecified body region"),
    "MR": CodedConcept(value="25056-3", scheme="LN", meaning="MR unspecified body region"),
}
#: SNOMED CT 363679005 "Imaging" (procedure): any other modality.
_IMAGING = CodedConcept(value="363679005", scheme="SCT", meaning="Imaging")


def _first_code(sequence: object) -> CodedConcept | None:
    """The first usable code item of a code sequence (CodeValue or LongCodeValue, scheme, meaning)."""
    for item in sequence or []:  # type: ignore[attr-defined]
        value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
        try:
            return CodedConcept(value=str(value or ""), scheme=str(item.get("CodingSchemeDesignator", "")),
                                meaning=str(item.get("CodeMeaning", "")))
        except ValidationError:
            logger.debug("procedure code item %r is incomplete; not used", item)
    return None


def source_procedure(source: Dataset) -> CodedConcept | None:
    """The coded procedure the source instance names itself (see the module docstring, 1.), or None."""
    for sequence in (source.get("ProcedureCodeSequence"), source.get("RequestedProcedureCodeSequence")):
        code = _first_code(sequence)
        if code is not None:
            return code
    for request in source.get("RequestAttributesSequence") or []:
        code = _first_code(request.get("RequestedProcedureCodeSequence"))
        if code is not None:
            return code
    return None


def procedure_reported(volume: Volume, synonyms: SynonymTable | None = None) -> CodedConcept:
    """The procedure ``volume``'s source study reports (see the module docstring for the order)."""
    coded = source_procedure(volume.datasets[0])
    if coded is not None:
        return coded
    modality = volume.modality.upper()
    regions = header_regions(volume_header_facts(volume), synonyms).regions
    if len(regions) == 1 and (modality, regions[0]) in _BY_REGION:
        return _BY_REGION[(modality, regions[0])]
    return _BY_MODALITY.get(modality, _IMAGING)
