"""Routing facts read from received headers: slice counts of multi-frame series, and the header facts
the applicability check reads (issue 21: an enhanced multi-frame CT is one instance of many slices)."""

from __future__ import annotations

from copy import deepcopy
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import highdicom
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db.models import Study
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.header import InstanceHeader
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.model_domain import HeaderFacts, InputDomain, NumberRange, decide
from dicom_node.routing import SeriesFacts, StudyFacts, default_rules, evaluate, header_facts
from dicom_node.study_facts import study_facts
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
SLICES = 24


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """The chest phantom as a classic single-frame CT series (24 slices, 5.5 mm pixels, 5 mm apart)."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(SLICES, 64, 64), spacing_mm=(5.0, 5.5, 5.5)), seed=1)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("phantom") / "case", seed=1)
    return [pydicom.dcmread(path) for path in sorted(series_dir.glob("*.dcm"))]


def enhanced(legacy: Sequence[Dataset], *, study_uid: str, series_uid: str, number: int = 1) -> Dataset:
    """``legacy`` as one enhanced multi-frame CT instance of series ``series_uid`` in study ``study_uid``."""
    converted = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=list(legacy), series_instance_uid=series_uid, series_number=7,
        sop_instance_uid=generate_uid(), instance_number=number)
    converted.StudyInstanceUID = study_uid
    converted.BodyPartExamined = "CHEST"  # highdicom moves it into the frame anatomy; keep it where routing reads it
    return converted


class Spool:
    """A fresh node database and spool folder into which tests put studies, as the receiver files them."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.dir = root / "spool"
        self.engine = make_engine(f"sqlite:///{root / 'node.db'}")
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.indexer = InstanceIndexer(self.engine, reopen_on_late_instances=True)

    def add(self, datasets: Sequence[Dataset]) -> None:
        for ds in datasets:
            relative = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            path = self.dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            header = InstanceHeader(
                str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(ds.PatientID), str(ds.PatientName), None, str(ds.StudyDate), ds.get("StudyDescription"),
                str(ds.Modality), int(ds.SeriesNumber), ds.get("SeriesDescription"), ds.get("BodyPartExamined"),
                int(ds.InstanceNumber))
            self.indexer.index(IndexRecord(header, str(ds.file_meta.TransferSyntaxUID), relative,
                                           path.stat().st_size, T0, None))

    def facts(self, study_uid: str) -> StudyFacts:
        with self.sessions() as session:
            study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == study_uid)).one()
        return study_facts(self.sessions, self.dir, study_id)

    def close(self) -> None:
        self.indexer.stop()
        self.engine.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    store = Spool(tmp_path / "node")
    yield store  # type: ignore[misc]
    store.close()


def only_series(facts: StudyFacts) -> SeriesFacts:
    [series] = facts.series
    return series


def test_an_enhanced_multi_frame_ct_counts_its_frames_as_slices_and_the_default_rule_routes_it(
        spool: Spool, classic: list[Dataset]) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    spool.add([enhanced(classic, study_uid=study_uid, series_uid=series_uid)])
    facts = spool.facts(study_uid)
    series = only_series(facts)
    assert (series.instance_count, series.slice_count) == (1, SLICES)
    decision = evaluate(default_rules(), facts)
    assert {(job.pipeline, job.series_instance_uid) for job in decision.jobs} == {
        ("chest-ct-segmentation", series_uid), ("lung-nodule-detection", series_uid)}
    assert f"slice_count {SLICES} is >= 10" in " ".join(decision.outcomes[0].reasons)


def test_a_series_of_several_multi_frame_instances_sums_their_frames(spool: Spool, classic: list[Dataset]) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    spool.add([enhanced(classic[:10], study_uid=study_uid, series_uid=series_uid, number=1),
               enhanced(classic[10:], study_uid=study_uid, series_uid=series_uid, number=2)])
    series = only_series(spool.facts(study_uid))
    assert (series.instance_count, series.slice_count) == (2, SLICES)


def test_a_single_frame_series_counts_one_slice_per_instance(spool: Spool, classic: list[Dataset]) -> None:
    spool.add(classic[:9])  # a 9-image scout-like series: not enough for the default rule
    facts = spool.facts(str(classic[0].StudyInstanceUID))
    series = only_series(facts)
    assert (series.instance_count, series.slice_count) == (9, 9)
    decision = evaluate(default_rules(), facts)
    assert decision.jobs == () and "slice_count 9 is not >= 10" in (decision.ignored_reason or "")


def test_header_facts_are_the_same_for_the_classic_and_the_enhanced_series(
        spool: Spool, classic: list[Dataset]) -> None:
    spool.add(classic)
    study_uid = generate_uid()
    spool.add([enhanced(classic, study_uid=study_uid, series_uid=generate_uid())])
    classic_study, enhanced_study = spool.facts(str(classic[0].StudyInstanceUID)), spool.facts(study_uid)
    expected = HeaderFacts(
        modality="CT", body_part_examined="CHEST", study_description="Synthetic chest CT",
        series_description="Synthetic chest CT phantom", protocol_name=None, slices=SLICES, pixel_spacing_mm=5.5,
        slice_spacing_mm=5.0, slice_thickness_mm=5.0, orientation="axial", contrast_agent=None)
    assert header_facts(classic_study, only_series(classic_study)) == expected
    assert header_facts(enhanced_study, only_series(enhanced_study)) == expected.model_copy(
        update={"series_description": "Synthetic chest CT phantom (enhanced conversion)"})
    chest = InputDomain(modalities=("CT",), body_regions=("chest",), slices=NumberRange(min=10),
                        pixel_spacing_mm=NumberRange(max=6.0), orientations=("axial",))
    assert decide("chest-model", chest, header_facts(enhanced_study, only_series(enhanced_study))).applies
    head = chest.model_copy(update={"body_regions": ("head",)})
    assert decide("head-model", head, header_facts(enhanced_study, only_series(enhanced_study))).reason_code \
        == "body-region"


def test_protocol_spacing_and_contrast_come_from_the_header(spool: Spool, classic: list[Dataset]) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    copies = []
    for ds in classic[:12]:
        copy = deepcopy(ds)
        copy.StudyInstanceUID, copy.SeriesInstanceUID, copy.SOPInstanceUID = study_uid, series_uid, generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        copy.ProtocolName = "THORAX KM"
        copy.PixelSpacing = [0.7, 0.68]
        copy.ContrastBolusAgent = "Omnipaque 350"
        copies.append(copy)
    spool.add(copies)
    series = only_series(spool.facts(study_uid))
    assert (series.protocol_name, series.pixel_spacing_mm, series.contrast_agent) == ("THORAX KM", 0.68, "Omnipaque 350")
    with_contrast = InputDomain(contrast="with")
    facts = spool.facts(study_uid)
    assert decide("m", with_contrast, header_facts(facts, series)).applies


@pytest.mark.parametrize(("administered", "expected"), [("YES", "Iohexol"), ("NO", None), (None, "Iohexol")])
def test_an_enhanced_ct_names_its_contrast_agent_from_the_agent_sequence_unless_not_administered(
        spool: Spool, classic: list[Dataset], administered: str | None, expected: str | None) -> None:
    study_uid = generate_uid()
    converted = enhanced(classic, study_uid=study_uid, series_uid=generate_uid())
    agent = Dataset()
    agent.CodeValue, agent.CodingSchemeDesignator, agent.CodeMeaning = "C-B0322", "SRT", "Iohexol"
    agent.ContrastBolusAgentNumber = 1
    converted.ContrastBolusAgentSequence = DicomSequence([agent])
    if administered is not None:
        usage = Dataset()
        usage.ContrastBolusAgentNumber = 1
        usage.ContrastBolusAgentAdministered = administered
        converted.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = DicomSequence([usage])
    spool.add([converted])
    assert only_series(spool.facts(study_uid)).contrast_agent == expected


def test_a_classic_none_agent_means_no_contrast(spool: Spool, classic: list[Dataset]) -> None:
    copies = []
    for ds in classic[:10]:
        copy = deepcopy(ds)
        copy.ContrastBolusAgent = "NONE"
        copies.append(copy)
    spool.add(copies)
    assert only_series(spool.facts(str(classic[0].StudyInstanceUID))).contrast_agent is None


def test_series_facts_without_a_slice_count_are_single_frame() -> None:
    assert SeriesFacts(series_instance_uid="1.2.3", instance_count=40).slice_count == 40
    assert SeriesFacts(series_instance_uid="1.2.3", instance_count=1, slice_count=108).slice_count == 108
