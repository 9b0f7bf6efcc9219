"""The separable nearest-neighbour lookup gives exactly what MONAI's ``Invertd`` gives, at a fraction of the memory.

Equality is checked voxel for voxel against a real ``Invertd`` on small volumes of
every axis-aligned orientation and of spacings whose voxel centres fall exactly
midway between two network voxels (0.7 mm against 2.2 mm: every 22nd column), and
on the shipped chest model, whose label map must not change.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.workers.model_fixtures import centred_geometry, oblique_orientation, volume_from_geometry
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from training.phantoms.ct_series import SeriesGeometry
from workers.models.label_resampling import input_grid_lookup, resample_nearest, separable_nearest_indices
from workers.models.monai_bundle import (
    InferencePipeline,
    MonaiBundleModel,
    label_values_array,
    ras_affine,
    volume_to_metatensor,
)
from workers.volume import Volume

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
AXIAL_ROTATED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SHIPPED_BUNDLE = Path(__file__).resolve().parents[3] / "workers" / "bundles" / "chest_ct_segmentation"


def _preprocessed(volume: Volume, pixdim: tuple[float, float, float], padding_mode: str = "border"):  # noqa: ANN202
    from monai.transforms import Compose, Orientationd, Spacingd

    chain = Compose([Orientationd("image", axcodes="RAS"),
                     Spacingd("image", pixdim=pixdim, mode="bilinear", padding_mode=padding_mode)])
    return chain, chain({"image": volume_to_metatensor(volume)})


def _inverted_by_monai(chain, data, labels: torch.Tensor):  # noqa: ANN001, ANN202
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    image = data["image"]
    data = dict(data, pred=MetaTensor(labels[None].float(), meta=dict(image.meta)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True, to_tensor=True)(data)["pred"]
    return out[0].numpy()


def _volume(orientation: tuple[float, ...], shape: tuple[int, int, int], pixel: float, slice_mm: float) -> Volume:
    geometry = centred_geometry(orientation, shape=shape, pixel_spacing=(pixel, pixel), slice_spacing=slice_mm,
                                centre_mm=(3.1, -7.4, 12.0))
    return volume_from_geometry(geometry, np.zeros(shape, dtype=np.float32))


@pytest.mark.parametrize(
    ("orientation", "shape", "pixel", "slice_mm"),
    [
        (AXIAL, (40, 50, 45), 0.7, 1.0),  # 0.7 / 2.2 mm: every 22nd column lies midway between two
        (AXIAL, (33, 70, 66), 0.703125, 1.25),
        (AXIAL, (20, 30, 40), 2.2, 2.5),  # the network's own grid
        (AXIAL, (12, 30, 40), 4.4, 5.0),  # coarser than the network's grid
        (AXIAL_ROTATED, (20, 40, 36), 0.7, 1.0),
        (SAGITTAL, (20, 40, 36), 0.7, 1.0),
        (CORONAL, (20, 40, 36), 0.7, 1.0),
    ],
    ids=["axial-0.7", "axial-0.70", "axial-same", "axial-coarse", "axial-rotated", "sagittal", "coronal"],
)
def test_lookup_gives_exactly_what_invertd_gives(orientation: tuple[float, ...], shape: tuple[int, int, int],
                                                  pixel: float, slice_mm: float) -> None:
    volume = _volume(orientation, shape, pixel, slice_mm)
    chain, data = _preprocessed(volume, (2.2, 2.2, 2.5))
    image = data["image"]
    labels = torch.from_numpy(np.random.default_rng(7).integers(0, 6, image.shape[1:]).astype(np.uint8))
    expected = _inverted_by_monai(chain, data, labels)
    lookup = input_grid_lookup(image.applied_operations, image.affine.numpy(), tuple(image.shape[1:]),
                               ras_affine(volume), tuple(reversed(volume.shape)))
    assert lookup is not None
    got = resample_nearest(labels.numpy(), lookup)
    assert got.dtype == np.uint8 and got.shape == expected.shape == tuple(reversed(volume.shape))
    assert np.array_equal(got, expected), f"{int(np.sum(got != expected))} voxels differ from Invertd"


def test_oblique_or_zero_padded_resampling_is_left_to_invertd() -> None:
    oblique = volume_from_geometry(centred_geometry(oblique_orientation(20.0, 15.0), shape=(10, 20, 20)),
                                   np.zeros((10, 20, 20), dtype=np.float32))
    _, data = _preprocessed(oblique, (2.2, 2.2, 2.5))
    image = data["image"]
    assert input_grid_lookup(image.applied_operations, image.affine.numpy(), tuple(image.shape[1:]),
                             ras_affine(oblique), tuple(reversed(oblique.shape))) is None
    axial = _volume(AXIAL, (10, 20, 20), 0.7, 1.0)
    _, data = _preprocessed(axial, (2.2, 2.2, 2.5), padding_mode="zeros")
    image = data["image"]
    assert input_grid_lookup(image.applied_operations, image.affine.numpy(), tuple(image.shape[1:]),
                             ras_affine(axial), tuple(reversed(axial.shape))) is None
    # A crop is no reorientation or respacing either.
    assert input_grid_lookup([{"class": "CropForeground"}], np.eye(4), (4, 4, 4), np.eye(4), (4, 4, 4)) is None


def test_separable_indices_round_half_to_even_and_clip_at_the_border() -> None:
    # Destination voxel i sits at source i / 2 - 0.25 (half the size, corners aligned): 0, 0.25 -> 0, 0.75 -> 1, ...
    matrix = np.diag([0.5, 0.5, 0.5, 1.0])
    matrix[:3, 3] = -0.25
    lookup = separable_nearest_indices(matrix, (8, 8, 8), (4, 4, 4))
    assert lookup is not None and lookup.source_axes == (0, 1, 2)
    assert lookup.indices[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    swapped = np.zeros((4, 4))
    swapped[1, 0] = swapped[0, 1] = swapped[2, 2] = swapped[3, 3] = 1.0
    lookup = separable_nearest_indices(swapped, (5, 6, 7), (6, 5, 7))
    assert lookup is not None and lookup.source_axes == (1, 0, 2)
    source = np.arange(6 * 5 * 7).reshape(6, 5, 7)
    resampled = resample_nearest(source, lookup)
    assert np.array_equal(resampled, source.transpose(1, 0, 2))
    assert resampled.flags.c_contiguous  # the builders read it frame by frame (see resample_nearest)
    sheared = np.eye(4)
    sheared[0, 1] = 0.1
    assert separable_nearest_indices(sheared, (4, 4, 4), (4, 4, 4)) is None


def test_label_values_come_back_in_the_smallest_integer_type() -> None:
    assert label_values_array(torch.tensor([[0.0, 2.0], [5.0, 255.0]]), "m").dtype == np.uint8
    assert label_values_array(np.array([0.0, 300.0]), "m").tolist() == [0, 300]
    assert label_values_array(np.array([0.0, 300.0]), "m").dtype == np.uint16
    with pytest.raises(Exception, match="m: label map has negative value -1"):
        label_values_array(np.array([[0.0, -1.0]]), "m")


@pytest.fixture(scope="module")
def thin_slice_chest() -> Volume:
    """A chest phantom of 12 x 480 x 480 at 8 x 0.7 x 0.7 mm: network voxel ties in-plane, lungs and body."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(12, 480, 480), spacing_mm=(8.0, 0.7, 0.7),
                                                   nodule_count=(2, 2), nodule_diameter_mm=(8.0, 12.0)), seed=5)
    geometry = SeriesGeometry(rows=480, columns=480, slices=12, pixel_spacing=(0.7, 0.7), slice_spacing=8.0,
                              slice_thickness=8.0, origin=phantom.origin_xyz_mm)
    return volume_from_geometry(geometry, phantom.volume_hu)


def test_shipped_chest_model_labels_are_unchanged_by_the_lookup(thin_slice_chest: Volume) -> None:
    """The demo model's label map with the lookup equals the one MONAI's Invertd gives (the path before it)."""
    from monai.transforms import Compose, Identityd

    # Without the nodule branch's mirror passes (test-time augmentation): the network is not under test.
    model = MonaiBundleModel(SHIPPED_BUNDLE, device="cpu", overrides={"network_def#nodule_mirror_axes": []})
    fast: InferencePipeline = model._pipeline
    assert fast._invert is not None  # the bundle's final Invertd is what the lookup replaces
    # The same pipeline with a no-op after Invertd: nothing is split off, MONAI inverts as before.
    with_invertd = dataclasses.replace(fast, postprocessing=Compose([*fast.postprocessing.transforms,
                                                                     Identityd(keys="pred")]))
    assert with_invertd._invert is None
    got = fast.run(thin_slice_chest)
    expected = with_invertd.run(thin_slice_chest)
    assert got.values.dtype == np.uint8 and got.values.shape == thin_slice_chest.shape
    assert {1, 2, 4} <= set(np.unique(expected.values).tolist())  # body, lung, bone at least
    assert np.array_equal(got.values, expected.values), f"{int(np.sum(got.values != expected.values))} voxels differ"
    assert got.low_confidence_fraction == expected.low_confidence_fraction
