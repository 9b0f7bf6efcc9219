"""A segment's outline on its key slice, as a closed polygon in DICOM image coordinates.

Why: a report whose findings are all volumes (segments referenced in a SEG) gives a
viewer nothing to show on an image - OHIF opens such an SR on a black viewport. The
outline of each segment on the slice where it is largest lets the viewer open the
report on that slice, draw where the segment is, and show its volume and HU beside it.

How: on the slice with the most voxels of the label, the largest 4-connected
component (holes filled) is traced along its pixel edges - the exact border of the
pixels, clockwise on the screen - and simplified (Douglas-Peucker, half a pixel), so a
lung's outline is a few dozen points. Image coordinates follow PS3.3 C.18.6.1.1:
(0, 0) is the top left corner of the top left pixel, so pixel corners are whole numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from workers.outputs.measurements import slice_label_counts

__all__ = ["SliceOutline", "key_slice_outline", "trace_outline"]

#: Simplification tolerance in pixels: the polygon stays within half a pixel of the pixel border.
TOLERANCE_PX = 0.5


@dataclass(frozen=True)
class SliceOutline:
    """The outline of one segment: its key slice and the closed polygon (column, row), first point repeated."""

    slice_index: int
    points: npt.NDArray[np.float64]
    area_px: int


def _largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return ndimage.binary_fill_holes(mask)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def trace_outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The closed border (column, row) of a 2D mask's largest component, along pixel edges, simplified.

    Raises ValueError for an empty mask.
    """
    region = _largest_component(np.asarray(mask, dtype=bool))
    if not region.any():
        raise ValueError("cannot outline an empty mask")
    padded = np.pad(region, 1)
    # Directed border edges with the region on their right (clockwise on screen, rows growing downwards),
    # between pixel corners (x = column, y = row) of the unpadded image.
    following: dict[tuple[int, int], list[tuple[int, int]]] = {}
    rows, columns = np.nonzero(region)
    for r, c in zip(rows.tolist(), columns.tolist()):
        pr, pc = r + 1, c + 1
        if not padded[pr - 1, pc]:  # top side, left to right
            following.setdefault((c, r), []).append((c + 1, r))
        if not padded[pr, pc + 1]:  # right side, top to bottom
            following.setdefault((c + 1, r), []).append((c + 1, r + 1))
        if not padded[pr + 1, pc]:  # bottom side, right to left
            following.setdefault((c + 1, r + 1), []).append((c, r + 1))
        if not padded[pr, pc - 1]:  # left side, bottom to top
            following.setdefault((c, r + 1), []).append((c, r))
    start = min(following)  # top-left-most corner: on the outer border
    path = [start]
    previous_direction = (1, 0)
    current = start
    while True:
        options = following[current]
        if len(options) == 1:
            chosen = options.pop()
        else:  # a corner two pixels touch diagonally at: turn right, staying on this pixel's border
            def turn(point: tuple[int, int]) -> int:
                direction = (point[0] - current[0], point[1] - current[1])
                return previous_direction[0] * direction[1] - previous_direction[1] * direction[0]

            chosen = max(options, key=turn)
            options.remove(chosen)
        previous_direction = (chosen[0] - current[0], chosen[1] - current[1])
        current = chosen
        if current == start:
            break
        path.append(current)
    points = np.asarray(path + [start], dtype=np.float64)
    return _simplified(points)


def _simplified(closed: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Douglas-Peucker on a closed polygon (first point repeated), keeping the first point; stays closed."""
    keep = np.zeros(len(closed), dtype=bool)
    keep[0] = keep[-1] = True
    # Split at the point farthest from the start, so each half is an open polyline.
    far = int(np.argmax(np.linalg.norm(closed - closed[0], axis=1)))
    keep[far] = True
    stack = [(0, far), (far, len(closed) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        a, b = closed[first], closed[last]
        segment = b - a
        length = float(np.hypot(*segment))
        between = closed[first + 1:last]
        if length == 0.0:
            distances = np.linalg.norm(between - a, axis=1)
        else:
            distances = np.abs(segment[0] * (between[:, 1] - a[1]) - segment[1] * (between[:, 0] - a[0])) / length
        index = int(np.argmax(distances))
        if distances[index] > TOLERANCE_PX:
            middle = first + 1 + index
            keep[middle] = True
            stack.extend([(first, middle), (middle, last)])
    return closed[keep]


def key_slice_outline(label_map: npt.NDArray[np.integer], value: int,
                      per_slice: npt.NDArray[np.integer] | None = None) -> SliceOutline | None:
    """The outline of label ``value`` on the slice (axis 0) where it has the most voxels; None when absent.

    ``per_slice``: the map's :func:`~workers.outputs.measurements.slice_label_counts`, when the caller outlines
    several labels (one walk of the map for all of them); computed here otherwise.
    """
    label_map = np.asarray(label_map)
    if per_slice is None:
        per_slice = slice_label_counts(label_map)
    if value >= per_slice.shape[1]:
        return None
    areas = per_slice[:, value]
    if not areas.any():
        return None
    k = int(np.argmax(areas))
    return SliceOutline(slice_index=k, points=trace_outline(label_map[k] == value), area_px=int(areas[k]))
