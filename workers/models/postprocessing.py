"""Bundle postprocessing: anatomical sanity on a segmentation network's output.

* :class:`DropSmallComponentsd` - drop specks of one label that are smaller than any lesion the model finds.
* :class:`KeepInsideBodyd` - clear organ labels (lung, heart, nodule) painted outside the body.

Why the size filter: the nodule branch calls a few isolated voxels nodule in some lungs (vessel
crossings), which puts a false nodule in a nodule-free study. A lesion-size
filter, chosen on validation cases as nnU-Net chooses its postprocessing,
removes them. It runs on the softmax, before the argmax, so a dropped voxel
takes the label the network ranked next instead of a fixed one.

Why the body filter: the demo chest model labels some of the air around the
patient as lung (1-23 % of its lung voxels on phantoms, 2.6 L of the air around a
head), because outside air and aerated lung look alike in a patch. A lung in the
air behind the patient on a SEG overlay costs a radiologist's trust and trips the
plausibility rule "lung inside the body". Organs exist only inside the body,
which the network's own tissue labels outline, so the filter needs no image and
no thresholds: see :func:`outside_body`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DropSmallComponentsd",
    "KeepInsideBodyd",
    "component_sizes",
    "drop_small_components",
    "keep_inside_body",
    "outside_body",
]

#: In-plane 4-connectivity, no connection between axial slices (the last axis): a structure for one
#: ``ndimage.label`` call that labels every slice on its own.
_IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS[1, :, 1] = _IN_PLANE_CROSS[:, 1, 1] = True


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component number per voxel, voxel count per component number) of ``mask``'s 26-connected regions.

    Background is component 0, whose count is set to 0, so ``sizes[components] >= m``
    is the mask's voxels in components of at least ``m`` voxels for any ``m >= 1``.
    """
    from scipy import ndimage

    components, count = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3,) * np.ndim(mask), dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components, sizes


def drop_small_components(probabilities: torch.Tensor, channel: int, min_voxels: int,
                          keep_probability: float | None = None) -> torch.Tensor:
    """``probabilities`` (C, X, Y, Z) with ``channel`` set to 0 where it wins the argmax in a component too small.

    Components are 26-connected regions where ``channel`` is the argmax; those
    with fewer than ``min_voxels`` voxels are cleared, unless one of their voxels
    has a probability of at least ``keep_probability`` (a network that marks the
    lesions it is sure of, such as a small-nodule stage, keeps them whatever their
    size). A copy is returned; the input is not changed. ``min_voxels`` 1 or less
    changes nothing.
    """
    if keep_probability is not None and not 0.0 < keep_probability <= 1.0:
        raise ValueError(f"keep_probability must be a probability in (0, 1], got {keep_probability}")
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (channels, x, y, z), got shape {tuple(probabilities.shape)}")
    if not 0 <= channel < probabilities.shape[0]:
        raise ValueError(f"channel {channel} is not one of the {probabilities.shape[0]} channels")
    out = probabilities.clone()
    if min_voxels <= 1:
        return out
    out[channel][_small_wins(probabilities, channel, min_voxels, keep_probability)] = 0
    return out


def _small_wins(probabilities: torch.Tensor, channel: int, min_voxels: int,
                keep_probability: float | None) -> torch.Tensor:
    """Where ``channel`` wins the argmax (first maximum, as ``argmax``) in a component under ``min_voxels``
    without a voxel of ``keep_probability``."""
    p = probabilities[channel]
    wins = torch.ones_like(p, dtype=torch.bool)
    # Max over the other channels instead of a channel-wise argmax: 15x faster on a 6 x 160 x 160 x 140 volume.
    if channel > 0:
        wins &= p > probabilities[:channel].amax(0)
    if channel + 1 < probabilities.shape[0]:
        wins &= p >= probabilities[channel + 1:].amax(0)
    wins_np = wins.cpu().numpy()
    components, sizes = component_sizes(wins_np)
    small = sizes < min_voxels
    if keep_probability is not None:
        certain = np.unique(components[wins_np & (p >= keep_probability).cpu().numpy()])
        small[certain[certain > 0]] = False
    return torch.from_numpy(wins_np & small[components]).to(probabilities.device)


class _EachKey:
    """A MONAI-style dictionary transform that applies :meth:`apply` to the tensor at each of ``keys``.

    Why: the transforms below differ only in what they do to one tensor; taking the keys, making
    a tensor of the value and leaving the other items alone is the same for all of them.
    """

    def __init__(self, keys: str | Sequence[str]) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.keys:
            value = out[key]
            out[key] = self.apply(value if isinstance(value, torch.Tensor) else torch.as_tensor(value))
        return out


class DropSmallComponentsd(_EachKey):
    """Dictionary transform for a bundle's postprocessing: :func:`drop_small_components` on ``keys``.

    Place it after ``Activationsd(softmax=True)`` and before ``AsDiscreted(argmax=True)``.
    Keeps the MetaTensor's metadata (needed by ``Invertd``).
    """

    def __init__(self, keys: str | Sequence[str], channel: int, min_voxels: int,
                 keep_probability: float | None = None) -> None:
        super().__init__(keys)
        self.channel, self.min_voxels = int(channel), int(min_voxels)
        self.keep_probability = None if keep_probability is None else float(keep_probability)

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        # drop_small_components checks the arguments and clones; a MetaTensor's clone keeps its metadata
        # (affine and applied operations, which Invertd needs).
        return drop_small_components(value, self.channel, self.min_voxels, self.keep_probability)


def _in_plane_disk(radius: int) -> np.ndarray:
    """A disk of ``radius`` voxels in the plane of the first two axes, one voxel thick along the last."""
    r = np.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius)[:, :, None]


def outside_body(labels: np.ndarray, body_labels: Sequence[int], closing_voxels: int = 0) -> np.ndarray:
    """Where the (X, Y, Z) label map ``labels`` is outside the body, judged axial slice by axial slice (last axis).

    The body is every voxel of ``body_labels`` (tissue: body, bone) and all it
    encloses in its slice: lungs, heart and mediastinum are holes in the ring of
    chest wall. Outside is the rest of the slice that is reached from the slice's
    edge without crossing the body: the outside air, and whatever the network
    painted there. Where the field of view cuts the body (tissue on the slice's
    edge) the ring is open at the edge, so there only background (0) on the edge
    leads outside: a lung that a small field of view cuts stays. ``closing_voxels``
    (> 0) first closes gaps in the body ring up to about twice that many voxels,
    in-plane.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (x, y, z), got shape {labels.shape}")
    if closing_voxels < 0:
        raise ValueError(f"closing_voxels must be >= 0, got {closing_voxels}")
    from scipy import ndimage

    tissue = np.isin(labels, np.asarray(list(body_labels)))
    if closing_voxels > 0:
        # Closing erodes from the image edge; the union keeps tissue that touches it.
        tissue |= ndimage.binary_closing(tissue, structure=_in_plane_disk(closing_voxels))
    regions, _ = ndimage.label(~tissue, structure=_IN_PLANE_CROSS)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[[0, -1], :, :] = True
    edge[:, [0, -1], :] = True
    cut = (tissue & edge).any(axis=(0, 1))  # slices whose body the field of view cuts
    seeds = np.unique(regions[edge & ((labels == 0) | ~cut)])
    return np.isin(regions, seeds[seeds > 0])


def _label_sets(inside_labels: Sequence[int], body_labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """(inside labels, body labels), sorted; ValueError when they overlap, name background or there is no body."""
    inside, body = {int(v) for v in inside_labels}, {int(v) for v in body_labels}
    if inside & body:
        raise ValueError(f"labels {sorted(inside & body)} are both inside_labels and body_labels")
    if 0 in inside | body:
        raise ValueError("label 0 is background; it can be neither an inside label nor a body label")
    if not body:
        raise ValueError("body_labels is empty: without tissue labels there is no body to keep labels inside")
    return sorted(inside), sorted(body)


def keep_inside_body(labels: torch.Tensor, inside_labels: Sequence[int], body_labels: Sequence[int],
                     closing_voxels: int = 0) -> torch.Tensor:
    """``labels`` (1, X, Y, Z) with voxels of ``inside_labels`` that lie outside the body set to background (0).

    The body is that of :func:`outside_body` (axial slices along the last axis, as
    after ``Orientationd("RAS")``). Background, not the next-ranked label: outside
    the body only background is anatomy, and a tissue label there would only move
    the body's edge. A copy is returned (a MetaTensor keeps its metadata); the input
    is not changed.
    """
    inside, body = _label_sets(inside_labels, body_labels)
    if labels.ndim != 4 or labels.shape[0] != 1:
        raise ValueError(
            f"labels must be one label map (1, x, y, z) - place the filter after AsDiscreted(argmax=True) - "
            f"got shape {tuple(labels.shape)}"
        )
    out = labels.clone()
    values = labels[0].detach().cpu().numpy()
    clear = outside_body(values, body, closing_voxels) & np.isin(values, inside)
    if clear.any():
        out[0][torch.from_numpy(clear).to(labels.device)] = 0
    return out


class KeepInsideBodyd(_EachKey):
    """Dictionary transform for a bundle's postprocessing: :func:`keep_inside_body` on ``keys``.

    Place it after ``AsDiscreted(argmax=True)`` and before ``Invertd``: on the
    network's RAS grid axial slices lie along the last axis, and the grid is
    usually coarser than the series (cheaper). Keeps the MetaTensor's metadata
    (needed by ``Invertd``).
    """

    def __init__(self, keys: str | Sequence[str], inside_labels: Sequence[int], body_labels: Sequence[int],
                 closing_voxels: int = 0) -> None:
        super().__init__(keys)
        # Checked here too, so that a bundle with a wrong step fails when it is loaded, not on the first study.
        self.inside_labels, self.body_labels = _label_sets(inside_labels, body_labels)
        if closing_voxels < 0:
            raise ValueError(f"closing_voxels must be >= 0, got {closing_voxels}")
        self.closing_voxels = int(closing_voxels)

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        return keep_inside_body(value, self.inside_labels, self.body_labels, self.closing_voxels)
