"""Per-segment volume and intensity statistics of a label map on a volume's own grid (pure numpy).

Why: the TID 1500 report states, for every segment, how large it is (mL) and
its mean / min / max intensity (HU for CT). Those numbers must be computed on
exactly the voxels the model labelled, on the source grid (no resampling), and
in one place, so that the SR, the UI and the tests agree on them.

The voxel volume is ``|det|`` of the volume's index-to-world matrix, which is
``spacing[0] * spacing[1] * spacing[2]`` for an orthogonal grid and stays right
for sheared grids (gantry tilt). Sums are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from workers.volume import Volume

__all__ = ["SegmentMeasurement", "measure_segments", "voxel_volume_ml"]

#: Cubic millimetres per millilitre.
_MM3_PER_ML = 1000.0


@dataclass(frozen=True)
class SegmentMeasurement:
    """Size and intensity of one label value.

    ``voxel_count`` voxels carry ``label_value``; ``volume_ml`` is that count
    times the voxel volume. The intensity statistics are in the volume's units
    (HU for CT) and are None for a label with no voxel, which cannot have any.
    """

    label_value: int
    voxel_count: int
    volume_ml: float
    mean: float | None
    minimum: float | None
    maximum: float | None

    @property
    def present(self) -> bool:
        """True when at least one voxel carries the label."""
        return self.voxel_count > 0


def voxel_volume_ml(volume: Volume) -> float:
    """Volume of one voxel of ``volume`` in millilitres (|det| of the index-to-world matrix / 1000)."""
    return float(abs(np.linalg.det(volume.affine[:3, :3]))) / _MM3_PER_ML


def measure_segments(
    volume: Volume,
    label_map: npt.NDArray[np.integer],
    label_values: Iterable[int] | None = None,
) -> tuple[SegmentMeasurement, ...]:
    """Measure each label value of ``label_map`` (same shape as ``volume.array``) on ``volume``.

    ``label_values`` selects and orders the labels to measure (e.g. every label a
    model can produce, so that absent ones are reported with a zero volume);
    by default every non-zero value present in ``label_map`` is measured, in
    increasing order. Value 0 is background and is never a segment.

    Raises ValueError when the label map does not lie on the volume's grid or a
    requested label value is not in 1..255.
    """
    labels = np.asarray(label_map)
    if labels.shape != volume.shape:
        raise ValueError(
            f"series {volume.series_instance_uid}: label map shape {labels.shape} "
            f"!= volume shape {volume.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label map must hold integers, got dtype {labels.dtype}")

    if label_values is not None:
        requested = [int(v) for v in label_values]
        bad = [v for v in requested if not 1 <= v <= 255]
        if bad:
            raise ValueError(f"label values must be 1..255, got {bad}")
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"label map holds negative value {int(labels.min())}")

    # Counts and sums slice by slice (bounded memory on 512x512x600 volumes),
    # then one masked pass per present label for min/max.
    intensities = np.asarray(volume.array)
    length = max(int(labels.max()) if labels.size else 0, 255) + 1
    counts = np.zeros(length, dtype=np.int64)
    sums = np.zeros(length, dtype=np.float64)
    for k in range(labels.shape[0]):
        slice_labels = labels[k].ravel()
        counts += np.bincount(slice_labels, minlength=length)
        sums += np.bincount(slice_labels, weights=intensities[k].ravel().astype(np.float64), minlength=length)
    values = requested if label_values is not None else [int(v) for v in np.flatnonzero(counts[1:]) + 1]

    unit_ml = voxel_volume_ml(volume)
    results: list[SegmentMeasurement] = []
    for value in values:
        count = int(counts[value])
        if count == 0:
            results.append(SegmentMeasurement(value, 0, 0.0, None, None, None))
            continue
        inside = intensities[labels == value]
        results.append(
            SegmentMeasurement(
                label_value=value,
                voxel_count=count,
                volume_ml=count * unit_ml,
                mean=float(sums[value] / count),
                minimum=float(inside.min()),
                maximum=float(inside.max()),
            )
        )
    return tuple(results)
