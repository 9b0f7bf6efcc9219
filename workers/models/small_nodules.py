"""Small-nodule stage of the segmentation model: Hessian blob candidates, a patch classifier, painted nodules.

Why: the nodule branch (:mod:`workers.models.segmentation_networks`) misses nearly every nodule
under 6 mm: one to eight voxels on the 2.2 mm grid. Computer-aided detection
systems find such nodules in two stages, as in the LUNA16 challenge: candidates
from a blob filter (here :class:`workers.models.blobness.HessianBlobness`), which
finds nearly all of them together with vessel crossings and bifurcations, and
a classifier on a small patch around each candidate that removes the vessels.

What: :class:`SmallNoduleStage` maps the image and the anatomy network's logits
of one sliding window to a mask of painted nodule voxels: local maxima of the
blob strength above ``candidate_threshold`` inside the lungs, at most
``max_candidates`` per window, each classified on a patch of the image and its
blob strength; an accepted candidate paints the voxels of its 3 x 3 x 3
neighbourhood whose strength reaches ``paint_fraction`` of its peak (a nodule of
3-6 mm covers one to a few voxels of this grid). :func:`candidate_patches` cuts
the classifier's input, the same way in training and inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from workers.models.blobness import DEFAULT_BLOB_SIGMAS_MM, HessianBlobness

__all__ = [
    "DEFAULT_CANDIDATE_PATCH",
    "SmallNoduleStage",
    "candidate_classifier_def",
    "candidate_patches",
    "candidate_peaks",
]

#: Classifier patch (x, y, z voxels) around a candidate: 3.5 x 3.5 x 3 cm on the 2.2 x 2.2 x 2.5 mm grid, enough
#: to see whether a bright spot continues as a vessel.
DEFAULT_CANDIDATE_PATCH: tuple[int, int, int] = (16, 16, 12)


def candidate_classifier_def(patch: Sequence[int] = DEFAULT_CANDIDATE_PATCH,
                             channels: Sequence[int] = (16, 32, 64)) -> dict[str, Any]:
    """MONAI config of the candidate classifier: a strided residual CNN on (image, blob strength) patches, one logit.

    Batch norm, not MONAI's default instance norm: a patch's absolute intensity
    (a nodule's HU, the strength of its peak) is part of what tells it from a vessel.
    """
    return {
        "_target_": "Classifier",
        "in_shape": [2, *[int(v) for v in patch]],
        "classes": 1,
        "channels": [int(c) for c in channels],
        "strides": [2] * len(channels),
        "num_res_units": 1,
        "norm": "batch",
    }


def candidate_peaks(strength: torch.Tensor, allowed: torch.Tensor, threshold: float,
                    max_candidates: int) -> torch.Tensor:
    """(N, 4) indices (batch, x, y, z) of the local maxima of ``strength`` (B, 1, X, Y, Z) above ``threshold``.

    A local maximum is a voxel that no voxel of its 3 x 3 x 3 neighbourhood
    exceeds, inside ``allowed`` (B, 1, X, Y, Z, bool). With more than
    ``max_candidates`` per batch item, the strongest are kept.
    """
    peak = (strength == F.max_pool3d(strength, kernel_size=3, stride=1, padding=1)) & allowed & (strength > threshold)
    idx = torch.nonzero(peak[:, 0])
    if idx.shape[0] == 0:
        return idx
    kept = []
    for b in range(strength.shape[0]):
        own = idx[idx[:, 0] == b]
        if own.shape[0] > max_candidates:
            values = strength[b, 0][own[:, 1], own[:, 2], own[:, 3]]
            own = own[torch.topk(values, max_candidates).indices]
        kept.append(own)
    return torch.cat(kept, dim=0)


def candidate_patches(image: torch.Tensor, strength: torch.Tensor, peaks: torch.Tensor,
                      patch: list[int]) -> torch.Tensor:
    """(N, 2, px, py, pz) patches of ``image`` and ``strength`` (B, 1, X, Y, Z), the peak at index p // 2.

    Beyond the volume the patch repeats its border voxels (as the sliding window pads).
    """
    px, py, pz = int(patch[0]), int(patch[1]), int(patch[2])
    both = torch.cat([image, strength.to(image.dtype)], dim=1)
    padded = F.pad(both, [pz // 2, pz - pz // 2, py // 2, py - py // 2, px // 2, px - px // 2], mode="replicate")
    out = [padded[int(p[0]), :, int(p[1]):int(p[1]) + px, int(p[2]):int(p[2]) + py, int(p[3]):int(p[3]) + pz]
           for p in peaks]
    if not out:
        return torch.zeros((0, 2, px, py, pz), dtype=image.dtype, device=image.device)
    return torch.stack(out, dim=0)


class SmallNoduleStage(torch.nn.Module):
    """Painted small-nodule mask (B, 1, X, Y, Z, bool) of a window from its image and anatomy logits.

    ``classifier`` maps (N, 2, *patch) to (N, 1) logits, nodule against not;
    a candidate is accepted at probability ``accept_threshold``. Candidates are
    looked for where the anatomy network's argmax is one of ``lung_labels``.
    ``spacing_mm`` (x, y, z) and ``sigmas_mm`` configure the blob filter.
    """

    def __init__(
        self, classifier: torch.nn.Module, spacing_mm: Sequence[float], candidate_threshold: float,
        accept_threshold: float = 0.5, lung_labels: Sequence[int] = (2, 5),
        sigmas_mm: Sequence[float] = DEFAULT_BLOB_SIGMAS_MM, patch: Sequence[int] = DEFAULT_CANDIDATE_PATCH,
        paint_fraction: float = 0.85, max_candidates: int = 64,
    ) -> None:
        super().__init__()
        if candidate_threshold <= 0:
            raise ValueError(f"candidate_threshold must be a blob strength > 0, got {candidate_threshold}")
        if not 0.0 < accept_threshold < 1.0:
            raise ValueError(f"accept_threshold must be a probability in (0, 1), got {accept_threshold}")
        if not 0.0 < paint_fraction <= 1.0:
            raise ValueError(f"paint_fraction must be in (0, 1], got {paint_fraction}")
        if len(patch) != 3 or min(int(v) for v in patch) < 4:
            raise ValueError(f"patch must be 3 sizes of at least 4 voxels (x, y, z), got {tuple(patch)}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        if not lung_labels or min(int(v) for v in lung_labels) < 0:
            raise ValueError(f"lung_labels must be one or more label values, got {tuple(lung_labels)}")
        self.blobness = HessianBlobness(spacing_mm, sigmas_mm)
        self.classifier = classifier
        self.candidate_threshold = float(candidate_threshold)
        self.accept_logit = float(torch.logit(torch.tensor(float(accept_threshold))))
        self.lung_labels = [int(v) for v in lung_labels]
        self.patch = [int(v) for v in patch]
        self.paint_fraction = float(paint_fraction)
        self.max_candidates = int(max_candidates)

    def forward(self, x: torch.Tensor, anatomy_logits: torch.Tensor) -> torch.Tensor:
        painted = torch.zeros_like(x, dtype=torch.bool)
        ranked = anatomy_logits.argmax(dim=1, keepdim=True)
        lung = torch.zeros_like(painted)
        for value in self.lung_labels:
            lung |= ranked == value
        if not bool(lung.any()):
            return painted
        strength = self.blobness(x)
        peaks = candidate_peaks(strength, lung, self.candidate_threshold, self.max_candidates)
        if peaks.shape[0] == 0:
            return painted
        logits = self.classifier(candidate_patches(x, strength, peaks, self.patch).float())
        accepted = peaks[logits.reshape(-1) > self.accept_logit]
        sx, sy, sz = x.shape[2], x.shape[3], x.shape[4]
        for p in accepted:
            b, i, j, k = int(p[0]), int(p[1]), int(p[2]), int(p[3])
            i0, j0, k0 = max(i - 1, 0), max(j - 1, 0), max(k - 1, 0)
            i1, j1, k1 = min(i + 2, sx), min(j + 2, sy), min(k + 2, sz)
            near = strength[b, 0, i0:i1, j0:j1, k0:k1] >= self.paint_fraction * strength[b, 0, i, j, k]
            # An assignment, not `|=`: TorchScript does not write an augmented assignment back into a slice.
            painted[b, 0, i0:i1, j0:j1, k0:k1] = painted[b, 0, i0:i1, j0:j1, k0:k1] | near
        return painted
