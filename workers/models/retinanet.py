"""Serve MONAI RetinaNet detection bundles (Model Zoo ``lung_nodule_ct_detection`` layout) without torchvision.

Why: the Model Zoo's detection bundles build their network with MONAI's
``resnet_fpn_feature_extractor``, which borrows two helpers from torchvision
(``IntermediateLayerGetter`` and ``_validate_trainable_layers``); PyPI's torchvision
does not import beside the torch build we pin, and serving must not depend on it.
Everything else a RetinaNet needs at inference time is MONAI's own
(``RetinaNet``, ``RetinaNetDetector``, the anchor generator, ``BoxCoder``, the box
selector and its NMS in :mod:`monai.data.box_utils`). This loader therefore:

* rewrites the bundle's references to the torchvision-dependent helpers to
  :func:`resnet_fpn_feature_extractor` / :class:`BackboneWithFPN` here, built from
  MONAI and PyTorch blocks with the *same module tree*, so the state-dict keys are
  the Zoo's (``feature_extractor.body.conv1.weight`` ... ``feature_extractor.fpn...``)
  and a real Zoo ``models/model.pt`` loads unchanged;
* builds ``network_def``, the ``anchor_generator`` and the ``detector`` from
  ``configs/inference.json`` and runs its ``detector_ops`` (target keys, score
  threshold, top-k, NMS threshold, detections per image, sliding-window inferer);
* runs the bundle's ``preprocessing`` (less its file loaders) on the series;
* replaces the bundle's ``scripts.detection_inferer.RetinaNetInferer`` (its
  ``scripts`` folder is not part of the configs) with what it does: the whole
  image through the network when it is smaller than the sliding window, else
  (or with ``force_sliding_window``) through the detector's sliding-window inferer;
* maps the boxes (voxel ``xyzxyz`` on the preprocessed image) to patient LPS
  millimetres, as the bundle's own postprocessing does (clip to the image, image
  affine to world, LPS, centre and size), and returns them as
  :class:`~dicom_node.contracts.Detection`\\ s like the demo detector does.

Geometry: MONAI boxes are axis-aligned in voxel space. An axis-aligned series
(axial, coronal, sagittal, any flips) enters exactly as it is (MONAI's
``Orientationd``/``Spacingd`` then do what the bundle says); an oblique one is
first resampled (trilinear) onto a patient-aligned grid at the bundle's
``Spacingd`` spacing, so that every box is also axis-aligned in patient space.

Spacing: the Zoo's config disables its ``Spacingd`` by default
(``whether_raw_luna16: false``: it expects images already resampled to 0.703125 x
0.703125 x 1.25 mm). DICOM series arrive at their own spacing, so a registry entry
for that bundle should set ``overrides: {whether_raw_luna16: true}``; the loader
warns when a bundle's preprocessing resamples nothing.

Labels: the Zoo metadata names no coded concepts; the registry entry's labels
(``bundle_value``: the detector's class index) are required, or the metadata's
``dicom_node.labels`` when a bundle has them.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dicom_node.contracts import Detection, SegmentLabel
from dicom_node.model_catalog import BundleError
from workers.models.base import DetectionResult, ModelKind
from workers.models.loading import (
    MISSING,
    BundleModel,
    bundle_network,
    bundle_parser,
    check_modality,
    mapping_or_metadata,
    open_bundle,
)
from workers.models.nodule_detector import AxialGrid, axial_lps_grid
from workers.volume import Volume

__all__ = [
    "BackboneWithFPN",
    "IntermediateLayers",
    "RetinaNetBundleModel",
    "boxes_to_world_lps",
    "is_retinanet_bundle",
    "resnet_fpn_feature_extractor",
]

logger = logging.getLogger(__name__)

#: ``_target_`` names of MONAI's RetinaNet network class.
_RETINANET_TARGETS = frozenset({"RetinaNet", "monai.apps.detection.networks.retinanet_network.RetinaNet"})
#: The name under which config expressions reach this module (a ConfigParser global).
_SELF = "_dicom_node_retinanet"
#: torchvision-dependent MONAI helpers -> their equivalents here (same arguments, same module tree).
_REPLACEMENTS = {
    "monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor": "resnet_fpn_feature_extractor",
    "monai.networks.blocks.backbone_fpn_utils.BackboneWithFPN": "BackboneWithFPN",
    "monai.networks.blocks.backbone_fpn_utils._resnet_fpn_extractor": "_resnet_fpn_extractor",
}
#: Transforms that read files: the node hands the volume in itself (left out before parsing: an
#: enabled ``LoadImaged(reader="itkreader")`` would need ITK just to be built).
_LOADERS = frozenset({"LoadImaged", "LoadImage", "monai.transforms.LoadImaged", "monai.transforms.LoadImage"})
#: The bundle's own inferer class (its ``scripts`` folder, not shipped with the configs): what we replace.
_ZOO_INFERER = "scripts.detection_inferer.RetinaNetInferer"
#: Flips LPS to RAS and back (x and y change sign).
_LPS_RAS = np.array([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- torchvision-free feature extractor


class IntermediateLayers(nn.ModuleDict):
    """The children of ``model`` up to the last of ``return_layers``, run in order; returns the named outputs.

    What torchvision's ``IntermediateLayerGetter`` does (same children, same order,
    same keys, every child applied in registration order), so that a network built
    with it and one built with this class have identical state dicts and outputs.
    ``return_layers``: ``{child name: output name}``.
    """

    def __init__(self, model: nn.Module, return_layers: Mapping[str, str]) -> None:
        names = [name for name, _ in model.named_children()]
        missing = sorted(set(return_layers) - set(names))
        if missing:
            raise ValueError(f"return_layers {missing} are not children of {type(model).__name__} ({names})")
        wanted = {str(k): str(v) for k, v in return_layers.items()}
        remaining = set(wanted)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            remaining.discard(name)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = wanted

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BackboneWithFPN(nn.Module):
    """MONAI's ``BackboneWithFPN`` (``body`` + ``fpn``, same keys and forward) without torchvision.

    ``backbone``: e.g. a MONAI ResNet; ``return_layers``: ``{child name: output name}``;
    ``in_channels_list``: channels of those outputs; ``out_channels``: FPN channels;
    ``extra_blocks``: default ``LastLevelMaxPool`` (one more, coarser level).
    """

    def __init__(
        self,
        backbone: nn.Module,
        return_layers: Mapping[str, str],
        in_channels_list: list[int],
        out_channels: int,
        spatial_dims: int | None = None,
        extra_blocks: nn.Module | None = None,
    ) -> None:
        from monai.networks.blocks.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
        )

        super().__init__()
        if spatial_dims is None:
            spatial_dims = _spatial_dims_of(backbone)
        self.body = IntermediateLayers(backbone, return_layers)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims,
            in_channels_list=in_channels_list,
            out_channels=out_channels,
            extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(spatial_dims),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features: dict[str, torch.Tensor] = self.fpn(self.body(x))
        return features


def _spatial_dims_of(backbone: nn.Module) -> int:
    dims = getattr(backbone, "spatial_dims", None)
    if isinstance(dims, int):
        return dims
    conv1 = getattr(backbone, "conv1", None)
    if isinstance(conv1, nn.Conv2d):
        return 2
    if isinstance(conv1, nn.Conv3d):
        return 3
    raise ValueError(f"cannot tell the spatial dimensions of backbone {type(backbone).__name__}; give spatial_dims")


def _resnet_fpn_extractor(
    backbone: nn.Module,
    spatial_dims: int,
    trainable_layers: int = 5,
    returned_layers: list[int] | None = None,
    extra_blocks: nn.Module | None = None,
) -> BackboneWithFPN:
    """MONAI's ``_resnet_fpn_extractor``: layers ``returned_layers`` of a ResNet through a 256-channel FPN.

    ``trainable_layers`` freezes the earlier backbone layers as MONAI does (it only
    matters for training; the weights and outputs are the same).
    """
    if trainable_layers < 0 or trainable_layers > 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in backbone.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    returned = [1, 2, 3, 4] if returned_layers is None else list(returned_layers)
    if min(returned) <= 0 or max(returned) >= 5:
        raise ValueError(f"each returned layer must be in [1, 4], got {returned}")
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned)}
    in_planes = getattr(backbone, "in_planes", None)
    if not isinstance(in_planes, int):
        raise TypeError(f"backbone {type(backbone).__name__} has no integer 'in_planes' (a MONAI ResNet has)")
    in_channels_stage2 = in_planes // 8
    in_channels_list = [in_channels_stage2 * 2 ** (i - 1) for i in returned]
    return BackboneWithFPN(backbone, return_layers, in_channels_list, 256, spatial_dims=spatial_dims,
                           extra_blocks=extra_blocks)


def resnet_fpn_feature_extractor(
    backbone: nn.Module,
    spatial_dims: int,
    pretrained_backbone: bool = False,
    returned_layers: Sequence[int] = (1, 2, 3),
    trainable_backbone_layers: int | None = None,
) -> BackboneWithFPN:
    """MONAI's ``resnet_fpn_feature_extractor`` (same arguments, module tree and outputs) without torchvision.

    ``trainable_backbone_layers`` is validated as torchvision's
    ``_validate_trainable_layers`` does (5 without a pretrained backbone, else the
    given value or 3).
    """
    if not pretrained_backbone:
        if trainable_backbone_layers is not None:
            warnings.warn(
                "trainable_backbone_layers is ignored without a pretrained backbone (all layers train)", stacklevel=2
            )
        trainable = 5
    else:
        trainable = 3 if trainable_backbone_layers is None else int(trainable_backbone_layers)
    if not 0 <= trainable <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable}")
    return _resnet_fpn_extractor(backbone, spatial_dims, trainable, returned_layers=list(returned_layers))


# --------------------------------------------------------------------------- config


def is_retinanet_bundle(bundle_dir: Path) -> bool:
    """Whether the bundle's ``configs/inference.json`` builds a MONAI RetinaNet (read as JSON; nothing is built)."""
    path = Path(bundle_dir) / "configs" / "inference.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    network = config.get("network_def") if isinstance(config, dict) else None
    return isinstance(network, dict) and str(network.get("_target_", "")) in _RETINANET_TARGETS


def _torchvision_free(value: Any) -> Any:
    """``value`` (raw config) with references to MONAI's torchvision-dependent helpers pointed at this module."""
    if isinstance(value, dict):
        return {key: _torchvision_free(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_torchvision_free(item) for item in value]
    if not isinstance(value, str):
        return value
    for qualified, local in _REPLACEMENTS.items():
        module, _, name = qualified.rpartition(".")
        if value == qualified or value == name:  # a _target_
            return f"{__name__}.{local}"
        value = value.replace(qualified, f"{_SELF}.{local}")
        value = re.sub(rf"from\s+{re.escape(module)}\s+import\s+{re.escape(name)}\b",
                       f"from {__name__} import {local} as {name}", value)
    return value


def _without_loaders(preprocessing: Any, source: str) -> Any:
    """The raw ``preprocessing`` config without its file loaders (a Compose dict or a list of transforms)."""
    if isinstance(preprocessing, dict) and isinstance(preprocessing.get("transforms"), list):
        kept = [t for t in preprocessing["transforms"]
                if not (isinstance(t, dict) and str(t.get("_target_", "")) in _LOADERS)]
        return {**preprocessing, "transforms": kept}
    raise BundleError(f"{source}: inference.json 'preprocessing' must be a Compose with a 'transforms' list")


def _spacing_pixdim(compose: Any) -> tuple[float, float, float] | None:
    """The ``pixdim`` (x, y, z mm after RAS reorientation) of the first enabled ``Spacingd``, if any."""
    for transform in compose.flatten().transforms:
        if type(transform).__name__ == "Spacingd":
            pixdim = np.asarray(transform.spacing_transform.pixdim, dtype=np.float64).ravel()
            if pixdim.size == 3 and np.all(pixdim > 0):
                return float(pixdim[0]), float(pixdim[1]), float(pixdim[2])
    return None


# --------------------------------------------------------------------------- geometry


def _grid_metatensor(grid: AxialGrid) -> Any:
    """An LPS-aligned grid as ``LoadImage`` + ``EnsureChannelFirst`` would give it: ``(1, X, Y, Z)``, RAS affine."""
    from monai.data import MetaTensor

    array = np.ascontiguousarray(grid.array.transpose(2, 1, 0), dtype=np.float32)[None]
    affine = np.eye(4)
    spacing_xyz = grid.spacing_zyx_mm[::-1]
    for axis in range(3):
        affine[axis, axis] = _LPS_RAS[axis] * spacing_xyz[axis]
        affine[axis, 3] = _LPS_RAS[axis] * grid.origin_xyz_mm[axis]
    tensor_affine = torch.as_tensor(affine, dtype=torch.float64)
    meta = {
        "original_affine": tensor_affine.clone(),
        "spatial_shape": np.asarray(array.shape[1:], dtype=np.int64),
        "space": "RAS",
        "original_channel_dim": 0,
    }
    return MetaTensor(torch.from_numpy(array), affine=tensor_affine, meta=meta)


def boxes_to_world_lps(
    boxes: npt.ArrayLike, affine_ras: npt.ArrayLike, spatial_size: Sequence[int]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Voxel boxes (``xyzxyz`` on an image with RAS ``affine_ras``) as LPS (centres, sizes) in mm, and which were kept.

    What the Zoo bundle's postprocessing computes (``ClipBoxToImaged``,
    ``AffineBoxToWorldCoordinated(affine_lps_to_ras=True)``, ``ConvertBoxModed`` to
    ``cccwhd``): boxes are clipped to the image (``[0, size]`` per axis; empty ones
    dropped), their corners mapped through the affine (a box coordinate ``c`` is at
    ``affine @ c``, MONAI's convention), and the world box is the one spanning the
    mapped corners. Returns ``(centres (N, 3), sizes (N, 3), kept (M,))``.
    """
    from monai.data.box_utils import clip_boxes_to_image

    array = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 6)
    clipped, kept = clip_boxes_to_image(array, list(spatial_size), remove_empty=True)
    corners_vox = clipped.numpy().reshape(-1, 2, 3)
    affine = np.asarray(affine_ras, dtype=np.float64)
    # all eight corners of each box, so that the world box is right for any affine
    pick = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corners = np.stack([corners_vox[:, pick[:, a], a] for a in range(3)], axis=-1)  # (N, 8, 3)
    world = (corners @ affine[:3, :3].T + affine[:3, 3]) * _LPS_RAS
    low, high = world.min(axis=1), world.max(axis=1)
    return (low + high) / 2.0, high - low, kept.numpy().astype(bool)


# --------------------------------------------------------------------------- the model


class RetinaNetBundleModel(BundleModel):
    """A MONAI RetinaNet detection bundle (Model Zoo layout), loaded once, run on volumes without torchvision.

    ``bundle_dir``: the bundle. ``device``: see :func:`~workers.models.loading.resolve_device`
    (AMP on CUDA when the bundle's ``amp`` says so). ``labels``: ``{class index:
    SegmentLabel}`` (required unless the metadata has ``dicom_node.labels``).
    ``overrides``: MONAI config ids and values set before parsing, e.g.
    ``{"whether_raw_luna16": True}`` or ``{"infer_patch_size": [256, 256, 128]}``.
    ``random_weights``: keep the network as built instead of loading
    ``models/model.pt`` (configs without their weights, compatibility tests only).
    ``model_id``, ``name``, ``version`` name the model in results.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        labels: Mapping[int, SegmentLabel] | None = None,
        overrides: Mapping[str, Any] | None = None,
        random_weights: bool = False,
        model_id: str | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        import monai

        started = time.perf_counter()
        bundle = open_bundle(bundle_dir, kind=None, device=device, model_id=model_id, name=name, version=version)
        source = self._source = self._keep(bundle)
        self._mapping = mapping_or_metadata(
            labels, bundle.meta, source, "the Model Zoo's RetinaNet bundles name no coded labels in theirs: give "
            "the model's labels in its config/models.yaml entry, each with bundle_value = the detector's class "
            "index (0 for a one-class detector)")
        parser = bundle_parser(bundle, overrides, ("network_def", "detector", "preprocessing"),
                               config_globals={"monai": monai, "torch": torch, "np": np, "numpy": np,
                                               _SELF: __import__(__name__, fromlist=["_"])})
        parser[""] = _torchvision_free(parser.get())
        parser["preprocessing"] = _without_loaders(parser["preprocessing"], source)
        network = bundle_network(parser, bundle, random_weights=random_weights)
        detector = parser.get_parsed_content("detector")
        if type(detector).__name__ != "RetinaNetDetector":
            raise BundleError(f"{source}: 'detector' is a {type(detector).__name__}, expected a RetinaNetDetector")
        if parser.get("detector_ops", MISSING) is not MISSING:
            parser.get_parsed_content("detector_ops")
        detector.network = network
        detector.eval()
        self._detector = detector
        self._check_labels(int(detector.num_classes))
        self._force_sliding_window = self._sliding_window_flag(parser)
        self._preprocessing = parser.get_parsed_content("preprocessing")
        self._pixdim = _spacing_pixdim(self._preprocessing)
        if self._pixdim is None:
            logger.warning("%s: its preprocessing resamples nothing (no enabled Spacingd): series are detected at "
                           "their own spacing (for the Model Zoo bundle set override whether_raw_luna16: true)", source)
        self._image_key = str(parser.get("image_key", "image"))
        self._amp = self.device.type == "cuda" and bool(parser.get_parsed_content("amp")
                                                         if parser.get("amp", MISSING) is not MISSING else True)
        logger.info(
            "loaded %s as RetinaNet model %s on %s (AMP %s) in %.1f s",
            source, self._algorithm.model_id, self.device, self._amp, time.perf_counter() - started,
        )

    def _check_labels(self, num_classes: int) -> None:
        outside = sorted(value for value in self._mapping if not 0 <= value < num_classes)
        if outside:
            raise BundleError(
                f"{self._source}: labels map class indices {outside}, but the detector has {num_classes} class(es) "
                f"(bundle_value 0..{num_classes - 1})"
            )

    def _sliding_window_flag(self, parser: Any) -> bool:
        inferer = parser.get("inferer", MISSING)
        if inferer is MISSING:
            return False
        target = str(inferer.get("_target_", "")) if isinstance(inferer, dict) else ""
        if target != _ZOO_INFERER:
            logger.warning("%s: inferer %r is not the Zoo's %s; running the equivalent of the latter",
                           self._source, target, _ZOO_INFERER)
        if not isinstance(inferer, dict) or "force_sliding_window" not in inferer:
            return False
        return bool(parser.get_parsed_content("inferer#force_sliding_window"))

    @property
    def kind(self) -> ModelKind:
        return "detection"

    def _use_sliding_window(self, image: torch.Tensor) -> bool:
        """What the Zoo's ``RetinaNetInferer`` decides: slide when forced or when the image is not smaller than the window."""
        inferer = self._detector.inferer
        if self._force_sliding_window:
            return True
        roi = getattr(inferer, "roi_size", None)
        if inferer is None or roi is None:
            return False
        return not image[0].numel() < int(np.prod(roi))

    def _grid(self, volume: Volume) -> AxialGrid:
        spacing = self._pixdim[::-1] if self._pixdim is not None else tuple(sorted(volume.spacing_mm))[::-1]
        return axial_lps_grid(volume, spacing)  # type: ignore[arg-type]

    def raw_detections(self, volume: Volume) -> tuple[dict[str, torch.Tensor], Any]:
        """The detector's output for ``volume`` (boxes in voxels of the preprocessed image) and that image."""
        check_modality(self._modality, volume, self._source)
        data = self._preprocessing({self._image_key: _grid_metatensor(self._grid(volume))})
        image = data[self._image_key]
        sliding = self._use_sliding_window(image)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self._amp):
            outputs = self._detector([image.to(self.device)], use_inferer=sliding)
        logger.debug("%s: %s %s image %s", self._source, "sliding window over" if sliding else "whole",
                     tuple(image.shape[1:]), volume.series_instance_uid)
        return outputs[0], image

    def predict(self, volume: Volume) -> DetectionResult:
        """Findings in ``volume``: boxes in LPS mm with scores, best first."""
        found, image = self.raw_detections(volume)
        detector = self._detector
        boxes = torch.as_tensor(found[detector.target_box_key]).detach().float().cpu().numpy()
        scores = torch.as_tensor(found[detector.pred_score_key]).detach().float().cpu().numpy()
        classes = torch.as_tensor(found[detector.target_label_key]).detach().cpu().numpy().astype(int)
        affine = image.affine.detach().cpu().numpy() if isinstance(image.affine, torch.Tensor) else image.affine
        centres, sizes, kept = boxes_to_world_lps(boxes, affine, image.shape[1:])
        detections = []
        for centre, size, score, cls in zip(centres, sizes, scores[kept], classes[kept]):
            label = self._mapping.get(int(cls))
            if label is None:
                logger.debug("%s: class %d has no label; detection dropped", self._source, cls)
                continue
            if not np.all(size > 0):
                continue
            detections.append(
                Detection(
                    centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                    size_mm=(float(size[0]), float(size[1]), float(size[2])),
                    diameter_mm=float(np.mean(size)),
                    score=min(max(float(score), 0.0), 1.0),
                    label=label,
                )
            )
        detections.sort(key=lambda d: d.score, reverse=True)
        return DetectionResult(detections=tuple(detections))
