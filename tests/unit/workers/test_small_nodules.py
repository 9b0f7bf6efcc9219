"""Hessian blob strength, small-nodule candidates and the stage that paints them into the joined network."""

from __future__ import annotations

import pytest
import torch

from workers.models.blobness import HessianBlobness, gaussian_kernel_1d
from workers.models.postprocessing import drop_small_components
from workers.models.segmentation_networks import (
    BRANCH_MAX_PROBABILITY,
    CERTAIN_NODULE_PROBABILITY,
    AnatomyWithNoduleBranch,
)
from workers.models.small_nodules import SmallNoduleStage, candidate_patches, candidate_peaks

SPACING = (2.2, 2.2, 2.5)  # x, y, z mm


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float] = SPACING) -> list[torch.Tensor]:
    return list(torch.meshgrid(*(torch.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij"))


def _sphere(shape: tuple[int, int, int], centre_mm: tuple[float, float, float], radius_mm: float,
            spacing: tuple[float, float, float] = SPACING) -> torch.Tensor:
    x, y, z = _grid(shape, spacing)
    d = torch.sqrt((x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2)
    return (d <= radius_mm).float()


def test_derivative_kernels_measure_slope_and_curvature_per_millimetre() -> None:
    for spacing in (1.0, 2.2):
        for order, ramp, expected in ((0, lambda t: t * 0 + 3.0, 3.0), (1, lambda t: 2.0 * t, 2.0),
                                      (2, lambda t: 1.5 * t**2, 3.0)):
            kernel = gaussian_kernel_1d(2.0, order, spacing)
            t = (torch.arange(kernel.numel()) - kernel.numel() // 2) * spacing
            assert float((kernel * ramp(t)).sum()) == pytest.approx(expected, rel=1e-4), (order, spacing)
    with pytest.raises(ValueError, match="order must be 0, 1 or 2"):
        gaussian_kernel_1d(1.0, 3)
    with pytest.raises(ValueError, match="sigma and spacing must be > 0"):
        gaussian_kernel_1d(0.0, 1)


def test_a_small_sphere_is_a_blob_and_a_vessel_or_a_flat_image_is_not() -> None:
    shape = (32, 32, 24)
    blobness = HessianBlobness(SPACING)
    image = 0.1 + 0.5 * _sphere(shape, (16 * 2.2, 16 * 2.2, 12 * 2.5), 2.5)
    x, y, _ = _grid(shape)
    vessel = 0.1 + 0.5 * (torch.sqrt((x - 8 * 2.2) ** 2 + (y - 8 * 2.2) ** 2) <= 2.5).float()  # a tube along z
    strength = blobness(image[None, None])[0, 0]
    assert tuple(torch.nonzero(strength == strength.max())[0].tolist()) == (16, 16, 12)
    assert float(strength.max()) > 0.05
    assert float(blobness(vessel[None, None]).max()) < 0.01 * float(strength.max())
    assert float(blobness(torch.full((1, 1, *shape), 0.4)).abs().max()) == 0.0
    # The same 5 mm sphere on a grid of half the spacing has about the same strength: derivatives are in mm.
    fine = (1.1, 1.1, 1.25)
    fine_image = 0.1 + 0.5 * _sphere((64, 64, 48), (32 * 1.1, 32 * 1.1, 24 * 1.25), 2.5, fine)
    fine_strength = HessianBlobness(fine)(fine_image[None, None]).max()
    assert float(fine_strength) == pytest.approx(float(strength.max()), rel=0.25)
    scripted = torch.jit.script(blobness)
    torch.testing.assert_close(scripted(image[None, None]), blobness(image[None, None]))
    with pytest.raises(ValueError, match="spacing_mm must be 3 positive"):
        HessianBlobness((2.2, 2.2))
    with pytest.raises(ValueError, match=r"expected an image \(batch, 1, x, y, z\)"):
        blobness(image[None])


def test_peaks_are_local_maxima_inside_the_allowed_voxels_strongest_first() -> None:
    strength = torch.zeros(2, 1, 10, 10, 10)
    strength[0, 0, 2, 2, 2], strength[0, 0, 6, 6, 6], strength[0, 0, 6, 6, 7] = 0.5, 0.8, 0.3  # 6,6,7 is no maximum
    strength[1, 0, 3, 3, 3], strength[1, 0, 8, 1, 1] = 0.2, 0.9
    allowed = torch.ones_like(strength, dtype=torch.bool)
    allowed[1, 0, 8] = False
    peaks = candidate_peaks(strength, allowed, 0.1, max_candidates=5)
    assert sorted(map(tuple, peaks.tolist())) == [(0, 2, 2, 2), (0, 6, 6, 6), (1, 3, 3, 3)]
    assert candidate_peaks(strength, allowed, 0.6, 5).tolist() == [[0, 6, 6, 6]]
    assert candidate_peaks(strength, allowed, 0.1, max_candidates=1).tolist() == [[0, 6, 6, 6], [1, 3, 3, 3]]
    assert candidate_peaks(strength, allowed, 1.0, 5).shape == (0, 4)


def test_patches_centre_on_the_peak_and_repeat_the_border_beyond_the_volume() -> None:
    image = torch.arange(8 * 8 * 6, dtype=torch.float32).reshape(1, 1, 8, 8, 6)
    strength = 2 * image
    patches = candidate_patches(image, strength, torch.tensor([[0, 4, 4, 3], [0, 0, 7, 5]]), [4, 4, 2])
    assert patches.shape == (2, 2, 4, 4, 2)
    assert float(patches[0, 0, 2, 2, 1]) == float(image[0, 0, 4, 4, 3])
    assert float(patches[0, 1, 2, 2, 1]) == float(strength[0, 0, 4, 4, 3])
    torch.testing.assert_close(patches[0, 0], image[0, 0, 2:6, 2:6, 2:4])
    # Beyond x = 0 and y = 7 the patch repeats the border voxel.
    assert float(patches[1, 0, 0, 2, 1]) == float(image[0, 0, 0, 7, 5])
    assert float(patches[1, 0, 2, 3, 1]) == float(image[0, 0, 0, 7, 5])
    assert candidate_patches(image, strength, torch.zeros(0, 4, dtype=torch.long), [4, 4, 2]).shape == (0, 2, 4, 4, 2)


class CentreStrength(torch.nn.Module):
    """A candidate classifier whose logit is the blob strength at the patch centre less ``cut``: strong = nodule."""

    def __init__(self, cut: float) -> None:
        super().__init__()
        self.cut = cut

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        c = [s // 2 for s in patches.shape[2:]]
        return (patches[:, 1, c[0], c[1], c[2]] - self.cut)[:, None] * 100.0


class Lung(torch.nn.Module):
    """Anatomy logits: lung (2) for x < ``edge``, body (1) beyond."""

    def __init__(self, edge: int) -> None:
        super().__init__()
        self.edge = edge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 6, x.shape[2], x.shape[3], x.shape[4])
        out[:, 2, :self.edge] = 5.0
        out[:, 1, self.edge:] = 5.0
        return out


class Flat(torch.nn.Module):
    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.logit)


def _two_nodules(shape: tuple[int, int, int] = (40, 24, 24)) -> torch.Tensor:
    """Lung (0.1) with a 5 mm nodule at x = 8 (in the lung of :class:`Lung` (24)) and another at x = 32 (not)."""
    image = 0.1 + 0.5 * _sphere(shape, (8 * 2.2, 12 * 2.2, 12 * 2.5), 2.5)
    return image + 0.5 * _sphere(shape, (32 * 2.2, 12 * 2.2, 12 * 2.5), 2.5)


def test_the_stage_paints_accepted_candidates_in_the_lung_only() -> None:
    image = _two_nodules()[None, None]
    logits = Lung(24)(image)
    stage = SmallNoduleStage(CentreStrength(0.02), SPACING, candidate_threshold=0.02).eval()
    painted = stage(image, logits)
    assert painted.dtype == torch.bool and painted.shape == image.shape
    assert bool(painted[0, 0, 8, 12, 12]) and not bool(painted[0, 0, 24:].any())
    assert 1 <= int(painted.sum()) <= 27  # the peak and neighbours of nearly its strength
    # A classifier that rejects everything, or a threshold above every peak, paints nothing.
    assert not bool(SmallNoduleStage(CentreStrength(10.0), SPACING, 0.02).eval()(image, logits).any())
    assert not bool(SmallNoduleStage(CentreStrength(0.0), SPACING, 5.0).eval()(image, logits).any())
    scripted = torch.jit.script(stage)
    assert torch.equal(scripted(image, logits), painted)
    for bad, message in (({"candidate_threshold": 0.0}, "candidate_threshold must be a blob strength > 0"),
                         ({"accept_threshold": 1.0}, r"accept_threshold must be a probability in \(0, 1\)"),
                         ({"paint_fraction": 0.0}, r"paint_fraction must be in \(0, 1\]"),
                         ({"patch": (2, 16, 12)}, "patch must be 3 sizes of at least 4 voxels"),
                         ({"lung_labels": ()}, "lung_labels must be one or more label values")):
        with pytest.raises(ValueError, match=message):
            SmallNoduleStage(CentreStrength(0.0), SPACING, **{"candidate_threshold": 0.02, **bad})


def test_joined_network_marks_painted_voxels_certain_and_caps_the_branch() -> None:
    image = _two_nodules()[None, None]
    stage = SmallNoduleStage(CentreStrength(0.02), SPACING, candidate_threshold=0.02).eval()
    joined = AnatomyWithNoduleBranch(Lung(24), Flat(12.0), nodule_channel=5, small_nodules=stage).eval()
    plain = AnatomyWithNoduleBranch(Lung(24), Flat(12.0), nodule_channel=5).eval()
    with torch.no_grad():
        nodule = torch.softmax(joined(image), 1)[0, 5]
        painted = stage(image, Lung(24)(image))[0, 0]
        assert float(nodule[painted].min()) >= CERTAIN_NODULE_PROBABILITY
        assert float(nodule[~painted].max()) == pytest.approx(BRANCH_MAX_PROBABILITY, abs=1e-6)
        # Without the stage the branch keeps its own probability, above the cap.
        assert float(torch.softmax(plain(image), 1)[0, 5].min()) > BRANCH_MAX_PROBABILITY
    scripted = torch.jit.script(joined)
    torch.testing.assert_close(scripted(image), joined(image))


def test_the_size_filter_keeps_a_certain_speck_and_drops_a_doubtful_one() -> None:
    probabilities = torch.zeros(2, 6, 6, 6)
    probabilities[0] = 1.0
    probabilities[:, 1, 1, 1] = torch.tensor([0.0, CERTAIN_NODULE_PROBABILITY])  # painted: one voxel, certain
    probabilities[:, 4, 4, 4] = torch.tensor([0.01, BRANCH_MAX_PROBABILITY])  # the branch's speck
    kept = drop_small_components(probabilities, channel=1, min_voxels=6, keep_probability=CERTAIN_NODULE_PROBABILITY)
    assert int(kept.argmax(0)[1, 1, 1]) == 1 and int(kept.argmax(0)[4, 4, 4]) == 0
    assert int(drop_small_components(probabilities, channel=1, min_voxels=6).argmax(0)[1, 1, 1]) == 0
    with pytest.raises(ValueError, match=r"keep_probability must be a probability in \(0, 1\]"):
        drop_small_components(probabilities, 1, 6, keep_probability=1.5)
