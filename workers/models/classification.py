"""Serve classification models (MONAI bundles and TorchScript files): class probabilities and an explanation map.

A classification model answers one question about a whole series ("is there a lung
nodule?") with one probability per class. Its registry labels are the classes:
``bundle_value`` = the network's output index, ``code`` = the class's coded value (e.g.
SCT 52101004 "Present"), ``category`` = the question (e.g. SCT 27925004 "Nodule"), the same
for every class; the SR reports the winner as a qualitative evaluation of that question
(:class:`workers.outputs.sr.ClassificationFindings`).

Input (a choice, documented): the **whole field of view resampled to the network's input
size** (``roi_size``), not a sliding window whose outputs are averaged. A study-level
question is about the whole series, and averaging window outputs dilutes a small focal
finding (one nodule in one of eight windows) towards "absent"; a network trained on whole
volumes at a fixed size sees every finding once, at a known scale when the field of view is
that of a chest CT (what the demo model's input domain asks for). The cost is resolution:
a 350 mm field of view at 64 voxels is 5.5 mm a voxel, so findings much smaller than that
are below what such a model can see (the model card says so).

* MONAI bundle (:class:`MonaiBundleClassifier`): the bundle's own ``network_def`` and
  ``preprocessing`` (without ``LoadImaged``); the preprocessing must end on the network's
  input grid (e.g. ``Resized``), the network returns ``(1, N)`` logits, the loader applies
  the softmax. ``metadata.json`` ``dicom_node.explanation``: ``{"method": "grad-cam" | "hirescam" |
  "occlusion" | "none", "layer": "<module name>"}`` (default: Grad-CAM on the last
  ``Conv3d``; HiResCAM = gradient x activation per voxel, for networks with global max pooling).
* TorchScript (:class:`TorchScriptClassifier`): the registry's ``preprocessing`` (RAS,
  ``spacing_mm``, ``window_hu`` scaled to 0..1, then ``Resized`` to ``roi_size``); the
  explanation is occlusion (a scripted module takes no hooks, so Grad-CAM's activations and
  gradients are not reachable; occlusion needs only forward passes, so it will serve ONNX too).

Explanation maps (:func:`grad_cam`, :func:`occlusion_map`) are computed on the network's
grid for the winning class, scaled to 0..1 (divided by their maximum) and brought to the
volume's ``[slice, row, column]`` grid by trilinear sampling through the preprocessed
image's affine (:func:`map_to_volume`), so any preprocessing that keeps MONAI's affine
right (orientation, spacing, resize, crop, pad) is inverted exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dicom_node.contracts import SegmentLabel
from dicom_node.model_catalog import BundleError, TorchScriptPreprocessing
from workers.models.base import ClassificationResult, LabelledModel, ModelKind
from workers.models.loading import (
    BundleModel,
    bundle_network,
    bundle_parser,
    check_modality,
    file_algorithm,
    load_torchscript,
    mapping_or_metadata,
    open_bundle,
    resolve_device,
)
from workers.models.monai_bundle import FILE_LOADERS, ras_affine, volume_to_metatensor, without_transforms
from workers.volume import Volume

__all__ = [
    "ClassificationPipeline",
    "ExplanationMethod",
    "MonaiBundleClassifier",
    "TorchScriptClassifier",
    "classification_preprocessing",
    "grad_cam",
    "last_conv_layer",
    "map_to_volume",
    "occlusion_map",
]

logger = logging.getLogger(__name__)

ExplanationMethod = Literal["grad-cam", "hirescam", "occlusion", "none"]
_METHODS = ("grad-cam", "hirescam", "occlusion", "none")
#: Methods that read a layer's activations and gradients (a scripted network offers neither).
_GRADIENT_METHODS = ("grad-cam", "hirescam")
#: Occlusion: the network grid is cut into this many patches along each axis.
OCCLUSION_PATCHES = 8
#: Occluded inputs per forward pass.
OCCLUSION_BATCH = 16


def classification_preprocessing(window_hu: tuple[float, float], roi_size: tuple[int, int, int],
                                 spacing_mm: tuple[float, float, float] | None = None, image_key: str = "image") -> Any:
    """The MONAI chain of a whole-volume classifier: RAS, optional resampling, HU window to 0..1, resize to ``roi_size``.

    What TorchScript classifiers get from their registry ``preprocessing`` and what the demo
    bundle's ``inference.json`` spells out (the trainer uses this function, so the two agree).
    ``Resized`` uses ``area`` interpolation (an average over each output voxel's footprint).
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        Orientationd,
        Resized,
        ScaleIntensityRanged,
        Spacingd,
    )

    steps: list[Any] = [Orientationd(keys=image_key, axcodes="RAS")]
    if spacing_mm is not None:
        steps.append(Spacingd(keys=image_key, pixdim=list(spacing_mm), mode="bilinear"))
    steps += [
        ScaleIntensityRanged(keys=image_key, a_min=window_hu[0], a_max=window_hu[1], b_min=0.0, b_max=1.0, clip=True),
        Resized(keys=image_key, spatial_size=list(roi_size), mode="area"),
        EnsureTyped(keys=image_key),
    ]
    return Compose(steps)


# --------------------------------------------------------------------------- explanation maps


def last_conv_layer(network: nn.Module) -> nn.Module:
    """The last ``Conv3d`` (in module order) of ``network``: where Grad-CAM reads activations and gradients."""
    convs = [module for module in network.modules() if isinstance(module, nn.Conv3d)]
    if not convs:
        raise BundleError(f"{type(network).__name__} has no Conv3d layer for Grad-CAM; use explanation method "
                          "'occlusion'")
    return convs[-1]


def _normalised(cam: torch.Tensor) -> npt.NDArray[np.float32]:
    """``cam`` clipped at 0 and divided by its maximum (all zeros when nothing is positive), as float32 numpy."""
    cam = torch.clamp(cam.detach().float(), min=0.0)
    top = float(cam.max()) if cam.numel() else 0.0
    if top > 0.0:
        cam = cam / top
    return cam.cpu().numpy().astype(np.float32)


def grad_cam(network: nn.Module, layer: nn.Module, image: torch.Tensor, target: int,
             elementwise: bool = False) -> npt.NDArray[np.float32]:
    """Grad-CAM of class ``target`` for ``image`` ``(1, C, X, Y, Z)``, on the image's grid, 0..1.

    The layer's activations weighted by the spatial mean of the target logit's gradient
    per channel, summed over channels, ReLU, upsampled trilinearly to the input size.
    ``elementwise``: HiResCAM instead (Draelos & Carin 2020): activations times the gradient at
    each voxel, summed over channels. Why: behind global max pooling the gradient reaches only
    the voxel that won the maximum, and Grad-CAM's spatial mean spreads that channel's weight
    over every voxel where the channel is active (e.g. the chest wall), so its peak can lie far
    from the finding; HiResCAM keeps the location.
    """
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        saved["activation"] = output
        output.register_hook(lambda grad: saved.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = network(image.detach().requires_grad_(False))
            network.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        handle.remove()
    if "activation" not in saved or "gradient" not in saved:
        raise BundleError(f"Grad-CAM: layer {type(layer).__name__} did not take part in the forward pass")
    activation, gradient = saved["activation"].detach(), saved["gradient"].detach()
    weights = gradient if elementwise else gradient.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=tuple(image.shape[2:]), mode="trilinear", align_corners=False)
    return _normalised(cam[0, 0])


def occlusion_map(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, target: int,
                  patches: int = OCCLUSION_PATCHES, fill: float = 0.0) -> npt.NDArray[np.float32]:
    """Occlusion sensitivity of class ``target`` for ``image`` ``(1, C, X, Y, Z)``, on the image's grid, 0..1.

    The grid is cut into ``patches`` blocks along each axis; each block in turn is set to
    ``fill`` (0 = the bottom of the window, air) and the drop of the target's probability
    is that block's value. ``predict`` maps a batch of images to logits. Works for any
    model that can be run, since it needs no gradients.
    """
    shape = tuple(int(n) for n in image.shape[2:])
    steps = [max(1, -(-n // patches)) for n in shape]
    with torch.no_grad():
        base = float(torch.softmax(predict(image).float(), dim=1)[0, target])
        blocks = [(x, y, z) for x in range(0, shape[0], steps[0]) for y in range(0, shape[1], steps[1])
                  for z in range(0, shape[2], steps[2])]
        cam = torch.zeros(shape)
        for first in range(0, len(blocks), OCCLUSION_BATCH):
            chunk = blocks[first:first + OCCLUSION_BATCH]
            batch = image.repeat(len(chunk), 1, 1, 1, 1)
            for i, (x, y, z) in enumerate(chunk):
                batch[i, :, x:x + steps[0], y:y + steps[1], z:z + steps[2]] = fill
            probabilities = torch.softmax(predict(batch).float(), dim=1)[:, target].cpu()
            for i, (x, y, z) in enumerate(chunk):
                cam[x:x + steps[0], y:y + steps[1], z:z + steps[2]] = base - float(probabilities[i])
    return _normalised(cam)


def map_to_volume(values: npt.NDArray[np.float32], affine: npt.ArrayLike, volume: Volume) -> npt.NDArray[np.float32]:
    """A map on the network grid (``(X, Y, Z)``, RAS ``affine``) sampled at every voxel of ``volume`` (trilinear).

    Returns float32 on the volume's ``[slice, row, column]`` grid; points outside the
    network grid take the nearest edge value. Slice by slice, so memory stays at one
    slice's coordinates.
    """
    from scipy.ndimage import map_coordinates

    to_network = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ ras_affine(volume)
    slices, rows, columns = volume.shape
    row_index, column_index = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    out = np.empty(volume.shape, dtype=np.float32)
    source = np.asarray(values, dtype=np.float32)
    for k in range(slices):
        # ras_affine takes (column, row, slice) indices.
        points = np.stack([column_index.ravel(), row_index.ravel(), np.full(rows * columns, k), np.ones(rows * columns)])
        network_index = (to_network @ points)[:3]
        out[k] = map_coordinates(source, network_index, order=1, mode="nearest").reshape(rows, columns)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- running


@dataclass
class ClassificationPipeline:
    """Preprocessing, network and explanation of one classification model, without file I/O.

    ``mapping``: ``{network output index: class label}``, one entry per output.
    ``layer``: Grad-CAM's layer (``method`` "grad-cam" or "hirescam" only).
    """

    source: str
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]]
    network: Callable[..., torch.Tensor]
    mapping: Mapping[int, SegmentLabel]
    device: torch.device
    method: ExplanationMethod = "occlusion"
    layer: nn.Module | None = None
    image_key: str = "image"

    def network_input(self, volume: Volume) -> tuple[torch.Tensor, npt.NDArray[np.float64]]:
        """The preprocessed image ``(1, C, X, Y, Z)`` on the device, and its RAS affine."""
        data = self.preprocessing({self.image_key: volume_to_metatensor(volume)})
        image = data[self.image_key]
        affine = getattr(image, "affine", None)
        if affine is None:
            raise BundleError(f"{self.source}: the preprocessing lost the image's affine (not a MetaTensor)")
        tensor = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return tensor[None].float().to(self.device), np.asarray(affine.detach().cpu().numpy(), dtype=np.float64)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """The network's ``(B, N)`` logits, checked against the classes (``N`` = one per mapped class)."""
        with torch.no_grad():
            output = self.network(image)
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != image.shape[0]:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise BundleError(f"{self.source}: the network must return (batch, classes) logits, got {got}")
        if output.shape[1] != len(self.mapping) or set(self.mapping) != set(range(output.shape[1])):
            raise BundleError(f"{self.source}: the network gives {output.shape[1]} class outputs, the labels map "
                              f"outputs {sorted(self.mapping)}; every output needs a label")
        return output.float()

    def run(self, volume: Volume) -> ClassificationResult:
        """Classify ``volume``; the explanation map (if any) on its grid, for the winning class."""
        image, affine = self.network_input(volume)
        logits = self.logits(image)
        probabilities = torch.softmax(logits[0], dim=0).cpu().numpy().astype(np.float64)
        order = sorted(self.mapping, key=lambda index: self.mapping[index].value)
        winner = int(np.argmax(probabilities))
        explanation = None
        if self.method in _GRADIENT_METHODS:
            assert isinstance(self.network, nn.Module) and self.layer is not None
            cam = grad_cam(self.network, self.layer, image, winner, elementwise=self.method == "hirescam")
        elif self.method == "occlusion":
            cam = occlusion_map(self.logits, image, winner)
        if self.method != "none":
            explanation = map_to_volume(cam, affine, volume)
        total = float(sum(probabilities))
        return ClassificationResult(
            labels=tuple(self.mapping[index] for index in order),
            probabilities=tuple(float(probabilities[index]) / total for index in order),
            explanation=explanation,
            explanation_method=None if self.method == "none" else self.method,
        )


def _check_mapping(mapping: Mapping[int, SegmentLabel], source: str) -> None:
    """Classes must be 0..N-1 (network outputs) and all answer the same question (one category)."""
    if len(mapping) < 2:
        raise BundleError(f"{source}: a classification model needs at least two classes, got {len(mapping)}")
    if set(mapping) != set(range(len(mapping))):
        raise BundleError(f"{source}: class labels must map network outputs 0..{len(mapping) - 1} (bundle_value), "
                          f"got {sorted(mapping)}")
    questions = {(label.property_category.value, label.property_category.scheme) for label in mapping.values()}
    if len(questions) != 1:
        raise BundleError(f"{source}: every class must have the same category (the question the model answers), "
                          f"got {sorted(questions)}")


class MonaiBundleClassifier(BundleModel):
    """A classification MONAI bundle, loaded once (see the module docstring for the bundle's contract).

    Arguments as for :class:`workers.models.monai_bundle.MonaiBundleModel`; ``labels``
    default to the metadata's ``dicom_node.labels``.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        labels: Mapping[int, SegmentLabel] | None = None,
        overrides: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        started = time.perf_counter()
        bundle = open_bundle(bundle_dir, kind="classification", device=device, model_id=model_id, name=name,
                             version=version)
        source = self._keep(bundle)
        self._mapping = mapping_or_metadata(labels, bundle.meta, source, "give the classes in the registry entry")
        _check_mapping(self._mapping, source)
        explanation = (bundle.meta.get("dicom_node") or {}).get("explanation") or {}
        method = explanation.get("method", "grad-cam")
        if method not in _METHODS:
            raise BundleError(f"{source}: dicom_node.explanation.method {method!r} is not one of {_METHODS}")
        parser = bundle_parser(bundle, overrides, ("network_def", "preprocessing"))
        network = bundle_network(parser, bundle)
        layer = None
        if method in _GRADIENT_METHODS:
            layer_name = explanation.get("layer")
            if layer_name:
                try:
                    layer = network.get_submodule(str(layer_name))
                except AttributeError as exc:
                    raise BundleError(f"{source}: dicom_node.explanation.layer {layer_name!r} is no module of the "
                                      "network") from exc
            else:
                layer = last_conv_layer(network)
        self._pipeline = ClassificationPipeline(
            source=source,
            preprocessing=without_transforms(parser.get_parsed_content("preprocessing"), FILE_LOADERS, source,
                                             "preprocessing"),
            network=network, mapping=self._mapping, device=self.device, method=method, layer=layer,
            image_key=str(parser.get("image_key", "image")),
        )
        logger.info("loaded %s as classifier %s on %s (explanation %s) in %.1f s", source,
                    self._algorithm.model_id, self.device, method, time.perf_counter() - started)

    @property
    def kind(self) -> ModelKind:
        return "classification"

    def predict(self, volume: Volume) -> ClassificationResult:
        """Class probabilities of ``volume`` and the explanation map on its grid."""
        check_modality(self._modality, volume, self._pipeline.source)
        return self._pipeline.run(volume)


class TorchScriptClassifier(LabelledModel):
    """A TorchScript classification network with the registry's preprocessing; occlusion explanation maps.

    ``preprocessing``: :class:`TorchScriptPreprocessing` (``spacing_mm``, ``window_hu``,
    ``roi_size`` = the network's input size; the sliding-window fields are not used).
    ``explanation``: "occlusion" (default) or "none".
    """

    def __init__(
        self,
        path: str | Path,
        *,
        preprocessing: TorchScriptPreprocessing,
        labels: Mapping[int, SegmentLabel],
        device: str | torch.device | None = None,
        model_id: str | None = None,
        name: str | None = None,
        version: str = "unknown",
        explanation: ExplanationMethod = "occlusion",
    ) -> None:
        started = time.perf_counter()
        self.path = Path(path)
        source = f"TorchScript classifier {self.path}"
        if not self.path.is_file():
            raise BundleError(f"{source}: no such file")
        if explanation in _GRADIENT_METHODS:
            raise BundleError(f"{source}: {explanation} needs the network's layers; a TorchScript file gets occlusion")
        self._mapping = dict(labels)
        _check_mapping(self._mapping, source)
        self.device = resolve_device(device)
        network = load_torchscript(self.path, self.device, source)
        self._algorithm = file_algorithm(self.path, model_id, name, version)
        self._pipeline = ClassificationPipeline(
            source=source,
            preprocessing=classification_preprocessing(preprocessing.window_hu, preprocessing.roi_size,
                                                       preprocessing.spacing_mm),
            network=network, mapping=self._mapping, device=self.device, method=explanation,
        )
        logger.info("loaded %s as classifier %s on %s in %.1f s", source, self._algorithm.model_id, self.device,
                    time.perf_counter() - started)

    @property
    def kind(self) -> ModelKind:
        return "classification"

    def predict(self, volume: Volume) -> ClassificationResult:
        """Class probabilities of ``volume`` and the occlusion map on its grid."""
        return self._pipeline.run(volume)
