"""The models page and API: the shipped bundles with their held-out figures, broken entries shown in their
row, load states from the workers' heartbeats - and metadata only, never the weights; admins enable and
disable models (audited), and the router and the rule tester skip a disabled model."""

from __future__ import annotations

import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from dicom_node.conductor import decide
from dicom_node.db import audit, config_repo, model_settings, workers
from dicom_node.ingest import utc_now
from dicom_node.routing import default_rules
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from tests.web.test_rules import ingest, page, squash
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

BUNDLES = Path(__file__).resolve().parents[2] / "workers" / "bundles"
LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
ANATOMY = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}


def test_models_page_shows_the_shipped_bundles_with_held_out_figures(web: WebEnv, viewer: LoggedIn) -> None:
    page = viewer.client.get("/models")
    assert page.status_code == 200
    html = page.text
    assert "Chest CT segmentation (SegResNet + nodule branch)" in html and "Lung nodule detection (CenterNet 3D)" in html
    seg = html.split('data-model="chest-ct-segmentation"')[1].split('data-model="lung-nodule-detection"')[0]
    det = html.split('data-model="lung-nodule-detection"')[1]
    # Held-out figures first, validation beside them.
    assert re.search(r'<th class="num" data-split="held_out">Held-out test set<br><span class="muted small">32 cases'
                     r'</span></th><th class="num" data-split="validation">Validation', seg)
    assert '<th scope="row">Dice lung</th><td class="num">0.975</td><td class="num">0.951</td>' in seg
    assert '<th scope="row">Dice nodule</th><td class="num">0.732</td><td class="num">0.653</td>' in seg
    assert '<th scope="row">Dice heart</th><td class="num">0.952</td><td class="num">0.954</td>' in seg
    assert '<th scope="row">Mean Dice</th><td class="num">0.921</td><td class="num">0.901</td>' in seg
    assert '<th scope="row">Dice nodule, 24 cases with nodule</th><td class="num">0.726</td>' in seg
    # Nodule by nodule, by size: held-out only (the validation split has no lesion-wise figures).
    assert '<th scope="row">Found, nodules &gt;= 8 mm (35)</th><td class="num">0.971</td><td class="num">-</td>' in seg
    assert '<th scope="row">Found, nodules &lt; 6 mm (25)</th><td class="num">0.400</td>' in seg
    assert '<th scope="row">False nodules per case</th><td class="num">0.188</td>' in seg
    assert "2.2 × 2.2 × 2.5" in seg and "-1000.0 to 500.0" in seg
    assert 'fill="#56b4e9"' in seg and "SCT:39607008" in seg  # lung: colour swatch (the palette's) and code
    det_held_out = det.split('data-split="held_out"')[1].split('data-split="validation"')[0]
    assert "Sensitivity at false positives per scan" in det_held_out
    all_nodules = det_held_out.split('<th scope="row">all nodules (63)</th>')[1].split("</tr>")[0]
    large = det_held_out.split('<th scope="row">nodules &gt;= 6 mm (38)</th>')[1].split("</tr>")[0]
    assert re.findall(r">([\d.]+)</td>", all_nodules) == ["0.603", "0.603", "0.635", "0.683", "0.698", "0.698",
                                                          "0.698", "0.660"]  # 0.125 ... 8 FP/scan, CPM
    assert re.findall(r">([\d.]+)</td>", large)[-1] == "0.917"
    assert "model.pt" in seg and "MiB" in seg
    assert "No online worker has reported this model" in seg
    assert " style=" not in html


def test_models_api_gives_the_same_figures(web: WebEnv) -> None:
    token = web.token("viewer")
    answer = web.client().get("/api/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200
    catalog = answer.json()
    assert catalog["error"] is None
    models = {m["id"]: m for m in catalog["models"]}
    assert list(models) == ["chest-ct-segmentation", "lung-nodule-detection"]
    seg, det = models["chest-ct-segmentation"], models["lung-nodule-detection"]
    assert seg["error"] is None and det["error"] is None
    assert seg["kind"] == "segmentation" and det["kind"] == "detection" and seg["version"] == "0.1.0"
    assert [label["name"] for label in seg["labels"]] == ["body", "lung", "heart", "bone", "nodule"]
    assert seg["spacing_mm"] == [2.2, 2.2, 2.5] and det["window_hu"] == [-1000.0, 400.0]
    held_out = seg["evaluations"][0]
    assert held_out["split"] == "held_out" and held_out["cases"] == 32
    figures = dict(held_out["figures"])
    assert figures["Dice lung"] == pytest.approx(0.9754, abs=1e-4)
    assert figures["Mean Dice"] == pytest.approx(0.9212, abs=1e-4)
    assert figures["Dice nodule, 24 cases with nodule"] == pytest.approx(0.7258, abs=1e-4)
    assert figures["Dice per nodule, nodules >= 8 mm"] == pytest.approx(0.8190, abs=1e-4)
    assert figures["Found, nodules 6-8 mm (3)"] == pytest.approx(1 / 3)
    assert seg["evaluations"][1]["split"] == "validation"
    froc = {f["subset"]: f for f in det["evaluations"][0]["froc"]}
    assert det["evaluations"][0]["split"] == "held_out"
    assert froc["all nodules"]["sensitivity_at"]["1"] == pytest.approx(0.6825, abs=1e-4)
    assert froc["nodules >= 6 mm"]["cpm"] == pytest.approx(0.9173, abs=1e-4)
    one = web.client().get("/api/v1/models/lung-nodule-detection", headers={"Authorization": f"Bearer {token}"})
    assert one.status_code == 200 and one.json() == det
    missing = web.client().get("/api/v1/models/nope", headers={"Authorization": f"Bearer {token}"})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert web.client().get("/api/v1/models").status_code == 401


CHEST_LINE = "CT; chest; slices >= 10; pixel spacing mm 0.3-3; slice spacing mm 0.3-6; axial"


def test_each_model_shows_what_it_was_made_for_its_rules_and_its_series(web: WebEnv, viewer: LoggedIn) -> None:
    ids = page(viewer.client.get("/models").text)
    assert squash(ids["model-chest-ct-segmentation-made-for"].text) == CHEST_LINE
    assert "model-chest-ct-segmentation-region-warning" not in ids
    rules = squash(ids["model-chest-ct-segmentation-plausibility"].text)
    assert rules.startswith("lung 1000-9000 mL; heart 100-1500 mL; nodule <= 500 mL; lung, heart, nodule inside the "
                            "body (2 % may be outside, lung: 5 %); heart touches lung on both sides (within 10 mm)")
    assert squash(ids["model-lung-nodule-detection-plausibility"].text) == "findings inside the lungs (margin 5 mm)"
    assert squash(ids["model-chest-ct-segmentation-series"].text) == (
        "9011 AI chest anatomy - SEG (chest-ct-segmentation 0.1.0) "
        "9012 AI chest anatomy - SR (chest-ct-segmentation 0.1.0) "
        "9015 AI chest anatomy - SC (chest-ct-segmentation 0.1.0) "
        "9018 AI chest anatomy - key images (chest-ct-segmentation 0.1.0) "
        "9019 AI chest anatomy - not performed (chest-ct-segmentation 0.1.0)")
    assert "9023 AI lung nodules - GSPS (lung-nodule-detection 0.1.0)" in squash(
        ids["model-lung-nodule-detection-series"].text)

    models = {m["id"]: m for m in viewer.client.get("/api/v1/models").json()["models"]}
    seg, det = models["chest-ct-segmentation"], models["lung-nodule-detection"]
    assert seg["made_for"] == CHEST_LINE and seg["made_for_warning"] is None and seg["error"] is None
    assert seg["input_domain"]["body_regions"] == ["chest"]
    assert seg["input_domain"]["slices"] == {"min": 10, "max": None}
    assert seg["plausibility"]["volumes_ml"]["lung"] == {"min": 1000, "max": 9000}
    assert seg["plausibility"]["adjacent"]["heart"] == [{"label": "lung", "sides": "both"}]
    assert "heart touches lung on both sides (within 10 mm)" in seg["plausibility_summary"]
    assert det["plausibility"] == {"findings_inside": "lungs", "findings_margin_mm": 5.0}
    assert [(s["kind"], s["series_number"]) for s in det["result_series"]] == [("SR", 9022), ("GSPS", 9023),
                                                                               ("SC", 9025), ("KO", 9028),
                                                                               ("NOTICE", 9029)]
    assert seg["result_series"][0] == {"kind": "SEG", "series_number": 9011,
                                       "description": "AI chest anatomy - SEG (chest-ct-segmentation 0.1.0)"}


def test_a_model_without_body_regions_is_flagged_and_a_bad_declaration_is_its_error(tmp_path: Path) -> None:
    broken = tmp_path / "thorax"
    shutil.copytree(BUNDLES / "chest_ct_segmentation" / "configs", broken / "configs")
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["dicom_node"]["input_domain"] = {"modalities": ["CT"], "body_regions": ["thorax"]}
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    registry = tmp_path / "models.yaml"
    registry.write_text("""
models:
  - {id: anywhere, kind: segmentation, format: monai_bundle, path: package://workers/bundles/chest_ct_segmentation,
     version: "0.1.0", input_domain: {modalities: [CT], slices: {min: 20}}}
  - {id: liver-rules, kind: segmentation, format: monai_bundle, path: package://workers/bundles/chest_ct_segmentation,
     version: "0.1.0", input_domain: {modalities: [CT], body_regions: [chest]},
     plausibility: {volumes_ml: {liver: {max: 3000}}}}
  - {id: thorax, kind: segmentation, format: monai_bundle, path: thorax, version: "0.1.0"}
""")
    env = make_web_env(tmp_path / "web", **{"routing.models_file": registry})
    viewer = env.login("viewer")
    answer = viewer.client.get("/models")
    assert answer.status_code == 200
    ids = page(answer.text)
    assert squash(ids["model-anywhere-made-for"].text).startswith("CT; slices >= 20")
    warning = ids["model-anywhere-region-warning"]
    assert squash(warning.text) == "Warning: no body region declared - runs on any region of its modality."
    assert warning.attrs["role"] == "alert"
    assert squash(ids["model-anywhere-plausibility"].text) == "none: results are sent without a plausibility check"
    assert "model-liver-rules-region-warning" not in ids
    models = {m["id"]: m for m in viewer.client.get("/api/v1/models").json()["models"]}
    assert models["anywhere"]["made_for_warning"] == "no body region declared - runs on any region of its modality"
    assert models["anywhere"]["error"] is None and models["anywhere"]["plausibility"] is None
    liver, thorax = models["liver-rules"], models["thorax"]
    assert "plausibility names label(s) 'liver'" in liver["error"] and liver["made_for"] == "CT; chest"
    assert liver["plausibility"] is None and liver["plausibility_summary"] == []
    assert "dicom_node.input_domain is invalid" in thorax["error"] and thorax["input_domain"] is None
    assert [s["series_number"] for s in thorax["result_series"]] == [9031, 9032, 9035, 9038, 9039]
    for model_id, words in (("liver-rules", "plausibility names label(s) &#39;liver&#39;"),
                            ("thorax", "dicom_node.input_domain is invalid")):
        row = _section(answer.text, model_id)
        assert "model-error" in row and words in row, model_id
    assert squash(ids["model-thorax-made-for"].text) == "-"


def _registry(tmp_path: Path) -> Path:
    """A registry with a good bundle (its weights garbage: never read), a missing one, a version mismatch,
    a bundle with broken metadata, and hostile text in a label."""
    good = tmp_path / "copy"
    shutil.copytree(BUNDLES / "chest_ct_segmentation" / "configs", good / "configs")
    (good / "models").mkdir()
    (good / "models" / "model.pt").write_bytes(b"not a checkpoint - reading it would fail")
    bad = tmp_path / "bad"
    (bad / "configs").mkdir(parents=True)
    (bad / "configs" / "metadata.json").write_text("{ not json")
    path = tmp_path / "models.yaml"
    path.write_text(f"""
models:
  - id: good-copy
    kind: segmentation
    format: monai_bundle
    path: copy
    version: "0.1.0"
    labels:
      - {{value: 2, name: "<img src=x onerror=alert(1)>", code: {LUNG}, category: {ANATOMY}, color_rgb: [200, 30, 60]}}
  - id: missing
    kind: segmentation
    format: monai_bundle
    path: /nonexistent/bundle
    version: "1.0"
  - id: wrong-version
    kind: detection
    format: monai_bundle
    path: package://workers/bundles/lung_nodule_detection
    version: "9.9"
  - id: bad-json
    kind: segmentation
    format: monai_bundle
    path: bad
    version: "1"
""")
    return path


def test_broken_entries_show_their_error_and_the_page_still_renders(tmp_path: Path) -> None:
    env = make_web_env(tmp_path / "web", **{"routing.models_file": _registry(tmp_path)})
    viewer = env.login("viewer")
    page = viewer.client.get("/models")
    assert page.status_code == 200
    models = {m["id"]: m for m in viewer.client.get("/api/v1/models").json()["models"]}
    assert models["good-copy"]["error"] is None  # metadata read, weights never touched
    assert models["good-copy"]["weights"] == [["model.pt", 40]]
    assert models["good-copy"]["evaluations"][0]["split"] == "held_out"
    assert "does not exist" in models["missing"]["error"] and not models["missing"]["path_exists"]
    assert "9.9" in models["wrong-version"]["error"] and "0.1.0" in models["wrong-version"]["error"]
    assert "not valid JSON" in models["bad-json"]["error"]
    html = page.text
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'fill="#c81e3c"' in html  # the configured colour (not a grey: greys take the palette's)
    for model_id in ("missing", "wrong-version", "bad-json"):
        row = html.split(f'data-model="{model_id}"')[1].split("</section>")[0]
        assert "model-error" in row, model_id


def test_unreadable_registry_is_one_error_on_a_page_that_renders(tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text("models:\n  - id: x\n    kind: segmentation\n    colour: red\n")
    env = make_web_env(tmp_path / "web", **{"routing.models_file": registry})
    viewer = env.login("viewer")
    page = viewer.client.get("/models")
    assert page.status_code == 200 and "The model registry cannot be read." in page.text
    assert "colour" in page.text
    api = viewer.client.get("/api/v1/models").json()
    assert api["models"] == [] and "invalid model registry" in api["error"]


def test_load_states_come_from_online_workers_only(web: WebEnv, viewer: LoggedIn) -> None:
    now = utc_now()
    workers.upsert_worker(web.sessions, name="gpu-a:1", queues=["gpu"], device="cuda:0 (Test GPU)",
                          started_at=now, now=now, models={
                              "chest-ct-segmentation": {"state": "loaded", "device": "cuda:0", "error": None},
                              "lung-nodule-detection": {"state": "failed", "device": "cuda:0",
                                                        "error": "CUDA out of memory"}})
    workers.upsert_worker(web.sessions, name="old:2", queues=["gpu"], device="cpu", started_at=now,
                          now=now - timedelta(seconds=web.settings.web.worker_stale_seconds + 5),
                          models={"chest-ct-segmentation": {"state": "loading", "device": "cpu"}})
    models = {m["id"]: m for m in viewer.client.get("/api/v1/models").json()["models"]}
    assert models["chest-ct-segmentation"]["workers"] == [
        {"worker": "gpu-a:1", "state": "loaded", "device": "cuda:0", "error": None}]
    assert models["lung-nodule-detection"]["workers"][0]["error"] == "CUDA out of memory"
    html = viewer.client.get("/models").text
    assert "gpu-a:1" in html and "old:2" not in html and "CUDA out of memory" in html



# --------------------------------------------------------------------------- enable / disable


def _section(html: str, model_id: str) -> str:
    return html.split(f'data-model="{model_id}"')[1].split("</section>")[0]


def test_admin_disables_and_enables_a_model_with_the_form(web: WebEnv, admin: LoggedIn, viewer: LoggedIn) -> None:
    seg = _section(admin.client.get("/models").text, "chest-ct-segmentation")
    assert '<span class="badge enabled" id="model-chest-ct-segmentation-state">Enabled</span>' in seg
    assert 'action="/models/chest-ct-segmentation/disable"' in seg and 'name="csrf_token"' in seg
    note = "Bad lung masks <script>alert(1)</script> reported"
    answer = admin.post("/models/chest-ct-segmentation/disable", {"note": note})
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/models?done=disabled&model=chest-ct-segmentation")
    page = admin.client.get(answer.headers["location"])
    assert "Model chest-ct-segmentation disabled" in page.text
    seg, det = _section(page.text, "chest-ct-segmentation"), _section(page.text, "lung-nodule-detection")
    assert '<span class="badge disabled" id="model-chest-ct-segmentation-state">Disabled</span>' in seg
    assert "Bad lung masks &lt;script&gt;alert(1)&lt;/script&gt; reported" in seg and "<script>alert" not in page.text
    assert "Disabled by <span class=\"mono\">admin</span>" in seg
    assert 'action="/models/chest-ct-segmentation/enable"' in seg
    assert '<span class="badge enabled" id="model-lung-nodule-detection-state">Enabled</span>' in det
    # a viewer sees the state and the note, but no form
    seen = _section(viewer.client.get("/models").text, "chest-ct-segmentation")
    assert "Disabled</span>" in seen and "Bad lung masks &lt;script&gt;" in seen and "<form" not in seen

    assert admin.post("/models/chest-ct-segmentation/enable", {"note": ""}).status_code == 303
    seg = _section(admin.client.get("/models").text, "chest-ct-segmentation")
    assert "Enabled</span>" in seg and "Bad lung masks" not in seg and "Enabled by" in seg

    [disable] = audit.list_entries(web.sessions, action="model.disable")
    [enable] = audit.list_entries(web.sessions, action="model.enable")
    assert (disable.actor, disable.target_kind, disable.target) == ("admin", "model", "chest-ct-segmentation")
    assert disable.before == {"enabled": True, "note": None} and disable.after == {"enabled": False, "note": note}
    assert enable.before == {"enabled": False, "note": note} and enable.after == {"enabled": True, "note": None}


def test_form_errors_unknown_models_and_missing_csrf(web: WebEnv, admin: LoggedIn) -> None:
    too_long = admin.post("/models/lung-nodule-detection/disable", {"note": "n" * 501})
    assert too_long.status_code == 422
    det = _section(too_long.text, "lung-nodule-detection")
    assert "note is 501 characters long; at most 500 are allowed" in det and 'value="' + "n" * 501 + '"' in det
    assert admin.post("/models/nope/disable", {"note": "x"}).status_code == 404
    no_csrf = admin.client.post("/models/lung-nodule-detection/disable", data={"note": "x"})
    assert no_csrf.status_code == 403
    assert model_settings.disabled_models(web.sessions) == set()
    assert audit.list_entries(web.sessions, action="model.disable") == []


def test_api_put_changes_the_setting_and_get_shows_it(web: WebEnv) -> None:
    headers = {"Authorization": f"Bearer {web.token('admin')}"}
    client = web.client()
    answer = client.put("/api/v1/models/lung-nodule-detection", headers=headers,
                        json={"enabled": False, "note": "replacing the bundle"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"] == "lung-nodule-detection" and body["enabled"] is False
    assert body["note"] == "replacing the bundle" and body["updated_by"] == "admin" and body["updated_at"]
    models = {m["id"]: m for m in client.get("/api/v1/models", headers=headers).json()["models"]}
    assert models["lung-nodule-detection"] == body
    seg = models["chest-ct-segmentation"]
    assert (seg["enabled"], seg["note"], seg["updated_by"], seg["updated_at"]) == (True, None, None, None)
    [entry] = audit.list_entries(web.sessions, action="model.disable")
    assert entry.after == {"enabled": False, "note": "replacing the bundle"} and "API token" in (entry.detail or "")

    back = client.put("/api/v1/models/lung-nodule-detection", headers=headers, json={"enabled": True})
    assert back.status_code == 200 and back.json()["enabled"] is True and back.json()["note"] is None
    assert client.get("/api/v1/models/lung-nodule-detection", headers=headers).json()["enabled"] is True

    missing = client.put("/api/v1/models/nope", headers=headers, json={"enabled": False})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    for bad in ({"enabled": "no"}, {}, {"enabled": False, "note": "n" * 501}, {"enabled": False, "colour": "red"}):
        refused = client.put("/api/v1/models/lung-nodule-detection", headers=headers, json=bad)
        assert refused.status_code == 422, bad
    assert model_settings.disabled_models(web.sessions) == set()


def test_viewer_and_operator_cannot_change_models(web: WebEnv, viewer: LoggedIn, operator: LoggedIn) -> None:
    for who in (viewer, operator):
        assert who.post("/models/chest-ct-segmentation/disable", {"note": "x"}).status_code == 403
        assert who.send("PUT", "/api/v1/models/chest-ct-segmentation", json={"enabled": False}).status_code == 403
        assert 'action="/models/chest-ct-segmentation/disable"' not in who.client.get("/models").text
    for username in ("viewer", "operator"):
        answer = web.client().put("/api/v1/models/chest-ct-segmentation", json={"enabled": False},
                                  headers={"Authorization": f"Bearer {web.token(username)}"})
        assert answer.status_code == 403
    assert model_settings.disabled_models(web.sessions) == set()
    assert audit.list_entries(web.sessions, action="model.disable") == []


def test_settings_on_postgresql_too(tmp_path: Path, database_url: str) -> None:
    env = make_web_env(tmp_path / "web", database_url)
    admin = env.login("admin")
    answer = admin.send("PUT", "/api/v1/models/chest-ct-segmentation", json={"enabled": False, "note": "ß ✓"})
    assert answer.status_code == 200 and answer.json()["note"] == "ß ✓"
    assert model_settings.disabled_models(env.sessions) == {"chest-ct-segmentation"}


# --------------------------------------------------------------------------- the router respects it


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSeries:
    """A small chest CT series (12 slices): the built-in rule runs both demo models on it."""
    return generate_ct_series(tmp_path_factory.mktemp("models_ct"), geometry=SeriesGeometry(
        rows=32, columns=32, slices=12, slice_spacing=5.0, slice_thickness=5.0), seed=43)


def test_the_router_and_the_rule_tester_skip_a_disabled_model(
    web: WebEnv, admin: LoggedIn, ct_series: GeneratedSeries
) -> None:
    ingest(web, ct_series.paths)
    config_repo.upsert_rules(web.sessions, default_rules(), source="test", now=utc_now())
    study_id = config_repo.study_id_for_uid(web.sessions, ct_series.study_uid)
    assert study_id is not None
    both = decide(web.sessions, web.settings.spool_dir, study_id)
    assert sorted(j.pipeline for j in both.jobs) == ["chest-ct-segmentation", "lung-nodule-detection"]

    admin.post("/models/chest-ct-segmentation/disable", {"note": "bad masks"})
    one = decide(web.sessions, web.settings.spool_dir, study_id)
    assert [j.pipeline for j in one.jobs] == ["lung-nodule-detection"]
    assert "pipeline chest-ct-segmentation is disabled by an admin" in one.outcomes[0].reasons
    tested = admin.send("POST", "/api/v1/rules/ct-default/test", json={"study_instance_uid": ct_series.study_uid})
    assert tested.status_code == 200
    result = tested.json()["result"]
    assert [j["pipeline"] for j in result["jobs"]] == ["lung-nodule-detection"]
    assert "pipeline chest-ct-segmentation is disabled by an admin" in result["outcome"]["reasons"]

    admin.post("/models/lung-nodule-detection/disable")
    none = decide(web.sessions, web.settings.spool_dir, study_id)
    assert none.jobs == () and none.ignored_reason is not None
    assert "pipeline lung-nodule-detection is disabled by an admin" in none.ignored_reason
    page = admin.client.get(f"/rules/ct-default/test?study_pick={ct_series.study_uid}").text
    assert "pipeline chest-ct-segmentation is disabled by an admin" in page and "0 jobs would be created" in " ".join(
        page.split())

    admin.post("/models/chest-ct-segmentation/enable")
    admin.post("/models/lung-nodule-detection/enable")
    assert decide(web.sessions, web.settings.spool_dir, study_id).jobs == both.jobs
