"""Networks of the shipped segmentation model that MONAI does not have as one class.

Why: a multi-class softmax network trained with Dice+CE on whole-chest patches
learns the large anatomy but not the nodule class: nodules are ~1e-4 of the
voxels, so the nodule logit is pushed down everywhere early and its Dice
gradient never recovers in a CPU-sized training run. A second, binary branch
trained on nodule-rich patches (with its own Dice+BCE) learns them in minutes.
:class:`AnatomyWithNoduleBranch` joins the two into one network with the
ordinary multi-class output, so the bundle's softmax/argmax postprocessing,
the sliding-window inferer, TorchScript export and the node's bundle loader
all stay as they are.

How the two are joined: with anatomy logits ``a`` (one channel per label value,
the nodule channel unused) and the branch's nodule logit ``n``, the nodule
channel becomes ``logsumexp(a_others) + n``. Its softmax is then exactly
``sigmoid(n)``, and every other label ``k`` gets ``(1 - sigmoid(n)) *
softmax(a_others)_k``: P(label) = P(not nodule) x P(label | not nodule).

Two grids: nodules of 3-6 mm are one to eight voxels on the anatomy network's
2.2 x 2.2 x 2.5 mm grid, too few to tell from a vessel. With ``anatomy_pool``
the joined network takes a finer grid (an integer fraction of the anatomy's,
e.g. 1.1 x 1.1 x 1.25 mm): the branch sees every fine voxel, the anatomy network
an average-pooled copy on its own grid, and its logits are interpolated back.
With ``lung_channel`` the branch runs only on windows where the anatomy network
sees lung: every nodule lies in the lungs, and on a thin-slice grid the branch
is most of the cost.

Small nodules: with ``small_nodules`` (a
:class:`workers.models.small_nodules.SmallNoduleStage`) the voxels that stage paints
become nodule with probability ``sigmoid(PAINTED_LOGIT)`` (1 to 17 digits) whatever the
branch says, and the
branch's own probability is capped at :data:`BRANCH_MAX_PROBABILITY`: the
bundle's size filter then keeps a painted nodule of one voxel (its probability
reaches :data:`CERTAIN_NODULE_PROBABILITY`) while it still drops the branch's
specks.

Mirroring: with ``nodule_mirror_axes`` the branch's probability is the mean over
the input and its mirror images along those axes (test-time augmentation, as
nnU-Net mirrors). A vessel crossing that the branch takes for a nodule from one
side seldom looks like one from every side, and the averaged boundary of a true
nodule is smoother than any single pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: Branch logit of the windows :class:`AnatomyWithNoduleBranch` skips: sigmoid(-30) ~ 1e-13.
SKIPPED_LOGIT = -30.0

#: Nodule logit (after the offset) of the voxels the small-nodule stage paints: far above any other window's
#: logit, so Gaussian blending of overlapping windows keeps them nodule.
PAINTED_LOGIT = 40.0
#: Cap of the branch's nodule probability in a network with a small-nodule stage.
BRANCH_MAX_PROBABILITY = 0.999
#: Nodule probability that only painted voxels reach: the size filter's ``keep_probability``.
CERTAIN_NODULE_PROBABILITY = 0.9999

#: Probabilities are clamped to [eps, 1 - eps] before the logit of a mirrored mean: logits within +-13.8.
_MIRROR_EPS = 1e-6

__all__ = ["BRANCH_MAX_PROBABILITY", "CERTAIN_NODULE_PROBABILITY", "AnatomyWithNoduleBranch", "mirror_axes",
           "nodule_branch_def"]


def nodule_branch_def(*, channels: tuple[int, ...] = (16, 32, 64, 128),
                      full_resolution_channels: int = 0) -> dict[str, Any]:
    """MONAI config of the binary nodule branch: a residual 3D UNet with one output logit.

    Three stride-2 levels: patches and sliding windows must be multiples of 8, as
    for the anatomy network. MONAI's UNet downsamples in its first convolution, so
    its finest features lie on a grid twice as coarse as the input's, coarser than a
    3-5 mm nodule; ``full_resolution_channels`` > 0 adds a level of that many
    channels on the input grid above the others (stride 1, same multiples of 8).
    """
    if full_resolution_channels < 0:
        raise ValueError(f"full_resolution_channels must be >= 0, got {full_resolution_channels}")
    levels = [int(c) for c in channels]
    strides = [2] * (len(levels) - 1)
    if full_resolution_channels:
        levels, strides = [int(full_resolution_channels), *levels], [1, *strides]
    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": levels,
        "strides": strides,
        "num_res_units": 1,
    }


def mirror_axes(axes: Sequence[int]) -> tuple[int, ...]:
    """``axes`` checked as distinct spatial axes (0 x, 1 y, 2 z) of a 3D volume, as a tuple."""
    out = tuple(int(a) for a in axes)
    if any(a not in (0, 1, 2) or a != b for a, b in zip(out, axes)) or len(set(out)) != len(out):
        raise ValueError(f"mirror axes must be distinct spatial axes 0 (x), 1 (y), 2 (z), got {tuple(axes)}")
    return out


class AnatomyWithNoduleBranch(torch.nn.Module):
    """An anatomy network whose nodule channel is replaced by a binary nodule branch.

    ``anatomy`` maps ``(B, 1, X, Y, Z)`` to ``(B, C, X, Y, Z)`` logits, one per
    label value; ``nodule`` maps the same input to ``(B, 1, X, Y, Z)`` nodule
    logits; ``nodule_channel`` is the nodule's label value. ``nodule_threshold``: the
    branch probability at which a voxel becomes nodule (its softmax reaches 0.5),
    chosen on validation data by the trainer. ``anatomy_pool`` (x, y, z): how many
    input voxels make one anatomy voxel per axis; (1, 1, 1) runs both on the input
    grid. ``lung_channel``: the lung's label value; a batch item without a voxel
    ranked lung gets nodule probability ~1e-13 without running the branch. The
    output has the input's spatial shape, one channel per label value, for
    softmax/argmax postprocessing. ``nodule_mirror_axes`` (0 x, 1 y, 2 z): the branch
    also runs on the input mirrored along each, and its probabilities are averaged.
    ``small_nodules``: a module ``(x, anatomy logits) -> painted mask (B, 1, X, Y, Z)``
    on the input grid, whose voxels become nodule (see the module docstring).
    """

    def __init__(
        self, anatomy: torch.nn.Module, nodule: torch.nn.Module, nodule_channel: int, nodule_threshold: float = 0.5,
        anatomy_pool: Sequence[int] = (1, 1, 1), lung_channel: int | None = None,
        nodule_mirror_axes: Sequence[int] = (), small_nodules: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        if nodule_channel < 1:
            raise ValueError(f"nodule_channel must be a foreground label value (>= 1), got {nodule_channel}")
        if not 0.0 < nodule_threshold < 1.0:
            raise ValueError(f"nodule_threshold must be a probability in (0, 1), got {nodule_threshold}")
        pool = tuple(int(v) for v in anatomy_pool)
        if len(pool) != 3 or min(pool) < 1 or any(p != v for p, v in zip(pool, anatomy_pool)):
            raise ValueError(f"anatomy_pool must be 3 integers >= 1 (x, y, z), got {tuple(anatomy_pool)}")
        self.anatomy_pool: tuple[int, int, int] = pool  # type: ignore[assignment]
        if lung_channel is not None and (lung_channel < 0 or lung_channel == nodule_channel):
            raise ValueError(f"lung_channel must be a label value other than the nodule's, got {lung_channel}")
        self.lung_channel = -1 if lung_channel is None else int(lung_channel)
        self.skipped_logit = SKIPPED_LOGIT
        self.nodule_mirror_axes = mirror_axes(nodule_mirror_axes)
        # One flag per spatial axis: TorchScript types a list of 3 bools, not an empty list of axes.
        self.mirrored = [axis in self.nodule_mirror_axes for axis in range(3)]
        self.passes = 1 + len(self.nodule_mirror_axes)
        self.mirror_eps = _MIRROR_EPS
        self.anatomy = anatomy
        self.nodule = nodule
        self.nodule_channel = int(nodule_channel)
        # Shifts the branch's logit so that its probability `nodule_threshold` becomes 0.5 at the softmax.
        self.nodule_offset = float(-math.log(nodule_threshold / (1.0 - nodule_threshold)))
        self.has_small_nodules = small_nodules is not None
        self.small_nodules = small_nodules if small_nodules is not None else _NoSmallNodules()
        self.branch_max_logit = float(math.log(BRANCH_MAX_PROBABILITY / (1.0 - BRANCH_MAX_PROBABILITY)))
        self.painted_logit = PAINTED_LOGIT

    def add_small_nodules(self, stage: torch.nn.Module) -> None:
        """Join a small-nodule stage (as ``small_nodules`` does at construction) to a network built without one."""
        self.small_nodules, self.has_small_nodules = stage, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.anatomy_pool == (1, 1, 1):
            logits = self.anatomy(x)
        else:
            coarse = self.anatomy(F.avg_pool3d(x, kernel_size=self.anatomy_pool, stride=self.anatomy_pool))
            logits = F.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=False)
        k = self.nodule_channel
        if logits.shape[1] <= k:
            raise ValueError(f"anatomy network gives {logits.shape[1]} channels, nodule channel {k} is missing")
        others = torch.cat([logits[:, :k], logits[:, k + 1:]], dim=1)
        branch = self._nodule_logits(x, logits) + self.nodule_offset
        if self.has_small_nodules:
            painted = self.small_nodules(x, logits)
            branch = torch.where(painted, torch.full_like(branch, self.painted_logit),
                                 torch.clamp(branch, max=self.branch_max_logit))
        nodule = torch.logsumexp(others, dim=1, keepdim=True) + branch
        return torch.cat([logits[:, :k], nodule, logits[:, k + 1:]], dim=1)

    def _nodule_logits(self, x: torch.Tensor, anatomy_logits: torch.Tensor) -> torch.Tensor:
        """The branch's logits, computed only for the batch items with lung when ``lung_channel`` is set."""
        if self.lung_channel < 0:
            return self.branch_logits(x)
        has_lung = (anatomy_logits.argmax(dim=1) == self.lung_channel).flatten(1).any(dim=1)
        if bool(has_lung.all()):
            return self.branch_logits(x)
        out = torch.full_like(x[:, :1], self.skipped_logit)
        if bool(has_lung.any()):
            out[has_lung] = self.branch_logits(x[has_lung]).to(out.dtype)
        return out

    def branch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's nodule logits (B, 1, X, Y, Z) of ``x``: the logit of its mean probability over ``x`` and
        ``x`` mirrored along each of ``nodule_mirror_axes``, or its plain logits without mirror axes."""
        if self.passes == 1:
            return self.nodule(x)
        probability = torch.sigmoid(self.nodule(x).float())
        for axis in range(3):
            if self.mirrored[axis]:
                dims = [axis + 2]
                probability = probability + torch.sigmoid(torch.flip(self.nodule(torch.flip(x, dims)), dims).float())
        return torch.logit(probability / self.passes, eps=self.mirror_eps)


class _NoSmallNodules(torch.nn.Module):
    """The small-nodule stage of a network without one: paints nothing (TorchScript needs a module there)."""

    def forward(self, x: torch.Tensor, anatomy_logits: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x, dtype=torch.bool)
