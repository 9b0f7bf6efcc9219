"""Per-segment volume and intensity statistics of a label map on a volume's own grid (pure numpy).

Why: the TID 1500 report states, for every segment, how large it is (mL) and
its mean / min / max intensity (HU for CT). Those numbers must be computed on
exactly the voxels the model labelled, on the source grid (no resampling), and
in one place, so that the SR, the UI and the tests agree on them.

The voxel volume is ``|det|`` of the volume's index-to-world matrix, which is
``spacing[0] * spacing[1] * spacing[2]`` for an orthogonal grid and stays right
for sheared grids (gantry tilt). Sums are accumulated in float64.

How (speed: 300x512x512 in about 0.2 s, the product budget is 0.3 s): a label
map is made of long runs of one value along each row, so the map is walked a
few slices at a time as runs (where the value changes); every statistic is one
``reduceat`` over the runs (count = run length, sum in float64, min, max) and
one small per-label reduction of the run results. No per-label mask and no
``bincount`` over every voxel (which converts each voxel to a 64-bit index)
is needed. :func:`label_counts` is the same walk without intensities, for
callers that only need to know which labels are present (the SEG builder), and
:func:`slice_label_counts` the same again per slice (runs end with their slice),
for callers that look for a label's key slice or the slices it spans (the SR's
outlines, the key images, the preview): one walk of about 0.04 s instead of a
full-volume comparison per label (about 0.06 s each).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from workers.volume import Volume

__all__ = ["SegmentMeasurement", "label_counts", "measure_segments", "slice_label_counts", "voxel_volume_ml"]

#: Cubic millimetres per millilitre.
_MM3_PER_ML = 1000.0
#: Voxels per chunk of the run walk (4 slices of 512x512: chunks stay in the CPU caches).
_CHUNK_VOXELS = 1 << 20


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


def _checked_labels(label_map: npt.ArrayLike, where: str) -> npt.NDArray[np.integer]:
    """``label_map`` as an integer array without negative values; ``where`` names it in errors."""
    labels = np.asarray(label_map)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: label map must hold integers, got dtype {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and int(labels.min()) < 0:
        raise ValueError(f"{where}: label map holds negative value {int(labels.min())}")
    return labels


def _table_length(labels: npt.NDArray[np.integer]) -> int:
    """Entries of a per-label table: every uint8 value, else up to the largest value present."""
    if labels.dtype == np.uint8 or not labels.size:
        return 256
    return max(int(labels.max()), 255) + 1


def _run_walk(
    labels: npt.NDArray[np.integer],
) -> Iterator[tuple[slice, npt.NDArray[np.intp], npt.NDArray[np.integer], npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """The runs of equal values of a label map (axis 0: slices) in C order, a few whole slices at a time.

    Yields per chunk: its slice of the flattened map, the start offset of each
    run in the chunk, the run's label value, its length and the index of its
    slice. A run ends where its slice ends (so it lies in one slice); a run of
    one value across slices comes as several runs, which every statistic here
    tolerates.
    """
    flat = labels.reshape(-1)
    per_slice = max(1, flat.size // labels.shape[0]) if labels.ndim and labels.shape[0] else 1
    step = max(1, _CHUNK_VOXELS // per_slice) * per_slice
    for offset in range(0, flat.size, step):
        where = slice(offset, min(offset + step, flat.size))
        chunk = flat[where]
        change = chunk[1:] != chunk[:-1]
        change[per_slice - 1::per_slice] = True  # the last voxel of each slice ends its run
        starts = np.flatnonzero(change)
        starts += 1
        starts = np.concatenate((np.zeros(1, dtype=starts.dtype), starts))
        yield where, starts, chunk[starts], np.diff(starts, append=chunk.size), offset // per_slice + starts // per_slice


def label_counts(label_map: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Voxels per label value: ``counts[v]`` voxels of ``label_map`` hold ``v`` (at least 256 entries).

    Raises ValueError when the map does not hold non-negative integers.
    """
    labels = _checked_labels(label_map, "label counts")
    counts = np.zeros(_table_length(labels), dtype=np.int64)
    for _, _, run_labels, lengths, _ in _run_walk(labels):
        np.add.at(counts, run_labels, lengths)
    return counts


def slice_label_counts(label_map: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Voxels per slice and label value: ``counts[k, v]`` voxels of slice ``k`` (axis 0) of ``label_map`` hold ``v``
    (at least 256 columns). ``counts.sum(axis=0)`` is :func:`label_counts`.

    Raises ValueError when the map does not hold non-negative integers.
    """
    labels = _checked_labels(label_map, "label counts")
    slices = labels.shape[0] if labels.ndim else 1
    length = _table_length(labels)
    counts = np.zeros(slices * length, dtype=np.int64)
    for _, _, run_labels, lengths, run_slices in _run_walk(labels):
        # One weighted bincount over (slice, value) cells; float64 counts are exact far beyond any slice's voxels.
        counts += np.bincount(run_slices * length + run_labels, weights=lengths,
                              minlength=counts.size).astype(np.int64)
    return counts.reshape(slices, length)


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
    labels = _checked_labels(labels, f"series {volume.series_instance_uid}")
    if label_values is not None:
        requested = [int(v) for v in label_values]
        bad = [v for v in requested if not 1 <= v <= 255]
        if bad:
            raise ValueError(f"label values must be 1..255, got {bad}")

    length = _table_length(labels)
    counts = np.zeros(length, dtype=np.int64)
    sums = np.zeros(length, dtype=np.float64)
    minima = np.full(length, np.inf, dtype=np.float64)
    maxima = np.full(length, -np.inf, dtype=np.float64)
    flat_values = np.asarray(volume.array).reshape(-1)
    for where, starts, run_labels, lengths, _ in _run_walk(labels):
        values = flat_values[where]
        np.add.at(counts, run_labels, lengths)
        np.add.at(sums, run_labels, np.add.reduceat(values.astype(np.float64), starts))
        np.minimum.at(minima, run_labels, np.minimum.reduceat(values, starts))
        np.maximum.at(maxima, run_labels, np.maximum.reduceat(values, starts))
    values_measured = requested if label_values is not None else [int(v) for v in np.flatnonzero(counts[1:]) + 1]

    unit_ml = voxel_volume_ml(volume)
    results: list[SegmentMeasurement] = []
    for value in values_measured:
        count = int(counts[value])
        if count == 0:
            results.append(SegmentMeasurement(value, 0, 0.0, None, None, None))
            continue
        results.append(
            SegmentMeasurement(
                label_value=value,
                voxel_count=count,
                volume_ml=count * unit_ml,
                mean=float(sums[value] / count),
                minimum=float(minima[value]),
                maximum=float(maxima[value]),
            )
        )
    return tuple(results)
