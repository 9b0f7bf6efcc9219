"""A segment's outline on its key slice: the exact pixel border, simplified, in image coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from workers.outputs.segment_outline import key_slice_outline, trace_outline


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def test_a_rectangle_and_an_l_shape_are_outlined_along_their_pixel_corners_clockwise() -> None:
    box = np.zeros((10, 10), dtype=bool)
    box[2:5, 3:7] = True  # rows 2-4, columns 3-6
    assert trace_outline(box).tolist() == [[3, 2], [7, 2], [7, 5], [3, 5], [3, 2]]
    ell = np.zeros((10, 10), dtype=bool)
    ell[2:8, 2:4] = True
    ell[6:8, 2:8] = True
    assert trace_outline(ell).tolist() == [[2, 2], [4, 2], [4, 6], [8, 6], [8, 8], [2, 8], [2, 2]]


def test_a_disc_keeps_its_area_with_few_points_and_the_largest_part_is_outlined() -> None:
    rows, columns = np.mgrid[:128, :128]
    disc = (rows - 60) ** 2 + (columns - 50) ** 2 < 30 ** 2
    speck = (rows - 10) ** 2 + (columns - 110) ** 2 < 4 ** 2
    ring_hole = (rows - 60) ** 2 + (columns - 50) ** 2 < 5 ** 2
    points = trace_outline((disc | speck) & ~ring_hole)  # a hole is filled: the outline is the outer border
    assert len(points) < 120 and np.array_equal(points[0], points[-1])
    assert _area(points) == pytest.approx(int(disc.sum()), rel=0.02)
    assert points[:, 0].min() == 21 and points[:, 0].max() == 80  # columns 21..79 -> corners 21..80


def test_the_key_slice_is_where_the_label_is_largest_and_an_absent_label_has_none() -> None:
    label_map = np.zeros((5, 16, 16), dtype=np.uint8)
    label_map[1, 4:8, 4:8] = 3
    label_map[3, 2:12, 2:12] = 3
    label_map[2, 0:16, 0:16] = 1
    outline = key_slice_outline(label_map, 3)
    assert outline is not None and (outline.slice_index, outline.area_px) == (3, 100)
    assert key_slice_outline(label_map, 7) is None
    with pytest.raises(ValueError, match="empty"):
        trace_outline(np.zeros((4, 4), dtype=bool))
