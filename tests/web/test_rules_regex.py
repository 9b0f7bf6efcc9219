"""Routing regexes in the web UI and the API (issue 20, item 5).

A pattern RE2 cannot run is refused when saved, at its field, naming the pattern and
why; a rule stored before that check is shown as never applied; and only the role that
edits rules runs the rule tester (viewers get 403).
"""

from __future__ import annotations

from dicom_node.db import config_repo
from dicom_node.routing import load_stored_rule
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.test_rules import (  # noqa: F401 - ct_study and stored are fixtures
    PIPELINE,
    T0,
    StoredStudy,
    api,
    ct_study,
    page,
    rule_form,
    squash,
    stored,
)

BACKREFERENCE = r"(chest)\1"


def test_a_backreference_is_refused_at_save_in_the_form_and_the_api(web: WebEnv, admin: LoggedIn) -> None:
    answer = admin.post("/rules", rule_form(**{"cond-0-attribute": "modality", "cond-0-in": "CT",
                                               "cond-1-attribute": "study_description",
                                               "cond-1-regex": BACKREFERENCE}))
    assert answer.status_code == 422
    ids = page(answer.text)
    assert squash(ids["cond-1-regex-error"].text) == (
        r"regex '(chest)\\1' cannot be used: backreferences (\1, (?P=name)) are not supported by the node's "
        "regex engine (RE2)")
    assert ids["cond-1-regex"].attrs["value"] == BACKREFERENCE  # the input is kept for fixing
    assert config_repo.get_rule(web.sessions, "chest") is None

    client, headers = web.client(), api(web)
    refused = client.post("/api/v1/rules", headers=headers, json={
        "name": "chest", "pipelines": [PIPELINE],
        "conditions": [{"attribute": "series_description", "regex": "(?<=thin )chest"}]})
    assert refused.status_code == 422
    body = refused.json()
    assert body["detail"] == "invalid routing rule 'chest'"
    [error] = body["errors"]
    assert error["field"] == "conditions.0.regex"
    assert error["message"].startswith("regex '(?<=thin )chest' cannot be used: lookaround")
    assert client.get("/api/v1/rules/chest", headers=headers).status_code == 404


def test_only_the_role_that_edits_rules_runs_the_tester(web: WebEnv, admin: LoggedIn, viewer: LoggedIn,
                                                        operator: LoggedIn, stored: StoredStudy) -> None:
    client = web.client()
    assert client.post("/api/v1/rules", headers=api(web), json={"name": "chest", "pipelines": [PIPELINE]}
                       ).status_code == 201
    for user in (viewer, operator):
        assert user.client.get(f"/rules/chest/test?study_pick={stored.uid}").status_code == 403
        assert "rule-test" not in page(user.client.get("/rules/chest").text)  # no test form offered
    for role in ("viewer", "operator"):
        denied = client.post("/api/v1/rules/chest/test", json={"study_instance_uid": stored.uid},
                             headers=api(web, role))
        assert denied.status_code == 403, role
    assert admin.client.get(f"/rules/chest/test?study_pick={stored.uid}").status_code == 200
    allowed = client.post("/api/v1/rules/chest/test", json={"study_instance_uid": stored.uid}, headers=api(web))
    assert allowed.status_code == 200 and allowed.json()["result"]["outcome"]["matched"] is True


def test_a_rule_stored_before_re2_is_listed_and_tested_as_never_applied(
    web: WebEnv, admin: LoggedIn, stored: StoredStudy
) -> None:
    old = load_stored_rule('{"name": "old", "pipelines": ["%s"], "conditions": [{"attribute": "series_description", '
                           '"regex": "(chest)\\\\1", "negate": true}]}' % PIPELINE)
    config_repo.save_rule(web.sessions, old, original_name=None, source="rules.yaml", now=T0)

    listing = admin.client.get("/rules")
    assert listing.status_code == 200
    assert "the rule is never applied until this is fixed: regex &#39;(chest)\\\\1&#39; cannot be used: " \
           "backreferences" in listing.text
    assert admin.client.get("/rules/old").status_code == 200
    assert [r["name"] for r in admin.send("GET", "/api/v1/rules").json()] == ["old"]

    tested = web.client().post("/api/v1/rules/old/test", json={"study_instance_uid": stored.uid},
                               headers=api(web)).json()
    outcome = tested["result"]["outcome"]
    assert outcome["matched"] is False and tested["result"]["jobs"] == []
    assert outcome["problems"] == ["condition 0 (series_description): regex '(chest)\\\\1' cannot be used: "
                                   "backreferences (\\1, (?P=name)) are not supported by the node's regex engine (RE2)"]
    assert [s["status"] for s in tested["series"]] == ["not a candidate", "not a candidate"]

    # disabling it still works; saving it unchanged is refused at the regex until it is fixed
    assert admin.post("/rules/old/disable").status_code == 303
    resave = admin.post("/rules/old", rule_form(name="old", **{"cond-0-attribute": "series_description",
                                                               "cond-0-regex": r"(chest)\1"}))
    assert resave.status_code == 422 and "backreferences" in page(resave.text)["cond-0-regex-error"].text
    fixed = admin.post("/rules/old", rule_form(name="old", **{"cond-0-attribute": "series_description",
                                                              "cond-0-regex": "(chest){2}"}))
    assert fixed.status_code == 303
    record = config_repo.get_rule(web.sessions, "old")
    assert record is not None and record.rule.problems() == []
