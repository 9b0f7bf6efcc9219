"""The shipped segmentation model on a real CT (Debian's InVesalius head CT), through the product's path.

The model was trained on chest phantoms, so a head is far outside what it knows; what
must hold is that it runs, returns a label map on the series' own grid, and says "body" and "bone" where the head and skull are, not
lungs or nodules in the brain or in the air around the head. A picture of what it does is written to
``test-artifacts/real_ct_segmentation.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from training.data.invesalius import INVESALIUS_EXAMPLE, read_invesalius_project
from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, write_series
from workers.models.registry import default_registry
from workers.volume import load_series

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The InVesalius head CT as a DICOM series; rows run anterior, slices superior (an unusual orientation)."""
    project = read_invesalius_project(INVESALIUS_EXAMPLE)
    sz, sy, sx = project.spacing_zyx_mm
    nz, ny, nx = project.volume.shape
    geometry = SeriesGeometry(rows=ny, columns=nx, slices=nz, pixel_spacing=(sy, sx), slice_spacing=sz,
                              slice_thickness=sz, orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    datasets = ct_series_datasets(project.volume, geometry, seed=3, patient_id="INVESALIUS-0051",
                                  study_description="Head CT (InVesalius example)")
    return write_series(datasets, tmp_path_factory.mktemp("head_ct"))


@pytest.mark.slow
def test_chest_model_on_a_real_head_ct_keeps_geometry_and_says_body_and_bone(head_ct: list[Path]) -> None:
    torch.set_num_threads(1)
    volume = load_series(head_ct)
    model = default_registry().load("chest-ct-segmentation")
    result = model.predict(volume)
    labels = result.label_map
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    _picture(volume.array, labels, result.labels, volume.spacing_mm, ARTIFACTS / "real_ct_segmentation.png")
    names = {label.value: label.name for label in result.labels}
    by_name = {name: labels == value for value, name in names.items()}

    head = volume.array > -300  # soft tissue and bone
    skull = volume.array > 400
    labelled = labels > 0
    # Geometry: what is labelled body or bone is the head (not shifted, flipped or transposed).
    tissue = by_name["body"] | by_name["bone"]
    overlap = float((tissue & head).sum() / max(1, (tissue | head).sum()))
    assert overlap > 0.8, overlap
    bone = by_name["bone"]
    bone_dice = 2 * float((bone & skull).sum()) / max(1, int(bone.sum() + skull.sum()))
    assert bone_dice > 0.5, bone_dice
    # No lung or nodule inside the head's tissue.
    inside = float(((by_name["lung"] | by_name["nodule"]) & head).sum() / head.sum())
    assert inside < 0.01, inside
    # Nor in the air around the head: the network calls much of it lung (2.6 L; the phantoms it was trained on
    # have little air around the body), and the bundle's postprocessing clears organs outside the body (what
    # is left, 45 mL, is the air of the sinuses and airways).
    enclosed = np.stack([ndimage.binary_fill_holes(level) for level in volume.array > -500])
    outside_ml = float((by_name["lung"] & ~enclosed).sum()) * float(np.prod(volume.spacing_mm)) / 1000
    assert outside_ml < 5.0, outside_ml
    assert int(labelled.sum()) > 0


def _picture(hu: np.ndarray, labels: np.ndarray, specs: tuple, spacing: tuple[float, float, float],  # type: ignore[type-arg]
             path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    colours = np.zeros((256, 4))
    for spec in specs:
        colours[spec.value] = [*(c / 255 for c in spec.color_rgb), 0.45]
    views = [("axial", hu[hu.shape[0] // 2], labels[labels.shape[0] // 2], spacing[1] / spacing[2]),
             ("coronal", hu[:, hu.shape[1] // 2][::-1], labels[:, labels.shape[1] // 2][::-1], spacing[0] / spacing[2]),
             ("sagittal", hu[:, :, hu.shape[2] // 2][::-1], labels[:, :, labels.shape[2] // 2][::-1],
              spacing[0] / spacing[1])]
    figure, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for column, (title, image, label, aspect) in enumerate(views):
        for row in range(2):
            axes[row, column].imshow(image, cmap="gray", vmin=-200, vmax=400, interpolation="nearest", aspect=aspect)
            axes[row, column].set_axis_off()
        axes[1, column].imshow(colours[label], interpolation="nearest", aspect=aspect)
        axes[0, column].set_title(f"real head CT, {title}")
        axes[1, column].set_title(f"chest model labels, {title}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s.value][:3]) for s in specs]
    figure.legend(handles, [s.name for s in specs], loc="lower center", ncol=len(specs))
    figure.savefig(path, dpi=80)
    plt.close(figure)
