"""Two real studies stored over DICOM that share a Series Instance UID (issue 20, item 6), SQLite and PostgreSQL.

Study A (patient P1, series S), then study B (patient P2, the same S). Before the fix B
ended "ignored: the study has no series" and A's series held the files of two
patients. Now both studies are complete and routed on their own series, each series
holds only its own patient's files, and both timelines warn naming the other study.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db import repo
from dicom_node.db.models import Job, Series, Study
from dicom_node.db.uid_reuse import SERIES_UID_REUSED, SOP_INSTANCE_UID_REUSED
from dicom_node.app.node import Node
from dicom_node.study_store import FileStudyStore
from peers import wait_for
from tests.conftest import NodeFactory
from tests.integration.store_scu import store_all
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

SERIES_UID = "1.2.826.0.1.3680043.8.498.20.6"


def study(tmp_path: Path, name: str, patient: str, seed: int, slices: int = 10) -> GeneratedSeries:
    return generate_ct_series(tmp_path / name, geometry=SeriesGeometry(rows=32, columns=32, slices=slices), seed=seed,
                              patient_id=patient, patient_name=f"Doe^{patient}", series_uid=SERIES_UID)


def send(node: Node, items: GeneratedSeries, *, fresh_sop_uids: bool) -> None:
    """C-STORE the series; ``fresh_sop_uids`` gives each instance a SOP Instance UID of its own."""
    datasets = [pydicom.dcmread(path) for path in items.paths]
    if fresh_sop_uids:
        for ds in datasets:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[items.study_uid, str(ds.SOPInstanceUID)])
    store_all(node, datasets)


def state(node: Node, study_uid: str) -> str | None:
    return {s.study_instance_uid: s.state for s in repo.list_studies(node.sessions)}.get(study_uid)


def warnings(node: Node, study_uid: str, kind: str) -> list[str]:
    return [detail or "" for _, k, detail in repo.study_events(node.sessions, study_uid) if k == kind]


def test_two_studies_sharing_a_series_uid_are_both_filed_and_routed_on_their_own(
    database_url: str, node_factory: NodeFactory, tmp_path: Path  # the database outlives the node
) -> None:
    node = node_factory(database_url=database_url, **{"queue.sweep_interval_seconds": 0.2})
    first, second = study(tmp_path, "a", "P1", 61), study(tmp_path, "b", "P2", 62)
    assert first.study_uid != second.study_uid and first.series_uid == second.series_uid == SERIES_UID

    send(node, first, fresh_sop_uids=False)
    wait_for("study A routed", lambda: state(node, first.study_uid) == "routed")
    send(node, second, fresh_sop_uids=True)
    wait_for("study B routed", lambda: state(node, second.study_uid) in ("routed", "ignored"))
    assert state(node, second.study_uid) == "routed", repo.study_events(node.sessions, second.study_uid)

    with node.sessions() as session:
        series = session.execute(select(Study.study_instance_uid, Series.instance_count).join(
            Series, Series.study_id == Study.id).where(Series.series_instance_uid == SERIES_UID)).all()
        routed = session.execute(select(Study.study_instance_uid, Job.series_instance_uid).join(
            Job, Job.study_id == Study.id)).all()
    assert sorted(series) == sorted([(first.study_uid, 10), (second.study_uid, 10)])
    assert sorted(routed) == sorted([(first.study_uid, SERIES_UID)] * 2 + [(second.study_uid, SERIES_UID)] * 2)

    store = FileStudyStore(node.sessions, node.settings.spool_dir)
    for items, patient in ((first, "P1"), (second, "P2")):
        files = store.series_files(SERIES_UID, study_instance_uid=items.study_uid)
        assert len(files) == 10
        assert {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in files} == {patient}

    [on_a] = warnings(node, first.study_uid, SERIES_UID_REUSED)
    [on_b] = warnings(node, second.study_uid, SERIES_UID_REUSED)
    assert f"also used by study {second.study_uid}" in on_a and f"also used by study {first.study_uid}" in on_b


def test_a_sop_instance_uid_sent_again_for_another_study_is_not_misfiled_and_is_recorded(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    first, second = study(tmp_path, "a", "P1", 63, slices=3), study(tmp_path, "b", "P2", 64, slices=3)
    assert first.sop_instance_uids == second.sop_instance_uids  # same series UID: the generator's SOP UIDs repeat
    send(node, first, fresh_sop_uids=False)
    send(node, second, fresh_sop_uids=False)  # every instance claims study B with a UID that study A holds

    wait_for("study A complete", lambda: state(node, first.study_uid) in ("routed", "ignored"))
    [summary] = repo.list_studies(node.sessions)  # B's copies were discarded, not filed into A
    assert summary.study_instance_uid == first.study_uid and summary.instance_count == 3
    for sop in first.sop_instance_uids:
        kept = repo.find_instance(node.sessions, sop)
        assert kept is not None and pydicom.dcmread(node.spool.absolute(kept.path)).PatientID == "P1"
    [warning] = warnings(node, first.study_uid, SOP_INSTANCE_UID_REUSED)
    assert f"was sent again for study {second.study_uid}; that copy was discarded" in warning
