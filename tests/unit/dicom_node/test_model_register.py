"""``dicom-node models add``: format detection, missing files named, the registry text appended with its comments,
duplicates refused, a new version replacing its entry, the Device UID from the weights' bytes, the history row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dicom_node.app.cli import main
from dicom_node.db import model_history
from dicom_node.db.session import make_engine, make_session_factory
from dicom_node.model_catalog import ModelCatalog
from dicom_node.model_files import ModelFilesError, detect_format, inspect_model
from dicom_node.model_register import RegistrationError, register_model
from dicom_node.settings import load_settings

REPO = Path(__file__).resolve().parents[3]
BUNDLES = REPO / "workers" / "bundles"
LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
ANATOMY = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
REGISTRY = """# Our models. This comment must survive.
models:
  # the shipped segmentation bundle
  - id: chest-ct-segmentation
    kind: segmentation
    format: monai_bundle
    path: package://workers/bundles/chest_ct_segmentation
    version: "0.1.0"   # pinned

# trailing note
"""


def _bundle(tmp_path: Path, name: str = "bundle", version: str = "0.1.0", weights: bytes = b"weights-1") -> Path:
    """A copy of the shipped segmentation bundle's configs with fake weights (never loaded here)."""
    bundle = tmp_path / name
    shutil.copytree(BUNDLES / "chest_ct_segmentation" / "configs", bundle / "configs")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["version"] = version
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(weights)
    return bundle


def _nnunet(tmp_path: Path) -> Path:
    folder = tmp_path / "Dataset001_Lung" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lung": 1, "nodule": 2},
                                                     "channel_names": {"0": "CT"}}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {}}}))
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"checkpoint")
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(REGISTRY)
    return path


def test_formats_are_detected_and_a_missing_file_is_named(tmp_path: Path) -> None:
    assert detect_format(_bundle(tmp_path)) == "monai_bundle"
    nnunet = _nnunet(tmp_path)
    assert detect_format(nnunet) == "nnunet"
    found = inspect_model(nnunet)
    assert found.dataset_labels == {"lung": 1, "nodule": 2} and found.folds == ("fold_0",)
    for name, expected in (("net.ts", "torchscript"), ("net.onnx", "onnx")):
        (tmp_path / name).write_bytes(b"x")
        assert detect_format(tmp_path / name) == expected
    (tmp_path / "net.h5").write_bytes(b"x")
    with pytest.raises(ModelFilesError, match=r"suffix '.h5'"):
        detect_format(tmp_path / "net.h5")
    with pytest.raises(ModelFilesError, match="neither a MONAI bundle"):
        detect_format(tmp_path / "Dataset001_Lung")
    (nnunet / "plans.json").unlink()
    with pytest.raises(ModelFilesError, match="missing file plans.json"):
        inspect_model(nnunet)
    with pytest.raises(ModelFilesError, match="missing file fold_1/checkpoint_final.pth"):
        inspect_model(_nnunet(tmp_path / "again"), folds=[0, 1])
    zoo = tmp_path / "zoo"  # a Model Zoo bundle as downloaded: configs and large_files.yml, no weights
    shutil.copytree(BUNDLES / "chest_ct_segmentation" / "configs", zoo / "configs")
    (zoo / "large_files.yml").write_text("large_files: []\n")
    with pytest.raises(ModelFilesError, match=r"missing file models/model.pt \(weights are never downloaded"):
        inspect_model(zoo)


def test_a_bundle_is_appended_with_the_comments_kept_and_a_duplicate_refused(tmp_path: Path, registry: Path) -> None:
    bundle = _bundle(tmp_path)
    done = register_model(registry, bundle, "chest-copy", extra={"title": "AI copy"})
    text = registry.read_text()
    assert text.startswith(REGISTRY)  # the old text, comments and all, unchanged
    assert "# trailing note" in text and 'version: "0.1.0"   # pinned' in text
    catalog = ModelCatalog.from_file(registry)
    assert catalog.ids == ("chest-ct-segmentation", "chest-copy")
    entry = catalog.entry("chest-copy")
    assert (entry.version, entry.format, entry.kind, entry.title) == ("0.1.0", "monai_bundle", "segmentation",
                                                                       "AI copy")
    assert Path(entry.path) == bundle.resolve() and done.device_uid == catalog.device_uid("chest-copy")
    with pytest.raises(RegistrationError, match="'chest-copy' is already registered .* --replace"):
        register_model(registry, bundle, "chest-copy")
    with pytest.raises(RegistrationError, match="differs from the bundle's configs/metadata.json version '0.1.0'"):
        register_model(registry, bundle, "other", version="2.0")
    assert ModelCatalog.from_file(registry).ids == ("chest-ct-segmentation", "chest-copy")


def test_same_weights_same_device_uid_new_weights_new_uid_and_version_replaced(tmp_path: Path,
                                                                                registry: Path) -> None:
    first = register_model(registry, _bundle(tmp_path, "v1"), "lungs", extra={"series_number": 9500})
    twin = register_model(registry, _bundle(tmp_path, "twin"), "twin")  # same bytes, another folder
    assert twin.device_uid == first.device_uid and twin.weights_sha256 == first.weights_sha256
    assert first.device_uid.startswith("1.2.826.0.1.3680043.8.498.") and len(first.device_uid) <= 64
    with pytest.raises(RegistrationError, match="already at version '0.1.0'"):
        register_model(registry, _bundle(tmp_path, "same-version", weights=b"other"), "lungs", replace=True)
    second = register_model(registry, _bundle(tmp_path, "v2", "0.2.0", weights=b"weights-2"), "lungs", replace=True)
    assert second.device_uid != first.device_uid and second.replaced_version == "0.1.0"
    catalog = ModelCatalog.from_file(registry)
    assert catalog.ids == ("chest-ct-segmentation", "lungs", "twin")  # replaced in place, not appended
    lungs = catalog.entry("lungs")
    assert lungs.version == "0.2.0" and lungs.series_number == 9500  # fields not given are kept
    assert registry.read_text().startswith(REGISTRY.split("# trailing note")[0].rstrip("\n"))
    # The weights change on disk: the catalog hashes them again (cache by mtime and size).
    (tmp_path / "v2" / "models" / "model.pt").write_bytes(b"weights-3, longer")
    assert catalog.device_uid("lungs") not in (first.device_uid, second.device_uid)


def test_formats_without_labels_need_an_entry_file_and_say_what_to_write(tmp_path: Path, registry: Path) -> None:
    nnunet = _nnunet(tmp_path)
    with pytest.raises(RegistrationError, match="give --version"):
        register_model(registry, nnunet, "lung-nnunet")
    with pytest.raises(RegistrationError) as raised:
        register_model(registry, nnunet, "lung-nnunet", version="1")
    message = str(raised.value)
    assert "needs 'labels'" in message and "{value: 2, bundle_value: 2, name: nodule" in message
    labels = [{"value": 1, "bundle_value": 1, "name": "lung", "code": LUNG, "category": ANATOMY}]
    done = register_model(registry, nnunet, "lung-nnunet", version="1",
                          extra={"labels": labels, "nnunet": {"folds": [0], "use_mirroring": False}})
    assert done.entry.nnunet is not None and done.entry.nnunet.use_mirroring is False
    onnx = tmp_path / "seg.onnx"
    onnx.write_bytes(b"onnx bytes")
    with pytest.raises(RegistrationError, match="preprocessing"):
        register_model(registry, onnx, "seg-onnx", version="1", extra={"labels": labels})
    with pytest.raises(RegistrationError, match="may not set path"):
        register_model(registry, onnx, "seg-onnx", version="1", extra={"path": "/elsewhere"})
    register_model(registry, onnx, "seg-onnx", version="1", extra={
        "labels": labels, "preprocessing": {"spacing_mm": [2, 2, 2], "window_hu": [-1000, 500],
                                            "roi_size": [32, 32, 32]}})
    assert ModelCatalog.from_file(registry).ids == ("chest-ct-segmentation", "lung-nnunet", "seg-onnx")


def test_an_entry_that_breaks_the_registry_leaves_the_file_as_it_was(tmp_path: Path, registry: Path) -> None:
    before = registry.read_text()
    with pytest.raises(RegistrationError, match="result series numbers"):  # its block overlaps the first model's
        register_model(registry, _bundle(tmp_path), "clash", extra={"series_number": 9012})
    assert registry.read_text() == before
    assert not list(tmp_path.glob(".models.yaml.*"))  # no temporary file left behind


def test_cli_adds_records_the_history_and_says_how_to_start_a_registry(tmp_path: Path, registry: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["db", "upgrade", "--data-dir", str(data)]) == 0  # models add works on the node's database
    capsys.readouterr()
    assert main(["models", "add", str(_bundle(tmp_path)), "--id", "x", "--data-dir", str(data)]) == 1
    assert "copy config/models.yaml" in capsys.readouterr().err.replace("Copy", "copy")
    entry = tmp_path / "entry.yaml"
    entry.write_text("title: AI lungs\n")
    assert main(["models", "add", str(_bundle(tmp_path, "b1")), "--id", "lungs", "--registry", str(registry),
                 "--entry", str(entry), "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "model lungs: monai_bundle segmentation, version 0.1.0" in out and "Device UID 1.2.826." in out
    assert main(["models", "add", str(_bundle(tmp_path, "b2", "0.2.0", b"new")), "--id", "lungs", "--replace",
                 "--registry", str(registry), "--data-dir", str(data)]) == 0
    assert main(["models", "add", str(tmp_path / "nowhere"), "--id", "y", "--registry", str(registry),
                 "--data-dir", str(data)]) == 1
    assert "model path" in capsys.readouterr().err
    settings = load_settings(None, {"data_dir": data})
    history = model_history.history(make_session_factory(make_engine(settings.resolved_database_url)))["lungs"]
    assert [h.version for h in history] == ["0.2.0", "0.1.0"]
    assert history[0].device_uid != history[1].device_uid and history[0].registered_by == "cli"
    assert yaml.safe_load(registry.read_text())["models"][1]["title"] == "AI lungs"
