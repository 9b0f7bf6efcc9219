"""The CenterNet nodule detector: targets and decoding, geometry, loss, TorchScript, a tiny training.

Everything runs on CPU in well under a minute: the networks here are tiny and the
volumes small; the shipped settings are measured separately (see the report in
training/detection/__init__.py docstring).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.detection import (
    case_from_volume,
    centernet_loss,
    centernet_targets,
    evaluate_detection,
    load_detection_cases,
    train_detection,
)
from training.metrics import Reference
from workers.models.detection_network import (
    CenterNetDetector,
    DetectorConfig,
    build_network,
    decode_heads,
    detect,
    load_detector,
)

SPACING_XYZ = (2.2, 2.2, 2.5)
SPACING_ZYX = (2.5, 2.2, 2.2)

#: A tiny network and grid: 32^3 patches, half-resolution output.
TINY = DetectorConfig(
    features=(8, 8, 16, 16, 16, 8),
    head_channels=8,
    patch_size=(32, 32, 32),
    roi_size=(64, 64, 64),
    score_threshold=0.05,
    mine_interval=1,
    mine_cases=2,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these networks are tiny, and on a busy machine extra OpenMP
    threads make them tens of times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _heads_from_targets(targets) -> torch.Tensor:  # noqa: ANN001 - training.detection.Heads
    """Perfect network output for the targets: heatmap logits, log sizes, offsets."""
    heat = np.clip(targets.heatmap, 1e-6, 1 - 1e-6)
    logits = np.log(heat / (1 - heat))
    return torch.cat([torch.from_numpy(logits)[None], torch.from_numpy(targets.size), torch.from_numpy(targets.offset)])


@pytest.mark.parametrize("stride", [1, 2])
def test_targets_decode_round_trip(stride: int) -> None:
    centres = np.array([[10.3, 20.7, 30.2], [40.0, 41.6, 12.9], [5.0, 50.2, 44.4]])
    sizes = np.array([[8.0, 8.0, 8.0], [20.0, 15.0, 10.0], [4.0, 4.0, 4.0]])
    shape = [math.ceil(64 / stride)] * 3
    targets = centernet_targets(shape, centres, sizes, SPACING_XYZ, output_stride=stride)
    assert targets.mask.sum() == 3
    peaks = np.floor(centres / stride + 0.5).astype(int)
    for p in peaks:
        assert targets.heatmap[tuple(p)] == 1.0
    assert targets.heatmap.max() == 1.0 and targets.heatmap.min() >= 0.0
    found, found_sizes, scores = decode_heads(
        _heads_from_targets(targets), output_stride=stride, score_threshold=0.5, max_detections=10
    )
    assert len(found) == 3
    order = [int(np.argmin(np.linalg.norm(found - c, axis=1))) for c in centres]
    np.testing.assert_allclose(found[order], centres, atol=1e-4)
    np.testing.assert_allclose(found_sizes[order], sizes, rtol=1e-5)
    assert np.all(scores > 0.99)
    # top-K keeps the best, sorted by score
    _, _, top = decode_heads(_heads_from_targets(targets), output_stride=stride, score_threshold=0.0, max_detections=2)
    assert len(top) == 2 and top[0] >= top[1]


def test_target_sigma_grows_with_size_and_outside_centres_leave_tails() -> None:
    small = centernet_targets((32, 32, 32), [[32.0, 32.0, 32.0]], [[6.0] * 3], SPACING_XYZ)
    large = centernet_targets((32, 32, 32), [[32.0, 32.0, 32.0]], [[30.0] * 3], SPACING_XYZ)
    assert large.heatmap[17, 16, 16] > small.heatmap[17, 16, 16] > 0
    # a nodule centred just outside the grid: a Gaussian tail, but no centre voxel to regress
    outside = centernet_targets((32, 32, 32), [[-3.0, 30.0, 30.0]], [[20.0] * 3], SPACING_XYZ)
    assert outside.mask.sum() == 0
    assert 0 < outside.heatmap.max() < 1


class _Oracle(torch.nn.Module):
    """A 'network' that returns fixed heads, whatever its input (pads to the input's output grid)."""

    def __init__(self, heads: torch.Tensor) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [math.ceil(n / 2) for n in x.shape[-3:]]
        out = torch.full((1, 7, *shape), -20.0)
        out[:, 1:] = 0.0
        h = self.heads
        out[0, :, : h.shape[1], : h.shape[2], : h.shape[3]] = h
        return out


def _standin_volume(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], origin: tuple[float, float, float],
    nodules: list[tuple[tuple[float, float, float], float]], seed: int = 0,
) -> np.ndarray:
    """-1000 HU air, a 40 HU body, a -850 HU lung region, +30 HU spheres at LPS centres (mm)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    wx = origin[0] + x * spacing_zyx[2]
    wy = origin[1] + y * spacing_zyx[1]
    wz = origin[2] + z * spacing_zyx[0]
    cx, cy = origin[0] + (nx - 1) * spacing_zyx[2] / 2, origin[1] + (ny - 1) * spacing_zyx[1] / 2
    rx, ry = (nx - 1) * spacing_zyx[2] / 2, (ny - 1) * spacing_zyx[1] / 2
    q = ((wx - cx) / rx) ** 2 + ((wy - cy) / ry) ** 2
    vol = np.full(shape_zyx, -1000.0)
    vol[q <= 0.95] = 40.0
    vol[q <= 0.7] = -850.0
    for (px, py, pz), diameter in nodules:
        vol[(wx - px) ** 2 + (wy - py) ** 2 + (wz - pz) ** 2 <= (diameter / 2) ** 2] = 30.0
    vol += rng.normal(0, 10, size=vol.shape)
    return np.rint(vol).astype(np.int16)


def test_detect_reports_lps_world_coordinates() -> None:
    origin = (-70.0, -60.0, 100.0)
    nodules = [((-40.3, -20.1, 130.7), 12.0), ((20.0, 10.0, 150.0), 7.0)]
    volume = _standin_volume((40, 64, 64), SPACING_ZYX, origin, nodules)
    refs = [Reference(c, d) for c, d in nodules]
    case = case_from_volume("standin", volume, SPACING_ZYX, origin, refs, TINY)
    assert tuple(case.image.shape) == (64, 64, 40)  # RAS (x, y, z)
    out_shape = [math.ceil(n / 2) for n in case.image.shape]
    targets = centernet_targets(out_shape, case.centres_vox, case.sizes_mm, case.grid.spacing)
    detections = detect(_Oracle(_heads_from_targets(targets)), volume, SPACING_ZYX, origin, config=TINY)
    assert len(detections) == 2
    for det in detections:
        ref = min(refs, key=lambda r: float(np.linalg.norm(np.subtract(r.centre_xyz_mm, det.centre_xyz_mm))))
        np.testing.assert_allclose(det.centre_xyz_mm, ref.centre_xyz_mm, atol=1e-3)
        assert det.diameter_mm == pytest.approx(ref.diameter_mm, rel=1e-5)
        assert det.box_cccwhd == pytest.approx((*ref.centre_xyz_mm, *([ref.diameter_mm] * 3)), abs=1e-3)
        assert det.score > 0.99 and det.label == 0


def test_resampling_keeps_world_positions() -> None:
    """A volume on a finer grid is resampled to the model spacing without moving anything."""
    from workers.models.detection_network import ras_to_lps, to_network_grid

    spacing = (1.25, 0.7, 0.7)
    origin = (-30.0, -20.0, -10.0)
    volume = np.full((48, 96, 96), -1000, dtype=np.int16)
    voxel = (20, 30, 70)  # z, y, x
    volume[voxel[0] - 1 : voxel[0] + 2, voxel[1] - 2 : voxel[1] + 3, voxel[2] - 2 : voxel[2] + 3] = 400
    world = np.array([origin[0] + voxel[2] * 0.7, origin[1] + voxel[1] * 0.7, origin[2] + voxel[0] * 1.25])
    image, grid = to_network_grid(volume, spacing, origin, TINY)
    np.testing.assert_allclose(grid.spacing, SPACING_XYZ, rtol=0.03)
    peak = np.array(np.unravel_index(int(torch.argmax(image)), image.shape), dtype=np.float64)
    found = ras_to_lps(grid.to_world_ras(peak))
    assert np.linalg.norm(found - world) < 2.0  # within a model voxel


def test_loss_is_lower_for_the_right_answer() -> None:
    targets = centernet_targets((16, 16, 16), [[10.0, 12.0, 14.0]], [[8.0] * 3], SPACING_XYZ)
    batch = {
        "heatmap": torch.from_numpy(targets.heatmap)[None],
        "size": torch.from_numpy(targets.size)[None],
        "offset": torch.from_numpy(targets.offset)[None],
        "mask": torch.from_numpy(targets.mask)[None],
    }
    perfect = _heads_from_targets(targets)[None]
    wrong = torch.zeros_like(perfect)
    good = centernet_loss(perfect, **batch)
    bad = centernet_loss(wrong, **batch)
    assert float(good["loss"]) < 0.1 * float(bad["loss"])
    assert float(good["size"]) == pytest.approx(0.0, abs=1e-6)
    assert float(bad["heatmap"]) > float(good["heatmap"])


def test_network_shapes_and_torchscript() -> None:
    torch.manual_seed(0)
    net = build_network(TINY).eval()
    x = torch.rand(1, 1, 32, 64, 32)
    with torch.no_grad():
        out = net(x)
        assert tuple(out.shape) == (1, 7, 16, 32, 16)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x)
        other = torch.rand(1, 1, 64, 32, 32)
        for module in (scripted, traced):
            assert torch.equal(module(x), out)
            assert torch.allclose(module(other), net(other), atol=1e-6)
    assert isinstance(net, CenterNetDetector)


def _write_dataset(root: Path, cases: int, seed: int) -> Path:
    from training.phantoms.chest import PhantomConfig
    from training.phantoms.dataset import write_phantom_dataset

    config = PhantomConfig(shape=(32, 96, 96), nodule_count=(1, 3), nodule_diameter_mm=(6.0, 16.0),
                           vessel_count=2, vessel_generations=2)
    return write_phantom_dataset(root, cases, seed, config=config, dicom=False)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("det_dataset"), cases=3, seed=40)


def test_dataset_cases_match_the_phantom_nodules(tiny_dataset: Path) -> None:
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom

    cases = load_detection_cases(tiny_dataset, TINY)
    assert [c.name for c in cases] == ["chest_0000", "chest_0001", "chest_0002"]
    phantom = generate_chest_phantom(
        PhantomConfig(shape=(32, 96, 96), nodule_count=(1, 3), nodule_diameter_mm=(6.0, 16.0),
                      vessel_count=2, vessel_generations=2),
        seed=40,
    )
    refs = cases[0].references
    assert len(refs) == len(phantom.nodules) >= 1
    for ref, nodule in zip(refs, phantom.nodules):
        np.testing.assert_allclose(ref.centre_xyz_mm, nodule.centre_xyz_mm, atol=1e-3)
        assert ref.diameter_mm == pytest.approx(nodule.diameter_mm)
        # the network-grid centre is the RAS-flipped voxel of the LPS (z, y, x) centre
        z, y, x = nodule.centre_zyx
        np.testing.assert_allclose(cases[0].centres_vox[refs.index(ref)], (95 - x, 95 - y, z), atol=1e-3)


def test_tiny_training_reduces_loss_and_writes_a_bundle(tiny_dataset: Path, tmp_path: Path) -> None:
    from training.detection.data import PatchSampler

    out = tmp_path / "bundle"
    record = train_detection(
        tiny_dataset, out, epochs=3, steps_per_epoch=4, batch_size=2, learning_rate=3e-3,
        val_fraction=0.34, val_interval=2, config=TINY, progress=False, seed=1,
    )
    # the loss on fixed patches (training mode: batch statistics) drops from the initial network's
    cases = load_detection_cases(tiny_dataset, TINY)
    batch = PatchSampler([c for c in cases if c.name in record["train_cases"]], TINY, seed=123).batch(4)
    trained, _ = load_detector(out, prefer_torchscript=False)
    torch.manual_seed(1)
    initial = build_network(TINY)
    with torch.no_grad():
        before, after = (
            float(centernet_loss(net.train()(batch["image"]), batch["heatmap"], batch["size"], batch["offset"],
                                 batch["mask"])["loss"])
            for net in (initial, trained)
        )
    assert after < before
    assert record["epochs"][-1]["loss"] < record["epochs"][0]["loss"] * 1.5  # no divergence
    assert record["epochs"][0]["hard_negative_pool"] >= 0 and "mining_seconds" in record["epochs"][1]
    assert [v["epoch"] for v in record["validations"]] == [2, 3]
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                 "metrics.json", "plots/loss.png", "plots/froc.png", "plots/validation_detections.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]["large"]["sensitivity_at"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["dicom_node"]["kind"] == "detection"
    assert meta["dicom_node"]["input"]["spacing_mm"] == list(SPACING_XYZ)
    inference = json.loads((out / "configs" / "inference.json").read_text())
    shipped = DetectorConfig.from_dict(inference["detection"])
    # everything as trained, but the score threshold calibrated on the validation FROC
    assert shipped == dataclasses.replace(TINY, score_threshold=metrics["operating_point"]["score_threshold"])
    assert inference["postprocessing"]["score_threshold"] == shipped.score_threshold

    # the TorchScript model and the state_dict give the same detections
    scripted, config = load_detector(out)
    eager, _ = load_detector(out, prefer_torchscript=False)
    assert isinstance(scripted, torch.jit.ScriptModule) and config == shipped
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)

    result = evaluate_detection(out, tiny_dataset, out_dir=tmp_path / "eval")
    assert result["cases"] == 3
    assert 0.0 <= result["large"]["cpm"] <= 1.0
    assert (tmp_path / "eval" / "froc.png").is_file()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["cases"] == 3


def test_training_is_deterministic(tiny_dataset: Path, tmp_path: Path) -> None:
    runs = [
        train_detection(tiny_dataset, tmp_path / f"run{i}", epochs=1, steps_per_epoch=2, batch_size=2,
                        val_fraction=0.34, config=TINY, progress=False, seed=7)
        for i in range(2)
    ]
    assert runs[0]["epochs"][0]["loss"] == runs[1]["epochs"][0]["loss"]
