"""The out-of-distribution signal: the share of labelled voxels the network was unsure of, from its logits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.workers.model_fixtures import (
    CHEST_ROI,
    CHEST_SPACING_MM,
    CHEST_WINDOW_HU,
    volume_from_geometry,
    write_random_chest_bundle,
)
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from training.phantoms.ct_series import SeriesGeometry
from workers.models.monai_bundle import MonaiBundleModel, low_confidence_fraction
from workers.models.torchscript import TorchScriptPreprocessing, TorchScriptSegmentationModel
from workers.volume import Volume


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chest_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_chest_bundle(tmp_path_factory.mktemp("chest") / "bundle")


@pytest.fixture(scope="module")
def small_chest() -> Volume:
    phantom = generate_chest_phantom(PhantomConfig(shape=(24, 48, 48), spacing_mm=(10.0, 7.3, 7.3)), seed=3)
    geometry = SeriesGeometry(rows=48, columns=48, slices=24, pixel_spacing=(7.3, 7.3), slice_spacing=10.0,
                              slice_thickness=10.0, origin=phantom.origin_xyz_mm)
    return volume_from_geometry(geometry, phantom.volume_hu)


def _logits(*probabilities: tuple[float, ...]) -> torch.Tensor:
    """(C, N) logits whose softmax over C gives each column of ``probabilities``."""
    return torch.log(torch.tensor(probabilities, dtype=torch.float32).T)


def test_fraction_counts_foreground_voxels_whose_winner_is_below_one_half() -> None:
    logits = _logits(
        (0.1, 0.8, 0.1),  # sure foreground
        (0.2, 0.45, 0.35),  # unsure foreground
        (0.3, 0.3, 0.4),  # unsure foreground
        (0.4, 0.3, 0.3),  # unsure background: not counted
        (0.9, 0.05, 0.05),  # sure background
    )
    assert low_confidence_fraction(logits) == pytest.approx(2 / 3)
    assert low_confidence_fraction(logits + 7.0) == pytest.approx(2 / 3)  # a softmax ignores a common offset
    assert low_confidence_fraction(_logits((0.9, 0.05, 0.05), (0.6, 0.2, 0.2))) == 0.0  # nothing labelled
    spatial = torch.randn(4, 5, 6, 7)
    winner = torch.softmax(spatial, dim=0).max(dim=0)
    foreground = winner.indices != 0
    expected = float((foreground & (winner.values < 0.5)).sum()) / float(foreground.sum())
    assert low_confidence_fraction(spatial) == pytest.approx(expected)


def test_two_channels_give_no_signal() -> None:
    """The winner of two classes always has at least 0.5: the fraction would always be 0, so it is None."""
    assert low_confidence_fraction(_logits((0.4, 0.6), (0.9, 0.1))) is None
    assert low_confidence_fraction(torch.zeros(1, 4, 4, 4)) is None


def test_bundle_and_torchscript_results_carry_the_same_fraction(chest_bundle: Path, small_chest: Volume) -> None:
    bundle_model = MonaiBundleModel(chest_bundle, device="cpu")
    from_bundle = bundle_model.predict(small_chest)
    assert from_bundle.low_confidence_fraction is not None
    assert 0.0 <= from_bundle.low_confidence_fraction <= 1.0
    assert from_bundle.label_map.any()
    ts_model = TorchScriptSegmentationModel(
        chest_bundle / "models" / "model.ts",
        preprocessing=TorchScriptPreprocessing(spacing_mm=CHEST_SPACING_MM, window_hu=CHEST_WINDOW_HU,
                                               roi_size=CHEST_ROI, sw_batch_size=2, padding_mode="replicate"),
        labels={label.value: label for label in bundle_model.labels},
        device="cpu",
    )
    from_ts = ts_model.predict(small_chest)
    assert from_ts.low_confidence_fraction == pytest.approx(from_bundle.low_confidence_fraction, abs=1e-3)
    # predict_values is unchanged: the bundle's own values, the same label map once mapped
    assert np.array_equal(bundle_model.predict_values(small_chest), from_bundle.label_map)


def test_a_bundle_without_a_softmax_reports_no_fraction(chest_bundle: Path, small_chest: Volume) -> None:
    """Softmax switched off in the bundle's postprocessing: its outputs may not be logits, so nothing is claimed."""
    model = MonaiBundleModel(chest_bundle, device="cpu", overrides={"postprocessing#transforms#0#softmax": False})
    result = model.predict(small_chest)
    assert result.low_confidence_fraction is None
    assert result.label_map.any()


def test_the_threshold_is_one_half() -> None:
    just_below = _logits((0.26, 0.499, 0.241))
    just_above = _logits((0.25, 0.501, 0.249))
    assert low_confidence_fraction(just_below) == 1.0
    assert low_confidence_fraction(just_above) == 0.0
    assert math.isclose(float(torch.softmax(just_above[:, 0], 0).max()), 0.501, rel_tol=1e-5)
