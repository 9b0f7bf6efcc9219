"""The lung nodule detector at inference: CenterNet network, its configuration, decoding and :func:`detect`.

Why here: the node's detection worker serves this network from a bundle and
:mod:`training.detection` trains, exports and evaluates it. Both run the same
network, pre-processing and decoding, and serving must not import the training
package (DESIGN.md, "Layers"), so the inference side lives in ``workers.models``
and the trainer imports it. The shipped bundle's ``network_def`` names
:class:`CenterNetDetector` here.

The detector (:class:`CenterNetDetector`, "objects as points" in 3D):

* a strided stem convolution to half resolution (``output_stride`` 2) and a MONAI
  ``BasicUNet`` trunk (batch norm, so patches and whole volumes see the same
  statistics at inference);
* three heads on the trunk's features, concatenated in one output tensor of 7
  channels at ``1 / output_stride`` resolution: channel 0 the centre heatmap (logits,
  apply a sigmoid), channels 1-3 the log box size in mm along x, y, z, channels 4-6
  the sub-voxel offset of the centre (in output voxels, x, y, z);
* decoded by keeping voxels equal to the max-pooled heatmap (``peak_kernel``), the
  top ``max_detections`` of those above ``score_threshold``, and dropping a
  detection whose centre lies inside a higher-scoring one (``suppress_inside``).

The network is plain PyTorch/MONAI and scripts with ``torch.jit.script``; a
bundle's ``models/model.ts`` runs without this module. Everything needed to
reproduce the pre- and post-processing is in the bundle's ``configs/inference.json``
(key ``detection``: :class:`DetectorConfig`, read by :func:`load_detector`) and in
:func:`detect`.

Conventions:

* Inside the network, images are channel-first, RAS-oriented, spatial axes
  (x, y, z), as MONAI's ``Orientationd("RAS")`` gives them (the same as the
  segmentation bundle), resampled to ``spacing_mm`` (x, y, z) and scaled from
  ``window_hu`` to 0..1 (clipped).
* :func:`detect` takes what a DICOM series gives: a ``(z, y, x)`` HU array of an
  axial series (ImageOrientationPatient 1\\0\\0\\0\\1\\0), its spacing ``(z, y, x)`` and
  the LPS position of the centre of voxel (0, 0, 0). It returns :class:`Detection` s
  in DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEATMAP_CHANNEL",
    "N_OUTPUT_CHANNELS",
    "OFFSET_CHANNELS",
    "SIZE_CHANNELS",
    "CenterNetDetector",
    "Detection",
    "DetectorConfig",
    "NetworkGrid",
    "build_network",
    "decode_heads",
    "detect",
    "detections_on_grid",
    "lps_to_ras",
    "load_detector",
    "predict_heads",
    "ras_to_lps",
    "to_network_grid",
]

Vec3 = tuple[float, float, float]

#: Output channel layout of :class:`CenterNetDetector`.
HEATMAP_CHANNEL = 0
SIZE_CHANNELS = (1, 2, 3)
OFFSET_CHANNELS = (4, 5, 6)
N_OUTPUT_CHANNELS = 7


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Detection:
    """One detected nodule.

    ``centre_xyz_mm`` is in world millimetres (:func:`detect` reports DICOM patient
    coordinates, LPS); ``diameter_mm`` its estimated diameter;
    ``score`` its confidence in [0, 1]; ``label`` its class index (0: nodule).
    ``size_xyz_mm`` optionally holds the box extent along x, y, z when it is not a
    cube of side ``diameter_mm``.
    """

    centre_xyz_mm: Vec3
    diameter_mm: float
    score: float
    label: int = 0
    size_xyz_mm: Vec3 | None = None

    @property
    def box_cccwhd(self) -> tuple[float, float, float, float, float, float]:
        """The box as (centre x, y, z, width, height, depth) in mm (MONAI ``cccwhd``)."""
        size = self.size_xyz_mm or (self.diameter_mm,) * 3
        return (*self.centre_xyz_mm, *size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "centre_xyz_mm": [float(v) for v in self.centre_xyz_mm],
            "diameter_mm": float(self.diameter_mm),
            "score": float(self.score),
            "label": int(self.label),
            "box_cccwhd_mm": [float(v) for v in self.box_cccwhd],
        }


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines the detector: network, targets, pre- and post-processing.

    Spatial tuples are (x, y, z) in the RAS network grid. Written to the bundle's
    ``configs/inference.json`` under ``detection`` and read back by :func:`load_detector`.
    """

    # preprocessing
    spacing_mm: tuple[float, float, float] = (2.2, 2.2, 2.5)
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    # network
    features: tuple[int, int, int, int, int, int] = (16, 24, 32, 48, 64, 24)
    head_channels: int = 24
    output_stride: int = 2
    # targets and loss
    sigma_scale: float = 0.5  # heatmap sigma = sigma_scale * radius, in output voxels ...
    min_sigma: float = 0.8  # ... but at least this many output voxels
    size_loss_weight: float = 1.0
    offset_loss_weight: float = 1.0
    # training patches
    patch_size: tuple[int, int, int] = (64, 64, 64)
    positive_fraction: float = 0.6  # patches around a nodule
    hard_negative_fraction: float = 0.25  # patches around a mined false positive (the rest: random)
    mine_interval: int = 5  # epochs between hard-negative mining passes
    mine_cases: int = 8  # training cases run per mining pass (in turn)
    mine_per_case: int = 8  # false positives kept per mined case
    mine_min_score: float = 0.1
    flip: bool = True
    intensity_jitter: float = 0.05
    # inference
    roi_size: tuple[int, int, int] = (192, 192, 128)  # whole volume up to this size, else sliding window
    overlap: float = 0.25
    peak_kernel: int = 3
    score_threshold: float = 0.3
    max_detections: int = 20
    suppress_inside: bool = True
    # evaluation (FROC needs the low-score tail of the detections)
    froc_score_threshold: float = 0.02
    froc_max_detections: int = 50

    def __post_init__(self) -> None:
        if self.output_stride not in (1, 2):
            raise ValueError(f"output_stride must be 1 or 2, got {self.output_stride}")
        div = self.size_divisor
        if any(int(p) % div for p in self.patch_size) or any(int(r) % div for r in self.roi_size):
            raise ValueError(f"patch_size and roi_size must be multiples of {div}: {self.patch_size}, {self.roi_size}")
        if self.peak_kernel < 1 or self.peak_kernel % 2 == 0:
            raise ValueError(f"peak_kernel must be odd and >= 1, got {self.peak_kernel}")
        if not self.window_hu[0] < self.window_hu[1]:
            raise ValueError(f"window_hu must be (lo, hi) with lo < hi, got {self.window_hu}")
        if len(self.features) != 6:
            raise ValueError(f"features must have 6 values (BasicUNet), got {self.features}")

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this (stride times BasicUNet's 4 poolings)."""
        return 16 * self.output_stride

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                continue  # written by a newer version: ignore
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


# --------------------------------------------------------------------------- network


def _head(in_channels: int, out_channels: int) -> nn.Sequential:
    # 1x1x1 convolutions: the trunk already has the spatial context, and 3x3x3 heads
    # would cost as much as the trunk's highest-resolution level on CPU.
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv3d(in_channels, in_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv3d(in_channels, out_channels, kernel_size=1),
    )


class CenterNetDetector(nn.Module):
    """CenterNet-style 3D detector: strided stem convolution + MONAI BasicUNet trunk + 3 heads.

    ``forward(x)`` maps ``(B, 1, X, Y, Z)`` (sizes multiples of ``16 * output_stride``)
    to ``(B, 7, X/s, Y/s, Z/s)``: heatmap logits, log size (mm, x y z), offset (output
    voxels, x y z). Output voxel ``j`` is centred on input voxel ``s * j``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (16, 24, 32, 48, 64, 24),
        head_channels: int = 24,
        output_stride: int = 2,
        prior_probability: float = 0.01,
        initial_size_mm: float = 10.0,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets import BasicUNet

        features = tuple(int(f) for f in features)
        if output_stride not in (1, 2):
            raise ValueError(f"output_stride must be 1 or 2, got {output_stride}")
        self.output_stride = int(output_stride)
        self.stem = Convolution(
            3, in_channels, features[0], strides=output_stride, kernel_size=3, norm="batch", act="relu"
        )
        self.trunk = BasicUNet(
            spatial_dims=3, in_channels=features[0], out_channels=head_channels, features=features, norm="batch"
        )
        self.heatmap_head = _head(head_channels, 1)
        self.size_head = _head(head_channels, 3)
        self.offset_head = _head(head_channels, 3)
        heat_out = self.heatmap_head[-1]
        size_out = self.size_head[-1]
        assert isinstance(heat_out, nn.Conv3d) and isinstance(size_out, nn.Conv3d)
        assert heat_out.bias is not None and size_out.bias is not None
        nn.init.constant_(heat_out.bias, -math.log((1.0 - prior_probability) / prior_probability))
        nn.init.constant_(size_out.bias, math.log(initial_size_mm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(self.stem(x))
        return torch.cat([self.heatmap_head(features), self.size_head(features), self.offset_head(features)], dim=1)


def build_network(config: DetectorConfig) -> CenterNetDetector:
    """The (untrained) network of ``config``."""
    return CenterNetDetector(
        features=config.features,
        head_channels=config.head_channels,
        output_stride=config.output_stride,
    )


# --------------------------------------------------------------------------- decoding


def decode_heads(
    heads: torch.Tensor,
    *,
    output_stride: int = 2,
    score_threshold: float = 0.3,
    max_detections: int = 20,
    peak_kernel: int = 3,
    heatmap_is_logits: bool = True,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Peaks of one image's heads ``(7, X, Y, Z)``: (centres, sizes_mm, scores), by score.

    A peak is a voxel equal to the max-pooled heatmap (``peak_kernel`` cube) with a
    score of at least ``score_threshold``; the ``max_detections`` best are kept.
    Centres (N, 3) are continuous indices of the *input* grid (x, y, z):
    ``output_stride * (voxel + offset)``; sizes (N, 3) in mm.
    """
    heads = heads.detach().float()
    heat = torch.sigmoid(heads[HEATMAP_CHANNEL]) if heatmap_is_logits else heads[HEATMAP_CHANNEL]
    pooled = F.max_pool3d(heat[None, None], kernel_size=peak_kernel, stride=1, padding=peak_kernel // 2)[0, 0]
    keep = (heat == pooled) & (heat >= score_threshold)
    index = torch.nonzero(keep)
    scores = heat[keep]
    if scores.numel() > max_detections:
        scores, order = torch.topk(scores, max_detections)
        index = index[order]
    else:
        scores, order = torch.sort(scores, descending=True)
        index = index[order]
    ix, iy, iz = index[:, 0], index[:, 1], index[:, 2]
    offsets = heads[4:7][:, ix, iy, iz].T
    log_sizes = heads[1:4][:, ix, iy, iz].T
    centres = output_stride * (index.to(torch.float32) + offsets)
    sizes = torch.exp(log_sizes)
    return (
        centres.cpu().numpy().astype(np.float64),
        sizes.cpu().numpy().astype(np.float64),
        scores.cpu().numpy().astype(np.float64),
    )


# --------------------------------------------------------------------------- geometry and preprocessing


@dataclass
class NetworkGrid:
    """An axis-aligned RAS network grid: world RAS (mm) = origin + index * spacing (x, y, z)."""

    origin_ras: npt.NDArray[np.float64]
    spacing: npt.NDArray[np.float64]

    def to_world_ras(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return self.origin_ras + np.asarray(index, dtype=np.float64) * self.spacing

    def to_index(self, world_ras: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return (np.asarray(world_ras, dtype=np.float64) - self.origin_ras) / self.spacing


def lps_to_ras(points: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``points`` (..., 3) converted between LPS and RAS (a copy): x and y change sign, z stays."""
    p = np.array(points, dtype=np.float64)
    p[..., :2] *= -1.0
    return p


ras_to_lps = lps_to_ras  # the same flip of x and y


def to_network_grid(
    volume_hu: npt.ArrayLike,
    spacing_zyx: Sequence[float],
    origin_lps: Sequence[float],
    config: DetectorConfig,
) -> tuple[torch.Tensor, NetworkGrid]:
    """HU ``(z, y, x)`` axial (LPS) array -> normalised RAS ``(X, Y, Z)`` tensor on the model grid."""
    vol = np.asarray(volume_hu)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (z, y, x), got shape {vol.shape}")
    nz, ny, nx = vol.shape
    sz, sy, sx = (float(v) for v in spacing_zyx)
    # RAS array: index a along x runs towards patient right (LPS x decreasing), b towards anterior.
    ras = np.ascontiguousarray(vol.transpose(2, 1, 0)[::-1, ::-1, :], dtype=np.float32)
    ox, oy, oz = (float(v) for v in origin_lps)
    origin_ras = np.array([-(ox + (nx - 1) * sx), -(oy + (ny - 1) * sy), oz])
    native = np.array([sx, sy, sz])
    target = np.asarray(config.spacing_mm, dtype=np.float64)
    image = torch.from_numpy(ras)
    spacing = native
    if np.any(np.abs(native - target) > 0.02 * target):
        shape = np.array(ras.shape)
        new_shape = np.maximum(np.rint((shape - 1) * native / target).astype(int) + 1, 2)
        image = F.interpolate(
            image[None, None], size=tuple(int(s) for s in new_shape), mode="trilinear", align_corners=True
        )[0, 0]
        spacing = native * (shape - 1) / (new_shape - 1)
    lo, hi = config.window_hu
    image = ((image - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return image.contiguous(), NetworkGrid(origin_ras=origin_ras, spacing=np.asarray(spacing, dtype=np.float64))


def _pad_to(image: torch.Tensor, divisor: int) -> torch.Tensor:
    """Pad (..., X, Y, Z) at the far end to multiples of ``divisor`` with 0 (air)."""
    pads: list[int] = []
    for n in reversed(image.shape[-3:]):
        pads += [0, (-int(n)) % divisor]
    return F.pad(image, pads, value=0.0) if any(pads) else image


@torch.no_grad()
def predict_heads(
    network: nn.Module | torch.jit.ScriptModule,
    image: torch.Tensor,
    config: DetectorConfig,
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The network's heads ``(7, ceil(X/s), ceil(Y/s), ceil(Z/s))`` for a normalised ``(X, Y, Z)`` image.

    The whole image in one pass when it fits in ``config.roi_size``, else MONAI's
    sliding-window inference (Gaussian blending, ``config.overlap``).
    """
    dev = torch.device(device)
    network.eval()
    stride = config.output_stride
    shape = image.shape[-3:]
    x = _pad_to(image.reshape(1, 1, *shape).to(dev, torch.float32), config.size_divisor)
    use_amp = dev.type == "cuda"
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
        if all(int(n) <= int(r) for n, r in zip(x.shape[-3:], config.roi_size)):
            out = network(x)
        else:
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(
                x, roi_size=list(config.roi_size), sw_batch_size=1, predictor=network,
                overlap=config.overlap, mode="gaussian", padding_mode="constant", cval=0.0,
            )
    out_shape = [math.ceil(int(n) / stride) for n in shape]
    return torch.as_tensor(out)[0, :, : out_shape[0], : out_shape[1], : out_shape[2]].float()


def _suppress_inside(
    centres: npt.NDArray[np.float64], sizes: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """Indices kept when each detection inside a higher-scoring one's sphere is dropped (by score)."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        inside = False
        for k in kept:
            if np.linalg.norm(centres[i] - centres[k]) <= float(np.mean(sizes[k])) / 2.0:
                inside = True
                break
        if not inside:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def detections_on_grid(
    heads: torch.Tensor,
    grid: NetworkGrid,
    config: DetectorConfig,
    score_threshold: float,
    max_detections: int,
) -> list[Detection]:
    """The detections (LPS mm, best first) that one image's ``heads`` give on ``grid``.

    Peaks as :func:`decode_heads` finds them with ``score_threshold`` and
    ``max_detections`` (the caller's: the product's operating point, or FROC's
    low-score tail), mapped to LPS, then ``config.suppress_inside`` applied.
    """
    centres, sizes, scores = decode_heads(
        heads,
        output_stride=config.output_stride,
        score_threshold=score_threshold,
        max_detections=max_detections,
        peak_kernel=config.peak_kernel,
    )
    world_lps = ras_to_lps(grid.to_world_ras(centres)) if len(centres) else np.zeros((0, 3))
    if config.suppress_inside and len(scores) > 1:
        keep = _suppress_inside(world_lps, sizes, scores)
        world_lps, sizes, scores = world_lps[keep], sizes[keep], scores[keep]
    return [
        Detection(
            centre_xyz_mm=(float(c[0]), float(c[1]), float(c[2])),
            diameter_mm=float(np.mean(s)),
            score=float(p),
            label=0,
            size_xyz_mm=(float(s[0]), float(s[1]), float(s[2])),
        )
        for c, s, p in zip(world_lps, sizes, scores)
    ]


def detect(
    network: nn.Module | torch.jit.ScriptModule,
    volume_hu: npt.ArrayLike,
    spacing_mm: Sequence[float],
    origin_xyz_mm: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    config: DetectorConfig | None = None,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Detection]:
    """Nodules in one CT: detections (LPS centre mm, diameter, box, score), best first.

    ``volume_hu`` is a ``(z, y, x)`` array of an axial series in Hounsfield units,
    ``spacing_mm`` its ``(z, y, x)`` spacing and ``origin_xyz_mm`` the LPS position of
    the centre of voxel (0, 0, 0). ``network`` is a :class:`CenterNetDetector` or the
    bundle's TorchScript module; ``config`` the bundle's :class:`DetectorConfig`
    (:func:`load_detector`; default: the defaults). ``score_threshold`` and
    ``max_detections`` override the config's.
    """
    config = config or DetectorConfig()
    image, grid = to_network_grid(volume_hu, spacing_mm, origin_xyz_mm, config)
    heads = predict_heads(network, image, config, device=device)
    return detections_on_grid(
        heads,
        grid,
        config,
        config.score_threshold if score_threshold is None else float(score_threshold),
        config.max_detections if max_detections is None else int(max_detections),
    )


# --------------------------------------------------------------------------- bundle


def load_detector(
    bundle_dir: str | Path, *, device: str | torch.device = "cpu", prefer_torchscript: bool = True
) -> tuple[nn.Module | torch.jit.ScriptModule, DetectorConfig]:
    """(network, config) of a detection bundle: ``models/model.ts`` if present (and preferred),
    else the network rebuilt from ``network_def`` with ``models/model.pt``."""
    bundle = Path(bundle_dir)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    config = DetectorConfig.from_dict(inference.get("detection", {}))
    ts_path = bundle / "models" / "model.ts"
    dev = torch.device(device)
    if prefer_torchscript and ts_path.exists():
        network: Any = torch.jit.load(str(ts_path), map_location=dev)
    else:
        net_def = {k: v for k, v in inference["network_def"].items() if k != "_target_"}
        network = CenterNetDetector(**net_def)
        state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        network = network.to(dev)
    network.eval()
    return network, config

