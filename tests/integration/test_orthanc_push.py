"""A real Orthanc pushes studies to the node (the node is one of its DICOM modalities).

* The study uploaded to Orthanc over REST and sent with POST /modalities/node/store
  is listed by the node with every instance, becomes ``complete``, is recorded as
  coming from Orthanc's AE title, and each stored dataset is byte-identical to the
  file Orthanc holds (GET /instances/{id}/file).
* With ``dicom.allowed_callers`` = Orthanc's AE bound to 127.0.0.1, another calling AE
  title (Orthanc with a different LocalAet) is rejected, and Orthanc's store call
  answers an HTTP error; Orthanc's own AE from an address outside its binding is
  rejected the same way.
"""

from __future__ import annotations

from typing import Any

import pydicom
import pytest

from peers import NodeProcess, Orthanc, dataset_bytes, split_part10
from training.phantoms.ct_series import GeneratedSeries

pytestmark = pytest.mark.slow


def _upload_study(orthanc: Orthanc, series: GeneratedSeries) -> str:
    """Upload a generated series over REST; returns the Orthanc ID of its study."""
    answers = orthanc.upload_files(series.paths)
    study_ids = {answer["ParentStudy"] for answer in answers}
    assert len(study_ids) == 1, answers
    study_id = study_ids.pop()
    assert orthanc.lookup_study(series.study_uid) == study_id
    assert len(orthanc.study_instances(study_id)) == len(series.paths)
    return study_id


def _associations_from(node: NodeProcess, calling_ae: str) -> list[dict[str, Any]]:
    return [a for a in node.settled_associations() if a["calling_ae_title"] == calling_ae]


def test_orthanc_store_to_node_is_complete_and_byte_identical(
    orthanc: Orthanc, node_process: Any, small_series: GeneratedSeries
) -> None:
    node = node_process()
    orthanc.set_modality("node", node.ae_title, node.port)
    echo = orthanc.echo("node")
    assert echo.ok, echo.text
    study_id = _upload_study(orthanc, small_series)

    response = orthanc.store("node", study_id)
    assert response.ok, f"HTTP {response.status_code}: {response.text}"
    answer = response.json()
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    assert answer.get("InstancesCount", len(small_series.paths)) == len(small_series.paths), answer

    study = node.wait_for_study(small_series.study_uid, state="complete", instances=len(small_series.paths))
    assert study["series"] == 1 and study["modalities"] == ["CT"] and study["late_instances"] == 0

    stores = _associations_from(node, orthanc.aet)
    stores = [a for a in stores if a["instances_stored"] > 0]
    assert len(stores) == 1, node.associations()
    assert stores[0]["instances_stored"] == len(small_series.paths)
    assert stores[0]["instances_failed"] == 0
    assert stores[0]["outcome"] == "released"
    assert stores[0]["called_ae_title"] == node.ae_title
    assert stores[0]["peer_address"] == "127.0.0.1"

    indexed = {row["sop_instance_uid"]: row for row in node.instances()}
    assert set(indexed) == set(small_series.sop_instance_uids)
    assert {row["association_id"] for row in indexed.values()} == {stores[0]["id"]}
    for instance in orthanc.study_instances(study_id):
        held = orthanc.instance_file(instance["ID"])
        held_meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(held), stop_before_pixels=True)
        sop_uid = str(held_meta.SOPInstanceUID)
        row = indexed[sop_uid]
        stored_path = node.spool_file(row["path"])
        stored = pydicom.dcmread(stored_path, stop_before_pixels=True)
        assert stored.file_meta.SourceApplicationEntityTitle.strip() == orthanc.aet
        assert stored.file_meta.TransferSyntaxUID == held_meta.file_meta.TransferSyntaxUID == row["transfer_syntax_uid"]
        assert dataset_bytes(stored_path) == split_part10(held)[1], f"{sop_uid}: stored dataset differs from Orthanc's"


def test_allowed_callers_admit_orthanc_and_reject_another_ae_title(
    orthanc: Orthanc, node_process: Any, second_series: GeneratedSeries
) -> None:
    node = node_process({"dicom.allowed_callers": [{"ae_title": orthanc.aet, "hosts": ["127.0.0.1"]}]})
    orthanc.set_modality("node", node.ae_title, node.port)
    orthanc.set_modality("node-as-intruder", node.ae_title, node.port, LocalAet="INTRUDER")
    study_id = _upload_study(orthanc, second_series)

    refused = orthanc.store("node-as-intruder", study_id)
    assert not refused.ok, f"a store from an AE title outside the allow-list succeeded: {refused.text}"
    assert refused.status_code >= 400
    assert node.study(second_series.study_uid) is None
    intruder = _associations_from(node, "INTRUDER")
    assert len(intruder) >= 1, node.associations()
    assert all(a["outcome"] == "rejected" and a["instances_stored"] == 0 for a in intruder), intruder
    assert "not in the allow-list" in intruder[0]["reject_reason"]
    assert "rejected association from INTRUDER" in node.log_text()

    response = orthanc.store("node", study_id)
    assert response.ok, f"HTTP {response.status_code}: {response.text}"
    node.wait_for_study(second_series.study_uid, state="complete", instances=len(second_series.paths))
    admitted = [a for a in _associations_from(node, orthanc.aet) if a["instances_stored"]]
    assert len(admitted) == 1 and admitted[0]["instances_stored"] == len(second_series.paths)
    assert all(row["study_instance_uid"] == second_series.study_uid for row in node.instances())


def test_allowed_caller_from_an_address_outside_its_hosts_is_rejected(
    orthanc: Orthanc, node_process: Any, second_series: GeneratedSeries
) -> None:
    node = node_process({"dicom.allowed_callers": [{"ae_title": orthanc.aet, "hosts": ["192.0.2.0/24"]}]})
    orthanc.set_modality("node", node.ae_title, node.port)
    study_id = _upload_study(orthanc, second_series)

    refused = orthanc.store("node", study_id)
    assert not refused.ok, f"a store from an address outside the caller's hosts succeeded: {refused.text}"
    assert node.studies() == []
    records = _associations_from(node, orthanc.aet)
    assert records and all(a["outcome"] == "rejected" for a in records), node.associations()
    assert "not allowed from address 127.0.0.1" in records[0]["reject_reason"]
    assert node.is_running()
