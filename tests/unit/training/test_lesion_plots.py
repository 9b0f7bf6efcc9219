"""Crops around lesions for the evaluation's picture: placement, padding at the volume's edge, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.plots import lesion_crop, plot_lesion_gallery

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ct = np.full((40, 40, 10), -850.0, dtype=np.float32)
    reference = np.zeros(ct.shape, dtype=bool)
    reference[18:22, 18:22, 5] = True
    ct[reference] = 40.0
    prediction = reference.copy()
    prediction[18:20] = False
    return ct, reference, prediction


def test_the_crop_is_centred_on_the_lesion_and_padded_outside_the_volume() -> None:
    ct, reference, prediction = _volumes()
    centred = lesion_crop(ct, reference, prediction, (20, 20, 5), "centred", half_width=8)
    assert centred.ct.shape == centred.reference.shape == (16, 16) and centred.caption == "centred"
    assert np.argwhere(centred.reference).tolist() == [[x, y] for x in range(6, 10) for y in range(6, 10)]
    assert centred.prediction.sum() == 8 and (centred.ct[centred.reference] == 40.0).all()
    corner = lesion_crop(ct, reference, prediction, (0, 39, 5), "corner", half_width=8)
    assert (corner.ct[:8] == -1024.0).all() and (corner.ct[:, 9:] == -1024.0).all()  # beyond x < 0 and y > 39
    assert (corner.ct[8:, :9] == -850.0).all() and not corner.reference.any()


def test_bad_inputs_are_named() -> None:
    ct, reference, prediction = _volumes()
    with pytest.raises(ValueError, match=r"one \(x, y, z\) shape, got \(40, 40, 10\), \(40, 40, 9\)"):
        lesion_crop(ct, reference[..., :9], prediction, (1, 1, 1), "")
    with pytest.raises(ValueError, match=r"centre_voxel \(1, 1, 10\) is outside the volume of shape \(40, 40, 10\)"):
        lesion_crop(ct, reference, prediction, (1, 1, 10), "")


def test_gallery_draws_the_rows_that_have_crops(tmp_path: Path) -> None:
    ct, reference, prediction = _volumes()
    crop = lesion_crop(ct, reference, prediction, (20, 20, 5), "4 mm, Dice 0.67")
    plot_lesion_gallery([("nodules < 6 mm", [crop, crop]), ("nodules 6-8 mm", [])], tmp_path / "lesions.png")
    assert (tmp_path / "lesions.png").read_bytes().startswith(PNG_MAGIC)
    plot_lesion_gallery([("nothing", [])], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
