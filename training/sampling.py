"""Patch-centre indices that give every lesion, not every lesion voxel, the same chance.

Why: MONAI's ``RandCropByLabelClassesd`` picks a class, then a voxel of that
class uniformly. For nodules that means a 30 mm nodule (about 2000 voxels on
the 2.2 mm grid) is the centre of a patch 500 times as often as a 3 mm one
(4 voxels), so the network almost never trains on the smallest nodules, which
are exactly the ones it misses. :class:`BalanceComponentIndicesd` rewrites the
nodule class's voxel indices (as ``ClassesToIndicesd`` stored them) so that each
connected component contributes the same number of entries.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BalanceComponentIndicesd", "component_balanced_indices"]


def component_balanced_indices(mask: npt.ArrayLike, per_component: int) -> npt.NDArray[np.int64]:
    """Flat (C-order) indices of ``mask``'s voxels, ``per_component`` per 26-connected component.

    A component with fewer voxels repeats them cyclically; a larger one gives
    evenly spaced voxels of its own (in flat order). Deterministic; an empty
    mask gives an empty array.
    """
    from training.postprocessing import component_sizes

    if per_component < 1:
        raise ValueError(f"per_component must be >= 1, got {per_component}")
    mask = np.asarray(mask, dtype=bool)
    components, sizes = component_sizes(mask)
    count = sizes.size - 1
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    flat = components.ravel()
    voxels = np.flatnonzero(flat)
    owners = flat[voxels]
    order = np.argsort(owners, kind="stable")
    voxels, owners = voxels[order], owners[order]
    starts = np.searchsorted(owners, np.arange(1, count + 1))
    ends = np.append(starts[1:], voxels.size)
    chosen = []
    for start, end in zip(starts, ends):
        own = voxels[start:end]
        if own.size >= per_component:
            chosen.append(own[np.linspace(0, own.size - 1, per_component).round().astype(np.int64)])
        else:
            chosen.append(np.resize(own, per_component))
    return np.concatenate(chosen).astype(np.int64)


class BalanceComponentIndicesd:
    """Dictionary transform: make one class's crop-centre indices component-balanced.

    Runs after ``ClassesToIndicesd(label_key, ..., indices_key)`` on the same,
    already padded, channel-first label. The entry for ``label_value`` in
    ``data[indices_key]`` is replaced by :func:`component_balanced_indices` of
    ``label == label_value``; the other classes are left alone.
    """

    def __init__(self, label_key: str, indices_key: str, label_value: int, per_component: int = 1000) -> None:
        if per_component < 1:
            raise ValueError(f"per_component must be >= 1, got {per_component}")
        self.label_key, self.indices_key = label_key, indices_key
        self.label_value, self.per_component = int(label_value), int(per_component)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        indices = list(out[self.indices_key])
        if not 0 <= self.label_value < len(indices):
            raise ValueError(
                f"label value {self.label_value} has no entry in {self.indices_key!r} ({len(indices)} classes)"
            )
        label = np.asarray(out[self.label_key])
        if label.ndim != 4 or label.shape[0] != 1:
            raise ValueError(f"{self.label_key!r} must be one channel-first 3D label, got shape {label.shape}")
        indices[self.label_value] = component_balanced_indices(
            np.round(label[0]) == self.label_value, self.per_component
        )
        out[self.indices_key] = indices
        return out
