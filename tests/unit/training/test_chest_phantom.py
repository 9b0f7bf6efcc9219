"""Tests of the synthetic chest CT phantom (training.phantoms.chest)."""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest

from training.labels import CHEST_LABELS, label_names
from training.phantoms.chest import (
    BACKGROUND,
    BODY,
    BONE,
    HEART,
    LABELS,
    LUNG,
    NODULE,
    NODULE_KINDS,
    ChestPhantom,
    PhantomConfig,
    generate_chest_phantom,
)

# A realistic field of view (352 x 336 mm, 160 mm scan range) on a tiny grid.
SMALL = PhantomConfig(
    shape=(20, 56, 64),
    spacing_mm=(8.0, 6.0, 5.5),
    nodule_count=(2, 4),
    nodule_diameter_mm=(6.0, 24.0),
)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def small_phantoms() -> dict[int, ChestPhantom]:
    return {seed: generate_chest_phantom(SMALL, seed=seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def default_phantom() -> tuple[ChestPhantom, float]:
    """The default 96x160x160 phantom and the seconds it took (after a warm-up)."""
    generate_chest_phantom(dataclasses.replace(PhantomConfig(), shape=(8, 32, 32)), seed=0)
    start = time.perf_counter()
    phantom = generate_chest_phantom(PhantomConfig(), seed=4)
    return phantom, time.perf_counter() - start


def test_labels_match_the_shared_label_table() -> None:
    assert LABELS == {0: "background", 1: "body", 2: "lung", 3: "heart", 4: "bone", 5: "nodule"}
    assert LABELS == label_names()
    assert (BACKGROUND, BODY, LUNG, HEART, BONE, NODULE) == (0, 1, 2, 3, 4, 5)
    assert [s.value for s in CHEST_LABELS] == [1, 2, 3, 4, 5]


def test_config_defaults_and_validation() -> None:
    cfg = PhantomConfig()
    assert cfg.shape == (96, 160, 160)
    assert cfg.spacing_mm == (2.5, 2.2, 2.2)
    assert cfg.field_of_view_mm == pytest.approx((240.0, 352.0, 352.0))
    assert cfg.effective_slice_thickness_mm == 2.5
    assert cfg.nodule_count == (0, 4) and cfg.nodule_diameter_mm == (3.0, 30.0)
    for bad in (
        {"shape": (2, 64, 64)},
        {"spacing_mm": (0.0, 1.0, 1.0)},
        {"nodule_count": (3, 1)},
        {"nodule_diameter_mm": (0.0, 5.0)},
        {"nodule_kind_weights": (0.0, 0.0, 0.0)},
    ):
        with pytest.raises(ValueError):
            PhantomConfig(**bad)  # type: ignore[arg-type]


def test_deterministic_per_seed(small_phantoms: dict[int, ChestPhantom]) -> None:
    again = generate_chest_phantom(SMALL, seed=1)
    first = small_phantoms[1]
    np.testing.assert_array_equal(again.volume_hu, first.volume_hu)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.nodules == first.nodules
    assert again.origin_xyz_mm == first.origin_xyz_mm and again.seed == 1
    assert not np.array_equal(small_phantoms[0].volume_hu, first.volume_hu)


def test_arrays_and_geometry(small_phantoms: dict[int, ChestPhantom]) -> None:
    ph = small_phantoms[0]
    assert ph.volume_hu.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert ph.volume_hu.shape == ph.labels.shape == SMALL.shape == ph.shape
    assert ph.spacing_mm == SMALL.spacing_mm
    assert set(np.unique(ph.labels)) == set(LABELS)
    assert ph.volume_hu.min() >= -1024 and ph.volume_hu.max() <= 3071
    # The field of view is centred on the patient axis.
    centre = ph.voxel_to_world((np.asarray(SMALL.shape) - 1) / 2.0)
    np.testing.assert_allclose(centre, 0.0, atol=1e-3)


def test_hu_ranges_per_label(small_phantoms: dict[int, ChestPhantom], default_phantom: tuple[ChestPhantom, float]) -> None:
    for ph in (*small_phantoms.values(), default_phantom[0]):
        hu, lab = ph.volume_hu.astype(np.float64), ph.labels
        assert abs(np.median(hu[lab == BACKGROUND]) + 1000) < 15
        assert abs(np.median(hu[lab == LUNG]) + 850) < 40  # the median ignores the vessels
        assert (hu[lab == LUNG] > -300).mean() < 0.1  # vessels are a small fraction
        assert hu[lab == BONE].mean() > 250 and np.median(hu[lab == BONE]) > 250
        assert 0 < np.median(hu[lab == HEART]) < 90
        assert -150 < np.median(hu[lab == BODY]) < 100
        body = hu[lab == BODY]
        assert ((body > -150) & (body < -50)).mean() > 0.1  # a fat layer exists
        assert ((body > 20) & (body < 80)).mean() > 0.2  # and muscle / organs


def test_vessels_inside_lungs(default_phantom: tuple[ChestPhantom, float]) -> None:
    ph = default_phantom[0]
    lung = ph.volume_hu[ph.labels == LUNG]
    assert ((lung > -400) & (lung < 100)).sum() > 500  # vessel voxels carry the lung label


def test_nodules_inside_lungs_and_not_overlapping(small_phantoms: dict[int, ChestPhantom]) -> None:
    for seed, ph in small_phantoms.items():
        # The nodule stream is independent: without nodules the anatomy is identical.
        bare = generate_chest_phantom(dataclasses.replace(SMALL, nodule_count=(0, 0)), seed=seed)
        assert bare.nodules == [] and not (bare.labels == NODULE).any()
        assert np.array_equal(bare.labels[ph.labels != NODULE], ph.labels[ph.labels != NODULE])
        assert (bare.labels[ph.labels == NODULE] == LUNG).all()
        zz, yy, xx = np.indices(ph.shape)
        points = ph.voxel_to_world(np.stack([zz, yy, xx], axis=-1).reshape(-1, 3))
        for n in ph.nodules:
            inside = np.linalg.norm(points - np.asarray(n.centre_xyz_mm), axis=1) <= n.radius_mm
            assert (bare.labels.reshape(-1)[inside] == LUNG).all(), "nodule sphere leaves the lung"
        for a, b in itertools.combinations(ph.nodules, 2):
            gap = np.linalg.norm(np.subtract(a.centre_xyz_mm, b.centre_xyz_mm))
            assert gap >= a.radius_mm + b.radius_mm


def test_nodule_attributes_and_labels(small_phantoms: dict[int, ChestPhantom]) -> None:
    lo, hi = SMALL.nodule_diameter_mm
    spacing = np.asarray(SMALL.spacing_mm)
    for ph in small_phantoms.values():
        assert SMALL.nodule_count[0] <= len(ph.nodules) <= SMALL.nodule_count[1]
        labelled = np.argwhere(ph.labels == NODULE)
        claimed = np.zeros(len(labelled), dtype=bool)
        for n in ph.nodules:
            assert lo <= n.diameter_mm <= hi
            assert n.kind in NODULE_KINDS
            np.testing.assert_allclose(ph.voxel_to_world(n.centre_zyx), n.centre_xyz_mm, atol=1e-9)
            assert ph.labels[tuple(int(round(c)) for c in n.centre_zyx)] == NODULE
            cx, cy, cz, w, h, d = n.box_xyz_mm
            assert (cx, cy, cz) == n.centre_xyz_mm and w == h == d == n.diameter_mm
            dist = np.linalg.norm((labelled - np.asarray(n.centre_zyx)) * spacing, axis=1)
            claimed |= dist <= 1.12 * n.radius_mm + np.linalg.norm(spacing) / 2
        assert claimed.all(), "nodule voxels far from every listed nodule"


@pytest.mark.parametrize(
    ("kind", "weights", "low", "high"),
    [
        ("solid", (1.0, 0.0, 0.0), -150, 120),
        ("part-solid", (0.0, 1.0, 0.0), -350, 120),  # the solid core
        ("ground-glass", (0.0, 0.0, 1.0), -750, -350),
    ],
)
def test_nodule_kinds_look_right(kind: str, weights: tuple[float, float, float], low: float, high: float) -> None:
    cfg = PhantomConfig(
        shape=(48, 128, 128), nodule_count=(2, 2), nodule_diameter_mm=(14.0, 20.0),
        nodule_kind_weights=weights, vessel_count=0,
    )
    ph = generate_chest_phantom(cfg, seed=7)
    assert [n.kind for n in ph.nodules] == [kind, kind]
    for n in ph.nodules:
        z, y, x = (int(round(c)) for c in n.centre_zyx)
        centre_hu = float(ph.volume_hu[z, y - 1 : y + 2, x - 1 : x + 2].mean())
        assert low < centre_hu < high, (n, centre_hu)
        if kind == "part-solid":  # ground-glass halo around the core
            halo = ph.world_to_voxel(np.add(n.centre_xyz_mm, (0.8 * n.radius_mm, 0, 0)))
            hz, hy, hx = (int(round(c)) for c in halo)
            assert -700 < ph.volume_hu[hz, hy, hx] < -300


def test_count_range_includes_zero_over_seeds() -> None:
    tiny = PhantomConfig(shape=(12, 40, 40), spacing_mm=(14.0, 8.5, 8.5), nodule_count=(0, 2), vessel_count=0)
    counts = {len(generate_chest_phantom(tiny, seed=s).nodules) for s in range(12)}
    assert 0 in counts and max(counts) > 0 and counts <= {0, 1, 2}


def test_world_voxel_round_trip(small_phantoms: dict[int, ChestPhantom]) -> None:
    ph = small_phantoms[2]
    assert tuple(ph.voxel_to_world((0, 0, 0))) == ph.origin_xyz_mm
    # One voxel step along array x / y / z moves +X / +Y / +Z (LPS) by the spacing.
    step = ph.voxel_to_world(np.eye(3)) - np.asarray(ph.origin_xyz_mm)
    np.testing.assert_allclose(step, [[0, 0, 8.0], [0, 6.0, 0], [5.5, 0, 0]])
    rng = np.random.default_rng(0)
    zyx = rng.uniform(-5, 70, size=(50, 3))
    np.testing.assert_allclose(ph.world_to_voxel(ph.voxel_to_world(zyx)), zyx, atol=1e-9)
    xyz = rng.uniform(-200, 200, size=3)
    np.testing.assert_allclose(ph.voxel_to_world(ph.world_to_voxel(xyz)), xyz, atol=1e-9)


def test_default_phantom_has_the_default_shape(default_phantom: tuple[ChestPhantom, float]) -> None:
    phantom, _ = default_phantom
    assert phantom.shape == (96, 160, 160)