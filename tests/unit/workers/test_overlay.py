"""Overlay Secondary Captures (workers.outputs.overlay): key slices, outlines in the palette, legend, valid DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.palette import LOW_CONFIDENCE_RGB, palette_colour
from tests.unit.workers.outputs_fixtures import (
    ALGORITHM,
    AXIAL,
    LABELS,
    dcentvfy_findings,
    dciodvfy_findings,
    detection,
    sphere_mask,
    volume_from_files,
    write_phantom_series,
)
from workers.models.base import SegmentationResult
from workers.outputs.common import SeriesIdentity
from workers.outputs.confidence import outlined, split_by_confidence
from workers.outputs.overlay import (
    MAX_KEY_SLICES,
    OVERLAY_DISCLAIMER,
    band_rows,
    build_detection_overlay,
    build_segmentation_overlay,
    segmentation_key_slices,
)
from workers.volume import Volume

IDENTITY = SeriesIdentity(series_number=905, series_description="AI chest - SC (chest 1.2.3)", software_versions="9")
NODULE = LABELS[4]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, list[Path]]:
    paths = write_phantom_series(tmp_path_factory.mktemp("series"), AXIAL, seed=7, reverse_instance_numbers=True)
    return volume_from_files(paths), paths


def _coloured(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(rgb == np.asarray(colour, dtype=np.uint8), axis=-1)


def _slice_of(volume: Volume, image: pydicom.Dataset) -> int:
    """The slice index of the source image an overlay image references (Source Image Sequence)."""
    source = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}[
        str(image.SourceImageSequence[0].ReferencedSOPInstanceUID)]
    return round(float(volume.world_to_index(tuple(float(v) for v in source.ImagePositionPatient))[0]))


def _saved(images: list, folder: Path) -> list[Path]:
    paths = []
    for n, image in enumerate(images):
        path = folder / f"sc{n}.dcm"
        image.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_segmentation_overlay_shows_the_largest_nodule_sections_in_the_palette(
        written: tuple[Volume, list[Path]], tmp_path: Path) -> None:
    volume, source_paths = written
    label_map = np.zeros(volume.shape, np.uint8)
    label_map[2:20, 10:54, 10:54] = 2  # lung (not lesion-like)
    big, small = (12.0, 25.0, 40.0), (5.0, 20.0, 44.0)
    label_map[sphere_mask(volume, volume.index_to_world(big), 14.0)] = 5
    label_map[sphere_mask(volume, volume.index_to_world(small), 6.0)] = 5
    result = SegmentationResult(label_map=label_map, labels=tuple(LABELS))
    assert segmentation_key_slices(label_map, LABELS) == [5, 12]
    images = build_segmentation_overlay(volume, result, ALGORITHM, IDENTITY)
    assert len(images) == 2
    paths = _saved(images, tmp_path)
    for path in paths:
        errors, _ = dciodvfy_findings(path)
        assert errors == [], path
    errors, _ = dcentvfy_findings([*paths, *source_paths])
    assert errors == []
    centre = pydicom.dcmread(paths[1])
    assert centre.SeriesDescription.startswith(OVERLAY_DISCLAIMER) and len(centre.SeriesDescription) <= 64
    assert centre.BurnedInAnnotation == "YES" and centre.PhotometricInterpretation == "RGB"
    assert centre.SeriesInstanceUID == pydicom.dcmread(paths[0]).SeriesInstanceUID
    assert centre.SOPInstanceUID != pydicom.dcmread(paths[0]).SOPInstanceUID
    assert _slice_of(volume, centre) == 12  # the nodule's centre slice
    pixels = centre.pixel_array
    # The disclaimer in a band above the slice, the legend (lung, nodule) in a band below: the slice is whole.
    top, size = band_rows(volume.shape[2], 1), volume.shape[1]
    assert pixels.shape == (top + size + band_rows(volume.shape[2], 2), volume.shape[2], 3)
    image = pixels[top:top + size]
    rows, columns = np.nonzero(_coloured(image, palette_colour(5)))  # the nodule's outline, where it lies
    assert rows.size >= 14 and abs(rows.mean() - 25) < 1.5 and abs(columns.mean() - 40) < 1.5
    assert _coloured(image, palette_colour(2)).sum() > 50, "the lung's outline in its palette colour"
    band = pixels[:top]
    assert (band.min(axis=-1) > 150).sum() > 10 and _coloured(band, (0, 0, 0)).sum() > 100, "the disclaimer on top"
    legend = pixels[top + size:]
    assert _coloured(legend, palette_colour(5)).any() and _coloured(legend, palette_colour(2)).any()


def test_segmentation_overlay_bounds_and_falls_back_to_each_label(written: tuple[Volume, list[Path]]) -> None:
    volume, _ = written
    organs = np.zeros(volume.shape, np.uint8)
    organs[3:9, 20:40, 20:40] = 3
    organs[4:6, 10:50, 10:50] = 3
    organs[15:20, 5:30, 5:30] = 4
    assert segmentation_key_slices(organs, LABELS) == [5, 17]  # the middle of equally large sections
    many = np.zeros(volume.shape, np.uint8)
    for k in range(0, 24):
        many[k, 2 + 2 * (k % 10):4 + 2 * (k % 10), 5 + 2 * (k // 10) * 10:7 + 2 * (k // 10) * 10] = 5
    assert len(segmentation_key_slices(many, LABELS, limit=MAX_KEY_SLICES)) == MAX_KEY_SLICES
    empty = SegmentationResult(label_map=np.zeros(volume.shape, np.uint8), labels=tuple(LABELS))
    assert build_segmentation_overlay(volume, empty, ALGORITHM, IDENTITY) == []


def test_detection_overlay_leaves_low_confidence_out_unless_asked(written: tuple[Volume, list[Path]],
                                                                 tmp_path: Path) -> None:
    volume, _ = written
    sure = detection(volume, (11.0, 20.0, 30.0), 16.0, 0.87, NODULE)
    unsure = detection(volume, (18.0, 40.0, 40.0), 12.0, 0.35, NODULE)
    assert split_by_confidence([sure, unsure], 0.5) == ((sure,), (unsure,))
    assert outlined([sure, unsure], None, False) == (sure, unsure)
    default = build_detection_overlay(volume, [sure, unsure], ALGORITHM, IDENTITY, threshold=0.5)
    assert [_slice_of(volume, image) for image in default] == [11]
    pixels = default[0].pixel_array
    assert _coloured(pixels, palette_colour(5)).sum() > 20 and not _coloured(pixels, LOW_CONFIDENCE_RGB).any()
    both = build_detection_overlay(volume, [sure, unsure], ALGORITHM, IDENTITY, threshold=0.5,
                                   outline_low_confidence=True)
    assert len(both) == 2
    low = both[1].pixel_array
    assert _coloured(low, LOW_CONFIDENCE_RGB).sum() > 20 and not _coloured(low[:40], palette_colour(5)).any()
    path = _saved(both, tmp_path)[1]
    errors, _ = dciodvfy_findings(path)
    assert errors == []
    assert build_detection_overlay(volume, [unsure], ALGORITHM, IDENTITY, threshold=0.5) == []
