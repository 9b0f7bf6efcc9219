"""The models page as a catalogue: each model's Device UID (from its weights), the routing rules that name it,
its inputs and its version history (registrations by ``dicom-node models add``), on the page and in the API."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

from dicom_node.db import config_repo, model_history
from dicom_node.ingest import utc_now
from dicom_node.model_register import register_model
from dicom_node.routing import default_rules
from tests.web.conftest import make_web_env
from tests.web.test_rules import page, squash

BUNDLES = Path(__file__).resolve().parents[2] / "workers" / "bundles"


def _bundle(folder: Path, version: str, weights: bytes) -> Path:
    shutil.copytree(BUNDLES / "chest_ct_segmentation" / "configs", folder / "configs")
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta | {"version": version}))
    (folder / "models").mkdir()
    (folder / "models" / "model.pt").write_bytes(weights)
    return folder


def test_models_page_shows_device_uid_rules_inputs_and_version_history(tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    shutil.copy(Path(__file__).resolve().parents[2] / "config" / "models.yaml", registry)
    env = make_web_env(tmp_path / "web", **{"routing.models_file": registry})
    now = utc_now()
    for step, (version, weights) in enumerate((("0.1.0", b"first"), ("0.2.0", b"second"))):
        done = register_model(registry, _bundle(tmp_path / version, version, weights), "mine",
                              extra={"series_number": 9500}, replace=step > 0)
        model_history.record_registration(
            env.sessions, model_id="mine", version=version, model_format="monai_bundle", path=done.entry.path,
            device_uid=done.device_uid, weights_sha256=done.weights_sha256, by="cli",
            now=now + timedelta(minutes=step), registry_file=str(registry))
    rule = default_rules()[0].model_copy(update={"name": "mine-too", "pipelines": ["mine", "chest-ct-segmentation"]})
    config_repo.upsert_rules(env.sessions, [*default_rules(), rule], source="test", now=now)
    viewer = env.login("viewer")
    html = viewer.client.get("/models").text
    ids = page(html)
    assert squash(ids["model-chest-ct-segmentation-rules"].text) == "ct-default, mine-too"
    assert squash(ids["model-lung-nodule-detection-rules"].text) == "ct-default"
    assert squash(ids["model-mine-rules"].text) == "mine-too"
    history = html.split('id="model-mine-history"')[1].split("</table>")[0]
    assert history.index('<td class="mono">0.2.0</td>') < history.index('<td class="mono">0.1.0</td>')  # newest first
    models = {m["id"]: m for m in viewer.client.get("/api/v1/models").json()["models"]}
    mine, seg = models["mine"], models["chest-ct-segmentation"]
    assert mine["device_uid"] == mine["history"][0]["device_uid"] != mine["history"][1]["device_uid"]
    assert squash(ids["model-mine-device-uid"].text) == mine["device_uid"]
    assert seg["device_uid"].startswith("1.2.826.0.1.3680043.8.498.") and seg["history"] == []
    assert ["Preprocessing", "the bundle's configs/inference.json"] in seg["inputs"]
    assert [label["name"] for label in seg["labels"]] == ["body", "lung", "heart", "bone", "nodule"]  # outputs
    seg_html = html.split('data-model="chest-ct-segmentation"')[1].split("</section>")[0]
    assert "Not registered with" in seg_html and "model-chest-ct-segmentation-history" not in seg_html
