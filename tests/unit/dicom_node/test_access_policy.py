"""The association access decision: called AE, calling AE allow-list bound to addresses, limits."""

from __future__ import annotations

from dicom_node.access import AccessPolicy, Rejection
from dicom_node.settings import DicomSettings


def policy(**values: object) -> AccessPolicy:
    return AccessPolicy(DicomSettings.model_validate(values))


def test_open_node_accepts_any_calling_ae_but_checks_the_called_one() -> None:
    node = policy(ae_title="NODE")
    assert node.open_to_any_caller
    assert node.decide("ANYONE", "NODE", "10.0.0.1", 0).rejection is None
    wrong = node.decide("ANYONE", "OTHER", "10.0.0.1", 0)
    assert wrong.rejection is Rejection.CALLED_AE_NOT_RECOGNIZED
    assert "OTHER" in (wrong.reason or "")


def test_called_ae_check_can_be_turned_off() -> None:
    assert policy(ae_title="NODE", require_called_ae_title=False).decide("X", "OTHER", "::1", 0).rejection is None


def test_allow_list_with_and_without_address_binding() -> None:
    node = policy(
        ae_title="NODE",
        allowed_callers=[
            {"ae_title": "PACS", "hosts": ["192.168.10.0/24", "10.1.1.5"]},
            {"ae_title": "MODALITY"},
        ],
    )
    assert node.decide("PACS", "NODE", "192.168.10.77", 0).rejection is None
    assert node.decide("PACS", "NODE", "10.1.1.5", 0).rejection is None
    assert node.decide("PACS", "NODE", "::ffff:10.1.1.5", 0).rejection is None
    elsewhere = node.decide("PACS", "NODE", "10.1.1.6", 0)
    assert elsewhere.rejection is Rejection.CALLING_AE_NOT_RECOGNIZED
    assert "10.1.1.6" in (elsewhere.reason or "")
    assert node.decide("MODALITY", "NODE", "172.16.0.9", 0).rejection is None
    unknown = node.decide("INTRUDER", "NODE", "192.168.10.77", 0)
    assert unknown.rejection is Rejection.CALLING_AE_NOT_RECOGNIZED
    assert "INTRUDER" in (unknown.reason or "")


def test_association_limit_is_transient_local_limit_exceeded() -> None:
    node = policy(ae_title="NODE", max_associations=2)
    assert node.decide("A", "NODE", "127.0.0.1", 1).rejection is None
    full = node.decide("A", "NODE", "127.0.0.1", 2)
    assert full.rejection is Rejection.LOCAL_LIMIT_EXCEEDED
    assert full.rejection.result_source_reason == (0x02, 0x03, 0x02)
