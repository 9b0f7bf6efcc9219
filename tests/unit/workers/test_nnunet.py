"""The nnU-Net v2 loader (workers.models.nnunet) against nnunetv2's own predictor, and its checks.

The results folder is made by nnunetv2's own tools (fingerprint, planner, preprocessor, trainer
class; seeded random weights in its checkpoint format, so the test stays well under a minute):
see tests/unit/workers/nnunet_fixtures.py, which also trains a few iterations for the bench.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.contracts import CodedConcept, SegmentLabel
from dicom_node.model_catalog import BundleError, ModelEntry, NnUNetOptions
from tests.unit.workers.nnunet_fixtures import build_results_folder, case_array
from workers.models.nnunet import (
    NnUNetModel,
    apply_postprocessing,
    read_postprocessing,
    remove_all_but_largest_component_from_segmentation,
)
from workers.models.registry import build_model

CODE = CodedConcept(value="123037004", scheme="SCT", meaning="Anatomical Structure")


def _labels(values: range = range(1, 6)) -> dict[int, SegmentLabel]:
    return {v: SegmentLabel(value=v + 10, name=f"label {v}", property_category=CODE, property_type=CODE,
                            color_rgb=(v, v, v)) for v in values}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_results_folder(tmp_path_factory.mktemp("nnunet"))


def _nnunet_predictor(folder: Path, use_mirroring: bool = True, mirror_axes: tuple[int, ...] | None = None):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(json.loads((folder / "plans.json").read_text()))
    dataset = json.loads((folder / "dataset.json").read_text())
    config = plans.get_configuration("3d_fullres")
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    network = nnUNetTrainer.build_network_architecture(plans, config, 1, 6, enable_deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=use_mirroring, device=torch.device("cpu"),
                                allow_tqdm=False)
    # as initialize_from_trained_model_folder, without looking the (test-local) trainer class up by name
    predictor.manual_initialization(network, plans, config, [checkpoint["network_weights"]], dataset,
                                    checkpoint["trainer_name"], mirror_axes or checkpoint["inference_allowed_mirroring_axes"])
    return predictor


@pytest.mark.slow
def test_equals_nnunet_predictor_on_plan_grid_and_resampled_case(folder: Path) -> None:
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["transpose_forward"] == [2, 0, 1]  # the stored coarse axis is last: the transpose path runs
    model = NnUNetModel(folder, options=NnUNetOptions(), labels=_labels(), device="cpu")
    assert model.mirror_axes == (0, 1, 2)
    model.mirror_axes = (1,)  # one mirrored axis on both sides: the same code path at 2 passes instead of 8 (CI time)
    unmirrored = NnUNetModel(folder, options=NnUNetOptions(use_mirroring=False), labels=_labels(), device="cpu")
    # one case on the plan's grid with mirroring; one that resamples (other spacing and shape, anisotropy > 3 in
    # the source: the coarse axis is resampled on its own), without mirroring to keep the test short
    cases = ((model, _nnunet_predictor(folder, mirror_axes=(1,)), case_array(5000)),
             (unmirrored, _nnunet_predictor(folder, use_mirroring=False),
              case_array(5001, shape=(12, 56, 60), spacing_mm=(18.0, 6.0, 5.0))))
    for ours, predictor, (image, _truth, spacing) in cases:
        reader_spacing = list(spacing)  # the arrays are in the reader's order already
        expected = predictor.predict_single_npy_array(image[None], {"spacing": reader_spacing})
        values, unsure = ours.predict_values(image[None], reader_spacing)
        assert values.shape == image.shape
        assert np.array_equal(values, expected), f"{int((values != expected).sum())} voxels differ"
        assert len(np.unique(values)) > 1
        assert unsure is not None and 0.0 <= unsure <= 1.0


@pytest.mark.slow
def test_postprocessing_pkl_written_by_nnunet_gives_nnunets_result(folder: Path, tmp_path: Path) -> None:
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing as nnunet_apply,
    )
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as nnunet_remove,
    )

    copy = tmp_path / "with_pp"
    shutil.copytree(folder, copy)
    functions, kwargs = [nnunet_remove, nnunet_remove], [{"labels_or_regions": 2}, {"labels_or_regions": [1, 3]}]
    (copy / "postprocessing.pkl").write_bytes(pickle.dumps((functions, kwargs)))
    model = NnUNetModel(copy, options=NnUNetOptions(use_mirroring=False), labels=_labels(), device="cpu")
    assert len(model.postprocessing) == 2
    image, _, spacing = case_array(5003)
    expected = nnunet_apply(_nnunet_predictor(folder, use_mirroring=False).predict_single_npy_array(
        image[None], {"spacing": list(spacing)}), functions, kwargs)
    values, _ = model.predict_values(image[None], spacing)
    assert np.array_equal(values, expected)


def test_registry_entry_builds_the_model_and_maps_labels(folder: Path) -> None:
    entry = ModelEntry.model_validate({
        "id": "phantom-nnunet", "kind": "segmentation", "format": "nnunet", "path": str(folder), "version": "1",
        "nnunet": {"configuration": "3d_fullres", "folds": [0], "use_mirroring": False},
        "labels": [{"value": 7, "name": "lung", "bundle_value": 2, "code": CODE.model_dump(),
                    "category": CODE.model_dump()}],
    })
    model = build_model(entry, folder, "cpu")
    assert isinstance(model, NnUNetModel) and model.mirror_axes is None
    image, _, spacing = case_array(5002)
    values, _ = model.predict_values(image[None], spacing)

    from workers.volume import Volume

    volume = Volume(array=image, spacing_mm=spacing, origin_mm=(0.0, 0.0, 0.0), axes=np.eye(3),
                    series_instance_uid="1.2.3", study_instance_uid="1.2", frame_of_reference_uid="1.2.4",
                    modality="CT", frames=tuple(_frames(image.shape[0])), datasets=())
    result = model.predict(volume)
    assert [label.value for label in result.labels] == [7]
    assert result.label_map.shape == image.shape
    assert np.array_equal(result.label_map == 7, values == 2)  # dataset value 2 -> label 7, the others background
    assert set(np.unique(result.label_map)) <= {0, 7}


def _frames(count: int) -> list:
    from workers.volume import FrameRef

    return [FrameRef(sop_instance_uid=f"1.2.3.{k}") for k in range(count)]


def test_errors_name_the_problem(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="configuration '2d_missing' is not in plans.json"):
        NnUNetModel(folder, options=NnUNetOptions(configuration="2d_missing"), labels=_labels(), device="cpu")
    with pytest.raises(BundleError, match="maps value 9, which dataset.json does not have"):
        NnUNetModel(folder, options=NnUNetOptions(), labels={9: _labels()[1]}, device="cpu")
    with pytest.raises(BundleError, match=r"fold_3.*no such file"):
        NnUNetModel(folder, options=NnUNetOptions(folds=(3,)), labels=_labels(), device="cpu")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    plans = json.loads((bad / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(BundleError, match="only classes under"):
        NnUNetModel(bad, options=NnUNetOptions(), labels=_labels(), device="cpu")


def test_postprocessing_pkl_is_applied_and_only_known_functions_load(tmp_path: Path) -> None:
    segmentation = np.zeros((6, 6, 6), dtype=np.uint8)
    segmentation[0:2, 0:2, 0:2] = 1  # 8 voxels: kept
    segmentation[4:6, 4:6, 5] = 1  # 4 voxels: removed
    segmentation[4, 0, 0] = 2  # another label: untouched
    steps = [(remove_all_but_largest_component_from_segmentation, {"labels_or_regions": 1})]
    result = apply_postprocessing(segmentation, steps)
    assert int((result == 1).sum()) == 8 and result[4, 0, 0] == 2

    # the file as nnU-Net writes it: (functions, kwargs), functions pickled by their nnunetv2 module path
    class _Ref:
        def __reduce__(self):
            import operator
            return operator.attrgetter, ("x",)

    good = tmp_path / "postprocessing.pkl"
    payload = pickle.dumps(([], []))
    good.write_bytes(payload)
    assert read_postprocessing(good) == []
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(([_Ref()], [{}])))
    with pytest.raises(BundleError, match="operator.attrgetter is not a known nnU-Net postprocessing function"):
        read_postprocessing(evil)
