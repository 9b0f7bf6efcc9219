"""QIDO-RS matching as PS3.4 C.2.2.2 describes it, on SQLite and PostgreSQL alike: ``*`` and ``?`` wildcards
(case-insensitive for PatientName only), SQL's own wildcard characters matched literally, StudyDate ranges,
ModalitiesInStudy, UID lists, ``includefield``, ``fuzzymatching``, and bounded values (400 past the bounds).

The studies are generated CT series received through the node's ingest path; one has a second series whose
Modality is MR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.web.routes.dicomweb import BASE
from tests.web.conftest import WebEnv, make_web_env
from tests.web.studies_fixtures import T0, ingest, write_study

#: (patient ID, patient name, accession, study date, description) of each study
STUDIES = [
    ("P1A", "DOE^JOHN", "ACC1", "20260101", "CT CHEST"),
    ("P%1", "Doe^Jane", "ACC2", "20260115", "CT ABDOMEN"),
    ("P_2", "ROE^RICHARD", "ACC3", "20260201", "CHEST LOW DOSE"),
    ("PX2", "O'NEIL^ANN", "X_1", "20251231", "ct chest"),
    ("p1b", "SMITH^P%", "X%1", "20260131", "HEAD"),
    ("A[1]", "LEE^[BRACKET]", "B[1]", "", "CT [CHEST]"),
]


@pytest.fixture
def catalogue(database_url: str, tmp_path: Path) -> tuple[WebEnv, dict[str, str]]:
    """The studies of STUDIES, received; returns the app and patient ID -> Study Instance UID."""
    web = make_web_env(tmp_path / "node", database_url=database_url)
    uids = {}
    for seed, (pid, name, accession, date, description) in enumerate(STUDIES, start=1):
        paths = write_study(tmp_path / f"in-{seed}", seed=seed, patient_id=pid, patient_name=name,
                            accession=accession, study_date=date or "20260101", description=description)
        if not date:  # a study without a date
            for path in paths:
                ds = pydicom.dcmread(path)
                del ds.StudyDate
                ds.save_as(path)
        if pid == "P_2":  # a second series, MR
            series = generate_uid()
            for path in paths[:2]:
                ds = pydicom.dcmread(path)
                ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "MR", series, generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(tmp_path / f"mr-{path.name}")
            paths += [tmp_path / f"mr-{p.name}" for p in paths[:2]]
        ingest(web, paths, calling_ae="PACS", at=T0)
        uids[pid] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return web, uids


def _get(web: WebEnv, path: str, **params: Any) -> httpx.Response:
    return web.client().get(f"{BASE}{path}", params=params,
                            headers={"Authorization": f"Bearer {web.token('viewer')}"})


def _patients(web: WebEnv, **params: Any) -> list[str]:
    answer = _get(web, "/studies", **params)
    assert answer.status_code == 200, answer.text
    return sorted(s["00100020"]["Value"][0] for s in answer.json())


def test_wildcards_match_as_ps3_4_says(catalogue: tuple[WebEnv, dict[str, str]]) -> None:
    web, _ = catalogue
    everyone = sorted(pid for pid, *_ in STUDIES)
    assert _patients(web, PatientID="*") == everyone == _patients(web)
    assert _patients(web, PatientID="P1*") == ["P1A"]  # case-sensitive: not p1b
    assert _patients(web, PatientID="P%*") == ["P%1"]  # % matches itself only
    assert _patients(web, PatientID="P_*") == ["P_2"]  # _ matches itself only
    assert _patients(web, PatientID="P?2") == ["PX2", "P_2"]
    assert _patients(web, PatientID="P%1") == ["P%1"] and _patients(web, PatientID="P1") == []
    assert _patients(web, PatientID="A[*") == ["A[1]"] and _patients(web, PatientID="A[1]") == ["A[1]"]
    assert _patients(web, PatientName="doe^*") == ["P%1", "P1A"]  # names: any case
    assert _patients(web, PatientName="DOE^JANE") == ["P%1"]
    assert _patients(web, PatientName="*^?a*") == ["P%1"]  # Doe^Jane (not O'NEIL^ANN: one letter before a)
    assert _patients(web, PatientName="O'NEIL*") == ["PX2"]
    assert _patients(web, PatientName="*P%") == ["p1b"] and _patients(web, PatientName="*[B*") == ["A[1]"]
    assert _patients(web, AccessionNumber="X_?") == ["PX2"] and _patients(web, AccessionNumber="ACC?") == [
        "P%1", "P1A", "P_2"]
    assert _patients(web, StudyDescription="CT*") == ["A[1]", "P%1", "P1A"]  # not "ct chest"
    assert _patients(web, StudyDescription="*CHEST*") == ["A[1]", "P1A", "P_2"]
    assert _patients(web, StudyDescription="CT [CHEST]") == ["A[1]"]
    assert _patients(web, **{"00100010": "doe*", "00081030": "CT A*"}) == ["P%1"]  # by tag, both keys


def test_dates_modalities_and_uid_lists(catalogue: tuple[WebEnv, dict[str, str]]) -> None:
    web, uids = catalogue
    assert _patients(web, StudyDate="20260101-20260131") == ["P%1", "P1A", "p1b"]  # A[1] has no date
    assert _patients(web, StudyDate="-20251231") == ["PX2"]
    assert _patients(web, StudyDate="20260131-") == ["P_2", "p1b"]
    assert _patients(web, StudyDate="20260115") == ["P%1"]
    assert _patients(web, ModalitiesInStudy="MR") == ["P_2"]
    assert _patients(web, **{"00080061": "MR,CT"}) == sorted(pid for pid, *_ in STUDIES)
    assert _patients(web, StudyInstanceUID=f"{uids['P1A']},{uids['p1b']}") == ["P1A", "p1b"]
    assert _patients(web, StudyInstanceUID=uids["P1A"] + "\\" + uids["PX2"]) == ["P1A", "PX2"]
    [study] = _get(web, "/studies", PatientID="P_2").json()
    assert study["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]} and study["00201206"]["Value"] == [2]
    assert study["00201208"]["Value"] == [6] and "00080056" not in study
    mr = _get(web, "/series", Modality="MR").json()
    assert [s["0020000D"]["Value"][0] for s in mr] == [uids["P_2"]] and mr[0]["00201209"]["Value"] == [2]
    assert _get(web, f"/studies/{uids['P_2']}/series", Modality="CT,MR").status_code == 200
    assert len(_get(web, f"/studies/{uids['P_2']}/series").json()) == 2
    assert _get(web, f"/studies/{uids['P1A']}/series", StudyInstanceUID=uids["P_2"]).json() == []


def test_includefield_and_fuzzymatching(catalogue: tuple[WebEnv, dict[str, str]]) -> None:
    web, uids = catalogue
    [study] = _get(web, "/studies", PatientID="P1A", includefield="InstanceAvailability").json()
    assert study["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
    [study] = _get(web, "/studies", PatientID="P1A", includefield="00080056,StudyDescription").json()
    assert "00080056" in study
    series = _get(web, "/series", PatientID="P1A").json()
    assert "00100010" not in series[0] and "00180015" not in series[0]
    series = _get(web, "/series", PatientID="P1A", includefield=["PatientName", "00180015"]).json()
    assert series[0]["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]} and "00180015" in series[0]
    every = _get(web, "/series", PatientID="P1A", includefield="all").json()[0]
    assert {"00100010", "00100020", "00080050", "00080020", "00081030", "00180015"} <= set(every)
    assert _get(web, "/studies", includefield="StudyTime").status_code == 200  # known, not held: left out
    refused = _get(web, "/studies", includefield="NoSuchKeyword")
    assert refused.status_code == 400 and "includefield 'NoSuchKeyword'" in refused.json()["detail"]

    plain = _get(web, "/studies", PatientID="P1A", fuzzymatching="false")
    assert plain.status_code == 200 and "warning" not in plain.headers
    fuzzy = _get(web, "/studies", PatientName="doe^john", fuzzymatching="true")
    assert [s["00100020"]["Value"][0] for s in fuzzy.json()] == ["P1A"]
    assert fuzzy.headers["warning"].startswith('299 dicom-node "The fuzzymatching parameter is not supported')
    ignored = _get(web, "/studies", PatientID="P1A", StudyTime="1200")
    assert ignored.status_code == 200 and "cannot match on StudyTime" in ignored.headers["warning"]
    assert _get(web, "/studies", fuzzymatching="maybe").status_code == 400


@pytest.mark.parametrize(("params", "message"), [
    ({"PatientName": "*a*b*c*d*e*f*g*h*i*"}, "10 '*' wildcards; at most 8"),
    ({"PatientID": "P" * 65}, "65 characters long; at most 64"),
    ({"PatientName": "N" * 325}, "325 characters long; at most 324"),
    ({"PatientID": "A\\B"}, "a control character or a backslash"),
    ({"StudyDate": "2026-01-01"}, "is not a date YYYYMMDD"),
    ({"StudyDate": "-"}, "names no date"),
    ({"StudyInstanceUID": ",".join(f"1.2.{n}" for n in range(101))}, "lists 101 UIDs; at most 100"),
    ({"StudyInstanceUID": "1.2.3 4"}, "holds characters that no UID can"),
    ({"PatientID": ["A", "B"]}, "PatientID is given twice"),
])
def test_unbounded_or_malformed_values_are_refused(tmp_path: Path, params: dict[str, Any], message: str) -> None:
    web = make_web_env(tmp_path)
    answer = _get(web, "/studies", **params)
    assert answer.status_code == 400 and message in answer.json()["detail"], answer.text
