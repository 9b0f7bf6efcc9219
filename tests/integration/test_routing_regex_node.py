"""A hostile routing regex cannot lock up a running node (issue 20, item 5).

The reproduction of the issue: a rule with ``(a+)+$`` on the study description and a
study whose description is 40 ``a`` and a ``!``. With Python's backtracking ``re`` the
router never finished that search and, holding the interpreter lock, froze the whole
process: C-ECHO and ``/healthz`` timed out, and a restart hung again. Here the node
routes the study and keeps answering while it does. A rule stored by an older version
with a pattern RE2 cannot run does not stop the node from starting either.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.app.cli import main
from dicom_node.db import config_repo, repo
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.ingest import utc_now
from dicom_node.app.node import Node
from dicom_node.routing import load_stored_rule
from tests.conftest import NodeFactory
from tests.integration.store_scu import store_all
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

PIPELINE = "lung-nodule-detection"


def series(tmp_path: Path, name: str, seed: int, description: str) -> GeneratedSeries:
    return generate_ct_series(tmp_path / name, geometry=SeriesGeometry(rows=32, columns=32, slices=10), seed=seed,
                              study_description=description, patient_id=f"P-{seed}")


def send(node: Node, items: GeneratedSeries) -> None:
    store_all(node, (pydicom.dcmread(path) for path in items.paths))


def echo_seconds(node: Node) -> float:
    """One C-ECHO on a fresh association (5 s timeouts); how long it took."""
    started = time.monotonic()
    ae = AE(ae_title="MONITOR")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=node.settings.dicom.ae_title)
    assert assoc.is_established, "the node did not accept an association"
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    return time.monotonic() - started


def healthz_seconds(node: Node) -> float:
    started = time.monotonic()
    answer = requests.get(f"http://127.0.0.1:{node.settings.web.port}/healthz", timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    return time.monotonic() - started


def routed_while_answering(node: Node, study_uid: str, timeout: float = 30.0) -> str:
    """Poll C-ECHO and /healthz until the study is routed or ignored; its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert echo_seconds(node) < 5 and healthz_seconds(node) < 5
        state = {s.study_instance_uid: s.state for s in repo.list_studies(node.sessions)}.get(study_uid)
        if state in ("routed", "ignored"):
            return str(state)
        time.sleep(0.1)
    raise AssertionError(f"study {study_uid} was not routed within {timeout:g} s")


def events(node: Node, study_uid: str) -> dict[str, str]:
    return {kind: detail or "" for _, kind, detail in repo.study_events(node.sessions, study_uid)}


def test_the_catastrophic_backtracking_rule_of_the_issue_neither_freezes_nor_blocks_the_node(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        "name": "aaa", "pipelines": [PIPELINE], "conditions": [{"attribute": "study_description", "regex": "(a+)+$"}]}]}))
    node = node_factory(**{"routing.rules_file": str(rules), "queue.sweep_interval_seconds": 0.2})

    hostile = series(tmp_path, "hostile", 51, "a" * 40 + "!")
    send(node, hostile)
    assert routed_while_answering(node, hostile.study_uid) == "ignored"
    assert "study_description 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!' is not matching /(a+)+$/" \
        in events(node, hostile.study_uid)["ignored"]

    plain = series(tmp_path, "plain", 52, "a" * 40)
    send(node, plain)
    assert routed_while_answering(node, plain.study_uid) == "routed"


def test_a_rule_stored_before_re2_neither_stops_the_start_nor_routes(
    node_factory: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "upgraded"
    engine = make_engine(f"sqlite:///{data_dir / 'dicom-node.db'}")
    upgrade(engine)
    old = load_stored_rule('{"name": "old-echo", "pipelines": ["%s"], "conditions": '
                           '[{"attribute": "study_description", "regex": "(a)\\\\1"}]}' % PIPELINE)
    config_repo.save_rule(make_session_factory(engine), old, original_name=None, source="rules.yaml", now=utc_now())
    engine.dispose()

    with caplog.at_level(logging.WARNING, logger="dicom_node.config_files"):
        node = node_factory(data_dir=data_dir, **{"queue.sweep_interval_seconds": 0.2})
    assert "routing rule old-echo is never applied until it is fixed: condition 0 (study_description): " \
           "regex '(a)\\\\1' cannot be used: backreferences" in caplog.text
    assert echo_seconds(node) < 5

    study = series(tmp_path, "study", 53, "aa")
    send(node, study)
    assert routed_while_answering(node, study.study_uid) == "ignored"
    timeline = events(node, study.study_uid)
    assert timeline["rule_unusable"].startswith("rule old-echo was not applied: condition 0 (study_description): "
                                                "regex '(a)\\\\1' cannot be used: backreferences")
    assert "old-echo: rule cannot be applied until it is fixed" in timeline["ignored"]

    assert main(["rules", "test", study.study_uid, "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "NO MATCH old-echo" in out and "rule cannot be applied until it is fixed: condition 0" in out
    assert main(["rules", "list", "--data-dir", str(data_dir)]) == 0
    assert "NEVER APPLIED until fixed: condition 0 (study_description)" in capsys.readouterr().out
