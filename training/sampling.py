"""Patch-centre indices that give every lesion, not every lesion voxel, the same chance.

Why: MONAI's ``RandCropByLabelClassesd`` picks a class, then a voxel of that
class uniformly. For nodules that means a 30 mm nodule (about 2000 voxels on
the 2.2 mm grid) is the centre of a patch 500 times as often as a 3 mm one
(4 voxels), so the network almost never trains on the smallest nodules, which
are exactly the ones it misses. :class:`BalanceComponentIndicesd` rewrites the
nodule class's voxel indices (as ``ClassesToIndicesd`` stored them) so that each
connected component contributes the same number of entries.

Why the ``offset``: a small nodule's few voxels, repeated, put it at the exact
centre of every patch drawn for it. A branch trained that way finds a 4.9 mm
nodule with probability 0.98 at the patch centre and 0.02 sixteen voxels off
it, so the sliding window, which sees each nodule anywhere in its windows,
missed every nodule under 6 mm. Moving each centre by a random offset puts the
nodule anywhere in the patch, as inference will see it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["NODULE_SAMPLINGS", "BalanceComponentIndicesd", "component_balanced_indices"]

#: Where a nodule branch's nodule patches are drawn (see :func:`training.nodule_branch.train_nodule_branch`):
#: per nodule with an offset, per nodule centred, per nodule voxel. The first is the default.
NODULE_SAMPLINGS: tuple[str, ...] = ("per-nodule-anywhere", "per-nodule", "per-voxel")


def component_balanced_indices(
    mask: npt.ArrayLike, per_component: int, offset: Sequence[int] | None = None, seed: int = 0
) -> npt.NDArray[np.int64]:
    """Flat (C-order) indices, ``per_component`` per 26-connected component of ``mask``.

    A component with fewer voxels repeats them cyclically; a larger one gives
    evenly spaced voxels of its own (in flat order). With ``offset`` (one
    number of voxels per axis) each index then moves by a uniform random
    integer in ``[-offset, offset]`` on each axis, kept inside the volume, so
    it lies near, not on, its component. Deterministic for a given ``seed``;
    an empty mask gives an empty array.
    """
    from workers.models.postprocessing import component_sizes

    if per_component < 1:
        raise ValueError(f"per_component must be >= 1, got {per_component}")
    mask = np.asarray(mask, dtype=bool)
    if offset is not None and (len(offset) != mask.ndim or min(offset) < 0):
        raise ValueError(f"offset must be {mask.ndim} voxel counts >= 0, got {tuple(offset)}")
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
    indices = np.concatenate(chosen).astype(np.int64)
    if offset is None or not any(offset):
        return indices
    rng = np.random.default_rng(seed)
    moved = [
        np.clip(axis + rng.integers(-reach, reach + 1, size=axis.size), 0, size - 1)
        for axis, reach, size in zip(np.unravel_index(indices, mask.shape), offset, mask.shape)
    ]
    return np.ravel_multi_index(moved, mask.shape).astype(np.int64)


class BalanceComponentIndicesd:
    """Dictionary transform: make one class's crop-centre indices component-balanced.

    Runs after ``ClassesToIndicesd(label_key, ..., indices_key)`` on the same,
    already padded, channel-first label. The entry for ``label_value`` in
    ``data[indices_key]`` is replaced by :func:`component_balanced_indices` of
    ``label == label_value`` (with ``offset``, drawn from ``seed``); the other
    classes are left alone.
    """

    def __init__(
        self, label_key: str, indices_key: str, label_value: int, per_component: int = 1000,
        offset: Sequence[int] | None = None, seed: int = 0,
    ) -> None:
        if per_component < 1:
            raise ValueError(f"per_component must be >= 1, got {per_component}")
        if offset is not None and (len(offset) != 3 or min(offset) < 0):
            raise ValueError(f"offset must be 3 voxel counts >= 0 (x, y, z), got {tuple(offset)}")
        self.label_key, self.indices_key = label_key, indices_key
        self.label_value, self.per_component = int(label_value), int(per_component)
        self.offset = None if offset is None else tuple(int(v) for v in offset)
        self.seed = int(seed)

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
            np.round(label[0]) == self.label_value, self.per_component, self.offset, self.seed
        )
        out[self.indices_key] = indices
        return out
