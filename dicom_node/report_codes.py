"""The codes HL7 and FHIR notifications share: what the report is, and the concepts of its lines.

Why one place: an OBX line and the FHIR Observation of the same fact must carry the same code, so a
system that receives both (or moves from one to the other) matches them. DICOM (DCM), SNOMED CT
(SCT) and LOINC (LN) are the schemes the DICOM results use too; HL7 v2 names them ``DCM``, ``SCT``
and ``LN`` (table 0396), FHIR by the system URIs of :data:`FHIR_SYSTEMS`.
"""

from __future__ import annotations

from dicom_node.contracts import CodedConcept

__all__ = ["ALGORITHM_NAME", "ALGORITHM_VERSION", "COMMENT", "CONCLUSION", "FHIR_SYSTEMS", "FINDING", "FINDING_SITE",
           "REPORT", "STUDY_INSTANCE_UID"]

#: What the report is: LOINC "Diagnostic imaging study" (OBR-4, DiagnosticReport.code).
REPORT = CodedConcept(value="18748-4", scheme="LN", meaning="Diagnostic imaging study")
STUDY_INSTANCE_UID = CodedConcept(value="110180", scheme="DCM", meaning="Study Instance UID")
ALGORITHM_NAME = CodedConcept(value="111001", scheme="DCM", meaning="Algorithm Name")
ALGORITHM_VERSION = CodedConcept(value="111003", scheme="DCM", meaning="Algorithm Version")
CONCLUSION = CodedConcept(value="121077", scheme="DCM", meaning="Conclusion")
COMMENT = CodedConcept(value="121106", scheme="DCM", meaning="Comment")
FINDING = CodedConcept(value="121071", scheme="DCM", meaning="Finding")
FINDING_SITE = CodedConcept(value="363698007", scheme="SCT", meaning="Finding Site")

#: FHIR's system URI of each coding scheme the results use.
FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
}
