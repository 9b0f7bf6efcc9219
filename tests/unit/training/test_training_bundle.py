"""Writing and reading MONAI bundles (training.bundle), without any training."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dicom_node.palette import palette_colour
from tests.zoo import model_zoo_bundle
from training.bundle import (
    HAND_WRITTEN_MARKER,
    dicom_node_section,
    label_entries,
    moved_targets,
    read_bundle_metadata,
    record_evaluation,
    with_current_targets,
    write_bundle,
)
from training.labels import CHEST_LABELS



class Unscriptable(nn.Module):
    """A module torch.jit.script rejects (``**kwargs``) but torch.jit.trace handles."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.conv(x)


def _metadata(**node: Any) -> dict[str, Any]:
    section = {
        "kind": "segmentation",
        "spacing_mm": (1.5, 1.5, 2.0),
        "intensity_window_hu": (-1000, 500),
        "labels": CHEST_LABELS[:1],
        **node,
    }
    spec = {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
            "spatial_shape": [8, 8, 8], "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
            "channel_def": {"0": "image"}}
    return {
        "task": "test",
        "description": "a test bundle",
        "network_data_format": {"inputs": {"image": spec},
                                "outputs": {"pred": {**spec, "format": "segmentation", "num_channels": 2,
                                                     "channel_def": {"0": "background", "1": "body"}}}},
        "dicom_node": dicom_node_section(**section),
    }


def _conv_def() -> dict[str, Any]:
    return {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding": 1}


def test_write_bundle_scripts_and_completes_the_metadata(tmp_path: Path) -> None:
    network = nn.Conv3d(1, 2, 3, padding=1)
    x = torch.rand(1, 1, 8, 8, 8)
    bundle = write_bundle(tmp_path / "b", network=network, network_def=_conv_def(),
                          inference_config={"bundle_root": ".", "network": "$@network_def"},
                          metadata=_metadata(), example_input=x)
    meta = read_bundle_metadata(bundle)
    assert meta["schema"].endswith("meta_schema_20240725.json")
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    assert "nibabel" in meta["required_packages_version"]
    assert meta["dicom_node"]["torchscript"] == {"written": True, "method": "script"}
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"] == _conv_def()
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(state) == {"weight", "bias"}
    extra = {"inference.json": "", "metadata.json": ""}
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["inference.json"])["network_def"] == _conv_def()
    assert json.loads(extra["metadata.json"])["dicom_node"]["kind"] == "segmentation"
    torch.testing.assert_close(scripted(x), network(x))
    readme = (bundle / "docs" / "README.md").read_text()
    assert "38266002" in readme and "monai.bundle run" in readme


def test_write_bundle_falls_back_to_tracing(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", network=Unscriptable(), network_def=_conv_def(), inference_config={},
                          metadata=_metadata(), example_input=torch.rand(1, 1, 8, 8, 8))
    assert read_bundle_metadata(bundle)["dicom_node"]["torchscript"] == {"written": True, "method": "trace"}
    assert torch.jit.load(str(bundle / "models" / "model.ts"))(torch.rand(1, 1, 4, 4, 4)).shape == (1, 2, 4, 4, 4)


def test_write_bundle_skips_torchscript_with_a_logged_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="training.bundle"):
        bundle = write_bundle(tmp_path / "b", network=Unscriptable(), network_def=_conv_def(),
                              inference_config={}, metadata=_metadata(), example_input=None)
    assert not (bundle / "models" / "model.ts").exists()
    assert (bundle / "models" / "model.pt").exists()
    ts = read_bundle_metadata(bundle)["dicom_node"]["torchscript"]
    assert ts["written"] is False and "example_input" in ts["reason"]
    assert "no TorchScript model written" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "classification"}, "dicom_node.kind"),
        ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
        ({"intensity_window_hu": (500, -1000)}, "intensity_window_hu"),
        ({"labels": []}, "dicom_node.labels"),
    ],
)
def test_dicom_node_section_rejects_bad_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _metadata(**change)


def test_write_bundle_rejects_incomplete_metadata(tmp_path: Path) -> None:
    meta = _metadata()
    meta["dicom_node"]["labels"][0]["code"] = {"value": "38266002", "meaning": "Entire body"}
    with pytest.raises(ValueError, match=r"labels\[0\]\.code\.scheme"):
        write_bundle(tmp_path / "b", network=nn.Identity(), network_def={}, inference_config={}, metadata=meta)
    meta = _metadata()
    del meta["network_data_format"]
    with pytest.raises(ValueError, match="network_data_format"):
        write_bundle(tmp_path / "c", network=nn.Identity(), network_def={}, inference_config={}, metadata=meta)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_label_entries_follow_the_label_table() -> None:
    entries = label_entries(CHEST_LABELS)
    assert [e["value"] for e in entries] == [1, 2, 3, 4, 5]
    nodule = entries[-1]
    assert nodule["code"] == {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
    assert nodule["category"]["scheme"] == "SCT" and nodule["color_rgb"] == list(palette_colour(5))


def test_record_evaluation_adds_held_out_figures(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", network=nn.Conv3d(1, 2, 1), network_def=_conv_def(), inference_config={},
                          metadata=_metadata(evaluation={"split": "validation"}))
    record_evaluation(bundle, "held_out", {"cases": 4, "mean_dice": 0.9})
    meta = read_bundle_metadata(bundle)
    assert meta["dicom_node"]["evaluation"] == {"split": "validation", "held_out": {"cases": 4, "mean_dice": 0.9}}
    assert meta["eval_metrics"]["mean_dice"] == 0.9
    assert '"mean_dice": 0.9' in (bundle / "docs" / "README.md").read_text()


def test_regenerated_model_cards_keep_their_hand_written_part(tmp_path: Path) -> None:
    """A retrained model or a recorded figure rewrites the card's generated part, never its history."""
    bundle = write_bundle(tmp_path / "b", network=nn.Conv3d(1, 2, 1), network_def=_conv_def(), inference_config={},
                          metadata=_metadata())
    card = bundle / "docs" / "README.md"
    history = f"{HAND_WRITTEN_MARKER} ... -->\n\n## History\n\nTrained three times; the second run was not shipped.\n"
    card.write_text(card.read_text() + "\n" + history)
    record_evaluation(bundle, "held_out", {"cases": 4, "mean_dice": 0.9})
    write_bundle(bundle, network=nn.Conv3d(1, 2, 1), network_def=_conv_def(), inference_config={}, metadata=_metadata())
    text = card.read_text()
    assert text.endswith(history) and text.count(HAND_WRITTEN_MARKER) == 1
    assert text.startswith("# ") and '"mean_dice"' not in text.split(HAND_WRITTEN_MARKER)[0]  # regenerated


def test_read_bundle_metadata_of_a_model_zoo_bundle() -> None:
    meta = read_bundle_metadata(model_zoo_bundle("spleen_ct_segmentation"))
    assert "dicom_node" not in meta
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "spleen"


def test_read_bundle_metadata_reports_malformed_files(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_bundle_metadata(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_bundle_metadata(tmp_path / "missing")


def _located(target: str) -> Any:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_old_targets_of_moved_classes_still_name_them_and_exports_use_the_new_ones(tmp_path: Path) -> None:
    """Bundles exported before the inference networks moved to workers.models name `training.*` targets: those
    resolve to the same classes (thin re-exports), and a bundle written from such a config names workers.models."""
    moved = moved_targets()
    for old, new in moved.items():
        assert old.startswith("training.") and new.startswith("workers.models."), (old, new)
        assert _located(old) is _located(new), old
    old_filter = "training.postprocessing.DropSmallComponentsd"
    config = {"postprocessing": {"transforms": [{"_target_": "Activationsd"}, {"_target_": old_filter, "channel": 1}]},
              "note": old_filter}
    current = with_current_targets(config)
    assert current["postprocessing"]["transforms"] == [{"_target_": "Activationsd"},
                                                       {"_target_": moved[old_filter], "channel": 1}]
    assert current["note"] == old_filter  # only targets are renamed
    assert config["postprocessing"]["transforms"][1]["_target_"] == old_filter  # the input is left as it was
    network = nn.Conv3d(1, 2, 1)
    write_bundle(tmp_path, network=network, network_def={"_target_": "torch.nn.Conv3d", "in_channels": 1,
                                                         "out_channels": 2, "kernel_size": 1},
                 inference_config=config, metadata=_metadata())
    written = json.loads((tmp_path / "configs" / "inference.json").read_text())
    assert written["postprocessing"]["transforms"][1]["_target_"] == moved[old_filter]
