"""The joined anatomy + nodule-branch network: its output is an ordinary multi-class softmax."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from workers.models.segmentation_networks import AnatomyWithNoduleBranch, nodule_branch_def


class Constant(torch.nn.Module):
    """A network whose logits are fixed per channel, the same at every voxel."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, *x.shape[2:])


def test_nodule_probability_is_the_branch_sigmoid_and_the_rest_shares_what_is_left() -> None:
    anatomy = [0.5, 2.0, -1.0, 0.0, 1.0, 7.0]  # channel 5 (nodule) is ignored whatever it says
    joined = AnatomyWithNoduleBranch(Constant(anatomy), Constant([0.3]), nodule_channel=5)
    probabilities = torch.softmax(joined(torch.zeros(1, 1, 2, 2, 2)), dim=1)[0, :, 0, 0, 0]
    p_nodule = torch.sigmoid(torch.tensor(0.3))
    assert probabilities[5] == pytest.approx(float(p_nodule), abs=1e-6)
    others = torch.softmax(torch.tensor(anatomy[:5]), dim=0) * (1 - p_nodule)
    torch.testing.assert_close(probabilities[:5], others, rtol=1e-6, atol=1e-6)


def test_a_confident_branch_wins_the_argmax_and_a_doubtful_one_does_not() -> None:
    anatomy = Constant([0.0, 1.0, 6.0, 0.0, 0.0, 0.0])  # clearly lung
    sure = AnatomyWithNoduleBranch(anatomy, Constant([2.0]), nodule_channel=5)
    doubtful = AnatomyWithNoduleBranch(anatomy, Constant([-0.5]), nodule_channel=5)
    x = torch.zeros(1, 1, 1, 1, 1)
    assert int(sure(x).argmax(1)) == 5
    assert int(doubtful(x).argmax(1)) == 2


def test_built_from_a_monai_config_scripts_and_rejects_a_missing_channel() -> None:
    parser = ConfigParser({"net": {
        "_target_": "workers.models.segmentation_networks.AnatomyWithNoduleBranch",
        "anatomy": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 6,
                    "init_filters": 8},
        "nodule": nodule_branch_def(channels=(4, 8, 16, 32)),
        "nodule_channel": 5,
    }})
    network = parser.get_parsed_content("net").eval()
    assert isinstance(network, AnatomyWithNoduleBranch)
    x = torch.rand(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    scripted = torch.jit.script(network)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network(x))
    assert network(x).shape == (1, 6, 16, 16, 8)
    too_few = AnatomyWithNoduleBranch(Constant([0.0, 1.0]), Constant([0.0]), nodule_channel=5)
    with pytest.raises(ValueError, match="nodule channel 5 is missing"):
        too_few(x)
    with pytest.raises(ValueError, match="nodule_channel must be a foreground label value"):
        AnatomyWithNoduleBranch(Constant([0.0]), Constant([0.0]), nodule_channel=0)


def test_a_full_resolution_branch_keeps_its_first_features_on_the_input_grid() -> None:
    x = torch.rand(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    half = ConfigParser({"net": nodule_branch_def(channels=(4, 8, 16, 32))}).get_parsed_content("net").eval()
    full_def = nodule_branch_def(channels=(4, 8, 16, 32), full_resolution_channels=2)
    assert full_def["channels"] == [2, 4, 8, 16, 32] and full_def["strides"] == [1, 2, 2, 2]
    full = ConfigParser({"net": full_def}).get_parsed_content("net").eval()
    with torch.no_grad():
        assert half.model[0](x).shape[2:] == (8, 8, 4)  # MONAI's UNet halves the grid in its first layer
        assert full.model[0](x).shape[2:] == (16, 16, 8)
        torch.testing.assert_close(torch.jit.script(full)(x), full(x))
        assert full(x).shape == (1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="full_resolution_channels must be >= 0, got -1"):
        nodule_branch_def(full_resolution_channels=-1)


def test_the_validation_threshold_moves_the_decision_and_must_be_a_probability() -> None:
    anatomy = Constant([0.0, 0.0, 9.0, 0.0, 0.0, 0.0])  # clearly lung
    branch = Constant([float(torch.logit(torch.tensor(0.45)))])  # the branch says 0.45
    x = torch.zeros(1, 1, 1, 1, 1)
    assert int(AnatomyWithNoduleBranch(anatomy, branch, 5)(x).argmax(1)) == 2
    assert int(AnatomyWithNoduleBranch(anatomy, branch, 5, nodule_threshold=0.4)(x).argmax(1)) == 5
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="nodule_threshold must be a probability"):
            AnatomyWithNoduleBranch(anatomy, branch, 5, nodule_threshold=bad)


def test_branch_runs_only_on_windows_with_lung() -> None:
    """Windows without lung skip the branch; with lung, the output is the branch's as without the skip."""
    from workers.models.segmentation_networks import AnatomyWithNoduleBranch

    calls: list[int] = []

    class Branch(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return x[:, :1] * 4.0 - 2.0

    class Anatomy(torch.nn.Module):  # lung (channel 2) wherever the input exceeds 0.9
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lung = (x > 0.9).float() * 10.0
            return torch.cat([torch.zeros_like(x), torch.ones_like(x), lung, torch.zeros_like(x),
                              torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    x = torch.rand(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    x[1, 0, 2, 2, 2] = 0.95  # only the second window has a lung voxel
    skipping = AnatomyWithNoduleBranch(Anatomy(), Branch(), nodule_channel=5, lung_channel=2)
    always = AnatomyWithNoduleBranch(Anatomy(), Branch(), nodule_channel=5)
    with torch.no_grad():
        y, reference = skipping(x), always(x)
    assert calls == [1, 3]  # the skipping network ran the branch on one window
    torch.testing.assert_close(y[1], reference[1])
    nodule_probability = y.softmax(1)[:, 5]
    assert float(nodule_probability[[0, 2]].max()) < 1e-12 < float(reference.softmax(1)[[0, 2], 5].min())
    with pytest.raises(ValueError, match="lung_channel must be a label value other than the nodule's, got 5"):
        AnatomyWithNoduleBranch(Anatomy(), Branch(), nodule_channel=5, lung_channel=5)


class LeftEdge(torch.nn.Module):
    """A branch that sees a nodule only where the voxel to its left (x - 1) is bright: not mirror-symmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = torch.nn.functional.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]
        return shifted[:, :1] * 8.0 - 4.0


class LungEverywhere(torch.nn.Module):
    """Anatomy logits ranking lung (channel 2 of 6) first at every voxel; scriptable, unlike :class:`Constant`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(x)
        return torch.cat([zero, zero, zero + 9.0, zero, zero, zero], dim=1)


def test_mirrored_branch_averages_the_probability_over_the_mirror_images() -> None:
    anatomy = LungEverywhere()
    x = torch.zeros(1, 1, 5, 3, 3)
    x[0, 0, 2, 1, 1] = 1.0
    plain = AnatomyWithNoduleBranch(anatomy, LeftEdge(), 5)
    mirrored = AnatomyWithNoduleBranch(anatomy, LeftEdge(), 5, nodule_mirror_axes=(0, 1, 2))
    with torch.no_grad():
        p_plain, p_mirrored = (net(x).softmax(1)[0, 5] for net in (plain, mirrored))
    high, low = float(torch.sigmoid(torch.tensor(4.0))), float(torch.sigmoid(torch.tensor(-4.0)))
    # One pass: only the voxel right of the bright one. Mirrored in x, the left one; mirrored in y or z, the right.
    assert float(p_plain[3, 1, 1]) == pytest.approx(high, abs=1e-6)
    assert float(p_plain[1, 1, 1]) == pytest.approx(low, abs=1e-6)
    assert float(p_mirrored[3, 1, 1]) == pytest.approx((3 * high + low) / 4, abs=1e-5)
    assert float(p_mirrored[1, 1, 1]) == pytest.approx((high + 3 * low) / 4, abs=1e-5)
    assert float(p_mirrored[0, 0, 0]) == pytest.approx(low, abs=1e-5)
    assert plain.state_dict().keys() == mirrored.state_dict().keys()  # weights of either load into the other
    scripted = torch.jit.script(mirrored)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), mirrored(x))
    for bad in ((3,), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="mirror axes must be distinct spatial axes"):
            AnatomyWithNoduleBranch(anatomy, LeftEdge(), 5, nodule_mirror_axes=bad)
