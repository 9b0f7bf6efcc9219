"""Routing rules in the web UI and the API: CRUD, validation placed at the field, order, enable/disable,
and the rule tester against a study received through the node's real ingest path."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import highdicom
import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from dicom_node.conductor import decide
from dicom_node.db import audit, config_repo, repo
from dicom_node.indexer import InstanceIndexer
from dicom_node.ingest import IngestService, StoreRequest
from dicom_node.routing import Rule, evaluate
from dicom_node.spool import Spool
from dicom_node.study_facts import study_facts
from tests.integration.peers import split_part10
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

# --------------------------------------------------------------------------- helpers shared with test_destinations


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""
    classes: set[str] = field(default_factory=set)


class _Index(HTMLParser):
    """Every element with an id: its tag, attributes and text (nested text included)."""

    _VOID = {"input", "br", "img", "meta", "link", "hr", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, Element] = {}
        self._open: list[tuple[str, Element | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        element = Element(tag, values, classes=set(values.get("class", "").split())) if "id" in values else None
        if element is not None:
            assert values["id"] not in self.by_id, f"duplicate id {values['id']!r}"
            self.by_id[values["id"]] = element
        if tag not in self._VOID:
            self._open.append((tag, element))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            name, _ = self._open.pop()
            if name == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            if element is not None:
                element.text += data


def page(text: str) -> dict[str, Element]:
    """The page's elements by id (fails on duplicate ids, which browser tests could not drive)."""
    parser = _Index()
    parser.feed(text)
    return parser.by_id


def squash(text: str) -> str:
    return " ".join(text.split())


def audit_entries(web: WebEnv, action: str) -> list[audit.AuditView]:
    return audit.list_entries(web.sessions, action=action)


T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
PIPELINE = "chest-ct-segmentation"


def rule_form(**fields: Any) -> dict[str, Any]:
    """A rule form as a browser would submit it (condition rows as ``cond-<row>-<field>``)."""
    data: dict[str, Any] = {"name": "chest", "enabled": "on", "priority": "0", "match": "all",
                            "series-prefer": "thinnest", "pipelines": [PIPELINE], "destinations-mode": "default",
                            "cond-rows": "4"}
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


# --------------------------------------------------------------------------- a real stored study


@dataclass
class StoredStudy:
    uid: str
    thick: GeneratedSeries
    thin: GeneratedSeries


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[GeneratedSeries, GeneratedSeries]:
    """One chest CT study of two series: 5 mm (12 slices, series 2) and 2.5 mm (24 slices, series 3)."""
    root = tmp_path_factory.mktemp("rules_ct")
    thick = generate_ct_series(root / "thick", geometry=SeriesGeometry(
        rows=32, columns=32, slices=12, slice_spacing=5.0, slice_thickness=5.0), seed=41, series_number=2,
        series_description="Chest 5mm")
    thin = generate_ct_series(root / "thin", geometry=SeriesGeometry(
        rows=32, columns=32, slices=24, slice_spacing=2.5, slice_thickness=2.5), seed=41, series_number=3,
        series_description="Chest 2.5mm")
    assert thick.study_uid == thin.study_uid and thick.series_uid != thin.series_uid
    return thick, thin


def ingest(web: WebEnv, paths: list[Path], calling_ae: str = "CT1") -> None:
    """Receive ``paths`` the way the SCP does: one association, IngestService.store per instance."""
    engine = web.sessions.kw["bind"]
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    service = IngestService(spool=Spool(web.settings.spool_dir, fsync=False), quarantine_dir=web.settings.quarantine_dir,
                            sessions=web.sessions, indexer=indexer, duplicate_policy="keep", min_free_bytes=0,
                            clock=lambda: T0)
    association = repo.open_association(web.sessions, calling_ae_title=calling_ae, called_ae_title="DICOM_NODE",
                                        peer_address="127.0.0.1", peer_port=40000, tls=False, now=T0)
    try:
        for path in paths:
            meta = read_file_meta_info(path)
            outcome = service.store(StoreRequest(
                sop_class_uid=str(meta.MediaStorageSOPClassUID), sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                transfer_syntax_uid=str(meta.TransferSyntaxUID), calling_ae_title=calling_ae,
                association_id=association), split_part10(path.read_bytes())[1])
            assert outcome.status == 0, outcome
    finally:
        indexer.stop()


@pytest.fixture
def stored(web: WebEnv, ct_study: tuple[GeneratedSeries, GeneratedSeries]) -> StoredStudy:
    thick, thin = ct_study
    ingest(web, thick.paths + thin.paths)
    return StoredStudy(thick.study_uid, thick, thin)


def api(web: WebEnv, username: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {web.token(username)}"}


CHEST = {"name": "chest", "description": "chest CT", "pipelines": [PIPELINE],
         "conditions": [{"attribute": "modality", "in": ["CT"]}, {"attribute": "study_description", "regex": "chest"}]}


# --------------------------------------------------------------------------- API


def test_api_create_read_update_rename_delete_with_audit(web: WebEnv) -> None:
    headers = api(web)
    client = web.client()
    created = client.post("/api/v1/rules", json=CHEST, headers=headers)
    assert created.status_code == 201, created.text
    assert Rule.model_validate(created.json()) == Rule.model_validate(CHEST)
    assert client.post("/api/v1/rules", json=CHEST, headers=headers).status_code == 409
    assert client.get("/api/v1/rules/chest", headers=headers).json()["conditions"][0]["in"] == ["CT"]

    changed = {**CHEST, "priority": 5, "name": "chest-v2"}
    updated = client.put("/api/v1/rules/chest", json=changed, headers=headers)
    assert updated.status_code == 200 and updated.json()["priority"] == 5
    assert client.get("/api/v1/rules/chest", headers=headers).status_code == 404
    assert [r["name"] for r in client.get("/api/v1/rules", headers=headers).json()] == ["chest-v2"]
    assert client.put("/api/v1/rules/nope", json=CHEST, headers=headers).status_code == 404

    assert client.delete("/api/v1/rules/chest-v2", headers=headers).status_code == 204
    assert client.delete("/api/v1/rules/chest-v2", headers=headers).status_code == 404
    assert config_repo.list_rules(web.sessions) == []

    [create] = audit_entries(web, "rule.create")
    assert create.actor == "admin" and create.before is None and create.after["conditions"][1]["regex"] == "chest"
    [update] = audit_entries(web, "rule.update")
    assert update.before["name"] == "chest" and update.after["name"] == "chest-v2"
    assert update.after["priority"] == 5 and "renamed from 'chest'" in (update.detail or "")
    [delete] = audit_entries(web, "rule.delete")
    assert delete.before["name"] == "chest-v2" and delete.after is None


def test_api_invalid_definitions_name_each_field(web: WebEnv) -> None:
    web.client().post("/api/v1/destinations", json={"type": "dicom", "name": "pacs", "ae_title": "PACS",
                                                    "host": "127.0.0.1", "port": 104}, headers=api(web))
    bad = {"name": "order", "pipelines": ["chest-ct-segmentation", "no-such-model"], "priority": 5000,
           "destinations": ["pacs", "nowhere"], "description": "x" * 1001,
           "conditions": [{"attribute": "modality", "in": ["CT"]}, {"attribute": "modality", "regex": "("},
                          {"attribute": "slice_thickness_mm", "min": 5, "max": 1}, {"attribute": "colour", "in": ["x"]}]}
    answer = web.client().post("/api/v1/rules", json=bad, headers=api(web))
    assert answer.status_code == 422
    errors = {e["field"]: e["message"] for e in answer.json()["errors"]}
    assert errors["conditions.1.regex"].startswith("regex '(' does not compile: ")
    assert errors["conditions.2"] == "range condition on slice_thickness_mm: min 5.0 > max 1.0"
    assert errors["conditions.3.attribute"].startswith("unknown attribute 'colour'; known: ")
    assert "conditions.0" not in " ".join(errors)
    assert errors["priority"] == "Input should be less than or equal to 1000 (got 5000)"
    assert errors["pipelines.1"].startswith("unknown pipeline 'no-such-model'; the model registry lists ")
    assert errors["destinations.1"] == "no destination named 'nowhere' (known: pacs)"
    assert errors["description"] == "description is 1001 characters long; at most 1000 are allowed"
    assert "reserved" in errors["name"]
    assert config_repo.list_rules(web.sessions) == [] and audit_entries(web, "rule.") == []


def test_viewer_and_operator_cannot_change_rules(web: WebEnv, viewer: LoggedIn, operator: LoggedIn) -> None:
    config_repo.save_rule(web.sessions, Rule.model_validate(CHEST), original_name=None, source="test", now=T0)
    for client in (viewer, operator):
        assert client.client.get("/rules").status_code == 200
        shown = client.client.get("/rules/chest")
        assert shown.status_code == 200 and "save-rule" not in page(shown.text)
        assert client.client.get("/rules/new").status_code == 403
        for url in ("/rules", "/rules/chest", "/rules/chest/delete", "/rules/chest/disable", "/rules/chest/test"):
            assert client.post(url, rule_form()).status_code == 403, url
        assert client.post("/rules/chest/move", {"direction": "up"}).status_code == 403
    token = api(web, "viewer")
    client = web.client()
    assert client.get("/api/v1/rules", headers=token).status_code == 200
    assert client.post("/api/v1/rules", json={**CHEST, "name": "b"}, headers=token).status_code == 403
    assert client.put("/api/v1/rules/chest", json=CHEST, headers=token).status_code == 403
    assert client.put("/api/v1/rules/order", json=["chest"], headers=token).status_code == 403
    assert client.delete("/api/v1/rules/chest", headers=token).status_code == 403
    assert client.post("/api/v1/rules/test", json={"rule": CHEST, "study_instance_uid": "1.2"},
                       headers=token).status_code == 403
    assert web.client().get("/api/v1/rules").status_code == 401
    assert config_repo.get_rule(web.sessions, "chest") is not None and audit_entries(web, "rule.") == []


# --------------------------------------------------------------------------- forms


def test_form_creates_and_edits_a_rule(web: WebEnv, admin: LoggedIn) -> None:
    created = admin.post("/rules", rule_form(**{
        "description": "Chest CT", "priority": "3", "match": "any", "series-prefer": "most_instances",
        "cond-0-attribute": "modality", "cond-0-in": "CT, MR ", "cond-1-attribute": "instance_count", "cond-1-min": "10",
        "cond-3-attribute": "study_description", "cond-3-regex": "chest|thorax", "cond-3-negate": "on"}))
    assert created.status_code == 303 and created.headers["location"] == "/rules?done=created&rule=chest"
    stored = config_repo.get_rule(web.sessions, "chest")
    assert stored is not None and stored.source == "ui"
    assert stored.rule == Rule.model_validate({
        "name": "chest", "description": "Chest CT", "priority": 3, "match": "any", "series": {"prefer": "most_instances"},
        "pipelines": [PIPELINE], "conditions": [
            {"attribute": "modality", "in": ["CT", "MR"]}, {"attribute": "instance_count", "min": 10},
            {"attribute": "study_description", "regex": "chest|thorax", "negate": True}]})
    listing = admin.client.get(created.headers["location"])
    assert "Rule chest created." in listing.text
    row = page(listing.text)["rule-0"]
    assert "chest" in row.text and "modality in CT, MR" in row.text and "10 ≤ instance_count" in row.text

    form = page(admin.client.get("/rules/chest").text)
    assert form["name"].attrs["value"] == "chest" and form["cond-0-in"].attrs["value"] == "CT, MR"
    assert form["cond-1-min"].attrs["value"] == "10" and "checked" in form["cond-2-negate"].attrs
    assert form["cond-5-attribute"].tag == "select" and "cond-6-attribute" not in form  # 3 empty rows

    renamed = admin.post("/rules/chest", rule_form(**{"name": "chest renamed", "cond-0-attribute": "modality",
                                                      "cond-0-in": "CT"}))
    assert renamed.status_code == 303
    assert config_repo.get_rule(web.sessions, "chest") is None
    after = config_repo.get_rule(web.sessions, "chest renamed")
    assert after is not None and after.rule.enabled and len(after.rule.conditions) == 1
    assert admin.client.get("/rules/chest%20renamed").status_code == 200
    assert [e.action for e in audit_entries(web, "rule.")] == ["rule.update", "rule.create"]


def test_invalid_regex_is_shown_under_its_row_and_input_is_kept(web: WebEnv, admin: LoggedIn) -> None:
    answer = admin.post("/rules", rule_form(**{
        "description": "kept <as typed>", "cond-0-attribute": "modality", "cond-0-in": "CT",
        "cond-2-attribute": "series_description", "cond-2-regex": "("}))  # row 1 left empty
    assert answer.status_code == 422
    ids = page(answer.text)
    error = ids["cond-2-regex-error"]
    assert squash(error.text) == "regex '(' does not compile: missing ): ("  # RE2's words
    assert "field-error" in error.classes
    assert "invalid" in ids["cond-2-regex"].classes and ids["cond-2-regex"].attrs["value"] == "("
    assert "invalid" not in ids["cond-0-in"].classes and ids["cond-0-in"].attrs["value"] == "CT"
    assert ids["description"].attrs["value"] == "kept <as typed>" and ids["name"].attrs["value"] == "chest"
    assert "cond-0-regex-error" not in ids and "cond-1-regex-error" not in ids
    assert config_repo.list_rules(web.sessions) == []


def test_form_only_errors_are_placed_at_their_inputs(web: WebEnv, admin: LoggedIn) -> None:
    answer = admin.post("/rules", rule_form(**{
        "name": "bad name!", "priority": "high", "pipelines": None, "destinations-mode": "named",
        "cond-0-attribute": "slice_thickness_mm", "cond-0-min": "thin",
        "cond-1-attribute": "instance_count", "cond-1-regex": "x",
        "cond-2-attribute": "modality", "cond-2-max": "3",
        "cond-3-in": "CT"}))
    assert answer.status_code == 422
    ids = page(answer.text)
    assert squash(ids["cond-0-min-error"].text) == "min 'thin' is not a number"
    assert "give min and/or max, not 'regex'" in ids["cond-1-regex-error"].text
    assert "max applies to slice_thickness_mm, slice_count and instance_count only" in ids["cond-2-max-error"].text
    assert "choose the attribute" in ids["cond-3-attribute-error"].text
    assert "must start with a letter or digit" in ids["name-error"].text
    assert "(got 'high')" in ids["priority-error"].text
    assert "at least 1 item" in ids["pipelines-error"].text
    assert "tick at least one destination" in ids["destinations-error"].text
    assert ids["cond-0-min"].attrs["value"] == "thin"


def test_order_move_buttons_and_api_reorder(web: WebEnv, admin: LoggedIn) -> None:
    for name in ("a", "b", "c"):
        assert admin.post("/rules", rule_form(name=name)).status_code == 303
    assert admin.post("/rules/c/move", {"direction": "up"}).status_code == 303
    assert [r.name for r in config_repo.list_rules(web.sessions)] == ["a", "c", "b"]
    assert admin.post("/rules/a/move", {"direction": "up"}).status_code == 303  # already first: no change
    listing = page(admin.client.get("/rules").text)
    assert [listing[f"rule-{i}"].attrs["data-rule"] for i in range(3)] == ["a", "c", "b"]

    answer = admin.send("PUT", "/api/v1/rules/order", json=["b", "a", "c"])
    assert answer.status_code == 200 and answer.json() == ["b", "a", "c"]
    assert [r.name for r in config_repo.list_rules(web.sessions)] == ["b", "a", "c"]
    wrong = admin.send("PUT", "/api/v1/rules/order", json=["b", "b", "x"])
    assert wrong.status_code == 422
    message = wrong.json()["errors"][0]["message"]
    assert "named more than once: b" in message and "unknown: x" in message and "missing: a, c" in message
    reorders = audit_entries(web, "rule.reorder")
    assert [(e.before, e.after) for e in reorders] == [(["a", "c", "b"], ["b", "a", "c"]),
                                                       (["a", "b", "c"], ["a", "c", "b"])]
    assert admin.post("/rules/zzz/move", {"direction": "up"}).status_code == 404


def test_priority_beats_order_in_the_router(web: WebEnv, admin: LoggedIn, stored: StoredStudy) -> None:
    admin.post("/rules", rule_form(name="first", **{"series-prefer": "thinnest"}))
    admin.post("/rules", rule_form(name="urgent", priority="10", **{"series-prefer": "most_instances",
                                                                    "cond-0-attribute": "series_description",
                                                                    "cond-0-regex": "^chest 5mm$"}))
    study_id = config_repo.study_id_for_uid(web.sessions, stored.uid)
    assert study_id is not None
    [job] = decide(web.sessions, web.settings.spool_dir, study_id).jobs
    assert job.rule == "urgent" and job.series_instance_uid == stored.thick.series_uid


def test_enable_and_disable_change_what_the_router_decides(web: WebEnv, admin: LoggedIn, stored: StoredStudy) -> None:
    assert admin.send("POST", "/api/v1/rules", json=CHEST).status_code == 201
    study_id = config_repo.study_id_for_uid(web.sessions, stored.uid)
    assert study_id is not None
    routed = decide(web.sessions, web.settings.spool_dir, study_id)
    assert [(j.pipeline, j.series_instance_uid) for j in routed.jobs] == [(PIPELINE, stored.thin.series_uid)]

    assert admin.post("/rules/chest/disable").status_code == 303
    listing = page(admin.client.get("/rules").text)
    assert "disabled" in listing["rule-0"].text
    off = decide(web.sessions, web.settings.spool_dir, study_id)
    assert off.jobs == () and off.outcomes[0].reasons == ("rule is disabled",)

    assert admin.post("/rules/chest/enable").status_code == 303
    assert decide(web.sessions, web.settings.spool_dir, study_id).jobs == routed.jobs
    [enable], [disable] = audit_entries(web, "rule.enable"), audit_entries(web, "rule.disable")
    assert disable.before["enabled"] is True and disable.after["enabled"] is False
    assert enable.before["enabled"] is False and enable.after["enabled"] is True
    assert admin.post("/rules/nope/enable").status_code == 404


# --------------------------------------------------------------------------- the rule tester


def test_testing_the_unsaved_form_against_a_stored_study(web: WebEnv, admin: LoggedIn, stored: StoredStudy) -> None:
    answer = admin.post("/rules/test", rule_form(**{
        "study_pick": stored.uid,
        "cond-0-attribute": "calling_ae_title", "cond-0-in": "CT1",
        "cond-1-attribute": "slice_thickness_mm", "cond-1-max": "3",
        "cond-2-attribute": "study_description", "cond-2-regex": "chest"}))
    assert answer.status_code == 200, answer.text[:2000]
    ids = page(answer.text)
    assert "matches" in ids["test-verdict"].text and "1 job would be created" in squash(ids["test-verdict"].text)
    assert ids["test-series-0"].attrs["data-series"] == stored.thick.series_uid
    assert squash(ids["test-series-0-status"].text) == "not a candidate"
    assert squash(ids["test-series-1-status"].text) == "selected"
    thick_thickness = ids["test-series-0-cond-1"]
    assert thick_thickness.attrs["data-holds"] == "false"
    assert "slice_thickness_mm 5 is not <= 3" in squash(thick_thickness.text)
    assert ids["test-series-1-cond-1"].attrs["data-holds"] == "true"
    assert "calling_ae_title 'CT1' is in ['CT1']" in squash(ids["test-series-0-cond-0"].text)
    assert "study_description 'Synthetic chest CT' is matching /chest/" in squash(ids["test-series-1-cond-2"].text)
    jobs = squash(ids["test-jobs"].text)
    assert PIPELINE in jobs and stored.thin.series_uid in jobs
    assert ids["cond-1-max"].attrs["value"] == "3"  # the form comes back as typed
    assert config_repo.list_rules(web.sessions) == []  # nothing saved

    failing = page(admin.post("/rules/test", rule_form(**{
        "study_instance_uid": stored.uid, "cond-0-attribute": "study_description", "cond-0-regex": "abdomen"})).text)
    assert "does not match" in failing["test-verdict"].text
    assert "study_description 'Synthetic chest CT' is not matching /abdomen/" in squash(failing["test-series-0-cond-0"].text)
    assert "no series meets the conditions" in failing["test-reasons"].text
    assert "test-jobs" not in failing


def test_slice_count_counts_the_frames_of_a_multi_frame_series_in_the_tester(
    web: WebEnv, admin: LoggedIn, stored: StoredStudy, tmp_path: Path
) -> None:
    """The thin series again as one enhanced multi-frame CT: 1 instance but 24 slices, as the volume loader sees it."""
    legacy = [pydicom.dcmread(path) for path in stored.thin.paths]
    converted = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=4, sop_instance_uid=generate_uid(),
        instance_number=1)
    converted.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    ingest(web, [tmp_path / "enhanced.dcm"])
    ids = page(admin.post("/rules/test", rule_form(**{
        "study_pick": stored.uid, "cond-0-attribute": "slice_count", "cond-0-min": "20"})).text)
    by_series = {ids[f"test-series-{i}"].attrs["data-series"]: i for i in range(3)}
    enhanced = by_series[str(converted.SeriesInstanceUID)]
    assert ids[f"test-series-{enhanced}-cond-0"].attrs["data-holds"] == "true"
    assert "slice_count 24 is >= 20" in squash(ids[f"test-series-{enhanced}-cond-0"].text)
    assert squash(ids[f"test-series-{enhanced}-images"].text) == "1 (24 slices)"
    assert ids[f"test-series-{by_series[stored.thick.series_uid]}-cond-0"].attrs["data-holds"] == "false"
    assert squash(ids[f"test-series-{by_series[stored.thin.series_uid]}-images"].text) == "24"


def test_testing_a_disabled_rule_says_so_and_shows_what_it_would_do(
    web: WebEnv, admin: LoggedIn, stored: StoredStudy
) -> None:
    admin.post("/rules", rule_form(enabled=None, **{"cond-0-attribute": "modality", "cond-0-in": "CT"}))
    stored_rule = config_repo.get_rule(web.sessions, "chest")
    assert stored_rule is not None and not stored_rule.rule.enabled
    edited = admin.post("/rules/chest/test", rule_form(enabled=None, **{"study_pick": stored.uid,
                                                                         "cond-0-attribute": "modality",
                                                                         "cond-0-in": "MR"}))
    ids = page(edited.text)
    assert "The router skips this rule (rule is disabled)" in squash(ids["test-disabled"].text)
    assert "does not match" in ids["test-verdict"].text and "even if enabled" in ids["test-verdict"].text
    assert "modality 'CT' is not in ['MR']" in squash(ids["test-series-0-cond-0"].text)

    # the stored rule (CT) tested with GET; nothing changes (admins only: test_rules_regex.py)
    shown = admin.client.get(f"/rules/chest/test?study_pick={stored.uid}")
    assert shown.status_code == 200
    ids = page(shown.text)
    assert "test-disabled" in ids and "would be created if enabled" in squash(ids["test-verdict"].text)
    assert admin.client.get("/rules/chest/test?study_instance_uid=9.9.9").status_code == 404
    assert audit_entries(web, "rule.update") == []


def test_api_rule_test_is_the_routers_evaluation(web: WebEnv, stored: StoredStudy) -> None:
    client, headers = web.client(), api(web)
    rule = {**CHEST, "series": {"prefer": "all"}, "enabled": False}
    answer = client.post("/api/v1/rules/test", json={"rule": rule, "study_instance_uid": stored.uid}, headers=headers)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    study_id = config_repo.study_id_for_uid(web.sessions, stored.uid)
    assert study_id is not None
    facts = study_facts(web.sessions, web.settings.spool_dir, study_id)
    expected = evaluate([Rule.model_validate({**rule, "enabled": True})], facts)
    assert result["result"]["outcome"]["reasons"] == ["rule is disabled"] and result["result"]["jobs"] == []
    assert result["if_enabled"]["outcome"] == expected.outcomes[0].model_dump(mode="json")
    assert sorted(j["series_instance_uid"] for j in result["if_enabled"]["jobs"]) == sorted(
        [stored.thick.series_uid, stored.thin.series_uid])
    assert [s["status"] for s in result["series"]] == ["selected", "selected"]

    bad = client.post("/api/v1/rules/test", json={"rule": {**CHEST, "conditions": [{"attribute": "modality",
                                                                                     "regex": "["}]},
                                                 "study_instance_uid": stored.uid}, headers=headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "rule.conditions.0.regex"
    missing = client.post("/api/v1/rules/test", json={"rule": CHEST, "study_instance_uid": "1.2.3"}, headers=headers)
    assert missing.status_code == 404 and "1.2.3" in missing.json()["detail"]

    client.post("/api/v1/rules", json=CHEST, headers=headers)
    mine = client.post("/api/v1/rules/chest/test", json={"study_instance_uid": stored.uid}, headers=headers)
    assert mine.status_code == 200 and mine.json()["result"]["outcome"]["matched"] is True
    assert [j["series_instance_uid"] for j in mine.json()["result"]["jobs"]] == [stored.thin.series_uid]


# --------------------------------------------------------------------------- the check before each model


@pytest.fixture(scope="module")
def head_series(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSeries:
    """A CT series whose header names the head (BodyPartExamined HEAD, "CT HEAD", "Brain 5mm"), 12 slices."""
    series = generate_ct_series(tmp_path_factory.mktemp("rules_head"), geometry=SeriesGeometry(
        rows=32, columns=32, slices=12, slice_spacing=5.0, slice_thickness=5.0), seed=57,
        study_description="CT HEAD", series_description="Brain 5mm")
    for path in series.paths:
        dataset = pydicom.dcmread(path)
        dataset.BodyPartExamined = "HEAD"
        dataset.save_as(path)
    return series


CHEST_LINE = "CT; chest; slices >= 10; pixel spacing mm 0.3-3; slice spacing mm 0.3-6; axial"
HEAD_REASON = ("The series does not show the body region the model was made for: the header says head; "
               "the model is made for chest (the image was not judged)")


def test_the_tester_shows_whether_each_model_applies_from_the_header(
    web: WebEnv, admin: LoggedIn, stored: StoredStudy, head_series: GeneratedSeries
) -> None:
    chest = page(admin.post("/rules/test", rule_form(study_pick=stored.uid)).text)
    check = chest["test-job-0-check"]
    assert (check.attrs["data-pipeline"], check.attrs["data-applies"]) == (PIPELINE, "true")
    assert f"{PIPELINE} on series 3: applies" in squash(check.text) and f"Made for: {CHEST_LINE}" in squash(check.text)
    assert "test-job-0-reason" not in chest and "test-job-0-warning" not in chest
    note = squash(chest["test-applicability-note"].text)
    assert "header only" in note and "the worker checks again with the image itself" in note
    assert "the image wins" in note

    ingest(web, head_series.paths)
    answer = admin.post("/rules/test", rule_form(study_pick=head_series.study_uid))
    assert answer.status_code == 200
    head = page(answer.text)
    assert head["test-job-0-check"].attrs["data-applies"] == "false"
    assert f"{PIPELINE} on series 1: not applicable" in squash(head["test-job-0-check"].text)
    assert squash(head["test-job-0-reason"].text) == HEAD_REASON
    table = html.unescape(squash(answer.text.split('id="test-job-0-check"')[1].split('id="test-series"')[0]))
    assert ('<tr data-check="modality"><td>modality</td><td><span class="badge check-passed">passed</span></td>'
            "<td>CT is CT</td></tr>") in table
    assert ('<td>header regions</td><td><span class="badge check-failed">failed</span></td><td>body_part_examined '
            "'HEAD': HEAD -> head;") in table
    assert ('<tr data-check="body region"><td>body region</td><td><span class="badge check-failed">failed</span>'
            "</td><td>the header says head; the model is made for chest (the image was not judged)</td></tr>") in table
    assert "matches" in head["test-verdict"].text  # the rule matches; the model would decline the series

    both = web.client().post("/api/v1/rules/test", headers=api(web), json={
        "rule": {"name": "any", "pipelines": [PIPELINE, "lung-nodule-detection"]},
        "study_instance_uid": head_series.study_uid})
    assert both.status_code == 200, both.text
    jobs = both.json()["result"]["jobs"]
    assert [j["pipeline"] for j in jobs] == [PIPELINE, "lung-nodule-detection"]
    for job in jobs:
        assert job["made_for"] == CHEST_LINE and job["made_for_warning"] is None and job["check_error"] is None
        assert job["applicability"]["applies"] is False and job["applicability"]["reason_code"] == "body-region"
        assert job["applicability"]["header_regions"] == ["head"]


def test_the_tester_names_a_model_registry_it_cannot_read(tmp_path: Path, head_series: GeneratedSeries) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text("models:\n  - {id: chest-ct-segmentation, kind: segmentation, colour: red}\n")
    env = make_web_env(tmp_path / "web", **{"routing.models_file": registry})
    ingest(env, head_series.paths)
    admin = env.login("admin")
    answer = admin.post("/rules/test", rule_form(study_pick=head_series.study_uid))
    assert answer.status_code == 200
    ids = page(answer.text)
    assert ids["test-job-0-check"].attrs["data-applies"] == "unknown"
    error = squash(ids["test-job-0-error"].text)
    assert error.startswith("the model registry cannot be read:") and "colour" in error


# --------------------------------------------------------------------------- hostile input, PostgreSQL


def test_hostile_input_is_stored_verbatim_and_shown_escaped(web: WebEnv, admin: LoggedIn, stored: StoredStudy) -> None:
    script = "<script>alert('rule')</script>"
    sql = "'; DROP TABLE routing_rules; --"
    answer = admin.post("/rules", rule_form(**{
        "description": script, "cond-0-attribute": "study_description", "cond-0-regex": "<img src=x onerror=alert(1)>|chest",
        "cond-1-attribute": "series_description", "cond-1-in": sql, "cond-1-negate": "on"}))
    assert answer.status_code == 303
    rule = config_repo.get_rule(web.sessions, "chest")
    assert rule is not None and rule.rule.description == script
    assert rule.rule.conditions[1].in_ == [sql]  # type: ignore[union-attr]
    for url in ("/rules", "/rules/chest", f"/rules/chest/test?study_pick={stored.uid}"):
        text = admin.client.get(url).text
        assert "<script>alert" not in text and "<img src=x" not in text, url
        assert html.escape(script) in text or "&lt;script&gt;alert(&#39;rule&#39;)&lt;/script&gt;" in text, url
    assert admin.send("GET", "/api/v1/rules/chest").json()["description"] == script
    refused = admin.post("/rules", rule_form(name="<b>x</b>"))
    assert refused.status_code == 422 and "<b>x</b>" not in refused.text
    assert "&lt;b&gt;x&lt;/b&gt;" in page(refused.text)["name-error"].text or "&#39;&lt;b&gt;" in refused.text


def test_crud_and_order_on_each_database(tmp_path: Path, database_url: str) -> None:
    env = make_web_env(tmp_path, database_url)
    headers = api(env)
    client = env.client()
    for name in ("one", "two", "three"):
        assert client.post("/api/v1/rules", json={**CHEST, "name": name}, headers=headers).status_code == 201
    assert client.put("/api/v1/rules/order", json=["three", "one", "two"], headers=headers).status_code == 200
    assert client.put("/api/v1/rules/two", json={**CHEST, "name": "one"}, headers=headers).status_code == 409
    assert client.put("/api/v1/rules/two", json={**CHEST, "name": "2", "enabled": False},
                      headers=headers).status_code == 200
    records = config_repo.list_rule_records(env.sessions)
    assert [(r.rule.name, r.rule.enabled, r.source) for r in records] == [
        ("three", True, "api"), ("one", True, "api"), ("2", False, "api")]
